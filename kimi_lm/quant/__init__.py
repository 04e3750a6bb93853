"""Quantized weight formats, one file per format, each with a packer, a plain reference dequantizer (the oracle) and
a module whose forward dequantizes tile by tile. A quantized model is an ordinary model with some modules swapped.

* ``fp8_block``: float8 e4m3 with one fp32 scale per 128×128 block (DeepSeek-V3 / Kimi K2 official checkpoints).
"""
