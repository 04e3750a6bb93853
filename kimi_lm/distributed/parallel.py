"""``--tp`` / ``--ep``: tensor- and expert-parallel inference, applied to a built model from outside.

torchtitan's ``parallelize`` habit: ``kimi_lm/model`` stays single-device and never imports this; :func:`parallelize`
walks a built model (plain modules, on the meta device before loading or with real weights) and keeps on this rank
only its slice of each split parameter. One rank per process, one process group (all ranks), plain all-reduces:

    MLA  (per head)      q_proj | q_b_proj, kv_b_proj, K3 g_proj: rows of this rank's heads (column-parallel);
                         o_proj: their columns (row-parallel) + all-reduce. q_a_proj, kv_a_proj_with_mqa, the norms:
                         replicated, so the latent cache [ĉ | k_pe] is the same on every rank (each rank keeps it).
    KDA  (per head)      q/k/v_proj, their short convs, f_b_proj, A_log, dt_bias, b_proj, g_b_proj | K3 g_proj: this
                         rank's heads; o_proj row-parallel + all-reduce; f_a_proj, g_a_proj, o_norm replicated. The
                         recurrent state and conv tails (KDACache) hold this rank's heads only.
    dense MLP and        gate_proj, up_proj: rows (column-parallel); down_proj: columns + all-reduce.
    shared experts
    routed experts       --ep N: experts [r·E/N, (r+1)·E/N) on rank r; every rank runs its experts' share for all
                         tokens (routing is replicated, so all ranks agree on it) and an fp32 all-reduce sums them.
                         --tp N without --ep: each expert's intermediate size split as a dense MLP is.
    replicated           embeddings, lm_head, final norm, routers, Block AttnRes projections, K3 latent-MoE
                         down/up projections and norm.

FP8-block weights (Kimi K2's release format, ``kimi_lm.quant.fp8_block``) split with their 128×128 block scales,
at block boundaries only (:func:`check_blocks`): K2 splits 8 ways (a rank's q_b rows are 8 heads × 192 = 12 blocks).
Packed weights (``kimi_lm.quant.packed``: MLX-quantized modules, compressed-tensors INT4 / MXFP4 experts) split with
their scales [and biases]: rows freely (a row's groups stay together), input columns only at whole quantization
groups (:func:`check_groups`: K2-Thinking's INT4 experts, 2048 down_proj columns in groups of 32, split up to 64
ways); mlx-lm's split ``kv_b_proj`` (``embed_q`` / ``unembed_out``, [H, ...]) by head; under ``--ep`` whole experts.

Rank r holds heads [r·H/N, (r+1)·H/N) of every split layer. ``--tp`` and ``--ep`` are each 1 or the world size;
both at N split attention and dense products by head / column and routed experts by expert, over the same ranks.
Sums over ranks run in a different order than one process's (fp32: ~1e-6 relative; the greedy tokens agree).
Each rank feeds the same tokens: the model's forward broadcasts ``input_ids`` from rank 0 first, so ranks follow
rank 0's choices.

A split model runs these plain modules: the CPU backend (``kimi_lm.cpu.prepare``) is not applied, since its fused
modules compute what a whole layer does and would skip the all-reduces.

References: Megatron-LM (column/row-parallel linear layers, arXiv:1909.08053); torchtitan ``parallelize``;
PyTorch FSDP2's ``fully_shard`` (the class swap that keeps parameter names: ``module.__class__`` gains a mixin).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from kimi_lm.errors import UsageError
from kimi_lm.model.kda import KimiDeltaAttention
from kimi_lm.model.mla import MultiheadLatentAttention
from kimi_lm.model.moe import StackedExperts
from kimi_lm.quant.packed import SplitKVB


@dataclass(frozen=True)
class Plan:
    """How this process's model is split: ``tp`` / ``ep`` ways (each 1 or ``size``), this process being ``rank``."""
    tp: int = 1
    ep: int = 1
    rank: int = 0

    @property
    def size(self) -> int:
        return max(self.tp, self.ep)


@dataclass(frozen=True)
class Shard:
    """This rank's part of a parameter: along ``dim``, part ``index`` of ``parts`` equal contiguous parts. ``halves``:
    the dim holds two halves (gate | up of stacked experts), each split so. ``used``: only the first ``used`` entries
    along ``dim`` are real (Kimi K3's ``A_log`` is zero-padded to the head dim); the padding is dropped."""
    dim: int
    parts: int
    index: int
    halves: bool = False
    used: int | None = None

    def local_size(self, full: int) -> int:
        return (self.used if self.used is not None else full) // self.parts

    def local_shape(self, shape) -> list[int]:
        shape = list(shape)
        shape[self.dim] = self.local_size(shape[self.dim])
        return shape

    def take(self, t: torch.Tensor, dim: int | None = None) -> torch.Tensor:
        """This rank's part of the full tensor ``t`` (a view, or a copy with ``halves``); ``dim`` overrides ``dim``
        (a per-expert tensor lacks the stacked parameter's leading expert dim)."""
        dim = self.dim if dim is None else dim
        if self.used is not None:
            t = t.narrow(dim, 0, self.used)
        if self.halves:
            return torch.cat([Shard(dim, self.parts, self.index).take(h) for h in t.chunk(2, dim)], dim)
        n = t.shape[dim] // self.parts
        return t.narrow(dim, self.index * n, n)


