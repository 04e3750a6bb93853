"""Loading one rank's slices of a checkpoint: each rank reads only the bytes of the parameters it holds.

    model = load_sharded(path, Plan(tp=2, rank=r), dtype=torch.float32)

The model is built on the meta device and split there (:func:`kimi_lm.distributed.parallel.parallelize`: shapes
only), so nothing full-size is ever allocated. Of each checkpoint tensor only this rank's part is read (and cast)
into the rank's parameter (:class:`_Reader`): a part contiguous in the file (whole tensors, rows, whole experts)
with one ``pread``, a strided one (the columns of a row-parallel product) through a memory-mapped view advised
``MADV_RANDOM``; read-ahead is off for the shard's descriptor, so the kernel does not read other ranks' bytes
around them. A column slice touches 1/N of every row: with rows shorter than a page (4 KiB) it reads whole pages
of other ranks' columns too (``--tp`` alone on a MoE model reads every expert's down_proj whole; ``--ep`` reads
whole experts, exactly its own).

Measured (``benchmarks/bench_parallel_load.py``, a 794 MB bf16 Kimi Linear checkpoint, 64 experts, page cache
dropped before each process): one process reads 640 MB at load and keeps 606 MB resident (+140 MB mapped after a
forward); each rank of ``--ep 2`` reads 514-521 MB and keeps 496-502 MB (its share: 493 MB, the embeddings, lm_head
and attention being replicated), peak RSS = what it keeps; ``--tp 2 --ep 2`` reads 503-510 MB, keeps 467-471 MB.

Names, placements and checks are the single-process loader's (``kimi_lm.names``, ``kimi_lm.checkpoint``): the
same tensors are required, with the same shapes, and a problem raises ``CheckpointError`` naming the file and tensor.
Float (F32 / BF16 / F16) and FP8-block checkpoints (Kimi K2's release format: fp8 weights and their block scales are
split together, at block boundaries) split under ``--tp`` and ``--ep``. So do packed ones (MLX-quantized, mlx-lm's
or ``kimi-lm convert --quantize``'s stacked ``switch_mlp`` experts; compressed-tensors INT4 / MXFP4 per-expert tensors
of K2-Thinking, K2.5 and K3's releases), through the one-process loader on the split meta model (:func:`load_packed`):
whole experts under ``--ep``; under ``--tp`` each packed module's rows, or its input columns at whole quantization
groups (``parallel.check_groups``), codes, scales and biases together, read from memory-mapped views advised
``MADV_RANDOM`` so that only the slice's pages are read.

Reference: safetensors format (header offsets); ``kimi_lm.checkpoint.load`` (the one-process loader it mirrors).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from kimi_lm import mapped, names
from kimi_lm.checkpoint import (FP32_SUFFIXES, ST_DTYPES, SafetensorsFile, _fp8_modules, _model_class, resolve_dtype,
                                weight_files)
from kimi_lm.config import load_config
from kimi_lm.distributed.parallel import Plan, Shard, parallelize
from kimi_lm.errors import CheckpointError
from kimi_lm.model.moe import StackedExperts
from kimi_lm.quant.fp8_block import FP8, quantize_modules

_FLOAT = ("F32", "BF16", "F16")


def packed_format(config, files: dict[str, Path]) -> str | None:
    """What makes a checkpoint packed (MLX or compressed-tensors), or None for float / FP8-block weights: config.json
    says so, or a shard's header holds a tensor that is neither float nor fp8 (headers only: nothing else is read)."""
    qc = getattr(config, "quantization_config", None)
    fp8 = isinstance(qc, dict) and qc.get("quant_method") == "fp8"
    found = "config.json's quantization block" if getattr(config, "quantization", None) or (qc and not fp8) else None
    for file in sorted(set(files.values())) if not found else ():
        header = SafetensorsFile(file).header
        name = next((n for n in header if n in files and header[n]["dtype"] not in _FLOAT + ("F8_E4M3",) * fp8), None)
        if name is not None:
            found = f"{file.name}: {name!r} is {header[name]['dtype']}"
            break
    return found


class RankPart:
    """What the one-process loader (``kimi_lm.checkpoint.load``, its ``split`` hook) reads of a packed checkpoint for
    one rank: ``experts`` {experts module: (first, count, total)}, the experts held here (whole, under ``--ep``), and
    :meth:`cut`, this rank's slice of any other tensor the plan splits (``specs``: :func:`shard_specs` of the unsplit
    model)."""

    def __init__(self, specs: dict[str, Shard], experts: dict[str, tuple[int, int, int]]):
        self.specs, self.experts = specs, experts

    def cut(self, target: str, placement: str) -> Shard | None:
        """The part of a checkpoint tensor stored for parameter ``target`` (``placement``: ``kimi_lm.names``) that
        this rank keeps, along that tensor's dims; None: all of it (not split, or whole experts read by range)."""
        spec = self.specs.get(target)
        if spec is None or (spec.dim == 0 and target.rpartition(".")[0] in self.experts):
            return None
        if placement in names.PER_EXPERT:  # one expert's gate / up [I, h] or down [h, I]: no expert dim, one half
            return Shard(spec.dim - 1, spec.parts, spec.index)
        if placement in ("gate_all", "up_all"):  # every expert's gate (or up) [E, I, h]: one half
            return Shard(spec.dim, spec.parts, spec.index)
        return spec


