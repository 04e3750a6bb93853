"""Memory estimator: exact counts against the published checkpoints, format bit costs, cache sizes, the CLI, and (once
the model exists) against a built model's parameters and real cache ``nbytes``.

Published figures used as targets: Kimi-Linear-48B-A3B-Instruct has 49,122,681,728 parameters in 20,493 tensors,
91.50 GB (shared/specs/kimi_linear.md §2); the Kimi-K2-Instruct FP8 checkpoint lists 1,026,470,731,056 "parameters"
in 958.5 GB and is announced as "1T total, 32B activated" (shared/specs/kimi_k2_and_quantization.md §1.1, §2.6).
"""

import dataclasses
import json
import math
from pathlib import Path

import pytest

from kimi_lm.config import KimiK2Config, KimiLinearConfig, load_config, preset
from kimi_lm.estimate import GIB, KIB, MIB, estimate, load_source, main
from kimi_lm.estimate_plot import figure
from kimi_lm.memory import Tensor, make_quant, tensor_bytes, tensors

REFERENCE = Path(__file__).resolve().parent / "data"  # the official config files, copied from the checkpoints
KL_JSON = REFERENCE / "kimi-linear-48b-a3b-instruct.config.json"
K2_JSON = REFERENCE / "kimi-k2-instruct.config.json"


def _kl_source():
    """The official config file (the preset is checked equal to it below)."""
    return str(KL_JSON)


# ---- Kimi Linear 48B: parameters ----------------------------------------------------------------------------------
def test_kimi_linear_48b_total_params_match_the_checkpoint():
    e = estimate(_kl_source())
    assert e.total_params == 49_122_681_728
    assert estimate("kimi-linear-48b-a3b").total_params == e.total_params
    cfg = load_config(KL_JSON)
    assert sum(t.count for t in tensors(cfg)) == 20_493  # tensor count of the official shards
    per_layer = {}
    for t in tensors(cfg):
        if t.name.startswith("model.layers.0.self_attn.") or t.name.startswith("model.layers.3.self_attn."):
            per_layer[t.component] = per_layer.get(t.component, 0) + t.numel
    assert per_layer == {"kda": 39_514_272, "mla": 29_114_880}  # kimi_linear.md §2.3, §2.4


def test_kimi_linear_48b_active_params_follow_the_routing():
    e = estimate(_kl_source())
    # Everything runs for every token except the routed experts not chosen: 26 MoE layers × (256 − 8) experts × 3
    # matrices of 1024 × 2304.
    idle = 26 * (256 - 8) * 3 * 1024 * 2304
    assert e.active_params == e.total_params - idle == 3_484_459_904
    assert e.active_params_no_embeddings == 3_484_459_904 - 163840 * 2304
    assert 3e9 < e.active_params_no_embeddings < e.active_params < 4e9  # "A3B"


def test_kimi_linear_bf16_weights_are_two_bytes_each_plus_fp32_vectors():
    e = estimate(_kl_source(), quant="bf16")
    fp32 = 20 * (32 + 4096) + 26 * 256  # A_log, dt_bias, e_score_correction_bias
    assert e.weights_bytes == 2 * e.total_params + 2 * fp32
    assert round(e.weights_bytes / GIB, 2) == 91.50  # the checkpoint's "91.50 GB"


# ---- quantization formats ------------------------------------------------------------------------------------------
def _bits_per_weight(quant, shape=(4096, 2304), group=None):
    t = Tensor("w", shape, "kda")
    return 8 * tensor_bytes(t, make_quant(quant, group), 2) / t.numel


def test_mxfp4_is_4_25_bits_and_affine_is_b_plus_32_over_g():
    assert _bits_per_weight("mxfp4") == 4.25
    for bits in (2, 3, 4, 5, 6, 8):
        for group in (32, 64, 128):
            assert _bits_per_weight(f"affine{bits}", group=group) == bits + 32 / group
    assert _bits_per_weight("affine4") == 4.5  # mlx default group 64


def test_fp8_block_is_one_byte_plus_one_fp32_per_128x128_tile():
    q, a = make_quant("fp8"), 2  # bf16 model
    assert tensor_bytes(Tensor("w", (7168, 2048), "experts"), q, a) == 7168 * 2048 + 4 * 56 * 16
    # K2's kv_a_proj_with_mqa: 576 rows = 4.5 tiles, the partial tile has its own scale ([5, 56] scales)
    assert tensor_bytes(Tensor("w", (576, 7168), "mla"), q, a) == 576 * 7168 + 4 * 5 * 56
    assert tensor_bytes(Tensor("n", (7168,), "norms", "norm"), q, a) == 2 * 7168  # norms stay bf16
    assert tensor_bytes(Tensor("r", (384, 7168), "router", "router"), q, a) == 2 * 384 * 7168


