"""Prefill and decode speed of kimi-lm vs llama.cpp on the same weights, in one run, with the decode roofline.

What runs:

* One random-weight Kimi Linear checkpoint, written by ``bench_kimi_linear.py``'s code (transformers writes it, then
  ``tests/checkpoints.py`` rewrites it in the official layout, which is what llama.cpp's converter reads). Config
  ``--config bench`` (8 layers 3:1 KDA:MLA, hidden 512, 16 experts top-4, vocab 8192: 66M parameters, 29M active)
  or ``real-layers`` (Kimi-Linear-48B-A3B's layer sizes in 4 layers, 723M parameters).
* llama.cpp: the copy vendored in the llama-cpp-python ``LLAMA_CPP_PYTHON`` sdist (``pip download``), ``llama-bench``
  built with cmake in ``--cache`` (default ``~/.cache/kimi_lm/llama.cpp``; nothing of it enters the repo). The
  checkpoint goes to GGUF (f32 and bf16) through the sdist's own ``convert_hf_to_gguf.py``, which knows Kimi Linear
  (``conversion/kimi_linear.py``). llama-bench measures ``pp{prompt}`` from an empty context and ``tg{gen}`` at depth
  ``{prompt}`` (``-d``), i.e. decode after the prompt, as kimi-lm is measured.
* kimi-lm: ``kimi_lm.load`` (CPU backend) on the same checkpoint; prefill the ``--prompt-tokens`` prompt into a fresh
  cache, then ``--gen-tokens`` greedy steps (each feeds the previous argmax).
* Roofline: a decode step must read the active weights (all but the unselected experts and the embedding table) and
  the cache once; the bytes a 256 MiB copy on ``--threads`` threads reads per second (the best seen in the run; half
  of STREAM's "copy" figure, which counts the writes too) divided by those bytes is the decode roofline, as
  bench_kimi_linear.py computes it. Each engine's fraction of it is printed. It is a yardstick, not a bound: a
  stream that only reads can beat the read half of a copy (llama.cpp's fp32 decode does, slightly).

Both engines run ``--threads`` threads, taking turns (never at once: llama-bench, then kimi-lm, ``--repeats``
times); each number is the best of its ``--repeats`` runs. Neither counts its warm-up run.

One adjustment to the converter, made in its process only: it names the GGUF pre-tokenizer by hashing the ids of a
fixed text and knows only the real Kimi tokenizer's hash (160k tokens); ours is the bundled model's 4k-token BPE with
the same Kimi regex (``kimi_lm.tokenizer.PAT_STR``, llama.cpp's ``kimi-k2``), so the hash lookup is replaced by that
name. The weights go through the converter untouched. The converter reads the vocabulary from a ``tokenizer.json``
(written here from ``tiktoken.model`` by transformers' ``TikTokenConverter``; it encodes as kimi-lm does).

Prints a table, then one JSON line. Temporary checkpoints and GGUF files are removed at the end.

    python benchmarks/bench_llama_cpp.py [--threads 2] [--prompt-tokens 1024] [--gen-tokens 32] [--config bench]

References: llama.cpp ``tools/llama-bench``, ``convert_hf_to_gguf.py``, ``src/models/kimi-linear.cpp``; gpt-fast
(achieved bandwidth as the decode yardstick); STREAM (McCalpin) for the copy kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kimi_lm  # noqa: E402
from bench_kimi_linear import build_reference, copy_bandwidth, real_layers_config, save_reference  # noqa: E402 (puts tests/ on path)
from checkpoints import to_official_layout  # noqa: E402
from kimi_lm.config import preset  # noqa: E402
from kimi_lm.estimate import estimate  # noqa: E402
from kimi_lm.tokenizer import PAT_STR  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"  # the llama-cpp-python release whose vendored llama.cpp is measured
DTYPES = {"fp32": ("f32", torch.float32, 4), "bf16": ("bf16", torch.bfloat16, 2)}  # ours: (GGUF outtype, torch, bytes)

# Runs the sdist's converter unchanged except for the pre-tokenizer lookup (see the module docstring).
CONVERT = """
import sys
sys.path.insert(0, sys.argv[1])
import convert_hf_to_gguf
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "kimi-k2"
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
convert_hf_to_gguf.main()
"""


def run_logged(cmd: list[str], log: Path, what: str, **kw) -> None:
    """Run ``cmd``, output to ``log``; on failure raise with the log's tail (a build prints thousands of lines)."""
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, **kw)
    if proc.returncode:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")


