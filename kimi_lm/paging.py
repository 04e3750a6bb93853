"""Memory-mapped weights against RAM: what a loaded model keeps resident, what it only maps, and whether it fits or
runs paged — plus a roofline guess at its speed when it does not fit.

Loading with ``mmap`` (``kimi_lm.mapped``) splits a model's bytes in two:

* mapped: tensors kept as stored (packed codes and scales, floats at the compute dtype): views of the checkpoint's
  pages. They cost RAM only while in the page cache, count toward RSS only while mapped and cached, and the kernel
  evicts them under pressure and reads them again on the next touch.
* resident: the process's own memory: tensors converted at load (dtype casts, stacked per-expert tensors) or by the
  CPU backend (float linears repacked for oneDNN, affine 4-bit moved to the int4 kernel layout), caches,
  activations and the runtime (PyTorch and its libraries).

Verdict for a RAM size: "fits" when resident + mapped ≤ usable RAM (every page stays cached after first use);
"runs, paged" when resident fits but not resident + mapped: the mapped bytes beyond the page cache come from disk
each time they are needed again; "does not fit" when the resident part alone exceeds RAM.

Speed, a roofline with three rates of the machine (:class:`Machine`, defaults measured on the 2-core AVX-512 box the
full-size benchmark ran on): a decode step reads the active weights (``memory.Tensor.active``: routed experts used
by one token, everything else) at ``decode_bytes_per_s``; a prefill of P tokens computes 2 · active params · P
flops at ``flops`` and reads the experts the prompt routes to (all of them past a few hundred tokens); bytes that
missed the page cache come from disk at ``disk_bytes_per_s``. The miss rate of a mapped byte is taken as
1 − page cache / mapped bytes (uniform use of experts, an LRU cache: random routing is the worst case).

Reference: ``benchmarks/bench_full_size.py`` (the 48B MXFP4 checkpoint on a 24 GiB machine, measured beside these
predictions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kimi_lm.mapped import RESIDENT_FRACTION
from kimi_lm.memory import Quant, Tensor, make_quant, recorded_quant, tensor_bytes, tensors

RUNTIME_BYTES = 400 << 20  # PyTorch, its libraries, the C kernels, the tokenizer: measured VmRSS of a tiny model
USABLE = 0.90  # of RAM for this process and its page cache (the OS and other processes keep the rest)


@dataclass(frozen=True)
class Machine:
    ram: int
    disk_bytes_per_s: float = 1.2e9  # sequential reads, O_DIRECT (dd), the benchmark box's virtio disk
    # packed bytes a decode step streams: bench_quant_decode --config real-layers, MXFP4, 47 tok/s x 294 MB active
    # = 13.9 GB/s on 2 quiet cores; 10 GB/s for a full model's scattered experts
    decode_bytes_per_s: float = 10e9
    # prefill matrix products (dequantize a tile + matmul, bf16, 2 cores): the 48B MXFP4 512-token prefill took
    # 42-52 s on a quiet box for 2 x 3.5e9 active parameters x 512 tokens (its 26 GB of reads included: they overlap
    # with the products); 516 s with four other test runs on the same 2 cores
    flops: float = 70e9
    # load: the 48B MXFP4 checkpoint (1,038 tensors) took 2.0 s here, checkpoint.load + cpu.prepare
    load_s_per_tensor: float = 0.001  # header, names table, a mapping (or a read) per tensor
    load_base_s: float = 1.0  # the meta-device model, the backend's swaps


@dataclass(frozen=True)
class Split:
    """A model's bytes once loaded: ``mapped`` (views of the checkpoint) and ``resident`` (its own memory)."""

    mapped: int
    converted: int  # part of ``resident``: weights copied at load or by the backend
    resident: int
    active_bytes: int  # read by one decode step
    active_params: int
    expert_bytes: int  # routed experts (mapped or not)
    tensors: int


def _weights(config, q: Quant | None, dtype_bytes: int, router: Quant | None) -> list[tuple[Tensor, int]]:
    q = q or make_quant("bf16" if dtype_bytes == 2 else "fp32")
    return [(t, tensor_bytes(t, q, dtype_bytes, router)) for t in tensors(config)]


def split(config, quant: Quant | None = None, dtype_bytes: int = 2, router_quant: Quant | None = None,
          mmap: bool = True, backend: bool = True, cache_bytes: int = 0, activation_bytes: int = 0) -> Split:
    """Mapped vs resident bytes of ``config`` stored as ``quant`` (None: float at ``dtype_bytes``) and loaded with
    or without ``mmap``; ``backend``: the CPU backend repacks float linears (a copy) and affine 4-bit (a copy)."""
    mapped = converted = active = params = experts = count = 0
    for t, nbytes in _weights(config, quant, dtype_bytes, router_quant):
        grouped = quant is not None and quant.group and t.kind in ("linear", "embedding", "lm_head", "router")
        parts = 3 if grouped and quant.name.startswith("affine") else 2 if grouped else 1  # weight, scales[, biases]
        count += parts * (1 if quant is not None and quant.group else t.count)  # MLX stacks experts: one tensor
        params += t.active_numel
        share = 1.0 if t.active is None else t.active / t.count
        active += int(nbytes * share)
        experts += nbytes if t.component == "experts" else 0
        float_linear = (quant is None or quant.is_float or t.shape[-1] % max(quant.group, 1)) and t.kind in (
            "linear", "lm_head")
        per_expert_files = t.component == "experts" and not (quant is not None and quant.group)  # stacked at load
        copied = (not mmap or per_expert_files or backend and float_linear
                  or backend and quant is not None and quant.name == "affine4" and t.kind == "linear")
        if copied:
            converted += nbytes
        else:
            mapped += nbytes
    return Split(mapped, converted, converted + RUNTIME_BYTES + cache_bytes + activation_bytes, active, params,
                 experts, count)


