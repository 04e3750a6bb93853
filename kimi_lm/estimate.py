"""Memory estimator: will this model, at this quantization and context, fit on my hardware?

``kimi-lm estimate kimi-linear-48b-a3b --quant mxfp4 --context 4k,128k,1M`` prints parameters (total, active per
token), weight bytes by component, the constant KDA state, the MLA latent cache per token, the total at each context
and, for a list of devices, whether it fits and the longest context that does. ``--json`` prints the same as one JSON
object, ``--plot`` draws memory against context; :func:`estimate` returns it all as an :class:`Estimate`.

Every number is derived from the config through one tensor inventory (:func:`tensors`: each checkpoint tensor with
its shape), never from a fitted constant. Exact: parameter counts, weight bytes of each format including scales and
biases, KDA state and MLA cache bytes (what the cache objects report as ``nbytes``). Estimates, with their
assumptions stated where they are computed: the prefill activation peak, training activations, and how much of a
device is usable (:data:`DEVICES`).

Bits per quantized weight: FP8 block = 8, plus one fp32 scale per 128×128 tile (partial tiles at the edges count
whole); MXFP4 = 4 + 8/32 = 4.25 (an E8M0 byte per 32); affine b-bit with group g = b + 32/g (bf16 scale and bias per
group). What stays unquantized follows the converters: FP8 as in the DeepSeek-V3 / Kimi K2 checkpoints (linear layers
only; embeddings, lm_head, router and norms stay bf16); MLX formats as mlx-lm (every Linear and Embedding whose input
width divides the group; Kimi Linear's router at affine 8-bit, group 64; K2's router is no Linear and stays bf16).
A_log, dt_bias and e_score_correction_bias are fp32 in every format.

References: shared/specs/kimi_linear.md §1–§2 (config, tensor names and shapes, 49,122,681,728 parameters), §4.3
and §5.9 (MLA latent and KDA caches); shared/specs/kimi_k2_and_quantization.md §1–§2 (K2 config, tensors), §4 (FP8
block format), §5 (MXFP4, affine, mlx-lm quantization predicates and config keys), §6 (safetensors header).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from kimi_lm.config import PRESETS, KimiLinearConfig, preset, read_config_json
from kimi_lm.errors import CheckpointError

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
COMPONENTS = ("embeddings", "kda", "mla", "dense_mlp", "router", "shared_experts", "experts", "norms", "attn_res",
              "lm_head")
PREFILL_CHUNK = 2048  # prompt tokens per forward during prefill (mlx-lm's default --prefill-step-size)
KDA_CHUNK = 64  # chunk length of chunked KDA (fla), sets the number of per-chunk states

# No K2 config class exists yet: the keys read here, as in shared/reference/kimi-k2-instruct.config.json.
KIMI_K2_CONFIG = {
    "model_type": "kimi_k2", "vocab_size": 163840, "hidden_size": 7168, "intermediate_size": 18432,
    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "num_attention_heads": 64, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 384, "num_experts_per_tok": 8,
    "n_shared_experts": 1, "topk_method": "noaux_tc", "max_position_embeddings": 131072,
    "num_nextn_predict_layers": 0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
}
ALL_PRESETS = [*PRESETS, "kimi-k2"]


# ---- weight formats ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Quant:
    """Storage format. Grouped (MLX) formats add ``scale_bytes`` per ``group`` weights along the input axis."""

    name: str
    bits: int  # per stored weight
    group: int = 0
    scale_bytes: int = 0  # per group: E8M0 / E4M3 byte, or scale + bias in the model dtype (affine)
    block: int = 0  # FP8: square tile sharing one fp32 scale

    @property
    def is_float(self) -> bool:
        return not (self.group or self.block)

    def label(self) -> str:
        return f"{self.name} (group {self.group})" if self.group else self.name


QUANT_NAMES = ["bf16", "fp16", "fp32", "fp8", "mxfp4", "mxfp8", "nvfp4"] + [f"affine{b}" for b in (8, 6, 5, 4, 3, 2)]
_MX = {"mxfp4": (4, 32), "mxfp8": (8, 32), "nvfp4": (4, 16)}  # bits, fixed group; one scale byte per group


def make_quant(name: str, group_size: int | None = None, dtype_bytes: int = 2) -> Quant:
    """``dtype_bytes``: the model dtype, in which affine scales and biases are stored."""
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


def _recorded_quant(raw: dict, dtype_bytes: int, source: str) -> tuple[Quant | None, Quant | None]:
    """(weights, router) formats a config.json records: DeepSeek's FP8 ``quantization_config`` or mlx-lm's
    ``quantization`` dict (top-level group_size/bits/mode, a missing mode meaning affine, per-module dicts)."""
    q = raw.get("quantization") or raw.get("quantization_config")
    if not q:
        return None, None
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


# ---- architecture: the sizes the counts need, from either family's config ----------------------------------------
@dataclass(frozen=True)
class Arch:
    name: str
    family: str  # kimi_linear | kimi_k2 (DeepSeek-V3 layout)
    vocab_size: int
    hidden_size: int
    num_layers: int
    intermediate_size: int  # dense MLP
    tie_embeddings: bool
    dtype: str  # bf16 | fp16 | fp32: activations and every weight not quantized or kept in fp32
    max_context: int
    heads: int  # MLA
    q_lora_rank: int  # 0: a plain q_proj
    kv_lora_rank: int
    qk_nope: int
    qk_rope: int
    v_head_dim: int
    experts: int
    experts_per_token: int
    shared_experts: int
    moe_intermediate_size: int
    router_bias: bool  # e_score_correction_bias (noaux_tc routing)
    moe_layers: tuple[bool, ...]
    kda_layers: tuple[bool, ...]  # False: MLA
    kda_heads: int = 0
    kda_head_dim: int = 0
    conv_kernel: int = 0
    attn_res: bool = False  # Block Attention Residuals: a pseudo-query + key norm before every sublayer and the head
    recorded_quant: Quant | None = None  # the format config.json says the weights are stored in
    router_quant: Quant | None = None  # under MLX formats (None: the router stays in the model dtype)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def n_kda(self) -> int:
        return sum(self.kda_layers)

    @property
    def n_mla(self) -> int:
        return self.num_layers - self.n_kda


def _short_dtype(name: str | None) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", None: "bf16"}.get(name, name)


def arch_from_kimi_linear(cfg: KimiLinearConfig, raw: dict | None = None, name: str = "kimi-linear") -> Arch:
    dtype = _short_dtype(cfg.dtype)
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(f"{name}: unsupported dtype {cfg.dtype!r}")
    recorded, router = _recorded_quant(raw or {}, DTYPE_BYTES[dtype], name)
    layers = range(cfg.num_hidden_layers)
    return Arch(
        name=name, family="kimi_linear", vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        num_layers=cfg.num_hidden_layers, intermediate_size=cfg.intermediate_size,
        tie_embeddings=cfg.tie_word_embeddings, dtype=dtype, max_context=cfg.model_max_length,
        heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank or 0, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope=cfg.qk_nope_head_dim, qk_rope=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        experts=cfg.num_experts, experts_per_token=cfg.num_experts_per_token, shared_experts=cfg.num_shared_experts,
        moe_intermediate_size=cfg.moe_intermediate_size, router_bias=True,
        moe_layers=tuple(cfg.is_moe_layer(i) for i in layers), kda_layers=tuple(cfg.is_kda_layer(i) for i in layers),
        kda_heads=cfg.kda_num_heads, kda_head_dim=cfg.kda_head_dim, conv_kernel=cfg.conv_kernel_size,
        attn_res=bool(cfg.attn_res_block_size), recorded_quant=recorded,
        # mlx-lm's Kimi Linear quant_predicate: router gate at affine 8-bit, group 64
        router_quant=router or make_quant("affine8", 64, DTYPE_BYTES[dtype]),
    )


def arch_from_deepseek(raw: dict, name: str = "kimi-k2") -> Arch:
    """Kimi K2 / DeepSeek-V3 keys. Multi-token-prediction layers (``num_nextn_predict_layers``) are not loaded, so
    not counted."""
    def need(key):
        if raw.get(key) is None:
            raise CheckpointError(f"{name}: config key {key!r} is missing")
        return raw[key]

    n, first, freq = need("num_hidden_layers"), need("first_k_dense_replace"), raw.get("moe_layer_freq", 1)
    dtype = _short_dtype(raw.get("torch_dtype") or raw.get("dtype"))
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(f"{name}: unsupported torch_dtype {dtype!r}")
    return Arch(
        name=name, family="kimi_k2", vocab_size=need("vocab_size"), hidden_size=need("hidden_size"), num_layers=n,
        intermediate_size=need("intermediate_size"), tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
        dtype=dtype, max_context=need("max_position_embeddings"), heads=need("num_attention_heads"),
        q_lora_rank=raw.get("q_lora_rank") or 0, kv_lora_rank=need("kv_lora_rank"),
        qk_nope=need("qk_nope_head_dim"), qk_rope=need("qk_rope_head_dim"), v_head_dim=need("v_head_dim"),
        experts=need("n_routed_experts"), experts_per_token=need("num_experts_per_tok"),
        shared_experts=raw.get("n_shared_experts") or 0, moe_intermediate_size=need("moe_intermediate_size"),
        router_bias=raw.get("topk_method", "noaux_tc") == "noaux_tc",
        moe_layers=tuple(i >= first and i % freq == 0 for i in range(n)), kda_layers=(False,) * n,
        recorded_quant=_recorded_quant(raw, DTYPE_BYTES[dtype], name)[0],
    )


def arch_from_dict(raw: dict, name: str) -> Arch:
    model_type = raw.get("model_type")
    if model_type == "kimi_linear":
        return arch_from_kimi_linear(KimiLinearConfig.from_dict(raw, source=name), raw, name)
    if model_type in ("kimi_k2", "deepseek_v3"):
        return arch_from_deepseek(raw, name)
    raise CheckpointError(f"{name}: model_type {model_type!r} is not supported (kimi_linear, kimi_k2, deepseek_v3)")


def shard_bytes(directory: Path) -> int | None:
    """Tensor bytes in a checkpoint's safetensors shards, from their headers alone (u64 length + JSON)."""
    shards, total = sorted(directory.glob("*.safetensors")), 0
    for shard in shards:
        try:
            with open(shard, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n)) if 0 < n <= 100_000_000 else None
            total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError, IndexError):
            raise CheckpointError(f"{shard}: not a readable safetensors file") from None
    return total if shards else None


