"""Training: parameter grouping, per-expert Muon, WSD, aux-loss-free balancing, data packing, BPE, the train loop
(loss goes down, metrics + plot, checkpoints kimi_lm.load reads), exact resume and one-line errors."""

import dataclasses
import json
import re
import shutil
import subprocess
import sys

import pytest
import torch

import kimi_lm
from kimi_lm.config import preset
from kimi_lm.errors import UsageError
from kimi_lm.model.kimi_linear import KimiLinearForCausalLM
from kimi_lm.model.moe import SparseMoE
from kimi_lm.train import train as trainer
from kimi_lm.train.balance import ExpertBiasBalancer
from kimi_lm.train.bpe import _byte_decoder, tiktoken_ranks, train_bpe, train_hf_bpe, write_tokenizer
from kimi_lm.train.data import PackedData
from kimi_lm.train.init import init_weights
from kimi_lm.train.optim import Optimizers, param_groups, wsd

TOPICS = ["while", "for", "if", "try", "with", "assert", "lambda", "return"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run fastest on one thread, and the machine is shared
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A few Python reference topics as text files, a chat file, and a 400-token BPE trained on them."""
    import pydoc_data.topics

    root = tmp_path_factory.mktemp("corpus")
    (root / "text").mkdir()
    for t in TOPICS:
        (root / "text" / f"{t}.txt").write_text(pydoc_data.topics.topics[t])
    chat = [{"messages": [{"role": "user", "content": f"Explain {t}."},
                          {"role": "assistant", "content": pydoc_data.topics.topics[t][:300]}]} for t in TOPICS]
    (root / "text" / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chat))
    ranks = train_bpe([pydoc_data.topics.topics[t] for t in TOPICS], 400)
    write_tokenizer(root / "tok", ranks, "{% for m in messages %}<|im_user|>{{ m['role'] }}<|im_middle|>"
                                         "{{ m['content'] }}<|im_end|>{% endfor %}")
    return root


def tiny_model(block=1.0, seed=0):
    cfg = dataclasses.replace(preset("tiny"), attn_res_block_size=block)
    return init_weights(KimiLinearForCausalLM(cfg), generator=torch.Generator().manual_seed(seed))


def run(corpus, out, *extra):
    argv = ["--config", "tiny", "--data", str(corpus / "text"), "--tokenizer", str(corpus / "tok"), "--out", str(out),
            "--batch-size", "4", "--seq-len", "64", "--quiet", *extra]
    return trainer.main(argv)


# ---- optimizer -----------------------------------------------------------------------------------------------------
def test_param_groups_cover_every_parameter_exactly_once():
    model = tiny_model()
    groups = param_groups(model)
    names = [n for g in groups.values() for n, _ in g]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters()) and len(set(names)) == len(names)
    where = {n: g for g, items in groups.items() for n, _ in items}
    assert where["model.layers.0.self_attn.q_proj.weight"] == "muon"
    assert where["model.layers.2.self_attn.kv_b_proj.weight"] == "muon"  # MLA (layer 3, 1-based)
    assert where["model.layers.0.mlp.down_proj.weight"] == "muon"
    assert where["model.layers.1.block_sparse_moe.shared_experts.up_proj.weight"] == "muon"
    assert where["model.layers.1.block_sparse_moe.experts.gate_up_proj"] == "muon_stacked"
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.block_sparse_moe.gate.weight",
              "model.layers.1.self_attention_res_proj.weight", "model.output_attn_res_proj.weight"):
        assert where[n] == "adamw_decay", n
    for n in ("model.layers.0.self_attn.A_log", "model.layers.0.self_attn.dt_bias", "model.norm.weight",
              "model.layers.0.self_attn.q_conv1d.weight", "model.layers.1.mlp_res_norm.weight"):
        assert where[n] == "adamw_no_decay", n


def test_stacked_experts_get_muon_one_matrix_at_a_time():
    """Each expert's gate, up and down matrix moves exactly as torch.optim.Muon moves that matrix on its own."""
    model = tiny_model()
    experts = model.model.layers[1].block_sparse_moe.experts
    I = experts.intermediate_size
    before_gu, before_d = experts.gate_up_proj.detach().clone(), experts.down_proj.detach().clone()
    gu_grad, d_grad = torch.randn_like(before_gu), torch.randn_like(before_d)
    opt = Optimizers(model, lr=0.01, weight_decay=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    experts.gate_up_proj.grad, experts.down_proj.grad = gu_grad.clone(), d_grad.clone()
    opt.step()
    for e in (0, 5):
        for before, grad, rows, after in ((before_gu, gu_grad, slice(0, I), experts.gate_up_proj),
                                          (before_gu, gu_grad, slice(I, 2 * I), experts.gate_up_proj),
                                          (before_d, d_grad, slice(None), experts.down_proj)):
            alone = before[e, rows].clone().requires_grad_(True)
            alone.grad = grad[e, rows].clone()
            torch.optim.Muon([alone], lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw").step()
            assert torch.equal(after.detach()[e, rows], alone.detach())
            assert not torch.equal(after.detach()[e, rows], before[e, rows])


def test_optimizer_state_round_trips_through_named_tensors():
    model = tiny_model()
    opt = Optimizers(model, lr=0.01)
    model(torch.randint(0, 256, (2, 16))).float().pow(2).mean().backward()
    opt.step()
    state = opt.state_tensors()
    assert any(k.startswith("muon.model.layers.1.block_sparse_moe.experts.gate_up_proj.") for k in state)
    assert "adamw.model.embed_tokens.weight.exp_avg_sq" in state
    fresh = Optimizers(model, lr=0.01)
    fresh.load_state_tensors(state)
    again = fresh.state_tensors()
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)


def test_wsd_schedule_values():
    s = lambda step: wsd(step, total=100, warmup=10, decay_ratio=0.2, min_ratio=0.1)  # noqa: E731
    assert [s(0), s(4), s(9)] == pytest.approx([0.1, 0.5, 1.0])
    assert s(10) == s(50) == s(79) == 1.0  # stable until the last 20 steps
    assert [s(80), s(89), s(99)] == pytest.approx([1 - 0.9 / 20, 1 - 0.9 * 10 / 20, 0.1])
    assert wsd(0, 10, warmup=0, decay_ratio=0.0) == 1.0 and wsd(9, 10, 0, 0.0) == 1.0


# ---- aux-loss-free balancing ---------------------------------------------------------------------------------------
def test_bias_update_moves_load_toward_balance():
    torch.manual_seed(0)
    moe = SparseMoE(32, 8, 2, 16, 1)
    with torch.no_grad():
        moe.gate.weight.normal_(0, 0.1)
        moe.gate.weight[:2] += 0.5  # experts 0 and 1 score high for most tokens: a skewed router
    balancer = ExpertBiasBalancer(moe, update_rate=0.02)
    x = torch.randn(512, 32) + 1.0
    with torch.no_grad():
        moe(x)
    first = balancer.loads["gate"].clone()
    stats = balancer.step()
    bias = moe.gate.e_score_correction_bias
    assert torch.equal(bias, 0.02 * torch.sign(first.float().mean() - first.float()))  # exactly one signed step
    assert first[:2].min() > first[2:].max() and stats["moe_load_max_over_mean"] > 2.5
    for _ in range(60):
        with torch.no_grad():
            moe(x)
        last = balancer.step()
    assert last["moe_load_max_over_mean"] < 1.5 < stats["moe_load_max_over_mean"]
    moe.eval()
    with torch.no_grad():
        moe(x)
    assert balancer.loads["gate"].sum() == 0  # evaluation passes are not counted


# ---- tokenizer and data --------------------------------------------------------------------------------------------
def test_bpe_in_tiktoken_layout_encodes_like_the_trained_bpe(corpus):
    """tiktoken's rank-order merging of the converted ranks splits text exactly as the trained BPE does."""
    import pydoc_data.topics

    texts = [pydoc_data.topics.topics[t] for t in TOPICS]
    hf = train_hf_bpe(texts, 400)
    ranks = tiktoken_ranks(hf)
    assert ranks == train_bpe(texts, 400) and len(ranks) == 400
    tok = kimi_lm.load_tokenizer(corpus / "tok")
    assert tok.num_base_tokens == 400 and tok.special_tokens["<|im_end|>"] == 402
    decode = _byte_decoder()
    held_out = pydoc_data.topics.topics["class"][:4000] + " 12345 漢字 naïve"  # not in the BPE's training text
    ids = tok.encode(held_out)
    assert [tok.token_bytes(i) for i in ids] == [bytes(decode[c] for c in t) for t in hf.encode(held_out).tokens]
    assert tok.decode(ids) == held_out
    assert len(ids) < 0.6 * len(held_out.encode())  # merges are used: well under one token per byte


def test_packing_split_and_deterministic_batches(corpus):
    tok = kimi_lm.load_tokenizer(corpus / "tok")
    data = PackedData.from_paths([corpus / "text"], tok, seq_len=32, eval_fraction=0.1, seed=3)
    assert data.train.shape[1] == data.eval.shape[1] == 33
    assert torch.equal(data.train[1:, 0], data.train[:-1, -1])  # windows overlap by one token
    assert data.eval.numel() >= 0.05 * (data.train.numel() + data.eval.numel())
    x, y = data.train_batch(5, 4)
    assert torch.equal(x[:, 1:], y[:, :-1]) and x.shape == (4, 32)
    again = PackedData.from_paths([corpus / "text"], tok, seq_len=32, eval_fraction=0.1, seed=3)
    assert torch.equal(again.train_batch(5, 4)[0], x)
    n = data.train.shape[0]
    epoch = torch.cat([data.train_batch(s, 1)[0] for s in range(n)])
    assert torch.equal(epoch.sort(0).values, data.train[:, :-1].sort(0).values)  # an epoch visits each window once
    stream = [t for split in (data.train, data.eval) for t in split[:, :-1].flatten().tolist() + split[-1, -1:].tolist()]
    found = 0
    for t in TOPICS:  # the .jsonl documents were rendered by the chat template (special tokens as single ids)
        want = tok.encode(f"<|im_user|>user<|im_middle|>Explain {t}.<|im_end|>")
        found += any(stream[i : i + len(want)] == want for i in range(len(stream)))
    assert found >= len(TOPICS) - 2  # all but those cut off in a dropped tail


# ---- the train command ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    assert run(corpus, out, "--steps", "30", "--lr", "1e-2", "--warmup", "5", "--eval-every", "15",
               "--save-every", "15", "--eval-batches", "4", "--attn-res-block-size", "1") == 0
    return out


def test_loss_decreases(trained):
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    train = [m["loss"] for m in metrics if "loss" in m]
    evals = [m["eval_loss"] for m in metrics if "eval_loss" in m]
    assert len(train) == 30 and len(evals) == 2
    assert train[0] > 6.0  # ≈ ln(656): the untrained model is near uniform
    assert sum(train[-5:]) / 5 < train[0] - 1.5
    assert evals[-1] < train[0] - 1.5
    assert {"lr", "tok_per_s", "grad_norm", "moe_load_max_over_min"} <= set(metrics[0])
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoint_is_a_loadable_model_directory(trained, corpus):
    ckpt = trained / "step-000030"
    assert sorted(p.name for p in trained.glob("step-*")) == ["step-000015", "step-000030"]
    model = kimi_lm.load(ckpt, dtype=torch.float32)
    assert model.config.attn_res_block_size == 1.0 and model.config.vocab_size == 400 + 256
    tok = kimi_lm.load_tokenizer(ckpt)
    assert tok.encode("while x:") == kimi_lm.load_tokenizer(corpus / "tok").encode("while x:")
    text = kimi_lm.generate(model, tok, "The while statement", max_tokens=8)
    assert isinstance(text, str)
    bias = model.model.layers[1].block_sparse_moe.gate.e_score_correction_bias
    assert bias.abs().max() > 0  # the balancer's updates are part of the checkpoint


def test_resume_reproduces_the_uninterrupted_run(trained, tmp_path, corpus):
    resumed = tmp_path / "resumed"
    shutil.copytree(trained, resumed)
    shutil.rmtree(resumed / "step-000030")  # as if the run had stopped right after step 15
    assert run(corpus, resumed, "--steps", "30", "--lr", "1e-2", "--warmup", "5", "--eval-every", "15",
               "--save-every", "15", "--eval-batches", "4", "--resume") == 0
    full = (trained / "metrics.jsonl").read_text().splitlines()
    again = (resumed / "metrics.jsonl").read_text().splitlines()
    strip = lambda lines: [{k: v for k, v in json.loads(s).items() if k != "tok_per_s"} for s in lines]  # noqa: E731
    assert strip(again) == strip(full)  # identical losses, learning rates, grad norms and eval losses
    a = kimi_lm.load(trained / "step-000030", dtype=torch.float32).state_dict()
    b = kimi_lm.load(resumed / "step-000030", dtype=torch.float32).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_errors_are_one_line(trained, tmp_path, corpus, capsys):
    assert run(corpus, tmp_path / "empty", "--steps", "2", "--resume") == 2
    assert "no checkpoint to resume from" in capsys.readouterr().err
    assert run(corpus, trained, "--steps", "2") == 2
    assert "already holds checkpoints; pass --resume" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    opt = broken / "step-000030" / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:100])
    assert run(corpus, broken, "--steps", "50", "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optimizer.safetensors" in err and "Traceback" not in err
    (broken / "step-000030" / "trainer_state.json").unlink()
    assert run(corpus, broken, "--steps", "50", "--resume") == 2
    assert "trainer_state.json is missing" in capsys.readouterr().err


def test_resume_refuses_another_config_or_tokenizer(trained, tmp_path, corpus, capsys):
    """--resume continues with the checkpoint's config.json and tokenizer: the first command line re-run (same
    --config, --tokenizer; --attn-res-block-size omitted or the same) resumes; a different --config,
    --attn-res-block-size or --tokenizer is refused naming what would change, before any training."""
    again = tmp_path / "again"
    shutil.copytree(trained, again)
    assert run(corpus, again, "--steps", "31", "--eval-every", "0", "--attn-res-block-size", "1", "--resume") == 0
    capsys.readouterr()
    for flags, named in ((["--config", "tiny-k3"], "hidden_act 'silu' -> 'situ'"),
                         (["--attn-res-block-size", "2"], "attn_res_block_size 1.0 -> 2.0")):
        argv = ["--data", str(corpus / "text"), "--out", str(trained), "--steps", "40", "--quiet", "--resume", *flags]
        assert trainer.main(argv) == 2
        err = capsys.readouterr().err
        assert named in err and "drop those flags" in err and err.count("\n") == 1, err
    other = tmp_path / "tok"
    shutil.copytree(corpus / "tok", other)
    (other / "tokenizer_config.json").write_text((other / "tokenizer_config.json").read_text().replace("{", "{ ", 1))
    assert run(corpus, trained, "--steps", "40", "--tokenizer", str(other), "--resume") == 2
    assert "differs from the tokenizer" in capsys.readouterr().err
    assert sorted(p.name for p in trained.glob("step-*")) == ["step-000015", "step-000030"]  # nothing trained


def test_bad_data_path_is_one_line_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kimi_lm.cli", "train", "--data", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope: no such file or directory" in proc.stderr


# ---- errors that name the option, file and line at fault (issue 19, items 5 and 6) --------------------------------
def test_seq_len_over_half_the_text_is_the_too_little_text_error(corpus, tmp_path, capsys):
    """One document shorter than two sequences used to crash in pack() (a negative cut) instead of explaining."""
    (tmp_path / "one.txt").write_text((corpus / "text" / "while.txt").read_text())
    for seq_len in ("4096", "100000"):
        argv = ["--data", str(tmp_path / "one.txt"), "--tokenizer", str(corpus / "tok"), "--out", str(tmp_path / "r"),
                "--seq-len", seq_len, "--quiet"]
        assert trainer.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "one.txt: " in err and f"too little text for --seq-len {seq_len}" in err
    tok = kimi_lm.load_tokenizer(corpus / "tok")
    with pytest.raises(UsageError, match="too little text"):
        PackedData.from_paths([tmp_path / "one.txt"], tok, seq_len=4096)


@pytest.mark.parametrize("line, expected", [
    ('{"messages": [{"content": "no role"}]}', "cannot render with the tokenizer's chat template: messages must"),
    ('{"messages": "hello"}', "expected a JSON object with a 'messages' list, found 'messages' as a JSON str"),
    ('{"text": "hello"}', "found keys ['text']"),
    ("[1, 2]", "found a JSON list"),
    ('{"messages": [', "not JSON"),
])
def test_bad_jsonl_line_names_file_and_line(corpus, tmp_path, line, expected):
    good = '{"messages": [{"role": "user", "content": "hi"}]}'
    (tmp_path / "chat.jsonl").write_text(f"{good}\n\n{line}\n{good}\n")  # the bad record is on line 3
    tok = kimi_lm.load_tokenizer(corpus / "tok")
    with pytest.raises(UsageError) as info:
        PackedData.from_paths([tmp_path], tok, seq_len=8)
    assert str(info.value).startswith(f"{tmp_path / 'chat.jsonl'}:3: ") and expected in str(info.value)


def test_non_utf8_text_names_file_and_line(corpus, tmp_path):
    (tmp_path / "notes.txt").write_bytes(b"fine\nalso fine\n\xff\xfe bad\n")
    with pytest.raises(UsageError, match=r"notes.txt:3: not UTF-8 text \(invalid start byte at byte 15\)"):
        PackedData.from_paths([tmp_path], kimi_lm.load_tokenizer(corpus / "tok"), seq_len=8)


def test_config_errors_name_what_is_wrong(corpus, tmp_path, capsys):
    tok = kimi_lm.load_tokenizer(corpus / "tok")
    (tmp_path / "empty").mkdir()
    cases = {
        "huge": "--config huge: unknown preset; known presets: kimi-linear-48b-a3b, bench, tiny, kimi-k3, tiny-k3",
        "missing.json": "--config missing.json: no such file",
        str(tmp_path / "nowhere" / "config.json"): "config.json: no such file",
        str(tmp_path / "empty"): "empty: this directory has no config.json",
        "tiny-k2": "--config tiny-k2: kimi-lm train trains Kimi Linear and Kimi K3 models; this is deepseek_v3",
    }
    for spec, expected in cases.items():
        with pytest.raises(UsageError, match=re.escape(expected)):
            trainer.build_config(spec, tok, None)
    assert run(corpus, tmp_path / "r", "--config", "huge") == 2  # through the command: one line, before any data work
    err = capsys.readouterr().err
    assert err == "kimi-lm train: error: --config huge: unknown preset; known presets: kimi-linear-48b-a3b, bench, " \
                  "tiny, kimi-k3, tiny-k3 (or a config.json path)\n"


@pytest.mark.parametrize("extra, expected", [
    (["--attn-res-block-size", "0.3"], "--attn-res-block-size must be 0 (off) or a positive number of layers"),
    (["--eval-fraction", "1"], "--eval-fraction must be >= 0 and < 1"),
    (["--lr", "nan"], "--lr must be > 0"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--tokenizer", "no-such-dir"], "--tokenizer no-such-dir: no such directory"),
    (["--resume"], ": no checkpoint to resume from"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_option_errors_name_the_option(corpus, tmp_path, capsys, extra, expected):
    assert run(corpus, tmp_path / "r", *extra) == 2  # extra options after run()'s: a later --tokenizer wins
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err and "--config" not in err


def test_usage_errors_are_usage_errors_not_checkpoint_errors(tmp_path):
    args = trainer.build_parser().parse_args(["--data", "x", "--out", str(tmp_path), "--steps", "0"])
    with pytest.raises(UsageError, match="--steps must be >= 1"):
        trainer.check_args(args)
    with pytest.raises(UsageError, match="unrecognized"):
        trainer.build_parser().parse_args(["--data", "x", "--out", "y", "--bogus"])
    (tmp_path / "file").write_text("")
    args = trainer.build_parser().parse_args(["--data", str(tmp_path / "file"), "--out", str(tmp_path / "file")])
    with pytest.raises(UsageError, match="--out .*file: exists and is not a directory"):
        trainer.train(args)


def test_resume_names_a_damaged_metrics_line(trained, tmp_path, corpus, capsys):
    resumed = tmp_path / "resumed"
    shutil.copytree(trained, resumed)
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    lines[4] = lines[4][:20]  # a line cut short, as by a full disk
    (resumed / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert run(corpus, resumed, "--steps", "31", "--resume") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl:5: not a metrics record of kimi-lm train" in err
    assert run(corpus, trained, "--steps", "30", "--resume") == 2
    assert "--steps 30: " in capsys.readouterr().err  # nothing left to train names the option to raise


# ---- the bundled model ---------------------------------------------------------------------------------------------
def test_bundled_model_loads_and_answers_on_topic():
    root = kimi_lm.DEFAULT_MODEL
    assert sum(f.stat().st_size for f in root.iterdir()) < 30 * 2**20
    model = kimi_lm.load(root)  # the loader validates every tensor's name, shape and dtype
    cfg = model.config
    kda = len(cfg.linear_attn_config["kda_layers"])
    assert kda == 3 * len(cfg.linear_attn_config["full_attn_layers"]) and cfg.attn_res_block_size
    assert not cfg.is_moe_layer(0) and cfg.is_moe_layer(1) and cfg.num_shared_experts == 1
    tok = kimi_lm.load_tokenizer(root)
    prompt = tok.apply_chat_template([{"role": "user", "content": 'Explain the "while" statement.'}])
    text = kimi_lm.generate(model, tok, prompt, max_tokens=24)
    assert "while" in text and "statement" in text, text


# ---- Kimi K3 ---------------------------------------------------------------------------------------------------------
def test_k3_config_trains_and_its_checkpoint_loads_and_generates(corpus, tmp_path):
    """A tiny K3 (SiTU, latent MoE, gated KDA / MLA, AttnRes) from a kimi_k3 wrapper config.json: loss falls, and the
    checkpoint is a K3 release-layout directory whose model gives the run's final eval loss again."""
    from kimi_lm.config_k3 import KimiK3Config
    from kimi_lm.model.kimi_k3 import KimiK3ForCausalLM

    raw = preset("tiny-k3").to_dict()
    raw["text_config"]["attn_res_block_size"] = 2  # the file's value, not the preset's, must be used
    (tmp_path / "config.json").write_text(json.dumps(raw))
    out = tmp_path / "run"
    argv = ["--config", str(tmp_path / "config.json"), "--data", str(corpus / "text"), "--tokenizer",
            str(corpus / "tok"), "--out", str(out), "--batch-size", "4", "--seq-len", "64", "--quiet", "--steps", "12",
            "--lr", "1e-2", "--warmup", "3", "--eval-every", "0", "--eval-batches", "2"]
    assert trainer.main(argv) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < losses[0] - 1.0, losses

    ckpt = out / "step-000012"
    written = json.loads((ckpt / "config.json").read_text())
    assert written["model_type"] == "kimi_k3" and written["text_config"]["attn_res_block_size"] == 2
    model = kimi_lm.load(ckpt, dtype=torch.float32)
    assert type(model) is KimiK3ForCausalLM and isinstance(model.config, KimiK3Config)
    assert model.config.vocab_size == 400 + 256
    layer = model.model.layers[0]
    heads = model.config.kda_num_heads
    assert layer.is_kda and torch.all(layer.self_attn.A_log[heads:] == 0) and layer.self_attn.A_log[:heads].abs().min() > 0
    assert hasattr(layer.self_attn, "g_proj") and hasattr(model.model.layers[1].block_sparse_moe,
                                                          "routed_expert_down_proj")
    tok = kimi_lm.load_tokenizer(ckpt)
    assert tok.chat_format == "kimi"  # trained with a Kimi-template tokenizer: a K3 config does not switch it to XTML
    data = PackedData.from_paths([str(corpus / "text")], tok, 64, 0.05, 0)
    again = trainer.evaluate(model, data, 4, 2, lambda: torch.autocast("cpu", enabled=False))
    assert again == pytest.approx(metrics[-1]["eval_loss"], rel=1e-5)
    steps = list(kimi_lm.stream_generate(model, tok, "The while statement", max_tokens=6, stop_token_ids=[]))
    assert len(steps) == 6 and all(0 <= r.token < model.config.vocab_size for r in steps)


def test_k3_preset_name_is_a_train_config(corpus):
    tok = kimi_lm.load_tokenizer(corpus / "tok")
    cfg = trainer.build_config("tiny-k3", tok, None)
    assert cfg.model_type == "kimi_k3" and cfg.vocab_size == tok.num_base_tokens + 256
    assert type(trainer.new_model(cfg)).__name__ == "KimiK3ForCausalLM"
