"""``kimi-lm convert --quantize`` (official float -> mlx-lm layout) and ``--dequantize`` of an MLX directory, with
mlx-lm 0.32.2 itself as the oracle: its own ``quantize_model`` output for the same source, and its logits on ours."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import rel_err  # noqa: E402
from test_mlx_quant import IDS, mlx_convert, mlx_logits, official_for_mlx  # noqa: E402

import kimi_lm  # noqa: E402
from kimi_lm.cli import main as cli  # noqa: E402

pytest.importorskip("mlx.core")
from safetensors.torch import load_file  # noqa: E402


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return official_for_mlx(tmp_path_factory.mktemp("convq"))


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.mark.parametrize("mode,bits,group", [("mxfp4", 4, 32), ("affine", 4, 64)])
def test_quantize_is_what_mlx_lm_writes_and_loads(official, tmp_path, capsys, mode, bits, group):
    dst = tmp_path / "ours"
    assert cli(["convert", "--quantize", str(official), str(dst), "--q-mode", mode, "--q-bits", str(bits),
                "--q-group-size", str(group), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    theirs = mlx_convert(official, tmp_path / "mlx", mode, bits, group)
    # config.json: the same quantization block, key for key (router override included, no mode in it)
    ours_cfg, their_cfg = (json.loads((p / "config.json").read_text()) for p in (dst, theirs))
    assert list(ours_cfg["quantization"].items()) == list(their_cfg["quantization"].items())
    assert ours_cfg["quantization"]["model.layers.1.mlp.gate"] == {"group_size": 64, "bits": 8}
    assert ours_cfg == their_cfg
    # every tensor bit-identical to mlx-lm's own conversion of the same source
    ours, want = tensors(dst), tensors(theirs)
    assert sorted(ours) == sorted(want)
    for name in want:
        assert ours[name].dtype == want[name].dtype and torch.equal(ours[name], want[name]), name
    assert ours["model.layers.1.mlp.gate.weight"].shape[-1] == 128 * 8 // 32  # router 8-bit
    assert "model.layers.1.self_attn.q_conv.conv.scales" not in ours  # convs never quantized
    # mlx-lm loads our output, and its logits equal kimi-lm's on the same directory
    model = kimi_lm.load(dst, dtype=torch.float32)
    with torch.no_grad():
        got = model(IDS)
    err = rel_err(got, mlx_logits(dst, IDS))
    print(f"{mode} {bits}-bit g{group}: mlx-lm vs kimi-lm rel err {err:.2e}, {summary['bits_per_weight']} bpw")
    assert err <= 1e-3
    # the report: counts and bits per weight from the files themselves
    on_disk = sum(t.numel() * t.element_size() for t in ours.values())
    assert summary["bytes"] == on_disk and summary["quantized_tensors"] == sum(n.endswith(".scales") for n in ours)
    assert abs(summary["bits_per_weight"] - 8 * on_disk / summary["parameters"]) < 1e-3
    assert 4 < summary["bits_per_weight"] < 16  # fp32 norms/convs remain; far below fp32's 32
    assert len(summary["worst_relative_errors"]) == 10
    assert all(0 < e["rel_err"] < 0.5 for e in summary["worst_relative_errors"])
    assert (dst / "SHA256SUMS").is_file()


def test_dequantize_mlx_directory_to_official_layout(official, tmp_path, capsys):
    import transformers

    mlx_dir = mlx_convert(official, tmp_path / "mlx", "affine", 4, 64)
    dst = tmp_path / "deq"
    assert cli(["convert", "--dequantize", str(mlx_dir), str(dst), "--dtype", "float32", "--quiet"]) == 0
    cfg = json.loads((dst / "config.json").read_text())
    assert "quantization" not in cfg and "quantization_config" not in cfg
    names = set(tensors(dst))
    assert names == set(tensors(official))  # exactly the official names (per-expert w1/w2/w3, kv_b_proj, convs)
    with torch.no_grad():
        # plain models (backend=None): the conversion, not the CPU backend's summation order, is under test
        packed = kimi_lm.load(mlx_dir, dtype=torch.float32, backend=None)(IDS)
        hf = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()(IDS).logits
        ours = kimi_lm.load(dst, dtype=torch.float32, backend=None)(IDS)
    err_hf, err_ours = rel_err(hf, packed), rel_err(ours, packed)
    print(f"dequantize: transformers vs packed kimi-lm {err_hf:.2e}, kimi-lm float vs packed {err_ours:.2e}")
    assert err_hf <= 1e-3 and err_ours <= 1e-5


def test_bad_quantize_arguments_are_one_line_errors(official, tmp_path, capsys):
    dst = tmp_path / "out"
    assert cli(["convert", "--quantize", str(official), str(dst), "--q-mode", "mxfp4", "--q-bits", "8"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "mxfp4 needs bits 4 and group size 32" in err
    assert cli(["convert", "--quantize", str(official), str(dst), "--q-bits", "7"]) == 2
    assert "bits must be one of" in capsys.readouterr().err
    assert cli(["convert", "--dequantize", str(official), str(dst), "--q-bits", "4"]) == 2
    assert "apply to --quantize only" in capsys.readouterr().err
    assert not dst.exists() and not list(tmp_path.glob(".out.*"))