def load_arch(config) -> tuple[Arch, int | None]:
    """(Arch, shard bytes or None) from a preset name, config.json, checkpoint directory, dict or KimiLinearConfig."""
    if isinstance(config, KimiLinearConfig):
        return arch_from_kimi_linear(config, None, "config"), None
    if isinstance(config, dict):
        return arch_from_dict(config, "config"), None
    name, path = str(config), Path(config)
    if name == "kimi-k2":
        return arch_from_deepseek(KIMI_K2_CONFIG, name), None
    if name in PRESETS:
        return arch_from_kimi_linear(preset(name), None, name), None
    if path.is_dir():
        return arch_from_dict(read_config_json(path / "config.json"), path.resolve().name), shard_bytes(path)
    if path.is_file():
        return arch_from_dict(read_config_json(path), path.name.removesuffix(".json").removesuffix(".config")), None
    if name.endswith(".json") or "/" in name or os.sep in name:
        raise CheckpointError(f"{name}: no such config file or checkpoint directory")
    raise CheckpointError(f"unknown preset {name!r}; known presets: {', '.join(ALL_PRESETS)}")


# ---- tensor inventory ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tensor:
    """``count`` tensors of one shape (a layer's routed experts share an entry); ``active`` of them run per token."""

    name: str
    shape: tuple[int, ...]
    component: str
    kind: str = "linear"  # or embedding | lm_head | router | norm | conv | fp32
    count: int = 1
    active: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape) * self.count

    @property
    def active_numel(self) -> int:
        return self.numel if self.active is None else math.prod(self.shape) * self.active