def llama_cpp_sources(cache: Path) -> Path:
    """The llama.cpp tree vendored in the llama-cpp-python sdist, downloaded and unpacked into ``cache`` once."""
    root = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    src = root / "vendor" / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").is_file():
        return src
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.is_file():
        print(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist ...", file=sys.stderr)
        run_logged([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(cache)], cache / "download.log", "pip download")
    with tarfile.open(sdist) as tar:
        tar.extractall(cache, filter="data")
    return src


def build_llama_bench(src: Path, cache: Path, skip_build: bool) -> Path:
    """``llama-bench`` built from ``src`` (static, native CPU flags; cmake's incremental build makes reruns quick)."""
    build = cache / f"build-{LLAMA_CPP_PYTHON}"
    binary = build / "bin" / "llama-bench"
    if skip_build:
        if not binary.is_file():
            raise SystemExit(f"--skip-build: {binary} does not exist; run once without --skip-build")
        return binary
    print(f"building llama-bench in {build} (the first build takes ~10 minutes on 2 cores) ...", file=sys.stderr)
    run_logged(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
                "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF"],
               cache / "cmake.log", "cmake configure")
    run_logged(["cmake", "--build", str(build), "--target", "llama-bench", "-j", str(os.cpu_count() or 2)],
               cache / "build.log", "cmake build")
    return binary


def write_checkpoint(cfg, out: Path) -> int:
    """Random weights in the official Kimi Linear layout + a tokenizer.json for the converter; returns #params."""
    ref = build_reference(cfg)
    n_params = sum(p.numel() for p in ref.parameters())
    save_reference(ref, out / "transformers")
    to_official_layout(out / "transformers", out / "official")
    shutil.rmtree(out / "transformers")
    del ref
    config = json.loads((out / "official" / "config.json").read_text())
    config.setdefault("architectures", ["KimiLinearForCausalLM"])  # as the official one has; the converter needs it
    (out / "official" / "config.json").write_text(json.dumps(config, indent=2))
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = kimi_lm.load_tokenizer(kimi_lm.DEFAULT_MODEL)
    fast = TikTokenConverter(vocab_file=str(kimi_lm.DEFAULT_MODEL / "tiktoken.model"), pattern=PAT_STR,
                             extra_special_tokens=tok.encoding._special_tokens).converted()
    fast.save(str(out / "official" / "tokenizer.json"))
    return n_params


def convert(src: Path, hf_dir: Path, outtype: str, gguf: Path, log: Path) -> None:
    run_logged([sys.executable, "-c", CONVERT, str(src), str(hf_dir), "--outtype", outtype, "--outfile", str(gguf)],
               log, f"convert_hf_to_gguf.py --outtype {outtype}")


