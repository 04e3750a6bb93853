"""What each part of a Kimi model takes in memory: weights by format, caches, activations, training state.

The tensor inventory (:func:`tensors`) is the model itself: the ``kimi_lm.model`` class built on the meta device
from the config class, its ``state_dict`` turned into checkpoint names by the loader's table (``kimi_lm.names``),
every tensor's kind read from the module that owns it. Nothing is listed by hand, so the estimate follows the model
code (a new AttnRes or router tensor is counted the day it is added).

Bits per quantized weight: FP8 block = 8, plus one fp32 scale per 128×128 tile (partial tiles at the edges count
whole); MXFP4 = 4 + 8/32 = 4.25 (an E8M0 byte per 32); affine b-bit with group g = b + 32/g (bf16 scale and bias per
group). What stays unquantized follows the converters: FP8 as in the DeepSeek-V3 / Kimi K2 checkpoints (linear layers
only; embeddings, lm_head, router and norms stay bf16); MLX formats as ``convert --quantize`` (every Linear and
Embedding whose input width divides the group, one-row AttnRes pseudo-queries excepted; Kimi Linear's router at
affine 8-bit, group 64; K2's router is no Linear and stays bf16). A_log, dt_bias and e_score_correction_bias are fp32
in every format.

The released compressed-tensors checkpoints quantize the routed experts only, everything else in the model dtype:
``int4-experts`` (Kimi K2-Thinking / K2.5 ``pack-quantized``: 4 bits + a bf16 scale per 32 = 4.5 bits, plus an
int32 [2] ``weight_shape`` per expert matrix) and ``mxfp4-experts`` (Kimi K3 ``mxfp4-pack-quantized``: 4 bits + an
E8M0 byte per 32 = 4.25 bits). These are the bytes of the files. INT4 experts read as MLX affine have a bias
(−8·scale) per group: mlx-lm and kimi-lm's plain model (``backend=None``) hold it (``int4_bias_bytes``), kimi-lm's
CPU backend derives it in the kernels instead.

References: shared/specs/kimi_linear.md §2 (tensor names and shapes), §4.3 and §5.9 (MLA latent and KDA caches);
shared/specs/kimi_k2_and_quantization.md §2 (K2 tensors), §4 (FP8 block format), §5 (MXFP4, affine, mlx-lm
quantization predicates and config keys); shared/specs/kimi_k3_and_int4.md §A3-§A4 (K3 MXFP4 experts), §B1-§B2 (INT4).
"""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from kimi_lm import names
from kimi_lm.errors import CheckpointError

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
COMPONENTS = ("embeddings", "kda", "mla", "dense_mlp", "router", "shared_experts", "experts", "latent_moe", "norms",
              "attn_res", "lm_head")
KDA_CHUNK = 64  # chunk length of chunked KDA (fla), sets the number of per-chunk states
FP32_NAMES = ("A_log", "dt_bias", "e_score_correction_bias")  # kept in fp32 by every format and the loader


# ---- weight formats ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Quant:
    """Storage format. Grouped (MLX) formats add ``scale_bytes`` per ``group`` weights along the input axis."""

    name: str
    bits: int  # per stored weight
    group: int = 0
    scale_bytes: int = 0  # per group: E8M0 / E4M3 byte, or scale + bias in the model dtype (affine)
    block: int = 0  # FP8: square tile sharing one fp32 scale
    experts_only: bool = False  # compressed-tensors releases: routed experts packed, the rest in the model dtype
    shape_bytes: int = 0  # per expert matrix: pack-quantized's weight_shape tensor

    @property
    def is_float(self) -> bool:
        return not (self.group or self.block)

    def label(self) -> str:
        return f"{self.name} (group {self.group})" if self.group else self.name


QUANT_NAMES = (["bf16", "fp16", "fp32", "fp8", "mxfp4", "mxfp8", "nvfp4"] + [f"affine{b}" for b in (8, 6, 5, 4, 3, 2)]
               + ["int4-experts", "mxfp4-experts"])