def test_mxfp4_leaves_router_at_8_bits_and_small_tensors_unquantized():
    e = estimate("kimi-linear-48b-a3b", quant="mxfp4")
    p, w = e.params_by_component, e.weights_by_component
    gate = 26 * 256 * 2304
    assert w["router"] == gate * 8.5 / 8 + 4 * 26 * 256  # affine 8-bit g64 gate + fp32 bias
    assert w["norms"] == 2 * p["norms"]
    assert w["experts"] == p["experts"] * 4.25 / 8
    conv = 20 * 3 * 4096 * 4
    kda_fp32 = 20 * (32 + 4096)
    assert w["kda"] == (p["kda"] - conv - kda_fp32 - 20 * 128) * 4.25 / 8 + 2 * (conv + 20 * 128) + 4 * kda_fp32
    assert 26e9 < e.weights_bytes < 26.5e9  # the MXFP4 model card: "roughly 26-29 GB" for the weights


def test_affine_skips_tensors_whose_width_does_not_divide_the_group():
    cfg = dataclasses.replace(preset("tiny"), hidden_size=96)  # 96 % 64 != 0
    a = load_source(cfg).dtype_bytes  # fp32
    t = Tensor("w", (32, 96), "kda")
    assert tensor_bytes(t, make_quant("affine4", 64, 4), a) == 32 * 96 * 4
    assert tensor_bytes(t, make_quant("affine4", 32, 4), a) == 32 * 96 // 2 + 3 * 32 * 8


# ---- Kimi K2 -------------------------------------------------------------------------------------------------------
def test_k2_preset_matches_the_reference_config():
    ref = json.loads(K2_JSON.read_text())
    assert preset("kimi-k2-instruct") == KimiK2Config.from_dict(ref)  # the estimator reads the config class's preset
    assert load_source("kimi-k2").config == preset("kimi-k2-instruct")
    assert estimate(str(K2_JSON)).total_params == estimate("kimi-k2").total_params


def test_k2_total_params_explain_the_published_count():
    e = estimate("kimi-k2")
    assert e.total_params == 1_026_408_232_448  # ≈ "1T"
    scales = sum(math.ceil(t.shape[0] / 128) * math.ceil(t.shape[1] / 128) * t.count
                 for t in tensors(preset("kimi-k2-instruct")) if t.kind == "linear")
    # The checkpoint listing counts every tensor element: weights + FP8 scales + 61 rotary inv_freq tensors of [56].
    assert e.total_params + scales + 61 * 56 == 1_026_470_731_056
    assert round(e.weights_bytes / GIB, 1) == 958.5  # FP8 shards: "958.5 GB"


def test_k2_active_params_are_the_published_32b():
    e = estimate("kimi-k2")
    idle = 60 * (384 - 8) * 3 * 2048 * 7168  # 60 MoE layers, routed experts not chosen
    assert e.active_params == e.total_params - idle == 32_861_500_928
    # "32B activated" is this count (embedding table and lm_head included) rounded down; without the input
    # embedding table it is 31.7B. No multi-token-prediction layer exists in K2 (num_nextn_predict_layers = 0).
    assert int(e.active_params / 1e9) == 32
    assert e.active_params_no_embeddings == e.active_params - 163840 * 7168


# ---- caches --------------------------------------------------------------------------------------------------------
def test_kda_state_and_mla_cache_per_token():
    e = estimate("kimi-linear-48b-a3b", context="1M", batch=3)
    per_layer = 32 * 128 * 128 * 4 + 3 * 4096 * 3 * 2  # fp32 state (2 MiB) + bf16 conv tail (72 KiB)
    assert e.kda_state_bytes == 20 * per_layer == 43_417_600
    assert e.mla_cache_bytes_per_token == 7 * (512 + 64) * 2 == 8064
    assert e.cache_bytes == 3 * (e.kda_state_bytes + MIB * 8064)
    assert e.total_bytes == e.weights_bytes + e.cache_bytes + e.activation_bytes
    fp8 = estimate("kimi-linear-48b-a3b", context=1000, cache_dtype="fp8")
    assert fp8.cache_bytes == fp8.kda_state_bytes + 1000 * 7 * 576  # the recurrent state stays fp32
    assert estimate("kimi-k2", context=4096).cache_bytes == 4096 * 61 * 576 * 2