def tensors(a: Arch) -> list[Tensor]:
    """Every weight tensor of the checkpoint, by its checkpoint name; linear weights are [out, in]."""
    d, out = a.hidden_size, []
    moe, (w_gate, w_up, w_down) = (("block_sparse_moe", ("w1", "w3", "w2")) if a.family == "kimi_linear"
                                   else ("mlp", ("gate_proj", "up_proj", "down_proj")))

    def add(name, shape, component, kind="linear", count=1, active=None):
        out.append(Tensor(name, tuple(shape), component, kind, count, active))

    add("model.embed_tokens.weight", (a.vocab_size, d), "embeddings", "embedding")
    for i in range(a.num_layers):
        p = f"model.layers.{i}."
        add(p + "input_layernorm.weight", (d,), "norms", "norm")
        add(p + "post_attention_layernorm.weight", (d,), "norms", "norm")
        for sub in ("self_attention", "mlp") if a.attn_res else ():  # attention_residuals.md (Kimi K3 names)
            add(p + f"{sub}_res_proj.weight", (1, d), "attn_res", "norm")
            add(p + f"{sub}_res_norm.weight", (d,), "attn_res", "norm")
        if a.kda_layers[i]:  # kimi_linear.md §2.3
            H, K, D = a.kda_heads, a.kda_head_dim, a.kda_heads * a.kda_head_dim
            for x in "qkv":
                add(p + f"self_attn.{x}_proj.weight", (D, d), "kda")
                add(p + f"self_attn.{x}_conv1d.weight", (D, 1, a.conv_kernel), "kda", "conv")
            for gate in "fg":  # forget and output gates: low rank = head_dim
                add(p + f"self_attn.{gate}_a_proj.weight", (K, d), "kda")
                add(p + f"self_attn.{gate}_b_proj.weight", (D, K), "kda")
            add(p + "self_attn.A_log", (1, 1, H, 1), "kda", "fp32")
            add(p + "self_attn.dt_bias", (D,), "kda", "fp32")
            add(p + "self_attn.b_proj.weight", (H, d), "kda")
            add(p + "self_attn.o_norm.weight", (K,), "kda", "norm")
            add(p + "self_attn.o_proj.weight", (d, D), "kda")
        else:  # kimi_linear.md §2.4, kimi_k2_and_quantization.md §2.6
            if a.q_lora_rank:
                add(p + "self_attn.q_a_proj.weight", (a.q_lora_rank, d), "mla")
                add(p + "self_attn.q_a_layernorm.weight", (a.q_lora_rank,), "mla", "norm")
                add(p + "self_attn.q_b_proj.weight", (a.heads * (a.qk_nope + a.qk_rope), a.q_lora_rank), "mla")
            else:
                add(p + "self_attn.q_proj.weight", (a.heads * (a.qk_nope + a.qk_rope), d), "mla")
            add(p + "self_attn.kv_a_proj_with_mqa.weight", (a.kv_lora_rank + a.qk_rope, d), "mla")
            add(p + "self_attn.kv_a_layernorm.weight", (a.kv_lora_rank,), "mla", "norm")
            add(p + "self_attn.kv_b_proj.weight", (a.heads * (a.qk_nope + a.v_head_dim), a.kv_lora_rank), "mla")
            add(p + "self_attn.o_proj.weight", (d, a.heads * a.v_head_dim), "mla")
        if not a.moe_layers[i]:
            for w, shape in (("gate", (a.intermediate_size, d)), ("up", (a.intermediate_size, d)),
                             ("down", (d, a.intermediate_size))):
                add(p + f"mlp.{w}_proj.weight", shape, "dense_mlp")
            continue
        E, I, Is = a.experts, a.moe_intermediate_size, a.moe_intermediate_size * a.shared_experts
        add(p + f"{moe}.gate.weight", (E, d), "router", "router")
        if a.router_bias:
            add(p + f"{moe}.gate.e_score_correction_bias", (E,), "router", "fp32")
        for w, shape in ((w_gate, (I, d)), (w_up, (I, d)), (w_down, (d, I))):
            add(p + f"{moe}.experts.{{0..{E - 1}}}.{w}.weight", shape, "experts", count=E, active=a.experts_per_token)
        for w, shape in (("gate", (Is, d)), ("up", (Is, d)), ("down", (d, Is))) if Is else ():
            add(p + f"{moe}.shared_experts.{w}_proj.weight", shape, "shared_experts")
    add("model.norm.weight", (d,), "norms", "norm")
    if a.attn_res:
        add("model.output_attn_res_proj.weight", (1, d), "attn_res", "norm")
        add("model.output_attn_res_norm.weight", (d,), "attn_res", "norm")
    if not a.tie_embeddings:
        add("lm_head.weight", (a.vocab_size, d), "lm_head", "lm_head")
    return out


