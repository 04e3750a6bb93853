"""Block Attention Residuals: baseline equivalence at zero init, block boundaries against the paper's equations,
K3 parameter names, cached decode, fp32 op, config validation."""

import dataclasses

import pytest
import torch

from conftest import rel_err
from kimi_lm.config import KimiLinearConfig, preset
from kimi_lm.errors import CheckpointError
from kimi_lm.model.attnres import BlockAttnRes, block_size_in_sublayers, depth_attention, new_depth_attention
from kimi_lm.model.kimi_linear import KimiLinearForCausalLM
from kimi_lm.train.init import init_weights


def tiny(block_size=None, **kw) -> KimiLinearConfig:
    return dataclasses.replace(preset("tiny"), attn_res_block_size=block_size, **kw)


def build(cfg: KimiLinearConfig, seed: int = 0, query_std: float = 0.0) -> KimiLinearForCausalLM:
    g = torch.Generator().manual_seed(seed)
    model = init_weights(KimiLinearForCausalLM(cfg), std=0.1, generator=g)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_res_" in name and (query_std or "norm" in name):  # random gains always; queries if asked
                r = torch.randn(p.shape, generator=g)
                p.copy_(1 + 0.3 * r if "norm" in name else query_std * r)
    return model.eval()


def ids(T=40, seed=1):
    return torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(seed))


def test_k3_parameter_names():
    names = set(dict(KimiLinearForCausalLM(tiny(2)).named_parameters()))
    for op in ("self_attention_res_proj", "self_attention_res_norm", "mlp_res_proj", "mlp_res_norm"):
        assert f"model.layers.5.{op}.weight" in names
    assert {"model.output_attn_res_proj.weight", "model.output_attn_res_norm.weight"} <= names
    baseline = set(dict(KimiLinearForCausalLM(tiny()).named_parameters()))
    assert len(names - baseline) == 4 * 6 + 2 and baseline < names
    assert KimiLinearForCausalLM(tiny(2)).model.output_attn_res_proj.weight.shape == (1, 64)


@pytest.mark.parametrize("block", [0.5, 1, 1.5, 2.5])
def test_zero_queries_equal_baseline(block):
    """Zero queries: every op is the mean of its sources = (standard residual stream) / n, which each pre-norm
    undoes. With eps → 0 the only difference left is fp32 rounding."""
    cfg = tiny(block, rms_norm_eps=1e-12)
    attnres = build(cfg)
    baseline = KimiLinearForCausalLM(dataclasses.replace(cfg, attn_res_block_size=None)).eval()
    missing, unexpected = baseline.load_state_dict(attnres.state_dict(), strict=False)
    assert not missing and len(unexpected) == 4 * 6 + 2
    x = ids()
    with torch.no_grad():
        assert rel_err(attnres(x), baseline(x)) < 2e-5


def test_zero_queries_difference_is_proportional_to_eps():
    """With a real eps the scaled stream meets a relatively larger eps: the difference is linear in eps (measured:
    2.6e-5 at 1e-6, 2.7e-4 at 1e-5 with unit-scale embeddings), so eps is its only source."""
    errs = []
    for eps in (1e-6, 1e-5):
        cfg = tiny(1, rms_norm_eps=eps)
        attnres = build(cfg)
        with torch.no_grad():
            attnres.model.embed_tokens.weight.normal_(generator=torch.Generator().manual_seed(3))
        baseline = KimiLinearForCausalLM(dataclasses.replace(cfg, attn_res_block_size=None)).eval()
        baseline.load_state_dict(attnres.state_dict(), strict=False)
        with torch.no_grad():
            errs.append(rel_err(attnres(ids()), baseline(ids())))
    assert errs[1] < 1e-3 and 5 < errs[1] / errs[0] < 20


def test_random_queries_change_the_output():
    cfg = tiny(1)
    zero, rand = build(cfg), build(cfg, query_std=1.0)
    with torch.no_grad():
        assert rel_err(rand(ids()), zero(ids())) > 0.05


