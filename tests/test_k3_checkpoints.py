"""Kimi K3's release checkpoint with MXFP4 routed experts (compressed-tensors ``mxfp4-pack-quantized``): loaded with
the experts kept packed (the bytes of our MLX mxfp4 layout, re-interpreted), parity with mlx-lm 0.32.2's ``kimi_k3``
on the same files, the CPU backend, and one clear error per malformed packed tensor. Spec ``kimi_k3_and_int4.md``
§A3-§A4.

The fixture packs with compressed-tensors' own FP4 packer and E8M0 scale codec (``k3_checkpoints.mxfp4_pack``); the
float model the files mean is built from compressed-tensors' own decode, so the packing is checked independently of
kimi-lm's codecs.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file

import kimi_lm
from k3_checkpoints import mlx_logits, mxfp4_config, random_model, write_mxfp4_checkpoint
from kimi_lm.checkpoint import load
from kimi_lm.errors import CheckpointError
from kimi_lm.quant.packed import PackedSiTUExperts

pytest.importorskip("compressed_tensors")
EXPERTS = "language_model.model.layers.{L}.block_sparse_moe.experts.{E}.{P}."


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def ids(T: int, B: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return random_model(mxfp4_config(), seed=4)


@pytest.fixture(scope="module")
def mxfp4(model, tmp_path_factory):
    """(directory in the release layout: fp32 floats, MXFP4 experts, quantization_config in text_config; the fp32
    model the files mean)."""
    path, meant = write_mxfp4_checkpoint(model, tmp_path_factory.mktemp("k3mx") / "ckpt", dtype=torch.float32)
    reference = random_model(mxfp4_config())
    reference.load_state_dict(meant)
    return path, reference


def _packed_experts(m):
    return [layer.block_sparse_moe.experts for layer in m.model.layers if hasattr(layer, "block_sparse_moe")]


@pytest.mark.parametrize("nested", [True, False], ids=["text_config", "top_level"])
def test_logits_match_mlx_lm_and_experts_stay_packed(model, mxfp4, tmp_path, nested, caplog):
    pytest.importorskip("mlx_lm.models.kimi_k3")
    path, reference = mxfp4
    if not nested:  # the quantization_config at the top level of the wrapper (transformers' dump) instead
        path = write_mxfp4_checkpoint(model, tmp_path / "top", dtype=torch.float32, nested=False)[0]
    x = ids(24)
    want, want_steps, tokens = mlx_logits(path, x, steps=3)
    with caplog.at_level(logging.INFO, logger="kimi_lm.checkpoint"):
        ours = load(path, dtype=torch.float32)
    assert sum("vision" in r.message for r in caplog.records) == 1
    assert rel(ours(x)[0], want) <= 1e-3
    assert rel(ours(x)[0], reference(x)[0]) <= 1e-5  # the files' meaning, decoded by compressed-tensors
    full = ours(torch.cat([x, torch.tensor([tokens])], dim=1))[0]
    assert rel(full[24:27], want_steps) <= 1e-3
    cfg = ours.config
    E, I, L = cfg.num_experts, cfg.moe_intermediate_size, cfg.routed_expert_hidden_size
    experts = _packed_experts(ours)
    assert len(experts) == cfg.num_hidden_layers - 1
    for ex in experts:  # 4-bit codes and one E8M0 byte per 32 weights: nothing dequantized at load
        assert type(ex) is PackedSiTUExperts and ex.gate_up_spec.mode == ex.down_spec.mode == "mxfp4"
        assert ex.gate_up_proj.dtype == ex.down_proj.dtype == torch.uint32
        assert ex.gate_up_proj.nbytes == E * 2 * I * L // 2 and ex.down_proj.nbytes == E * L * I // 2
        assert ex.gate_up_proj_scales.dtype == torch.uint8 and ex.gate_up_proj_scales.nbytes == E * 2 * I * L // 32
        assert not any(p.is_floating_point() for p in ex.buffers()) and not list(ex.parameters())


def test_experts_hold_the_files_bytes(mxfp4):
    """A pure re-interpretation: expert 5's w1 / w3 / w2 codes and scales are the file's bytes, in MLX's stacking."""
    path, _ = mxfp4
    ours = load(path, dtype=torch.float32)
    files = {}
    for shard in path.glob("*.safetensors"):
        files.update(load_file(shard))
    ex = ours.model.layers[2].block_sparse_moe.experts
    I = ours.config.moe_intermediate_size
    name = EXPERTS.format(L=2, E=5, P="{P}")
    for P, codes, scales in (("w1", ex.gate_up_proj[5, :I], ex.gate_up_proj_scales[5, :I]),
                             ("w3", ex.gate_up_proj[5, I:], ex.gate_up_proj_scales[5, I:]),
                             ("w2", ex.down_proj[5], ex.down_proj_scales[5])):
        assert torch.equal(codes.contiguous().view(torch.uint8), files[name.format(P=P) + "weight_packed"])
        assert torch.equal(scales, files[name.format(P=P) + "weight_scale"])


