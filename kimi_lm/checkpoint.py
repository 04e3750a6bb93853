"""Checkpoint loading: config.json + safetensors (single file or shards with an index) -> model.

The model is built on the meta device and every tensor is read once, cast if needed and assigned in place, so peak
memory is about the size of the model (not twice it). Only safetensors are read: nothing is ever unpickled and no
checkpoint code is executed.

Parameter names equal the checkpoint's names except for the cases in ``NAME_RULES`` (one declarative table):
per-expert ``w1/w3/w2`` matrices are stacked into ``gate_up_proj`` / ``down_proj`` and a dense layer written by
transformers under ``block_sparse_moe.*`` is read as ``mlp.*``. Every problem raises ``CheckpointError`` naming the
file, tensor or key, what was expected and what was found; a partial load is never returned.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open

from kimi_lm.config import KimiLinearConfig
from kimi_lm.errors import CheckpointError

# checkpoint name (regex) -> (parameter name template, placement)
#   placement "copy": whole tensor; "gate"/"up": rows [0, I) / [I, 2I) of stacked expert E; "down": stacked expert E
NAME_RULES: list[tuple[re.Pattern, str, str]] = [
    (re.compile(r"(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.w1\.weight"),
     r"\1.block_sparse_moe.experts.gate_up_proj", "gate"),
    (re.compile(r"(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.w3\.weight"),
     r"\1.block_sparse_moe.experts.gate_up_proj", "up"),
    (re.compile(r"(model\.layers\.\d+)\.block_sparse_moe\.experts\.(\d+)\.w2\.weight"),
     r"\1.block_sparse_moe.experts.down_proj", "down"),
    # transformers' save_pretrained renames every `mlp.` to `block_sparse_moe.`, the dense first layer included
    (re.compile(r"(model\.layers\.\d+)\.block_sparse_moe\.(gate_proj|up_proj|down_proj)\.weight"),
     r"\1.mlp.\2.weight", "copy"),
]
# Tensors present in some checkpoints that carry nothing the forward pass needs.
SKIP = [re.compile(r".*\.rotary_emb\.inv_freq$")]
# Kept in fp32 whatever the model dtype: they feed exp() / selection and are tiny (spec §8.3).
FP32_SUFFIXES = ("A_log", "dt_bias", "e_score_correction_bias")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype, config: KimiLinearConfig) -> torch.dtype:
    if dtype is None or dtype == "auto":
        dtype = config.dtype or "bfloat16"
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"dtype {dtype!r} is not supported; expected one of {list(_DTYPE_NAMES)} or 'auto'")
        dtype = _DTYPE_NAMES[dtype]
    if dtype not in _FLOAT_DTYPES:
        raise CheckpointError(f"dtype {dtype} is not supported; expected torch.float32, torch.bfloat16 or torch.float16")
    return dtype


def weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> shard file, from the index if present, else from the single file or every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index (expected a 'weight_map' object): {exc}") from None
        files = {}
        for name, shard in weight_map.items():
            if not (path / shard).is_file():
                raise CheckpointError(f"{index}: tensor {name!r} is listed in shard {shard!r}, which does not exist")
            files[name] = path / shard
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {pickles}: pickle files are never loaded, convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"{path}: no *.safetensors weights found{hint}")
    files = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                files[name] = shard
    return files


def _target_name(name: str) -> tuple[str, str, int]:
    """Checkpoint tensor name -> (parameter name, placement, expert index or -1)."""
    for pattern, template, placement in NAME_RULES:
        m = pattern.fullmatch(name)
        if m:
            expert = int(m.group(2)) if placement != "copy" else -1
            return m.expand(template), placement, expert
    return name, "copy", -1


def load(path, dtype=torch.bfloat16, device="cpu"):
    """Load a Kimi Linear checkpoint directory; returns the model in eval mode without gradients."""
    from kimi_lm.model.kimi_linear import KimiLinearForCausalLM

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (expected a folder with config.json and *.safetensors)")
    config = KimiLinearConfig.from_file(path / "config.json")
    dtype = resolve_dtype(dtype, config)
    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    loaded: dict[str, torch.Tensor] = {}
    expert_slots: dict[str, set] = {}  # stacked parameter -> {(placement, expert)} filled so far
    files = weight_files(path)
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)

    for file, names in by_file.items():
        with safe_open(file, framework="pt", device="cpu") as f:
            present = set(f.keys())
            for name in names:
                if any(p.fullmatch(name) for p in SKIP):
                    continue
                if name not in present:
                    raise CheckpointError(f"{file}: tensor {name!r} is listed in the index but missing from this file")
                target, placement, expert = _target_name(name)
                if target not in expected:
                    raise CheckpointError(
                        f"{file}: unexpected tensor {name!r} (no such parameter in a {config.model_type} model with this "
                        f"config.json; check num_hidden_layers, layer types and expert counts)"
                    )
                ref = expected[target]
                want_dtype = torch.float32 if target.endswith(FP32_SUFFIXES) else dtype
                sl = f.get_slice(name)
                shape, file_dtype = list(sl.get_shape()), sl.get_dtype()
                want_shape = list(ref.shape) if placement == "copy" else _expert_shape(ref, placement)
                if shape != want_shape:
                    raise CheckpointError(f"{file}: tensor {name!r} has shape {shape}, expected {want_shape}")
                if file_dtype not in ("F32", "BF16", "F16"):
                    raise CheckpointError(
                        f"{file}: tensor {name!r} has dtype {file_dtype}, expected a float type (F32, BF16 or F16)"
                    )
                if placement != "copy" and expert >= ref.shape[0]:
                    raise CheckpointError(
                        f"{file}: tensor {name!r} names expert {expert}, but config.json has num_experts={ref.shape[0]}"
                    )
                tensor = f.get_tensor(name).to(device=device, dtype=want_dtype)
                if placement == "copy":
                    loaded[target] = tensor
                    continue
                if target not in loaded:
                    loaded[target] = torch.empty(ref.shape, dtype=want_dtype, device=device)
                    expert_slots[target] = set()
                _place_expert(loaded[target], tensor, placement, expert)
                expert_slots[target].add((placement, expert))
                del tensor

    missing = [n for n in expected if n not in loaded]
    for target, slots in expert_slots.items():
        ref = expected[target]
        parts = ("gate", "up") if target.endswith("gate_up_proj") else ("down",)
        want = {(p, e) for p in parts for e in range(ref.shape[0])}
        missing += [f"{target} (expert {e}, {p})" for p, e in sorted(want - slots, key=lambda s: (s[1], s[0]))]
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint: {shown}")
    model.load_state_dict(loaded, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval().requires_grad_(False)
    return model


def _expert_shape(stacked: torch.Tensor, placement: str) -> list[int]:
    if placement == "down":
        return list(stacked.shape[1:])
    return [stacked.shape[1] // 2, stacked.shape[2]]


def _place_expert(stacked: torch.Tensor, tensor: torch.Tensor, placement: str, expert: int) -> None:
    half = stacked.shape[1] // 2
    if placement == "gate":
        stacked[expert, :half] = tensor
    elif placement == "up":
        stacked[expert, half:] = tensor
    else:
        stacked[expert] = tensor
