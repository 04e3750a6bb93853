"""Kimi K3: parity with mlx-lm's kimi_k3 on tiny release-layout checkpoints, cached / chunked decode, the CPU backend,
the config wrapper and every malformed-input error.

The oracle is mlx-lm 0.32.2 (``mlx_lm/models/kimi_k3.py``, CPU, fp32) loading the very directory kimi-lm loads.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import kimi_lm
from k3_checkpoints import F32_NAMES, mlx_logits, random_model, tiny_config, write_checkpoint
from kimi_lm.checkpoint import load
from kimi_lm.config import config_from_dict, preset
from kimi_lm.errors import CheckpointError

# a variant with every K3 feature off (softplus gate, low-rank KDA gate, no MLA gate, no latent, plain residual)
PLAIN = dict(linear_attn_config={"use_full_rank_gate": False, "gate_lower_bound": None}, mla_use_output_gate=False,
             routed_expert_hidden_size=None, latent_moe_use_norm=False, attn_res_block_size=None,
             activation_situ_linear_beta=None)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope="module")
def k3(tmp_path_factory):
    """(model, release-layout directory in fp32) of the tiny K3 preset."""
    model = random_model(tiny_config())
    return model, write_checkpoint(model, tmp_path_factory.mktemp("k3") / "tiny-k3")


def ids(T: int, B: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", ["release", "plain"])
def test_logits_and_greedy_decode_match_mlx_lm(tmp_path, k3, variant):
    pytest.importorskip("mlx_lm.models.kimi_k3")
    if variant == "release":
        model, path = k3
    else:
        model = random_model(tiny_config(**PLAIN), seed=2)
        path = write_checkpoint(model, tmp_path / "plain")
    ours = load(path, dtype=torch.float32)
    x = ids(24)
    ref, ref_steps, tokens = mlx_logits(path, x, steps=4)
    assert rel(ours(x)[0], ref) <= 1e-4
    full = ours(torch.cat([x, torch.tensor([tokens])], dim=1))[0]
    assert rel(full[24:28], ref_steps) <= 1e-4  # the reference's own cached decode, step by step


def test_cached_decode_and_chunked_prefill_equal_one_pass(k3):
    model, _ = k3
    x = ids(40, B=2)
    want = model(x)
    for chunks in ([40], [7, 20, 13], [33, 1, 1, 1, 1, 1, 1, 1]):  # naive (T > 16) and absorbed (T ≤ 16) MLA
        cache, got, start = model.make_cache(batch_size=2), [], 0
        for n in chunks:
            got.append(model(x[:, start:start + n], cache=cache))
            start += n
        assert rel(torch.cat(got, dim=1), want) <= 1e-5, chunks
    assert model(x, logits_to_keep=1).shape == (2, 1, 256)


def test_cpu_backend_equals_plain_model(k3):
    _, path = k3
    plain = kimi_lm.load(path, dtype=torch.float32, backend=None)
    prepared = kimi_lm.load(path, dtype=torch.float32)
    x = ids(19, B=2)
    assert rel(prepared(x), plain(x)) <= 1e-5
    c1, c2 = plain.make_cache(2), prepared.make_cache(2)
    plain(x, cache=c1), prepared(x, cache=c2)
    step = ids(1, B=2, seed=3)
    assert rel(prepared(step, cache=c2), plain(step, cache=c1)) <= 1e-5


def test_bf16_release_layout(tmp_path, k3, caplog):
    model, _ = k3
    path = write_checkpoint(model, tmp_path / "bf16", dtype=torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="kimi_lm.checkpoint"):
        ours = load(path, dtype=torch.bfloat16)
    assert sum("vision" in r.message for r in caplog.records) == 1  # one info line for the skipped vision tensors
    layer0 = ours.model.layers[0].self_attn
    assert layer0.A_log.dtype == torch.float32 and layer0.A_log.shape == (16,) and not layer0.A_log[2:].any()
    x = ids(16)
    rounded = random_model(tiny_config())  # the same weights, rounded to bf16 where the release stores BF16
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if not F32_NAMES.fullmatch(name):
                p.copy_(p.bfloat16().float())
    assert rel(load(path, dtype=torch.float32)(x), rounded(x)) <= 1e-6  # every tensor read exactly
    logits = ours(x)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_config_wrapper_round_trip_and_defaults():
    cfg = preset("tiny-k3")
    raw = cfg.to_dict()
    assert raw["model_type"] == "kimi_k3" and raw["text_config"]["model_type"] == "kimi_linear"
    assert config_from_dict(json.loads(json.dumps(raw))).to_dict() == raw
    # quantization_config at the top level only (transformers dumps): taken into the text config
    raw2 = json.loads(json.dumps(raw))
    raw2["quantization_config"] = {"quant_method": "compressed-tensors", "format": "mxfp4-pack-quantized"}
    assert config_from_dict(raw2).quantization_config["format"] == "mxfp4-pack-quantized"
    # keys absent = features off (the reference config's defaults)
    text = {k: v for k, v in raw["text_config"].items() if k not in (
        "activation_situ_beta", "activation_situ_linear_beta", "mla_use_output_gate", "routed_expert_hidden_size",
        "latent_moe_use_norm", "attn_res_block_size")}
    bare = config_from_dict({"model_type": "kimi_k3", "text_config": text})
    assert (bare.activation_situ_beta, bare.mla_use_output_gate, bare.routed_expert_hidden_size,
            bare.attn_res_block_size) == (None, False, None, None)
    assert bare.is_kda_layer(0) and not bare.is_kda_layer(3) and not bare.is_kda_layer(6)  # 1-based lists


def _with_text(raw: dict, **changes) -> dict:
    out = json.loads(json.dumps(raw))
    out["text_config"].update(changes)
    return out


@pytest.mark.parametrize("change, needle", [
    (lambda r: {k: v for k, v in r.items() if k != "text_config"}, "text_config"),
    (lambda r: _with_text(r, model_type="deepseek_v3"), "text_config.model_type"),
    (lambda r: _with_text(r, hidden_act="silu"), "hidden_act"),
    (lambda r: _with_text(r, mla_use_nope=False), "mla_use_nope"),
    (lambda r: _with_text(r, moe_router_activation_func="softmax"), "moe_router_activation_func"),
    (lambda r: _with_text(r, rope_scaling={"type": "yarn", "factor": 4.0}), "rope_scaling"),
    (lambda r: _with_text(r, linear_attn_config={**r["text_config"]["linear_attn_config"],
                                                 "kda_layers": [0, 1, 2, 4, 5]}), "1-based"),
    (lambda r: _with_text(r, linear_attn_config={**r["text_config"]["linear_attn_config"],
                                                 "gate_lower_bound": 5.0}), "gate_lower_bound"),
    (lambda r: _with_text(r, activation_situ_beta=-1.0), "activation_situ_beta"),
    (lambda r: _with_text(r, routed_expert_hidden_size=None), "latent_moe_use_norm"),
])
def test_bad_configs_name_the_key(change, needle):
    with pytest.raises(CheckpointError, match=needle.replace(".", r"\.")):
        config_from_dict(change(preset("tiny-k3").to_dict()))


def _tensors(model) -> dict:
    from k3_checkpoints import official_tensors

    return official_tensors(model)


@pytest.mark.parametrize("edit, needle", [
    (lambda t: t.update({"language_model.model.layers.0.self_attn.A_log": torch.zeros(2)}), "A_log"),
    (lambda t: t.pop("language_model.model.layers.1.block_sparse_moe.experts.3.w2.weight"), "expert 3"),
    (lambda t: t.pop("language_model.model.layers.3.self_attn.g_proj.weight"), "missing"),
    (lambda t: t.update({"model.norm.weight": t.pop("language_model.model.norm.weight")}), "language_model."),
    (lambda t: t.update({"language_model.model.layers.1.block_sparse_moe.routed_expert_up_proj.weight":
                         torch.zeros(64, 64)}), "routed_expert_up_proj"),
    (lambda t: t.update({"language_model.model.layers.2.self_attn.g_a_proj.weight": torch.zeros(16, 64)}),
     "unexpected tensor"),
])
def test_malformed_checkpoints_are_refused(tmp_path, k3, edit, needle):
    model, _ = k3
    tensors = _tensors(model)
    edit(tensors)
    path = write_checkpoint(model, tmp_path / "bad", tensors=tensors)
    with pytest.raises(CheckpointError, match=needle):
        load(path, dtype=torch.float32)


def _spec_parameter_count() -> int:
    """The release's tensor inventory (spec §A3), summed by hand."""
    D, V, E, n_kda, n_mla, n_moe = 7168, 163840, 896, 69, 24, 92
    kda = 3 * 12288 * D + 3 * 12288 * 4 + 128 * D + 12288 * 128 + 128 + 12288 + 96 * D + 12288 * D + 128
    mla = 1536 * D + 1536 + 18432 * 1536 + 576 * D + 512 + 24576 * 512 + 12288 * D
    moe = (896 * D + 896 + 3584 * D + 3584 + D * 3584 + 3 * 6144 * D
           + E * (2 * 3072 * 3584 + 3584 * 3072))
    per_layer = 2 * D + 2 * D + 2 * D  # two pre-norms, two AttnRes norms, two AttnRes queries
    return (2 * V * D + D + 2 * D + 93 * per_layer + n_kda * kda + 93 * D * 12288 + n_mla * mla
            + 3 * 33792 * D + n_moe * moe)


def test_estimator_kimi_k3_preset_and_directory(k3):
    est = kimi_lm.estimate("kimi-k3", quant="bf16", context=[4096])
    assert est.total_params == _spec_parameter_count() == 2_779_484_478_208
    assert est.weights_bytes == 2 * est.total_params + 2 * 69 * (128 + 12288) + 2 * 92 * 896  # fp32 gates, bias
    mxfp4 = kimi_lm.estimate("kimi-k3", quant="mxfp4", context=[4096])
    assert mxfp4.weights_bytes < est.weights_bytes / 3
    assert est.kda_state_bytes == 69 * (96 * 128 * 128 * 4 + 3 * 12288 * 3 * 2)
    assert est.mla_cache_bytes_per_token == 24 * 576 * 2
    model, path = k3
    small = kimi_lm.estimate(str(path), context=[64])
    assert small.total_params == model.num_parameters() and small.family == "kimi_k3"
