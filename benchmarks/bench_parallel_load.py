"""What one rank of a ``--tp`` / ``--ep`` run reads and keeps, against one process loading the whole checkpoint.

    python benchmarks/bench_parallel_load.py [--dir /tmp/kimi-split-bench] [--plans tp2,ep2,tp2ep2] [--quantize mxfp4]

Writes (once) a random bf16 Kimi Linear checkpoint of ~0.45 GB (4 layers, 64 experts of 512, 16 heads; with
``--quantize MODE``: that checkpoint converted to mlx-lm's layout, every product packed, as ``kimi-lm convert`` does), then in
fresh processes: one process (``kimi_lm.checkpoint.load``, mmap, plain modules) and each plan under torchrun with 2
processes (``kimi_lm.distributed.load.load_sharded``). Before each process loads, the checkpoint's pages are
dropped from the page cache (``posix_fadvise(DONTNEED)``) and the ranks load one after the other, so each one's
``read_bytes`` (``/proc/self/io``: bytes this process made the disk read) is its own. Reported per process after
loading and after one 64-token forward: bytes read from disk, resident memory (RssAnon = its own, RssFile =
mapped checkpoint pages), and the peak (VmHWM). Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = dict(
    model_type="kimi_linear", vocab_size=32768, hidden_size=1024, num_hidden_layers=4, intermediate_size=2048,
    rms_norm_eps=1e-5, tie_word_embeddings=False, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
    kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, mla_use_nope=True, num_experts=64,
    num_experts_per_token=4, num_shared_experts=1, moe_intermediate_size=512, moe_layer_freq=1,
    first_k_dense_replace=1, moe_renormalize=True, routed_scaling_factor=2.0, num_expert_group=1, topk_group=1,
    linear_attn_config=dict(kda_layers=[1, 2, 3], full_attn_layers=[4], num_heads=16, head_dim=64,
                            short_conv_kernel_size=4),
    dtype="bfloat16")


def write_checkpoint(path: Path) -> None:
    """Random bf16 weights under the official names (per-expert w1/w3/w2), two shards and an index."""
    from safetensors.torch import save_file

    from kimi_lm import names
    from kimi_lm.checkpoint import _model_class
    from kimi_lm.config import config_from_dict

    path.mkdir(parents=True, exist_ok=True)
    config = config_from_dict(CONFIG)
    with torch.device("meta"):
        model = _model_class(config)(config)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for param, t in model.state_dict().items():
        for name, placement in names.to_checkpoint(param, names.family(config)):
            count = t.shape[0] if placement in names.PER_EXPERT else 1
            shape = names.expert_shape(t.shape, placement) if placement in names.PER_EXPERT else t.shape
            for e in range(count):
                w = torch.randn(shape, generator=g) * (0.02 if len(shape) > 1 else 1.0)
                if param.endswith("norm.weight"):
                    w = torch.ones(shape)
                tensors[name.format(E=e)] = w.to(torch.float32 if param.endswith(("A_log", "dt_bias",
                                                                                  "correction_bias")) else torch.bfloat16)
    keys = sorted(tensors)
    weight_map = {}
    for s in range(2):
        shard = f"model-{s + 1:05d}-of-00002.safetensors"
        part = {k: tensors[k].contiguous() for k in keys[s::2]}
        save_file(part, path / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(CONFIG))


def _stats() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[key] = int(rest.split()[0]) * 1024
    io = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    out["read_bytes"] = int(io["read_bytes"])
    return out


def _evict(path: Path) -> None:
    for f in path.glob("*.safetensors"):
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def measure(path: Path, plan: str) -> dict:
    """Run in the measured process: load (one process, or this rank's slices), then one forward."""
    torch.set_num_threads(1)
    split = plan != "one"
    if split:
        import torch.distributed as dist

        from kimi_lm.distributed.load import load_sharded
        from kimi_lm.distributed.parallel import Plan

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        tp, ep = (2 if "tp2" in plan else 1), (2 if "ep2" in plan else 1)
        for r in range(rank):  # one rank at a time: each one's reads are its own
            dist.barrier()
    from kimi_lm.checkpoint import _model_class
    from kimi_lm.config import config_from_dict

    cfg = config_from_dict(CONFIG)
    with torch.device("meta"):  # one-time library costs, paid before the measurement
        _model_class(cfg)(cfg)
    Path("/proc/self/clear_refs").write_text("5")
    _evict(path)
    before = _stats()
    if split:
        model = load_sharded(path, Plan(tp, ep, rank), dtype=torch.bfloat16)
        for r in range(rank, dist.get_world_size()):
            dist.barrier()
    else:
        from kimi_lm.checkpoint import load

        model = load(path, dtype=torch.bfloat16)
    loaded = _stats()
    with torch.no_grad():
        model(torch.arange(64)[None] * 97 % cfg.vocab_size)
    after = _stats()
    delta = lambda s: {k: s[k] - before[k] for k in ("read_bytes", "RssAnon", "RssFile", "VmRSS")} | {
        "peak": s["VmHWM"] - before["VmRSS"]}
    return {"plan": plan, "rank": int(os.environ.get("RANK", 0)), "load": delta(loaded), "forward": delta(after)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/kimi-split-bench")
    p.add_argument("--plans", default="tp2,ep2,tp2ep2")
    p.add_argument("--quantize", help="measure an MLX-quantized copy in this mode (mxfp4, affine4, ...)")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: run one measured process
    args = p.parse_args(argv)
    path = Path(args.dir)
    if args.measure:
        r = measure(path, args.measure)
        (path / f"result-{r['plan']}-{r['rank']}.json").write_text(json.dumps(r))  # ranks share one stdout
        return 0
    if not (path / "config.json").is_file():
        write_checkpoint(path)
    if args.quantize:
        from kimi_lm.quant.mlx_layout import quantize_to_mlx
        from kimi_lm.quant.packed import FP_CODECS, QuantSpec

        mode, bits = (args.quantize, None) if args.quantize in FP_CODECS else ("affine", int(args.quantize[6:]))
        spec = QuantSpec(mode, FP_CODECS[mode].BITS, FP_CODECS[mode].GROUP) if bits is None else QuantSpec(mode, bits, 64)
        src, path = path, path.with_name(f"{path.name}-{args.quantize}")
        if not (path / "config.json").is_file():
            quantize_to_mlx(src, path, spec, progress=False)
        args.dir = str(path)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    results = []
    for plan in ["one", *args.plans.split(",")]:
        launcher = [sys.executable] if plan == "one" else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        for old in path.glob(f"result-{plan}-*.json"):
            old.unlink()
        subprocess.run([*launcher, __file__, "--dir", str(path), "--measure", plan], capture_output=True, env=env,
                       check=True)
        results += [json.loads(f.read_text()) for f in sorted(path.glob(f"result-{plan}-*.json"))]
    mb = lambda n: f"{n / 1e6:8.1f}"
    print(f"checkpoint {size / 1e6:.1f} MB ({args.quantize or 'bf16'}). MB per process: after load | after one 64-token forward")
    print(f"{'plan':<8}{'rank':>5} {'read':>8} {'anon':>8} {'file':>8} {'peak':>8} | {'read':>8} {'anon':>8} "
          f"{'file':>8} {'peak':>8}")
    for r in sorted(results, key=lambda r: (r["plan"] != "one", r["plan"], r["rank"])):
        a, b = r["load"], r["forward"]
        print(f"{r['plan']:<8}{r['rank']:>5} {mb(a['read_bytes'])} {mb(a['RssAnon'])} {mb(a['RssFile'])} "
              f"{mb(a['peak'])} | {mb(b['read_bytes'])} {mb(b['RssAnon'])} {mb(b['RssFile'])} {mb(b['peak'])}")
    print(json.dumps({"checkpoint_bytes": size, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
