"""FP8 128×128 block weights: packing, reference vs fast dequantization, loading a sharded FP8 checkpoint that stays
fp8 in memory, bad checkpoints, and (slow) peak memory while loading."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import kimi_lm
from conftest import load_rss_growth, rel_err
from k2_checkpoints import build_reference, to_fp8_layout, write_random_fp8_checkpoint
from kimi_lm import CheckpointError
from kimi_lm.config import FP8_BLOCK_CONFIG, KimiK2Config, preset
from kimi_lm.quant import fp8_block
from kimi_lm.quant.fp8_block import FP8, FP8BlockLinear, FP8StackedExperts, dequantize, dequantize_rows, quantize


@pytest.mark.parametrize("shape", [(300, 200), (576, 1000), (128, 128), (1, 5), (129, 257)])
def test_fast_dequantize_equals_reference(shape):
    torch.manual_seed(0)
    q, s = quantize(torch.randn(shape) * torch.rand(shape[0], 1) * 10)
    assert q.dtype == FP8 and tuple(s.shape) == ((shape[0] + 127) // 128, (shape[1] + 127) // 128)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dequantize_rows(q, s, dtype), dequantize(q, s, dtype))


def test_block_scales_by_hand():
    w = torch.ones(130, 3)
    w[129, 0] = -896.0  # second block row (rows 128, 129; a partial block) has max |w| = 896 -> scale 2
    q, s = quantize(w)
    assert s.shape == (2, 1)
    assert s[0, 0].item() == pytest.approx(1 / 448) and s[1, 0].item() == 2.0
    assert q[0, 0].float().item() == 448.0 and q[129, 0].float().item() == -448.0 and q[128, 1].float().item() == 0.5
    assert torch.equal(dequantize(q, s), w)  # every value here is exact in e4m3 times its scale


def test_quantization_error_within_e4m3_precision():
    torch.manual_seed(0)
    w = torch.randn(256, 384)
    q, s = quantize(w)
    err = (dequantize(q, s) - w).abs()
    s_full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)
    # 3 mantissa bits: half an ulp is 1/16 of the value; below 2^-6 (subnormals) the step is 2^-9 of the scale
    assert bool((err <= w.abs() / 16 + s_full * 2**-10).all())
    assert err.max() > 0


def test_fp8_linear_tiles_equal_one_dense_matmul(monkeypatch):
    torch.manual_seed(0)
    dense = torch.nn.Linear(200, 300, bias=False)
    layer = FP8BlockLinear.from_float(dense)
    x = torch.randn(2, 7, 200)
    want = torch.nn.functional.linear(x, dequantize(layer.weight, layer.weight_scale_inv))
    monkeypatch.setattr(fp8_block, "TILE_ELEMENTS", 128 * 200)  # 3 tiles of 128 rows, the last one partial
    assert rel_err(layer(x), want) < 1e-6
    assert rel_err(layer(x), dense(x)) < 0.05  # and close to the unquantized layer


@pytest.fixture(scope="module")
def fp8_case(tmp_path_factory):
    cfg = preset("tiny-k2")
    ref = build_reference(cfg, seed=5)
    hf_dir = tmp_path_factory.mktemp("hf")
    ref.save_pretrained(hf_dir)
    fp8_dir, dequantized = to_fp8_layout(hf_dir, tmp_path_factory.mktemp("fp8"))
    # the reference model with the dequantized weights, loaded by transformers itself
    deq_dir = tmp_path_factory.mktemp("dequantized")
    shutil.copy(hf_dir / "config.json", deq_dir / "config.json")
    save_file({k: v.contiguous() for k, v in dequantized.items()}, deq_dir / "model.safetensors")
    import transformers

    deq_model = transformers.DeepseekV3ForCausalLM.from_pretrained(deq_dir).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 50), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = deq_model(ids).logits
    return fp8_dir, ids, logits, hf_dir


def test_checkpoint_has_partial_edge_blocks_in_two_shards(fp8_case):
    fp8_dir = fp8_case[0]
    index = json.loads((fp8_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    cfg = json.loads((fp8_dir / "config.json").read_text())
    assert cfg["quantization_config"] == FP8_BLOCK_CONFIG
    tensors = {}
    for shard in set(index["weight_map"].values()):
        tensors.update(load_file(fp8_dir / shard))
    w = tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]  # [128 + 16, 192]: partial in both dims
    assert w.dtype == FP8 and w.shape == (144, 192)
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (2, 2)


def test_fp8_checkpoint_matches_dequantized_model(fp8_case):
    fp8_dir, ids, expected, _ = fp8_case
    model = kimi_lm.load(fp8_dir, dtype=torch.float32)
    with torch.no_grad():
        assert rel_err(model(ids), expected) <= 1e-4
    state = model.state_dict()
    fp8 = sum(t.numel() for t in state.values() if t.dtype == FP8)
    assert fp8 / sum(t.numel() for t in state.values()) > 0.5
    layer = model.model.layers[1]
    assert isinstance(layer.self_attn.kv_b_proj, FP8BlockLinear) and isinstance(layer.mlp.experts, FP8StackedExperts)
    assert isinstance(layer.mlp.shared_experts.down_proj, FP8BlockLinear)
    assert model.lm_head.weight.dtype == torch.float32 and layer.mlp.gate.weight.dtype == torch.float32
    assert layer.mlp.gate.e_score_correction_bias.dtype == torch.float32


def test_packing_a_float_model_equals_loading_the_fp8_checkpoint(fp8_case):
    """quantize_modules(pack=True) on the float model gives exactly the model loaded from the FP8 files."""
    fp8_dir, ids, _, hf_dir = fp8_case
    packed = kimi_lm.load(hf_dir, dtype=torch.float32, pack_weights=False)  # plain modules, to be quantized
    swapped = fp8_block.quantize_modules(packed, lambda name, m: name != "lm_head", pack=True)
    assert "model.layers.1.mlp.experts" in swapped and "model.layers.0.self_attn.q_a_proj" in swapped
    loaded = kimi_lm.load(fp8_dir, dtype=torch.float32, pack_weights=False)
    assert packed.state_dict().keys() == loaded.state_dict().keys()
    for name, t in loaded.state_dict().items():
        assert torch.equal(packed.state_dict()[name], t), name
    with torch.no_grad():
        assert torch.equal(packed(ids), loaded(ids))


def test_fp8_cached_decode_equals_full_forward(fp8_case):
    fp8_dir, ids = fp8_case[:2]
    model = kimi_lm.load(fp8_dir, dtype=torch.float32)
    full = model(ids)
    cache = model.make_cache(batch_size=2)
    pieces = [model(ids[:, :30], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(30, 50)]
    assert rel_err(torch.cat(pieces, dim=1), full) < 1e-5


def test_fp8_bf16_compute_close_to_fp32(fp8_case):
    fp8_dir, ids, expected, _ = fp8_case
    bf16 = kimi_lm.load(fp8_dir, dtype=torch.bfloat16)
    assert bf16.model.layers[0].self_attn.o_proj.weight.dtype == FP8 and bf16.dtype == torch.bfloat16
    with torch.no_grad():
        out = bf16(ids)
    assert out.dtype == torch.bfloat16
    # measured 0.017: bf16 rounding on a random tiny MoE, before routing flips compound it further along the sequence
    assert rel_err(out[:, :8], expected[:, :8]) < 0.05


# ---- bad checkpoints ------------------------------------------------------------------------------------------
@pytest.fixture
def ckpt(tmp_path, fp8_case):
    dst = tmp_path / "ckpt"
    shutil.copytree(fp8_case[0], dst)
    return dst


def edit_tensors(path, fn):
    """Apply fn(dict name -> tensor, weight_map) to every tensor of the checkpoint, rewriting shards and index."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in set(index["weight_map"].values()):
        tensors.update(load_file(path / shard))
    fn(tensors)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in tensors}
    for k in tensors:
        index["weight_map"].setdefault(k, "model-00001-of-00002.safetensors")
    for shard in set(index["weight_map"].values()):
        save_file({k: tensors[k].contiguous() for k, v in index["weight_map"].items() if v == shard}, path / shard)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


