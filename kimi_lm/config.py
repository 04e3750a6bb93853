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
(``rope_parameters``, ``dtype``, ``num_local_experts``). ``load_config`` picks the class from ``model_type``.

References: ``shared/specs/kimi_linear.md`` §1 (every field of the official config and what the forward uses);
``shared/specs/kimi_k2_and_quantization.md`` §1 (K2 fields), §2.4 (YaRN keys), §4 (``quantization_config``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from kimi_lm.errors import CheckpointError

K2_MODEL_TYPES = ("kimi_k2", "deepseek_v3")
SUPPORTED_MODEL_TYPES = ("kimi_linear", *K2_MODEL_TYPES)

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
    "attn_res_block_size": (None, 0),  # Block Attention Residuals (Kimi K3)
    "gate_lower_bound": (None,),  # lower-bounded "safe" KDA gate
    "use_full_rank_gate": (None, False),
    "mla_use_output_gate": (None, False),
    "mla_use_nope": (None, True),  # rotary MLA is not part of Kimi Linear
    "moe_router_activation_func": (None, "sigmoid"),
    "hidden_act": (None, "silu"),
    "rope_scaling": (None,),
}


@dataclass
class KimiLinearConfig:
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
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    mla_use_nope: bool = True
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

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def mla_cache_width(self) -> int:
        """Values cached per token per MLA layer by the absorbed form: latent + shared key part (512 + 64)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_kda_layer(self, layer_idx: int) -> bool:
        """Layer ``layer_idx`` (0-based) is KDA iff ``layer_idx + 1`` is in the 1-based ``kda_layers``."""
        return (layer_idx + 1) in self.linear_attn_config["kda_layers"]

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    # ---- (de)serialisation -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "KimiLinearConfig":
        """Normalise either config style to official keys and validate it; unknown keys are ignored."""
        d = dict(raw)
        _check_model_type(cls, d.get("model_type"), source)
        for alias, key in _ALIASES.items():
            if alias in d and key not in d:
                d[key] = d[alias]
        for key, off_values in _UNIMPLEMENTED.items():
            if key in d and d[key] not in off_values:
                raise CheckpointError(
                    f"{source}: config key {key!r} = {d[key]!r} changes the model's math and is not implemented "
                    f"(supported: {' or '.join(repr(v) for v in off_values)})"
                )
        n_layers = d.get("num_hidden_layers", cls.num_hidden_layers)
        if "linear_attn_config" not in d or d["linear_attn_config"] is None:
            d["linear_attn_config"] = _linear_attn_config_from_transformers(d, n_layers, source)
        if "mlp_layer_types" in d and "first_k_dense_replace" not in d:
            d["first_k_dense_replace"] = _first_k_dense_from_mlp_types(d["mlp_layer_types"], source)
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg.validate(source)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> "KimiLinearConfig":
        return cls.from_dict(read_config_json(path), source=str(path))

    def to_dict(self) -> dict:
        """The official (remote-code) config.json layout."""
        d = dataclasses.asdict(self)
        d["architectures"] = ["KimiLinearForCausalLM"]
        return d

    def validate(self, source: str = "config.json") -> None:
        lac = self.linear_attn_config
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


def read_config_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: config.json not found")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON config ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw


def _check_model_type(cls, model_type, source: str) -> None:
    if model_type in cls.MODEL_TYPES:
        return
    if model_type in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{source}: model_type {model_type!r} is not a {cls.__name__}; read it with load_config()")
    raise CheckpointError(
        f"{source}: model_type {model_type!r} is not supported; expected one of {list(SUPPORTED_MODEL_TYPES)}"
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


def _preset(n_layers: int, full_attn: list[int], **kw) -> KimiLinearConfig:
    lac = {
        "kda_layers": [i for i in range(1, n_layers + 1) if i not in full_attn],
        "full_attn_layers": full_attn,
        "num_heads": kw.pop("kda_heads"),
        "head_dim": kw.pop("kda_head_dim"),
        "short_conv_kernel_size": 4,
    }
    return KimiLinearConfig(num_hidden_layers=n_layers, linear_attn_config=lac, **kw)


def preset(name: str) -> KimiLinearConfig:
    """Named configurations: the real 48B model, a benchmark size and tiny debug sizes for tests."""
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
    raise CheckpointError(f"unknown preset {name!r}; known presets: {PRESETS}")


PRESETS = ["kimi-linear-48b-a3b", "bench", "tiny"]