def verdict(s: Split, ram: int) -> str:
    usable = USABLE * ram
    if s.resident > usable:
        return "does not fit"
    return "fits" if s.resident + s.mapped <= usable else "runs, paged"


def miss_rate(s: Split, ram: int) -> float:
    """Share of mapped bytes not in the page cache when needed again (uniform use, LRU)."""
    cache = max(USABLE * ram - s.resident, 0)
    return 0.0 if s.mapped <= cache else 1 - cache / s.mapped


def speed(config, s: Split, m: Machine, prompt: int) -> dict:
    """Predicted load_s, first_token_s (= prefill of ``prompt`` tokens), prefill_tok_s and decode_tok_s."""
    miss = miss_rate(s, m.ram)
    E, k = getattr(config, "routed_experts", 0), getattr(config, "experts_per_token", 0)
    used = 1 - (1 - k / E) ** prompt if E else 1.0  # share of each layer's experts a prompt routes to
    prefill_bytes = s.active_bytes - s.expert_bytes * k / max(E, 1) + s.expert_bytes * used
    prefill_s = max(2 * s.active_params * prompt / m.flops, prefill_bytes / m.decode_bytes_per_s)
    prefill_s += (miss if s.mapped else 0) * prefill_bytes / m.disk_bytes_per_s
    # a decode step after a prefill: its routed experts' bytes missed at the page cache's miss rate (the rest of a
    # step's bytes is read by every step: never the least recently used, it stays cached)
    expert_share = k / max(E, 1) if s.mapped else 0.0
    decode_s = s.active_bytes / m.decode_bytes_per_s + miss * s.expert_bytes * expert_share / m.disk_bytes_per_s
    load_s = m.load_base_s + s.tensors * m.load_s_per_tensor + s.converted / m.disk_bytes_per_s
    return {"load_s": load_s, "first_token_s": prefill_s, "prefill_tok_s": prompt / prefill_s,
            "decode_tok_s": 1 / decode_s, "miss_rate": miss}


def predict(path, ram: int, prompt: int = 512, machine: Machine | None = None, mmap: bool = True) -> dict:
    """What the estimator says about loading checkpoint ``path`` on a machine with ``ram`` bytes: bytes on disk,
    resident and mapped bytes, peak RSS (resident + the mapped pages the page cache can hold), the verdict and speed."""
    from kimi_lm.config import load_config

    path = Path(path)
    config = load_config(path / "config.json")
    raw = json.loads((path / "config.json").read_text())
    dtype_bytes = 4 if (raw.get("dtype") or raw.get("torch_dtype")) == "float32" else 2
    quant, router = recorded_quant(raw, dtype_bytes, str(path / "config.json"))
    s = split(config, quant, dtype_bytes, router, mmap=mmap)
    m = machine or Machine(ram)
    on_disk = sum(tensor_bytes(t, quant or make_quant("bf16"), dtype_bytes, router) for t in tensors(config))
    # paged: the experts kept mapped have a budget (kimi_lm.mapped.page_experts); the rest stays in the page cache
    budget = RESIDENT_FRACTION * ram if verdict(s, ram) == "runs, paged" else USABLE * ram - s.resident
    peak = s.resident + min(s.mapped, max(budget, 0))
    return {"checkpoint_bytes": on_disk, "resident_bytes": s.resident, "mapped_bytes": s.mapped,
            "peak_rss_bytes": int(peak), "verdict": verdict(s, ram), **speed(config, s, m, prompt)}


def ram_answer(config, quant: Quant | None, dtype_bytes: int, router: Quant | None, ram: int, cache_bytes: int,
               activation_bytes: int) -> dict:
    """``kimi-lm estimate --ram``: resident vs mapped bytes and the verdict, with and without mmap."""
    out = {"ram_bytes": ram}
    for mmap in (True, False):
        s = split(config, quant, dtype_bytes, router, mmap=mmap, cache_bytes=cache_bytes,
                  activation_bytes=activation_bytes)
        out["mmap" if mmap else "read"] = {"resident_bytes": s.resident, "mapped_bytes": s.mapped,
                                           "verdict": verdict(s, ram),
                                           "page_cache_miss_rate": round(miss_rate(s, ram), 3)}
    return out



def ram_report(model, ram: str, e, quant: str | None = None, group_size: int | None = None) -> tuple[dict, str]:
    """``kimi-lm estimate MODEL --ram 24G``: (JSON-ready dict, text lines) for the estimate ``e`` of ``model``."""
    from kimi_lm.estimate import fmt_bytes, load_source, parse_device

    src = load_source(model)
    _, capacity, _, label = parse_device(ram)
    q = (src.recorded_quant if quant is None and group_size is None and src.recorded_quant
         else make_quant(quant or src.dtype, group_size, src.dtype_bytes))
    out = ram_answer(src.config, None if q.is_float else q, src.dtype_bytes, src.router_quant, capacity,
                     e.cache_bytes, e.activation_bytes)
    lines = [f"RAM {label}:"]
    for how, what in (("mmap", "memory-mapped (default)"), ("read", "read into memory")):
        r = out[how]
        lines.append(f"  {what:<24} resident {fmt_bytes(r['resident_bytes']):>10}, mapped "
                     f"{fmt_bytes(r['mapped_bytes']):>10}: {r['verdict']}"
                     + (f" (~{r['page_cache_miss_rate']:.0%} of mapped reads from disk)" if r["verdict"] == "runs, paged"
                        else ""))
    return out, "\n".join(lines)
