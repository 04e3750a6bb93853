"""Memory per rank of a ``--tp`` / ``--ep`` run: ``kimi-lm estimate MODEL --tp N --ep N``.

The weights are split exactly as :func:`kimi_lm.distributed.parallel.shard_specs` splits them (same code, on the
meta device), each tensor of the estimator's inventory (``kimi_lm.memory.tensors``) shrunk to this rank's shape and
priced by ``kimi_lm.memory.tensor_bytes`` in the chosen format; what is not split (embeddings, lm_head, norms,
routers, MLA's latent down-projections, K3's latent-MoE projections) is counted whole on every rank. Caches: the KDA
state and conv tails hold this rank's heads (1/tp); the MLA latent cache [ĉ | k_pe] is shared by all heads, so every
rank keeps all of it (as in vLLM's MLA under tensor parallelism). Activations: the one-process estimate (an upper
bound: split layers' intermediates shrink, the residual stream does not).

Packed checkpoints: every tensor priced in its format (``kimi_lm.memory.tensor_bytes``) at this rank's shape (E/N
experts under ``--ep``; under ``--tp`` rows or input columns, the latter only at whole groups: a split that would cut
one is refused as the run refuses it); compressed-tensors INT4 experts as a rank holds them, MLX affine 4-bit: the
codes, and a scale and a bias (−8·scale) per group in the model dtype, no ``weight_shape`` (the split runs the plain
modules, not the CPU backend that derives the biases).

Every rank of a run holds the same bytes (equal parts), so "per rank" is any rank's.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from kimi_lm import names
from kimi_lm.distributed.parallel import Plan, check, shard_specs
from kimi_lm.errors import UsageError
from kimi_lm.memory import Tensor, kda_state_bytes, make_quant, tensor_bytes, tensors

_EXPERT_RANGE = re.compile(r"\{0\.\.\d+\}")


def split_tensor(t: Tensor, specs: dict, family: str) -> tuple[Tensor, bool]:
    """(this rank's part of inventory entry ``t``, whether it is split)."""
    param, placement, _ = names.to_parameter(_EXPERT_RANGE.sub("0", t.name), family)
    spec = specs.get(param)
    if spec is None:
        return t, False
    shape = list(t.shape)
    if placement in names.PER_EXPERT:  # one entry stands for the layer's E experts (count), each [I, h] or [h, I]
        if spec.dim == 0:  # --ep: E / ep experts here
            return dataclasses.replace(t, count=t.count // spec.parts,
                                       active=None if t.active is None else -(-t.active // spec.parts)), True
        shape[spec.dim - 1] //= spec.parts  # --tp: the expert's rows (gate / up) or columns (down)
    elif placement in ("gate_all", "up_all"):
        shape[spec.dim] //= spec.parts
    else:
        shape = spec.local_shape(shape)
    return dataclasses.replace(t, shape=tuple(shape)), True


def per_rank(model, e, tp: int, ep: int, quant: str | None = None, group_size: int | None = None) -> dict:
    """Per-rank memory of ``model`` (what ``kimi_lm.estimate`` accepts) split ``--tp tp --ep ep``, given its
    one-process :class:`~kimi_lm.estimate.Estimate` ``e`` (contexts, batch, cache dtype, activations)."""
    from kimi_lm.checkpoint import _model_class
    from kimi_lm.estimate import load_source

    if tp > 1 and ep > 1 and tp != ep:
        raise UsageError(f"--tp {tp} --ep {ep}: combined, the two must be equal (they split the same processes)")
    if e.train:
        raise UsageError("--tp / --ep estimate inference; training shards with FSDP2 (train --fsdp)")
    src = load_source(model)
    cfg = src.config
    if quant is None and group_size is None and src.recorded_quant:
        q = src.recorded_quant
    else:
        q = make_quant(quant or src.dtype, group_size, src.dtype_bytes)
    plan = Plan(tp, ep, 0)
    with torch.device("meta"):
        meta = _model_class(cfg)(cfg)
    check(meta, plan)  # the same UsageError as a run with these flags
    specs = shard_specs(meta, plan)
    split = replicated = 0
    cut = []  # packed tensors whose input columns the split would cut mid-group (the loader refuses them)
    for t in tensors(cfg):
        local, is_split = split_tensor(t, specs, names.family(cfg))
        if q.group and local.shape[-1] % q.group and tensor_bytes(t, q, src.dtype_bytes, src.router_quant) != \
                t.numel * src.dtype_bytes and t.kind != "fp32":
            cut.append(f"{t.name} ({t.shape[-1]} input columns, groups of {q.group})")
        nbytes = tensor_bytes(local, q, src.dtype_bytes, src.router_quant)
        if q.name == "int4-experts" and local.component == "experts":  # held as MLX affine 4-bit: codes, and a
            # scale and a bias (−8·scale) per group in the model dtype; no weight_shape
            nbytes = local.numel * q.bits // 8 + local.numel // q.group * 2 * src.dtype_bytes
        split, replicated = (split + nbytes, replicated) if is_split else (split, replicated + nbytes)
    if cut:  # as kimi_lm.distributed.parallel.check_groups refuses the run
        raise UsageError(f"--tp {tp}: packed weights ({q.label()}) split their input columns only at whole "
                         f"quantization groups, and {', '.join(cut[:4])}{' ...' if len(cut) > 4 else ''} cannot be "
                         f"split {tp} ways; choose a smaller --tp, or add --ep {tp} (whole experts)")
    weights = split + replicated
    kda = kda_state_bytes(cfg, src.dtype_bytes) // tp  # every KDA state and conv-tail size is proportional to H
    per_token = e.mla_cache_bytes_per_token  # the latent is shared by all heads: not split
    rows = []
    for r in e.per_context:
        cache = e.batch * (kda + r["context"] * per_token)
        rows.append(dict(context=r["context"], cache_bytes=cache, activation_bytes=r["activation_bytes"],
                         total_bytes=weights + cache + r["activation_bytes"]))
    fits = {d["label"]: rows[0]["total_bytes"] <= d["usable_bytes"] for d in e.devices.values()
            if "×" not in d["label"]}  # one device per rank: the multi-device entries are whole nodes
    return dict(tp=tp, ep=ep, processes=plan.size, weights_bytes=weights, split_weights_bytes=split,
                replicated_weights_bytes=replicated, kda_state_bytes=kda, mla_cache_bytes_per_token=per_token,
                per_context=rows, fits_one_device=fits)


def render(r: dict) -> str:
    from kimi_lm.estimate import fmt_bytes, fmt_tokens

    out = [f"per rank (--tp {r['tp']} --ep {r['ep']}: {r['processes']} processes, each holding)",
           f"  weights   {fmt_bytes(r['weights_bytes']):>11}: {fmt_bytes(r['split_weights_bytes'])} its share of the "
           f"split tensors + {fmt_bytes(r['replicated_weights_bytes'])} replicated (embeddings, lm_head, norms, "
           f"routers, latent projections)",
           f"  KDA state {fmt_bytes(r['kda_state_bytes']):>11} per sequence (its heads)",
           f"  MLA cache {fmt_bytes(r['mla_cache_bytes_per_token']):>11} per sequence and token (the whole latent, "
           f"on every rank)",
           f"  {'context':>8} {'cache':>11} {'activations':>11} {'total':>11}"]
    out += [f"  {fmt_tokens(x['context']):>8} {fmt_bytes(x['cache_bytes']):>11} {fmt_bytes(x['activation_bytes']):>11} "
            f"{fmt_bytes(x['total_bytes']):>11}" for x in r["per_context"]]
    fits = [name for name, ok in r["fits_one_device"].items() if ok]
    out.append(f"  one rank fits on: {', '.join(fits) if fits else 'none of the listed devices'}")
    return "\n".join(out)