def oracle_logits(model: KimiLinearForCausalLM, input_ids, S: int) -> torch.Tensor:
    """The paper's equations written out: sublayer outputs f_0 … f_{L−1} kept in a list; blocks are the index
    ranges [nS, (n+1)S); sources of sublayer l in block n = [embedding, each completed block's sum, and the sum of
    f_j for nS ≤ j < l if that is not empty]."""
    m = model.model
    emb = m.embed_tokens(input_ids)
    outs = []

    def sources(l):
        n = l // S
        src = [emb] + [sum(outs[b * S : (b + 1) * S]) for b in range(n)]
        return src + ([sum(outs[n * S : l])] if l > n * S else [])

    for layer in m.layers:
        outs.append(layer.attention(depth_attention(sources(len(outs)), layer.self_attention_res_proj,
                                                    layer.self_attention_res_norm)))
        outs.append(layer.feed_forward(depth_attention(sources(len(outs)), layer.mlp_res_proj, layer.mlp_res_norm)))
    L = len(outs)
    final = [emb] + [sum(outs[b * S : (b + 1) * S]) for b in range((L + S - 1) // S)]
    h = depth_attention(final, m.output_attn_res_proj, m.output_attn_res_norm)
    return model.lm_head(m.norm(h))


@pytest.mark.parametrize("S", [1, 2, 3, 5, 12, 13])  # 12 sublayers: 5 and 13 do not divide them
def test_block_boundaries_match_the_equations(S):
    model = build(tiny(S / 2), query_std=0.3)  # depth logits of std ≈ 2.4: far from uniform weights
    with torch.no_grad():
        # a wrong source list is an O(0.1) error; 1e-7 input noise alone moves these random MoE logits by ~1e-5
        assert rel_err(model(ids()), oracle_logits(model, ids(), S)) < 1e-4


@pytest.mark.parametrize("S,expected", [
    # sublayer -> its sources, each given as the set of sublayer outputs it sums ("e" = the embedding)
    (1, {0: ["e"], 1: ["e", {0}], 2: ["e", {0}, {1}], 4: ["e", {0}, {1}, {2}, {3}]}),
    (2, {0: ["e"], 1: ["e", {0}], 2: ["e", {0, 1}], 3: ["e", {0, 1}, {2}], 4: ["e", {0, 1}, {2, 3}]}),
    (3, {1: ["e", {0}], 2: ["e", {0, 1}], 3: ["e", {0, 1, 2}], 5: ["e", {0, 1, 2}, {3, 4}], 6: ["e", {0, 1, 2}, {3, 4, 5}]}),
    (5, {9: ["e", {0, 1, 2, 3, 4}, {5, 6, 7, 8}], 10: ["e", {0, 1, 2, 3, 4}, {5, 6, 7, 8, 9}]}),
])
def test_sources_per_sublayer(S, expected):
    """Sublayer outputs are one-hot vectors, so each source shows exactly which outputs it sums."""
    L, D = 12, 16
    proj, norm = new_depth_attention(D, 1e-6)
    state = BlockAttnRes(torch.eye(D)[D - 1].view(1, 1, D), S, 1e-6)  # the embedding: the last basis vector
    seen = {}
    for l in range(L):
        state.input(proj, norm)
        seen[l] = [{"e"} if v[0, 0, D - 1] else set(torch.nonzero(v[0, 0]).flatten().tolist()) for v in state.sources()]
        state.add(torch.eye(D)[l].view(1, 1, D))
    for l, want in expected.items():
        assert seen[l] == [{"e"} if w == "e" else w for w in want], l
    # the final op sees the embedding and every block, the last one possibly short: never a zero or repeated source
    final = [set(torch.nonzero(v[0, 0]).flatten().tolist()) for v in state.sources()]
    assert final == [{D - 1}] + [set(range(b, min(b + S, L))) for b in range(0, L, S)]


def test_cached_decode_equals_full_forward():
    model = build(tiny(1.5), query_std=1.0)
    x = ids(70)
    with torch.no_grad():
        full = model(x)
        cache = model.make_cache(batch_size=2)
        pieces = [model(x[:, :65], cache=cache)] + [model(x[:, t : t + 1], cache=cache) for t in range(65, 70)]
    # chunked-vs-step KDA rounding (~1e-6) passes through sharp depth softmaxes; a wrong source would be O(1)
    assert rel_err(torch.cat(pieces, 1), full) < 1e-4


def test_op_runs_in_fp32_for_bf16_inputs():
    torch.manual_seed(0)
    proj, norm = new_depth_attention(32, 1e-5)
    with torch.no_grad():
        proj.weight.normal_()
    src = [torch.randn(2, 5, 32).to(torch.bfloat16) * s for s in (1.0, 30.0, 0.01)]
    V = torch.stack([s.float() for s in src])
    w = ((V / V.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()) @ proj.weight[0]).softmax(0)
    want = (w.unsqueeze(-1) * V).sum(0)
    state = BlockAttnRes(src[0], 1, 1e-5)  # S = 1: every output is its own block, so the sources are src
    for v in src[1:]:
        state.input(proj, norm)
        state.add(v)
    for out in (depth_attention(src, proj, norm), state.output(proj, norm)):
        assert out.dtype == torch.bfloat16
        assert rel_err(out, want) < 2**-8  # one bf16 rounding of the result, nothing more


def test_block_size_units_and_validation():
    assert [block_size_in_sublayers(b) for b in (0.5, 1, 1.5, 12)] == [1, 2, 3, 24]
    with pytest.raises(ValueError, match="multiple of 0.5"):
        block_size_in_sublayers(0.75)
    raw = tiny().to_dict()
    assert KimiLinearConfig.from_dict({**raw, "attn_res_block_size": 12}).attn_res_block_size == 12
    for bad in (0.25, -1, "4"):
        with pytest.raises(CheckpointError, match="attn_res_block_size must be"):
            KimiLinearConfig.from_dict({**raw, "attn_res_block_size": bad})