# ---- what divides by what ----------------------------------------------------------------------------------------
def requirements(model: nn.Module, plan: Plan) -> list[tuple[str, str, int]]:
    """(flag, what, size) for every size the plan splits: each must divide by its flag's value."""
    out = set()
    for module in model.modules():
        if plan.tp > 1 and isinstance(module, MultiheadLatentAttention):
            out.add(("--tp", "MLA heads (num_attention_heads)", module.num_heads))
        elif plan.tp > 1 and isinstance(module, KimiDeltaAttention):
            out.add(("--tp", "KDA heads (linear_attn_config.num_heads)", module.num_heads))
        elif plan.tp > 1 and _is_mlp(module):
            out.add(("--tp", "dense MLP / shared-expert intermediate size", module.gate_proj.weight.shape[0]))
        elif isinstance(module, StackedExperts):
            if plan.ep > 1:
                out.add(("--ep", "routed experts (num_experts)", module.num_experts))
            elif plan.tp > 1:
                out.add(("--tp", "routed-expert intermediate size (moe_intermediate_size)", module.intermediate_size))
    return sorted(out)


def check(model: nn.Module, plan: Plan) -> None:
    """Raise one UsageError naming every size that the plan's ``--tp`` / ``--ep`` does not divide."""
    bad = [(flag, what, n) for flag, what, n in requirements(model, plan)
           if n % (plan.tp if flag == "--tp" else plan.ep)]
    if bad:
        flag = bad[0][0]
        value = plan.tp if flag == "--tp" else plan.ep
        by_what: dict[str, list[str]] = {}
        for _, what, n in bad:
            by_what.setdefault(what, []).append(str(n))
        sizes = "; ".join(f"{what} = {', '.join(ns)}" for what, ns in by_what.items())
        raise UsageError(f"{flag} {value}: this model cannot be split {value} ways: {sizes} must be divisible by "
                         f"{flag} (choose a {flag} that divides every one of them)")


def _is_mlp(module: nn.Module) -> bool:
    """A dense SwiGLU / SiTU MLP (the first layers' FFN, shared experts): gate_proj, up_proj, down_proj Linears."""
    return all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")) and \
        not isinstance(module, StackedExperts)


# ---- the plan per parameter -----------------------------------------------------------------------------------------
def shard_specs(model: nn.Module, plan: Plan) -> dict[str, Shard]:
    """Parameter name -> this rank's :class:`Shard`, for every parameter the plan splits (the rest is replicated).
    Read off the unsplit model."""
    specs: dict[str, Shard] = {}
    tp, r = plan.tp, plan.rank

    def add(prefix: str, names: list[str], dim: int, parts: int, **kw) -> None:
        for n in names:
            specs[f"{prefix}{n}"] = Shard(dim, parts, r, **kw)

    for name, m in model.named_modules():
        p = f"{name}." if name else ""
        if tp > 1 and isinstance(m, MultiheadLatentAttention):
            rows = ["q_proj.weight" if m.q_lora_rank is None else "q_b_proj.weight", "kv_b_proj.weight"]
            add(p, rows + (["g_proj.weight"] if hasattr(m, "g_proj") else []), 0, tp)
            add(p, ["o_proj.weight"], 1, tp)
        elif tp > 1 and isinstance(m, KimiDeltaAttention):
            rows = [f"{x}_proj.weight" for x in "qkv"] + [f"{x}_conv1d.weight" for x in "qkv"]
            rows += ["f_b_proj.weight", "dt_bias", "b_proj.weight"]
            rows += [g for g in ("g_b_proj.weight", "g_proj.weight") if hasattr(m, g.split(".")[0])]
            add(p, rows, 0, tp)
            add(p, ["o_proj.weight"], 1, tp)
            if m.A_log.dim() == 4:  # Kimi Linear: [1, 1, H, 1]
                add(p, ["A_log"], 2, tp)
            else:  # K3: [max(H, K)], the first H real
                add(p, ["A_log"], 0, tp, used=m.num_heads)
        elif tp > 1 and _is_mlp(m):
            add(p, ["gate_proj.weight", "up_proj.weight"], 0, tp)
            add(p, ["down_proj.weight"], 1, tp)
        elif isinstance(m, StackedExperts):
            # (mapped packed experts, kimi_lm.mapped.SplitPackedExperts, hold gate and up apart)
            held = [n for n in ("gate_up_proj", "gate_proj", "up_proj", "down_proj") if n in m._parameters or
                    n in m._buffers]
            if plan.ep > 1:  # whole experts
                add(p, held, 0, plan.ep)
            elif tp > 1:  # each expert's intermediate rows (gate, up) and columns (down)
                add(p, [n for n in held if n == "gate_up_proj"], 1, tp, halves=True)
                add(p, [n for n in held if n in ("gate_proj", "up_proj")], 1, tp)
                add(p, ["down_proj"], 2, tp)
    for name in list(specs):  # mlx-lm's split kv_b_proj (kimi_lm.quant.packed.SplitKVB): both halves by head
        module_name = name.removesuffix(".weight")
        if module_name != name and isinstance(model.get_submodule(module_name), SplitKVB):
            spec = specs.pop(name)
            add(f"{module_name}.", ["embed_q.weight", "unembed_out.weight"], 0, spec.parts)
    held = {n for n, _ in model.named_buffers()} | {n for n, _ in model.named_parameters()}
    for name in list(specs):  # a weight's companions split with it: packed scales [and biases] (whole groups along
        # the input dim, as the codes are), FP8 block scales (kimi_lm.quant.fp8_block: whole blocks)
        stem = name.removesuffix(".weight")
        sep = "." if stem != name else "_"
        for companion in (f"{stem}{sep}scales", f"{stem}{sep}biases", f"{name}_scale_inv"):
            if companion in held:
                specs[companion] = specs[name]
    return specs


