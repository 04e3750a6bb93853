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


# ---- the release's MXFP4 experts (compressed-tensors ``mxfp4-pack-quantized``, spec §A4) ---------------------------
MXFP4_CONFIG = {  # spec §A4.1 (the release's text_config.quantization_config)
    "quant_method": "compressed-tensors", "format": "mxfp4-pack-quantized", "quantization_status": "compressed",
    "kv_cache_scheme": None, "global_compression_ratio": None,
    "config_groups": {"group_0": {
        "format": "mxfp4-pack-quantized", "targets": ["Linear"], "input_activations": None,
        "output_activations": None,
        "weights": {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32, "symmetric": True,
                    "dynamic": False, "scale_dtype": "torch.uint8", "zp_dtype": None, "observer": "minmax",
                    "actorder": None, "block_structure": None}}},
    "ignore": ["re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*",
               "re:.*lm_head.*", "re:.*vision_tower.*", "re:.*mm_projector.*"],
}
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
PACKED_EXPERT = re.compile(r".*\.block_sparse_moe\.experts\.\d+\.w[123]\.weight$")


def mxfp4_pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] -> (weight_packed uint8 [out, in/2], weight_scale uint8 E8M0 [out, in/32]) with compressed-tensors'
    own packer and scale codec: scale 2^(floor(log2 amax) − 2) per group of 32, codes rounded to the nearest E2M1."""
    from compressed_tensors.compressors.mx_utils import compress_mx_scale
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8

    out_f, in_f = w.shape
    g = w.float().view(out_f, in_f // 32, 32)
    scale = torch.exp2(torch.floor(torch.log2(g.abs().amax(-1).clamp_min(1e-30))) - 2)
    x = (g / scale[..., None]).clamp(-6, 6)
    codes = E2M1[(x.abs()[..., None] - E2M1).abs().argmin(-1)] * torch.where(x < 0, -1.0, 1.0)
    return pack_fp4_to_uint8(codes.view(out_f, in_f)), compress_mx_scale(scale, torch.uint8)


def mxfp4_unpack(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' own decode of one packed weight (fp32)."""
    from compressed_tensors.compressors.mx_utils import decompress_mx_scale
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8

    out_f, in_f = packed.shape[0], packed.shape[1] * 2
    w = unpack_fp4_from_uint8(packed, out_f, in_f, torch.float32)
    return w * decompress_mx_scale(scale).float().repeat_interleave(32, dim=1)


def mxfp4_config(**changes) -> KimiK3Config:
    """``tiny-k3`` with expert widths that are multiples of the group size 32 (the MXFP4 experts' input widths)."""
    return tiny_config(moe_intermediate_size=32, routed_expert_hidden_size=64, **changes)


def write_mxfp4_checkpoint(model, dst: Path, dtype: torch.dtype = torch.bfloat16, n_shards: int = 2,
                           nested: bool = True, edit=None) -> tuple[Path, dict]:
    """The release layout with every routed expert ``w1/w2/w3`` in ``mxfp4-pack-quantized`` (``weight_packed`` U8,
    ``weight_scale`` U8, no ``weight_shape``) and ``quantization_config`` in ``text_config`` (``nested``) or at the top
    level. Returns (directory, the fp32 state dict the files mean: kimi-lm parameter names, experts dequantized by
    compressed-tensors). ``edit(tensors)`` changes the tensors before writing (malformed-checkpoint tests)."""
    tensors = official_tensors(model, dtype)
    for name in [n for n in tensors if PACKED_EXPERT.fullmatch(n)]:
        base = name.removesuffix(".weight")
        tensors[f"{base}.weight_packed"], tensors[f"{base}.weight_scale"] = mxfp4_pack(tensors.pop(name))
    meant = {}
    for name, t in model.state_dict().items():
        meant[name] = t.to(torch.float32 if F32_NAMES.fullmatch(name) else dtype).float()
    for name in [n for n in tensors if n.endswith(".weight_packed")]:
        base = name.removeprefix("language_model.").removesuffix(".weight_packed")
        stem, e, proj = base.rsplit(".", 2)
        w = mxfp4_unpack(tensors[name], tensors[name.replace("_packed", "_scale")])
        stacked = meant[f"{stem.removesuffix('.' + e)}.{'down_proj' if proj == 'w2' else 'gate_up_proj'}"]
        half = stacked.shape[1] // 2
        {"w1": stacked[int(e), :half], "w3": stacked[int(e), half:], "w2": stacked[int(e)]}[proj].copy_(w)
    tensors["vision_tower.patch_embed.proj.weight"] = torch.randn(8, 3, 14, 14).to(dtype)
    tensors["mm_projector.proj.0.weight"] = torch.randn(16, 32).to(dtype)
    if edit is not None:
        edit(tensors)
    raw = model.config.to_dict()
    (raw["text_config"] if nested else raw)["quantization_config"] = json.loads(json.dumps(MXFP4_CONFIG))
    if not nested:
        raw["text_config"].pop("quantization_config", None)
    return write_checkpoint(model, dst, dtype, n_shards, tensors=tensors, config=raw), meant
