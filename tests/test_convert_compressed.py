"""``kimi-lm convert`` for Kimi K3 and for compressed-tensors checkpoints (K2-Thinking / K2.5 INT4, K3 MXFP4):
``--quantize`` of K3 (bf16 release and MXFP4 release) into mlx-lm's layout, ``--to-mlx`` (packed experts
re-interpreted bit for bit, no requantization), ``--dequantize`` of each (K2.5's nested quantization_config included).
Oracles: mlx-lm 0.32.2 loading the very output directories (``kimi_k3``, ``deepseek_v3``, ``kimi_k25``), and kimi-lm
loading the source. Spec ``kimi_k3_and_int4.md`` §A4, §B."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from k2_checkpoints import build_reference
from k2_int4_checkpoints import to_int4_layout, to_k25_layout
from k3_checkpoints import mlx_logits, mxfp4_config, random_model, write_checkpoint, write_mxfp4_checkpoint
from kimi_lm.checkpoint import load
from kimi_lm.config import preset
from kimi_lm.convert import build_parser, main as convert

pytest.importorskip("compressed_tensors")
pytest.importorskip("mlx_lm.models.kimi_k3")
X = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(5))
MOE = "language_model.model.layers.1."


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def run(src: Path, dst: Path, *args: str, capsys=None) -> dict:
    assert convert([str(src), str(dst), "--quiet", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1]) if capsys else {}


def logits(path: Path) -> torch.Tensor:
    with torch.no_grad():
        return load(path, dtype=torch.float32)(X)[0]


@pytest.fixture(scope="module")
def k3(tmp_path_factory):
    """(fp32 release layout, MXFP4 release layout with fp32 floats) of one tiny K3 whose expert widths are
    multiples of 32 and 64."""
    d = tmp_path_factory.mktemp("k3conv")
    model = random_model(mxfp4_config(), seed=6)
    return write_checkpoint(model, d / "f32"), write_mxfp4_checkpoint(model, d / "mx", dtype=torch.float32)[0]


# ---- Kimi K3 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["affine", "mxfp4"])
def test_k3_quantize_is_what_mlx_lm_writes_and_both_load_it(k3, tmp_path, capsys, mode):
    from test_mlx_quant import mlx_convert

    f32, _ = k3
    dst = tmp_path / "q"
    summary = run(f32, dst, "--quantize", "--q-mode", mode, capsys=capsys)
    files = tensors(dst)
    # every tensor bit-identical to mlx-lm's own conversion of the same release directory
    theirs = mlx_convert(f32, tmp_path / "mlx", mode, 4, 64 if mode == "affine" else 32)
    want = tensors(theirs)
    assert sorted(files) == sorted(want)
    for name in want:
        assert files[name].dtype == want[name].dtype and torch.equal(files[name], want[name]), name
    assert json.loads((theirs / "config.json").read_text())["quantization"] == json.loads(
        (dst / "config.json").read_text())["quantization"]
    # mlx-lm's kimi_k3 names: the MoE block under mlp., experts stacked in switch_mlp, KDA q/k/v and convs fused,
    # A_log at num_heads values, no vision tensors
    assert f"{MOE}mlp.switch_mlp.gate_proj.scales" in files and f"{MOE}mlp.routed_expert_up_proj.scales" in files
    assert f"{MOE}mlp.e_score_correction_bias" in files and f"{MOE}mlp.routed_expert_norm.weight" in files
    kda = "language_model.model.layers.0.self_attn."
    assert f"{kda}qkv_proj.scales" in files and f"{kda}qkv_conv.conv.weight" in files and f"{kda}q_proj.weight" not in files
    assert files[f"{kda}A_log"].shape == (mxfp4_config().kda_num_heads,)
    assert not any("block_sparse_moe" in n or "vision" in n or "mm_projector" in n for n in files)
    assert f"{MOE}mlp_res_proj.weight" in files and f"{MOE}mlp_res_proj.scales" not in files  # pseudo-queries float
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization"][f"{MOE}mlp.gate"] == {"group_size": 64, "bits": 8}
    assert cfg["quantization"]["mode"] == mode and summary["quantized_tensors"] > 0
    want, _, _ = mlx_logits(dst, X)
    ours = logits(dst)
    assert rel(ours, want) <= 1e-3
    assert rel(logits(theirs), ours) == 0  # kimi-lm reads mlx-lm's own K3 conversions (fused q/k/v, short A_log)
    back = tmp_path / "back"  # and back to the official float layout: the same numbers
    run(dst, back, "--dequantize", "--dtype", "float32")
    back_files = tensors(back)
    assert f"{MOE}block_sparse_moe.experts.3.w2.weight" in back_files and f"{kda}k_conv1d.weight" in back_files
    assert torch.equal(back_files[f"{kda}A_log"], tensors(f32)[f"{kda}A_log"])  # zero padding restored
    assert rel(logits(back), ours) <= 1e-6


def test_k3_mxfp4_release_to_mlx_is_bit_exact(k3, tmp_path, capsys):
    _, mx = k3
    source = tensors(mx)
    for args in (["--to-mlx"], ["--quantize", "--q-mode", "mxfp4"]):
        dst = tmp_path / args[0].strip("-")
        summary = run(mx, dst, *args, capsys=capsys)
        files = tensors(dst)
        for mlx_proj, proj in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            stacked = files[f"{MOE}mlp.switch_mlp.{mlx_proj}.weight"]
            scales = files[f"{MOE}mlp.switch_mlp.{mlx_proj}.scales"]
            for e in range(stacked.shape[0]):
                src = f"{MOE}block_sparse_moe.experts.{e}.{proj}."
                assert torch.equal(stacked[e].view(torch.uint8), source[src + "weight_packed"])
                assert torch.equal(scales[e], source[src + "weight_scale"])
        assert summary["reinterpreted_tensors"] == 3 * (mxfp4_config().num_hidden_layers - 1)
        cfg = json.loads((dst / "config.json").read_text())
        assert "quantization_config" not in cfg["text_config"] and cfg["quantization"]["mode"] == "mxfp4"
        if args == ["--to-mlx"]:  # nothing else quantized: the very model of the source
            assert summary["quantized_tensors"] == 0
            assert rel(logits(dst), logits(mx)) == 0
        want, _, _ = mlx_logits(dst, X)
        assert rel(logits(dst), want) <= 1e-3


def test_k3_float_to_mlx_is_a_relayout(k3, tmp_path, capsys):
    """--to-mlx of a float checkpoint: mlx-lm's names (fused q/k/v, switch_mlp), nothing quantized, same model."""
    f32, _ = k3
    dst = tmp_path / "mlx"
    summary = run(f32, dst, "--to-mlx", capsys=capsys)
    assert summary["quantized_tensors"] == summary["reinterpreted_tensors"] == 0 and summary["mode"] is None
    assert "quantization" not in json.loads((dst / "config.json").read_text())
    assert f"{MOE}mlp.switch_mlp.down_proj.weight" in tensors(dst)
    assert rel(logits(dst), logits(f32)) == 0
    want, _, _ = mlx_logits(dst, X)
    assert rel(want, logits(f32)) <= 1e-4


