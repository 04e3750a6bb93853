"""The checkpoint writer: official names and layout (against a checkpoint transformers wrote), exact round trip
through kimi_lm.load (AttnRes keys included), fp32 gates in bf16 files, sharding, atomic writes."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

import kimi_lm
from conftest import rel_err
from kimi_lm.config import preset
from kimi_lm.model.kimi_linear import KimiLinearForCausalLM
from kimi_lm.save import save
from kimi_lm.train.init import init_weights


def read_all(path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(index.values())):
        with safe_open(path / shard, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(out) == set(index)
    return out


def test_writes_exactly_the_official_checkpoint_it_was_loaded_from(official_checkpoint, tmp_path):
    """Load the official-layout checkpoint (written by transformers, experts as experts.E.w1/w2/w3), save it:
    the same tensor names, shapes, dtypes and values, and a config.json that loads to the same config."""
    model = kimi_lm.load(official_checkpoint, dtype=torch.float32)
    out = save(model, tmp_path / "copy")
    ours, theirs = read_all(out), read_all(official_checkpoint)
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name
    assert kimi_lm.load(out, dtype=torch.float32).config == model.config
    raw = json.loads((out / "config.json").read_text())
    assert raw["architectures"] == ["KimiLinearForCausalLM"] and "kda_layers" in raw["linear_attn_config"]


def test_attn_res_model_round_trips_exactly_with_k3_key_names(tmp_path, token_ids):
    cfg = dataclasses.replace(preset("tiny"), attn_res_block_size=1.5)
    model = init_weights(KimiLinearForCausalLM(cfg), generator=torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():  # non-trivial queries and router biases, so a dropped tensor would show
        for name, p in model.named_parameters():
            if name.endswith("_res_proj.weight"):
                p.normal_(0, 0.3)
        for name, b in model.named_buffers():
            b.normal_(0, 0.1)
    out = save(model, tmp_path / "ckpt", max_shard_bytes=200_000)
    files = read_all(out)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1  # sharded, with an index
    assert {"model.layers.0.self_attention_res_proj.weight", "model.layers.5.mlp_res_norm.weight",
            "model.output_attn_res_proj.weight", "model.output_attn_res_norm.weight"} <= set(files)
    assert "model.layers.1.block_sparse_moe.experts.7.w3.weight" in files
    assert not any("gate_up_proj" in n for n in files)
    assert json.loads((out / "config.json").read_text())["attn_res_block_size"] == 1.5
    loaded = kimi_lm.load(out, dtype=torch.float32, pack_weights=False)  # same kernels: bit-identical logits
    ref = model.state_dict()
    assert all(torch.equal(loaded.state_dict()[k], ref[k]) for k in ref)
    packed = kimi_lm.load(out, dtype=torch.float32)  # the default oneDNN-packed model saves the same tensors
    assert all(torch.equal(packed.state_dict()[k], ref[k]) for k in ref)
    with torch.no_grad():
        assert torch.equal(loaded(token_ids), model(token_ids))
        assert rel_err(packed(token_ids), model(token_ids)) <= 1e-5


def test_bf16_files_keep_gates_and_router_bias_fp32(official_checkpoint, tmp_path):
    model = kimi_lm.load(official_checkpoint, dtype=torch.float32)
    out = save(model, tmp_path / "bf16", dtype=torch.bfloat16)
    files = read_all(out)
    assert files["model.layers.0.self_attn.A_log"].dtype == torch.float32
    assert files["model.layers.1.block_sparse_moe.gate.e_score_correction_bias"].dtype == torch.float32
    assert files["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    loaded = kimi_lm.load(out, dtype=torch.float32).state_dict()
    for name, t in model.state_dict().items():  # exactly the bf16 rounding, and no rounding for the fp32 ones
        fp32 = name.endswith(("A_log", "dt_bias", "e_score_correction_bias"))
        assert torch.equal(loaded[name], t if fp32 else t.to(torch.bfloat16).float()), name


def test_atomic_write_and_overwrite(official_checkpoint, tmp_path):
    model = kimi_lm.load(official_checkpoint, dtype=torch.float32)
    target = tmp_path / "ckpt"
    with pytest.raises(TypeError):
        save(model, target, files={"bad": 3.5})  # fails after the weights are written
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temporary directory is left behind
    save(model, target, files={"note.txt": "first"})
    with pytest.raises(FileExistsError):
        save(model, target)
    save(model, target, files={"note.txt": "second"}, overwrite=True)
    assert (target / "note.txt").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_convert_to_hf_loads_in_transformers_with_the_same_logits(hf_checkpoint, tmp_path, token_ids):
    import transformers

    from kimi_lm.convert import main as convert

    assert convert(["--to-hf", str(hf_checkpoint), str(tmp_path / "hf"), "--dtype", "float32", "--quiet"]) == 0
    raw = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert raw["layer_types"][:3] == ["linear_attention", "linear_attention", "full_attention"]
    assert "attn_res_block_size" not in raw and "kda_layers" in raw["linear_attn_config"]
    assert "model.layers.1.block_sparse_moe.experts.0.w1.weight" in read_all(tmp_path / "hf")
    theirs = transformers.KimiLinearForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours = kimi_lm.load(hf_checkpoint, dtype=torch.float32)
    with torch.no_grad():
        assert rel_err(theirs(token_ids).logits, ours(token_ids)) < 1e-4


def test_convert_to_hf_refuses_attn_res(tmp_path, capsys):
    from kimi_lm.convert import main as convert

    cfg = dataclasses.replace(preset("tiny"), attn_res_block_size=2)
    save(init_weights(KimiLinearForCausalLM(cfg)), tmp_path / "attnres")
    assert convert(["--to-hf", str(tmp_path / "attnres"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no Block Attention Residuals" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
