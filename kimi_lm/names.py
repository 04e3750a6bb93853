"""Checkpoint tensor names <-> kimi-lm parameter names: the one table, read in both directions.

Parameter names equal checkpoint names except for the rows of ``RULES``. Each row pairs a checkpoint-name template
with a parameter-name template and a *placement* (how the checkpoint tensor sits in the parameter):

    copy       the whole tensor
    gate, up   rows [0, I) / [I, 2I) of expert E of a stacked ``gate_up_proj`` [E, 2I, hidden]
    down       expert E of a stacked ``down_proj`` [E, hidden, I]
    gate_all   every expert's gate (or up) rows at once: mlx-lm stacks experts along a leading axis
    up_all
    conv       an MLX Conv1d weight [D, W, 1] for a PyTorch one [D, 1, W] (a transpose)

Templates use ``{name}`` placeholders whose patterns are in ``_SLOTS`` (``{L}`` a decoder layer, ``{E}`` an expert
index, ...). Reading a checkpoint (``to_parameter``) matches the checkpoint template; writing one (``to_checkpoint``)
matches the parameter template and fills in the checkpoint template, leaving ``{E}`` for per-expert rows. A row is
used for one model family and one *layout*: ``hf`` (the official / transformers names, what ``save`` and
``convert --dequantize`` / ``--to-hf`` write) or ``mlx`` (mlx-lm's ``kimi_linear.sanitize`` output, what
``convert --quantize`` writes). Loading accepts every layout of its family; read-only rows are never written.

mlx-lm's ``kimi_k3`` fuses each KDA layer's q/k/v projections and convolutions along their output rows
(``self_attn.qkv_proj.*`` [3·H·K, ...], ``self_attn.qkv_conv.conv.weight``); ``FUSED`` reads such a tensor as its
three row thirds, each a contiguous byte range of the file (``fused_parts``), so loading never copies them.

``SKIP`` lists what loading drops: ``rotary_emb.inv_freq`` (recomputed from the config) and multi-token-prediction
layers (index >= ``num_hidden_layers``).

Multimodal wrappers (Kimi K3 ``kimi_k3``) hold the text model under ``language_model.`` (``WRAPPER_PREFIX``) beside
vision tensors (``vision_tower.``, ``mm_projector.``). Such a family names its text family in ``TEXT_FAMILY`` (its
rows are used) and every one of its checkpoint names carries the prefix; ``vision_tensor`` tells what loading skips.

Reference: spec ``kimi_linear.md`` §2 (official tensor names), ``kimi_k2_and_quantization.md`` §2.6 (K2 names), §5
(mlx-lm layout); mlx-lm 0.32.2 ``models/kimi_linear.py``, ``kimi_k3.py`` and ``deepseek_v3.py`` ``sanitize``;
transformers 5 ``save_pretrained`` (which writes a dense first layer under ``block_sparse_moe.``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

KIMI_LINEAR, KIMI_K2, KIMI_K3, KIMI_K25 = "kimi_linear", "kimi_k2", "kimi_k3", "kimi_k25"
# multimodal wrapper family -> the family of its text model, whose rows it uses under WRAPPER_PREFIX
TEXT_FAMILY = {KIMI_K3: KIMI_LINEAR, KIMI_K25: KIMI_K2}
WRAPPER_PREFIX = "language_model."
_VISION = re.compile(r"(vision_tower|vision_model|mm_projector|multi_modal_projector)\.")
HF, MLX = "hf", "mlx"
PER_EXPERT = ("gate", "up", "down")  # placements whose checkpoint tensor is one expert (``{E}`` in the name)

_SLOTS = {
    "L": r"model\.layers\.\d+",  # a decoder layer
    "E": r"\d+",  # an expert index
    "P": r"gate_proj|up_proj|down_proj",  # a dense SwiGLU projection
    "S": r"|_scale_inv",  # an FP8 block scale rides with its weight
    "X": r"[qkv]",  # a KDA short convolution
    "H": r"embed_q|unembed_out",  # mlx-lm's per-head halves of kv_b_proj
    "W": r"\w+",  # one name component
    "R": r".+",  # the rest of the name
}


@dataclass(frozen=True)
class Rule:
    checkpoint: str
    parameter: str
    placement: str
    family: str
    layout: str
    read_only: bool = False  # accepted when loading, never written

    def _compile(self, template: str) -> re.Pattern:
        parts = re.split(r"\{(\w)\}", template)  # literal, slot, literal, slot, ...
        return re.compile("".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_SLOTS[p]})"
                                  for i, p in enumerate(parts)))

    def __post_init__(self):
        object.__setattr__(self, "_ckpt_re", self._compile(self.checkpoint))
        object.__setattr__(self, "_param_re", self._compile(self.parameter))


def _mlx_experts(fam: str, moe: str) -> list[Rule]:
    """mlx-lm's ``switch_mlp``: each projection stacked over experts, packed ones with ``.scales`` / ``.biases``
    (``moe``: the MoE block holding ``experts`` in kimi-lm's parameter names)."""
    rules = []
    for proj, stacked, placement in (("gate", "gate_up_proj", "gate_all"), ("up", "gate_up_proj", "up_all"),
                                     ("down", "down_proj", "copy")):
        for part, suffix in (("weight", ""), ("scales", "_scales"), ("biases", "_biases")):
            rules.append(Rule(f"{{L}}.mlp.switch_mlp.{proj}_proj.{part}", f"{{L}}.{moe}.experts.{stacked}{suffix}",
                              placement, fam, MLX))
    return rules


def _compressed_tensors() -> list[Rule]:
    """compressed-tensors packed weights (``kimi_lm.quant.compressed_tensors``), read as MLX ``weight`` / ``scales``:
    per-expert ones (K2-Thinking ``mlp.experts.E.*_proj``, K3 ``block_sparse_moe.experts.E.w*``) into the stacked
    ``*_proj`` / ``*_proj_scales``, any other Linear's as its own. ``weight_shape`` is checked there, never loaded."""
    rules = []
    for fam, experts, projs in ((KIMI_K2, "mlp.experts", ("gate_proj", "up_proj", "down_proj")),
                                (KIMI_LINEAR, "block_sparse_moe.experts", ("w1", "w3", "w2"))):
        for proj, placement in zip(projs, ("gate", "up", "down")):
            stacked = "down_proj" if placement == "down" else "gate_up_proj"
            for part, suffix in (("weight_packed", ""), ("weight_scale", "_scales")):
                rules.append(Rule(f"{{L}}.{experts}.{{E}}.{proj}.{part}", f"{{L}}.{experts}.{stacked}{suffix}",
                                  placement, fam, HF, read_only=True))
        rules += [Rule("{R}.weight_packed", "{R}.weight", "copy", fam, HF, read_only=True),
                  Rule("{R}.weight_scale", "{R}.scales", "copy", fam, HF, read_only=True)]
    return rules


RULES: list[Rule] = [
    # Kimi Linear, official names: per-expert w1 (gate), w3 (up), w2 (down) stacked into two parameters
    Rule("{L}.block_sparse_moe.experts.{E}.w1.weight", "{L}.block_sparse_moe.experts.gate_up_proj", "gate",
         KIMI_LINEAR, HF),
    Rule("{L}.block_sparse_moe.experts.{E}.w3.weight", "{L}.block_sparse_moe.experts.gate_up_proj", "up",
         KIMI_LINEAR, HF),
    Rule("{L}.block_sparse_moe.experts.{E}.w2.weight", "{L}.block_sparse_moe.experts.down_proj", "down",
         KIMI_LINEAR, HF),
    # transformers' save_pretrained renames every `mlp.` to `block_sparse_moe.`, the dense first layer included
    Rule("{L}.block_sparse_moe.{P}.weight", "{L}.mlp.{P}.weight", "copy", KIMI_LINEAR, HF, read_only=True),
    # Kimi K2 / DeepSeek-V3 routed experts, with their FP8 block scales
    Rule("{L}.mlp.experts.{E}.gate_proj.weight{S}", "{L}.mlp.experts.gate_up_proj{S}", "gate", KIMI_K2, HF),
    Rule("{L}.mlp.experts.{E}.up_proj.weight{S}", "{L}.mlp.experts.gate_up_proj{S}", "up", KIMI_K2, HF),
    Rule("{L}.mlp.experts.{E}.down_proj.weight{S}", "{L}.mlp.experts.down_proj{S}", "down", KIMI_K2, HF),
    *_compressed_tensors(),
    # Kimi Linear (and K3) in mlx-lm's layout: the MoE block under `mlp.`, convs as MLX Conv1d, kv_b_proj split per
    # head, K3's latent projections and norm under `mlp.` too
    *_mlx_experts(KIMI_LINEAR, "block_sparse_moe"),
    Rule("{L}.mlp.e_score_correction_bias", "{L}.block_sparse_moe.gate.e_score_correction_bias", "copy",
         KIMI_LINEAR, MLX),
    Rule("{L}.mlp.gate.{W}", "{L}.block_sparse_moe.gate.{W}", "copy", KIMI_LINEAR, MLX),
    Rule("{L}.mlp.shared_experts.{R}", "{L}.block_sparse_moe.shared_experts.{R}", "copy", KIMI_LINEAR, MLX),
    Rule("{L}.self_attn.{X}_conv.conv.weight", "{L}.self_attn.{X}_conv1d.weight", "conv", KIMI_LINEAR, MLX),
    Rule("{L}.self_attn.{H}.{W}", "{L}.self_attn.kv_b_proj.{H}.{W}", "copy", KIMI_LINEAR, MLX),
    Rule("{L}.mlp.routed_expert_{R}", "{L}.block_sparse_moe.routed_expert_{R}", "copy", KIMI_LINEAR, MLX),
    # Kimi K2 / DeepSeek-V3 in mlx-lm's layout (deepseek_v3.sanitize): experts stacked, kv_b_proj split per head
    *_mlx_experts(KIMI_K2, "mlp"),
    Rule("{L}.self_attn.{H}.{W}", "{L}.self_attn.kv_b_proj.{H}.{W}", "copy", KIMI_K2, MLX),
]
# mlx-lm's fused KDA tensors (kimi_k3.sanitize): name -> its three row thirds, under the unfused MLX names
FUSED = [(re.compile(r"(.*\.self_attn\.)qkv_proj\.(weight|scales|biases)"), "{0}{p}_proj.{1}"),
         (re.compile(r"(.*\.self_attn\.)qkv_conv\.conv\.weight"), "{0}{p}_conv.conv.weight")]


def fused_parts(name: str) -> list[str] | None:
    """The q, k and v tensor names a fused mlx-lm tensor holds (row thirds, in that order), or None."""
    for pattern, part in FUSED:
        if m := pattern.fullmatch(name):
            return [part.format(*m.groups(), p=p) for p in "qkv"]
    return None


def fused_name(part: str) -> str | None:
    """The fused mlx-lm tensor a q/k/v projection or convolution goes into (the inverse of ``fused_parts``)."""
    m = re.fullmatch(r"(.*\.self_attn\.)[qkv]_(proj\.(?:weight|scales|biases)|conv\.conv\.weight)", part)
    return None if m is None else f"{m[1]}qkv_{m[2]}"


# Tensors some checkpoints carry that the forward pass does not need.
SKIP = [re.compile(r".*\.rotary_emb\.inv_freq$")]
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def family(config) -> str:
    """The table's family of a config: Kimi K2 / DeepSeek-V3, Kimi Linear or a multimodal wrapper (``TEXT_FAMILY``)."""
    if config.model_type in (KIMI_LINEAR, *TEXT_FAMILY):
        return config.model_type
    return KIMI_K2


def vision_tensor(name: str, fam: str) -> bool:
    """True for a multimodal wrapper's vision tensors (text-only loading skips them)."""
    return fam in TEXT_FAMILY and _VISION.match(name) is not None


def to_parameter(name: str, fam: str) -> tuple[str, str, int]:
    """Checkpoint tensor name (any layout of the family) -> (parameter name, placement, expert index or -1).
    A wrapper family's names must carry ``WRAPPER_PREFIX``; one without it comes back unchanged, prefixed with "?"
    (no parameter has such a name, so the loader reports it as unexpected)."""
    if fam in TEXT_FAMILY:
        if not name.startswith(WRAPPER_PREFIX):
            return "?" + name, "copy", -1
        name, fam = name.removeprefix(WRAPPER_PREFIX), TEXT_FAMILY[fam]
    for rule in RULES:
        if rule.family == fam and (m := rule._ckpt_re.fullmatch(name)):
            expert = int(m.group("E")) if rule.placement in PER_EXPERT else -1
            return rule.parameter.format(**m.groupdict()), rule.placement, expert
    return name, "copy", -1


def to_checkpoint(param: str, fam: str, layout: str = HF) -> list[tuple[str, str]]:
    """Parameter name -> [(checkpoint name, placement)] in ``layout``; per-expert names keep ``{E}`` to be filled
    with the expert index (``name.format(E=e)``). A stacked gate_up_proj gives two entries (gate, then up)."""
    if fam in TEXT_FAMILY:
        return [(WRAPPER_PREFIX + name, p) for name, p in to_checkpoint(param, TEXT_FAMILY[fam], layout)]
    out = []
    for rule in RULES:
        if rule.family == fam and rule.layout == layout and not rule.read_only and (m := rule._param_re.fullmatch(param)):
            if out and out[0][1] not in ("gate", "gate_all"):
                break  # a parameter has one checkpoint tensor, except gate_up_proj's two halves
            out.append((rule.checkpoint.format(**m.groupdict(), E="{E}"), rule.placement))
    return out or [(param, "copy")]


def skipped(name: str, config) -> bool:
    """True for checkpoint tensors loading drops (``SKIP``, multi-token-prediction layers, a wrapper's vision
    tensors)."""
    if vision_tensor(name, family(config)):
        return True
    name = name.removeprefix(WRAPPER_PREFIX) if family(config) in TEXT_FAMILY else name
    if any(p.fullmatch(name) for p in SKIP):
        return True
    m = _LAYER.match(name)  # multi-token-prediction layers follow the last decoder layer
    n, extra = config.num_hidden_layers, config.num_nextn_predict_layers
    return m is not None and n <= int(m.group(1)) < n + extra


# ---- placements: where a checkpoint tensor sits in its parameter ------------------------------------------------
def expert_shape(stacked_shape, placement: str) -> list[int]:
    """One expert's matrix of a stacked [E, 2I, hidden] gate_up_proj (gate or up half) or [E, hidden, I] down_proj."""
    if placement == "down":
        return list(stacked_shape[1:])
    return [stacked_shape[1] // 2, stacked_shape[2]]


def checkpoint_shape(param_shape, placement: str) -> list[int]:
    """The shape the checkpoint stores for one ``placement`` into a parameter of ``param_shape``."""
    if placement == "copy":
        return list(param_shape)
    if placement == "conv":
        return [param_shape[0], param_shape[2], param_shape[1]]
    if placement in ("gate_all", "up_all"):
        return [param_shape[0], param_shape[1] // 2, *param_shape[2:]]
    return expert_shape(param_shape, placement)


def expert_slice(stacked: torch.Tensor, placement: str, expert: int) -> torch.Tensor:
    """The view of ``stacked`` a gate / up / down (one expert) or gate_all / up_all (every expert) tensor fills."""
    half = stacked.shape[1] // 2
    if placement in ("gate_all", "up_all"):
        return stacked[:, :half] if placement == "gate_all" else stacked[:, half:]
    if placement == "gate":
        return stacked[expert, :half]
    if placement == "up":
        return stacked[expert, half:]
    return stacked[expert]