def tensor_bytes(t: Tensor, q: Quant, a: Arch) -> int:
    """Bytes of ``t`` stored as ``q``, leaving unquantized what the converters leave unquantized."""
    if t.kind == "fp32":
        return 4 * t.numel
    if q.is_float:
        return t.numel * q.bits // 8
    plain = t.numel * a.dtype_bytes
    if q.block:  # FP8: one fp32 scale per 128×128 tile of a [out, in] weight, partial edge tiles included
        if t.kind != "linear":
            return plain
        rows, cols = t.shape
        return t.numel + 4 * math.ceil(rows / q.block) * math.ceil(cols / q.block) * t.count
    if t.kind == "router":
        q = a.router_quant  # Kimi Linear: affine 8-bit (mlx-lm's predicate); K2: None, its gate is no nn.Linear
    elif t.kind not in ("linear", "embedding", "lm_head"):
        q = None  # norms and convs
    if q is None or t.shape[-1] % q.group:  # mlx-lm only quantizes when the input width divides the group
        return plain
    return t.numel * q.bits // 8 + t.numel // q.group * q.scale_bytes


# ---- caches, activations, training state ---------------------------------------------------------------------------
def kda_state_bytes(a: Arch) -> int:
    """Per sequence, all KDA layers: conv tails (the last W−1 inputs of q, k and v, model dtype) + fp32 state."""
    conv = 3 * a.kda_heads * a.kda_head_dim * (a.conv_kernel - 1) * a.dtype_bytes
    return a.n_kda * (conv + a.kda_heads * a.kda_head_dim * a.kda_head_dim * 4)


def mla_bytes_per_token(a: Arch, cache_bytes: int, layers: int | None = None) -> int:
    """Per sequence and token: absorbed MLA caches the latent and the shared key part (512 + 64) per layer."""
    return (a.n_mla if layers is None else layers) * (a.kv_lora_rank + a.qk_rope) * cache_bytes


def mha_bytes_per_token(a: Arch, cache_bytes: int) -> int:
    """Plain multi-head attention in every layer: per-head K (nope + rope) and V, as HF's expanded MLA cache."""
    return a.num_layers * a.heads * (a.qk_nope + a.qk_rope + a.v_head_dim) * cache_bytes


def prefill_activation_bytes(a: Arch, batch: int, tokens: int) -> int:
    """Estimated activation peak of one forward over ``tokens`` new tokens per sequence.

    The residual stream (input and output of a layer) plus the largest working set of: a KDA layer (q/k/v before and
    after the conv, output gate, output; fp32 forget gate and two chunk intermediates; per-chunk states), an MLA
    layer in absorbed form with a fused attention kernel (no tokens × context score matrix is built), a MoE layer
    (fp32 router scores, the top-k experts' hiddens and outputs, the shared expert), the dense MLP, or the logits of
    every token of the chunk (the forward returns them all).
    """
    s, n, d = a.dtype_bytes, batch * tokens, a.hidden_size
    work = [n * a.vocab_size * s, n * 3 * a.intermediate_size * s]
    if a.n_kda:
        H, K = a.kda_heads, a.kda_head_dim
        work.append(n * H * K * (8 * s + 3 * 4) + n * H * KDA_CHUNK * 4
                    + batch * H * math.ceil(tokens / KDA_CHUNK) * K * K * s)
    if a.n_mla:
        latent = a.kv_lora_rank + a.qk_rope
        per_head = a.qk_nope + a.qk_rope + latent + a.kv_lora_rank + a.v_head_dim  # q, absorbed q, out, W_UV out
        work.append(n * (a.q_lora_rank + latent + a.heads * per_head) * s)
    if any(a.moe_layers):
        I, k = a.moe_intermediate_size, a.experts_per_token
        work.append(n * (a.experts * 4 + (k * (3 * I + d) + 3 * I * a.shared_experts) * s))
    return 2 * n * d * s + max(work)


