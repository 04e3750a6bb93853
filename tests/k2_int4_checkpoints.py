"""Tiny random Kimi K2-Thinking (native INT4) and K2.5 (``kimi_k25`` wrapper) checkpoints, packed by compressed-tensors.

The routed experts are quantized as K2-Thinking ships them: ``pack-quantized`` symmetric int4, group 32
(``weight_packed`` int32 [out, in/8] via compressed-tensors' own ``pack_to_int32``, ``weight_scale`` bf16 [out, in/32],
``weight_shape`` [out, in]); everything else stays float. ``int4_dequantized`` is the float state the packed model
means (compressed-tensors' ``unpack_from_int32`` times the scales). K2.5 puts the text model under ``language_model.``
with a ``text_config`` and adds vision tensors the loader must skip. Spec ``kimi_k3_and_int4.md`` §B.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from k2_checkpoints import to_official_layout, write_sharded

from kimi_lm.config import INT4_EXPERTS_CONFIG

EXPERT = re.compile(r".*\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
INT4_CONFIG = copy.deepcopy(INT4_EXPERTS_CONFIG)  # spec §B1 (Kimi-K2-Thinking's quantization_config)


def int4_pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W [out, in] -> (weight_packed int32, weight_scale bf16, weight_shape int64): symmetric minmax, group 32."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    out_f, in_f = w.shape
    g = w.float().view(out_f, in_f // 32, 32)
    scale = (g.abs().amax(-1) / 7.5).clamp_min(1e-6).to(torch.bfloat16)
    q = torch.clamp(torch.round(g / scale.float()[..., None]), -8, 7).to(torch.int8).view(out_f, in_f)
    return pack_to_int32(q, 4), scale, torch.tensor([out_f, in_f])


def int4_unpack(packed, scale, shape) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    q = unpack_from_int32(packed, 4, torch.Size(shape.tolist()))
    return q.float() * scale.float().repeat_interleave(32, dim=1)


def int4_tensors(src: Path) -> tuple[dict, dict]:
    """(checkpoint tensors with every routed expert packed, the dequantized fp32 state of the same model)."""
    tensors, dequantized = {}, {}
    for name, t in load_file(src / "model.safetensors").items():
        if EXPERT.fullmatch(name):
            base = name.removesuffix(".weight")
            p, s, shape = int4_pack(t)
            tensors.update({f"{base}.weight_packed": p, f"{base}.weight_scale": s, f"{base}.weight_shape": shape})
            dequantized[name] = int4_unpack(p, s, shape)
        else:
            tensors[name] = dequantized[name] = t.to(torch.bfloat16) if t.dim() == 2 else t
    return tensors, dequantized


def to_int4_layout(src: Path, dst: Path) -> tuple[Path, dict]:
    """transformers-written ``src`` -> a K2-Thinking-style checkpoint (kimi_k2, 2 shards, INT4 experts)."""
    tensors, dequantized = int4_tensors(src)
    return to_official_layout(src, dst, tensors, dict(INT4_CONFIG)), dequantized


def to_k25_layout(int4_dir: Path, dst: Path) -> Path:
    """A K2-Thinking-style checkpoint -> Kimi K2.5's wrapper: ``text_config`` (with the quantization_config inside),
    text tensors under ``language_model.``, plus a vision tower and projector."""
    dst.mkdir(parents=True, exist_ok=True)
    text = json.loads((int4_dir / "config.json").read_text())
    raw = {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25", "text_config": text,
           "vision_config": {"model_type": "moonvit", "hidden_size": 8}, "media_placeholder_token_id": 163605,
           "tie_word_embeddings": False}
    (dst / "config.json").write_text(json.dumps(raw, indent=2))
    index = json.loads((int4_dir / "model.safetensors.index.json").read_text())["weight_map"]
    weight_map = {}
    for shard in sorted(set(index.values())):
        part = {f"language_model.{k}": v for k, v in load_file(int4_dir / shard).items()}
        save_file(part, dst / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    vision = {"vision_tower.patch_embed.proj.weight": torch.randn(8, 3, 2, 2).to(torch.bfloat16),
              "mm_projector.proj.0.weight": torch.randn(16, 8).to(torch.bfloat16)}
    save_file(vision, dst / "vision.safetensors")
    weight_map.update({k: "vision.safetensors" for k in vision})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def write_random_int4_checkpoint(cfg, dst: Path, n_shards: int = 2) -> Path:
    """A K2-Thinking-style checkpoint of random weights for ``cfg`` (no reference model: for memory tests)."""
    from kimi_lm.model.kimi_k2 import KimiK2ForCausalLM

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in KimiK2ForCausalLM(cfg).state_dict().items()}
    torch.manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        base = name.rsplit(".", 1)[0]
        per_expert = {"gate_up_proj": (("gate_proj", "up_proj"), (shape[1] // 2, *shape[2:])),
                      "down_proj": (("down_proj",), shape[1:])}.get(name.rsplit(".", 1)[1]) if ".experts." in name else None
        if per_expert:
            for e in range(shape[0]):
                for proj in per_expert[0]:
                    p, s, sh = int4_pack(torch.randn(per_expert[1]) * 0.02)
                    tensors.update({f"{base}.{e}.{proj}.weight_packed": p, f"{base}.{e}.{proj}.weight_scale": s,
                                    f"{base}.{e}.{proj}.weight_shape": sh})
        else:  # bf16 as in the release (the router bias fp32)
            tensors[name] = torch.randn(shape).to(torch.float32 if "bias" in name else torch.bfloat16)
    return write_sharded(dst, {**cfg.to_dict(), "quantization_config": INT4_CONFIG}, tensors, n_shards)
