"""Model configuration: a flat dataclass whose fields are the keys of the checkpoint's own config.json.

Two spellings of the same Kimi Linear config exist in the wild and both are read here:

* the official remote-code config (Kimi-Linear-48B-A3B-Instruct, ``transformers_version`` 4.57.1): nested
  ``linear_attn_config`` with 1-based ``kda_layers`` / ``full_attn_layers``, ``num_experts``,
  ``num_experts_per_token``, ``first_k_dense_replace``, ...
* what ``transformers`` 5.x ``KimiLinearConfig.save_pretrained`` writes: 0-based ``layer_types`` /
  ``mlp_layer_types`` lists, ``linear_num_heads`` / ``linear_head_dim`` / ``linear_conv_kernel_dim`` and the
  DeepSeek aliases (``num_local_experts``, ``num_experts_per_tok``, ``n_shared_experts``, ``n_group``,
  ``norm_topk_prob``).

Both are normalised to the official key names; ``to_dict`` writes the official layout back. Keys that would change
the math but are not implemented raise :class:`CheckpointError` instead of being silently ignored.

``KimiK2Config`` does the same for Kimi K2 / DeepSeek-V3 (``model_type`` ``kimi_k2`` or ``deepseek_v3``): the
official keys (``rope_scaling``, ``rope_theta``, ``torch_dtype``) and what transformers 5.x writes
(``rope_parameters``, ``dtype``, ``num_local_experts``). ``load_config`` picks the class from ``model_type``. How a raw
dict is read and checked (aliases, unimplemented keys, field types, YaRN, FP8 block) is in ``config_checks``.

References: ``shared/specs/kimi_linear.md`` §1 (every field of the official config and what the forward uses);
``shared/specs/kimi_k2_and_quantization.md`` §1 (K2 fields), §2.4 (YaRN keys), §4 (``quantization_config``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from kimi_lm.config_checks import (K2_MODEL_TYPES, SUPPORTED_MODEL_TYPES, build, check_field_types, check_fp8_config,
                                   normalise_keys, normalise_rope_scaling, read_config_json, unwrap_text_config,
                                   wrap_text_config)
from kimi_lm.errors import CheckpointError


# DeepSeek / transformers-native spellings -> official Kimi Linear key.
_ALIASES = {
    "num_local_experts": "num_experts",
    "n_routed_experts": "num_experts",
    "num_experts_per_tok": "num_experts_per_token",
    "n_shared_experts": "num_shared_experts",
    "n_group": "num_expert_group",
    "norm_topk_prob": "moe_renormalize",
    "scoring_func": "moe_router_activation_func",
    "max_position_embeddings": "model_max_length",
}

# Keys of later Kimi models that change the forward pass. Each maps to the value that means "feature off".
_UNIMPLEMENTED = {
    "gate_lower_bound": (None,),  # lower-bounded "safe" KDA gate
    "use_full_rank_gate": (None, False),
    "mla_use_output_gate": (None, False),
    "mla_use_nope": (None, True),  # rotary MLA is not part of Kimi Linear
    "moe_router_activation_func": (None, "sigmoid"),
    "hidden_act": (None, "silu"),
    "rope_scaling": (None,),
}


class _SharedConfig:
    """What both config classes derive the same way from the keys they share (MLA sizes, the MoE layer pattern)."""

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def mla_cache_width(self) -> int:
        """Values cached per token per MLA layer by the absorbed form: latent + shared key part (512 + 64)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @classmethod
    def from_file(cls, path: str | Path):
        return cls.from_dict(read_config_json(path), source=str(path))