def train_state_bytes(a: Arch, optimizer: str) -> dict[str, int]:
    """Full-parameter training: weights and grads in the model dtype, an fp32 master copy when that is narrower,
    AdamW's two fp32 moments, or with Muon one fp32 momentum for matrices (AdamW for embeddings, head, vectors)."""
    ts, plain = tensors(a), make_quant(a.dtype)
    weights = sum(tensor_bytes(t, plain, a) for t in ts)
    master = sum(4 * t.numel for t in ts if t.kind != "fp32") if a.dtype_bytes < 4 else 0
    muon = optimizer == "muon"
    opt = sum(t.numel * (4 if muon and t.kind in ("linear", "router") else 8) for t in ts)
    return {"weights": weights, "grads": weights, "master_weights": master, "optimizer_states": opt}


def train_activation_bytes(a: Arch, batch: int, seq: int) -> int:
    """Estimate, with activation checkpointing per layer: each layer's input kept, one layer recomputed (forward +
    backward working set) and fp32 logits with their gradient for the loss."""
    n = batch * seq
    return (a.num_layers * n * a.hidden_size * a.dtype_bytes + 2 * prefill_activation_bytes(a, batch, seq)
            + 2 * n * a.vocab_size * 4)


# ---- devices -------------------------------------------------------------------------------------------------------
# name -> (memory in GiB, roughly as the driver or OS reports it; usable fraction; label). About 10 % of a GPU goes to
# the CUDA context, allocator and fragmentation; macOS lets the GPU wire ~75 % of unified memory by default (raise
# it with `sudo sysctl iogpu.wired_limit_mb`); the OS keeps ~10 % of RAM. A node of 8 GPUs is one pool (weights
# and cache sharded across them).
DEVICES = {
    "rtx-24gb": (24, 0.90, "24 GB GPU (RTX 3090/4090)"),
    "a100-40gb": (40, 0.90, "A100 40GB"),
    "a100-80gb": (80, 0.90, "A100 80GB"),
    "h100-80gb": (80, 0.90, "H100 80GB"),
    "h200-141gb": (140, 0.90, "H200 141GB"),
    "b200-192gb": (180, 0.90, "B200 192GB"),
    "mac-64gb": (64, 0.75, "Apple 64 GB unified"),
    "mac-128gb": (128, 0.75, "Apple 128 GB unified"),
    "mac-192gb": (192, 0.75, "Apple 192 GB unified"),
    "mac-512gb": (512, 0.75, "Apple 512 GB unified"),
    "ram-64gb": (64, 0.90, "64 GB RAM (CPU)"),
    "ram-128gb": (128, 0.90, "128 GB RAM (CPU)"),
    "ram-256gb": (256, 0.90, "256 GB RAM (CPU)"),
    "ram-512gb": (512, 0.90, "512 GB RAM (CPU)"),
    "ram-1tb": (1024, 0.90, "1 TB RAM (CPU)"),
    "8xh100": (8 * 80, 0.90, "8× H100 80GB node"),
    "8xh200": (8 * 140, 0.90, "8× H200 141GB node"),
    "8xb200": (8 * 180, 0.90, "8× B200 192GB node"),
}


def parse_device(spec: str) -> tuple[str, int, int, str]:
    """``h100-80gb``, ``2xa100-80gb``, ``48G``, ``1.5TiB``, ``4x48GB`` -> (name, capacity, usable bytes, label)."""
    key = spec.strip().lower()
    m = re.fullmatch(r"(?:(\d+)x)?(.+)", key)
    mult, base = (1, key) if key in DEVICES else (int(m.group(1) or 1), m.group(2))
    if base in DEVICES:
        gib, frac, label = DEVICES[base]
    elif size := re.fullmatch(r"(\d+(?:\.\d+)?)\s*(g|gb|gib|t|tb|tib)", base):
        gib, frac = float(size.group(1)) * (1024 if size.group(2)[0] == "t" else 1), 0.90
        label = f"{size.group(1)} {size.group(2)[0].upper()}iB"
    else:
        raise CheckpointError(f"unknown device {spec!r}; use a size like 48G or one of: {', '.join(DEVICES)}")
    capacity = int(mult * gib * GIB)
    if capacity <= 0:
        raise CheckpointError(f"device {spec!r}: size must be > 0")
    return key, capacity, int(capacity * frac), f"{mult}× {label}" if mult > 1 else label