def llama_bench(binary: Path, gguf: Path, threads: int, prompt: int, gen: int, repeats: int) -> tuple[float, float]:
    """(prefill tok/s of pp{prompt}, decode tok/s of tg{gen} at depth {prompt}), each the best repetition."""
    best = {}
    tests = {"prefill": ["-p", str(prompt), "-n", "0"], "decode": ["-p", "0", "-n", str(gen), "-d", str(prompt)]}
    for test, flags in tests.items():
        cmd = [str(binary), "-m", str(gguf), "-t", str(threads), "-r", str(repeats), "-o", "json", *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
        (row,) = json.loads(proc.stdout)
        tokens = row["n_prompt"] + row["n_gen"]  # the tokens timed; the depth is filled before the clock starts
        best[test] = tokens / (min(row["samples_ns"]) * 1e-9)
    return best["prefill"], best["decode"]


@torch.inference_mode()
def kimi_lm_speed(model, prompt: torch.Tensor, gen: int) -> tuple[float, float]:
    """(prefill tok/s, greedy decode tok/s) of one run: prefill into a fresh cache, then ``gen`` argmax steps."""
    t0 = time.perf_counter()
    cache = model.make_cache(batch_size=1)
    logits = model(prompt, cache=cache)
    t1 = time.perf_counter()
    for _ in range(gen):
        logits = model(logits[:, -1:].argmax(-1), cache=cache)
    t2 = time.perf_counter()
    return prompt.shape[1] / (t1 - t0), gen / (t2 - t1)


def decode_bytes(cfg, dtype_bytes: int, depth: int) -> int:
    """Bytes a batch-1 decode step at ``depth`` reads: active weights (one embedding row), KDA state, MLA cache."""
    e = estimate(cfg, context=depth, cache_dtype="fp32" if dtype_bytes == 4 else "bf16")
    return e.active_params_no_embeddings * dtype_bytes + cfg.hidden_size * dtype_bytes + e.cache_bytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=["bench", "real-layers"], default="bench",
                    help="bench: 66M params / 29M active; real-layers: Kimi-Linear-48B's layer sizes (default bench)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both engines (default 2)")
    ap.add_argument("--prompt-tokens", type=int, default=1024, help="prefill length and decode depth (default 1024)")
    ap.add_argument("--gen-tokens", type=int, default=32, help="greedy decode steps (default 32)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per measurement, best kept (default 3)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma-separated, of fp32, bf16 (default both)")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "kimi_lm" / "llama.cpp",
                    help="where the sdist is unpacked and llama.cpp built (default ~/.cache/kimi_lm/llama.cpp)")
    ap.add_argument("--skip-build", action="store_true", help="use the llama-bench already built in --cache")
    args = ap.parse_args(argv)
    dtypes = args.dtypes.split(",")
    if not set(dtypes) <= set(DTYPES):
        ap.error(f"--dtypes: choose from {', '.join(DTYPES)}, got {args.dtypes}")
    torch.set_num_threads(args.threads)

    src = llama_cpp_sources(args.cache)
    binary = build_llama_bench(src, args.cache, args.skip_build)
    cfg = preset("bench") if args.config == "bench" else real_layers_config()
    bandwidth = copy_bandwidth()  # re-measured between runs too: the best of all is the roofline's
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))

    rows = []
    with tempfile.TemporaryDirectory(prefix="kimi-llama-bench-") as tmp:  # removed however the run ends
        tmp = Path(tmp)
        print(f"writing the {args.config} checkpoint ...", file=sys.stderr)
        n_params = write_checkpoint(cfg, tmp)
        hf_dir = tmp / "official"
        for name in dtypes:
            outtype, torch_dtype, nbytes = DTYPES[name]
            gguf = tmp / f"model-{outtype}.gguf"
            print(f"{name}: converting to GGUF, running llama-bench, then kimi-lm ...", file=sys.stderr)
            convert(src, hf_dir, outtype, gguf, tmp / f"convert-{outtype}.log")
            model = kimi_lm.load(hf_dir, dtype=torch_dtype)
            kimi_lm_speed(model, prompt, args.gen_tokens)  # warm-up (oneDNN primitives, allocator), as llama-bench's
            ll_prefill = ll_decode = ours_prefill = ours_decode = 0.0
            for _ in range(args.repeats):  # the engines alternate, so other load on the machine hits both alike
                pre, dec = llama_bench(binary, gguf, args.threads, args.prompt_tokens, args.gen_tokens, repeats=1)
                ll_prefill, ll_decode = max(ll_prefill, pre), max(ll_decode, dec)
                pre, dec = kimi_lm_speed(model, prompt, args.gen_tokens)
                ours_prefill, ours_decode = max(ours_prefill, pre), max(ours_decode, dec)
                bandwidth = max(bandwidth, copy_bandwidth())
            del model
            gguf.unlink()
            rows.append({"dtype": name, "llama_cpp_prefill_tok_s": ll_prefill, "llama_cpp_decode_tok_s": ll_decode,
                         "kimi_lm_prefill_tok_s": ours_prefill, "kimi_lm_decode_tok_s": ours_decode,
                         "decode_bytes": decode_bytes(cfg, nbytes, args.prompt_tokens + args.gen_tokens // 2)})
    for r in rows:  # with the best bandwidth seen over the whole run
        roofline = bandwidth / r["decode_bytes"]
        r.update(decode_roofline_tok_s=roofline, kimi_lm_decode_vs_llama_cpp=r["kimi_lm_decode_tok_s"] /
                 r["llama_cpp_decode_tok_s"], kimi_lm_decode_roofline_fraction=r["kimi_lm_decode_tok_s"] / roofline,
                 llama_cpp_decode_roofline_fraction=r["llama_cpp_decode_tok_s"] / roofline)

    by = {r["dtype"]: r for r in rows}

    def row(label, prefill, decode):  # one markdown row: a cell per dtype for prefill, then for decode
        return "| " + " | ".join([label] + [prefill(by[d]) for d in dtypes] + [decode(by[d]) for d in dtypes]) + " |"

    print(f"{args.config} config: {n_params / 1e6:.1f}M parameters; prompt {args.prompt_tokens}, then "
          f"{args.gen_tokens} decode steps; {args.threads} threads; best of {args.repeats}; llama.cpp from "
          f"llama-cpp-python {LLAMA_CPP_PYTHON}; copy bandwidth {bandwidth / 1e9:.1f} GB/s")
    print("| tok/s | " + " | ".join([f"prefill {d}" for d in dtypes] + [f"decode {d}" for d in dtypes]) + " |")
    print("|---|" + "---|" * 2 * len(dtypes))
    print(row("llama.cpp", lambda r: f"{r['llama_cpp_prefill_tok_s']:.0f}",
              lambda r: f"{r['llama_cpp_decode_tok_s']:.0f}"))
    print(row("kimi-lm", lambda r: f"{r['kimi_lm_prefill_tok_s']:.0f}", lambda r: f"{r['kimi_lm_decode_tok_s']:.0f}"))
    print(row("copy-bandwidth roofline", lambda r: "", lambda r: f"{r['decode_roofline_tok_s']:.0f}"))
    print(row("kimi-lm / llama.cpp", lambda r: f"{r['kimi_lm_prefill_tok_s'] / r['llama_cpp_prefill_tok_s']:.2f}x",
              lambda r: f"{r['kimi_lm_decode_vs_llama_cpp']:.2f}x"))
    print(row("kimi-lm / roofline", lambda r: "", lambda r: f"{r['kimi_lm_decode_roofline_fraction']:.0%}"))
    print(row("llama.cpp / roofline", lambda r: "", lambda r: f"{r['llama_cpp_decode_roofline_fraction']:.0%}"))
    print(json.dumps({"benchmark": "kimi_linear_cpu_vs_llama_cpp", "config": args.config, "params": n_params,
                      "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "threads": args.threads,
                      "repeats": args.repeats, "llama_cpp_python": LLAMA_CPP_PYTHON,
                      "copy_bandwidth_bytes_s": bandwidth, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
