"""Running past one machine: tensor/expert-parallel inference and FSDP2 training on torch.distributed.

Applied from outside the model, like the CPU backend (torchtitan's ``parallelize`` habit): ``kimi_lm/model`` stays
single-device and never imports this package. Modules:

- ``runtime``   process-group set-up from torchrun's environment, rank-0 printing
- ``parallel``  ``--tp`` / ``--ep``: split heads, dense products and routed experts of a built model across ranks
- ``load``      one rank's slices of a safetensors checkpoint, reading only their bytes
- ``launch``    the ``--tp`` / ``--ep`` flags of ``kimi-lm generate`` and ``serve``: checks, process group, rank 0
                alone prints
- ``serve``     ``kimi-lm serve --tp N / --ep N``: the serving engine in lockstep on every rank, HTTP on rank 0
- ``memory``    ``kimi-lm estimate --tp N --ep N``: memory per rank, split as ``parallel`` splits
- ``fsdp``      ``train --fsdp``: FSDP2 (``fully_shard``) sharding, activation checkpointing, DCP checkpoints

This file only documents; import the modules themselves.
"""