@dataclass
class KimiLinearConfig(_SharedConfig):
    """Kimi Linear hyper-parameters; field names are the official config.json keys."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("kimi_linear",)
    model_type: str = "kimi_linear"
    vocab_size: int = 163840
    hidden_size: int = 2304
    num_hidden_layers: int = 27
    intermediate_size: int = 9216
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 163584
    eos_token_id: int | list[int] | None = 163586
    pad_token_id: int | None = 163839
    model_max_length: int = 1048576
    # MLA (full-attention layers)
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None  # unused by NoPE MLA; written (hidden / heads, as the official file) for mlx-lm
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    mla_use_nope: bool = True
    rope_theta: float = 10000.0  # unused (NoPE); the official file and mlx-lm's ModelArgs carry it
    # MoE
    num_experts: int = 256
    num_experts_per_token: int = 8
    num_shared_experts: int = 1
    moe_intermediate_size: int = 1024
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 1
    moe_renormalize: bool = True
    moe_router_activation_func: str = "sigmoid"
    routed_scaling_factor: float = 2.446
    num_expert_group: int = 1
    topk_group: int = 1
    num_nextn_predict_layers: int = 0
    # KDA (linear-attention layers); layer lists are 1-based as in the official file
    linear_attn_config: dict = field(
        default_factory=lambda: {
            "kda_layers": [i for i in range(1, 28) if i % 4 != 0 and i != 27],
            "full_attn_layers": [4, 8, 12, 16, 20, 24, 27],
            "num_heads": 32,
            "head_dim": 128,
            "short_conv_kernel_size": 4,
        }
    )
    dtype: str | None = "bfloat16"
    # Block Attention Residuals (model/attnres.py): Transformer layers per block, K3's unit (0.5 steps allowed);
    # None / 0 = the plain residual stream
    attn_res_block_size: float | None = None

    # ---- derived sizes -----------------------------------------------------------------------------------------
    @property
    def kda_num_heads(self) -> int:
        return int(self.linear_attn_config["num_heads"])

    @property
    def kda_head_dim(self) -> int:
        return int(self.linear_attn_config["head_dim"])

    @property
    def conv_kernel_size(self) -> int:
        return int(self.linear_attn_config.get("short_conv_kernel_size", 4))

    def is_kda_layer(self, layer_idx: int) -> bool:
        """Layer ``layer_idx`` (0-based) is KDA iff ``layer_idx + 1`` is in the 1-based ``kda_layers``."""
        return (layer_idx + 1) in self.linear_attn_config["kda_layers"]

    # family-neutral names of sizes the two families spell differently (``KimiK2Config`` has the same)
    routed_experts = property(lambda self: self.num_experts)
    experts_per_token = property(lambda self: self.num_experts_per_token)
    shared_experts = property(lambda self: self.num_shared_experts)
    max_context = property(lambda self: self.model_max_length)

    # ---- (de)serialisation -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "KimiLinearConfig":
        """Normalise either config style to official keys and validate it; unknown keys are ignored."""
        d = dict(raw)
        normalise_keys(cls, d, _ALIASES, _UNIMPLEMENTED, source)
        n_layers = d.get("num_hidden_layers", cls.num_hidden_layers)
        if "linear_attn_config" not in d or d["linear_attn_config"] is None:
            d["linear_attn_config"] = _linear_attn_config_from_transformers(d, n_layers, source)
        if "mlp_layer_types" in d and "first_k_dense_replace" not in d:
            d["first_k_dense_replace"] = _first_k_dense_from_mlp_types(d["mlp_layer_types"], source)
        return build(cls, d, source)

    def to_dict(self) -> dict:
        """The official (remote-code) config.json layout, with every key mlx-lm's and transformers' loaders need."""
        d = dataclasses.asdict(self)
        d["head_dim"] = self.head_dim or self.hidden_size // self.num_attention_heads
        d["architectures"] = ["KimiLinearForCausalLM"]
        return d

    def validate(self, source: str = "config.json") -> None:
        check_field_types(self, source)
        lac = self.linear_attn_config
        if not isinstance(lac, dict):
            raise CheckpointError(f"{source}: linear_attn_config must be an object, found {type(lac).__name__}")
        for key in ("kda_layers", "full_attn_layers", "num_heads", "head_dim"):
            if key not in lac:
                raise CheckpointError(f"{source}: linear_attn_config is missing {key!r}")
        kda, full = set(lac["kda_layers"]), set(lac["full_attn_layers"])
        every = set(range(1, self.num_hidden_layers + 1))
        if kda & full or (kda | full) != every:
            raise CheckpointError(
                f"{source}: linear_attn_config.kda_layers ∪ full_attn_layers must split layers 1..{self.num_hidden_layers}"
                f" (1-based) exactly once; found kda_layers={sorted(kda)}, full_attn_layers={sorted(full)}"
            )
        if self.num_experts % self.num_expert_group or self.topk_group > self.num_expert_group:
            raise CheckpointError(
                f"{source}: num_experts ({self.num_experts}) must divide into num_expert_group ({self.num_expert_group})"
                f" groups and topk_group ({self.topk_group}) must not exceed it"
            )
        if self.num_experts_per_token > self.num_experts:
            raise CheckpointError(
                f"{source}: num_experts_per_token ({self.num_experts_per_token}) > num_experts ({self.num_experts})"
            )
        S = self.attn_res_block_size
        if S and (isinstance(S, bool) or not isinstance(S, (int, float)) or S < 0 or 2 * S != int(2 * S)):
            raise CheckpointError(
                f"{source}: attn_res_block_size must be a positive number of layers in steps of 0.5 (one sublayer), "
                f"or null; found {S!r}"
            )


def _linear_attn_config_from_transformers(d: dict, n_layers: int, source: str) -> dict:
    """Rebuild the official nested ``linear_attn_config`` from transformers' 0-based ``layer_types``."""
    layer_types = d.get("layer_types")
    if layer_types is None:
        raise CheckpointError(f"{source}: neither 'linear_attn_config' nor 'layer_types' is present")
    if len(layer_types) != n_layers or set(layer_types) - {"linear_attention", "full_attention"}:
        raise CheckpointError(
            f"{source}: layer_types must list {n_layers} entries of 'linear_attention'/'full_attention'; found {layer_types}"
        )
    return {
        "kda_layers": [i + 1 for i, t in enumerate(layer_types) if t == "linear_attention"],
        "full_attn_layers": [i + 1 for i, t in enumerate(layer_types) if t == "full_attention"],
        "num_heads": d.get("linear_num_heads", 32),
        "head_dim": d.get("linear_head_dim", 128),
        "short_conv_kernel_size": d.get("linear_conv_kernel_dim", 4),
    }


