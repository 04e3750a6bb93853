"""MXFP8 and NVFP4 (mlx 0.32.4 ``mx.quantize`` modes that mlx-lm 0.32.2 ``convert --q-mode`` writes for kimi_linear):
codecs bit-identical to mlx on CPU, mlx-lm-written checkpoints loaded with mlx-lm's logits as the oracle, and
``kimi-lm convert --quantize`` output tensor-for-tensor equal to mlx-lm's. The whole-model checks are the MXFP4/affine
ones of tests/test_mlx_quant.py and tests/test_convert_quantize.py, run for these modes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_convert_quantize import test_quantize_is_what_mlx_lm_writes_and_loads as check_convert  # noqa: E402
from conftest import rel_err  # noqa: E402
from test_mlx_quant import IDS, _np, _weights, mlx_convert, mlx_logits, official  # noqa: E402,F401  (shared fixture)

import kimi_lm  # noqa: E402
from kimi_lm.quant import mxfp8, nvfp4  # noqa: E402
from kimi_lm.quant.packed import PackedLinear, PackedRouter, PackedStackedExperts, QuantSpec, infer_spec  # noqa: E402

mx = pytest.importorskip("mlx.core")
CODECS = [pytest.param(mxfp8, "mxfp8", id="mxfp8"), pytest.param(nvfp4, "nvfp4", id="nvfp4")]


def _stress(dtype) -> torch.Tensor:
    """tests/test_mlx_quant.py's edge rows, rows spanning 1e-12 … 1e3 (E4M3 subnormal scales and codes), and rows of
    exact E2M1 ties at scale 0.013671875 (an E4M3 value), where division vs. multiply-by-reciprocal decides."""
    g = torch.Generator().manual_seed(5)
    spread = torch.randn(16, 256, generator=g) * torch.logspace(-12, 3, 16).unsqueeze(1)
    ties = torch.randint(-48, 49, (8, 256), generator=g) / 8.0 * 0.013671875
    return torch.cat([_weights(torch.float32), spread, ties]).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("codec,mode", CODECS)
def test_pack_bit_identical_to_mx(codec, mode, dtype):
    w = _stress(dtype)
    q, s = codec.quantize(w)
    mq, ms = mx.quantize(mx.array(w.float().numpy()).astype(getattr(mx, str(dtype)[6:])), mode=mode,
                         group_size=codec.GROUP, bits=codec.BITS)
    assert q.shape == (w.shape[0], 256 * codec.BITS // 32) and s.shape == (w.shape[0], 256 // codec.GROUP)
    assert torch.equal(q.view(torch.int32), _np(mq)) and torch.equal(s, _np(ms))
    ref = codec.dequantize_reference(q, s)
    assert torch.equal(codec.dequantize(q, s), ref)
    assert torch.equal(ref, _np(mx.dequantize(mq, ms, mode=mode, group_size=codec.GROUP, bits=codec.BITS,
                                              dtype=mx.float32)))
    # zero groups; constant 5: mxfp8 exact, nvfp4 scale E4M3(5 / 6) = 0.8125, 5 / 0.8125 = 6.15 saturates to 6
    assert (ref[1, :128] == 0).all() and (ref[2, :128] == (5.0 if mode == "mxfp8" else 6 * 0.8125)).all()
    assert rel_err_ok(ref, w.float(), 0.03 if mode == "mxfp8" else 0.2)


def rel_err_ok(got: torch.Tensor, want: torch.Tensor, bound: float) -> bool:
    return ((got - want).norm() / want.norm()).item() < bound


def test_mxfp8_scale_rounds_up_and_nvfp4_scale_rounds_to_nearest():
    w = torch.zeros(1, 32)
    w[0, :2] = torch.tensor([500.0, 0.01])
    q, s = mxfp8.quantize(w)  # 500 / 448 -> scale 2^1 (rounded up); 250 -> E4M3 256 (step 16 in [128, 256)); 0.005 -> subnormal 3 · 2^-9
    assert s[0, 0] == 128 and mxfp8.dequantize(q, s)[0, :2].tolist() == [512.0, 3 * 2**-9 * 2]
    w = torch.zeros(1, 16)
    w[0, :2] = torch.tensor([6.5, 0.3])
    q, s = nvfp4.quantize(w)  # 6.5 / 6 = 1.083 -> E4M3 1.125 (nearest of 1.0, 1.125)
    assert s.view(torch.float8_e4m3fn).float()[0, 0] == 1.125
    assert nvfp4.dequantize(q, s)[0, :2].tolist() == [6 * 1.125, 0.5 * 1.125]  # 5.78 -> 6; 0.267 -> 0.5
    w[0, 0] = 6.2  # 1.033 -> E4M3 1.0, below amax / 6 (an MX scale would round up to 2): 6.2 saturates to 6
    q2, s2 = nvfp4.quantize(w)
    assert s2.view(torch.float8_e4m3fn).float()[0, 0] == 1.0 and nvfp4.dequantize(q2, s2)[0, 0] == 6.0


def test_infer_spec_tells_float_modes_apart_by_shape():
    # mlx-lm's infer_quant_config: uint8 scales + (bits, group) -> the one mode allowing that pair
    assert infer_spec([64, 32], [64, 4], True, 128, "x") == QuantSpec("mxfp8", 8, 32)
    assert infer_spec([64, 16], [64, 8], True, 128, "x") == QuantSpec("nvfp4", 4, 16)
    assert infer_spec([64, 16], [64, 4], True, 128, "x") == QuantSpec("mxfp4", 4, 32)
    with pytest.raises(ValueError, match="8 bits and group size 16 match no quantization mode"):
        infer_spec([64, 32], [64, 8], True, 128, "x")
    with pytest.raises(ValueError, match="mxfp8 needs bits 8 and group size 32"):
        QuantSpec("mxfp8", 4, 32).checked("x")


MODES = [pytest.param("mxfp8", 8, 32, id="mxfp8"), pytest.param("nvfp4", 4, 16, id="nvfp4")]


@pytest.mark.parametrize("mode,bits,group", MODES)
def test_load_mlx_checkpoint_matches_mlx_lm(official, tmp_path, mode, bits, group):  # noqa: F811
    path = mlx_convert(official, tmp_path / "mlx", mode, bits, group)
    model = kimi_lm.load(path, dtype=torch.float32)
    with torch.no_grad():
        got = model(IDS)
    err = rel_err(got, mlx_logits(path, IDS))
    print(f"{mode}: kimi-lm vs mlx-lm logits rel err {err:.2e}")
    assert err < 1e-3
    # packed in memory: experts and lm_head in this mode, the router affine 8-bit g64 (mlx-lm's override)
    moe = model.model.layers[1].block_sparse_moe
    assert isinstance(moe.experts, PackedStackedExperts) and moe.experts.gate_up_spec == QuantSpec(mode, bits, group)
    assert moe.experts.gate_up_proj_scales.dtype == torch.uint8 and not hasattr(moe.experts, "gate_up_proj_biases")
    assert isinstance(moe.gate, PackedRouter) and moe.gate.spec == QuantSpec("affine", 8, 64)
    assert isinstance(model.lm_head, PackedLinear) and model.lm_head.spec == QuantSpec(mode, bits, group)
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert held <= 1.2 * sum(p.stat().st_size for p in path.glob("*.safetensors"))
    # quantization changes the model; E4M3 keeps only 3 mantissa bits, so "8-bit" mxfp8 is not near-lossless
    # like affine 8-bit (a random tiny model amplifies weight error), but it is closer than 4-bit nvfp4
    with torch.no_grad():
        float_err = rel_err(got, kimi_lm.load(official, dtype=torch.float32)(IDS))
    print(f"{mode}: vs the float model {float_err:.3f}")
    assert 0 < float_err < (1.0 if mode == "mxfp8" else 1.5), float_err  # measured 0.72 and 1.14


@pytest.mark.parametrize("mode,bits,group", MODES)
def test_convert_quantize_is_what_mlx_lm_writes(official, tmp_path, capsys, mode, bits, group):  # noqa: F811
    check_convert(official, tmp_path, capsys, mode, bits, group)


def test_nvfp4_global_scale_is_an_error(official, tmp_path):  # noqa: F811
    path = mlx_convert(official, tmp_path / "mlx", "nvfp4", 4, 16)
    raw = json.loads((path / "config.json").read_text())
    raw["quantization"]["global_scale"] = True
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(kimi_lm.CheckpointError, match=r"config\.json: quantization: 'global_scale'.*not supported"):
        kimi_lm.load(path)