# ---- the estimate --------------------------------------------------------------------------------------------------
@dataclass
class Estimate:
    """``kda_state_bytes`` and ``mla_cache_bytes_per_token`` are per sequence; ``cache_bytes``, ``activation_bytes``
    and ``total_bytes`` are for the batch at the first context (``per_context`` has them all). Exact except the
    activations (estimates). With ``train``, ``total_bytes`` counts weights, grads, optimizer and activations."""

    model: str
    family: str
    arch: dict  # the config values all numbers are derived from
    quant: str
    weights_dtype: str
    cache_dtype: str
    batch: int
    contexts: list[int]
    model_max_context: int
    total_params: int
    active_params: int  # per token: everything but the routed experts not selected
    active_params_no_embeddings: int
    weights_bytes: int
    weights_source: str  # "config" (computed) or "shards" (summed from the checkpoint's safetensors headers)
    kda_state_bytes: int
    mla_cache_bytes_per_token: int
    cache_bytes: int
    activation_bytes: int
    total_bytes: int
    params_by_component: dict
    weights_by_component: dict
    per_context: list[dict]
    comparison: dict  # cache bytes at each context: this model, every layer MLA, plain MHA
    devices: dict  # name -> label, capacity_bytes, usable_bytes, fits (first context), max_context (0: never)
    prefill_chunk: int
    train: dict | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def parse_context(text: str) -> list[int]:
    """``4k,128k,1M`` -> [4096, 131072, 1048576]: k = 1024 tokens, M = 1024²."""
    out = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", part)
        if not m:
            raise CheckpointError(f"bad context {part.strip()!r}; use token counts like 4096, 4k, 128k or 1M")
        value = round(float(m.group(1)) * {"": 1, "k": KIB, "m": MIB}[m.group(2).lower()])
        if value <= 0:
            raise CheckpointError(f"context {part.strip()!r} must be > 0 tokens")
        out.append(value)
    return out


