"""layers.rms_norm (one fused kernel for decode-sized inputs) against F.rms_norm, its oracle."""

import pytest
import torch
import torch.nn.functional as F

from conftest import rel_err
from kimi_lm.model import layers
from kimi_lm.model.layers import GatedRMSNorm, RMSNorm, rms_norm
from kimi_lm.ops import native


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("shape", [(1, 1, 512), (2, 2, 4, 128), (3, 700, 64)])
@pytest.mark.parametrize("with_weight", [True, False])
def test_rms_norm_equals_f_rms_norm(dtype, tol, shape, with_weight, monkeypatch):
    torch.manual_seed(0)
    x = (3 * torch.randn(*shape)).to(dtype)
    w = (1 + 0.2 * torch.randn(shape[-1])).to(dtype) if with_weight else None
    calls = []
    layer_norm = F.layer_norm
    monkeypatch.setattr(F, "layer_norm", lambda *a, **k: calls.append(1) or layer_norm(*a, **k))
    with torch.no_grad():
        got = rms_norm(x, w, 1e-5)
    in_c = with_weight and native.supports(x, w)  # CPU inference with a weight: the C kernel (ops/native.py)
    assert len(calls) == (1 if x.numel() <= layers.ONE_KERNEL_MAX_NUMEL and not in_c else 0)  # the path it calls for
    assert got.dtype == dtype and got.shape == x.shape
    assert rel_err(got, F.rms_norm(x, (shape[-1],), w, eps=1e-5)) <= tol


def test_kept_doubled_weight_follows_weight_updates():
    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-6)
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        first = norm(x)
        norm.weight.mul_(2)  # in place, as an optimizer step or a load would
        assert rel_err(norm(x), 2 * first) < 1e-6


def test_gradients_take_the_plain_path():
    torch.manual_seed(0)
    norm = GatedRMSNorm(16)
    x = torch.randn(2, 3, 16, requires_grad=True)
    gate = torch.randn(2, 3, 16)
    norm(x, gate, torch.float32).sum().backward()
    expected = torch.autograd.grad((F.rms_norm(x, (16,), norm.weight, eps=1e-5) * torch.sigmoid(gate)).sum(), x)[0]
    assert rel_err(x.grad, expected) < 1e-6
    assert norm.weight.grad is not None


def test_bf16_router_keeps_an_fp32_copy_that_follows_the_weight():
    """The router runs in fp32 whatever the model dtype; a bf16 model keeps the fp32 copy between decode steps."""
    from kimi_lm.model.moe import TopkRouter

    torch.manual_seed(0)
    router = TopkRouter(32, 8, 2).to(torch.bfloat16)
    with torch.no_grad():
        router.weight.normal_()
        x = torch.randn(3, 32).to(torch.bfloat16)
        assert torch.equal(router.logits(x), F.linear(x.float(), router.weight.float()))
        router.weight.mul_(-1)
        assert torch.equal(router.logits(x), F.linear(x.float(), router.weight.float()))
