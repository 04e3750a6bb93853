"""Every checkpoint kimi-lm writes loads again: in kimi-lm, in mlx-lm 0.32.2 and in transformers 5.23 where those
support the model (issue 19 items 2-4), with the same logits.

Writers: ``save.save`` (what ``kimi-lm train`` writes), ``convert --to-hf`` and ``convert --quantize`` (every mode).
Models: the bundled default model (Block AttnRes, which only kimi-lm runs), the ``tiny`` preset (experts narrower
than the quantization group) and ``tiny-k2``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import rel_err  # noqa: E402

import kimi_lm  # noqa: E402
from kimi_lm.cli import main as cli  # noqa: E402
from kimi_lm.config import preset  # noqa: E402
from kimi_lm.save import export_to_transformers, save  # noqa: E402

mx = pytest.importorskip("mlx.core")
mlx_utils = pytest.importorskip("mlx_lm.utils")

IDS = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(5))
MODES = [("affine", 4, 64), ("affine", 8, 32), ("mxfp4", 4, 32), ("mxfp8", 8, 32), ("nvfp4", 4, 16)]


def random_model(name: str, seed: int = 0):
    """A model of preset ``name`` with random weights (normal 0.05; norms around 1), as ``kimi-lm train`` leaves one."""
    from kimi_lm.checkpoint import _model_class

    config = preset(name)
    torch.manual_seed(seed)
    model = _model_class(config)(config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.normal_(1.0 if pname.endswith("norm.weight") else 0.0, 0.05)
    return model.eval()


def mlx_lm_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model, _ = mlx_utils.load_model(Path(path))
    return torch.from_numpy(np.array(model(mx.array(ids.numpy())).astype(mx.float32)))


def transformers_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


def kimi_lm_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return kimi_lm.load(path, dtype=torch.float32)(ids)


@pytest.mark.parametrize("name", ["tiny", "tiny-k2"])
def test_saved_checkpoint_loads_in_mlx_lm_and_transformers(tmp_path, name):
    """Issue 19 item 4: config.json lacked mlx-lm's required ``head_dim`` / ``rope_theta``."""
    model = random_model(name)
    with torch.no_grad():
        want = model(IDS)
    path = save(model, tmp_path / "ckpt", dtype=torch.float32)
    raw = json.loads((path / "config.json").read_text())
    if name == "tiny":
        assert raw["head_dim"] == 64 // 2 and raw["rope_theta"] == 10000.0  # as the official file: hidden / heads
    assert rel_err(kimi_lm_logits(path, IDS), want) < 1e-5
    assert rel_err(mlx_lm_logits(path, IDS), want) < 5e-3  # mlx-lm's own kernels (fp32)
    assert rel_err(transformers_logits(path, IDS), want) < 1e-4


def test_to_hf_output_loads_in_mlx_lm(tmp_path):
    src = save(random_model("tiny", seed=1), tmp_path / "trained", dtype=torch.float32)
    want = kimi_lm_logits(src, IDS)
    dst = tmp_path / "hf"
    export_to_transformers(src, dst, torch.float32)
    assert rel_err(mlx_lm_logits(dst, IDS), want) < 5e-3
    assert rel_err(transformers_logits(dst, IDS), want) < 1e-4


@pytest.mark.parametrize("mode,bits,group", MODES)
def test_quantized_bundled_model_generates(tmp_path, capsys, mode, bits, group):
    """Issue 19 item 2: the AttnRes pseudo-queries ([1, hidden]) were quantized and the first token crashed."""
    dst = tmp_path / "q"
    assert cli(["convert", str(kimi_lm.DEFAULT_MODEL), str(dst), "--quantize", "--q-mode", mode, "--q-bits", str(bits),
                "--q-group-size", str(group), "--quiet"]) == 0
    capsys.readouterr()
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.output_attn_res_proj.weight" in index and "model.output_attn_res_proj.scales" not in index
    assert "model.layers.0.mlp_res_proj.scales" not in index
    assert any(k.endswith(".scales") for k in index)  # the matrices are quantized
    model = kimi_lm.load(dst, dtype=torch.float32)
    tokenizer = kimi_lm.load_tokenizer(dst)
    out = list(kimi_lm.stream_generate(model, tokenizer, "Hello", max_tokens=2, temperature=0.0))
    assert len(out) == 2
    # and it is the bundled model, quantized: its logits are close to the float model's
    float_model = kimi_lm.load(kimi_lm.DEFAULT_MODEL, dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode("Hello there, how are you?")])
    with torch.no_grad():
        got, want = model(ids)[0, -1], float_model(ids)[0, -1]
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.9


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory):
    return save(random_model("tiny", seed=2), tmp_path_factory.mktemp("tiny") / "trained", dtype=torch.float32)


def test_quantized_tiny_model_with_narrow_experts_loads(tiny_trained, tmp_path, capsys):
    """Issue 19 item 3: experts whose input width (moe_intermediate_size 32) is below the group size (64) keep a float
    down_proj beside a packed gate/up, as mlx-lm writes; the loader raised KeyError on it."""
    want = kimi_lm_logits(tiny_trained, IDS)
    dst = tmp_path / "q"
    assert cli(["convert", str(tiny_trained), str(dst), "--quantize", "--q-bits", "8", "--quiet"]) == 0  # group 64
    capsys.readouterr()
    index = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.switch_mlp.gate_proj.scales" in index
    assert "model.layers.1.mlp.switch_mlp.down_proj.scales" not in index
    got = kimi_lm_logits(dst, IDS)
    # close to the float model overall (a random router's near-ties flip some tokens' experts under quantization)
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.95
    assert rel_err(got, mlx_lm_logits(dst, IDS)) < 5e-3  # mlx-lm reads the same model from the same files


def test_loads_mlx_lm_own_conversion_with_a_float_half(tiny_trained, tmp_path):
    model, config = mlx_utils.load_model(tiny_trained)
    model, config = mlx_utils.quantize_model(model, config, 64, 4, mode="affine")
    mlx_utils.save_model(tmp_path / "mlx", model)
    mlx_utils.save_config(config, config_path=tmp_path / "mlx" / "config.json")
    assert rel_err(kimi_lm_logits(tmp_path / "mlx", IDS), mlx_lm_logits(tmp_path / "mlx", IDS)) < 5e-3


def test_loader_dequantizes_a_packed_pseudo_query(tmp_path, capsys):
    """A checkpoint written before the fix (pseudo-queries packed) still loads: they are dequantized at load."""
    from safetensors.torch import load_file, save_file

    from kimi_lm.quant.packed import QuantSpec

    dst = tmp_path / "q"
    assert cli(["convert", str(kimi_lm.DEFAULT_MODEL), str(dst), "--quantize", "--q-mode", "mxfp8", "--quiet"]) == 0
    capsys.readouterr()
    want = kimi_lm_logits(dst, IDS)
    spec = QuantSpec("mxfp8", 8, 32)
    (shard,) = dst.glob("*.safetensors")
    tensors = load_file(shard)
    w = tensors.pop("model.output_attn_res_proj.weight")
    tensors.update(zip([f"model.output_attn_res_proj.{p}" for p in ("weight", "scales")], spec.quantize(w)))
    save_file(tensors, shard, metadata={"format": "mlx"})
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.output_attn_res_proj.scales"] = shard.name
    index_path.write_text(json.dumps(index))
    got = kimi_lm_logits(dst, IDS)
    assert rel_err(got, want) < 0.05
