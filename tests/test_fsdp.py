"""``kimi-lm train --fsdp``: FSDP2 on 2 gloo ranks (a real torchrun launch) against the one-process run.

The global batch is the same in both runs (each rank takes its slice), so the first steps' losses agree within
1e-4; the DCP checkpoint exports to the safetensors layout and the exported model reproduces the sharded run's own
eval loss; ``--resume`` from the DCP shards continues exactly (slow). Without torchrun: the gathered Muon equals
``torch.optim.Muon``, activation checkpointing changes no gradient and counts no MoE load twice, bad uses are
one-line errors.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import kimi_lm
from kimi_lm.cli import main as cli_main
from kimi_lm.distributed import fsdp
from kimi_lm.errors import CheckpointError
from kimi_lm.train import train as trainer
from kimi_lm.train.balance import ExpertBiasBalancer
from kimi_lm.train.bpe import train_bpe, write_tokenizer
from kimi_lm.train.data import PackedData
from kimi_lm.train.init import init_weights
from kimi_lm.train.optim import Optimizers

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["while", "for", "if", "try", "with", "assert"]
STEPS = 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run fastest on one thread, and the machine is shared
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import pydoc_data.topics

    root = tmp_path_factory.mktemp("fsdp_corpus")
    (root / "text").mkdir()
    for t in TOPICS:
        (root / "text" / f"{t}.txt").write_text(pydoc_data.topics.topics[t])
    write_tokenizer(root / "tok", train_bpe([pydoc_data.topics.topics[t] for t in TOPICS], 300))
    return root


def train_argv(corpus: Path, out: Path, *extra: str) -> list[str]:
    """tiny-k3 (SiTU, latent MoE, gates, AttnRes): every parameter kind Muon and AdamW see; constant lr after one
    warmup step, so a shorter run's schedule is a prefix of a longer one's."""
    return ["train", "--config", "tiny-k3", "--data", str(corpus / "text"), "--tokenizer", str(corpus / "tok"),
            "--out", str(out), "--batch-size", "4", "--seq-len", "32", "--warmup", "1", "--decay-ratio", "0",
            "--eval-every", "0", "--eval-batches", "2", "--quiet", *extra]


def torchrun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 -m kimi_lm ARGS`` (a free port of its own); fails the test with
    the ranks' output when the launch fails."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "kimi_lm", *args], capture_output=True, text=True, env=env, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def losses(run: Path) -> list[float]:
    return [m["loss"] for m in metrics(run) if "loss" in m]


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """(one-process run, 2-rank FSDP run with activation checkpointing), STEPS steps each, checkpoints at 2 and 3."""
    root = tmp_path_factory.mktemp("fsdp_runs")
    assert cli_main(train_argv(corpus, root / "one", "--steps", str(STEPS), "--save-every", "2")) == 0
    r = torchrun(*train_argv(corpus, root / "two", "--steps", str(STEPS), "--save-every", "2", "--fsdp",
                             "--activation-checkpointing"))
    return root / "one", root / "two", r


def test_two_ranks_match_one_process(runs):
    one, two, r = runs
    assert "FSDP over 2 ranks" in r.stderr and r.stdout.count('"final_train_loss"') == 1  # rank 0 alone reports
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == STEPS
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    grad_norms = [(x["grad_norm"], y["grad_norm"]) for x, y in zip(metrics(one), metrics(two)) if "loss" in x]
    assert all(abs(x - y) < 1e-3 * x for x, y in grad_norms), grad_norms
    ckpt = two / f"step-{STEPS:06d}"
    shards = sorted(p.name for p in (ckpt / "dcp").iterdir())
    assert len(shards) == 2 and all(s.endswith(".safetensors") for s in shards)  # one file per rank, no pickle
    assert not list((ckpt / "dcp").glob(".metadata")) and json.loads((ckpt / "trainer_state.json").read_text())[
        "ranks"] == 2
    # each rank wrote only its own rows: about half of the weights and half of the optimizer state
    total = sum(p.numel() for p in kimi_lm.load(one / f"step-{STEPS:06d}", backend=None).parameters())
    for shard in shards:
        with safe_open(ckpt / "dcp" / shard, "pt") as f:
            held = {kind: sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith(kind))
                    for kind in ("model.", "optim.adamw.", "optim.muon.")}
        assert 0.4 * total < held["model."] < 0.6 * total, (shard, held, total)
        assert 0.4 * total < held["optim.muon."] + held["optim.adamw."] / 2 < 0.6 * total, (shard, held, total)


def test_dcp_checkpoint_exports_to_the_model_the_run_evaluated(runs, corpus, tmp_path):
    _, two, _ = runs
    out = tmp_path / "exported"
    from kimi_lm.convert import main as convert

    assert convert([str(two / f"step-{STEPS:06d}"), str(out), "--from-fsdp", "--dtype", "float32", "--quiet"]) == 0
    model = kimi_lm.load(out, dtype=torch.float32)
    assert model.config.model_type == "kimi_k3" and (out / "tiktoken.model").is_file()
    tok = kimi_lm.load_tokenizer(out)
    data = PackedData.from_paths([str(corpus / "text")], tok, 32, 0.05, 0)
    again = trainer.evaluate(model, data, 4, 2, lambda: torch.autocast("cpu", enabled=False))
    assert again == pytest.approx(metrics(two)[-1]["eval_loss"], rel=1e-6)  # the sharded model's logits, exactly
    bias = model.model.layers[1].block_sparse_moe.gate.e_score_correction_bias
    assert bias.abs().max() > 0  # the router biases (replicated buffers) are in the checkpoint too
    assert fsdp.main([str(two / f"step-{STEPS:06d}"), str(out)]) == 2  # never overwrites
    assert convert([str(two / f"step-{STEPS:06d}"), str(out), "--from-fsdp"]) == 2


def test_one_process_resume_of_a_sharded_run_is_refused(runs, corpus, capsys):
    _, two, _ = runs
    assert cli_main(train_argv(corpus, two, "--steps", "5", "--resume")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was written with --fsdp; resume it under torchrun with --fsdp" in err


@pytest.mark.slow  # a second torchrun launch (~30 s on 2 shared cores)
def test_resume_from_dcp_continues_the_run(runs, corpus, tmp_path):
    _, two, _ = runs
    resumed = tmp_path / "resumed"
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / f"step-{STEPS:06d}")  # as if the run had stopped right after step 2
    torchrun(*train_argv(corpus, resumed, "--steps", str(STEPS), "--save-every", "2", "--fsdp", "--resume"))
    again, first = metrics(resumed), metrics(two)
    assert [sorted(m) for m in again] == [sorted(m) for m in first]
    for m, n in zip(again, first):  # the same losses, grad norms, loads and eval loss as the uninterrupted run
        assert all(m[k] == pytest.approx(n[k], rel=1e-6) for k in m if k != "tok_per_s"), (m, n)


# ---- without torchrun ------------------------------------------------------------------------------------------------
def tiny_k3(corpus):
    cfg = trainer.build_config("tiny-k3", kimi_lm.load_tokenizer(corpus / "tok"), None)
    return init_weights(trainer.new_model(cfg), generator=torch.Generator().manual_seed(0)).train()


def test_gathered_muon_is_torch_muon(corpus):
    """The sharded optimizer's Muon (here on whole tensors: one rank) steps exactly as torch.optim.Muon on the same
    matrices, stacked experts one matrix at a time included."""
    models = [tiny_k3(corpus), tiny_k3(corpus)]
    optims = [Optimizers(models[0], lr=1e-2), Optimizers(models[1], lr=1e-2, sharded=True)]
    x = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        for m, o in zip(models, optims):
            m(x).float().square().mean().backward()
            o.step()
            o.zero_grad()
    a, b = models[0].state_dict(), models[1].state_dict()
    assert type(optims[1].muon).__name__ == "GatheredMuon"
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    assert not torch.equal(a["model.layers.1.block_sparse_moe.experts.gate_up_proj"],
                           tiny_k3(corpus).state_dict()["model.layers.1.block_sparse_moe.experts.gate_up_proj"])


def test_activation_checkpointing_changes_no_gradient_and_counts_loads_once(corpus):
    x = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(2))
    seen = []
    for ac in (False, True):
        model = tiny_k3(corpus)
        if ac:
            fsdp.checkpoint_activations(model)
        balancer = ExpertBiasBalancer(model)
        model(x).float().square().mean().backward()
        seen.append(({k: v.clone() for k, v in balancer.loads.items()},
                     {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (loads, grads), (loads_ac, grads_ac) = seen
    assert all(torch.equal(loads[k], loads_ac[k]) for k in loads) and sum(v.sum() for v in loads.values()) > 0
    assert grads.keys() == grads_ac.keys() and all(torch.equal(grads[n], grads_ac[n]) for n in grads)


def test_bad_uses_are_one_line_errors(corpus, tmp_path, capsys):
    assert cli_main(train_argv(corpus, tmp_path / "r", "--steps", "1", "--fsdp")) == 2
    assert "--fsdp shards over the processes torchrun starts: torchrun --nproc-per-node N" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="no config.json"):
        fsdp.export_checkpoint(tmp_path, tmp_path / "out")
    (tmp_path / "step").mkdir()
    (tmp_path / "step" / "config.json").write_text(json.dumps(kimi_lm.config.preset("tiny-k3").to_dict()))
    with pytest.raises(CheckpointError, match="no dcp/ folder"):
        fsdp.export_checkpoint(tmp_path / "step", tmp_path / "out")
