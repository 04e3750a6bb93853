"""The plain model's primitives (kimi_lm/model/layers.py): what they compute, in which precision."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from kimi_lm.model.layers import MLP, GatedRMSNorm, RMSNorm
from kimi_lm.model.moe import TopkRouter


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 512), (2, 2, 4, 128), (3, 700, 64)])
def test_rms_norm_computes_in_fp32_and_rounds_once(dtype, shape):
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1], eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.2 * torch.randn(shape[-1]))
        x = (3 * torch.randn(*shape)).to(dtype)
        got = norm(x)
    exact = F.rms_norm(x.double(), (shape[-1],), norm.weight.double(), eps=1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    assert rel_err(got, exact) <= (1e-6 if dtype == torch.float32 else 4e-3)  # bf16: one rounding
    if dtype == torch.bfloat16:  # rounding x / rms first (the reference implementations' order) is further off
        two_roundings = (F.rms_norm(x.float(), (shape[-1],), eps=1e-5).to(dtype) * norm.weight)
        assert (got.double() - exact).abs().mean() <= (two_roundings.double() - exact).abs().mean()


def test_rms_norm_follows_weight_updates_and_trains():
    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-6)
    x = torch.randn(1, 3, 64, requires_grad=True)
    with torch.no_grad():
        first = norm(x)
        norm.weight.mul_(2)  # in place, as an optimizer step or a load would
        assert rel_err(norm(x), 2 * first) < 1e-6
    norm(x).square().sum().backward()
    assert x.grad is not None and norm.weight.grad is not None


def test_gated_norm_gradients():
    torch.manual_seed(0)
    norm = GatedRMSNorm(16)
    x = torch.randn(2, 3, 16, requires_grad=True)
    gate = torch.randn(2, 3, 16)
    norm(x, gate, torch.float32).sum().backward()
    expected = torch.autograd.grad((F.rms_norm(x, (16,), norm.weight, eps=1e-5) * torch.sigmoid(gate)).sum(), x)[0]
    assert rel_err(x.grad, expected) < 1e-6
    assert norm.weight.grad is not None


def test_mlp_is_swiglu():
    torch.manual_seed(0)
    mlp = MLP(32, 48)
    x = torch.randn(5, 32)
    with torch.no_grad():
        want = mlp.down_proj.weight @ (F.silu(mlp.gate_proj.weight @ x.T) * (mlp.up_proj.weight @ x.T))
        assert rel_err(mlp(x), want.T) <= 1e-6


def test_router_bias_stays_fp32_through_dtype_conversion():
    """.to(bf16) / .half() convert the router's weight but keep its balancing bias fp32 (as the loader does), with
    its values; a device move still moves it."""
    router = TopkRouter(32, 8, 2)
    with torch.no_grad():
        router.e_score_correction_bias.normal_(std=1e-3)
    want = router.e_score_correction_bias.clone()
    for convert in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to("meta")):
        moved = convert(copy.deepcopy(router))
        assert moved.weight.dtype != torch.float32 or moved.weight.device.type == "meta"
        assert moved.e_score_correction_bias.dtype == torch.float32
        assert moved.e_score_correction_bias.device == moved.weight.device
        if moved.weight.device.type == "cpu":
            assert torch.equal(moved.e_score_correction_bias, want)


def test_bf16_router_computes_logits_in_fp32():
    """The router runs in fp32 whatever the model dtype."""
    torch.manual_seed(0)
    router = TopkRouter(32, 8, 2).to(torch.bfloat16)
    with torch.no_grad():
        router.weight.normal_()
        x = torch.randn(3, 32).to(torch.bfloat16)
        assert torch.equal(router.logits(x), F.linear(x.float(), router.weight.float()))
        router.weight.mul_(-1)
        assert torch.equal(router.logits(x), F.linear(x.float(), router.weight.float()))
