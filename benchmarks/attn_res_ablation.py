"""Block Attention Residuals ablation: the same tiny Kimi Linear, data, tokens and seeds with and without AttnRes.

    python benchmarks/attn_res_ablation.py                       # ~15 min on one CPU thread
    python benchmarks/attn_res_ablation.py --steps 60 --seeds 0  # a quick look

Each variant is trained with ``kimi-lm train`` (Muon + AdamW, WSD) on the Python reference topics that ship with
CPython (``pydoc_data``), tokenized with the bundled model's BPE; only ``--attn-res-block-size`` differs:

* baseline: the standard PreNorm residual stream;
* Block AttnRes, S = 4 sublayers (2 layers per block: 3 blocks + the embedding over the 12 sublayers), the
  paper's 436M ablation setting;
* Full AttnRes, S = 1 (every sublayer output its own source).

Writes ``docs/attn_res_ablation.png`` (held-out loss against tokens, mean over seeds) and
``docs/attn_res_ablation.md`` (the table), prints the table, then one JSON line.

Reference: Attention Residuals (arXiv 2603.15031) Table 4 / block-size sweep: at 436M, val loss baseline 1.766,
Block S=4 1.746, Full 1.737 (spec ``attention_residuals.md`` §4).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = {"baseline": 0, "Block AttnRes (S=4)": 2, "Full AttnRes (S=1)": 0.5}  # attn_res_block_size, in layers


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--tokenizer", default=str(ROOT / "kimi_lm" / "default_model"))
    p.add_argument("--docs", type=Path, default=ROOT / "docs")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the numbers are per-thread; the machine is shared
    sys.path.insert(0, str(ROOT))
    import pydoc_data.topics

    from kimi_lm.model.kimi_linear import KimiLinearForCausalLM
    from kimi_lm.tokenizer import load_tokenizer
    from kimi_lm.train import train as trainer

    runs: dict[str, list[list[dict]]] = {name: [] for name in VARIANTS}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="attnres-ablation-") as tmp:
        data = Path(tmp) / "topics"
        data.mkdir()
        for key, text in pydoc_data.topics.topics.items():
            (data / f"{key}.txt").write_text(text, encoding="utf-8")
        for seed in args.seeds:
            for name, block in VARIANTS.items():
                out = Path(tmp) / f"{name.split()[0]}-{block}-{seed}"
                code = trainer.main([
                    "--config", "tiny", "--data", str(data), "--tokenizer", args.tokenizer, "--out", str(out),
                    "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
                    "--lr", str(args.lr), "--warmup", str(args.steps // 20), "--decay-ratio", "0.2",
                    "--eval-every", str(max(args.steps // 12, 1)), "--eval-batches", "32", "--save-every", "0",
                    "--seed", str(seed), "--attn-res-block-size", str(block), "--bias-update-rate", "1e-2", "--quiet",
                ])
                if code:
                    return code
                metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                runs[name].append([m for m in metrics if "eval_loss" in m])
    seconds = time.perf_counter() - t0
    params = {}
    for name, block in VARIANTS.items():  # parameter counts, without the embedding and the LM head
        model = KimiLinearForCausalLM(trainer.build_config("tiny", load_tokenizer(args.tokenizer), block))
        params[name] = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("model.embed", "lm_head")))

    rows = summarize({name: [r[-1]["eval_loss"] for r in seeds] for name, seeds in runs.items()}, params)
    tokens = args.steps * args.batch_size * args.seq_len
    table = results_table(rows)
    print("\n".join(table))
    plot(runs, args.docs / "attn_res_ablation.png", tokens)
    write_report(args, rows, table, tokens, seconds)
    print(json.dumps({"benchmark": "attn_res_ablation", "tokens_per_run": tokens, "seeds": args.seeds,
                      "seconds": round(seconds, 1), "results": rows}))
    return 0


def summarize(finals: dict[str, list[float]], params: dict[str, int]) -> list[dict]:
    """Final held-out loss per variant and seed -> rows with the mean and the paired (same-seed) Δ vs baseline."""
    base = finals["baseline"]
    rows = []
    for name, losses in finals.items():
        deltas = [a - b for a, b in zip(losses, base)]
        rows.append({"variant": name, "attn_res_block_size": VARIANTS[name], "non_embedding_params": params[name],
                     "final_eval_loss": round(sum(losses) / len(losses), 4), "per_seed": [round(x, 4) for x in losses],
                     "delta_vs_baseline": round(sum(deltas) / len(deltas), 4),
                     "delta_per_seed": [round(d, 4) for d in deltas]})
    return rows


def results_table(rows: list[dict]) -> list[str]:
    table = ["| variant | attn_res_block_size (layers) | non-embedding params | held-out loss per seed | "
             "Δ vs baseline per seed (same seed, same split) | mean Δ |", "|---|---|---|---|---|---|"]
    table += [f"| {r['variant']} | {r['attn_res_block_size'] or '—'} | {r['non_embedding_params']:,} | "
              f"{', '.join(f'{x:.4f}' for x in r['per_seed'])} | "
              f"{', '.join(f'{d:+.4f}' for d in r['delta_per_seed'])} | {r['delta_vs_baseline']:+.4f} |" for r in rows]
    return table


def plot(runs: dict, path: Path, tokens: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, seeds in runs.items():
        x = [m["tokens"] for m in seeds[0]]
        y = [sum(r[i]["eval_loss"] for r in seeds) / len(seeds) for i in range(len(x))]
        ax.plot(x, y, "o-", ms=3, label=name)
    ax.set(xlabel="training tokens", ylabel="held-out loss (nats/token, mean over seeds)",
           title=f"Block AttnRes ablation: tiny Kimi Linear (6 layers, d=64), {tokens:,} tokens")
    ax.set_ylim(top=min(ax.get_ylim()[1], 7.0))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(args, rows, table, tokens, seconds) -> None:
    cmd = "python benchmarks/attn_res_ablation.py " + " ".join(sys.argv[1:])
    base = rows[0]

    def verdict(r):
        d = r["delta_per_seed"]
        return "lower in every seed" if max(d) < 0 else "higher in every seed" if min(d) > 0 else "sign changes"

    verdicts = "; ".join(f"{r['variant']}: {verdict(r)}" for r in rows[1:])
    agrees = all(verdict(r) == "lower in every seed" for r in rows[1:])
    outcome = "This agrees in direction with the paper" if agrees else "This run does not reproduce the paper's gain"
    text = f"""# Block Attention Residuals ablation