def test_hybrid_saving_against_all_mla_and_mha():
    e = estimate("kimi-linear-48b-a3b", context="4k,128k,1M")
    c = e.comparison
    assert c["all_mla"][2] == MIB * 27 * 576 * 2
    assert c["mha"][2] == MIB * 27 * 32 * (192 + 128) * 2
    # 7 of 27 layers cache per token, so the saving tends to 1 − 7/27 = 74.1 % (the seeds' "~75 %"); the constant
    # KDA state lowers it at short contexts.
    assert c["saving_vs_all_mla"][0] < c["saving_vs_all_mla"][1] < c["saving_vs_all_mla"][2] < 1 - 7 / 27
    assert round(c["saving_vs_all_mla"][2], 3) == 0.739
    assert c["saving_vs_mha"][2] > 0.98


def test_longest_context_is_the_boundary():
    e = estimate("kimi-linear-48b-a3b", context=4096, devices=["mac-128gb", "h100-80gb", "ram-256gb"])
    d = e.devices
    assert not d["h100-80gb"]["fits"] and d["h100-80gb"]["max_context"] == 0  # 91.5 GiB of bf16 weights
    assert d["ram-256gb"]["max_context"] == e.model_max_context
    T, usable = d["mac-128gb"]["max_context"], d["mac-128gb"]["usable_bytes"]
    assert 0 < T < e.model_max_context
    total = lambda t: estimate("kimi-linear-48b-a3b", context=t, devices=[]).total_bytes  # noqa: E731
    assert total(T) <= usable < total(T + 1)


def test_prefill_activations_scale_with_chunk_and_batch():
    small = estimate("kimi-linear-48b-a3b", context=8192, prefill_chunk=512).activation_bytes
    big = estimate("kimi-linear-48b-a3b", context=8192, prefill_chunk=2048).activation_bytes
    assert 3.5 * small < big <= 4 * small
    assert estimate("kimi-linear-48b-a3b", context=8192, batch=2).activation_bytes == 2 * big


def test_training_adamw_and_muon():
    adamw = estimate("kimi-linear-48b-a3b", context=4096, train=True)
    muon = estimate("kimi-linear-48b-a3b", context=4096, train=True, optimizer="muon")
    P = adamw.total_params
    # bf16 weights + bf16 grads + fp32 master + two fp32 moments = 16 bytes per parameter; the fp32 vectors need no
    # master copy but their weights and grads take 4 + 4 bytes, so they cost 16 too
    t = adamw.train
    assert t["weights"] + t["grads"] + t["master_weights"] + t["optimizer_states"] == 16 * P
    assert t["master_weights"] == 4 * (P - 20 * (32 + 4096) - 26 * 256)
    assert muon.train["optimizer_states"] < t["optimizer_states"] and adamw.cache_bytes == 0
    assert adamw.total_bytes == sum(v for k, v in t.items() if k != "optimizer") + adamw.activation_bytes


# ---- config sources ------------------------------------------------------------------------------------------------
def test_preset_equals_the_official_config():
    assert load_source(str(KL_JSON)).config.linear_attn_config == preset("kimi-linear-48b-a3b").linear_attn_config
    assert estimate(str(KL_JSON), "mxfp4").weights_bytes == estimate("kimi-linear-48b-a3b", "mxfp4").weights_bytes


