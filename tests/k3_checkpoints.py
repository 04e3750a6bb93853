"""Tiny random Kimi K3 checkpoints in the release layout, for tests.

The release (spec §A1, §A3): a ``kimi_k3`` wrapper config.json (``text_config`` + ``vision_config``), shards with an
index, every text tensor under ``language_model.`` with the official names (per-expert ``w1``/``w3``/``w2``, ``A_log``
F32 zero-padded to the KDA head dim, convs / ``dt_bias`` / ``o_norm`` / router bias F32, the rest in the model dtype)
and vision tensors (``vision_tower.*``, ``mm_projector.*``) beside them. The names are written here from the spec's
table, not from kimi-lm's name table, so loading them tests that table. ``mlx_model`` loads the same directory with
mlx-lm's ``kimi_k3`` (the parity oracle).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoints import randomize_
from kimi_lm.config import preset
from kimi_lm.config_k3 import KimiK3Config

F32_NAMES = re.compile(r".*(conv1d\.weight|A_log|dt_bias|o_norm\.weight|e_score_correction_bias)$")
VISION_CONFIG = {"model_type": "moonvit3d", "depth": 1, "hidden_size": 8, "num_heads": 1, "patch_size": 14}


def tiny_config(**changes) -> KimiK3Config:
    """``tiny-k3`` with some keys changed (``linear_attn_config`` entries merged into the preset's)."""
    cfg = preset("tiny-k3")
    lac = {**cfg.linear_attn_config, **changes.pop("linear_attn_config", {})}
    raw = cfg.to_dict()
    raw["text_config"].update(changes, linear_attn_config=lac)
    return KimiK3Config.from_dict(raw)


def random_model(cfg: KimiK3Config, seed: int = 0):
    """kimi-lm's K3 model (fp32, eval) with random weights in realistic ranges (``checkpoints.randomize_``, AttnRes
    queries scaled down); A_log's padding is zero."""
    from kimi_lm.model.kimi_k3 import KimiK3ForCausalLM

    torch.manual_seed(seed)
    model = randomize_(KimiK3ForCausalLM(cfg).eval())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p[cfg.kda_num_heads:] = 0
            elif name.endswith("res_proj.weight"):  # unit-norm pseudo-queries make depth softmaxes one-hot and the
                p.mul_(0.2)  # model chaotic (bf16 rounding alone would flip them); trained ones start at zero
    return model.requires_grad_(False)


def official_tensors(model, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The model's weights under the release's names: ``language_model.`` + per-expert w1 (gate), w3 (up), w2
    (down); F32 where the release stores F32, ``dtype`` elsewhere."""
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            stem, half = name.removesuffix("gate_up_proj"), t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{stem}{e}.w1.weight"], out[f"{stem}{e}.w3.weight"] = t[e, :half], t[e, half:]
        elif name.endswith("experts.down_proj"):
            stem = name.removesuffix("down_proj")
            out.update({f"{stem}{e}.w2.weight": t[e] for e in range(t.shape[0])})
        else:
            out[name] = t
    return {f"language_model.{k}": v.to(torch.float32 if F32_NAMES.fullmatch(k) else dtype).contiguous().clone()
            for k, v in out.items()}


def write_checkpoint(model, dst: Path, dtype: torch.dtype = torch.float32, n_shards: int = 2,
                     tensors: dict | None = None, config: dict | None = None) -> Path:
    """The release layout of ``model`` in ``dst``: wrapper config.json, ``n_shards`` shards + index, vision tensors.
    ``tensors`` / ``config`` replace what would be written (for malformed-checkpoint tests)."""
    dst.mkdir(parents=True, exist_ok=True)
    raw = model.config.to_dict() if config is None else config
    raw.setdefault("vision_config", VISION_CONFIG)
    raw.update(architectures=["KimiK3ForConditionalGeneration"], media_placeholder_token_id=163605,
               dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
    (dst / "config.json").write_text(json.dumps(raw, indent=2))
    if tensors is None:
        tensors = official_tensors(model, dtype)
        tensors["vision_tower.patch_embed.proj.weight"] = torch.randn(8, 3, 14, 14).to(dtype)
        tensors["mm_projector.proj.0.weight"] = torch.randn(16, 32).to(dtype)
    names = sorted(tensors)
    weight_map = {}
    for s in range(n_shards):  # the release puts embed, head, norms and vision in the last shards; any split works
        shard = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[s::n_shards]}
        save_file(part, dst / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def mlx_logits(path: Path, ids: torch.Tensor, steps: int = 0):
    """mlx-lm 0.32.2's ``kimi_k3`` on ``path`` (CPU, fp32): logits of ``ids`` [1, T] in one pass, then ``steps``
    greedy continuation tokens decoded one at a time with its cache -> (prefill logits [T, V], step logits [steps, V],
    the continuation tokens)."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(path))
    prefill = model(mx.array(ids.numpy()))
    cache = model.make_cache()
    out = model(mx.array(ids.numpy()), cache=cache)
    tokens, steps_out = [], []
    for _ in range(steps):
        tokens.append(int(mx.argmax(out[0, -1]).item()))
        out = model(mx.array([[tokens[-1]]]), cache=cache)
        steps_out.append(np.array(out[0, -1].astype(mx.float32)))
    return (torch.from_numpy(np.array(prefill[0].astype(mx.float32))),
            torch.from_numpy(np.array(steps_out)) if steps else None, tokens)
