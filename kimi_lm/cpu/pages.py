"""A prepared model's weights onto transparent huge pages, in place (``kernels/pages.c``).

A decode step streams every active weight once; on 4 KiB pages that costs a TLB miss (a page walk, nested under a
hypervisor) per 4 KiB read, and a product's stream stalls on each. Linux gives anonymous memory 2 MiB pages only on
request where ``/sys/kernel/mm/transparent_hugepage/enabled`` is ``madvise`` (the usual default), and nothing in
PyTorch or oneDNN requests them. ``to_huge_pages(model)`` moves the 2 MiB-aligned interior of each weight's memory
onto huge pages after the CPU backend has packed it; addresses do not change, so the packed tensors and the C
readers holding their pointers are untouched. Measured on the project's 2-core VM, alternating runs: bench preset
fp32 decode +12-20 % (e.g. 136 -> 156 tok/s), bf16 +3 %; real-layers bf16 +5-10 % (30.7 -> 34 tok/s).

The cost is at load: copying the weights, ~0.25 s per GB where the kernel has free huge pages at hand; on a VM that
hands freed memory back to its host (free page reporting, as this project's does) each fresh 2 MiB page is faulted
in from the host: ~9 s per GB measured (1.3 GB of real-layers weights: 11-12 s). The embedding table, read a row per
token, is not moved, and moving stops after ``TIME_BUDGET_S`` (the rest stays on 4 KiB pages): a load never grows
by more than that.

Only private anonymous memory is moved (``/proc/self/maps`` says which): a memory-mapped checkpoint's file pages
stay file pages (``kimi_lm.mapped`` pages those experts from disk). Where transparent huge pages are ``always``
(already given) or ``never`` (refused), and off Linux, nothing is done. ``KIMI_LM_HUGE_PAGES=0`` turns it off.

Reference: Documentation/admin-guide/mm/transhuge.rst; madvise(2), mremap(2), proc_pid_maps(5).
"""

from __future__ import annotations

import bisect
import ctypes
import functools
import os
import time
from pathlib import Path

import torch
from torch import nn

from kimi_lm.cpu import native

HUGE_PAGE = 2 << 20
CHUNK = 4 << 20  # bytes moved per step: the extra memory held at once while a weight is copied (4 MiB: as fast
# as larger steps, measured 4.0 vs 4.5 GB/s for 16 MiB, and a model of tens of MiB keeps its peak)
# weights this close are moved as one range: between two neighbouring allocations lie only the allocator's header of
# the second and its alignment padding (oneDNN aligns to 64 bytes), written only when one of the two is freed
MERGE_GAP = 64
BATCH = 256 << 20  # bytes per call between checks of the time budget (a multiple of HUGE_PAGE)
TIME_BUDGET_S = 10.0  # at most this long spent moving, whatever the machine
THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str:
    """The system's transparent huge page policy (``always``, ``madvise``, ``never``), or '' where there is none."""
    try:
        text = THP_ENABLED.read_text()
    except OSError:
        return ""
    return text[text.find("[") + 1:text.find("]")] if "[" in text else ""


def enabled() -> bool:
    return os.environ.get("KIMI_LM_HUGE_PAGES", "1") != "0" and thp_mode() == "madvise"


@functools.cache
def _library() -> ctypes.PyDLL | None:
    """The kernels' library, called with the GIL held (``PyDLL``): no other Python thread may allocate next to the
    weights while their bytes are being copied."""
    if native.library() is None:
        return None
    lib = ctypes.PyDLL(native.library()._name)
    lib.huge_pages.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long]
    lib.huge_pages.restype = ctypes.c_long
    return lib


def anonymous_mappings() -> list[tuple[int, int]]:
    """[start, end) of this process's private anonymous memory (the heap included), sorted, adjacent mappings joined
    (moving pages splits the heap into several mappings, and a later allocation may straddle two)."""
    spans: list[tuple[int, int]] = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        path = fields[5] if len(fields) > 5 else ""
        if fields[1][3] == "p" and fields[4] == "0" and path in ("", "[heap]"):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            if spans and spans[-1][1] == start:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((start, end))
    return spans  # /proc/self/maps lists mappings in address order


def _looked_up(model: nn.Module) -> set[int]:
    """Addresses of the embedding table's tensors: one row per token is read, not the whole table (unless the
    lm_head shares it), so moving it would cost load time for nothing."""
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    if embed is None or getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return set()
    return {t.untyped_storage().data_ptr() for t in [*embed.parameters(), *embed.buffers()] if not t.is_mkldnn}


def weight_ranges(model: nn.Module) -> list[tuple[int, int]]:
    """[start, end) of the memory of the model's parameters and buffers (packed oneDNN ones included; not the
    embedding table), merged where they touch (``MERGE_GAP``), those at least a huge page long; sorted."""
    seen, ranges = _looked_up(model), []
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "cpu":
            continue
        if t.is_mkldnn:
            start, nbytes = torch.ops.mkldnn.data_ptr(t), torch.ops.mkldnn._nbytes(t)
        else:
            storage = t.untyped_storage()
            start, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes and start not in seen:
            seen.add(start)
            ranges.append((start, start + nbytes))
    merged = []
    for start, end in sorted(ranges):
        if merged and start - merged[-1][1] <= MERGE_GAP:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return [(start, end) for start, end in merged if end - start >= HUGE_PAGE]


def to_huge_pages(model: nn.Module) -> int:
    """Move the model's weight memory onto transparent huge pages (see the module docstring); returns the bytes
    moved (0 where not enabled, nothing qualified, or the system refused)."""
    lib = _library() if enabled() else None
    if lib is None:
        return 0
    mappings = anonymous_mappings()
    starts = [s for s, _ in mappings]
    moved, deadline = 0, time.monotonic() + TIME_BUDGET_S
    for start, end in weight_ranges(model):
        i = bisect.bisect_right(starts, start) - 1
        if i < 0 or end > mappings[i][1]:
            continue  # not wholly in private anonymous memory: file pages (a memory-mapped checkpoint)
        lo, hi = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE  # the whole huge pages inside
        for at in range(lo, hi, BATCH):  # in batches of whole pages, so that the time budget is kept
            done = lib.huge_pages(at, min(hi, at + BATCH) - at, CHUNK)
            if done < 0:
                return moved  # out of memory or no mremap: leave the rest as it is
            moved += done
            if time.monotonic() > deadline:
                return moved
    return moved
