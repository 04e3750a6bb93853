"""Modules that keep MLX-packed weights (affine 2–8 bit, MXFP4, MXFP8, NVFP4) and dequantize tile by tile in forward.

A quantized module stores exactly what the MLX checkpoint stores, under the same names: ``weight`` (uint32 codes),
``scales`` and, for affine, ``biases``. ``QuantSpec`` (mode, bits, group size) says how to read them; it comes from the
checkpoint's ``config["quantization"]`` (per-module override dict, missing mode = affine) or, for modules the config
does not name, from the packed shapes, exactly as mlx-lm's ``load_model`` / ``infer_quant_config`` decide.

Notable features:
* ``PackedLinear`` (also the router's logits), ``PackedEmbedding`` (dequantizes only the looked-up rows),
  ``PackedStackedExperts`` (dequantizes only the experts a batch uses, one at a time) and ``SplitKVB`` (MLA's
  ``kv_b_proj`` as mlx-lm stores it: per-head ``embed_q`` [H, latent, nope] and ``unembed_out`` [H, v, latent]).
* Forward never materializes the float model: a linear dequantizes ~4M weights at a time (``TILE_ELEMENTS``).
* ``swap_modules`` is the module swap the loader and ``kimi-lm convert`` use; the per-format codecs (and their
  reference oracles) are in ``affine.py``, ``mxfp4.py``, ``mxfp8.py`` and ``nvfp4.py``.

Reference: mlx ``nn.QuantizedLinear`` / ``QuantizedEmbedding`` / ``SwitchLinear``; mlx-lm ``models/mla.py``
(``MultiLinear``), ``models/kimi_linear.py`` (``sanitize``); spec ``kimi_k2_and_quantization.md`` §5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kimi_lm.model.kimi_k3 import SiTUExperts
from kimi_lm.model.moe import StackedExperts, TopkRouter
from kimi_lm.quant import affine, int4_cpu, mxfp4, mxfp8, nvfp4

TILE_ELEMENTS = 1 << 22  # weights dequantized at once in forward (16 MiB as fp32)
# the float-code modes: each allows exactly one (bits, group size), has uint8 scales and no biases
FP_CODECS = {"mxfp4": mxfp4, "mxfp8": mxfp8, "nvfp4": nvfp4}
MODES = ("affine", *FP_CODECS)


@dataclass(frozen=True)
class QuantSpec:
    mode: str = "affine"
    bits: int = 4
    group_size: int = 64

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "QuantSpec":
        """A ``config["quantization"]`` entry; mlx's ``to_quantized`` defaults the mode to affine."""
        if isinstance(d, dict) and d.get("global_scale"):
            # mlx-lm's nvfp4 per-expert tensor scale: an extra tensor and a different dequantization
            raise ValueError(f"{where}: 'global_scale' (an nvfp4 per-tensor scale) is not supported")
        try:
            spec = cls(d.get("mode", "affine"), int(d["bits"]), int(d["group_size"]))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ValueError(f"{where}: expected {{'group_size': int, 'bits': int, 'mode'?: str}}, found {d!r}") from None
        return spec.checked(where)

    def checked(self, where: str) -> "QuantSpec":
        if self.mode in FP_CODECS:
            codec = FP_CODECS[self.mode]
            if (self.bits, self.group_size) != (codec.BITS, codec.GROUP):
                raise ValueError(f"{where}: {self.mode} needs bits {codec.BITS} and group size {codec.GROUP}; "
                                 f"found {self.bits}, {self.group_size}")
        elif self.mode == "affine":
            affine.check(self.bits, self.group_size, where)
        else:
            raise ValueError(f"{where}: quantization mode {self.mode!r} is not supported; expected one of {MODES}")
        return self

    @property
    def has_biases(self) -> bool:
        return self.mode == "affine"

    def to_dict(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """W [..., K] -> (weight, scales[, biases]) as mx.quantize returns them."""
        if self.mode in FP_CODECS:
            return FP_CODECS[self.mode].quantize(w)
        return affine.quantize(w, self.bits, self.group_size)

    def dequantize(self, q, scales, biases, dtype) -> torch.Tensor:
        if self.mode in FP_CODECS:
            return FP_CODECS[self.mode].dequantize(q, scales, dtype)
        return affine.dequantize(q, scales, biases, self.bits, self.group_size, dtype)

    def dequantize_reference(self, q, scales, biases, dtype) -> torch.Tensor:
        if self.mode in FP_CODECS:
            return FP_CODECS[self.mode].dequantize_reference(q, scales, dtype)
        return affine.dequantize_reference(q, scales, biases, self.bits, self.group_size, dtype)


def infer_spec(weight_shape, scales_shape, scales_is_uint8: bool, in_features: int, where: str) -> QuantSpec:
    """mlx-lm's ``infer_quant_config``: group and bits from the packed shapes; uint8 scales mean a float-code mode,
    told apart by its one allowed (bits, group size)."""
    if not weight_shape or not scales_shape or scales_shape[-1] == 0 or in_features % scales_shape[-1]:
        raise ValueError(f"{where}: scales of shape {list(scales_shape)} do not divide {in_features} input features")
    group, bits = in_features // scales_shape[-1], weight_shape[-1] * 32 // in_features
    mode = "affine"
    if scales_is_uint8:
        by_shape = {(c.BITS, c.GROUP): m for m, c in FP_CODECS.items()}
        if (bits, group) not in by_shape:
            raise ValueError(f"{where}: uint8 scales with {bits} bits and group size {group} match no quantization "
                             f"mode (mxfp4 4/32, mxfp8 8/32, nvfp4 4/16)")
        mode = by_shape[bits, group]
    return QuantSpec(mode, bits, group).checked(where)


def _register_packed(module: nn.Module, prefix: str, shape: tuple[int, ...], spec: QuantSpec, dtype) -> None:
    """Buffers ``{prefix}`` (uint32 [..., K·b/32]), ``{prefix}scales`` and ``{prefix}biases`` for a float [..., K]."""
    *lead, K = shape
    if K % spec.group_size:
        raise ValueError(f"input width {K} is not a multiple of the group size {spec.group_size}")
    scale_dtype = dtype if spec.has_biases else torch.uint8
    module.register_buffer(prefix or "weight", torch.zeros(*lead, K * spec.bits // 32, dtype=torch.uint32))
    module.register_buffer(f"{prefix}{'_' if prefix else ''}scales", torch.zeros(*lead, K // spec.group_size, dtype=scale_dtype))
    if spec.has_biases:
        module.register_buffer(f"{prefix}{'_' if prefix else ''}biases", torch.zeros(*lead, K // spec.group_size, dtype=dtype))


def _fill(module: nn.Module, prefix: str, spec: QuantSpec, w: torch.Tensor) -> None:
    names = [prefix or "weight"] + [f"{prefix}{'_' if prefix else ''}{n}" for n in ("scales", "biases")]
    for name, t in zip(names, spec.quantize(w.detach())):
        setattr(module, name, t)


def packed_linear(x: torch.Tensor, spec: QuantSpec, q, scales, biases) -> torch.Tensor:
    """y = x Wᵀ with W dequantized one row tile at a time into x's dtype. q [out, in·b/32] -> y [..., out]."""
    out_f, in_f = q.shape[0], scales.shape[-1] * spec.group_size
    rows = max(1, TILE_ELEMENTS // in_f)
    if rows >= out_f:
        return F.linear(x, spec.dequantize(q, scales, biases, x.dtype))
    y = x.new_empty(*x.shape[:-1], out_f)
    for r0 in range(0, out_f, rows):
        r = slice(r0, r0 + rows)
        y[..., r] = F.linear(x, spec.dequantize(q[r], scales[r], None if biases is None else biases[r], x.dtype))
    return y


class PackedLinear(nn.Module):
    """Drop-in for a bias-free ``nn.Linear`` (MLX ``QuantizedLinear``); state: weight, scales[, biases]."""

    def __init__(self, in_features: int, out_features: int, spec: QuantSpec, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.spec = in_features, out_features, spec
        _register_packed(self, "", (out_features, in_features), spec, dtype)

    @classmethod
    def from_float(cls, linear: nn.Linear, spec: QuantSpec) -> "PackedLinear":
        module = cls(linear.in_features, linear.out_features, spec, linear.weight.dtype)
        _fill(module, "", spec, linear.weight)
        return module

    int4 = False  # codes held in PyTorch's CPU int4 kernel layout (``use_int4_kernel``)

    def mlx_weight(self) -> torch.Tensor:
        """The codes in MLX's uint32 packing, whichever layout the module holds them in."""
        return int4_cpu.mlx_codes(self.weight, self.out_features, self.in_features) if self.int4 else self.weight

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.spec.dequantize(self.mlx_weight(), self.scales, getattr(self, "biases", None), dtype)

    def use_int4_kernel(self) -> bool:
        """Affine 4-bit on CPU: move the codes into the int4 kernel's layout (same bytes); False if not applicable."""
        s = self.spec
        if self.int4 or s.mode != "affine" or self.weight.device.type != "cpu" or not int4_cpu.supported(
                s.bits, s.group_size, self.out_features, self.in_features):
            return False
        self.weight, scales_zeros = int4_cpu.to_kernel(self.weight, self.scales, self.biases, self.scales.dtype)
        self.register_buffer("scales_zeros", scales_zeros, persistent=False)
        self.int4 = True
        return True

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.int4:  # state dicts always carry the MLX packing the checkpoint had
            destination[prefix + "weight"] = self.mlx_weight()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int4:
            return int4_cpu.matmul(x, self.weight, self.scales_zeros, self.spec.group_size)
        return packed_linear(x, self.spec, self.weight, self.scales, getattr(self, "biases", None))

    def extra_repr(self) -> str:
        s = self.spec
        return f"in_features={self.in_features}, out_features={self.out_features}, {s.mode} {s.bits}-bit g{s.group_size}"


class PackedRouter(TopkRouter):
    """``TopkRouter`` whose E×hidden logits weight is packed (mlx-lm: ``mlp.gate`` at affine 8-bit, group 64)."""

    def __init__(self, router: TopkRouter, spec: QuantSpec, dtype=torch.float32):
        nn.Module.__init__(self)  # not TopkRouter.__init__: that would allocate a float weight
        self.__dict__.update({k: v for k, v in router.__dict__.items() if not k.startswith("_")})
        self.spec = spec
        E, hidden = router.weight.shape
        _register_packed(self, "", (E, hidden), spec, dtype)
        self.register_buffer("e_score_correction_bias", router.e_score_correction_bias)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x.float(), self.spec, self.weight, self.scales, getattr(self, "biases", None))


class PackedEmbedding(nn.Module):
    """Drop-in for ``nn.Embedding`` (MLX ``QuantizedEmbedding``): only the looked-up rows are dequantized."""

    def __init__(self, num_embeddings: int, embedding_dim: int, spec: QuantSpec, dtype=torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.spec, self.dtype = num_embeddings, embedding_dim, spec, dtype
        _register_packed(self, "", (num_embeddings, embedding_dim), spec, dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        biases = getattr(self, "biases", None)
        rows = self.spec.dequantize(self.weight[ids], self.scales[ids], None if biases is None else biases[ids],
                                    self.scales.dtype if self.spec.has_biases else self.dtype)
        return rows


class PackedStackedExperts(StackedExperts):
    """``StackedExperts`` with packed weights: ``gate_up_proj`` [E, 2I, hidden·b/32] (mlx's ``switch_mlp.gate_proj``
    rows then ``up_proj`` rows), ``down_proj`` [E, hidden, I·b/32], each with ``*_scales`` [``*_biases``].
    Only the experts a batch routes to are dequantized, one at a time."""

    def will_need(self, counts: list[int]) -> None:
        """Read-ahead of the experts ``counts`` routes rows to: nothing for experts in memory (memory-mapped ones
        that page, ``kimi_lm.mapped.SplitPackedExperts``, ask the kernel for them)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, gate_up: QuantSpec,
                 down: QuantSpec, dtype=torch.float32):
        nn.Module.__init__(self)  # not StackedExperts.__init__: that would allocate float weights
        self.intermediate_size, self.gate_up_spec, self.down_spec = intermediate_size, gate_up, down
        E, I = num_experts, intermediate_size
        _register_packed(self, "gate_up_proj", (E, 2 * I, hidden_size), gate_up, dtype)
        _register_packed(self, "down_proj", (E, hidden_size, I), down, dtype)

    int4 = False  # codes held in PyTorch's CPU int4 kernel layout (``use_int4_kernel``)

    def _part(self, name: str, spec: QuantSpec, e: int):
        biases = getattr(self, f"{name}_biases", None)
        return spec, getattr(self, name)[e], getattr(self, f"{name}_scales")[e], None if biases is None else biases[e]

    def _shape(self, name: str) -> tuple[int, int]:
        """(out, in) features of one expert's ``name`` matrix."""
        scales, spec = getattr(self, f"{name}_scales"), self.gate_up_spec if name == "gate_up_proj" else self.down_spec
        return scales.shape[1], scales.shape[2] * spec.group_size

    def use_int4_kernel(self) -> bool:
        """Affine 4-bit on CPU: every expert's codes into the int4 kernel's layout; False if not applicable."""
        parts = (("gate_up_proj", self.gate_up_spec), ("down_proj", self.down_spec))
        if self.int4 or getattr(self, "gate_up_proj").device.type != "cpu" or not all(
                spec.mode == "affine" and int4_cpu.supported(spec.bits, spec.group_size, *self._shape(name))
                for name, spec in parts):
            return False
        for name, _ in parts:
            q, scales, biases = (getattr(self, name + suffix) for suffix in ("", "_scales", "_biases"))
            converted = [int4_cpu.to_kernel(q[e], scales[e], biases[e], scales.dtype) for e in range(q.shape[0])]
            setattr(self, name, torch.stack([c[0] for c in converted]))
            self.register_buffer(f"{name}_scales_zeros", torch.stack([c[1] for c in converted]), persistent=False)
        self.int4 = True
        return True

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.int4:  # state dicts always carry the MLX packing the checkpoint had
            for name in ("gate_up_proj", "down_proj"):
                packed = getattr(self, name)
                destination[prefix + name] = torch.stack(
                    [int4_cpu.mlx_codes(packed[e], *self._shape(name)) for e in range(packed.shape[0])])

    def _linear(self, name: str, spec: QuantSpec, e: int, x: torch.Tensor) -> torch.Tensor:
        if self.int4:
            return int4_cpu.matmul(x, getattr(self, name)[e], getattr(self, f"{name}_scales_zeros")[e], spec.group_size)
        return packed_linear(x, *self._part(name, spec, e))

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return self._linear("gate_up_proj", self.gate_up_spec, e, x)

    def down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        return self._linear("down_proj", self.down_spec, e, h)


class PackedSiTUExperts(PackedStackedExperts):
    """``PackedStackedExperts`` with Kimi K3's SiTU activation (``SiTUExperts``) in place of SwiGLU: the release's
    MXFP4 experts, or K3 experts quantized by ``kimi-lm convert --quantize``."""

    def __init__(self, experts: SiTUExperts, gate_up: QuantSpec, down: QuantSpec, dtype=torch.float32):
        E, two_i, hidden = experts.gate_up_proj.shape
        super().__init__(E, hidden, two_i // 2, gate_up, down, dtype)
        self.beta, self.linear_beta = experts.beta, experts.linear_beta

    expert = SiTUExperts.expert  # gate_up / down are the packed products above


class MultiLinear(nn.Module):
    """Per-head matrices ``weight`` [H, out, in] (mlx-lm ``MultiLinear``), float or packed along ``in``."""

    def __init__(self, heads: int, out_dim: int, in_dim: int, spec: QuantSpec | None, dtype=torch.float32):
        super().__init__()
        self.spec, self.in_dim = spec, in_dim
        if spec is None:
            self.weight = nn.Parameter(torch.zeros(heads, out_dim, in_dim, dtype=dtype), requires_grad=False)
        else:
            _register_packed(self, "", (heads, out_dim, in_dim), spec, dtype)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        if self.spec is None:
            return self.weight.to(dtype)
        return self.spec.dequantize(self.weight, self.scales, getattr(self, "biases", None), dtype)


class SplitKVB(nn.Module):
    """MLA's ``kv_b_proj`` in mlx-lm's layout: ``embed_q`` [H, latent, nope] (W_UK transposed) and ``unembed_out``
    [H, v, latent] (W_UV). Same call and ``dense_weight`` as the [H·(nope + v), latent] linear it replaces."""

    def __init__(self, heads: int, latent: int, nope: int, v: int, embed_q: QuantSpec | None,
                 unembed_out: QuantSpec | None, dtype=torch.float32):
        super().__init__()
        self.heads, self.latent, self.nope, self.v = heads, latent, nope, v
        self.embed_q = MultiLinear(heads, latent, nope, embed_q, dtype)
        self.unembed_out = MultiLinear(heads, v, latent, unembed_out, dtype)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        wk = self.embed_q.dense(dtype).transpose(1, 2)  # [H, nope, latent]
        return torch.cat([wk, self.unembed_out.dense(dtype)], dim=1).reshape(-1, self.latent)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """c [..., latent] -> [..., H·(nope + v)] (per head: k_nope then v), as ``kv_b_proj(c)``."""
        return F.linear(c, self.dense_weight(c.dtype))  # ≤ H·(nope+v)·latent weights: one tile


def swap_modules(model: nn.Module, specs: dict[str, QuantSpec], split_kvb: set[str] = frozenset(),
                 pack: bool = False, dtype=torch.float32) -> list[str]:
    """Swap modules for packed ones. ``specs`` keys: a Linear / Embedding / router name, ``<experts>.gate_up_proj`` and
    ``<experts>.down_proj``, ``<attn>.kv_b_proj.embed_q`` / ``.unembed_out``. ``split_kvb``: ``kv_b_proj`` modules to
    hold in mlx-lm's split layout (float or packed). ``pack``: quantize current weights (else empty, to be loaded)."""
    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name in split_kvb:
            H = model.get_submodule(name.rpartition(".")[0]).num_heads
            attn = model.get_submodule(name.rpartition(".")[0])
            new = SplitKVB(H, module.in_features, attn.nope_dim, attn.v_dim, specs.get(f"{name}.embed_q"),
                           specs.get(f"{name}.unembed_out"), dtype)
            if pack:
                w = module.weight.detach().view(H, attn.nope_dim + attn.v_dim, -1)
                for sub, t in (("embed_q", w[:, : attn.nope_dim].transpose(1, 2)), ("unembed_out", w[:, attn.nope_dim :])):
                    target = getattr(new, sub)
                    if target.spec is None:
                        target.weight.data = t.contiguous()
                    else:
                        _fill(target, "", target.spec, t.contiguous())
        elif name not in specs and not (isinstance(module, StackedExperts) and f"{name}.gate_up_proj" in specs):
            continue
        elif type(module) is nn.Linear:
            new = (PackedLinear.from_float(module, specs[name]) if pack
                   else PackedLinear(module.in_features, module.out_features, specs[name], dtype))
        elif type(module) is nn.Embedding:
            new = PackedEmbedding(module.num_embeddings, module.embedding_dim, specs[name], dtype)
            if pack:
                _fill(new, "", specs[name], module.weight)
        elif type(module) is TopkRouter:
            new = PackedRouter(module, specs[name], dtype)
            if pack:
                _fill(new, "", specs[name], module.weight)
        elif type(module) in (StackedExperts, SiTUExperts):
            E, two_i, hidden = module.gate_up_proj.shape
            new = (PackedStackedExperts(E, hidden, two_i // 2, specs[f"{name}.gate_up_proj"], specs[f"{name}.down_proj"],
                                        dtype) if type(module) is StackedExperts else
                   PackedSiTUExperts(module, specs[f"{name}.gate_up_proj"], specs[f"{name}.down_proj"], dtype))
            if pack:
                _fill(new, "gate_up_proj", new.gate_up_spec, module.gate_up_proj)
                _fill(new, "down_proj", new.down_spec, module.down_proj)
        else:
            raise ValueError(f"module {name!r} ({type(module).__name__}) cannot be quantized in the MLX layout")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        swapped.append(name)
    return swapped


def use_int4_kernels(model: nn.Module) -> int:
    """Put every eligible packed module (affine 4-bit, CPU) on PyTorch's int4 kernel; returns how many moved.

    ``kv_b_proj`` stays in MLX's packing: absorbed MLA reads its dense weight, not its matmul."""
    return sum(m.use_int4_kernel() for name, m in model.named_modules()
               if isinstance(m, (PackedLinear, PackedStackedExperts)) and not name.endswith("kv_b_proj"))
