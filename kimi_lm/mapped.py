"""Memory-mapped weights: tensors that are views of a safetensors file's pages instead of copies of them.

With ``mmap=True`` (the default on CPU), ``checkpoint.load`` maps every tensor whose stored dtype and layout are
what the model keeps (packed uint32 codes, uint8 scales, floats at the compute dtype), private copy-on-write
(``MAP_PRIVATE``, one mapping per tensor), and the model holds a view of those pages: no byte is read at load, a page is read from disk the first time
a forward pass touches it, and it stays a clean page of the page cache, shared with every other process mapping the
file, which the kernel may evict under memory pressure and read again later. That is how a model larger than RAM
runs (paged): what a token does not use (the experts it is not routed to) is never read. Tensors that need a
conversion (a dtype cast, per-expert tensors stacked, an MLX conv transposed) are read into memory as before.

Measured (a 1 GiB file, every page read): ``torch.frombuffer`` over ``mmap.mmap(MAP_PRIVATE)`` and
``torch.UntypedStorage.from_file(shared=False)`` behave alike: RssFile +1 GiB, RssAnon +0, the pages are the page
cache's (``benchmarks/bench_full_size.py`` for the 48B model). ``mmap.mmap`` is used because it maps a byte range
of an open file (one tensor, from the descriptor whose size was checked against the header), not a whole path.

Lifetime: a tensor holds its mapping (``torch.frombuffer`` keeps the mmap object alive), unmapped when the tensor is
freed (a float weight the CPU backend repacks gives its pages back); the file descriptor closes after loading. On Linux a mapped file may be deleted or replaced by a rename (what ``kimi-lm convert``,
downloads and ``files.atomic_dir`` do) after loading: the mapping keeps the old inode. Truncating or rewriting the
file in place while a model maps it is not safe: a page past the new end faults with SIGBUS, rewritten pages are seen.

Alignment: a view needs its offset to be a multiple of the element size. Files written by kimi-lm and mlx-lm start
their data 8-byte aligned and hold 4-byte elements at most in packed models, but the format does not promise it;
a misaligned tensor is read instead (:meth:`Mapping.view` returns None).

Experts in mlx-lm's layout: ``switch_mlp.gate_proj`` and ``up_proj`` are two [E, I, hidden] tensors, while
``PackedStackedExperts`` keeps them stacked as one ``gate_up_proj`` [E, 2I, hidden] — a copy of two thirds of every
expert byte, which at 48B is ~17 GB. :class:`SplitPackedExperts` keeps the two halves as the file has them (views),
so mapped experts stay mapped.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from kimi_lm.quant.packed import PackedStackedExperts, QuantSpec, _register_packed, packed_linear


# Smaller tensors are read: norms, A_log, convs, a router's scales are a few KiB each, mostly copied by the CPU backend
# anyway, and a first touch of a mapped page reads the whole read-ahead window around it (read_ahead_kb, 8 MiB on
# the benchmark box): mapped, each of the ~300 in the 48B model could pull in up to 8 MiB at its first touch.
MIN_BYTES = 1 << 20


class Mapping:
    """One open file; :meth:`view` maps a tensor's byte range of it, private copy-on-write, as its own mapping."""

    def __init__(self, path: Path, size: int):
        self.fh = open(path, "rb")
        if os.fstat(self.fh.fileno()).st_size != size:
            self.fh.close()
            raise OSError(f"changed size while loading (expected {size} bytes)")

    def close(self) -> None:
        self.fh.close()  # the mappings stay valid: each holds the inode

    def __enter__(self) -> "Mapping":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def view(self, offset: int, nbytes: int, dtype: torch.dtype, shape: list[int], min_bytes: int | None = None
             ) -> torch.Tensor | None:
        """The ``nbytes`` at ``offset`` as a tensor (a view of the pages), or None (read it instead) when not aligned
        for ``dtype`` or under ``min_bytes`` (the sharded loader, ``kimi_lm.distributed.load``, maps every tensor to
        copy a slice of it: 0).

        One mapping per tensor, so that a tensor the model drops (a float weight the backend repacks) unmaps its
        pages: with one mapping per file they would stay resident as long as any tensor of the file lives."""
        min_bytes = MIN_BYTES if min_bytes is None else min_bytes  # read at the call: tests lower MIN_BYTES
        if offset % dtype.itemsize or nbytes < max(min_bytes, 1):
            return None
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        # PROT_WRITE (private): a write to the tensor copies its page instead of faulting on a read-only mapping
        m = mmap.mmap(self.fh.fileno(), offset + nbytes - start, flags=mmap.MAP_PRIVATE,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        flat = torch.frombuffer(m, dtype=torch.uint8)  # holds ``m``: unmapped when the last view is freed
        return flat[offset - start :].view(dtype).view(shape)


# ---- experts kept as the file holds them ------------------------------------------------------------------------
class SplitPackedExperts(PackedStackedExperts):
    """``PackedStackedExperts`` with gate and up apart, as mlx-lm's ``switch_mlp`` stores them: ``gate_proj`` and
    ``up_proj`` [E, I, hidden·b/32] (with ``*_scales`` [``*_biases``]) and ``down_proj`` [E, hidden, I·b/32], so all
    three can be views of the checkpoint's pages. Same products; ``gate_up_proj`` (and its scales) are still readable,
    as a stacked copy made on each access (tests, conversions), never on the forward pass."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, gate_up: QuantSpec,
                 down: QuantSpec, dtype=torch.float32):
        nn.Module.__init__(self)
        self.intermediate_size, self.gate_up_spec, self.down_spec = intermediate_size, gate_up, down
        E, I = num_experts, intermediate_size
        _register_packed(self, "gate_proj", (E, I, hidden_size), gate_up, dtype)
        _register_packed(self, "up_proj", (E, I, hidden_size), gate_up, dtype)
        _register_packed(self, "down_proj", (E, hidden_size, I), down, dtype)

    @property
    def num_experts(self) -> int:
        return self.gate_proj.shape[0]

    def _stacked(self, suffix: str) -> torch.Tensor:
        parts = [getattr(self, f"{half}{suffix}", None) for half in ("gate_proj", "up_proj")]
        if parts[0] is None:
            raise AttributeError(f"'SplitPackedExperts' has no 'gate_up_proj{suffix}'")
        return torch.cat(parts, dim=1)

    gate_up_proj = property(lambda self: self._stacked(""))
    gate_up_proj_scales = property(lambda self: self._stacked("_scales"))
    gate_up_proj_biases = property(lambda self: self._stacked("_biases"))

    def use_int4_kernel(self) -> bool:
        return False  # affine 4-bit experts are never split (see split_experts)

    paged: tuple[torch.Tensor, ...] = ()  # set by :func:`page_experts`: the stacks read ahead per active expert
    residency: "ExpertResidency | None" = None  # set by :func:`page_experts`: the mapped experts' byte budget

    def will_need(self, counts: list[int]) -> None:
        """Paged checkpoints (:func:`page_experts`): ask the kernel for the pages of the experts ``counts`` routes
        rows to, all at once, before the products touch them (their reads then run in parallel)."""
        for e, n in enumerate(counts):
            if not n:
                continue
            ranges = []
            for t in self.paged:
                per_expert = t[0].numel() * t.element_size()
                _madvise(t, mmap.MADV_WILLNEED, e * per_expert, per_expert)
                ranges.append((t, e * per_expert, per_expert))
            if self.residency is not None:
                self.residency.use((id(self), e), ranges)

    def grouped(self, xs: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        self.will_need(counts)
        return super().grouped(xs, counts)

    def gate_up(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([packed_linear(x, *self._part(half, self.gate_up_spec, e)) for half in ("gate_proj", "up_proj")],
                         dim=-1)

    def _part(self, name: str, spec: QuantSpec, e: int):
        biases = getattr(self, f"{name}_biases", None)
        return spec, getattr(self, name)[e], getattr(self, f"{name}_scales")[e], None if biases is None else biases[e]


# ---- a model larger than RAM: experts read exactly, ahead of use -------------------------------------------------
# Measured on the 48B MXFP4 checkpoint (26 GB) with 23.5 GiB of RAM, one run each under the same load: a decode step
# faulting its experts in read 372 MB per token at 0.17 tok/s — each fault reads the whole read-ahead window around
# it (read_ahead_kb, 8 MiB here: ~7 experts of 1.2 MB for the one needed), evicting pages still in use; with the
# expert stacks marked MADV_RANDOM (no read-around) and the active experts' exact byte ranges requested with
# MADV_WILLNEED before the products (their reads in flight together instead of one fault at a time): 199 MB per
# token, 0.35 tok/s, and no major faults left in the products.
_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGED_FRACTION = 0.9  # page the experts when the checkpoint exceeds this share of the memory available at load
RESIDENT_FRACTION = 0.7  # of RAM: what a paged model keeps mapped (its RSS), experts and the rest of the checkpoint


def _madvise(t: torch.Tensor, advice: int, start: int = 0, nbytes: int | None = None) -> int:
    """madvise(2) over bytes [start, start + nbytes) of ``t``'s data, widened to whole pages; 0 or -1 as madvise
    returns. Advice only: a failure (an old kernel, memory madvise refuses) changes speed, never results, so callers
    ignore it."""
    begin = t.data_ptr() + start
    end = begin + (t.numel() * t.element_size() - start if nbytes is None else nbytes)
    begin -= begin % mmap.PAGESIZE
    return _LIBC.madvise(begin, end - begin, advice)


def random_access(t: torch.Tensor) -> torch.Tensor:
    """``t``, advised ``MADV_RANDOM`` (where it is a view of a file): a slice copied out of it reads only the pages
    holding the slice, not the kernel's read-around window around each fault (up to read_ahead_kb)."""
    _madvise(t, mmap.MADV_RANDOM)
    return t


def _meminfo(key: str) -> int:
    """A /proc/meminfo value in bytes; 0 where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def available_ram() -> int:
    """MemAvailable (free + reclaimable page cache) in bytes; 0 where unknown."""
    return _meminfo("MemAvailable")


class ExpertResidency:
    """The experts a paged model keeps mapped, least recently used first, within ``budget`` bytes.

    A mapped page stays in the process (its RSS) until the kernel reclaims it; on a machine with little else running
    that is until the page cache is full, so a model larger than RAM would hold ~90 % of RAM as its RSS. Past the
    budget the least recently used expert's ranges are dropped from the process (MADV_DONTNEED: a private file
    mapping we never wrote loses only its page-table entries; the pages stay in the page cache, clean, and a later
    touch maps them again without reading the disk unless the kernel evicted them meanwhile)."""

    def __init__(self, budget: int):
        self.budget, self.mapped = budget, 0
        self.lru: OrderedDict[tuple, list[tuple[torch.Tensor, int, int]]] = OrderedDict()

    def use(self, key: tuple, ranges: list[tuple[torch.Tensor, int, int]]) -> None:
        if key in self.lru:
            self.lru.move_to_end(key)
            return
        self.lru[key] = ranges
        self.mapped += sum(n for _, _, n in ranges)
        while self.mapped > self.budget and len(self.lru) > 1:
            _, old = self.lru.popitem(last=False)
            for t, start, nbytes in old:
                _madvise(t, mmap.MADV_DONTNEED, start, nbytes)
            self.mapped -= sum(n for _, _, n in old)


def page_experts(model: nn.Module, checkpoint_bytes: int, available: int | None = None,
                 ram: int | None = None) -> int:
    """Prepare a memory-mapped model that does not fit in RAM for paging: each :class:`SplitPackedExperts`' stacks
    get MADV_RANDOM and read their active experts ahead (:meth:`SplitPackedExperts.will_need`). Only when
    ``checkpoint_bytes`` exceeds ``PAGED_FRACTION`` of ``available`` (default: MemAvailable now) — a model that fits
    keeps the kernel's read-ahead (its first pass reads whole windows, sequentially) and pays no madvise calls.
    The experts kept mapped share one :class:`ExpertResidency` of ``RESIDENT_FRACTION`` of ``ram`` (default:
    MemTotal) less the checkpoint's other bytes. Returns the number of expert modules prepared."""
    available = available_ram() if available is None else available
    if not available or checkpoint_bytes <= PAGED_FRACTION * available:
        return 0
    modules = [m for m in model.modules() if isinstance(m, SplitPackedExperts)]
    for module in modules:
        stacks = (getattr(module, name, None) for half in ("gate_proj", "up_proj", "down_proj")
                  for name in (half, f"{half}_scales", f"{half}_biases"))
        module.paged = tuple(t for t in stacks if t is not None and t.numel() * t.element_size() >= MIN_BYTES)
        for t in module.paged:
            _madvise(t, mmap.MADV_RANDOM)
    expert_bytes = sum(t.numel() * t.element_size() for m in modules for t in m.paged)
    ram = _meminfo("MemTotal") if ram is None else ram
    residency = ExpertResidency(max(int(RESIDENT_FRACTION * ram) - (checkpoint_bytes - expert_bytes), expert_bytes // 4))
    for module in modules:
        module.residency = residency
    return len(modules)


def split_experts(model: nn.Module, targets: dict[str, tuple]) -> set[str]:
    """Swap each ``PackedStackedExperts`` whose gate and up come as mlx-lm's two stacked tensors (placements
    ``gate_all`` / ``up_all``) for a :class:`SplitPackedExperts`; returns the swapped module names. Affine 4-bit
    experts stay stacked: the CPU backend moves them into PyTorch's int4 kernel layout, a copy anyway."""
    from_mlx = {t.rsplit(".", 1)[0] for t, placement, _ in targets.values() if placement in ("gate_all", "up_all")}
    swapped = set()
    for name in from_mlx:
        module = model.get_submodule(name)
        spec = getattr(module, "gate_up_spec", None)
        if type(module) is not PackedStackedExperts or (spec.mode, spec.bits) == ("affine", 4):
            continue
        E, two_i, hidden = module.gate_up_proj_scales.shape[0], module.gate_up_proj.shape[1], module._shape("down_proj")[0]
        new = SplitPackedExperts(E, hidden, two_i // 2, module.gate_up_spec, module.down_spec,
                                 module.gate_up_proj_scales.dtype)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        swapped.add(name)
    return swapped


def split_targets(targets: dict[str, tuple], split: set[str]) -> dict[str, tuple]:
    """Checkpoint name -> (parameter, placement, expert) with the gate / up halves of ``split`` experts loaded whole
    into ``gate_proj*`` / ``up_proj*`` (placement ``copy``) instead of into a stacked ``gate_up_proj*``."""
    out = dict(targets)
    for name, (target, placement, expert) in targets.items():
        module, _, param = target.rpartition(".")
        if placement in ("gate_all", "up_all") and module in split:
            half = "gate_proj" if placement == "gate_all" else "up_proj"
            out[name] = (f"{module}.{half}{param.removeprefix('gate_up_proj')}", "copy", -1)
    return out


def shared_and_private(pid: int | str = "self") -> dict[str, int]:
    """A process's resident memory split: RssFile (mapped file pages, shared with the page cache and reclaimable)
    and RssAnon (its own), with VmRSS and the peak VmHWM, in bytes (Linux ``/proc/PID/status``)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024
    return out