_MX = {"mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}  # bits, fixed group; one scale byte per group
# compressed-tensors formats of the released checkpoints: (bits, group, scale bytes, weight_shape bytes per matrix).
# K2-Thinking's weight_shape is int32 [2] (msmodelslim's report of the release; compressed-tensors itself writes int64)
_EXPERTS_ONLY = {"int4-experts": (4, 32, 2, 8), "mxfp4-experts": (4, 32, 1, 0)}
CT_FORMATS = {"pack-quantized": "int4-experts", "mxfp4-pack-quantized": "mxfp4-experts"}


def make_quant(name: str, group_size: int | None = None, dtype_bytes: int = 2) -> Quant:
    """``dtype_bytes``: the model dtype, in which affine scales and biases are stored."""
    if name in _EXPERTS_ONLY:
        bits, group, scale, shape = _EXPERTS_ONLY[name]
        if group_size not in (None, group):
            raise CheckpointError(f"group size {group_size}: {name} uses groups of {group} only")
        return Quant(name, bits, group, scale, experts_only=True, shape_bytes=shape)
    if name in _MX:
        bits, group = _MX[name]
        if group_size not in (None, group):
            raise CheckpointError(f"group size {group_size}: {name} uses groups of {group} only")
        return Quant(name, bits, group, 1)
    if m := re.fullmatch(r"affine([2-68])", name):  # MLX affine: 2-6 or 8 bits
        group = group_size or 64  # the MLX default
        if group not in (32, 64, 128):
            raise CheckpointError(f"group size {group}: affine quantization takes groups of 32, 64 or 128")
        return Quant(name, int(m[1]), group, 2 * dtype_bytes)
    if name not in QUANT_NAMES:
        raise CheckpointError(f"unknown quantization {name!r}; known: {', '.join(QUANT_NAMES)}")
    if group_size is not None:
        raise CheckpointError(f"group size applies to affine and MX formats, not {name}")
    return Quant(name, 8, block=128) if name == "fp8" else Quant(name, 8 * DTYPE_BYTES[name])


def recorded_quant(raw: dict, dtype_bytes: int, source: str) -> tuple[Quant | None, Quant | None]:
    """(weights, router) formats a config.json records: DeepSeek's FP8 ``quantization_config``, compressed-tensors'
    (top level or in a wrapper's ``text_config``: routed experts only), or mlx-lm's ``quantization`` dict (top-level
    group_size/bits/mode, a missing mode meaning affine, per-module dicts)."""
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}
    q = raw.get("quantization") or raw.get("quantization_config") or text.get("quantization_config")
    if not q:
        return None, None
    if q.get("quant_method") == "compressed-tensors":
        groups = q.get("config_groups") or {}
        fmt = q.get("format") or next((g.get("format") for g in groups.values() if isinstance(g, dict)), None)
        if fmt not in CT_FORMATS:
            raise CheckpointError(f"{source}: compressed-tensors format {fmt!r} is not supported by the estimator "
                                  f"(supported: {', '.join(CT_FORMATS)})")
        return make_quant(CT_FORMATS[fmt]), None
    if q.get("quant_method") == "fp8":
        if list(q.get("weight_block_size", [128, 128])) != [128, 128]:
            raise CheckpointError(f"{source}: FP8 weight_block_size {q['weight_block_size']} is not [128, 128]")
        return make_quant("fp8"), None
    if "bits" not in q:
        raise CheckpointError(f"{source}: quantization {q.get('quant_method')!r} is not supported by the estimator")
    mode = q.get("mode", "affine")
    weights = make_quant(f"affine{q['bits']}" if mode == "affine" else mode, q.get("group_size"), dtype_bytes)
    gates = [v for k, v in q.items() if isinstance(v, dict) and k.endswith(".gate")]  # the only per-module dicts
    router = make_quant(f"affine{gates[0]['bits']}", gates[0].get("group_size"), dtype_bytes) if gates else None
    return weights, router


# ---- tensor inventory ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tensor:
    """``count`` tensors of one shape (a layer's routed experts share an entry); ``active`` of them run per token."""

    name: str
    shape: tuple[int, ...]
    component: str
    kind: str = "linear"  # or embedding | lm_head | router | norm | vector | conv | fp32
    count: int = 1
    active: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape) * self.count

    @property
    def active_numel(self) -> int:
        return self.numel if self.active is None else math.prod(self.shape) * self.active


def _kind(param: str, module: nn.Module) -> str:
    """How a format stores the tensor, from the module that owns it."""
    from kimi_lm.model.moe import TopkRouter

    if param.endswith(FP32_NAMES):
        return "fp32"
    if param == "lm_head.weight":
        return "lm_head"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, TopkRouter):
        return "router"
    if isinstance(module, nn.Linear):  # a one-row Linear is a vector the model reads directly (AttnRes query)
        return "vector" if module.out_features == 1 else "linear"
    if param.endswith(("gate_up_proj", "down_proj")):  # stacked experts
        return "linear"
    return "conv" if param.endswith("conv1d.weight") else "norm"