def test_checkpoint_dir_reads_its_quantization_and_shard_sizes(tmp_path):
    torch = pytest.importorskip("torch")
    save_file = pytest.importorskip("safetensors.torch").save_file
    cfg = preset("tiny").to_dict()
    cfg["quantization"] = {"group_size": 32, "bits": 4, "mode": "mxfp4",  # as mlx-lm writes it
                           "model.layers.1.mlp.gate": {"group_size": 64, "bits": 8}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({"a": torch.zeros(10, 3, dtype=torch.bfloat16), "b": torch.zeros(7, dtype=torch.float32)},
              str(tmp_path / "model.safetensors"))
    e = estimate(tmp_path)
    assert e.quant == "mxfp4 (group 32)" and e.arch["router_quant"] == "affine8 (group 64)"
    assert e.weights_source == "shards" and e.weights_bytes == 10 * 3 * 2 + 7 * 4
    other = estimate(tmp_path, quant="affine4")  # another format than the shards hold: computed
    assert other.weights_source == "config"
    assert estimate(KimiLinearConfig.from_dict(cfg), quant="mxfp4").weights_bytes == \
        estimate(dict(cfg), quant="mxfp4").weights_bytes


# ---- command line --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, needle", [
    (["no-such-model"], "known presets: kimi-linear-48b-a3b"),
    (["missing/config.json"], "no such config"),
    (["kimi-k2", "--quant", "int5"], "unknown quantization"),
    (["kimi-k2", "--context", "12q"], "bad context '12q'"),
    (["kimi-k2", "--context", "0"], "must be > 0"),
    (["kimi-k2", "--context", "4k,-1"], "bad context"),
    (["kimi-k2", "--batch", "0"], "--batch must be a positive integer"),
    (["kimi-k2", "--batch", "two"], "--batch must be a positive integer"),
    (["kimi-k2", "--quant", "mxfp4", "--group-size", "64"], "groups of 32"),
    (["kimi-k2", "--devices", "toaster"], "unknown device"),
    (["kimi-k2", "--frobnicate"], "unrecognized arguments"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, needle):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and needle in err and "Traceback" not in err


def test_unreadable_config_is_one_line(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert main([str(bad)]) == 2 and main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "not a readable JSON config" in err


def test_through_the_kimi_lm_dispatcher(capsys):
    from kimi_lm.cli import main as kimi_lm

    assert kimi_lm(["estimate", "kimi-k2", "--context", "12q"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert kimi_lm(["estimate", "--help"]) == 0 and "--quant" in capsys.readouterr().out


def test_json_is_exactly_one_object(capsys):
    assert main(["kimi-linear-48b-a3b", "--quant", "mxfp4", "--context", "128k,1M", "--batch", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)  # fails on anything but one JSON value
    for key in ("total_params", "active_params", "weights_bytes", "kda_state_bytes", "mla_cache_bytes_per_token",
                "cache_bytes", "total_bytes", "devices"):
        assert key in data
    assert data["cache_bytes"] == 2 * (data["kda_state_bytes"] + 128 * KIB * data["mla_cache_bytes_per_token"])
    assert {"fits", "max_context"} <= set(data["devices"]["h100-80gb"])


def test_table_shows_the_working(capsys):
    assert main(["kimi-linear-48b-a3b", "--context", "4k"]) == 0
    out = capsys.readouterr().out
    assert "49,122,681,728 total" in out and "20 layers × (32×128×128 fp32 state" in out
    assert "7 layers × (512 + 64) × 2 B" in out and "every layer MLA" in out


def test_plot_writes_a_png_atomically(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "memory.png"
    assert main(["kimi-linear-48b-a3b", "--quant", "mxfp4", "--plot", str(png), "--json"]) == 0
    json.loads(capsys.readouterr().out)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["memory.png"]
    assert main(["kimi-k2", "--plot", str(tmp_path / "no" / "dir.png")]) == 2


# ---- against the real model (skipped until kimi_lm.model.kimi_linear exists) ----------------------------------------
def _mid_config() -> KimiLinearConfig:
    """Mid-size: the bench preset's 8 layers and real head sizes, 2 dense layers, tied embeddings."""
    cfg = preset("bench")
    return dataclasses.replace(cfg, first_k_dense_replace=2, num_experts=8, moe_intermediate_size=128,
                               tie_word_embeddings=True)


def _state_numel_and_bytes(model):
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}  # a tied weight counts once
    return sum(t.numel() for t in state.values()), sum(t.numel() * t.element_size() for t in state.values())


@pytest.mark.parametrize("make_cfg", [lambda: preset("tiny"), _mid_config,
                                      lambda: dataclasses.replace(preset("tiny"), attn_res_block_size=1)],
                         ids=["tiny", "mid", "attn-res"])
def test_estimate_matches_a_built_model(make_cfg):
    torch = pytest.importorskip("torch")
    model_mod = pytest.importorskip("kimi_lm.model.kimi_linear")
    cfg = make_cfg()
    torch.manual_seed(0)
    m = model_mod.KimiLinearForCausalLM(cfg)
    numel, nbytes = _state_numel_and_bytes(m)
    e = estimate(cfg)
    assert numel == e.total_params
    assert nbytes == e.weights_bytes


def _write_checkpoint(directory: Path, cfg: KimiLinearConfig, dtype) -> None:
    """A checkpoint with every tensor the estimator's inventory names (experts one by one), random values."""
    import torch
    from safetensors.torch import save_file

    out = {}
    for t in tensors(cfg):
        names = [t.name.replace(f"{{0..{t.count - 1}}}", str(i)) for i in range(t.count)] if t.count > 1 else [t.name]
        for name in names:
            out[name] = torch.randn(t.shape).to(torch.float32 if t.kind == "fp32" else dtype)
    save_file(out, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(cfg.to_dict()))


def test_bf16_weight_bytes_match_the_loaded_checkpoint(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("kimi_lm.model.kimi_linear")
    from kimi_lm.checkpoint import load

    cfg = dataclasses.replace(preset("tiny"), dtype="bfloat16")
    _write_checkpoint(tmp_path, cfg, torch.bfloat16)
    numel, nbytes = _state_numel_and_bytes(load(tmp_path, dtype=torch.bfloat16))  # loader: names and completeness
    e = estimate(cfg)
    assert (numel, nbytes) == (e.total_params, e.weights_bytes)  # bf16, but A_log, dt_bias, router bias in fp32
    from_dir = estimate(tmp_path)
    assert from_dir.weights_source == "shards" and from_dir.weights_bytes == e.weights_bytes


@pytest.mark.parametrize("batch, tokens", [(1, 5), (2, 9)])
def test_cache_bytes_match_the_real_cache(batch, tokens):
    torch = pytest.importorskip("torch")
    model_mod = pytest.importorskip("kimi_lm.model.kimi_linear")
    cfg = preset("tiny")
    torch.manual_seed(0)
    m = model_mod.KimiLinearForCausalLM(cfg).eval()
    cache = m.make_cache(batch_size=batch)
    with torch.no_grad():
        m(torch.randint(0, cfg.vocab_size, (batch, tokens)), cache=cache)
    assert cache.nbytes == estimate(cfg, context=tokens, batch=batch).cache_bytes
    with torch.no_grad():  # one decode step more
        m(torch.randint(0, cfg.vocab_size, (batch, 1)), cache=cache)
    assert cache.nbytes == estimate(cfg, context=tokens + 1, batch=batch).cache_bytes


def test_plot_labels_of_close_devices_do_not_overlap():
    """Issue 19 item 8: A100 80GB and H100 80GB (same usable memory) printed their labels on top of each other."""
    pytest.importorskip("matplotlib")
    import itertools

    for model, quant in (("kimi-linear-48b-a3b", "mxfp4"), ("kimi-linear-48b-a3b", "bf16")):
        fig = figure(model, quant=quant)
        renderer = fig.canvas.get_renderer()
        texts = fig.axes[0].texts
        boxes = [t.get_window_extent(renderer) for t in texts]
        assert not [(a.get_text(), b.get_text()) for (a, x), (b, y) in itertools.combinations(zip(texts, boxes), 2)
                    if x.overlaps(y)]
    assert any("A100 80GB / H100 80GB" in t.get_text() for t in texts)  # one line of the same size, one label


def test_estimate_piped_into_head_exits_cleanly():
    """Issue 19 item 6: ``kimi-lm estimate ... | head -1`` printed a BrokenPipeError traceback."""
    import subprocess
    import sys

    out = subprocess.run(f"{sys.executable} -m kimi_lm.estimate kimi-linear-48b-a3b --json | head -c 10",
                         shell=True, capture_output=True, text=True)
    contexts = ",".join(str(i) for i in range(1, 5001))  # a table far longer than the pipe's buffer
    big = subprocess.run(f"{sys.executable} -m kimi_lm.estimate tiny --devices 1G --context {contexts} | head -1",
                         shell=True, capture_output=True, text=True)
    assert "Traceback" not in out.stderr + big.stderr and "Broken pipe" not in big.stderr, big.stderr[-500:]


def test_inventory_is_the_model_state_dict():
    """The inventory is the meta-device model through the names table: every parameter element counted once."""
    torch = pytest.importorskip("torch")
    from kimi_lm.checkpoint import _model_class

    for name in ("tiny", "tiny-k2", "kimi-k2-instruct"):
        cfg = preset(name)
        with torch.device("meta"):
            model = _model_class(cfg)(cfg)
        assert sum(t.numel for t in tensors(cfg)) == sum(t.numel() for t in model.state_dict().values())
    cfg = dataclasses.replace(preset("tiny"), attn_res_block_size=1)
    res = [t for t in tensors(cfg) if t.component == "attn_res"]
    assert {t.kind for t in res} == {"vector", "norm"} and len(res) == 4 * 6 + 2


# ---- Kimi K2-Thinking / K2.5 (INT4 experts) and K3's MXFP4 release: compressed-tensors ---------------------------
def test_k2_thinking_and_k25_presets_count_int4_experts_and_bf16_rest():
    k2 = estimate("kimi-k2", context=[4096])
    E, I, D, moe_layers = 384, 2048, 7168, 60
    experts = moe_layers * E * 3 * I * D  # every routed expert's gate, up and down
    fp32 = moe_layers * E  # e_score_correction_bias
    for name in ("kimi-k2-thinking", "kimi-k25"):
        e = estimate(name, context=[4096])
        assert e.total_params == k2.total_params == 1_026_408_232_448  # the same text model
        assert e.active_params == k2.active_params and e.family == "kimi_k2"
        assert e.quant == "int4-experts (group 32)" and e.model_max_context == 262144
        # experts: 4 bits + a bf16 scale per 32 + an int32 [2] weight_shape per matrix; the rest bf16
        want = experts // 2 + experts // 32 * 2 + moe_layers * E * 3 * 8 + 2 * (e.total_params - experts) + 2 * fp32
        assert e.weights_bytes == want
        assert 553 * GIB < e.weights_bytes < 554 * GIB  # ~594 GB, the size of the released shards
        assert e.weights_by_component["experts"] == experts * 9 // 16 + moe_layers * E * 3 * 8
        assert any("biases" in n for n in e.notes)  # what kimi-lm adds in memory is stated
    k3 = estimate("kimi-k3", quant="mxfp4-experts", context=[4096])
    k3_experts = 92 * 896 * 3 * 3072 * 3584
    assert k3.weights_by_component["experts"] == k3_experts * 17 // 32  # 4.25 bits
    assert k3.weights_by_component["mla"] == estimate("kimi-k3", quant="bf16").weights_by_component["mla"]


def _tensor_bytes(path: Path) -> dict[str, int]:
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            out.update({k: h.get_tensor(k).nbytes for k in h.keys()})
    return out


def _text_tensor_bytes(path: Path, num_layers: int) -> tuple[int, int]:
    """(bytes of the text model's tensors, bytes of every tensor) summed over the safetensors files themselves; not
    the text model: a wrapper's vision tower, multi-token-prediction layers, stored rotary inv_freq buffers."""
    import re

    text = total = 0
    for k, n in _tensor_bytes(path).items():
        total += n
        layer = re.search(r"model\.layers\.(\d+)\.", k)
        if not (k.startswith(("vision_tower.", "mm_projector.")) or k.endswith("rotary_emb.inv_freq")
                or (layer and int(layer[1]) >= num_layers)):
            text += n
    return text, total


def test_estimate_dir_on_compressed_tensors_checkpoints(tmp_path):
    pytest.importorskip("compressed_tensors")
    import torch
    from k2_checkpoints import build_reference
    from k2_int4_checkpoints import to_int4_layout, to_k25_layout
    from k3_checkpoints import mxfp4_config, random_model, write_mxfp4_checkpoint

    build_reference(preset("tiny-k2"), seed=3).save_pretrained(tmp_path / "hf")
    int4 = to_int4_layout(tmp_path / "hf", tmp_path / "int4")[0]
    k25 = to_k25_layout(int4, tmp_path / "k25")
    k3 = write_mxfp4_checkpoint(random_model(mxfp4_config()), tmp_path / "k3", dtype=torch.bfloat16)[0]
    for path, quant in ((int4, "int4-experts"), (k25, "int4-experts"), (k3, "mxfp4-experts")):
        e = estimate(str(path), context=[64])
        cfg = load_config(path / "config.json")
        text, total = _text_tensor_bytes(path, cfg.num_hidden_layers)
        assert e.weights_source == "shards" and e.quant.startswith(quant)
        assert e.weights_bytes == text < total  # the files' bytes, vision tower and the MTP layer left out
        from_config = estimate(str(path / "config.json"), context=[64])  # the same, computed from the config
        assert from_config.quant == e.quant and from_config.weights_source == "config"
        experts = sum(n for k, n in _tensor_bytes(path).items() if ".experts." in k)  # packed, scales, shapes
        if quant == "int4-experts":  # the fixture's weight_shape is int64 (compressed-tensors' writer), not int32
            matrices = 3 * cfg.n_routed_experts * (cfg.num_hidden_layers - cfg.first_k_dense_replace)
            assert experts - from_config.weights_by_component["experts"] == matrices * 8
        else:
            assert experts == from_config.weights_by_component["experts"]
