"""Kimi-Linear-48B-A3B at full size in the MLX MXFP4 layout, loaded and generating on a machine smaller than it.

    python benchmarks/bench_full_size.py --out /tmp/kimi-linear-48b-mxfp4 [--prompt 512] [--tokens 16] [--keep]

1. Writes (once; skipped when DIR holds it already) a synthetic checkpoint with exactly the official 48B config and the
   tensor names, shapes, dtypes, 5 GB shards and index that ``mlx_lm.convert -q --q-mode mxfp4`` writes (mlx-lm 0.32.2
   kimi_linear: experts stacked under ``mlp.switch_mlp``, every Linear / Embedding / expert stack MXFP4 (uint32 codes,
   E8M0 uint8 scale per 32), the router ``mlp.gate`` affine 8-bit g64 with bf16 scales and biases, norms and convs
   bf16, ``A_log`` / ``dt_bias`` / ``e_score_correction_bias`` fp32), streaming one tensor at a time through
   ``checkpoint.write_safetensors`` and ``plan_shards``. Random codes with scales 2^round(-log2(2.9 sqrt(K))) (E2M1
   codes have RMS ~2.9), so every product keeps unit scale and activations stay finite.
2. Evicts the shards from the page cache (posix_fadvise DONTNEED: cold, as after a reboot), loads with
   ``kimi_lm.load`` (memory-mapped: packed tensors stay in the page cache, shared, never copied), then generates
   ``--tokens`` greedy tokens from a random ``--prompt``-token prompt, twice: cold (pages come from disk as the
   experts are first used) and warm (second prompt, same process).
3. Prints a table and one JSON line: checkpoint_bytes, load_s, peak_rss_bytes, first_token_s, decode_tok_s,
   prefill_tok_s, each with the estimator's prediction (``kimi_lm.paging.predict``) beside it, plus page faults and
   disk bytes read per phase.

When the model exceeds RAM it still runs: the weights are clean file-backed pages, which the kernel evicts and reads
again instead of the process running out of memory; the process's own (anonymous) memory stays ~0.3-0.6 GiB.
Prefill routes a prompt to nearly every expert (P(expert unused) = (1 - 8/256)^T per layer: 1.7 % at T = 128,
1e-7 at 512), so it streams the whole checkpoint once, layer by layer: at least checkpoint bytes / disk bandwidth.
A decode step needs 8 of 256 experts per layer (~0.8 GB of the ~1.9 GB it reads); with ~19 GiB of page cache for
26 GB of weights part of those miss. A page fault reads the whole read-ahead window around it (read_ahead_kb = 8 MiB
here, ~7 experts of 1.2 MB), so faulting experts in reads several times the bytes needed and evicts pages still in
use; and a mapped page counts in the process's RSS until the kernel reclaims it, so on an idle machine the RSS grows
to ~90 % of RAM. ``kimi_lm.load`` therefore pages the experts of a checkpoint larger than the memory available
(``mapped.page_experts``, what this script calls after ``cpu.prepare``; ``--no-paging`` to compare): MADV_RANDOM on
the expert stacks, MADV_WILLNEED on exactly the active experts' byte ranges before the products, all at once, and
the experts kept mapped held to a budget (70 % of RAM less the rest of the checkpoint; past it the least recently
used expert is unmapped with MADV_DONTNEED, its pages staying in the page cache).

Measured here (2-core AMD EPYC, AVX-512 BF16, 23.5 GiB RAM, virtio disk ~1.2 GB/s), the defaults (512-token
prompt, 16 tokens), one run each on a quiet box:

                                       --no-paging (page faults)        paged experts (default)
    load (checkpoint.load + prepare)   1.0 s, 0.41 GB read              1.2 s, 0.42 GB read
    peak RSS                           20.97 GiB = 89 % of RAM          17.16 GiB = 73 % (own memory 0.7 GiB)
    cold: first token (512 tokens)     42.1 s, 25.8 GB read             52.0 s, 25.7 GB read
    cold: decode                       1.78 tok/s, 776 MB per token     5.17 tok/s, 67 MB per token
    warm: decode                       2.17 tok/s, 435 MB per token     5.33 tok/s, 65 MB per token
    estimator (kimi_lm.paging)                                          peak RSS 16.9 GiB, first token 54 s,
                                                                        decode 3.6 tok/s

With four other test runs on the same 2 cores the same checkpoint took 516-609 s to the first token and decoded at
0.13-0.16 tok/s faulting, 0.97-1.73 tok/s paged. A machine whose RAM holds the 26 GB (32 GB+) reads nothing after
the first pass ("fits"); here a paged decode step still reads ~65 MB, ~55 ms of disk, beside ~0.14 s of products.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kimi_lm import names
from kimi_lm.checkpoint import FP32_SUFFIXES, plan_shards, write_safetensors
from kimi_lm.config import preset
from kimi_lm.model.kimi_linear import KimiLinearForCausalLM
from kimi_lm.quant.mlx_layout import INDEX, MAX_SHARD_BYTES, _Group, _nbytes, _plan_quant, mlx_name
from kimi_lm.quant.packed import QuantSpec

MXFP4 = QuantSpec("mxfp4", 4, 32)
E2M1_RMS = 2.93  # sqrt(mean(v^2)) over the 16 E2M1 codes


# ---- 1. the synthetic checkpoint ---------------------------------------------------------------------------------
def mlx_groups(config) -> list[_Group]:
    """Every float tensor of the MLX model (before quantization), by MLX name, from the meta-device model."""
    with torch.device("meta"):
        model = KimiLinearForCausalLM(config)
    groups = []
    for param, t in model.state_dict().items():
        if config.tie_word_embeddings and param == "lm_head.weight":
            continue
        dtype = torch.float32 if param.endswith(FP32_SUFFIXES) else torch.bfloat16
        shape = list(t.shape)
        if param.endswith(".kv_b_proj.weight"):  # mlx-lm's per-head halves
            H, nope, v, latent = (config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim,
                                  config.kv_lora_rank)
            base = param.removesuffix(".weight")
            groups.append(_Group(mlx_name(f"{base}.embed_q.weight"), dtype, [H, latent, nope], None))
            groups.append(_Group(mlx_name(f"{base}.unembed_out.weight"), dtype, [H, v, latent], None))
        elif param.endswith("_conv1d.weight"):  # MLX Conv1d [D, W, 1]
            groups.append(_Group(mlx_name(param), dtype, [shape[0], shape[2], shape[1]], None, target=param))
        elif param.endswith(".experts.gate_up_proj"):  # switch_mlp.gate_proj / up_proj [E, I, hidden]
            for half in ("gate_all", "up_all"):
                groups.append(_Group(mlx_name(param, half), dtype, names.checkpoint_shape(shape, half), None))
        else:
            groups.append(_Group(mlx_name(param), dtype, shape, None, target=param))
    return sorted(groups, key=lambda g: g.name)


def synthetic(name: str, dtype: torch.dtype, shape: list[int], rng: np.random.Generator, in_features: int):
    """Random contents for one MLX tensor: packed codes, scales keeping unit-scale products, plausible floats."""
    n = math.prod(shape)
    if dtype == torch.uint32:  # packed codes: random bytes
        return torch.frombuffer(bytearray(rng.bytes(4 * n)), dtype=torch.uint32).view(shape)
    if dtype == torch.uint8:  # E8M0 scales: 2^e with 2.9 * 2^e ~ 1/sqrt(K), jittered by one binade
        e = 127 + round(-math.log2(E2M1_RMS * math.sqrt(in_features)))
        return torch.from_numpy(rng.integers(e - 1, e + 1, size=shape, dtype=np.uint8, endpoint=True))
    if name.endswith("mlp.gate.scales"):  # affine 8-bit router: w = s q + b uniform in [-a, a], a = sqrt(3/K)
        return torch.full(shape, 2 * math.sqrt(3 / in_features) / 255, dtype=dtype)
    if name.endswith("mlp.gate.biases"):
        return torch.full(shape, -math.sqrt(3 / in_features), dtype=dtype)
    if name.endswith("A_log"):
        return torch.from_numpy(np.log(rng.uniform(1, 16, size=shape))).to(dtype)
    if name.endswith("dt_bias"):
        return torch.full(shape, -4.0, dtype=dtype)  # softplus(-4) ~ 0.018: a typical step
    if name.endswith("e_score_correction_bias"):
        return torch.zeros(shape, dtype=dtype)
    if name.endswith("conv.weight"):
        return (torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)) * 0.2).to(dtype)
    return torch.ones(shape, dtype=dtype)  # norms


def write_checkpoint(out: Path, config, seed: int = 0) -> int:
    """The synthetic checkpoint in ``out`` (written into ``out.tmp`` and renamed when complete); returns its bytes."""
    groups = mlx_groups(config)
    block = _plan_quant(groups, MXFP4)
    shards = plan_shards(groups, lambda g: sum(_nbytes(e) for e in g.entries.values()), MAX_SHARD_BYTES)
    in_features = {name: g.shape[-1] for g in groups for name in g.entries}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng, total, weight_map = np.random.default_rng(seed), 0, {}
    params = sum(math.prod(g.shape) for g in groups)
    t0 = time.perf_counter()
    for i, part in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        entries = {name: e for g in part for name, e in g.entries.items()}
        total += write_safetensors(tmp / file, entries, lambda name: synthetic(name, *entries[name], rng,
                                                                                in_features[name]),
                                   metadata={"format": "mlx"})
        weight_map.update({name: file for name in entries})
        print(f"  wrote {file}: {total / 1e9:.1f} GB, {time.perf_counter() - t0:.0f} s", flush=True)
    index = {"metadata": {"total_size": total, "total_parameters": params}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX).write_text(json.dumps(index, indent=4))
    raw = json.loads(json.dumps(config.to_dict()))
    raw["quantization"] = raw["quantization_config"] = block
    (tmp / "config.json").write_text(json.dumps(dict(sorted(raw.items())), indent=4))
    os.sync()
    tmp.rename(out)
    return total


# ---- 2. load and generate ----------------------------------------------------------------------------------------
def use_fused_kernels() -> bool:
    """Route packed products of up to ``KERNEL_ROWS`` rows to the fused C products that read MLX-packed bytes in
    place (``kimi_lm/cpu/kernels/quant.c``, ``quant_matmul``) instead of dequantizing tiles in PyTorch (~40x slower
    per decode product here). ``kimi_lm.cpu.prepare`` now routes products of up to 8 rows there; this also sends the
    9-64-row products of a prefill (each expert's ~16 rows of a 512-token prompt). False without the library."""
    from kimi_lm import mapped
    from kimi_lm.quant import packed

    try:
        from kimi_lm.cpu import quant_kernels as native
    except ImportError:
        from kimi_lm.cpu import native
    if not hasattr(native, "quant_matmul") or native.quant_library() is None:
        return False
    plain = packed.packed_linear

    def fast(x, spec, q, scales, biases):
        rows = x.numel() // x.shape[-1]
        if rows > KERNEL_ROWS or x.dtype not in (torch.float32, torch.bfloat16) or not q.is_contiguous():
            return plain(x, spec, q, scales, biases)
        return native.quant_matmul(x.contiguous(), spec.mode, spec.bits, spec.group_size, q, scales.contiguous(),
                                   None if biases is None else biases.contiguous(), torch.get_num_threads())

    packed.packed_linear = mapped.packed_linear = fast
    return True


KERNEL_ROWS = 64  # beyond this the C product is no faster than dequantize + matmul


def shard_files(out: Path) -> list[Path]:
    return sorted(out.glob("*.safetensors"))


def evict(out: Path) -> None:
    """Drop the shards' clean pages from the page cache (only these files; no root-wide drop_caches)."""
    for f in shard_files(out):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def proc_status() -> dict[str, int]:
    """VmHWM / VmRSS / RssAnon / RssFile in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024
    return out


def counters() -> dict[str, float]:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {"t": time.perf_counter(), "major_faults": ru.ru_majflt, "minor_faults": ru.ru_minflt,
            "read_bytes": int(io["read_bytes"])}


def delta(a: dict, b: dict) -> dict:
    return {k: b[k] - a[k] for k in a}


def generate(model, prompt: list[int], tokens: int) -> dict:
    """Greedy decode: prefill (one forward over the prompt), then ``tokens - 1`` single-token steps."""
    from kimi_lm.generate import forward_chunk

    cache = model.make_cache(1)
    with torch.inference_mode():
        c0 = counters()
        logits = forward_chunk(model, cache, prompt)
        nxt = int(logits.argmax())
        c1 = counters()
        out = [nxt]
        for _ in range(tokens - 1):
            logits = forward_chunk(model, cache, [nxt])
            nxt = int(logits.argmax())
            out.append(nxt)
        c2 = counters()
    if not torch.isfinite(logits).all():
        raise RuntimeError("non-finite logits: the synthetic scales are off")
    pre, dec = delta(c0, c1), delta(c1, c2)
    return {"first_token_s": pre["t"], "prefill_tok_s": len(prompt) / pre["t"], "decode_tok_s": (tokens - 1) / dec["t"],
            "prefill": pre, "decode": dec, "tokens": out}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory (written if absent; ~26 GB)")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens (random ids)")
    p.add_argument("--tokens", type=int, default=16, help="tokens generated")
    p.add_argument("--warm-prompt", type=int, default=32, help="prompt tokens of the second (warm) generation")
    p.add_argument("--no-mmap", action="store_true", help="load with plain reads (needs RAM for the whole model)")
    p.add_argument("--preset", default="kimi-linear-48b-a3b", help="config (tiny / bench: a quick check)")
    p.add_argument("--write-only", action="store_true", help="write the checkpoint and stop")
    p.add_argument("--no-kernels", action="store_true", help="PyTorch dequantization only (see use_fused_kernels)")
    p.add_argument("--no-paging", action="store_true",
                   help="leave the experts to page faults (no mapped.page_experts: read-ahead windows, no RSS budget)")
    p.add_argument("--delete", action="store_true", help="delete the checkpoint at the end")
    args = p.parse_args(argv)

    config = preset(args.preset)
    if not (args.out / "config.json").is_file():
        print(f"writing the synthetic checkpoint to {args.out} ...", flush=True)
        write_checkpoint(args.out, config)
    if args.write_only:
        return
    from kimi_lm import checkpoint, cpu, mapped, paging

    ckpt_bytes = sum(f.stat().st_size for f in shard_files(args.out))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    # the speed prediction gets the RAM this process can have on a shared box: what is available now
    available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                     if line.startswith("MemAvailable:"))
    pred = paging.predict(args.out, ram=ram, prompt=args.prompt)
    pred.update({k: v for k, v in paging.predict(args.out, ram=available, prompt=args.prompt).items()
                 if k in ("load_s", "first_token_s", "prefill_tok_s", "decode_tok_s", "miss_rate")})
    kernels = not args.no_kernels and use_fused_kernels()
    evict(args.out)
    print(f"loading (page cache evicted; RAM {ram / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available) ...",
          flush=True)
    c0 = counters()
    model = checkpoint.load(args.out, dtype=torch.bfloat16, mmap=not args.no_mmap)
    cpu.prepare(model)  # what kimi_lm.load does on CPU, with the paging of experts below
    if not args.no_mmap and not args.no_paging:
        mapped.page_experts(model, ckpt_bytes)
    load = delta(c0, counters())
    after_load = proc_status()
    print(f"  loaded in {load['t']:.1f} s ({load['read_bytes'] / 1e6:.0f} MB read); RSS {after_load['VmRSS'] / 2**30:.2f} "
          f"GiB, anon {after_load['RssAnon'] / 2**30:.2f} GiB", flush=True)
    rng = np.random.default_rng(1)
    runs = {}
    for run, n in (("cold", args.prompt), ("warm", args.warm_prompt)):
        prompt = rng.integers(1000, config.vocab_size - 1000, size=n).tolist()
        runs[run] = generate(model, prompt, args.tokens)
        print(f"  {run}: first token {runs[run]['first_token_s']:.1f} s, decode {runs[run]['decode_tok_s']:.3f} tok/s",
              flush=True)
    status = proc_status()
    m = {"checkpoint_bytes": ckpt_bytes, "load_s": load["t"], "peak_rss_bytes": status["VmHWM"],
         "first_token_s": runs["cold"]["first_token_s"], "decode_tok_s": runs["cold"]["decode_tok_s"],
         "prefill_tok_s": runs["cold"]["prefill_tok_s"]}
    rows = [("checkpoint", f"{ckpt_bytes / 1e9:.2f} GB", f"{pred['checkpoint_bytes'] / 1e9:.2f} GB"),
            ("load", f"{load['t']:.1f} s", f"{pred['load_s']:.1f} s"),
            ("RSS after load (anon)", f"{after_load['VmRSS'] / 2**30:.2f} GiB ({after_load['RssAnon'] / 2**30:.2f})",
             f"{pred['resident_bytes'] / 2**30:.2f} GiB resident"),
            ("peak RSS (RAM)", f"{status['VmHWM'] / 2**30:.2f} GiB ({ram / 2**30:.1f})", f"{pred['peak_rss_bytes'] / 2**30:.2f} GiB"),
            ("verdict", "", pred["verdict"])]
    for run, r in runs.items():
        rows += [(f"{run}: first token", f"{r['first_token_s']:.1f} s", f"{pred['first_token_s']:.1f} s" if run == "cold" else ""),
                 (f"{run}: prefill", f"{r['prefill_tok_s']:.1f} tok/s", f"{pred['prefill_tok_s']:.1f} tok/s" if run == "cold" else ""),
                 (f"{run}: decode", f"{r['decode_tok_s']:.2f} tok/s", f"{pred['decode_tok_s']:.2f} tok/s" if run == "cold" else ""),
                 (f"{run}: prefill faults / read",
                  f"{r['prefill']['major_faults']:,} major, {r['prefill']['read_bytes'] / 1e9:.1f} GB", ""),
                 (f"{run}: decode faults / read per token",
                  f"{r['decode']['major_faults'] / (args.tokens - 1):,.0f} major, "
                  f"{r['decode']['read_bytes'] / (args.tokens - 1) / 1e6:.0f} MB", "")]
    print(f"{'':<36}{'measured':>28}{'estimator':>24}")
    for name, got, want in rows:
        print(f"{name:<36}{got:>28}{want:>24}")
    result = {**m, "predicted": {k: pred[k] for k in m}, "ram_bytes": ram, "available_bytes": available,
              "predicted_miss_rate": pred["miss_rate"], "mapped_bytes": pred["mapped_bytes"],
              "resident_bytes": pred["resident_bytes"], "rss_after_load_bytes": after_load["VmRSS"],
              "anon_after_load_bytes": after_load["RssAnon"], "anon_end_bytes": status["RssAnon"],
              "verdict": pred["verdict"], "load_read_bytes": load["read_bytes"], "load_major_faults": load["major_faults"],
              "warm": {k: runs["warm"][k] for k in ("first_token_s", "prefill_tok_s", "decode_tok_s")},
              "faults": {run: {"prefill": r["prefill"], "decode": r["decode"]} for run, r in runs.items()},
              "mmap": not args.no_mmap, "fused_kernels": kernels}
    if args.delete:
        shutil.rmtree(args.out)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