def test_k3_mxfp4_release_quantize_affine_and_dequantize(k3, tmp_path, capsys):
    _, mx = k3
    dst = tmp_path / "affine"
    run(mx, dst, "--quantize", "--q-mode", "affine", "--q-group-size", "32", capsys=capsys)
    assert tensors(dst)[f"{MOE}mlp.switch_mlp.down_proj.biases"].dtype == torch.bfloat16  # requantized as affine
    want, _, _ = mlx_logits(dst, X)
    assert rel(logits(dst), want) <= 1e-3
    deq = tmp_path / "deq"
    run(mx, deq, "--dequantize")  # bf16: every MXFP4 value is exact in bf16
    files, source = tensors(deq), tensors(mx)
    assert not any(n.endswith(("weight_packed", "weight_scale")) for n in files)
    assert "vision_tower.patch_embed.proj.weight" in files  # the same release layout, vision kept
    w2 = f"{MOE}block_sparse_moe.experts.3.w2."
    from k3_checkpoints import mxfp4_unpack

    assert torch.equal(files[w2 + "weight"].float(), mxfp4_unpack(source[w2 + "weight_packed"], source[w2 + "weight_scale"]))
    assert "quantization_config" not in json.loads((deq / "config.json").read_text())["text_config"]
    deq32 = tmp_path / "deq32"
    run(mx, deq32, "--dequantize", "--dtype", "float32")
    assert rel(logits(deq32), logits(mx)) == 0


# ---- Kimi K2-Thinking / K2.5 INT4 --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def int4(tmp_path_factory):
    d = tmp_path_factory.mktemp("k2conv")
    build_reference(preset("tiny-k2"), seed=3).save_pretrained(d / "hf")
    path = to_int4_layout(d / "hf", d / "int4")[0]
    return path, to_k25_layout(path, d / "k25")


def _mlx_k2_logits(path: Path) -> torch.Tensor:
    import mlx.core as mx
    import numpy as np
    from mlx_lm.utils import load_model

    model, _ = load_model(path, strict=False)  # strict=False: deepseek_v3 declares the MTP layer's tensors
    return torch.from_numpy(np.array(model(mx.array(X.numpy()))[0].astype(mx.float32)))


def _mlx_lm_resave(src: Path, dst: Path) -> Path:
    """What mlx-lm itself makes of a checkpoint: load (its sanitize re-interprets the INT4 experts) and save."""
    from mlx_lm import utils

    model, config = utils.load_model(src, strict=False)
    utils.save_model(dst, model)
    utils.save_config(config, config_path=dst / "config.json")
    return dst