def load_packed(path: Path, plan: Plan, dtype, device) -> nn.Module:
    """This rank's part of a packed checkpoint (MLX, compressed-tensors INT4 / MXFP4): the one-process loader
    (``kimi_lm.checkpoint.load``: its quantized-module swaps, names and checks) on this rank's split meta model,
    reading of each expert tensor only this rank's experts under ``--ep`` (per-expert tensors of other ranks are
    skipped, stacked mlx-lm ones are read as this rank's row range) and of each tensor ``--tp`` splits only this
    rank's rows or columns (packed codes with their scales and biases, at whole groups); the rest whole."""
    from kimi_lm.checkpoint import load

    def split(model: nn.Module) -> RankPart:
        full = {n: m.num_experts for n, m in model.named_modules() if isinstance(m, StackedExperts)}
        specs = parallelize(model, plan)
        experts = {}
        for name, total in full.items():
            count = model.get_submodule(name).num_experts
            experts[name] = (plan.rank * count if plan.ep > 1 else 0, count, total)
        return RankPart(specs, experts)

    return load(path, dtype=dtype, device=device, split=split)


def load_sharded(path, plan: Plan, dtype=torch.bfloat16, device="cpu") -> nn.Module:
    """This rank's part of the checkpoint in ``path`` as a split model (eval mode, no grads) on ``device``."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (expected a folder with config.json and *.safetensors)")
    config = load_config(path / "config.json")
    dtype = resolve_dtype(dtype, config)
    files = {n: f for n, f in weight_files(path).items() if not names.skipped(n, config)}
    if packed_format(config, files):
        return load_packed(path, plan, dtype, device)
    fam = names.family(config)
    fp8 = _fp8_modules(config, {n: names.to_parameter(n, fam) for n in files}, files)
    with torch.device("meta"):
        model = _model_class(config)(config)
        quantize_modules(model, lambda name, module: name in fp8)  # as kimi_lm.checkpoint.load does
    expected = model.state_dict()  # full shapes
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    specs = parallelize(model, plan)
    local_meta = model.state_dict()
    loaded = {n: torch.empty(local_meta[n].shape, device="cpu", dtype=FP8 if expected[n].dtype == FP8 else
                             torch.float32 if n.endswith(FP32_SUFFIXES) else dtype) for n in expected}
    seen: dict[str, set] = {n: set() for n in expected}
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    for file, in_file in by_file.items():
        f = SafetensorsFile(file)
        with f, mapped.Mapping(file, f.size) as m:
            # no read-ahead on this descriptor: the kernel would otherwise read past each part into other ranks'
            os.posix_fadvise(m.fh.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
            for name in in_file:
                if name not in f.header:
                    raise CheckpointError(f"{file}: tensor {name!r} is listed in the index but missing from this file")
                target, placement, expert = names.to_parameter(name, fam)
                if target not in expected:
                    raise CheckpointError(f"{file}: unexpected tensor {name!r} (no such parameter in a "
                                          f"{config.model_type} model with this config.json)")
                if (f.dtype(name) == "F8_E4M3") != (expected[target].dtype == FP8) or f.dtype(name) not in (
                        *_FLOAT, "F8_E4M3"):
                    raise CheckpointError(f"{file}: tensor {name!r} has dtype {f.dtype(name)}, expected "
                                          f"{'F8_E4M3 (it has an FP8 block scale)' if expected[target].dtype == FP8 else 'F32, BF16 or F16'}")
                want = names.checkpoint_shape(expected[target].shape, placement)
                if f.shape(name) != want:
                    raise CheckpointError(f"{file}: tensor {name!r} has shape {f.shape(name)}, expected {want}")
                read = _Reader(f, m, name, want)
                _place(loaded[target], specs.get(target), read, placement, expert, expected[target].shape)
                seen[target].add((placement, expert))
    _check_complete(path, expected, seen)
    model.load_state_dict(loaded, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.to(device).eval().requires_grad_(False)


class _Reader:
    """Tensor ``name`` of an open shard, or a part of it along one dim, reading only the bytes of that part.

    A part contiguous in the file (the whole tensor, rows of a matrix, one expert of a stacked tensor) is read with
    one ``pread`` straight into memory; a strided part (columns) is copied out of a memory-mapped view advised
    ``MADV_RANDOM``, so only the pages holding it are read, not the kernel's read-around window (up to 8 MiB per
    fault, which would pull in other ranks' experts too)."""

    def __init__(self, f: SafetensorsFile, m: mapped.Mapping, name: str, shape: list[int]):
        self.f, self.m, self.shape, self.dtype = f, m, shape, ST_DTYPES[f.dtype(name)]
        begin, end = f.header[name]["data_offsets"]
        self.offset, self.nbytes, self.name = f.data_start + begin, end - begin, name

    def __call__(self, dim: int = 0, start: int = 0, length: int | None = None) -> torch.Tensor:
        shape = self.shape
        if not shape:
            return self.f.read(self.name)
        length = shape[dim] - start if length is None else length
        if math.prod(shape[:dim]) == 1:  # contiguous: one read
            row = math.prod(shape[dim + 1 :]) * self.dtype.itemsize
            out = torch.empty([*shape[:dim], length, *shape[dim + 1 :]], dtype=self.dtype)
            buf, done = memoryview(out.reshape(-1).view(torch.uint8).numpy()), 0
            while done < len(buf):
                n = os.preadv(self.m.fh.fileno(), [buf[done:]], self.offset + start * row + done)
                if not n:
                    raise CheckpointError(f"{self.f.path}: tensor {self.name!r} is truncated")
                done += n
            return out
        view = self.m.view(self.offset, self.nbytes, self.dtype, shape, min_bytes=0)
        if view is None:  # not aligned for its dtype: read it whole
            return self.f.read(self.name).narrow(dim, start, length)
        return mapped.random_access(view).narrow(dim, start, length)

    def part(self, spec: Shard, dim: int) -> torch.Tensor:
        """This rank's part of the tensor along ``dim`` as ``spec`` splits it (``spec.used`` first entries only)."""
        n = (spec.used if spec.used is not None else self.shape[dim]) // spec.parts
        return self(dim, spec.index * n, n)


