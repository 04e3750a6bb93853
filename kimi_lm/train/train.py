"""``kimi-lm train``: pre-train a Kimi Linear or Kimi K3 model from text, nanoGPT-sized, with the Kimi recipe.

    kimi-lm train --config tiny --data docs/ --out runs/tiny --steps 300 --attn-res-block-size 1

Per step: forward in fp32 (or bf16 autocast), next-token cross-entropy, gradient clipping, Muon + AdamW at the WSD
learning rate (``optim.py``), then the aux-loss-free expert-bias update (``balance.py``). A tqdm bar shows loss,
tokens/s and learning rate; ``RUN_DIR/metrics.jsonl`` gets one line per step (and per evaluation), and
``RUN_DIR/loss.png`` plots train and eval loss against tokens seen.

Checkpoints ``RUN_DIR/step-NNNNNN/`` are the layout ``kimi_lm.load`` reads (config.json, safetensors + index,
tokenizer files), in fp32, plus ``optimizer.safetensors`` (Muon momenta, AdamW moments) and
``trainer_state.json``; each is written atomically (``save.py``) and the last ``KEEP`` are kept. ``--resume``
continues from the newest: weights, optimizer state and router biases are restored exactly and batches are a
function of the step (``data.py``), so the loss trajectory equals that of an uninterrupted run. The run keeps its
own config.json and tokenizer: ``--config`` / ``--attn-res-block-size`` / ``--tokenizer`` given again must mean the
same (the first command line re-run with ``--resume`` does), else a UsageError names what would change.

The architecture comes from ``--config`` (a preset name or a config.json; ``tiny-k3`` or a ``kimi_k3`` wrapper
config trains K3's layers: SiTU, latent MoE, gated KDA / MLA, AttnRes); the vocabulary size and special ids
come from the tokenizer (``--tokenizer``, default the bundled model's): vocab = base tokens + 256, as Kimi.

Under torchrun, ``--fsdp`` shards parameters, gradients and optimizer state over the ranks with FSDP2 and writes
DCP checkpoints (``kimi_lm.distributed.fsdp``); ``--activation-checkpointing`` recomputes each sublayer's
activations in backward (with or without ``--fsdp``).

References: nanoGPT ``train.py``; torchtitan ``train.py`` (checkpoint/resume, WSD); Kimi Linear report §5 (Muon, WSD).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from kimi_lm import DEFAULT_MODEL
from kimi_lm.config import K2_PRESETS, K3_PRESETS, PRESETS, KimiLinearConfig, load_config, preset
from kimi_lm.config_k3 import KimiK3Config
from kimi_lm.errors import CheckpointError, UsageError
from kimi_lm.hub import resolve
from kimi_lm.model.kimi_k3 import KimiK3ForCausalLM
from kimi_lm.model.kimi_linear import KimiLinearForCausalLM
from kimi_lm.train.balance import ExpertBiasBalancer
from kimi_lm.train.data import PackedData, find_files
from kimi_lm.train.init import init_weights
from kimi_lm.train.optim import Optimizers, wsd

KEEP = 2  # checkpoints kept in RUN_DIR (the newest ones)
STATE, OPTIM = "trainer_state.json", "optimizer.safetensors"


def build_config(spec: str, tokenizer, attn_res_block_size: float | None) -> KimiLinearConfig:
    """The config ``--config`` names (a preset, a config.json or a directory with one), sized to the tokenizer.
    Kimi Linear and Kimi K3 (``tiny-k3``, or a ``kimi_k3`` wrapper config.json) train; K2 is refused."""
    path = Path(spec)
    if spec in PRESETS + K2_PRESETS + K3_PRESETS:
        cfg = preset(spec)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"--config {spec}: this directory has no config.json")
        cfg = load_config(path / "config.json")
    elif path.is_file():
        cfg = load_config(path)
    elif path.suffix == ".json" or len(path.parts) > 1:  # meant as a path
        raise UsageError(f"--config {spec}: no such file")
    else:
        raise UsageError(f"--config {spec}: unknown preset; known presets: {', '.join(PRESETS + K3_PRESETS)} "
                         f"(or a config.json path)")
    if not isinstance(cfg, KimiLinearConfig):
        raise UsageError(f"--config {spec}: kimi-lm train trains Kimi Linear and Kimi K3 models; this is "
                         f"{cfg.model_type}")
    special = tokenizer.special_tokens
    cfg = dataclasses.replace(
        cfg, vocab_size=tokenizer.num_base_tokens + 256, bos_token_id=special.get("[BOS]"),
        eos_token_id=special.get("<|im_end|>", special.get("<|end_of_msg|>", tokenizer.eos_token_id)), pad_token_id=special.get("[PAD]"), dtype="float32",
        attn_res_block_size=cfg.attn_res_block_size if attn_res_block_size is None else (attn_res_block_size or None),
    )
    cfg.validate(f"--config {spec}")
    return cfg


def new_model(cfg: KimiLinearConfig):
    """An untrained model of ``cfg``'s family (K3's own layers for a K3 config; Kimi Linear otherwise)."""
    return KimiK3ForCausalLM(cfg) if isinstance(cfg, KimiK3Config) else KimiLinearForCausalLM(cfg)


def checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (a directory only exists once fully written)."""
    return sorted(p for p in run_dir.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))