def _first_k_dense_from_mlp_types(mlp_types: list, source: str) -> int:
    k = 0
    while k < len(mlp_types) and mlp_types[k] == "dense":
        k += 1
    if any(t != "sparse" for t in mlp_types[k:]):
        raise CheckpointError(
            f"{source}: mlp_layer_types must be some 'dense' layers followed only by 'sparse' ones; found {mlp_types}"
        )
    return k


# transformers-native spellings -> official Kimi K2 / DeepSeek-V3 key.
_K2_ALIASES = {
    "num_local_experts": "n_routed_experts",
    "num_mtp_layers": "num_nextn_predict_layers",
    "torch_dtype": "dtype",
}
# Keys that change the forward pass, with the values implemented here (DeepSeek-V2's softmax / greedy routers are not).
_K2_IMPLEMENTED = {
    "topk_method": (None, "noaux_tc"),
    "scoring_func": (None, "sigmoid"),
    "hidden_act": (None, "silu"),
    "attention_bias": (None, False),
}
# The one FP8 format the official K2 / DeepSeek-V3 releases use (spec §4).
FP8_BLOCK_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


@dataclass
class KimiK2Config(_SharedConfig):
    """Kimi K2 / DeepSeek-V3 hyper-parameters; field names are the official config.json keys.

    Defaults are transformers' ``DeepseekV3Config`` defaults: what a ``deepseek_v3`` config.json means when it omits
    a key (``save_pretrained`` drops some). ``rope_scaling`` is None or a YaRN dict with every key filled in.
    """

    MODEL_TYPES: ClassVar[tuple[str, ...]] = K2_MODEL_TYPES
    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    num_hidden_layers: int = 61
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    max_position_embeddings: int = 4096
    # MLA with q-LoRA and interleaved-pair RoPE on the qk_rope_head_dim dims
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    attention_bias: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_interleave: bool = True
    # MoE
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    moe_intermediate_size: int = 2048
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    num_nextn_predict_layers: int = 1  # multi-token-prediction layers stored after the last layer; never loaded
    quantization_config: dict | None = None
    dtype: str | None = "bfloat16"

    # family-neutral names of sizes the two families spell differently (``KimiLinearConfig`` has the same)
    routed_experts = property(lambda self: self.n_routed_experts)
    experts_per_token = property(lambda self: self.num_experts_per_tok)
    shared_experts = property(lambda self: self.n_shared_experts)
    max_context = property(lambda self: self.max_position_embeddings)

    def is_kda_layer(self, layer_idx: int) -> bool:
        return False  # every layer is MLA

    # ---- (de)serialisation -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "KimiK2Config":
        """Normalise the official or the transformers spelling and validate it; unknown keys are ignored."""
        d = dict(raw)
        normalise_keys(cls, d, _K2_ALIASES, _K2_IMPLEMENTED, source)
        if d.get("rope_parameters") is not None:  # transformers 5: theta and scaling in one dict
            rp = dict(d["rope_parameters"])
            d.setdefault("rope_theta", rp.pop("rope_theta", cls.rope_theta))
            d.setdefault("rope_scaling", rp)
        if not d.get("q_lora_rank"):
            d["q_lora_rank"] = None  # 0 / null: a single q_proj (DeepSeek-V2-Lite style)
        d["rope_scaling"] = normalise_rope_scaling(
            d.get("rope_scaling"), d.get("max_position_embeddings", cls.max_position_embeddings), source
        )
        return build(cls, d, source)

    def to_dict(self) -> dict:
        """The official config.json layout (``rope_scaling``, ``torch_dtype``)."""
        d = dataclasses.asdict(self)
        d["torch_dtype"] = d.pop("dtype")
        d["architectures"] = ["DeepseekV3ForCausalLM"]
        return d

    def validate(self, source: str = "config.json") -> None:
        check_field_types(self, source)
        E, g = self.n_routed_experts, self.n_group
        if g < 1 or E % g or not 1 <= self.topk_group <= g or (g > 1 and E // g < 2):
            raise CheckpointError(
                f"{source}: n_routed_experts ({E}) must split into n_group ({g}) groups of at least 2 experts and "
                f"topk_group ({self.topk_group}) must be between 1 and n_group"
            )
        if self.num_experts_per_tok > self.topk_group * E // g:
            raise CheckpointError(
                f"{source}: num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts in the topk_group "
                f"({self.topk_group}) kept groups ({self.topk_group * E // g})"
            )
        if self.qk_rope_head_dim % 2:
            raise CheckpointError(f"{source}: qk_rope_head_dim must be even (pairs are rotated); found {self.qk_rope_head_dim}")
        if isinstance(self.quantization_config, dict) and self.quantization_config.get("quant_method") == "compressed-tensors":
            pass  # K2-Thinking / K2.5 native INT4: checked by the loader (kimi_lm.quant.compressed_tensors.plan)
        elif isinstance(self.quantization_config, dict) and "bits" in self.quantization_config:
            pass  # mlx-lm's layout (kimi-lm convert --to-mlx): checked by the loader (kimi_lm.quant.mlx_load)
        elif self.quantization_config is not None:
            check_fp8_config(self.quantization_config, source)


@dataclass
class KimiK25Config(KimiK2Config):
    """Kimi K2.5 (``kimi_k25``): a multimodal wrapper whose ``text_config`` is a Kimi K2 / DeepSeek-V3 text model
    (tensors under ``language_model.``; the vision tower is not loaded). Spec ``kimi_k3_and_int4.md`` §B4."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("kimi_k25",)
    model_type: str = "kimi_k25"
    wrapper: dict | None = None  # the wrapper's top-level keys (vision_config, token ids, ...), written back

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "KimiK25Config":
        return super().from_dict(unwrap_text_config(raw, K2_MODEL_TYPES, source), source)

    def to_dict(self) -> dict:
        text = super().to_dict()
        wrapper = text.pop("wrapper") or {"architectures": ["KimiK25ForConditionalGeneration"]}
        return wrap_text_config(text, wrapper, "kimi_k25", "kimi_k2")


def load_config(path: str | Path) -> "KimiLinearConfig | KimiK2Config":
    """Read a config.json with the config class its ``model_type`` names."""
    return config_from_dict(read_config_json(path), source=str(path))


def config_from_dict(raw: dict, source: str = "config.json") -> "KimiLinearConfig | KimiK2Config":
    if raw.get("model_type") == "kimi_k3":  # the multimodal wrapper; its text model is kimi_lm.config_k3
        from kimi_lm.config_k3 import KimiK3Config

        return KimiK3Config.from_dict(raw, source)
    if raw.get("model_type") in K2_MODEL_TYPES:
        return KimiK2Config.from_dict(raw, source)
    if raw.get("model_type") == "kimi_k25":
        return KimiK25Config.from_dict(raw, source)
    return KimiLinearConfig.from_dict(raw, source)  # raises for unsupported types, listing every supported one


def _preset(n_layers: int, full_attn: list[int], **kw) -> KimiLinearConfig:
    lac = {
        "kda_layers": [i for i in range(1, n_layers + 1) if i not in full_attn],
        "full_attn_layers": full_attn,
        "num_heads": kw.pop("kda_heads"),
        "head_dim": kw.pop("kda_head_dim"),
        "short_conv_kernel_size": 4,
    }
    return KimiLinearConfig(num_hidden_layers=n_layers, linear_attn_config=lac, **kw)


def preset(name: str) -> "KimiLinearConfig | KimiK2Config":
    """Named configurations: the real models, a benchmark size and tiny debug sizes for tests."""
    if name in K2_PRESETS:
        return _k2_preset(name)
    if name in K3_PRESETS:
        from kimi_lm.config_k3 import k3_preset

        return k3_preset(name)
    if name == "kimi-linear-48b-a3b":
        return KimiLinearConfig()
    if name == "bench":  # ~66M parameters, ~29M active: the CPU benchmark config (8 layers, 3:1 KDA:MLA)
        return _preset(
            8, [4, 8], vocab_size=8192, hidden_size=512, intermediate_size=1024, num_attention_heads=4,
            num_key_value_heads=4, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
            num_experts=16, num_experts_per_token=4, moe_intermediate_size=256, kda_heads=4, kda_head_dim=128,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="float32",
        )
    if name == "tiny":  # 6 layers: 4 KDA + 2 MLA, dense first layer, 8 experts top-2
        return _preset(
            6, [3, 6], vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=2,
            num_key_value_heads=2, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            num_experts=8, num_experts_per_token=2, moe_intermediate_size=32, kda_heads=2, kda_head_dim=16,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="float32",
        )
    raise CheckpointError(f"unknown preset {name!r}; known presets: {PRESETS + K2_PRESETS + K3_PRESETS}")


# Kimi-K2-Thinking's routed experts: compressed-tensors pack-quantized INT4, group 32 (spec kimi_k3_and_int4.md §B1)
INT4_EXPERTS_CONFIG = {
    "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
    "kv_cache_scheme": None,
    "config_groups": {"group_0": {
        "targets": ["Linear"], "input_activations": None, "output_activations": None,
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
                    "dynamic": False, "observer": "minmax", "observer_kwargs": {}, "actorder": None,
                    "block_structure": None}}},
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
}


def _k2_preset(name: str) -> KimiK2Config:
    if name in ("kimi-k2-thinking", "kimi-k25"):
        # The K2-Instruct text model (spec §B4: K2.5's text values are K2's) with INT4 routed experts and 256K
        # context (YaRN factor 64 over 4096, spec §B4 for K2.5; K2-Thinking as K2-Instruct-0905, kimi_k2 spec §1).
        text = dict(_k2_preset("kimi-k2-instruct").to_dict(), max_position_embeddings=262144,
                    quantization_config=dict(INT4_EXPERTS_CONFIG))
        text["rope_scaling"] = dict(text["rope_scaling"], factor=64.0)
        if name == "kimi-k2-thinking":
            return KimiK2Config.from_dict(text, source="preset kimi-k2-thinking")
        wrapper = {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25",
                   "media_placeholder_token_id": 163605, "pad_token_id": 163839, "tie_word_embeddings": False,
                   "vision_config": {"model_type": "moonvit"}}  # the vision tower is not part of the text estimate
        return KimiK25Config.from_dict({**wrapper, "text_config": text}, source="preset kimi-k25")
    if name == "kimi-k2-instruct":  # shared/reference/kimi-k2-instruct.config.json (July 2025 release, FP8)
        return KimiK2Config(
            model_type="kimi_k2", vocab_size=163840, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61,
            bos_token_id=163584, eos_token_id=163585, max_position_embeddings=131072, num_attention_heads=64,
            num_key_value_heads=64, rope_theta=50000.0,
            rope_scaling={"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0,
                          "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
            n_routed_experts=384, first_k_dense_replace=1, n_group=1, topk_group=1, routed_scaling_factor=2.827,
            num_nextn_predict_layers=0, quantization_config=dict(FP8_BLOCK_CONFIG),
        )
    # "tiny-k2": 3 layers (dense first), YaRN, q-LoRA, 4 groups of 4 experts with 2 groups kept, partial FP8 blocks
    return KimiK2Config(
        vocab_size=256, hidden_size=192, intermediate_size=320, num_hidden_layers=3, max_position_embeddings=128,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=128, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32,
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=96, first_k_dense_replace=1, n_group=4,
        topk_group=2, num_nextn_predict_layers=0, dtype="float32",
    )


PRESETS = ["kimi-linear-48b-a3b", "bench", "tiny"]
K2_PRESETS = ["kimi-k2-instruct", "kimi-k2-thinking", "kimi-k25", "tiny-k2"]
K3_PRESETS = ["kimi-k3", "tiny-k3"]  # kimi_lm.config_k3