def test_cpu_backend_equals_plain_model(mxfp4):
    path, _ = mxfp4
    plain = kimi_lm.load(path, dtype=torch.float32, backend=None)
    prepared = kimi_lm.load(path, dtype=torch.float32)
    x = ids(19, B=2)
    assert rel(prepared(x), plain(x)) <= 1e-4  # prefill: experts dequantized in C, then BLAS (fp32 sums reordered)
    c1, c2 = plain.make_cache(2), prepared.make_cache(2)
    plain(x, cache=c1), prepared(x, cache=c2)
    for seed in (3, 4):  # decode steps: each expert's product in the few-row kernel
        step = ids(1, B=2, seed=seed)
        assert rel(prepared(step, cache=c2), plain(step, cache=c1)) <= 1e-4
    from kimi_lm.cpu import quant, quant_kernels

    for ex in _packed_experts(prepared):  # the C kernels' module where they are built, the plain one otherwise
        want = quant.CpuPackedSiTUExperts if quant_kernels.quant_library() is not None else PackedSiTUExperts
        assert type(ex) is want and ex.gate_up_proj.dtype == torch.uint32


def test_bf16_floats_with_mxfp4_experts(model, tmp_path):
    """The release itself: bf16 floats, MXFP4 experts; loads at bf16 and at fp32 (then exactly the meant model)."""
    path, meant = write_mxfp4_checkpoint(model, tmp_path / "bf16", dtype=torch.bfloat16)
    reference = random_model(mxfp4_config())
    reference.load_state_dict(meant)
    x = ids(16)
    assert rel(load(path, dtype=torch.float32)(x), reference(x)) <= 1e-5
    logits = load(path, dtype=torch.bfloat16)(x)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def _set(name: str, fn):
    return lambda t: t.update({name: fn(t[name])})


W2 = EXPERTS.format(L=1, E=3, P="w2")


@pytest.mark.parametrize("edit, needle", [
    (_set(W2 + "weight_packed", lambda t: t.view(torch.int32)), r"weight_packed' has dtype I32, expected U8"),
    (_set(W2 + "weight_packed", lambda t: t.float()), r"weight_packed' has dtype F32, expected U8"),
    (_set(W2 + "weight_scale", lambda t: t.to(torch.bfloat16)), r"weight_scale' has dtype BF16, expected U8"),
    (_set(W2 + "weight_packed", lambda t: t[:, :8].contiguous()),
     r"weight_packed' has shape \[64, 8\], expected \[64, 16\] \(mxfp4-pack-quantized codes of a \[64, 32\] weight"),
    (_set(W2 + "weight_packed", lambda t: t[:3].contiguous()), r"has shape \[3, 16\], expected \[64, 16\]"),
    (_set(W2 + "weight_scale", lambda t: torch.cat([t, t], 1)),
     r"weight_scale' has shape \[64, 2\], expected \[64, 1\] \(mxfp4-pack-quantized scales"),
    (lambda t: t.pop(W2 + "weight_scale"), r"weight_packed' has no scale .*w2\.weight_scale' beside it"),
    (lambda t: t.pop(W2 + "weight_packed"), r"missing from the checkpoint: .*down_proj \(expert 3, down\)"),
    (lambda t: t.update({W2 + "weight": torch.zeros(64, 32)}), r"both hold parameter .*\(expert 3, down\)"),
    (lambda t: t.update({"language_model.model.layers.0.self_attn.b_proj.weight_packed": torch.zeros(2, 32).byte(),
                         "language_model.model.layers.0.self_attn.b_proj.weight_scale": torch.zeros(2, 2).byte()})
     or t.pop("language_model.model.layers.0.self_attn.b_proj.weight"),
     r"does not quantize module 'language_model\.model\.layers\.0\.self_attn\.b_proj'"),
    (lambda t: t.update({W2.replace(".3.", ".8.") + "weight_packed": torch.zeros(64, 16).byte(),
                         W2.replace(".3.", ".8.") + "weight_scale": torch.zeros(64, 1).byte()}),
     r"names expert 8, but config.json has num_experts=8"),
])
def test_malformed_packed_tensor_is_an_error(model, tmp_path, edit, needle):
    path = write_mxfp4_checkpoint(model, tmp_path / "bad", dtype=torch.float32, edit=edit)[0]
    with pytest.raises(CheckpointError, match=needle):
        load(path, dtype=torch.float32)
