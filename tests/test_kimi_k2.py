"""Kimi K2 / DeepSeek-V3: config, YaRN table, group-limited router, parity with transformers, cached decode."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import kimi_lm
from conftest import rel_err
from k2_checkpoints import build_reference, to_official_layout
from kimi_lm import CheckpointError
from kimi_lm.config import KimiK2Config, load_config, preset
from kimi_lm.model.kimi_k2 import KimiK2ForCausalLM
from kimi_lm.model.moe import TopkRouter
from kimi_lm.model.rope import RotaryEmbedding, inv_frequencies, yarn_correction_range
from kimi_lm.quant.fp8_block import quantize_modules

DATA = Path(__file__).resolve().parent / "data"

# Second parity config: cos/sin scaled by mscale/mscale_all_dim ≠ 1, NeoX rope layout, no renormalisation.
VARIANT = {
    "rope_scaling": {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 4,
                     "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.5},
    "rope_interleave": False, "norm_topk_prob": False, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 3,
}


@pytest.fixture(scope="module", params=["k2", "variant"])
def case(request, tmp_path_factory):
    cfg = preset("tiny-k2")
    if request.param == "variant":
        cfg = dataclasses.replace(cfg, **VARIANT)
    ref = build_reference(cfg, seed=3)
    hf_dir = tmp_path_factory.mktemp(f"hf-{request.param}")
    ref.save_pretrained(hf_dir)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 77), generator=g)  # 77 > original_max_position_embeddings
    with torch.no_grad():
        logits = ref(ids).logits
    return request.param, cfg, hf_dir, ids, logits


@pytest.fixture(scope="module")
def official(case, tmp_path_factory):
    return to_official_layout(case[2], tmp_path_factory.mktemp(f"official-{case[0]}"))


def test_reference_config_and_parameter_count():
    cfg = load_config(DATA / "kimi-k2-instruct.config.json")
    assert isinstance(cfg, KimiK2Config) and cfg == preset("kimi-k2-instruct")
    assert cfg.qk_head_dim == 192 and cfg.mla_cache_width == 576 and cfg.rope_scaling["factor"] == 32.0
    assert [cfg.is_moe_layer(i) for i in (0, 1, 60)] == [False, True, True]
    with torch.device("meta"):
        model = KimiK2ForCausalLM(cfg)
        quantize_modules(model, lambda name, m: name != "lm_head")
    # spec §2.6: the FP8 release holds 1,026,470,731,056 values, incl. one 56-value rotary_emb.inv_freq per layer
    assert model.num_parameters() == 1_026_470_731_056 - 61 * 56
    attn = model.model.layers[0].self_attn
    assert attn.kv_a_proj_with_mqa.weight_scale_inv.shape == (5, 56) and attn.o_proj.weight.shape == (7168, 8192)


def test_transformers_config_spelling(case):
    raw = json.loads((case[2] / "config.json").read_text())
    assert "rope_parameters" in raw and "rope_scaling" not in raw and "rope_theta" not in raw
    cfg = KimiK2Config.from_dict(raw)
    assert cfg.rope_scaling == case[1].rope_scaling and cfg.rope_theta == case[1].rope_theta
    assert KimiK2Config.from_dict(cfg.to_dict()) == cfg


def test_yarn_table_matches_spec():
    """Spec §2.4's table, computed by hand from the formulas there."""
    k2 = {"factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1, "beta_slow": 1,
          "mscale": 1.0, "mscale_all_dim": 1.0}
    v3 = {**k2, "factor": 40.0, "beta_fast": 32}
    assert yarn_correction_range(64, 50000.0, 4096, 1, 1) == (19, 20)
    assert yarn_correction_range(64, 10000.0, 4096, 32, 1) == (10, 23)
    for scaling, base, scale in [(k2, 50000.0, 0.13086080), ({**k2, "factor": 64.0}, 50000.0, 0.14467963),
                                 (v3, 10000.0, 0.13523378)]:
        rope = RotaryEmbedding(64, base, scaling)
        assert 192**-0.5 * rope.softmax_factor == pytest.approx(scale, abs=1e-8)
        assert rope.cos_sin_factor == 1.0
    theta = [50000.0 ** (-2 * i / 64) for i in range(32)]
    want = [t if i <= 19 else t / 32 for i, t in enumerate(theta)]  # K2: a step at index 20
    assert torch.allclose(inv_frequencies(64, 50000.0, k2), torch.tensor(want), rtol=1e-6, atol=0)
    theta = [10000.0 ** (-2 * i / 64) for i in range(32)]
    ramp = [min(max((i - 10) / 13, 0), 1) for i in range(32)]  # DeepSeek-V3: linear from index 10 to 23
    want = [t * (1 - r) + t / 40 * r for t, r in zip(theta, ramp)]
    assert torch.allclose(inv_frequencies(64, 10000.0, v3), torch.tensor(want), rtol=1e-6, atol=0)
    assert not torch.allclose(inv_frequencies(64, 10000.0, v3), inv_frequencies(64, 10000.0, None))