SCALE = "model.layers.1.self_attn.o_proj.weight_scale_inv"


def test_scale_with_wrong_shape(ckpt):
    edit_tensors(ckpt, lambda t: t.update({SCALE: torch.ones(1, 1)}))
    with pytest.raises(CheckpointError, match=rf"tensor '{SCALE}' has shape \[1, 1\], expected \[2, 1\] = ceil\(out/128\) "
                                              r"x ceil\(in/128\) for its weight of shape \[192, 128\]"):
        kimi_lm.load(ckpt)


def test_expert_scale_with_wrong_shape(ckpt):
    name = "model.layers.2.mlp.experts.5.down_proj.weight_scale_inv"
    edit_tensors(ckpt, lambda t: t.update({name: torch.ones(3, 1)}))
    with pytest.raises(CheckpointError, match=rf"'{name}' has shape \[3, 1\], expected \[2, 1\] .* weight of shape \[192, 96\]"):
        kimi_lm.load(ckpt)


def test_missing_scale(ckpt):
    edit_tensors(ckpt, lambda t: t.pop(SCALE))
    with pytest.raises(CheckpointError, match=rf"'model\.layers\.1\.self_attn\.o_proj\.weight' has dtype F8_E4M3, but its "
                                              rf"block scale '{SCALE}' is missing"):
        kimi_lm.load(ckpt)


