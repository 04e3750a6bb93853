"""``kimi-lm convert --dequantize``: FP8 block checkpoint -> float checkpoint in the same layout, atomically."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import kimi_lm
from conftest import rel_err
from k2_checkpoints import build_reference, to_fp8_layout
from kimi_lm.cli import main as cli
from kimi_lm.config import preset
from kimi_lm.quant.fp8_block import FP8, dequantize


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    ref = build_reference(preset("tiny-k2"), seed=7)
    hf_dir = tmp_path_factory.mktemp("hf")
    ref.save_pretrained(hf_dir)
    src, _ = to_fp8_layout(hf_dir, tmp_path_factory.mktemp("fp8"))
    (src / "tokenizer_config.json").write_text('{"model_max_length": 128}')  # travels along unchanged
    return src


def read_all(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        part = load_file(path / shard)
        assert set(part) == {k for k, v in index["weight_map"].items() if v == shard}
        tensors.update(part)
    return index, tensors


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_reproduces_dequantized_weights(fp8_dir, tmp_path, dtype, capsys):
    dst = tmp_path / "out"
    assert cli(["convert", "--dequantize", str(fp8_dir), str(dst), "--dtype", dtype, "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    _, src = read_all(fp8_dir)
    index, out = read_all(dst)
    fp8_names = [n for n, t in src.items() if t.dtype == FP8]
    assert summary["fp8_weights"] == len(fp8_names) > 0 and summary["shards"] == 2
    assert set(out) == {n for n in src if not n.endswith("_scale_inv")}
    for name in fp8_names:
        want = dequantize(src[name], src[name + "_scale_inv"], getattr(torch, dtype))
        assert out[name].dtype == want.dtype and torch.equal(out[name], want), name
    for name in set(out) - set(fp8_names):
        assert torch.equal(out[name], src[name]), name
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in out.values())
    config = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == dtype
    assert config["model_type"] == "kimi_k2"
    assert (dst / "tokenizer_config.json").read_text() == '{"model_max_length": 128}'
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folder left behind


def test_converted_checkpoint_reads_in_transformers_and_kimi_lm(fp8_dir, tmp_path):
    import transformers

    dst = tmp_path / "out"
    assert cli(["convert", "--dequantize", str(fp8_dir), str(dst), "--dtype", "float32", "--quiet"]) == 0
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # plain F.linear in both, so that the same weights give bit-identical logits (oneDNN's kernels reassociate)
        fp8_logits = kimi_lm.load(fp8_dir, dtype=torch.float32, pack_weights=False)(ids)
        ours = kimi_lm.load(dst, dtype=torch.float32, pack_weights=False)(ids)
        ours_packed = kimi_lm.load(dst, dtype=torch.float32)(ids)
        # transformers does not know model_type kimi_k2 (remote code); K2 runs as deepseek_v3, as Moonshot documents
        config = json.loads((dst / "config.json").read_text())
        hf_dir = tmp_path / "as_deepseek_v3"
        shutil.copytree(dst, hf_dir)
        (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "deepseek_v3"}))
        theirs = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir).eval()(ids).logits
    assert torch.equal(ours, fp8_logits)  # the same weights, dequantized once on disk instead of in forward
    assert rel_err(ours_packed, ours) <= 1e-5
    assert rel_err(theirs, fp8_logits) <= 1e-4


def run_cli(args, capsys):
    code = cli(["convert", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def test_existing_destination_is_refused(fp8_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    code, err = run_cli(["--dequantize", str(fp8_dir), str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "already exists" in err


def test_unquantized_source_is_refused(official_checkpoint, tmp_path, capsys):
    code, err = run_cli(["--dequantize", str(official_checkpoint), str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "has no quantization_config; nothing to dequantize" in err


def test_bad_scale_leaves_no_output(fp8_dir, tmp_path, capsys):
    src = tmp_path / "src"
    shutil.copytree(fp8_dir, src)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = "model.layers.2.self_attn.q_b_proj.weight_scale_inv"
    shard = src / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = torch.ones(5, 5)
    save_file(tensors, shard)
    code, err = run_cli(["--dequantize", str(src), str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert f"tensor '{name}' has shape [5, 5], expected [2, 1]" in err and "weight of shape [192, 96]" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_requires_a_mode(fp8_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli(["convert", str(fp8_dir), str(tmp_path / "out")])
    assert exc.value.code == 2 and "--dequantize" in capsys.readouterr().err
