"""Weights moved onto transparent huge pages (kimi_lm/cpu/pages.py, kernels/pages.c): bytes and addresses unchanged,
the memory really on huge pages, file-backed memory never touched, a prepared model's logits unchanged."""

import dataclasses
import mmap

import pytest
import torch
from torch import nn

import kimi_lm
from checkpoints import build_reference, save_reference
from kimi_lm.config import preset
from kimi_lm.cpu import native, pages

pytestmark = pytest.mark.skipif(native.library() is None or pages.thp_mode() != "madvise",
                                reason="needs the C kernels and Linux transparent huge pages on request (madvise)")


def huge_kib(start: int, end: int) -> int:
    """AnonHugePages (KiB) of the mappings overlapping [start, end), from /proc/self/smaps."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and len(line.split()) >= 5 and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(a, 16) for a in head.split("-"))
            inside = lo < end and hi > start
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1])
    return total


class Holder(nn.Module):
    def __init__(self, *tensors):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(f"t{i}", t)


def test_weights_move_onto_huge_pages_in_place():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3 << 20, generator=g), torch.randn(1 << 20, generator=g)  # 12 MiB and 4 MiB, fp32
    want_a, want_b, addr_a = a.clone(), b.clone(), a.data_ptr()
    before = huge_kib(addr_a, addr_a + a.nbytes)
    moved = pages.to_huge_pages(Holder(a, b))
    assert moved >= (12 << 20) - 2 * pages.HUGE_PAGE  # at least a's whole interior
    assert a.data_ptr() == addr_a and torch.equal(a, want_a) and torch.equal(b, want_b)
    assert huge_kib(addr_a, addr_a + a.nbytes) - before >= (moved >> 10) // 2  # backed by 2 MiB pages now
    a.mul_(2)  # still ordinary writable memory
    assert torch.equal(a, want_a * 2)


def test_small_and_file_backed_memory_stays(tmp_path):
    assert pages.to_huge_pages(Holder(torch.ones(1000))) == 0  # no whole huge page inside
    path = tmp_path / "weights.bin"
    path.write_bytes(torch.arange(4 << 20, dtype=torch.float32).numpy().tobytes())  # 16 MiB on disk
    with open(path, "r+b") as f:
        mapped = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
    t = torch.frombuffer(mapped, dtype=torch.float32)
    assert pages.to_huge_pages(Holder(t)) == 0  # file pages are the paging code's, never copied into anonymous memory
    assert torch.equal(t[:5], torch.arange(5, dtype=torch.float32))


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("KIMI_LM_HUGE_PAGES", "0")
    assert not pages.enabled() and pages.to_huge_pages(Holder(torch.ones(4 << 20))) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_model_moves_its_weights_and_computes_the_same(tmp_path, monkeypatch, dtype):
    cfg = dataclasses.replace(preset("tiny"), vocab_size=8192, hidden_size=256)  # lm_head 8 MiB fp32: some must move
    path = save_reference(build_reference(cfg, seed=0), tmp_path / "ckpt")
    ids = torch.randint(0, cfg.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    monkeypatch.setenv("KIMI_LM_HUGE_PAGES", "0")
    with torch.inference_mode():
        want = kimi_lm.load(path, dtype=dtype)(ids)
    monkeypatch.delenv("KIMI_LM_HUGE_PAGES")
    model = kimi_lm.load(path, dtype=dtype)  # prepare() moves the weights
    ranges = pages.weight_ranges(model)
    assert ranges and sum(huge_kib(s, e) for s, e in ranges) > 0
    embed = model.model.embed_tokens.weight
    assert not any(s <= embed.data_ptr() < e for s, e in ranges)  # the looked-up table is left where it is
    with torch.inference_mode():
        assert torch.equal(model(ids), want)
