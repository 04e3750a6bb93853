"""MLX quantized checkpoints (affine 2–8 bit, MXFP4): codecs against mlx itself and their references, and whole
models converted by mlx-lm 0.32.2 loaded by kimi-lm with mlx-lm's own logits as the oracle.

The goldens are made here, not stored: a tiny random Kimi Linear (transformers) in the official layout goes through
mlx-lm's ``load_model`` -> ``quantize_model`` -> ``save_model`` (what ``mlx_lm.convert`` runs, minus the tokenizer).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoints import build_reference, save_reference, to_official_layout  # noqa: E402
from conftest import rel_err  # noqa: E402

import kimi_lm  # noqa: E402
from kimi_lm import cpu  # noqa: E402
from kimi_lm.config import _preset  # noqa: E402
from kimi_lm.quant import affine, mxfp4  # noqa: E402
from kimi_lm.quant.packed import PackedLinear, PackedRouter, PackedStackedExperts, QuantSpec  # noqa: E402

mx = pytest.importorskip("mlx.core")
mlx_utils = pytest.importorskip("mlx_lm.utils")


def _np(a) -> torch.Tensor:
    a = np.array(a.astype(mx.float32) if a.dtype in (mx.bfloat16, mx.float16) else a)
    return torch.from_numpy(a.view(np.int32) if a.dtype == np.uint32 else a)


def _weights(dtype=torch.float32, rows=24, cols=256) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(rows, cols) * 0.05
    w[0, :32] = torch.tensor([0.25, -0.25, 0.75, 1.75, 2.5, 3.5, 5.0, 6.0] * 4)  # E2M1 ties at scale 1
    w[0, 32] = 7.0  # amax in (6, 8): mlx 0.32.4 rounds the exponent up instead of saturating
    w[1, :128] = 0.0  # all-zero groups
    w[2, :128] = 5.0  # constant groups: affine scale −1e−7
    w[3, :64] = torch.arange(64.0)
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", affine.BITS)
@pytest.mark.parametrize("group", affine.GROUP_SIZES)
def test_affine_pack_bit_identical_to_mx(bits, group, dtype):
    w = _weights(dtype)
    q, s, b = affine.quantize(w, bits, group)
    mq, ms, mb = mx.quantize(mx.array(w.float().numpy()).astype(getattr(mx, str(dtype)[6:])), group_size=group, bits=bits)
    assert torch.equal(q.view(torch.int32), _np(mq))
    assert torch.equal(s.float(), _np(ms)) and torch.equal(b.float(), _np(mb))
    assert (s < 0).any()  # the max-magnitude edge is kept exact by a negative scale
    ref = affine.dequantize_reference(q, s, b, bits, group)
    assert torch.equal(affine.dequantize(q, s, b, bits, group), ref)
    mlx_deq = _np(mx.dequantize(mq, ms, mb, group_size=group, bits=bits, dtype=mx.float32))
    if dtype == torch.float32:
        assert torch.equal(ref, mlx_deq)
    else:  # mlx computes scale·q + bias in bf16 (cancellation near 0); we compute in fp32
        assert (ref - mlx_deq).abs().max() <= 2**-7 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mxfp4_pack_bit_identical_to_mx(dtype):
    w = _weights(dtype)
    if dtype == torch.float16:  # tiny blocks: amax / 6 below 2^-14 is rounded to an fp16 subnormal by mlx
        w[4, :32] = torch.linspace(-3e-6, 3e-6, 32).half()
    q, s = mxfp4.quantize(w)
    mq, ms = mx.quantize(mx.array(w.float().numpy()).astype(getattr(mx, str(dtype)[6:])), mode="mxfp4",
                         group_size=32, bits=4)
    assert torch.equal(q.view(torch.int32), _np(mq)) and torch.equal(s, _np(ms))
    assert s[1, 0] == 127 and s[0, 0] == 127 and s[0, 1] == 128  # zero block -> scale 1; amax 7 -> scale 2
    ref = mxfp4.dequantize_reference(q, s)
    assert torch.equal(mxfp4.dequantize(q, s), ref)
    assert torch.equal(ref, _np(mx.dequantize(mq, ms, mode="mxfp4", group_size=32, bits=4, dtype=mx.float32)))
    assert ref[0, :8].tolist() == [0.0, 0.0, 0.5, 1.5, 2.0, 3.0, 4.0, 6.0]  # ties to the smaller magnitude
    assert not ref[0, 1].signbit() and ref[0, 32] == 6.0  # -0.25 -> +0; 7 / 2 = 3.5 is a tie -> 3 · 2


@pytest.mark.parametrize("bits", affine.BITS)
def test_pack_unpack_identity(bits):
    codes = torch.randint(0, 1 << bits, (3, 5, 64), generator=torch.Generator().manual_seed(bits))
    q = affine.pack(codes, bits)
    assert q.dtype == torch.uint32 and q.shape == (3, 5, 64 * bits // 32)
    assert torch.equal(affine.unpack(q, bits), codes.int())
    assert torch.equal(affine.unpack_reference(q, bits), codes.int())


def test_packed_linear_tiles_match_reference(monkeypatch):
    import kimi_lm.quant.packed as packed

    lin = torch.nn.Linear(128, 40, bias=False)
    spec = QuantSpec("affine", 3, 32)
    module = PackedLinear.from_float(lin, spec)
    x = torch.randn(5, 128)
    want = x @ spec.dequantize_reference(module.weight, module.scales, module.biases, torch.float32).T
    monkeypatch.setattr(packed, "TILE_ELEMENTS", 128 * 7)  # 7 rows a tile, last tile partial
    assert rel_err(module(x), want) < 1e-6
    assert rel_err(module(x), lin(x)) < 0.15  # 3-bit: close, but not the float weight


# ---------------------------------------------------------------------------------------------------- whole models

def _config():
    # widths that let every group size apply somewhere (hidden 128) and some layers stay float at g128 (head_dim 64)
    return _preset(4, [2, 4], vocab_size=256, hidden_size=128, intermediate_size=256, num_attention_heads=2,
                   num_key_value_heads=2, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                   num_experts=8, num_experts_per_token=2, moe_intermediate_size=128, kda_heads=2, kda_head_dim=64,
                   bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="float32")


def official_for_mlx(root: Path) -> Path:
    """The ``_config()`` reference model in the official layout, with the config keys mlx-lm also needs."""
    out = to_official_layout(save_reference(build_reference(_config(), seed=3), root / "hf"), root / "official")
    raw = json.loads((out / "config.json").read_text())
    raw.update(head_dim=48, rope_theta=10000.0)  # keys mlx-lm's ModelArgs requires (unused by Kimi Linear's NoPE MLA)
    (out / "config.json").write_text(json.dumps(raw))
    return out


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return official_for_mlx(tmp_path_factory.mktemp("mlxq"))


def mlx_convert(src: Path, dst: Path, mode: str | None, bits: int | None = None, group: int | None = None) -> Path:
    model, config = mlx_utils.load_model(src)
    if mode:
        model, config = mlx_utils.quantize_model(model, config, group, bits, mode=mode)
    mlx_utils.save_model(dst, model)
    mlx_utils.save_config(config, config_path=dst / "config.json")
    return dst


def mlx_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model, _ = mlx_utils.load_model(path)
    return _np(model(mx.array(ids.numpy())))


IDS = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(1))
_slow = pytest.mark.slow
CASES = [pytest.param("mxfp4", 4, 32, id="mxfp4"), pytest.param("affine", 4, 64, id="affine4g64"),
         pytest.param("affine", 8, 32, id="affine8g32", marks=_slow),
         pytest.param("affine", 3, 128, id="affine3g128", marks=_slow), pytest.param(None, None, None, id="float", marks=_slow)]


@pytest.mark.parametrize("mode,bits,group", CASES)
def test_load_mlx_checkpoint_matches_mlx_lm(official, tmp_path, mode, bits, group):
    path = mlx_convert(official, tmp_path / "mlx", mode, bits, group)
    want = mlx_logits(path, IDS)
    model = kimi_lm.load(path, dtype=torch.float32)
    with torch.no_grad():
        got = model(IDS)
    assert rel_err(got, want) < 1e-3
    if mode is None:
        return
    # weights stay packed: the experts, the router (affine 8-bit g64 even in an mxfp4 model) and the lm_head
    moe = model.model.layers[1].block_sparse_moe
    int4 = cpu.INT4_KERNEL and mode == "affine" and bits == 4
    assert isinstance(moe.experts, PackedStackedExperts) and moe.experts.int4 == int4
    # with cpu.INT4_KERNEL affine 4-bit codes sit in the int4 kernel's layout (uint8, same bytes); else MLX's words
    assert moe.experts.gate_up_proj.dtype == (torch.uint8 if moe.experts.int4 else torch.uint32)
    assert isinstance(moe.gate, PackedRouter) and moe.gate.spec == QuantSpec("affine", 8, 64)
    assert isinstance(model.lm_head, PackedLinear) and model.lm_head.spec == QuantSpec(mode, bits, group)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])  # all, not just saved
    # minus the one dense copy the CPU backend keeps on purpose: MLA's absorbed kv_b halves (decode would rebuild
    # them every step; ~8 MiB per layer at Kimi-Linear-48B's sizes, a large share of this tiny model)
    held -= sum(t.numel() * t.element_size() for name, t in model.named_buffers() if name.endswith((".w_uk", ".w_uv_t")))
    on_disk = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    assert held <= 1.2 * on_disk
    # quantization changes the model (a random tiny model amplifies it, except at 8 bits)
    ref = kimi_lm.load(official, dtype=torch.float32)
    with torch.no_grad():
        err = rel_err(got, ref(IDS))
    assert 0 < err and (err < 0.1 or bits != 8), err


def test_packed_tensor_without_quantization_block_is_an_error(official, tmp_path):
    path = mlx_convert(official, tmp_path / "mlx", "mxfp4", 4, 32)
    raw = json.loads((path / "config.json").read_text())
    raw.pop("quantization"), raw.pop("quantization_config")
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(kimi_lm.CheckpointError, match=r"\.scales'? is an MLX quantization scale.*no 'quantization'"):
        kimi_lm.load(path)


def test_bad_per_module_override_is_an_error(official, tmp_path):
    path = mlx_convert(official, tmp_path / "mlx", "mxfp4", 4, 32)
    raw = json.loads((path / "config.json").read_text())
    raw["quantization"]["model.layers.1.mlp.gate"] = {"group_size": 64, "bits": 7}
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(kimi_lm.CheckpointError, match=r"model\.layers\.1\.mlp\.gate.*bits must be one of"):
        kimi_lm.load(path)


def test_int4_kernel_state_round_trips_to_the_mlx_files(official, tmp_path, monkeypatch):
    """A module moved onto the int4 kernel still saves exactly the MLX tensors it was loaded from."""
    from safetensors.torch import load_file

    monkeypatch.setattr(cpu, "INT4_KERNEL", True)  # the backend's default is quant.c; the kernel stays an option
    path = mlx_convert(official, tmp_path / "mlx", "affine", 4, 64)
    model = kimi_lm.load(path, dtype=torch.float32)
    assert model.lm_head.int4 and model.model.layers[1].block_sparse_moe.experts.int4
    files = {}
    for shard in path.glob("*.safetensors"):
        files.update(load_file(shard))
    state = model.state_dict()
    assert torch.equal(state["lm_head.weight"].view(torch.int32), files["lm_head.weight"].view(torch.int32))
    stacked = state["model.layers.1.block_sparse_moe.experts.gate_up_proj"]
    gate = files["model.layers.1.mlp.switch_mlp.gate_proj.weight"]
    assert torch.equal(stacked[:, : gate.shape[1]].view(torch.int32), gate.view(torch.int32))
