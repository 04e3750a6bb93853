"""Kimi K3 configuration: the ``kimi_k3`` multimodal wrapper around a ``kimi_linear`` text model with K3's keys.

config.json holds ``model_type: kimi_k3``, a ``text_config`` (the text model: Kimi Linear's keys plus SiTU, the
latent MoE, the MLA output gate and, in ``linear_attn_config``, the KDA gate's lower bound and full-rank output
gate) and a ``vision_config`` (MoonViT, not loaded). ``KimiK3Config`` is the *text* config: its fields are
``text_config``'s keys, read by ``config_checks.unwrap_text_config`` (which also takes a top-level
``quantization_config`` and token ids), and ``to_dict`` writes the wrapper back. Layer lists are 1-based, as in
Kimi Linear. A key absent from the file means "feature off" (the reference config class's defaults): no output
gate, no latent, no norm, softplus KDA gate, SiTU β = 1 and an untouched up branch.

Values that would change the math in a way the model does not implement raise ``CheckpointError`` naming the key.

Reference: spec ``shared/specs/kimi_k3_and_int4.md`` §A1 (config, defaults), §A4.1 (quantization_config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from kimi_lm.config import _ALIASES, K3_PRESETS, KimiLinearConfig, _linear_attn_config_from_transformers
from kimi_lm.config_checks import build, normalise_keys, unwrap_text_config, wrap_text_config
from kimi_lm.errors import CheckpointError

# Keys with the values implemented here (key -> accepted values; None = absent).
_IMPLEMENTED = {
    "hidden_act": (None, "situ"),
    "mla_use_nope": (None, True),  # the HF class asserts it: K3's 64 "rope" dims are never rotated
    "moe_router_activation_func": (None, "sigmoid"),
    "topk_method": (None, "noaux_tc"),
}


@dataclass
class KimiK3Config(KimiLinearConfig):
    """Kimi K3's text model; field names are ``text_config``'s keys (Kimi Linear's plus the ones below)."""

    MODEL_TYPES: ClassVar[tuple[str, ...]] = ("kimi_k3",)
    model_type: str = "kimi_k3"
    hidden_act: str = "situ"
    activation_situ_beta: float | None = None  # SiTU gate branch β·tanh(a/β)·sigmoid(a); None = 1.0
    activation_situ_linear_beta: float | None = None  # up branch β_lin·tanh(b/β_lin); None = b
    mla_use_output_gate: bool = False  # o · sigmoid(g_proj(x)) before o_proj
    routed_expert_hidden_size: int | None = None  # latent width of the routed experts; None = hidden_size
    latent_moe_use_norm: bool = False  # RMSNorm of the combined latent before the up-projection
    routed_scaling_factor: float = 1.0
    quantization_config: dict | None = None
    wrapper: dict | None = None  # the top-level keys of the wrapper (vision_config, token ids, ...), written back

    # ---- derived ---------------------------------------------------------------------------------------------------
    @property
    def kda_gate_lower_bound(self) -> float | None:
        """lb of the KDA decay gate g = lb · sigmoid(exp(A_log)·(f + dt_bias)); None = −exp(A_log)·softplus(·)."""
        return self.linear_attn_config.get("gate_lower_bound")

    @property
    def kda_full_rank_gate(self) -> bool:
        """KDA's output gate is one ``g_proj`` [H·K, hidden] instead of ``g_b_proj(g_a_proj(x))``."""
        return bool(self.linear_attn_config.get("use_full_rank_gate"))

    @property
    def expert_hidden_size(self) -> int:
        """The width the routed experts read and write: the latent, or the hidden size without one."""
        return self.routed_expert_hidden_size or self.hidden_size

    @property
    def a_log_size(self) -> int:
        """A_log is stored zero-padded to the KDA head dim ([128] for 96 heads in the release); the first
        ``kda_num_heads`` entries are used."""
        return max(self.kda_num_heads, self.kda_head_dim)

    # ---- (de)serialisation -----------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "KimiK3Config":
        """The wrapper config.json (``model_type: kimi_k3``) -> the text config, validated."""
        if raw.get("model_type") not in cls.MODEL_TYPES:
            normalise_keys(cls, raw, {}, {}, source)  # raises, naming the model_type
        d = unwrap_text_config(raw, ("kimi_linear",), source)
        normalise_keys(cls, d, _ALIASES, _IMPLEMENTED, source)
        for key in ("rope_scaling", "rope_parameters"):  # nothing is rotated; only "default" (a no-op) is accepted
            rs = d.get(key)
            if rs is not None and (not isinstance(rs, dict) or rs.get("rope_type", rs.get("type")) != "default"):
                raise CheckpointError(f"{source}: config key {key!r} = {rs!r} changes the model's math and is not "
                                      f"implemented (K3's MLA is NoPE; supported: null or type 'default')")
        if d.get("linear_attn_config") is None:
            d["linear_attn_config"] = _linear_attn_config_from_transformers(
                d, d.get("num_hidden_layers", cls.num_hidden_layers), source)
        return build(cls, d, source)

    def to_dict(self) -> dict:
        """The release layout: the wrapper with the text model under ``text_config``."""
        text = super().to_dict()
        text.pop("wrapper")
        text["architectures"] = ["KimiLinearForCausalLM"]
        wrapper = dict(self.wrapper or {"architectures": ["KimiK3ForConditionalGeneration"],
                                        "tie_word_embeddings": self.tie_word_embeddings})
        return wrap_text_config(text, wrapper, "kimi_k3", "kimi_linear")

    def validate(self, source: str = "config.json") -> None:
        super().validate(source)
        lac = self.linear_attn_config
        lb = lac.get("gate_lower_bound")
        if lb is not None and (isinstance(lb, bool) or not isinstance(lb, (int, float)) or lb >= 0):
            raise CheckpointError(f"{source}: linear_attn_config.gate_lower_bound must be a negative number or null "
                                  f"(the decay gate lies in (lb, 0)); found {lb!r}")
        if not isinstance(lac.get("use_full_rank_gate", False), bool):
            raise CheckpointError(f"{source}: linear_attn_config.use_full_rank_gate must be true or false; "
                                  f"found {lac['use_full_rank_gate']!r}")
        for key in ("kda_layers", "full_attn_layers"):
            bad = [i for i in lac[key] if isinstance(i, bool) or not isinstance(i, int)]
            if bad:
                raise CheckpointError(f"{source}: linear_attn_config.{key} must list 1-based layer numbers; found {bad}")
        for key in ("activation_situ_beta", "activation_situ_linear_beta", "routed_expert_hidden_size"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise CheckpointError(f"{source}: config key {key!r} = {value!r}, expected a positive number or null")
        if self.latent_moe_use_norm and self.routed_expert_hidden_size is None:
            raise CheckpointError(f"{source}: latent_moe_use_norm is true but routed_expert_hidden_size is null "
                                  f"(the norm is over the latent)")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise CheckpointError(f"{source}: q_lora_rank must be positive or null; found {self.q_lora_rank!r}")


def k3_preset(name: str) -> KimiK3Config:
    """``kimi-k3``: the release (spec §A1.2); ``tiny-k3``: a 7-layer debug model (KDA on 1-3, 5-6; MLA on 4 and 7:
    two MLA layers in a row at the end; AttnRes blocks of 3 layers, so the last one is short; 8 experts top-2 in a
    latent narrower than the hidden size; distinct KDA and MLA head counts; the release's gates and betas)."""
    common = dict(hidden_act="situ", activation_situ_beta=4.0, activation_situ_linear_beta=25.0,
                  mla_use_output_gate=True, latent_moe_use_norm=True, moe_renormalize=True, routed_scaling_factor=1.0,
                  first_k_dense_replace=1, moe_layer_freq=1, num_expert_group=1, topk_group=1, rms_norm_eps=1e-5,
                  bos_token_id=163584, eos_token_id=163586, pad_token_id=163839)
    if name == "kimi-k3":
        full = [*range(4, 93, 4), 93]
        return KimiK3Config(
            vocab_size=163840, hidden_size=7168, num_hidden_layers=93, num_attention_heads=96, num_key_value_heads=96,
            q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
            intermediate_size=33792, num_experts=896, num_experts_per_token=16, num_shared_experts=2,
            moe_intermediate_size=3072, routed_expert_hidden_size=3584, attn_res_block_size=12,
            model_max_length=1048576, quantization_config=None,
            linear_attn_config={"kda_layers": [i for i in range(1, 94) if i not in full], "full_attn_layers": full,
                                "num_heads": 96, "head_dim": 128, "short_conv_kernel_size": 4,
                                "use_full_rank_gate": True, "gate_lower_bound": -5.0},
            **common)
    if name == "tiny-k3":
        return KimiK3Config(
            vocab_size=256, hidden_size=64, num_hidden_layers=7, num_attention_heads=3, num_key_value_heads=3,
            q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
            intermediate_size=96, num_experts=8, num_experts_per_token=2, num_shared_experts=2,
            moe_intermediate_size=24, routed_expert_hidden_size=40, attn_res_block_size=3, dtype="float32",
            linear_attn_config={"kda_layers": [1, 2, 3, 5, 6], "full_attn_layers": [4, 7], "num_heads": 2,
                                "head_dim": 16, "short_conv_kernel_size": 4, "use_full_rank_gate": True,
                                "gate_lower_bound": -5.0},
            **{**common, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    raise CheckpointError(f"unknown preset {name!r}; known presets: {K3_PRESETS}")