def steps_done(ckpt: Path, fsdp: bool = False) -> int:
    """The step count in a checkpoint's trainer state; the checkpoint must be of the same kind as the run (DCP
    shards from ``--fsdp``, or one safetensors model + optimizer file)."""
    from kimi_lm.distributed.fsdp import DCP_DIR

    sharded = (ckpt / DCP_DIR).is_dir()
    if sharded != fsdp:
        raise UsageError(f"--resume: {ckpt} was written {'with' if sharded else 'without'} --fsdp; resume it "
                         + ("under torchrun with --fsdp (or export it: python -m kimi_lm.distributed.fsdp)"
                            if sharded else "without --fsdp"))
    for name in (STATE,) if fsdp else (STATE, OPTIM):
        if not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt}: {name} is missing; not a checkpoint written by kimi-lm train")
    try:
        return int(json.loads((ckpt / STATE).read_text())["step"])
    except (ValueError, OSError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{ckpt / STATE}: unreadable trainer state ({exc})") from None


def check_same_run(args, ckpt: Path, tok_files: dict[str, bytes], tokenizer) -> None:
    """``--resume`` continues the run with its checkpoint's config.json and tokenizer: a ``--config``,
    ``--attn-res-block-size`` or ``--tokenizer`` given again must mean the same (the usual case: the first command
    line re-run with ``--resume``), or the run would silently go on as something other than asked."""
    from kimi_lm.save import TOKENIZER_FILES

    if args.config or args.attn_res_block_size is not None:
        saved = load_config(ckpt / "config.json")
        # an omitted --attn-res-block-size means the run's own (it may have been set when the run started)
        block = saved.attn_res_block_size if args.attn_res_block_size is None else args.attn_res_block_size or None
        asked = (build_config(args.config, tokenizer, block or 0) if args.config
                 else dataclasses.replace(saved, attn_res_block_size=block))
        flat = lambda cfg: {"model_type": cfg.model_type, **cfg.to_dict().get("text_config", cfg.to_dict())}  # noqa: E731
        asked, saved = flat(asked), flat(saved)  # (Kimi K3's wrapper nests the text model's keys)
        changed = sorted((k for k in set(asked) | set(saved) if asked.get(k) != saved.get(k)), key=lambda k: (k != "model_type", k))
        if changed:
            shown = ", ".join(f"{k} {saved.get(k)!r} -> {asked.get(k)!r}" for k in changed[:4])
            raise UsageError(f"--resume: {ckpt} was trained with another config than --config / "
                             f"--attn-res-block-size ask for ({shown}{' ...' if len(changed) > 4 else ''}); drop "
                             f"those flags to continue the run as it was, or choose a new --out")
    if args.tokenizer:
        given = {n: (Path(args.tokenizer) / n).read_bytes() for n in TOKENIZER_FILES
                 if (Path(args.tokenizer) / n).is_file()}
        if given != tok_files:
            raise UsageError(f"--resume: --tokenizer {args.tokenizer} differs from the tokenizer {ckpt} was trained "
                             f"with; drop --tokenizer to continue the run with its own, or choose a new --out")


def load_run(ckpt: Path):
    """(model in train mode, steps done, optimizer tensors) from a checkpoint directory."""
    from kimi_lm.checkpoint import SafetensorsFile, load

    step = steps_done(ckpt)
    with SafetensorsFile(ckpt / OPTIM) as f:  # raises CheckpointError for a damaged file
        optim = {name: f.read(name) for name in f.keys()}
    model = load(ckpt, dtype=torch.float32)  # trainable nn.Linear weights
    return model.train().requires_grad_(True), step, optim


def read_metrics(path: Path) -> list[dict]:
    """The records of a run's metrics.jsonl (a resumed run keeps those up to its checkpoint)."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            int(record["step"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}:{number}: not a metrics record of kimi-lm train ({exc}); move the file "
                                  f"away to resume without the earlier metrics") from None
        records.append(record)
    return records


def evaluate(model, data: PackedData, batch_size: int, max_batches: int, autocast) -> float:
    model.eval()
    total, n = 0.0, 0
    with torch.no_grad(), autocast():
        for x, y in data.eval_batches(batch_size, max_batches):
            logits = model(x)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").item()
            n += y.numel()
    model.train()
    return total / n


def plot_losses(metrics: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    train = [m for m in metrics if "loss" in m]
    ev = [m for m in metrics if "eval_loss" in m]
    ax.plot([m["tokens"] for m in train], [m["loss"] for m in train], lw=0.8, alpha=0.7, label="train")
    ax.plot([m["tokens"] for m in ev], [m["eval_loss"] for m in ev], "o-", label="eval (held out)")
    ax.set(xlabel="tokens", ylabel="cross-entropy (nats/token)", title=path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def start_world(args):
    """The ranks of this run: torchrun's with ``--fsdp`` (process group started), else one process."""
    from kimi_lm.distributed import runtime

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if args.fsdp and not runtime.launched():
        raise UsageError("--fsdp shards over the processes torchrun starts: torchrun --nproc-per-node N -m kimi_lm "
                         "train ... --fsdp")
    if not args.fsdp and launched > 1:
        raise UsageError(f"torchrun started {launched} processes: pass --fsdp to train one model over them (without "
                         f"it every process would train its own copy into the same --out)")
    world = runtime.init() if args.fsdp else runtime.World(0, 1)
    if args.batch_size % world.size:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch: it must be divisible by the "
                         f"{world.size} ranks (each takes its slice)")
    return world