def test_missing_expert_scale(ckpt):
    edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"))
    with pytest.raises(CheckpointError, match=r"missing.*layers\.1\.mlp\.experts\.gate_up_proj_scale_inv \(expert 3, up\)"):
        kimi_lm.load(ckpt)


def test_fp8_tensor_without_quantization_config(ckpt):
    edit_config(ckpt, lambda c: c.pop("quantization_config"))
    with pytest.raises(CheckpointError, match=r"is an FP8 block scale, but config\.json has no quantization_config"):
        kimi_lm.load(ckpt)
    edit_tensors(ckpt, lambda t: [t.pop(k) for k in [k for k in t if k.endswith("_scale_inv")]])
    with pytest.raises(CheckpointError, match=r"has dtype F8_E4M3, but config\.json has no quantization_config"):
        kimi_lm.load(ckpt)


@pytest.mark.parametrize("key,value,match", [
    ("quant_method", "gptq", r"quantization_config\.quant_method 'gptq' is not supported \(supported: 'fp8'\)"),
    ("weight_block_size", [64, 64], r"quantization_config\.weight_block_size \[64, 64\] is not supported"),
    ("fmt", "e5m2", r"quantization_config\.fmt 'e5m2' is not supported"),
])
def test_unsupported_quantization_config(ckpt, key, value, match):
    edit_config(ckpt, lambda c: c["quantization_config"].update({key: value}))
    with pytest.raises(CheckpointError, match=rf"config\.json: {match}"):
        kimi_lm.load(ckpt)


def test_float_weight_where_scale_says_fp8(ckpt):
    name = "model.layers.1.self_attn.o_proj.weight"
    edit_tensors(ckpt, lambda t: t.update({name: t[name].float()}))
    with pytest.raises(CheckpointError, match=rf"'{name}' has dtype F32, expected F8_E4M3"):
        kimi_lm.load(ckpt)


# ---- memory ---------------------------------------------------------------------------------------------------
# ~216 MiB on disk, 97 % of it fp8 experts and projections, as in K2
RSS_CONFIG = KimiK2Config(
    vocab_size=1024, hidden_size=1024, intermediate_size=2048, num_hidden_layers=3, num_attention_heads=8,
    num_key_value_heads=8, q_lora_rank=512, kv_lora_rank=512, qk_nope_head_dim=64, qk_rope_head_dim=64,
    v_head_dim=64, n_routed_experts=32, num_experts_per_tok=4, moe_intermediate_size=1024, n_group=1, topk_group=1,
    first_k_dense_replace=1, num_nextn_predict_layers=0, quantization_config=dict(FP8_BLOCK_CONFIG), dtype="bfloat16",
)


@pytest.mark.slow
def test_peak_rss_while_loading_fp8(tmp_path):
    """An FP8 checkpoint of ~200 MB on disk (experts dominate, as in K2): load in a fresh process and compare the
    growth of its peak resident memory with the size of the files."""
    ckpt = write_random_fp8_checkpoint(RSS_CONFIG, tmp_path / "fp8")
    disk = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    ratio = load_rss_growth(ckpt, "tiny-k2")["peak"] / disk
    print(f"\nFP8 load: {disk / 2**20:.0f} MiB on disk, peak RSS growth {ratio:.3f}x the size on disk")
    assert disk > 150 * 2**20
    assert ratio <= 1.3