def plain_router(x, weight, bias, k, n_group, topk_group, renormalize, scaling):
    """The group-limited noaux_tc rule of spec §3, one token at a time, in plain Python."""
    out_idx, out_w = [], []
    E, size = weight.shape[0], weight.shape[0] // n_group
    for row in x.double():
        s = [1 / (1 + math.exp(-float(row @ weight[e].double()))) for e in range(E)]
        biased = [s[e] + float(bias[e]) for e in range(E)]
        group_score = [sum(sorted(biased[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: -group_score[g])[:topk_group]
        candidates = [e for e in range(E) if e // size in kept]
        idx = sorted(candidates, key=lambda e: -biased[e])[:k]
        w = [s[e] for e in idx]
        total = sum(w) if renormalize else 1.0
        out_idx.append(sorted(idx))
        out_w.append({e: wi / total * scaling for e, wi in zip(idx, w)})
    return out_idx, out_w


def test_group_limited_router_matches_plain_reference():
    torch.manual_seed(0)
    E, hidden, k = 16, 32, 4
    router = TopkRouter(hidden, E, k, n_group=4, topk_group=2, renormalize=True, scaling=2.5)
    ungrouped = TopkRouter(hidden, E, k, renormalize=True, scaling=2.5)
    with torch.no_grad():
        for r in (router, ungrouped):
            r.weight.copy_(torch.randn(E, hidden) / hidden**0.5)
            r.e_score_correction_bias.copy_(0.3 * torch.randn(E))
        ungrouped.load_state_dict(router.state_dict())
    x = torch.randn(200, hidden)
    with torch.no_grad():
        weights, idx = router(x)
    want_idx, want_w = plain_router(x, router.weight.detach(), router.e_score_correction_bias, k, 4, 2, True, 2.5)
    assert idx.sort(-1).values.tolist() == want_idx
    got = [{int(e): float(w) for e, w in zip(i, ws)} for i, ws in zip(idx, weights)]
    assert all(abs(g[e] - w[e]) < 1e-6 for g, w in zip(got, want_w) for e in w)
    # the group limit matters for this input: plain top-k picks experts from dropped groups for some tokens
    with torch.no_grad():
        assert not torch.equal(ungrouped(x)[1].sort(-1).values, idx.sort(-1).values)


@pytest.mark.parametrize("layout", ["transformers", "official"])
def test_fp32_parity_with_transformers(case, official, layout):
    name, cfg, hf_dir, ids, expected = case
    if layout == "official" and name == "variant":
        pytest.skip("the official layout is checked with the K2 config")
    model = kimi_lm.load(hf_dir if layout == "transformers" else official, dtype=torch.float32)
    assert isinstance(model, KimiK2ForCausalLM)
    assert model.config.model_type == ("deepseek_v3" if layout == "transformers" else "kimi_k2")
    with torch.no_grad():
        logits = model(ids)
    assert ids.shape[1] > cfg.rope_scaling["original_max_position_embeddings"]
    assert rel_err(logits, expected) <= 1e-4


def test_cached_decode_equals_full_forward(case, official):
    if case[0] == "variant":
        pytest.skip("one config suffices")
    ids = case[3]
    model = kimi_lm.load(official, dtype=torch.float32)
    full = model(ids)
    cache = model.make_cache(batch_size=2)
    # a long prompt chunk (naive MLA), a short one (absorbed), then one token at a time
    pieces = [model(ids[:, :40], cache=cache), model(ids[:, 40:50], cache=cache)]
    pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(50, ids.shape[1])]
    assert cache.offset == ids.shape[1]
    assert rel_err(torch.cat(pieces, dim=1), full) < 1e-5
    c = model.config
    assert cache.nbytes == c.num_hidden_layers * 2 * ids.shape[1] * (c.kv_lora_rank + c.qk_rope_head_dim) * 4


def test_cache_holds_rotated_key(official):
    model = kimi_lm.load(official, dtype=torch.float32)
    attn = model.model.layers[0].self_attn
    x = torch.randn(1, 12, model.config.hidden_size)
    cache = attn.make_cache(1, torch.float32, "cpu")
    attn(x[:, :5], cache)
    attn(x[:, 5:], cache)
    k_pe = attn.project(x)[1][..., attn.latent_dim :]  # kv_a_proj_with_mqa(x) (fused with q_a_proj when packed)
    stored = cache.buffer[:, :12, attn.latent_dim :]
    assert torch.allclose(stored, attn.rope(k_pe, torch.arange(12)[None]), atol=1e-6)
    assert not torch.allclose(stored, k_pe, atol=1e-3)


def test_mtp_layers_skipped_only_where_config_says(official, tmp_path):
    """The official layout carries layer n (an MTP module) and rotary_emb.inv_freq: skipped while
    num_nextn_predict_layers covers layer n, an unexpected tensor once it does not."""
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(official, ckpt)
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["num_nextn_predict_layers"] == 1
    kimi_lm.load(ckpt, dtype=torch.float32)
    (ckpt / "config.json").write_text(json.dumps({**raw, "num_nextn_predict_layers": 0}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.3\.(eh_proj|enorm)\.weight'"):
        kimi_lm.load(ckpt, dtype=torch.float32)


@pytest.mark.parametrize("change,match", [
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, r"rope_scaling\.type 'dynamic' is not supported"),
    ({"scoring_func": "softmax"}, r"config key 'scoring_func' = 'softmax' .* not implemented"),
    ({"n_group": 3}, r"n_routed_experts \(16\) must split into n_group \(3\)"),
])
def test_bad_config(official, tmp_path, change, match):
    raw = json.loads((official / "config.json").read_text())
    raw.update(change)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=rf"config\.json: {match}"):
        load_config(tmp_path / "config.json")
