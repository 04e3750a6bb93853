"""Every bad checkpoint gets one CheckpointError naming the file, the key or tensor, what was expected and found."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import kimi_lm
from kimi_lm import CheckpointError
from kimi_lm.config import KimiLinearConfig


@pytest.fixture
def ckpt(tmp_path, official_checkpoint):
    """A writable copy of the official-layout checkpoint."""
    dst = tmp_path / "ckpt"
    shutil.copytree(official_checkpoint, dst)
    return dst


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_shard_holding(path, name, fn):
    """Apply fn(dict of tensors) to the shard that holds tensor `name`; returns the shard's file name."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][name]
    tensors = load_file(path / shard)
    fn(tensors)
    save_file(tensors, path / shard)
    return shard, index


def test_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        kimi_lm.load(tmp_path / "nope")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        kimi_lm.load(ckpt)


def test_unreadable_config(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not a readable JSON config"):
        kimi_lm.load(ckpt)


def test_unknown_model_type_lists_supported(ckpt):
    edit_config(ckpt, model_type="llama")
    with pytest.raises(CheckpointError, match=r"model_type 'llama' is not supported.*kimi_linear"):
        kimi_lm.load(ckpt)


@pytest.mark.parametrize("key,value", [("use_full_rank_gate", True), ("gate_lower_bound", -5.0),
                                       ("mla_use_nope", False), ("moe_router_activation_func", "softmax")])
def test_unimplemented_math_keys(ckpt, key, value):
    edit_config(ckpt, **{key: value})
    with pytest.raises(CheckpointError, match=rf"config\.json: config key '{key}' = .* not implemented"):
        kimi_lm.load(ckpt)


def test_inconsistent_layer_lists(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["linear_attn_config"]["kda_layers"] = [1, 2]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"kda_layers ∪ full_attn_layers must split layers 1\.\.6"):
        kimi_lm.load(ckpt)


def remove_tensor(path, name):
    """Delete a tensor from its shard and from the index."""
    _, index = edit_shard_holding(path, name, lambda t: t.pop(name))
    del index["weight_map"][name]
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_missing_tensor(ckpt):
    remove_tensor(ckpt, "model.layers.2.self_attn.kv_b_proj.weight")
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) missing.*model\.layers\.2\.self_attn\.kv_b_proj\.weight"):
        kimi_lm.load(ckpt)


def test_missing_expert(ckpt):
    remove_tensor(ckpt, "model.layers.1.block_sparse_moe.experts.3.w3.weight")
    with pytest.raises(CheckpointError, match=r"missing.*layers\.1\.block_sparse_moe\.experts\.gate_up_proj \(expert 3, up\)"):
        kimi_lm.load(ckpt)


def test_tensor_listed_in_index_but_not_in_shard(ckpt):
    name = "model.norm.weight"
    shard, _ = edit_shard_holding(ckpt, name, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"{shard}: tensor 'model\.norm\.weight' is listed in the index but missing"):
        kimi_lm.load(ckpt)


def test_index_names_missing_shard(ckpt):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-gone.safetensors"
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' is listed in shard 'model-gone\.safetensors', which does not exist"):
        kimi_lm.load(ckpt)


def test_unexpected_tensor(ckpt):
    name = "model.norm.weight"
    shard, index = edit_shard_holding(ckpt, name, lambda t: t.update({"model.layers.0.self_attn.bogus.weight": torch.ones(3)}))
    index["weight_map"]["model.layers.0.self_attn.bogus.weight"] = shard
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{shard}: unexpected tensor 'model\.layers\.0\.self_attn\.bogus\.weight'"):
        kimi_lm.load(ckpt)


def test_expert_beyond_num_experts(ckpt):
    name = "model.norm.weight"
    extra = "model.layers.1.block_sparse_moe.experts.8.w1.weight"
    shard, index = edit_shard_holding(ckpt, name, lambda t: t.update({extra: torch.zeros(32, 64)}))
    index["weight_map"][extra] = shard
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"names expert 8, but config\.json has num_experts=8"):
        kimi_lm.load(ckpt)


def test_wrong_shape(ckpt):
    name = "model.layers.0.self_attn.q_proj.weight"
    shard, _ = edit_shard_holding(ckpt, name, lambda t: t.update({name: torch.zeros(16, 64)}))
    with pytest.raises(CheckpointError, match=rf"{shard}: tensor '{name}' has shape \[16, 64\], expected \[32, 64\]"):
        kimi_lm.load(ckpt)


def test_wrong_dtype(ckpt):
    name = "model.layers.0.self_attn.q_proj.weight"
    shard, _ = edit_shard_holding(ckpt, name, lambda t: t.update({name: torch.zeros(32, 64, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=rf"{shard}: tensor '{name}' has dtype I32, expected a float type"):
        kimi_lm.load(ckpt)


def test_pickle_weights_are_refused(tmp_path, official_checkpoint):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(official_checkpoint / "config.json", d / "config.json")
    (d / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weights found .*pytorch_model\.bin.*never loaded"):
        kimi_lm.load(d)


def test_unknown_dtype_argument(official_checkpoint):
    with pytest.raises(CheckpointError, match=r"dtype 'float8' is not supported"):
        kimi_lm.load(official_checkpoint, dtype="float8")


def test_transformers_config_round_trip(hf_checkpoint):
    raw = json.loads((hf_checkpoint / "config.json").read_text())
    assert "layer_types" in raw and "linear_attn_config" not in raw
    cfg = KimiLinearConfig.from_dict(raw)
    again = KimiLinearConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert cfg.first_k_dense_replace == 1 and cfg.linear_attn_config["full_attn_layers"] == [3, 6]


def test_official_reference_config():
    ref = Path(__file__).resolve().parent / "data/kimi-linear-48b-a3b-instruct.config.json"
    cfg = KimiLinearConfig.from_file(ref)
    kda = [i for i in range(27) if cfg.is_kda_layer(i)]
    assert len(kda) == 20 and [i for i in range(27) if i not in kda] == [3, 7, 11, 15, 19, 23, 26]
    assert cfg.num_experts == 256 and cfg.num_experts_per_token == 8 and cfg.mla_cache_width == 576
    with torch.device("meta"):
        from kimi_lm.model.kimi_linear import KimiLinearForCausalLM

        assert KimiLinearForCausalLM(cfg).num_parameters() == 49_122_681_728