Reproduce: `{cmd.strip()}` ({seconds / 60:.1f} min on one shared CPU thread, torch {torch.__version__}).

Same tiny Kimi Linear (`--config tiny`: 6 layers = 12 sublayers, 4 KDA + 2 MLA, d = 64, dense first layer,
8 experts top-2 + shared expert, {base['non_embedding_params']:,} parameters besides the embedding and head), same
data (the CPython reference topics in `pydoc_data`, the bundled 4096-token BPE), same {tokens:,} training tokens
per run ({args.steps} steps × {args.batch_size} × {args.seq_len}), Muon + AdamW at lr {args.lr} with WSD. Only
`attn_res_block_size` differs. The seed ({', '.join(map(str, args.seeds))}) sets the initialisation *and* which
whole documents `kimi-lm train` holds out, so losses compare within a seed (same split), not across seeds. Loss:
mean cross-entropy on the held-out documents at the end of training.

{chr(10).join(table)}

![held-out loss against tokens](attn_res_ablation.png)

The paper's 436M-parameter ablation (87.9B tokens) reports baseline 1.766, Block AttnRes S=4 1.746 (−0.020), Full
AttnRes 1.737 (−0.029). Measured here, mean of the same-seed differences: Block {rows[1]['delta_vs_baseline']:+.4f},
Full {rows[2]['delta_vs_baseline']:+.4f} nats. With {len(args.seeds)} seed(s) at this scale (about
{436e6 / base['non_embedding_params']:,.0f}× fewer parameters than the paper's 436M model, a few epochs of a 110k-token
corpus) a difference whose sign changes between seeds is noise, and one that keeps its sign is weak evidence at best.
Here, against the baseline: {verdicts}. {outcome}; it shows the implementation trains stably with
zero-initialised queries at every block size (the correctness evidence is in `tests/test_attnres.py`: baseline
equivalence at zero queries and block boundaries against the paper's equations).
"""
    (args.docs / "attn_res_ablation.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