def _component(param: str, config) -> str:
    layer = re.match(r"model\.layers\.(\d+)\.", param)
    if "_res_" in param:
        return "attn_res"
    if param.startswith("model.embed_tokens."):
        return "embeddings"
    if param.startswith("lm_head."):
        return "lm_head"
    if ".self_attn." in param:
        return "kda" if config.is_kda_layer(int(layer[1])) else "mla"
    for part, component in ((".routed_expert_", "latent_moe"), (".experts.", "experts"), (".shared_experts.", "shared_experts"), (".gate.", "router"),
                            (".mlp.", "dense_mlp")):
        if part in param:
            return component
    return "norms"


@functools.lru_cache(maxsize=16)
def _inventory(config_json: str) -> tuple[Tensor, ...]:
    from kimi_lm.checkpoint import _model_class
    from kimi_lm.config import config_from_dict

    config = config_from_dict(json.loads(config_json), source="config")
    with torch.device("meta"):
        model = _model_class(config)(config)
    owner = {f"{m}.{p}" if m else p: mod for m, mod in model.named_modules() for p, _ in mod.named_parameters(
        recurse=False)}
    owner.update({f"{m}.{b}" if m else b: mod for m, mod in model.named_modules() for b, _ in mod.named_buffers(
        recurse=False)})
    out = []
    E, k = getattr(config, "routed_experts", 0), getattr(config, "experts_per_token", 0)
    for param, t in model.state_dict().items():
        if config.tie_word_embeddings and param == "lm_head.weight":
            continue
        kind, component = _kind(param, owner[param]), _component(param, config)
        for name, placement in names.to_checkpoint(param, names.family(config)):
            if placement in names.PER_EXPERT:  # one entry for a layer's routed experts: name.{0..E-1}.w1.weight
                shape = names.expert_shape(t.shape, placement)
                out.append(Tensor(name.format(E=f"{{0..{E - 1}}}"), tuple(shape), component, kind, E, k))
            else:
                out.append(Tensor(name, tuple(t.shape), component, kind))
    return tuple(out)


def tensors(config) -> list[Tensor]:
    """Every weight tensor of the official checkpoint, by its checkpoint name; linear weights are [out, in]."""
    return list(_inventory(json.dumps(config.to_dict(), sort_keys=True)))


def tensor_bytes(t: Tensor, q: Quant, dtype_bytes: int, router_quant: Quant | None = None) -> int:
    """Bytes of ``t`` stored as ``q``, leaving unquantized what the converters leave unquantized; ``router_quant``:
    the router's own MLX format (Kimi Linear: affine 8-bit g64; None: K2's router is no nn.Linear, stays float)."""
    if t.kind == "fp32":
        return 4 * t.numel
    if q.experts_only:  # the compressed-tensors releases: only the routed experts are packed
        if t.component != "experts":
            return t.numel * dtype_bytes
        return t.numel * q.bits // 8 + t.numel // q.group * q.scale_bytes + t.count * q.shape_bytes
    if q.is_float:
        return t.numel * q.bits // 8
    plain = t.numel * dtype_bytes
    if q.block:  # FP8: one fp32 scale per 128×128 tile of a [out, in] weight, partial edge tiles included
        if t.kind != "linear":
            return plain
        rows, cols = t.shape
        return t.numel + 4 * math.ceil(rows / q.block) * math.ceil(cols / q.block) * t.count
    if t.kind == "router":
        q = router_quant
    elif t.kind not in ("linear", "embedding", "lm_head"):
        q = None  # norms, convs, vectors
    if q is None or t.shape[-1] % q.group:  # mlx-lm only quantizes when the input width divides the group
        return plain
    return t.numel * q.bits // 8 + t.numel // q.group * q.scale_bytes