def _place(dest: torch.Tensor, spec: Shard | None, read: _Reader, placement: str, expert: int, full_shape) -> None:
    """Copy this rank's part of one checkpoint tensor into the rank's parameter ``dest``; other ranks' parts are
    never read."""
    if placement in ("copy", "conv"):  # conv: MLX [D, W, 1] splits along D, as the parameter [D, 1, W] does
        src = read() if spec is None else read.part(spec, spec.dim)
        dest.copy_(src.transpose(1, 2) if placement == "conv" else src)
        return
    if placement in ("gate_all", "up_all"):  # every expert's gate (or up) rows [E, I, hidden]
        src = read() if spec is None else read.part(spec, spec.dim)  # experts (dim 0) or each one's rows (dim 1)
        names.expert_slice(dest, placement, expert).copy_(src)
        return
    # one expert's matrix: gate / up [I, hidden] or down [hidden, I] of a stacked [E, 2I, hidden] / [E, hidden, I]
    if not 0 <= expert < full_shape[0]:
        raise CheckpointError(f"{read.f.path}: tensor {read.name!r} names expert {expert}, but config.json has "
                              f"num_experts={full_shape[0]}")
    if spec is not None and spec.dim == 0:  # --ep: experts [first, first + E_local) live here
        first = spec.index * dest.shape[0]
        if not first <= expert < first + dest.shape[0]:
            return  # another rank's expert: never read
        src, expert = read(), expert - first
    elif spec is not None:  # --tp: the expert's rows (gate / up) or columns (down) of this rank
        src = read.part(Shard(spec.dim - 1, spec.parts, spec.index), spec.dim - 1)
    else:
        src = read()
    names.expert_slice(dest, placement, expert).copy_(src)


def _check_complete(path: Path, expected: dict, seen: dict[str, set]) -> None:
    missing = []
    for target, got in seen.items():
        ref = expected[target]
        if ("copy", -1) in got or ("conv", -1) in got:
            continue
        if target.removesuffix("_scale_inv").endswith(("gate_up_proj", "down_proj")) and ref.dim() == 3:
            halves = ("gate", "up") if "gate_up_proj" in target else ("down",)
            have = {(p.removesuffix("_all"), e) for p, e in got if p in names.PER_EXPERT}
            have |= {(p.removesuffix("_all"), e) for p, _ in got if p.endswith("_all") for e in range(ref.shape[0])}
            lost = [f"{target} (expert {e}, {h})" for e in range(ref.shape[0]) for h in halves if (h, e) not in have]
            missing += lost
        else:
            missing.append(target)
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint: {shown}")
