"""MLX affine 4-bit modules on PyTorch's CPU int4 kernel: same results, same saved tensors, same bytes."""

import pytest
import torch

from conftest import rel_err
from kimi_lm.quant import affine, int4_cpu
from kimi_lm.quant.packed import PackedLinear, PackedStackedExperts, QuantSpec

pytestmark = pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"),
                                reason="this torch build has no CPU int4 kernel")


@pytest.mark.parametrize("N,K,G", [(16, 64, 32), (48, 256, 64), (32, 512, 128)])
def test_kernel_layout_round_trip_and_matmul(N, K, G):
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.05
    q, s, b = affine.quantize(w, 4, G)
    packed, scales_zeros = int4_cpu.to_kernel(q, s, b, torch.float32)
    assert packed.nbytes == q.nbytes  # same bytes, other order
    assert torch.equal(int4_cpu.mlx_codes(packed, N, K), q)
    x = torch.randn(3, 5, K)
    want = x @ affine.dequantize_reference(q, s, b, 4, G, torch.float32).T
    assert rel_err(int4_cpu.matmul(x, packed, scales_zeros, G), want) < 1e-5
    # bf16: no worse than the dequantize-then-F.linear path it replaces (both round activations and output)
    bf16 = int4_cpu.to_kernel(q, s.bfloat16(), b.bfloat16(), torch.bfloat16)
    dequant_path = torch.nn.functional.linear(x.bfloat16(), affine.dequantize(q, s.bfloat16(), b.bfloat16(), 4, G,
                                                                                torch.bfloat16))
    assert rel_err(int4_cpu.matmul(x.bfloat16(), *bf16, G), want) <= 2 * rel_err(dequant_path, want) + 1e-3


def test_packed_linear_moves_to_the_kernel_without_changing_results_or_state():
    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 64, bias=False)
    module = PackedLinear.from_float(dense, QuantSpec("affine", 4, 64))
    x = torch.randn(2, 3, 256)
    before, state, weight = module(x), {k: v.clone() for k, v in module.state_dict().items()}, module.dense_weight()
    assert module.use_int4_kernel() and module.int4 and module.weight.dtype == torch.uint8
    assert not module.use_int4_kernel()  # once
    assert rel_err(module(x), before) < 1e-5
    assert all(torch.equal(module.state_dict()[k], v) for k, v in state.items())
    assert torch.equal(module.dense_weight(), weight)


def test_only_affine_4bit_with_kernel_shapes_moves():
    torch.manual_seed(0)
    assert not PackedLinear.from_float(torch.nn.Linear(64, 64, bias=False), QuantSpec("mxfp4", 4, 32)).use_int4_kernel()
    assert not PackedLinear.from_float(torch.nn.Linear(64, 64, bias=False), QuantSpec("affine", 8, 64)).use_int4_kernel()
    assert not PackedLinear.from_float(torch.nn.Linear(64, 24, bias=False), QuantSpec("affine", 4, 32)).use_int4_kernel()


def test_stacked_experts_on_the_kernel():
    torch.manual_seed(0)
    E, H, I = 3, 128, 64
    experts = PackedStackedExperts(E, H, I, QuantSpec("affine", 4, 64), QuantSpec("affine", 4, 64))
    for name, shape in (("gate_up_proj", (E, 2 * I, H)), ("down_proj", (E, H, I))):
        q, s, b = affine.quantize(torch.randn(shape) * 0.05, 4, 64)
        setattr(experts, name, q), setattr(experts, f"{name}_scales", s), setattr(experts, f"{name}_biases", b)
    x = torch.randn(7, H)
    before = [experts.expert(e, x) for e in range(E)]
    state = {k: v.clone() for k, v in experts.state_dict().items()}
    assert experts.use_int4_kernel()
    assert all(rel_err(experts.expert(e, x), before[e]) < 1e-5 for e in range(E))
    assert all(torch.equal(experts.state_dict()[k], v) for k, v in state.items())
