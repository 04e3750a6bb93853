"""Tensor- and expert-parallel inference (kimi_lm.distributed, issue 22): two gloo processes on CPU against one.

The split runs are real torchrun launches (``--standalone``: a free port each); the oracle is the one-process plain
model loaded by ``kimi_lm.checkpoint.load`` in fp32. Kimi Linear (official layout), Kimi K2 (DeepSeek-V3 layout),
Kimi K3 (latent MoE, gates, Block AttnRes) and K2 in the FP8-block release format each run --tp 2, --ep 2 and both;
packed checkpoints (Kimi Linear in mlx-lm's MXFP4 layout: every product packed; K2-Thinking's compressed-tensors INT4
experts, K3's MXFP4 release) run --ep 2 and --tp 2 --ep 2 (Kimi Linear --tp 2 too), against the same packed
checkpoint in one process.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import rel_err
from parallel_ranks import GREEDY, PREFILL, ids_for
from kimi_lm.checkpoint import load
from kimi_lm.config import FP8_BLOCK_CONFIG, KimiK2Config, preset
from kimi_lm.distributed import launch
from kimi_lm.distributed.memory import per_rank
from kimi_lm.distributed.parallel import Plan, check, shard_specs
from kimi_lm.errors import CheckpointError, UsageError
from kimi_lm.model.moe import StackedExperts

HERE = Path(__file__).resolve().parent
PLANS = [(2, 1), (1, 2), (2, 2)]
# --tp 2 alone would cut the INT4 / MXFP4 experts' down_proj mid-group (48 of 96, 16 of 32 columns): refused, tested below
PACKED_PLANS = {"kl_mxfp4": PLANS, "k2_int4": [(1, 2), (2, 2)], "k3_mxfp4": [(1, 2), (2, 2)]}
PACKED = [(name, tp, ep) for name, plans in PACKED_PLANS.items() for tp, ep in plans]


def torchrun(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, official_checkpoint):
    """Kimi Linear, K2 and K3 tiny random checkpoints whose heads, experts and intermediate sizes divide by 2."""
    import k2_checkpoints
    import k3_checkpoints

    root = tmp_path_factory.mktemp("split")
    k2_hf = root / "k2-hf"
    k2_checkpoints.build_reference(preset("tiny-k2")).save_pretrained(k2_hf)
    k2 = k2_checkpoints.to_official_layout(k2_hf, root / "k2")
    k3_cfg = k3_checkpoints.tiny_config(num_attention_heads=4)
    k3 = k3_checkpoints.write_checkpoint(k3_checkpoints.random_model(k3_cfg), root / "k3")
    k2_fp8 = k2_checkpoints.write_random_fp8_checkpoint(fp8_config(), root / "k2fp8")
    return {"kimi_linear": Path(official_checkpoint), "k2": k2, "k3": k3, "k2_fp8": k2_fp8}


@pytest.fixture(scope="module")
def packed_checkpoints(tmp_path_factory, checkpoints):
    """Packed checkpoints with an even number of experts: Kimi Linear in mlx-lm's MXFP4 layout (every product packed,
    stacked switch_mlp experts, uint32 codes + E8M0 scales; the router affine 8-bit; head and intermediate widths of
    64, so that each of 2 ranks holds whole 32-column groups), K2-Thinking (compressed-tensors pack-quantized INT4
    per-expert tensors, of the K2 reference above) and K3's release (mxfp4-pack-quantized per-expert tensors)."""
    import k2_int4_checkpoints
    import k3_checkpoints

    root = tmp_path_factory.mktemp("packed")
    spec = importlib.util.spec_from_file_location("bench_full_size", HERE.parent / "benchmarks" / "bench_full_size.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    # nope = 32: a whole MXFP4 group, so mlx-lm packs kv_b_proj's embed_q as the estimator prices it
    tiny = preset("tiny")
    bench.write_checkpoint(root / "kl-mxfp4", dataclasses.replace(
        tiny, qk_nope_head_dim=32, v_head_dim=32, moe_intermediate_size=64,
        linear_attn_config={**tiny.linear_attn_config, "head_dim": 32}))
    k2_int4, _ = k2_int4_checkpoints.to_int4_layout(checkpoints["k2"].parent / "k2-hf", root / "k2-int4")
    k3, _ = k3_checkpoints.write_mxfp4_checkpoint(k3_checkpoints.random_model(k3_checkpoints.mxfp4_config(num_attention_heads=4)),
                                                  root / "k3-mxfp4")
    return {"kl_mxfp4": root / "kl-mxfp4", "k2_int4": Path(k2_int4), "k3_mxfp4": Path(k3)}


def fp8_config(**changes) -> KimiK2Config:
    """A tiny K2 in the FP8 release format whose split sizes are whole 128-blocks on 2 ranks (heads of 128 + 64)."""
    raw = {**preset("tiny-k2").to_dict(), **dict(
        hidden_size=256, num_attention_heads=4, num_key_value_heads=4, qk_nope_head_dim=64, qk_rope_head_dim=64,
        v_head_dim=64, kv_lora_rank=128, q_lora_rank=128, moe_intermediate_size=256, intermediate_size=256,
        n_routed_experts=8, num_hidden_layers=2, quantization_config=dict(FP8_BLOCK_CONFIG)), **changes}
    return KimiK2Config.from_dict(raw)


PROMPT, N_TOKENS = "The os module", 12
GENERATE = ["--ep", "2", "--dtype", "float32", "--prompt", PROMPT, "--max-tokens", str(N_TOKENS),
            "--ignore-chat-template"]


@pytest.fixture(scope="module")
def launch_output(tmp_path_factory, checkpoints, packed_checkpoints):
    """One torchrun launch (its start-up is most of the time): every (family, plan) run, written to
    OUT/NAME.safetensors and OUT/NAME.rankR.json, then `kimi-lm generate GENERATE` on the bundled model."""
    out = tmp_path_factory.mktemp("ranks")
    jobs = [f"{path}:{tp}:{ep}" for path in checkpoints.values() for tp, ep in PLANS]
    jobs += [f"{path}:{tp}:{ep}" for name, path in packed_checkpoints.items() for tp, ep in PACKED_PLANS[name]]
    r = torchrun(str(HERE / "parallel_ranks.py"), str(out), *jobs, "--", *GENERATE)
    assert r.returncode == 0, r.stderr[-4000:]
    return out, r


@pytest.fixture(scope="module")
def split_runs(launch_output):
    return launch_output[0]


def one_process(path: Path):
    model = load(path, dtype=torch.float32)
    ids = ids_for(model.config.vocab_size)
    with torch.no_grad():
        full = model(ids)
        cache = model.make_cache(1)
        logits = model(ids[:, :PREFILL], cache=cache)[:, -1]
        tokens, steps = [], [logits]
        for _ in range(GREEDY):
            tokens.append(int(logits.argmax(-1)))
            logits = model(torch.tensor([[tokens[-1]]]), cache=cache)[:, -1]
            steps.append(logits)
    return model, full, torch.cat(steps), tokens


def _matching_split_run(split_runs, name: str, full, steps, tokens, tol: float = 1e-5) -> list[dict]:
    """Checks the 2-rank run ``name`` against one process (full-forward and cached-step logits within ``tol``, the
    same greedy tokens, both ranks holding equal parts); returns the ranks' reports."""
    got = load_file(split_runs / f"{name}.safetensors")
    assert rel_err(got["full"], full) < tol, name
    assert rel_err(got["steps"], steps) < tol, name
    assert got["tokens"].tolist() == tokens, name
    ranks = [json.loads((split_runs / f"{name}.rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1], name  # equal parts
    return ranks


@pytest.mark.parametrize("family", ["kimi_linear", "k2", "k3", "k2_fp8"])
def test_split_runs_match_one_process(family, checkpoints, split_runs):
    """Logits of a full forward and of cached decode steps within 1e-5 of one process's; same greedy tokens;
    every rank holds 1/2 of the split tensors plus the replicated ones, as the estimator predicts."""
    path = checkpoints[family]
    model, full, steps, tokens = one_process(path)
    full_bytes = {n: t.numel() * t.element_size() for n, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        full_bytes.pop("lm_head.weight")
    for tp, ep in PLANS:
        name = f"{path.name}-tp{tp}-ep{ep}"
        ranks = _matching_split_run(split_runs, name, full, steps, tokens)
        split = sum(b for n, b in full_bytes.items() if n in shard_specs(model, Plan(tp, ep, 0)))
        replicated = sum(full_bytes.values()) - split
        assert split > 0.3 * sum(full_bytes.values()), name  # experts, heads: a good part of even a tiny model
        # K3's zero-padded A_log drops its padding when split: a few bytes under the exact half
        assert replicated + split / 2 - 64 * len(model.model.layers) <= ranks[0]["param_bytes"] <= replicated + split / 2
        if family != "k2_fp8":  # (the estimator prices FP8 checkpoints' float tensors at the config's bf16)
            from kimi_lm.estimate import estimate

            e = estimate(model.config, quant="fp32", context=[16])
            assert per_rank(model.config, e, tp, ep, quant="fp32")["weights_bytes"] == ranks[0]["param_bytes"], name


def _expert_bytes(model) -> int:
    """Bytes of the routed experts' stacks (float, or packed codes + scales [+ biases])."""
    return sum(t.numel() * t.element_size() for m in model.modules() if isinstance(m, StackedExperts)
               for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])


def _held_bytes(model) -> int:
    return sum({id(t): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}.values())


@pytest.mark.parametrize("family, tp, ep", PACKED)
def test_packed_split_runs_match_one_process(family, tp, ep, packed_checkpoints, split_runs):
    """--ep 2, --tp 2 [--ep 2] on a packed checkpoint: logits within 1e-5 of one process on the same checkpoint, same
    greedy tokens; each rank holds its experts (whole, or each one's half) and its heads' rows / columns still packed,
    the estimator's per-rank bytes."""
    from kimi_lm.estimate import estimate

    path = packed_checkpoints[family]
    model, full, steps, tokens = one_process(path)
    # K3 under --tp sums its heads' outputs over ranks in another order (the float K3 split: 4.5e-6 relative; this
    # random MXFP4 one: 1.2e-5); the greedy tokens are checked equal all the same
    tol = 3e-5 if family == "k3_mxfp4" and tp > 1 else 1e-5
    ranks = _matching_split_run(split_runs, f"{path.name}-tp{tp}-ep{ep}", full, steps, tokens, tol)
    whole, experts = _held_bytes(model), _expert_bytes(model)
    assert experts > 0.1 * whole and any(t.dtype == torch.uint32 for t in model.buffers())  # packed, not float
    if tp == 1:
        assert ranks[0]["param_bytes"] == whole - experts // 2
    else:  # the heads' and dense products' halves too
        assert ranks[0]["param_bytes"] < whole - experts // 2
    assert ranks[0]["param_bytes"] == per_rank(path, estimate(path, context=[16]), tp, ep)["weights_bytes"]


@pytest.mark.parametrize("family, tp, ep", PACKED)
def test_packed_rank_holds_its_part_and_reads_only_its_experts(family, tp, ep, packed_checkpoints, monkeypatch):
    """Each rank (loaded without a process group) holds exactly the one-process packed model's tensors split by the
    plan (codes, scales, biases: equal bytes); of the expert tensors it reads only its own experts' under --ep;
    its bytes are the estimator's per-rank weights."""
    from kimi_lm.checkpoint import SafetensorsFile
    from kimi_lm.distributed.load import load_sharded
    from kimi_lm.distributed.parallel import parallelize
    from kimi_lm.estimate import estimate

    path = packed_checkpoints[family]
    spans = []
    span = SafetensorsFile._span
    monkeypatch.setattr(SafetensorsFile, "_span", lambda self, name, rows: spans.append((name, rows)) or
                        span(self, name, rows))
    want_bytes = per_rank(path, estimate(path, context=[16]), tp, ep)["weights_bytes"]
    for rank in range(2):
        spans.clear()
        got = load_sharded(path, Plan(tp, ep, rank), dtype="auto")
        read = list(spans)
        want = load(path, dtype="auto", mmap=False)
        n_experts = next(m for m in want.modules() if isinstance(m, StackedExperts)).num_experts
        parallelize(want, Plan(tp, ep, rank))
        a, b = want.state_dict(), got.state_dict()
        assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), family
        assert _held_bytes(got) == want_bytes, family
        mine = range(rank * n_experts // 2, (rank + 1) * n_experts // 2) if ep > 1 else range(n_experts)
        per_expert = [n for n, _ in read if ".experts." in n and not n.endswith(".weight_shape")]
        stacked = [(n, rows) for n, rows in read if ".switch_mlp." in n]
        assert per_expert or stacked, family
        for n in per_expert:  # K2 / K3: experts.E.*: this rank's E only (--tp alone: each expert's slice)
            assert int(n.split(".experts.")[1].split(".")[0]) in mine, n
        for n, rows in stacked:  # mlx-lm: [E, ...] stacks read as this rank's rows
            assert rows == (mine.start, len(mine)), n


def test_cached_decode_keeps_this_ranks_heads(checkpoints, split_runs):
    """Under --tp 2 the KDA state holds half the heads; the MLA latent cache is whole on each rank."""
    path = checkpoints["kimi_linear"]
    model, *_ = one_process(path)
    cache = model.make_cache(1)
    with torch.no_grad():
        model(ids_for(model.config.vocab_size)[:, :PREFILL], cache=cache)
        for _ in range(GREEDY):
            model(torch.tensor([[1]]), cache=cache)
    kda = sum(c.nbytes for c in cache.layers if hasattr(c, "state"))
    mla = cache.nbytes - kda
    rank = json.loads((split_runs / f"{path.name}-tp2-ep1.rank0.json").read_text())
    assert rank["cache_bytes"] == kda // 2 + mla
    expert_only = json.loads((split_runs / f"{path.name}-tp1-ep2.rank0.json").read_text())
    assert expert_only["cache_bytes"] == cache.nbytes  # --ep alone splits no heads


def test_generate_under_torchrun_matches_one_process(launch_output):
    """`kimi-lm generate --ep 2` in two processes on the bundled model prints one process's greedy text, once."""
    import kimi_lm
    from kimi_lm.tokenizer import load_tokenizer

    r = launch_output[1]
    model = kimi_lm.load(kimi_lm.DEFAULT_MODEL, dtype=torch.float32, backend=None)
    want = kimi_lm.generate(model, load_tokenizer(kimi_lm.DEFAULT_MODEL), PROMPT, max_tokens=N_TOKENS)
    assert len(want) > 10 and r.stdout == want + "\n"  # rank 0 alone prints
    assert r.stderr.count("Generation: ") == 1


@pytest.mark.slow
def test_python_m_kimi_lm_is_the_torchrun_entry_point():
    """`torchrun -m kimi_lm generate --ep 2` (the documented command line) runs and prints once."""
    r = torchrun("-m", "kimi_lm", "generate", *GENERATE)
    assert r.returncode == 0, r.stderr[-4000:]
    assert r.stdout.strip() and r.stderr.count("Generation: ") == 1


# ---- bad input: one clear error, before any weight is read --------------------------------------------------------
def _args(**kw):
    base = dict(tp=1, ep=1, parallel_command="kimi-lm generate", device="cpu", model="m", yes=True, dtype="float32")
    return Namespace(**{**base, **kw})


def test_heads_that_do_not_divide_name_the_flag():
    """The bundled model has 3 heads and 8 experts: --tp 2 and --ep 3 fail naming the flag and the sizes."""
    from kimi_lm.config import load_config
    from kimi_lm.checkpoint import _model_class
    import kimi_lm

    config = load_config(kimi_lm.DEFAULT_MODEL / "config.json")
    with torch.device("meta"):
        model = _model_class(config)(config)
    with pytest.raises(UsageError, match=r"--tp 2: .*MLA heads \(num_attention_heads\) = 3.*divisible by --tp"):
        check(model, Plan(tp=2))
    with pytest.raises(UsageError, match=r"--ep 3: .*routed experts \(num_experts\) = 8"):
        check(model, Plan(ep=3))
    check(model, Plan(ep=2))  # 8 experts split 2 ways


def test_launch_checks(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(UsageError, match=r"needs 2 processes started by torchrun: torchrun --nproc-per-node 2"):
        launch.check_args(_args(tp=2))
    with pytest.raises(UsageError, match=r"--tp 2 --ep 4: combined, the two must be equal"):
        launch.check_args(_args(tp=2, ep=4))
    with pytest.raises(UsageError, match=r"--ep must be >= 1"):
        launch.check_args(_args(ep=0))
    with pytest.raises(UsageError, match=r"needs 2 processes started by torchrun: .* -m kimi_lm serve \.\.\. --tp 2"):
        launch.check_args(_args(tp=2, parallel_command="kimi-lm serve"))  # serve runs split (test_parallel_serve.py)
    with pytest.raises(UsageError, match=r"kimi-lm chat runs in one process: .*`kimi-lm generate` and `kimi-lm serve`"):
        launch.check_args(_args(tp=2, parallel_command="kimi-lm chat"))
    with pytest.raises(UsageError, match=r"--prompt TEXT or --prompt-file FILE, not stdin"):
        launch.check_args(_args(ep=2, prompt="-"))
    with pytest.raises(UsageError, match=r"--prompt-cache-file .* cannot continue a split run"):
        launch.check_args(_args(ep=2, prompt_cache_file="state.safetensors"))
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(UsageError, match=r"torchrun started 4 processes but --tp 2 --ep 1 splits the model 2 way"):
        launch.check_args(_args(tp=2))
    with pytest.raises(UsageError, match=r"use --tp 4 or --ep 4"):
        launch.check_args(_args())
    assert launch.wanted(_args())  # torchrun with 4 processes and no flag: not a silent 4-fold copy
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.check_args(_args(tp=2, ep=2)) == (2, 2)


def test_generate_without_torchrun_is_a_usage_error(capsys, monkeypatch):
    from kimi_lm import cli

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main(["generate", "--tp", "2", "--prompt", "x"]) == 2
    assert "needs 2 processes started by torchrun" in capsys.readouterr().err


def test_packed_split_that_would_cut_a_group_is_refused(packed_checkpoints):
    """--tp 2 alone gives each rank 48 of an INT4 expert's 96 down_proj columns (groups of 32) and 16 of a K3 MXFP4
    expert's 32: refused before a weight is read, naming the module, the groups and --ep; the estimator refuses the
    same split, and accepts --tp 2 --ep 2 (whole experts)."""
    from kimi_lm.distributed.load import load_sharded
    from kimi_lm.estimate import estimate

    for family, columns in (("k2_int4", 96), ("k3_mxfp4", 32)):
        path = packed_checkpoints[family]
        with pytest.raises(UsageError, match=rf"--tp 2: packed weights split their input columns only at whole "
                                             rf"quantization groups, and .*experts.down_proj \({columns // 32} groups of "
                                             rf"32 input columns per row\).* cannot be split 2 ways; .*add --ep 2"):
            load_sharded(path, Plan(tp=2))
        e = estimate(path, context=[16])
        with pytest.raises(UsageError, match=rf"--tp 2: packed weights .* \({columns} input columns, groups of 32\)"):
            per_rank(path, e, 2, 1)
        assert per_rank(path, e, 2, 2)["weights_bytes"] > 0


def test_fp8_blocks_split_only_at_block_boundaries(tmp_path):
    """--tp 2 would give each rank 48 of tiny-k2's 96 expert rows: not whole 128-blocks, so refused by name."""
    import k2_checkpoints
    from kimi_lm.distributed.load import load_sharded

    ckpt = k2_checkpoints.write_random_fp8_checkpoint(fp8_config(moe_intermediate_size=96), tmp_path / "fp8")
    with pytest.raises(UsageError, match=r"--tp 2: FP8-block weights split only at 128-row/column block boundaries.*"
                                         r"experts.gate_up_proj \(48 of 96\)"):
        load_sharded(ckpt, Plan(tp=2))


def test_sharded_loader_is_the_one_process_loader_unsplit(official_checkpoint, tmp_path):
    """One rank of one (no process group needed): the same tensors as kimi_lm.checkpoint.load, bf16 -> fp32
    conversion included; a missing tensor is named."""
    from safetensors.torch import save_file
    from kimi_lm.distributed.load import load_sharded

    want = load(official_checkpoint, dtype=torch.float32).state_dict()
    got = load_sharded(official_checkpoint, Plan(), dtype=torch.float32).state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((Path(official_checkpoint) / "config.json").read_text())
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(next(Path(official_checkpoint).glob("*.safetensors"))).items()}
    dropped = sorted(tensors)[-1]
    del tensors[dropped]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint"):
        load_sharded(broken, Plan(), dtype=torch.float32)


def test_estimate_per_rank_on_the_command_line(capsys):
    estimate_module = importlib.import_module("kimi_lm.estimate")  # (kimi_lm.estimate is also the function)

    assert estimate_module.main(["tiny", "--context", "4k", "--tp", "2", "--ep", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    e = estimate_module.estimate("tiny", context=[4096])
    want = per_rank("tiny", e, 2, 2)
    assert out["per_rank"]["weights_bytes"] == want["weights_bytes"] < out["weights_bytes"]
    assert out["per_rank"]["kda_state_bytes"] * 2 == out["kda_state_bytes"]
    assert estimate_module.main(["tiny", "--context", "4k", "--ep", "2"]) == 0
    assert "per rank (--tp 1 --ep 2: 2 processes" in capsys.readouterr().out
    assert estimate_module.main(["tiny", "--tp", "3"]) == 2
    assert "--tp 3: this model cannot be split 3 ways" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["kimi_linear", "k3"])
def test_splitting_a_loaded_model_equals_loading_the_slices(family, checkpoints):
    """parallelize() on a model with weights keeps exactly the slices load_sharded() reads (no process group is
    needed until the first forward): rank 1 of --tp 2 --ep 2."""
    from kimi_lm.distributed.load import load_sharded
    from kimi_lm.distributed.parallel import parallelize

    plan = Plan(tp=2, ep=2, rank=1)
    model = load(checkpoints[family], dtype=torch.float32)
    parallelize(model, plan)
    got = load_sharded(checkpoints[family], plan, dtype=torch.float32)
    want, have = model.state_dict(), got.state_dict()
    assert want.keys() == have.keys()
    assert all(torch.equal(want[k], have[k]) for k in want)
    attn = [m for m in got.modules() if hasattr(m, "num_heads")]
    assert attn and all(m.num_heads * 2 == full.num_heads for m, full in zip(
        attn, [m for m in load(checkpoints[family], dtype=torch.float32).modules() if hasattr(m, "num_heads")]))
