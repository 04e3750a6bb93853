"""Training: ``kimi-lm train`` (train.py), data packing (data.py), Muon/AdamW + WSD (optim.py), MoE balancing
(balance.py) and weight initialisation (init.py)."""
