"""oneDNN-packed inference modules against the plain modules they replace (the oracle: nn.Linear / StackedExperts)."""

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import kimi_lm
from conftest import load_rss_growth, rel_err
from kimi_lm.cpu import malloc, native, onednn

pytestmark = pytest.mark.skipif(not onednn.available(torch.float32, "cpu"), reason="no oneDNN in this torch build")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("rows", [1, 3, 70])
def test_packed_linear_equals_linear(dtype, tol, rows):
    if not onednn.available(dtype, "cpu"):
        pytest.skip(f"no oneDNN {dtype} on this CPU")
    torch.manual_seed(0)
    linear = nn.Linear(96, 40, bias=False).to(dtype)
    packed = onednn.OneDNNLinear(linear)
    x = torch.randn(2, rows, 96).to(dtype)
    with torch.no_grad():
        assert rel_err(packed(x), linear(x)) <= tol
        assert rel_err(packed(x[:, ::2]), linear(x[:, ::2])) <= tol  # strided input
    assert torch.equal(packed.weight, linear.weight) and torch.equal(packed.state_dict()["weight"], linear.weight)


@pytest.mark.parametrize("in_features", [96, 600, 1000])
def test_batched_fp32_products_in_c_equal_linear(in_features):
    """fp32 products of 2..8 rows in C (kernels/gemv.c: one weight row against all rows while they fit L1, else 4
    weight rows by 4 input rows, a short last group repeating its last row; input widths off the 16-lane vectors, an
    output count off the 4-row groups) against nn.Linear, and each row against the same product of that row alone."""
    if native.library() is None:
        pytest.skip("no C compiler")
    torch.manual_seed(0)
    linear = nn.Linear(in_features, 70, bias=False)
    packed = onednn.OneDNNLinear(linear)
    assert packed.gemv is not None
    with torch.no_grad():
        for rows in range(2, 9):
            x = torch.randn(rows, in_features)
            got = packed.gemv(x)
            assert rel_err(got, linear(x)) <= 1e-6, rows
            alone = torch.cat([packed.gemv(x[m : m + 1]) for m in range(rows)])
            assert rel_err(got, alone) <= 1e-6, rows


def test_fused_linear_is_its_parts_side_by_side_and_saves_them_by_name():
    torch.manual_seed(0)
    owner = nn.Module()
    owner.a, owner.b, owner.c = (nn.Linear(64, n, bias=False) for n in (32, 8, 3))
    plain = copy.deepcopy(owner)
    owner.abc = onednn.OneDNNFusedLinear({n: onednn.OneDNNLinear(getattr(owner, n)) for n in ("a", "b", "c")}, "abc")
    del owner.a, owner.b, owner.c
    assert owner.abc.sizes == [32, 8, 3]
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = torch.cat([plain.a(x), plain.b(x), plain.c(x)], dim=-1)
        assert rel_err(owner.abc(x), expected) <= 1e-6
    state, want = owner.state_dict(), plain.state_dict()
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)


def test_packed_model_refuses_dtype_changes_but_allows_no_ops(official_checkpoint):
    model = kimi_lm.load(official_checkpoint, dtype=torch.float32)
    assert model.to(torch.float32) is model and model.cpu() is model
    with pytest.raises(RuntimeError, match=r"packed for oneDNN.*kimi_lm\.load"):
        model.to(torch.bfloat16)


def test_malloc_settings_apply_once_and_can_be_skipped():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    assert malloc.keep_freed_memory() and malloc.keep_freed_memory()  # idempotent
    env = {**os.environ, "KIMI_LM_MALLOC": "default"}
    out = subprocess.run([sys.executable, "-c", "from kimi_lm.cpu import malloc; print(malloc.keep_freed_memory())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---- memory while loading -------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("dtype,bytes_per_value", [("float32", 4), ("bfloat16", 2)])
def test_packing_at_load_does_not_double_resident_memory(tmp_path, dtype, bytes_per_value):
    """Replacing every weight by a packed copy must not hold both at once: load the bench preset (~260 MB in fp32) in
    a fresh process; its peak and resident growth stay near the model's own size (they were ~2x before)."""
    import json

    from safetensors.torch import save_file

    from kimi_lm.config import preset
    from kimi_lm.model.kimi_linear import KimiLinearForCausalLM

    torch.manual_seed(0)
    model = KimiLinearForCausalLM(preset("bench"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    model_bytes = model.num_parameters() * bytes_per_value
    del model
    r = load_rss_growth(tmp_path, "tiny", dtype, threads=1)
    assert r["lm_head"] == "OneDNNLinear"
    print(f"\n{dtype}: model {model_bytes / 2**20:.0f} MiB, peak growth {r['peak'] / model_bytes:.2f}x, "
          f"after {r['after'] / model_bytes:.2f}x")
    assert r["peak"] <= 1.4 * model_bytes
    assert r["after"] <= 1.2 * model_bytes


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("out_features", [64, 4096, 20480])  # 64 KiB / 4 MiB / 20 MiB of bf16 weight
def test_bf16_decode_products_on_padded_rows_equal_linear(rows, out_features):
    """A product of up to 8 rows runs in C where the weight has a C reader (one row at any size, more up to the C
    products' size limit); other
    bf16 products with < 4 rows and a weight ≥ 2 MiB on a zero-padded 4-row input (a faster oneDNN kernel); whatever
    the path, the result is the plain product in the input's shape."""
    if not onednn.available(torch.bfloat16, "cpu"):
        pytest.skip("no oneDNN bf16 on this CPU")
    torch.manual_seed(0)
    linear = nn.Linear(512, out_features, bias=False).to(torch.bfloat16)
    packed = onednn.OneDNNLinear(linear)
    x = torch.randn(rows, 1, 512).to(torch.bfloat16)  # [B, T=1, in] as in a batched decode step
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda a, *rest: calls.append(a.shape) or real(a, *rest))
        got = packed(x)
    assert got.shape == (rows, 1, out_features)
    padded = rows < 4 and out_features * 512 * 2 >= 2 << 20
    limit = onednn.GEMV_ROWS[torch.bfloat16]
    in_c = packed.gemv is not None and rows <= limit and native.gemv_takes(packed.gemv.nbytes, rows)
    assert in_c == ((out_features <= 4096 or rows == 1) and rows <= limit) or packed.gemv is None
    if in_c:
        assert calls == []
    else:
        assert calls == [(4, 512) if padded else (rows, 1, 512)]
    assert rel_err(got, linear(x)) <= 1e-2