def estimate(config, quant: str | None = None, context=None, batch: int = 1, *, group_size: int | None = None,
             cache_dtype: str | None = None, devices=None, prefill_chunk: int = PREFILL_CHUNK, train: bool = False,
             optimizer: str = "adamw") -> Estimate:
    """Memory for ``config``: a preset name, config.json, checkpoint directory, dict or KimiLinearConfig.

    ``quant``: weight format (default: what the config records, else its dtype; a checkpoint directory in that
    format is measured from its shards); ``context``: tokens per sequence as an int, a list or "4k,128k,1M" (default
    4k, 128k and the model's maximum); ``batch``: sequences; ``devices``: names or sizes (default :data:`DEVICES`).
    Bad input raises :class:`CheckpointError`.
    """
    a, measured = load_arch(config)
    if quant is None and group_size is None and a.recorded_quant and not train:
        q = a.recorded_quant
    else:
        q = make_quant(quant or a.dtype, group_size, a.dtype_bytes)
        if q != (a.recorded_quant or make_quant(a.dtype)):
            measured = None  # the shards hold another format
    if isinstance(context, str):
        contexts = parse_context(context)
    elif context is None:
        contexts = [4 * KIB, 128 * KIB] + ([a.max_context] if a.max_context > 128 * KIB else [])
    else:
        contexts = [context] if isinstance(context, int) else list(context)
    if not contexts or any(not isinstance(c, int) or c <= 0 for c in contexts):
        raise CheckpointError(f"context must be a positive number of tokens, got {context!r}")
    for value, what in ((batch, "batch"), (prefill_chunk, "prefill chunk")):
        if not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{what} must be a positive integer, got {value!r}")
    if optimizer not in ("adamw", "muon"):
        raise CheckpointError(f"unknown optimizer {optimizer!r}; known: adamw, muon")
    if train and not q.is_float:
        raise CheckpointError(f"training is estimated for unquantized weights, not {q.name}")
    cache_dtype = _short_dtype(cache_dtype) if cache_dtype else a.dtype
    if cache_dtype not in DTYPE_BYTES:
        raise CheckpointError(f"unknown cache dtype {cache_dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    cb = DTYPE_BYTES[cache_dtype]

    ts = tensors(a)
    params = {c: sum(t.numel for t in ts if t.component == c) for c in COMPONENTS}
    wbytes = {c: sum(tensor_bytes(t, q, a) for t in ts if t.component == c) for c in COMPONENTS}
    active = sum(t.active_numel for t in ts)
    weights = measured if measured is not None else sum(wbytes.values())
    kda, per_token = kda_state_bytes(a), mla_bytes_per_token(a, cb)
    state = train_state_bytes(a, optimizer) if train else None
    resident = sum(state.values()) if train else weights

    def at(T: int) -> tuple[int, int]:  # (cache, activations) for the batch at context T
        if train:
            return 0, train_activation_bytes(a, batch, T)
        return batch * (kda + T * per_token), prefill_activation_bytes(a, batch, min(T, prefill_chunk))

    def longest(usable: int) -> int:  # memory grows with context: binary search up to the model's maximum
        lo, hi = 0, a.max_context
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if resident + sum(at(mid)) <= usable else (lo, mid - 1)
        return lo

    per_context = []
    for T in contexts:
        cache, act = at(T)
        per_context.append(dict(context=T, cache_bytes=cache, activation_bytes=act, total_bytes=resident + cache + act))
    cmp = {"contexts": contexts, "this_model": [batch * (kda + T * per_token) for T in contexts],
           "all_mla": [batch * T * mla_bytes_per_token(a, cb, a.num_layers) for T in contexts],
           "mha": [batch * T * mha_bytes_per_token(a, cb) for T in contexts]}
    cmp["saving_vs_all_mla"] = [1 - h / m for h, m in zip(cmp["this_model"], cmp["all_mla"])]
    cmp["saving_vs_mha"] = [1 - h / m for h, m in zip(cmp["this_model"], cmp["mha"])]
    dev = {}
    for spec in DEVICES if devices is None else devices:
        name, capacity, usable, label = parse_device(spec)
        dev[name] = dict(label=label, capacity_bytes=capacity, usable_bytes=usable,
                         fits=per_context[0]["total_bytes"] <= usable, max_context=longest(usable))
    notes = [f"context {T:,} is beyond the model's maximum of {a.max_context:,} tokens"
             for T in contexts if T > a.max_context]
    summary = {f.name: getattr(a, f.name) for f in dataclasses.fields(a) if not f.name.endswith("quant")}
    summary.update(kda_layers=[i for i, x in enumerate(a.kda_layers) if x],  # 0-based
                   moe_layers=[i for i, x in enumerate(a.moe_layers) if x],
                   router_quant=a.router_quant.label() if a.router_quant and not q.is_float and not q.block else None)
    return Estimate(
        model=a.name, family=a.family, arch=summary, quant=q.label(), weights_dtype=a.dtype, cache_dtype=cache_dtype,
        batch=batch, contexts=contexts, model_max_context=a.max_context, total_params=sum(params.values()),
        active_params=active, active_params_no_embeddings=active - params["embeddings"], weights_bytes=weights,
        weights_source="config" if measured is None else "shards", kda_state_bytes=kda,
        mla_cache_bytes_per_token=per_token, cache_bytes=per_context[0]["cache_bytes"],
        activation_bytes=per_context[0]["activation_bytes"], total_bytes=per_context[0]["total_bytes"],
        params_by_component=params, weights_by_component=wbytes, per_context=per_context, comparison=cmp,
        devices=dev, prefill_chunk=prefill_chunk, train=dict(state, optimizer=optimizer) if train else None,
        notes=notes,
    )


# ---- output --------------------------------------------------------------------------------------------------------
def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", GIB << 10), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_tokens(n: int) -> str:
    return f"{n // MIB}M" if n % MIB == 0 else f"{n // KIB}k" if n % KIB == 0 else f"{n:,}"


def render(e: Estimate) -> str:
    """The human-readable table."""
    a, c = e.arch, e.comparison
    n_kda, n_mla = len(a["kda_layers"]), a["num_layers"] - len(a["kda_layers"])
    mixers = f"{n_kda} KDA + {n_mla} MLA" if n_kda else f"{n_mla} MLA"
    router = f", router {a['router_quant']}" if a["router_quant"] else ""
    out = [f"{e.model} ({e.family}, {a['num_layers']} layers: {mixers}) · weights {e.quant}{router} · "
           f"cache {e.cache_dtype} · batch {e.batch}", "",
           f"parameters  {e.total_params:>17,} total",
           f"            {e.active_params:>17,} active per token: {a['experts_per_token']} of {a['experts']} routed "
           f"experts + shared expert + everything else ({e.active_params_no_embeddings:,} without the embedding table)",
           f"weights     {fmt_bytes(e.weights_bytes):>17} "
           + ("(measured: safetensors shard headers)" if e.weights_source == "shards" else "(from the config)")]
    out += [f"  {k:<14} {n:>17,} params {fmt_bytes(e.weights_by_component[k]):>11}"
            for k, n in e.params_by_component.items() if n]
    if e.train:
        out.append(f"training    {e.train['optimizer']}: " + ", ".join(
            f"{k.replace('_', ' ')} {fmt_bytes(v)}" for k, v in e.train.items() if k != "optimizer"))
    else:
        if n_kda:
            H, K, W = a["kda_heads"], a["kda_head_dim"], a["conv_kernel"]
            out.append(f"KDA state   {fmt_bytes(e.kda_state_bytes):>17} per sequence, constant in context: {n_kda} "
                       f"layers × ({H}×{K}×{K} fp32 state + 3×{H * K}×{W - 1} {e.weights_dtype} conv tail)")
        out.append(f"MLA cache   {fmt_bytes(e.mla_cache_bytes_per_token):>17} per sequence and token: "
                   f"{n_mla} layers × ({a['kv_lora_rank']} + {a['qk_rope']}) × {DTYPE_BYTES[e.cache_dtype]} B")
    what = "training, estimate" if e.train else f"prefill chunk of {e.prefill_chunk} tokens, estimate"
    out += ["", f"  {'context':>8} {'cache':>11} {'activations':>11} {'total':>11}   (activations: {what})"]
    out += [f"  {fmt_tokens(r['context']):>8} {'-' if e.train else fmt_bytes(r['cache_bytes']):>11} "
            f"{fmt_bytes(r['activation_bytes']):>11} {fmt_bytes(r['total_bytes']):>11}" for r in e.per_context]
    if not e.train:
        T, i = fmt_tokens(c["contexts"][-1]), -1
        line = f"cache at {T}: this model {fmt_bytes(c['this_model'][i])}"
        if n_kda:
            line += f"; every layer MLA {fmt_bytes(c['all_mla'][i])} (hybrid saves {c['saving_vs_all_mla'][i]:.1%})"
        out += ["", line + f"; plain MHA {fmt_bytes(c['mha'][i])} (saves {c['saving_vs_mha'][i]:.1%})"]
    out += ["", f"  {'device':<28} {'memory':>11} {'usable':>11} {'fits ' + fmt_tokens(e.contexts[0]):>9}  "
                f"longest context"]
    for d in e.devices.values():
        mc = d["max_context"]
        longest = "none" if mc == 0 else f"{mc:,}" + (" (model max)" if mc == e.model_max_context else "")
        out.append(f"  {d['label']:<28} {fmt_bytes(d['capacity_bytes']):>11} {fmt_bytes(d['usable_bytes']):>11} "
                   f"{'yes' if d['fits'] else 'no':>9}  {longest}")
    return "\n".join(out + [f"note: {n}" for n in e.notes])


def plot(config, path: str | Path, **kw) -> None:
    """Total memory against context (1k…1M, log-log) for this model, the same with every layer MLA and with plain
    MHA, and a line at each device's usable memory. Written atomically: a temp file beside it, then renamed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise CheckpointError("--plot needs matplotlib (pip install matplotlib)") from None
    xs = [KIB << i for i in range(11)]  # 1k … 1M
    e = estimate(config, context=xs, **kw)
    base = [r["total_bytes"] - r["cache_bytes"] for r in e.per_context]  # weights + activations
    n_kda = len(e.arch["kda_layers"])
    series = [(f"this model ({n_kda} KDA + {e.arch['num_layers'] - n_kda} MLA)" if n_kda else "this model (MLA)",
               "this_model", "-")]
    series += [(f"every layer MLA ({e.arch['num_layers']})", "all_mla", "--")] if n_kda else []
    series += [(f"plain MHA ({e.arch['num_layers']} layers)", "mha", ":")]
    fig = Figure(figsize=(10, 5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ys = []
    for label, key, style in series:
        ys += [(b + c) / GIB for b, c in zip(base, e.comparison[key])]
        ax.plot(xs, ys[-len(xs):], style, lw=2, label=label)
    for d in e.devices.values():  # devices whose line falls in the plotted range
        y = d["usable_bytes"] / GIB
        if min(ys) / 1.5 <= y <= max(ys) * 1.5:
            ax.axhline(y, color="grey", lw=0.8, alpha=0.6)
            ax.text(xs[0], y, f" {d['label']} (usable {y:.0f} GiB)", fontsize=7, va="bottom", color="dimgrey")
    ax.set(xscale="log", yscale="log", xlabel="context (tokens per sequence)", ylabel="memory (GiB)",
           title=f"{e.model}: weights {e.quant}, cache {e.cache_dtype}, batch {e.batch}")
    ax.set_xticks(xs[::2], [fmt_tokens(x) for x in xs[::2]])
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if f"{y:g}"[0] in "25" else ""))
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, title="weights + activations + cache",
              title_fontsize=8)
    write_atomic(path, lambda f: fig.savefig(f, format="png"))


def write_atomic(path: str | Path, write) -> None:
    """``write(file)`` into a temp file beside ``path``, then rename: readers never see a half-written file."""
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# ---- command line --------------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error; main() prints it
        raise CheckpointError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kimi-lm estimate", description="Memory for a Kimi model at a quantization, context and batch.")
    p.add_argument("model", help=f"a preset ({', '.join(ALL_PRESETS)}), a config.json or a checkpoint directory")
    p.add_argument("--quant", help=f"weight format: {', '.join(QUANT_NAMES)} (default: as the config records)")
    p.add_argument("--group-size", type=int, help="affine group: 32, 64 (default) or 128")
    p.add_argument("--context", help="tokens per sequence, comma-separated, e.g. 4k,128k,1M (default: 4k, 128k, max)")
    p.add_argument("--batch", default="1", help="sequences decoded together (default 1)")
    p.add_argument("--cache-dtype", help="MLA cache: bf16, fp16, fp32 or fp8 (default: the model dtype)")
    p.add_argument("--prefill-chunk", default=str(PREFILL_CHUNK), help=f"prompt tokens per step ({PREFILL_CHUNK})")
    p.add_argument("--train", action="store_true", help="full-parameter training; context = sequence length")
    p.add_argument("--optimizer", default="adamw", help="with --train: adamw (default) or muon")
    p.add_argument("--devices", help=f"comma-separated: {', '.join(DEVICES)}, sizes like 48G, or NxDEVICE")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", metavar="FILE.png", help="also write memory against context as a PNG")
    return p


def _positive_int(text: str, what: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", text) or int(text) <= 0:
        raise CheckpointError(f"{what} must be a positive integer, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    """``kimi-lm estimate``: the table (or JSON) and exit 0; bad input: one line on stderr and exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = _parser().parse_args(argv)
        kw = dict(quant=args.quant, group_size=args.group_size, cache_dtype=args.cache_dtype,
                  batch=_positive_int(args.batch, "--batch"), train=args.train, optimizer=args.optimizer,
                  prefill_chunk=_positive_int(args.prefill_chunk, "--prefill-chunk"),
                  devices=args.devices.split(",") if args.devices else None)
        e = estimate(args.model, context=args.context, **kw)
        if args.plot:
            plot(args.model, args.plot, **kw)
    except CheckpointError as exc:
        print(f"kimi-lm estimate: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    print(e.to_json() if args.json else render(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