def train(args) -> dict:
    from kimi_lm.distributed import fsdp
    from kimi_lm.save import TOKENIZER_FILES, save
    from kimi_lm.tokenizer import load_tokenizer

    torch.manual_seed(args.seed)
    world = start_world(args)
    main_rank = world.rank == 0
    out = Path(args.out)
    # every argument is checked before the data is tokenized and the model built, which can take minutes
    find_files(args.data)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    existing = checkpoints(out) if out.is_dir() else []
    if args.resume and not existing:
        raise UsageError(f"--out {out}: no checkpoint to resume from (expected step-* directories from kimi-lm train)")
    if existing and not args.resume:
        raise UsageError(f"--out {out}: already holds checkpoints; pass --resume to continue or choose a new --out")
    # ORG/NAME[@REVISION] that is no local path: from the Hugging Face Hub (kimi_lm.hub)
    args.config = args.config and str(resolve(args.config, ("config",)))
    args.tokenizer = args.tokenizer and str(resolve(args.tokenizer, ("config", "tokenizer")))
    if args.tokenizer and not Path(args.tokenizer).is_dir():
        raise UsageError(f"--tokenizer {args.tokenizer}: no such directory")
    # a resumed run keeps the tokenizer it started with: the one saved in its checkpoint
    tok_dir = existing[-1] if args.resume else Path(args.tokenizer) if args.tokenizer else DEFAULT_MODEL
    tokenizer = load_tokenizer(tok_dir)
    tok_files = {n: (tok_dir / n).read_bytes() for n in TOKENIZER_FILES if (tok_dir / n).is_file()}
    if args.resume:
        check_same_run(args, existing[-1], tok_files, tokenizer)
    cfg = None if args.resume else build_config(args.config or "tiny", tokenizer, args.attn_res_block_size)
    data = PackedData.from_paths(args.data, tokenizer, args.seq_len, args.eval_fraction, args.seed)
    if args.fsdp:  # built on the meta device and sharded: each rank allocates only its own rows
        start = steps_done(existing[-1], fsdp=True) if args.resume else 0
        optim_state = None  # with the weights, from the DCP shards once the optimizer exists (resume)
        with torch.device("meta"):
            model = new_model(load_config(existing[-1] / "config.json") if args.resume else cfg)
        fsdp.shard_model(model, args.activation_checkpointing).to_empty(device="cpu").train()
        if not args.resume:
            init_weights(model, generator=torch.Generator().manual_seed(args.seed))
    elif args.resume:
        model, start, optim_state = load_run(existing[-1])
    else:
        model = init_weights(new_model(cfg), generator=torch.Generator().manual_seed(args.seed)).train()
        start, optim_state = 0, None
    if start >= args.steps:
        raise UsageError(f"--steps {args.steps}: {existing[-1]} has already trained {start} steps; pass a larger "
                         f"--steps to continue")
    if args.activation_checkpointing and not args.fsdp:
        fsdp.checkpoint_activations(model)
    optim = Optimizers(model, lr=args.lr, weight_decay=args.weight_decay, sharded=args.fsdp)
    if optim_state is not None:
        optim.load_state_tensors(optim_state)
    if args.resume and args.fsdp:
        fsdp.load_checkpoint(model, optim, existing[-1])
    balancer = ExpertBiasBalancer(model, args.bias_update_rate, fsdp.sum_over_ranks if args.fsdp else None)
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    metrics = read_metrics(metrics_path) if metrics_path.exists() and main_rank else []
    metrics = [m for m in metrics if m["step"] <= start]  # a resumed run rewrites what followed its checkpoint
    if main_rank:
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in metrics))
    bf16 = args.dtype == "bf16"

    def autocast():
        return torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16)

    def checkpoint(step: int) -> None:
        if args.fsdp:
            trainer_state = {"step": step, "tokens": step * tokens_per_step, "ranks": world.size, "args": vars(args)}
            config = {**model.config.to_dict(), "dtype": "float32"}
            fsdp.save_checkpoint(model, optim, out / f"step-{step:06d}", {
                **tok_files, STATE: json.dumps(trainer_state, indent=2, default=str),
                "config.json": json.dumps(config, indent=2) + "\n"})
            for old in checkpoints(out)[:-KEEP] if main_rank else []:
                shutil.rmtree(old)
            return
        opt_file = out / f".{OPTIM}.{step}"
        save_file(optim.state_tensors(), opt_file)
        trainer_state = {"step": step, "tokens": step * tokens_per_step, "args": vars(args)}
        save(model, out / f"step-{step:06d}", overwrite=True,
             files={**tok_files, STATE: json.dumps(trainer_state, indent=2, default=str), OPTIM: opt_file})
        opt_file.unlink()
        for old in checkpoints(out)[:-KEEP]:
            shutil.rmtree(old)

    tokens_per_step = args.batch_size * args.seq_len
    n_params = sum(p.numel() for p in model.parameters())
    ranks = f", FSDP over {world.size} ranks" if args.fsdp else ""
    print_main = print if main_rank else (lambda *a, **k: None)
    print_main(f"model: {n_params / 1e6:.2f}M parameters{ranks}, {len(model.config.linear_attn_config['kda_layers'])} KDA + "
          f"{len(model.config.linear_attn_config['full_attn_layers'])} MLA layers, attn_res_block_size="
          f"{model.config.attn_res_block_size}; data: {data.train_tokens} train tokens, {data.eval.numel()} held out",
          file=sys.stderr)
    log = metrics_path.open("a") if main_rank else open(os.devnull, "w")
    bar = tqdm(total=args.steps, initial=start, desc="train", unit="step", disable=args.quiet or not main_rank)
    loss_value = float("nan")
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        lr = optim.set_lr(wsd(step, args.steps, args.warmup, args.decay_ratio, args.min_lr_ratio))
        x, y = data.train_batch(step, args.batch_size)
        if args.fsdp:  # this rank's slice of the global batch; gradients are averaged over the ranks
            x, y = fsdp.local_rows(x), fsdp.local_rows(y)
        with autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        if args.fsdp:
            grad_norm = fsdp.clip_grad_norm(list(model.parameters()), args.grad_clip)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip).item()
        optim.step()
        optim.zero_grad()
        load = balancer.step()
        loss_value = (fsdp.mean_over_ranks(loss) if args.fsdp else loss).item()
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss became {loss_value} at step {step + 1}; lower --lr")
        tps = tokens_per_step / (time.perf_counter() - t0)
        record = {"step": step + 1, "tokens": (step + 1) * tokens_per_step, "loss": loss_value, "lr": lr,
                  "grad_norm": grad_norm, "tok_per_s": tps, **load}
        metrics.append(record)
        log.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tps:.0f}", lr=f"{lr:.2e}")
        bar.update()
        done = step + 1 == args.steps
        if done or (args.eval_every and (step + 1) % args.eval_every == 0):
            ev = {"step": step + 1, "tokens": (step + 1) * tokens_per_step,
                  "eval_loss": evaluate(model, data, args.batch_size, args.eval_batches, autocast)}
            metrics.append(ev)
            log.write(json.dumps(ev) + "\n")
            log.flush()
            if main_rank:
                plot_losses(metrics, out / "loss.png")
                bar.write(f"step {step + 1}: train loss {loss_value:.4f}, eval loss {ev['eval_loss']:.4f}")
        if done or (args.save_every and (step + 1) % args.save_every == 0):
            log.flush()
            checkpoint(step + 1)
    bar.close()
    log.close()
    balancer.remove()
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    return {"steps": args.steps, "tokens": args.steps * tokens_per_step, "final_train_loss": loss_value,
            "final_eval_loss": evals[-1] if evals else None, "parameters": n_params,
            "checkpoint": str(checkpoints(out)[-1]), "rank": world.rank}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block: main() prints it
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kimi-lm train", description="Pre-train a Kimi Linear model on text files.")
    p.add_argument("--config", help=f"preset ({', '.join(PRESETS + K3_PRESETS)}), a config.json "
                                                    "(Kimi Linear, or Kimi K3's kimi_k3 wrapper) or a Hub id "
                                                    "ORG/NAME (its config.json; default tiny)")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="text files (.txt/.md/.rst), chat files (.jsonl with 'messages') or directories of them")
    p.add_argument("--tokenizer", help="directory with tiktoken.model + tokenizer_config.json, or a Hub id ORG/NAME "
                                       "(default: the bundled model's; --resume uses the checkpoint's)")
    p.add_argument("--out", required=True, help="run directory: checkpoints, metrics.jsonl, loss.png")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps in all (default 200)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of Muon and AdamW (default 3e-3)")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a fraction of the peak (default 0.1)")
    p.add_argument("--warmup", type=int, default=20, help="warmup steps (default 20)")
    p.add_argument("--decay-ratio", type=float, default=0.2, help="fraction of steps in the final decay (default 0.2)")
    p.add_argument("--weight-decay", type=float, default=0.1,
                   help="decoupled weight decay of Muon and AdamW (default 0.1)")
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="clip the global gradient norm to this (default 1.0)")
    p.add_argument("--bias-update-rate", type=float, default=1e-3, help="aux-loss-free MoE bias step u (default 1e-3)")
    p.add_argument("--attn-res-block-size", type=float,
                   help="Block AttnRes: Transformer layers per block (K3's unit, 0.5 steps; 0 = off; default: config)")
    p.add_argument("--eval-every", type=int, default=50,
                   help="steps between held-out evaluations; 0 = after the last step only (default 50)")
    p.add_argument("--eval-batches", type=int, default=16, help="held-out batches per evaluation (default 16)")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="share of tokens held out (default 0.05)")
    p.add_argument("--save-every", type=int, default=100,
                   help="steps between checkpoints; 0 = the last step only (default 100)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of initialisation, data order and held-out split (default 0)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="compute dtype (weights stay fp32; default fp32)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimizer state over the ranks (FSDP2); "
                        "--batch-size is the global batch; checkpoints are DCP shards (default: off)")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each sublayer's activations in backward instead of keeping them (default: off)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check_args(args) -> None:
    """Option values that are wrong whatever the data: UsageError naming the flag."""
    for flag, value, low in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                             ("--seq-len", args.seq_len, 2), ("--warmup", args.warmup, 0),
                             ("--eval-every", args.eval_every, 0), ("--save-every", args.save_every, 0),
                             ("--eval-batches", args.eval_batches, 1)):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}, got {value}")
    for flag, value in (("--decay-ratio", args.decay_ratio), ("--min-lr-ratio", args.min_lr_ratio)):
        if not 0 <= value <= 1:
            raise UsageError(f"{flag} must be between 0 and 1, got {value}")
    if not 0 <= args.eval_fraction < 1:  # 1 would hold out everything and leave nothing to train on
        raise UsageError(f"--eval-fraction must be >= 0 and < 1, got {args.eval_fraction}")
    for flag, value, positive in (("--lr", args.lr, True), ("--grad-clip", args.grad_clip, True),
                                  ("--weight-decay", args.weight_decay, False),
                                  ("--bias-update-rate", args.bias_update_rate, False)):
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            raise UsageError(f"{flag} must be {'> 0' if positive else '>= 0'}, got {value}")
    block = args.attn_res_block_size  # checked here so the error names the flag, not the config it overrides
    if block is not None and not (block >= 0 and math.isfinite(block) and (2 * block).is_integer()):
        raise UsageError(f"--attn-res-block-size must be 0 (off) or a positive number of layers in steps of 0.5, "
                         f"got {block}")


def main(argv: list[str] | None = None) -> int:
    """``kimi-lm train``; bad input: one line on stderr and exit code 2."""
    from kimi_lm.distributed import runtime

    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        check_args(args)
        summary = train(args)
        if args.fsdp:
            runtime.shutdown()
    except (ValueError, FloatingPointError) as exc:  # KimiLMError (UsageError, CheckpointError) is a ValueError
        print(f"kimi-lm train: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a full disk or an unwritable --out while writing a checkpoint
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"kimi-lm train: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    if not args.fsdp or summary.get("rank") == 0:
        print(json.dumps({k: v for k, v in summary.items() if k != "rank"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