def int4_bias_bytes(ts: list[Tensor], q: Quant) -> int:
    """What a runtime holding ``int4-experts`` as MLX affine adds at load: a bias (−8·scale, bf16) per group."""
    if q.name != "int4-experts":
        return 0
    return sum(t.numel // q.group * q.scale_bytes for t in ts if t.component == "experts")


# ---- caches, activations, training state ---------------------------------------------------------------------------
def n_kda(cfg) -> int:
    return sum(cfg.is_kda_layer(i) for i in range(cfg.num_hidden_layers))


def kda_state_bytes(cfg, dtype_bytes: int) -> int:
    """Per sequence, all KDA layers: conv tails (the last W−1 inputs of q, k and v, model dtype) + fp32 state."""
    if not n_kda(cfg):
        return 0
    H, K = cfg.kda_num_heads, cfg.kda_head_dim
    conv = 3 * H * K * (cfg.conv_kernel_size - 1) * dtype_bytes
    return n_kda(cfg) * (conv + H * K * K * 4)


def mla_bytes_per_token(cfg, cache_bytes: int, layers: int | None = None) -> int:
    """Per sequence and token: absorbed MLA caches the latent and the shared key part (512 + 64) per layer."""
    layers = cfg.num_hidden_layers - n_kda(cfg) if layers is None else layers
    return layers * cfg.mla_cache_width * cache_bytes


def mha_bytes_per_token(cfg, cache_bytes: int) -> int:
    """Plain multi-head attention in every layer: per-head K (nope + rope) and V, as HF's expanded MLA cache."""
    return cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cache_bytes


def prefill_activation_bytes(cfg, dtype_bytes: int, batch: int, tokens: int) -> int:
    """Estimated activation peak of one forward over ``tokens`` new tokens per sequence.

    The residual stream (input and output of a layer) plus the largest working set of: a KDA layer (q/k/v before and
    after the conv, output gate, output; fp32 forget gate and two chunk intermediates; per-chunk states), an MLA
    layer in absorbed form with a fused attention kernel (no tokens × context score matrix is built), a MoE layer
    (fp32 router scores, the top-k experts' hiddens and outputs, the shared expert), the dense MLP, or the logits of
    every token of the chunk (the forward returns them all).
    """
    s, n, d = dtype_bytes, batch * tokens, cfg.hidden_size
    work = [n * cfg.vocab_size * s, n * 3 * cfg.intermediate_size * s]
    if n_kda(cfg):
        H, K = cfg.kda_num_heads, cfg.kda_head_dim
        work.append(n * H * K * (8 * s + 3 * 4) + n * H * KDA_CHUNK * 4
                    + batch * H * math.ceil(tokens / KDA_CHUNK) * K * K * s)
    if n_kda(cfg) < cfg.num_hidden_layers:
        per_head = cfg.qk_head_dim + cfg.mla_cache_width + cfg.kv_lora_rank + cfg.v_head_dim  # q, absorbed q, outs
        work.append(n * ((cfg.q_lora_rank or 0) + cfg.mla_cache_width + cfg.num_attention_heads * per_head) * s)
    if any(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)):
        I, k = cfg.moe_intermediate_size, cfg.experts_per_token
        work.append(n * (cfg.routed_experts * 4 + (k * (3 * I + d) + 3 * I * cfg.shared_experts) * s))
    return 2 * n * d * s + max(work)


def train_state_bytes(cfg, dtype_bytes: int, optimizer: str) -> dict[str, int]:
    """Full-parameter training: weights and grads in the model dtype, an fp32 master copy when that is narrower,
    AdamW's two fp32 moments, or with Muon one fp32 momentum for matrices (AdamW for embeddings, head, vectors)."""
    ts = tensors(cfg)
    weights = sum(tensor_bytes(t, Quant("float", 8 * dtype_bytes), dtype_bytes) for t in ts)
    master = sum(4 * t.numel for t in ts if t.kind != "fp32") if dtype_bytes < 4 else 0
    muon = optimizer == "muon"
    opt = sum(t.numel * (4 if muon and t.kind in ("linear", "router") else 8) for t in ts)
    return {"weights": weights, "grads": weights, "master_weights": master, "optimizer_states": opt}


def train_activation_bytes(cfg, dtype_bytes: int, batch: int, seq: int) -> int:
    """Estimate, with activation checkpointing per layer: each layer's input kept, one layer recomputed (forward +
    backward working set) and fp32 logits with their gradient for the loss."""
    n = batch * seq
    return (cfg.num_hidden_layers * n * cfg.hidden_size * dtype_bytes
            + 2 * prefill_activation_bytes(cfg, dtype_bytes, batch, seq) + 2 * n * cfg.vocab_size * 4)