def check_blocks(model: nn.Module, specs: dict[str, "Shard"], plan: Plan) -> None:
    """An FP8-block weight splits only at block boundaries: each rank's part of the split dim must be a whole number
    of 128-blocks (each half's, for gate | up), or its block scales would be cut."""
    from kimi_lm.quant.fp8_block import BLOCK

    bad = []
    for name, spec in specs.items():
        weight = model.get_parameter(name.removesuffix("_scale_inv")) if name.endswith("_scale_inv") else None
        if weight is not None and not (weight.dim() == 3 and spec.dim == 0):  # whole experts: no block is cut
            full = weight.shape[spec.dim]
            local = (full // 2 if spec.halves else full) // spec.parts
            if local % BLOCK:
                bad.append(f"{name.removesuffix('_scale_inv')} ({local} of {full // 2 if spec.halves else full})")
    _refuse(plan, bad, lambda flag, value, shown: (
        f"{flag} {value}: FP8-block weights split only at {BLOCK}-row/column block boundaries; this rank's part would "
        f"not be whole blocks for {shown}; choose a smaller {flag} or convert the checkpoint with "
        f"`kimi-lm convert --dequantize`"))


def _refuse(plan: Plan, bad: list[str], message) -> None:
    """One UsageError for the parts a split cannot make (``bad``, up to four named): ``message(flag, value, shown)``
    with the flag that splits them (--tp where tensors split, else --ep)."""
    if bad:
        flag, value = ("--ep", plan.ep) if plan.tp == 1 else ("--tp", plan.tp)
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise UsageError(message(flag, value, shown))


def check_groups(model: nn.Module, specs: dict[str, "Shard"], plan: Plan) -> None:
    """A packed weight (``kimi_lm.quant.packed``: codes with a scale [and bias] per group of input columns) splits its
    input columns (row-parallel products, experts' down_proj) only at whole groups: each rank's share of every row's
    groups must be whole, or a group's scale would be cut."""
    bad = []
    for name, spec in specs.items():
        module_name, _, leaf = name.rpartition(".")
        if leaf not in ("scales", "gate_up_proj_scales", "gate_proj_scales", "up_proj_scales", "down_proj_scales"):
            continue
        groups = getattr(model.get_submodule(module_name), leaf)
        if spec.dim == groups.dim() - 1 and groups.shape[-1] % spec.parts:
            module = model.get_submodule(module_name)
            quant = getattr(module, "spec", None) or getattr(module, f"{leaf.split('_')[0]}_spec", module.gate_up_spec)
            what = module_name if leaf == "scales" else f"{module_name}.{leaf.removesuffix('_scales')}"
            bad.append(f"{what} ({groups.shape[-1]} groups of {quant.group_size} input columns per row)")
    _refuse(plan, bad, lambda flag, value, shown: (
        f"{flag} {value}: packed weights split their input columns only at whole quantization groups, and {shown} "
        f"cannot be split {value} ways; choose a smaller {flag}, add --ep {value} (whole experts), or convert the "
        f"checkpoint with `kimi-lm convert --dequantize`"))


# ---- the modules that sum over ranks ------------------------------------------------------------------------------
class SumOverRanks:
    """Mixin for a module whose output is this rank's partial sum (row-parallel Linear, TP-split experts): the
    forward all-reduces it, so every rank gets the whole."""

    def forward(self, *args, **kwargs):
        y = super().forward(*args, **kwargs)
        dist.all_reduce(y)
        return y


class ExpertShard:
    """Mixin for ``StackedExperts`` holding experts [first, first + E_local) of the model's E: this rank's share of
    Σ_k w_k · expert_k(x) for every token (pairs routed elsewhere contribute 0), summed over ranks in fp32."""

    first_expert = 0

    def forward(self, x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, width], idx / weights [N, k] with global expert ids -> [N, width]."""
        local = idx - self.first_expert
        rows, slots = ((local >= 0) & (local < self.num_experts)).nonzero(as_tuple=True)  # this rank's pairs
        expert = local[rows, slots]
        order = expert.argsort(stable=True)  # grouped by expert, as StackedExperts.forward groups them
        rows, slots = rows[order], slots[order]
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if rows.numel():
            counts = torch.bincount(expert, minlength=self.num_experts).tolist()
            out = torch.cat(self.grouped(F.embedding(rows, x), counts)).float()  # [pairs, width]
            y.index_add_(0, rows, out * weights[rows, slots].unsqueeze(1).float())
        dist.all_reduce(y)
        return y.to(x.dtype)


_CLASSES: dict[tuple[type, type], type] = {}


def _swap_class(module: nn.Module, mixin: type) -> None:
    """Give ``module`` the behaviour of ``mixin`` on top of its own class (its parameters and names unchanged)."""
    cls = type(module)
    if issubclass(cls, mixin):
        return
    key = (mixin, cls)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"{mixin.__name__}{cls.__name__}", (mixin, cls), {})
    module.__class__ = _CLASSES[key]


def _broadcast_input_ids(module, args, kwargs):
    """Forward pre-hook of the whole model: every rank feeds rank 0's tokens (a sampled token included)."""
    ids = args[0] if args else kwargs["input_ids"]
    dist.broadcast(ids, src=0)


def parallelize(model: nn.Module, plan: Plan) -> dict[str, Shard]:
    """Split ``model`` in place for this rank (see the module docstring); returns :func:`shard_specs` of the unsplit
    model (what the sharded loader reads). On the meta device only the shapes change; with weights, each split
    parameter becomes a contiguous copy of this rank's slice (so the full tensor can be freed)."""
    check(model, plan)
    specs = shard_specs(model, plan)
    check_blocks(model, specs, plan)
    check_groups(model, specs, plan)
    for name, spec in specs.items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        t = getattr(module, leaf)
        local = (torch.empty(spec.local_shape(t.shape), dtype=t.dtype, device="meta") if t.is_meta
                 else spec.take(t.detach()).contiguous())
        if leaf in module._buffers:  # FP8 block scales are buffers
            module._buffers[leaf] = local
        else:
            module._parameters[leaf] = nn.Parameter(local, requires_grad=False)
    if plan.size == 1:
        return specs
    for name, m in model.named_modules():
        if plan.tp > 1 and isinstance(m, (MultiheadLatentAttention, KimiDeltaAttention)):
            m.num_heads //= plan.tp
            _as_row_parallel(m.o_proj, plan.tp)
            if isinstance(getattr(m, "kv_b_proj", None), SplitKVB):
                m.kv_b_proj.heads //= plan.tp
        elif plan.tp > 1 and _is_mlp(m):
            _as_row_parallel(m.down_proj, plan.tp)
            for proj in (m.gate_proj, m.up_proj):
                proj.out_features = proj.weight.shape[0]
        elif isinstance(m, StackedExperts):
            if plan.ep > 1:
                _swap_class(m, ExpertShard)
                m.first_expert = plan.rank * m.num_experts
            elif plan.tp > 1:
                m.intermediate_size //= plan.tp
                _swap_class(m, SumOverRanks)
        if plan.tp > 1 and isinstance(m, (MultiheadLatentAttention, KimiDeltaAttention)):
            for child in m.children():
                if hasattr(child, "out_features") and child is not m.o_proj:  # nn.Linear, FP8BlockLinear
                    child.out_features = child.weight.shape[0]
    model.register_forward_pre_hook(_broadcast_input_ids, with_kwargs=True)
    model.parallel_plan = plan  # what kimi_lm.distributed reports (and how a caller tells a split model)
    return specs


def _as_row_parallel(linear: nn.Module, parts: int) -> None:
    """A Linear (float, FP8 blocks or packed) holding 1/parts of its input columns sums its output over ranks."""
    linear.in_features //= parts
    _swap_class(linear, SumOverRanks)