@pytest.mark.parametrize("layout", ["k2_thinking", "k25"])
def test_int4_to_mlx_is_a_pure_reinterpretation(int4, tmp_path, capsys, layout):
    src = int4[0] if layout == "k2_thinking" else int4[1]
    prefix = "" if layout == "k2_thinking" else "language_model."
    dst = tmp_path / "mlx"
    summary = run(src, dst, "--to-mlx", capsys=capsys)
    files, source = tensors(dst), tensors(src)
    layer = f"{prefix}model.layers.1.mlp."
    for proj in ("gate_proj", "up_proj", "down_proj"):
        w, s, b = (files[f"{layer}switch_mlp.{proj}.{p}"] for p in ("weight", "scales", "biases"))
        for e in range(w.shape[0]):
            assert torch.equal(w[e].view(torch.int32), source[f"{layer}experts.{e}.{proj}.weight_packed"])
            assert torch.equal(s[e], source[f"{layer}experts.{e}.{proj}.weight_scale"])
        assert torch.equal(b, -8 * s) and b.dtype == s.dtype == torch.bfloat16
    assert summary["quantized_tensors"] == 0 and summary["reinterpreted_tensors"] > 0
    want = tensors(_mlx_lm_resave(src, tmp_path / "theirs"))  # tensor for tensor what mlx-lm writes
    assert sorted(files) == sorted(want)
    assert all(files[n].dtype == want[n].dtype and torch.equal(files[n], want[n]) for n in want)
    assert not any(n.startswith(("vision_tower", "mm_projector")) for n in files)
    cfg = json.loads((dst / "config.json").read_text())
    assert cfg["quantization"] == cfg["quantization_config"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert "quantization_config" not in cfg.get("text_config", {})
    ours = logits(src)
    assert rel(_mlx_k2_logits(dst), ours) <= 1e-3  # mlx-lm on the converted directory vs kimi-lm on the original
    assert rel(logits(dst), ours) == 0  # kimi-lm reads the MLX layout back to the same packed model
    back = tmp_path / "back"
    run(dst, back, "--dequantize", "--dtype", "float32")
    assert f"{layer}experts.5.down_proj.weight" in tensors(back) and rel(logits(back), ours) <= 1e-6


def test_k25_dequantize_drops_the_nested_quantization_config(int4, tmp_path):
    _, k25 = int4
    dst = tmp_path / "bf16"
    run(k25, dst, "--dequantize", "--dtype", "float32")
    cfg = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in cfg and "quantization_config" not in cfg["text_config"]
    assert cfg["text_config"]["torch_dtype" if "torch_dtype" in cfg["text_config"] else "dtype"] == "float32"
    files = tensors(dst)
    assert "language_model.model.layers.1.mlp.experts.0.gate_proj.weight" in files
    assert not any(n.endswith(("weight_packed", "weight_scale", "weight_shape")) for n in files)
    assert rel(logits(dst), logits(k25)) <= 1e-6


def test_cli_spelling_and_refusals(int4, k3, tmp_path, capsys):
    text = build_parser().format_help()
    assert "--to-mlx" in text and "bit for bit" in text and "K2-Thinking" in text
    int4_dir, _ = int4
    assert convert([str(int4_dir), str(tmp_path / "a"), "--to-mlx", "--q-mode", "mxfp4"]) == 2
    assert "apply to --quantize only" in capsys.readouterr().err
    assert convert([str(int4_dir), str(tmp_path / "b"), "--quantize"]) == 2
    assert "use --to-mlx" in capsys.readouterr().err
    mlx_dir = tmp_path / "mlx"
    run(int4_dir, mlx_dir, "--to-mlx")
    capsys.readouterr()
    assert convert([str(mlx_dir), str(tmp_path / "c"), "--to-mlx"]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("args", [["--to-mlx"], ["--dequantize"]])
def test_malformed_packed_source_is_one_error_and_no_output(tmp_path, capsys, args):
    model = random_model(mxfp4_config(), seed=7)
    w2 = f"{MOE}block_sparse_moe.experts.3.w2."
    for edit, needle in ((lambda t: t.update({w2 + "weight_scale": t[w2 + "weight_scale"].to(torch.bfloat16)}),
                          r"weight_scale' is BF16 \[64, 1\], expected U8 \[64, 1\]"),
                         (lambda t: t.pop(w2 + "weight_scale"), "weight_scale' beside it")):
        src = write_mxfp4_checkpoint(model, tmp_path / "bad", dtype=torch.float32, edit=edit)[0]
        dst = tmp_path / "out"
        assert convert([str(src), str(dst), "--quiet", *args]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and re.search(needle, err), err
        assert not dst.exists() and not list(tmp_path.glob(".out*"))
        import shutil

        shutil.rmtree(src)
