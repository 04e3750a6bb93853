"""Write a Kimi Linear model as an official-layout checkpoint directory, atomically: what ``kimi_lm.load`` reads.

    kimi_lm.save.save(model, "run/step-000100", tokenizer_dir="kimi_lm/default_model", dtype=torch.bfloat16)

The directory holds ``config.json`` (the official remote-code keys, ``KimiLinearConfig.to_dict``), safetensors
shards ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json`` (weight map and ``total_size``),
the tokenizer files if ``tokenizer_dir`` is given, and any ``files`` the caller adds (trainer state). Tensor names
are the checkpoint's, from the loader's own table read backwards (``names.to_checkpoint``): the stacked experts are
split back into per-expert ``experts.E.w1/w3/w2`` with the loader's slicing (``names.expert_slice``), so writing and
reading are exact inverses; A_log, dt_bias and the router bias stay fp32 as the loader keeps them.

Everything is written into a temporary directory beside the target and renamed into place only when complete
(``files.atomic_dir``), so a crash never leaves a half-written checkpoint; ``overwrite=True`` swaps an existing
directory out the same way.

Reference: ``kimi_lm.names`` (the name table); Hugging Face sharded-safetensors index format.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from kimi_lm import names
from kimi_lm.checkpoint import FP32_SUFFIXES, plan_shards, write_safetensors
from kimi_lm.files import atomic_dir

INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja")


def checkpoint_tensors(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Checkpoint name -> tensor (views where possible), in the official naming."""
    out = {}
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    family = names.family(model.config)
    for param, t in state.items():
        if dtype is not None and t.is_floating_point() and not param.endswith(FP32_SUFFIXES):
            t = t.to(dtype)
        for name, placement in names.to_checkpoint(param, family):
            if placement in names.PER_EXPERT:
                out.update({name.format(E=e): names.expert_slice(t, placement, e) for e in range(t.shape[0])})
            else:
                out[name] = t
    return out


def save(model, path, *, dtype: torch.dtype | None = None, tokenizer_dir=None, files: dict | None = None,
         max_shard_bytes: int = 2**30, overwrite: bool = False, config: dict | None = None) -> Path:
    """Write ``model`` to the directory ``path`` (atomically). ``dtype``: cast float weights (default: as they are).
    ``files``: extra ``name -> bytes | str | Path`` written into the same directory before it appears.
    ``config``: the config.json to write instead of ``model.config.to_dict()``."""
    path = Path(path)
    tensors = checkpoint_tensors(model, dtype)
    shards = plan_shards(sorted(tensors), lambda name: tensors[name].nbytes, max_shard_bytes)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        config = dict(config or model.config.to_dict())
        config["dtype"] = str(dtype or model.dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        weight_map, total = {}, 0
        for i, in_shard in enumerate(shards):
            shard = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            entries = {n: (tensors[n].dtype, list(tensors[n].shape)) for n in in_shard}
            total += write_safetensors(tmp / shard, entries, lambda n: tensors[n], metadata={"format": "pt"})
            weight_map.update({n: shard for n in in_shard})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        for name, content in (files or {}).items():
            if isinstance(content, Path):
                shutil.copy2(content, tmp / name)
            else:
                (tmp / name).write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def export_to_transformers(src, dst, dtype: torch.dtype = torch.bfloat16) -> dict:
    """``kimi-lm convert --to-hf``: any Kimi Linear checkpoint kimi-lm reads -> the official layout with a
    config.json that ``transformers.KimiLinearForCausalLM.from_pretrained`` loads (same logits, tested).

    The config keeps the official keys and adds transformers' own explicit ones (0-based ``layer_types`` /
    ``mlp_layer_types``). Refused: Block AttnRes models (transformers' Kimi Linear has no AttnRes) and
    non-Kimi-Linear models."""
    from kimi_lm.checkpoint import load
    from kimi_lm.config import KimiLinearConfig, load_config
    from kimi_lm.errors import CheckpointError

    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise CheckpointError(f"{dst}: already exists; choose a new output directory")
    config = load_config(src / "config.json") if src.is_dir() else None
    if config is None:
        raise CheckpointError(f"{src}: not a checkpoint directory (expected a folder with config.json and *.safetensors)")
    if not isinstance(config, KimiLinearConfig):
        raise CheckpointError(f"{src}: --to-hf exports Kimi Linear checkpoints; this is {config.model_type}")
    if config.attn_res_block_size:
        raise CheckpointError(
            f"{src / 'config.json'}: attn_res_block_size = {config.attn_res_block_size}: transformers' "
            f"KimiLinearForCausalLM has no Block Attention Residuals, so it cannot run this model"
        )
    model = load(src, dtype=torch.float32)
    if any(not p.is_floating_point() for p in model.parameters()):
        raise CheckpointError(f"{src}: quantized weights; run `kimi-lm convert --dequantize` first")
    n = config.num_hidden_layers
    hf = config.to_dict()
    hf.pop("attn_res_block_size", None)
    hf["layer_types"] = ["linear_attention" if config.is_kda_layer(i) else "full_attention" for i in range(n)]
    hf["mlp_layer_types"] = ["sparse" if config.is_moe_layer(i) else "dense" for i in range(n)]
    save(model, dst, dtype=dtype, tokenizer_dir=src, config=hf)
    return {"src": str(src), "dst": str(dst), "dtype": str(dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in model.parameters())}
