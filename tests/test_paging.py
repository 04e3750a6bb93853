"""A memory-mapped model larger than RAM reads its routed experts exactly and ahead of use (``kimi_lm.mapped``:
``page_experts``, ``SplitPackedExperts.will_need``): the advice goes to the active experts' byte ranges only, is
given only when the checkpoint exceeds the memory available, and never changes a result."""

from __future__ import annotations

import mmap

import pytest
import torch

import kimi_lm
from kimi_lm import checkpoint, cpu, mapped
from kimi_lm.config import preset
from kimi_lm.mapped import SplitPackedExperts
from test_mmap_load import IDS, mlx_mxfp4


@pytest.fixture(autouse=True)
def map_small_tensors(monkeypatch):
    """Tiny models' tensors are all under ``mapped.MIN_BYTES``: map (and page) them as a full-size model's are."""
    monkeypatch.setattr(mapped, "MIN_BYTES", 0)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    return mlx_mxfp4(tmp_path_factory.mktemp("paging") / "mxfp4", preset("tiny"))


def experts_of(model) -> list[SplitPackedExperts]:
    return [m for m in model.modules() if isinstance(m, SplitPackedExperts)]


def test_experts_are_paged_only_when_the_checkpoint_exceeds_available_memory(packed):
    model = checkpoint.load(packed, dtype=torch.float32)
    n_moe = len(experts_of(model))
    assert n_moe > 0
    assert mapped.page_experts(model, checkpoint_bytes=100, available=1000) == 0
    assert all(m.paged == () for m in experts_of(model))
    assert mapped.page_experts(model, checkpoint_bytes=1000, available=1000) == n_moe  # 1000 > 0.9 · 1000
    for m in experts_of(model):  # codes and scales of gate, up and down: the stacks a step reads
        assert {t.data_ptr() for t in m.paged} == {getattr(m, f"{h}{s}").data_ptr() for h in ("gate_proj", "up_proj",
                                                   "down_proj") for s in ("", "_scales")}


@pytest.mark.parametrize("backend", [False, True])
def test_will_need_advises_exactly_the_active_experts(packed, monkeypatch, backend):
    model = checkpoint.load(packed, dtype=torch.float32)
    if backend:
        cpu.prepare(model)
    mapped.page_experts(model, checkpoint_bytes=1, available=1)
    experts = experts_of(model)[0]
    calls = []
    real = mapped._madvise

    def spy(t, advice, start=0, nbytes=None):
        calls.append((t.data_ptr(), advice, start, nbytes))
        assert real(t, advice, start, nbytes) == 0  # a mapped tensor: page-widened ranges madvise accepts
        return 0

    monkeypatch.setattr(mapped, "_madvise", spy)
    counts = [0] * experts.num_experts
    counts[1], counts[5] = 2, 1
    xs = torch.randn(3, experts.down_proj_scales.shape[1])
    out = experts.grouped(xs, counts)
    want = set()
    for t in experts.paged:
        per_expert = t[0].numel() * t.element_size()
        want |= {(t.data_ptr(), mmap.MADV_WILLNEED, e * per_expert, per_expert) for e in (1, 5)}
    assert set(calls) == want
    experts.paged = ()  # the same products without the advice
    for got, ref in zip(out, experts.grouped(xs, counts), strict=True):
        assert torch.equal(got, ref)


def test_paged_model_generates_what_the_unpaged_one_does(packed, monkeypatch):
    plain = kimi_lm.load(packed, dtype=torch.float32)
    assert all(m.paged == () for m in experts_of(plain))  # a tiny checkpoint fits: no advice
    monkeypatch.setattr(mapped, "PAGED_FRACTION", 0.0)  # as if the checkpoint exceeded RAM
    paged = kimi_lm.load(packed, dtype=torch.float32)
    assert all(m.paged for m in experts_of(paged))
    with torch.no_grad():
        assert torch.equal(paged(IDS), plain(IDS))
    assert greedy(paged) == greedy(plain)


def greedy(model, steps: int = 6) -> list[int]:
    """A cached greedy decode from IDS: the one-token steps (the few-row expert path) as well as the prefill."""
    from kimi_lm.generate import forward_chunk

    cache, tokens = model.make_cache(1), []
    with torch.inference_mode():
        logits = forward_chunk(model, cache, IDS[0].tolist())
        for _ in range(steps):
            tokens.append(int(logits.argmax()))
            logits = forward_chunk(model, cache, tokens[-1:])
    return tokens


def test_experts_past_the_residency_budget_are_unmapped_least_recently_used_first(packed, monkeypatch):
    model = checkpoint.load(packed, dtype=torch.float32)
    total = sum(getattr(m, f"{h}{s}").nbytes for m in experts_of(model) for h in ("gate_proj", "up_proj", "down_proj")
                for s in ("", "_scales"))
    # no RAM to speak of beside a checkpoint 10x its experts: the budget's floor, a quarter of the experts
    mapped.page_experts(model, checkpoint_bytes=10 * total, available=1, ram=0)
    experts = experts_of(model)[0]
    residency = experts.residency
    assert residency is not None and all(m.residency is residency for m in experts_of(model))
    assert residency.budget == total // 4
    per_expert = sum(t[0].numel() * t.element_size() for t in experts.paged)
    dropped = []
    real = mapped._madvise

    def spy(t, advice, start=0, nbytes=None):
        if advice == mmap.MADV_DONTNEED:
            dropped.append((t.data_ptr(), start // nbytes))
        assert real(t, advice, start, nbytes) == 0
        return 0

    monkeypatch.setattr(mapped, "_madvise", spy)
    xs = torch.randn(1, experts.down_proj_scales.shape[1])
    order, first = [], None  # every expert of every MoE layer, once, in this order
    for m in experts_of(model):
        for e in range(m.num_experts):
            counts = [0] * m.num_experts
            counts[e] = 1
            out = m.grouped(xs, counts)[0]
            first = out if first is None else first
            order.append((id(m), e))
    fits = residency.budget // per_expert  # (every layer's experts have one size here)
    assert 0 < fits < len(order) and residency.mapped <= residency.budget
    # the oldest were dropped from the process once the budget was full, each expert's every stack; the newest stay
    assert len(dropped) == (len(order) - fits) * len(experts.paged)
    assert [e for _, e in dropped[:: len(experts.paged)]] == [e for _, e in order[: len(order) - fits]]
    assert list(residency.lru) == order[len(order) - fits :]
    counts = [0] * experts.num_experts
    counts[0] = 1  # dropped earlier: mapped again from the page cache, the same numbers
    assert torch.equal(experts.grouped(xs, counts)[0], first)
    assert list(residency.lru)[-1] == (id(experts), 0)
