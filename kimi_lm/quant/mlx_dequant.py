"""MLX-layout checkpoints (packed or float) back to the official float layout: ``kimi-lm convert --dequantize`` of
what ``convert --quantize`` / ``--to-mlx`` or ``mlx_lm.convert`` wrote, for Kimi Linear, Kimi K3 and Kimi K2 / K2.5.

Names go through ``kimi_lm.names`` both ways (MLX name -> parameter -> official name, ``language_model.`` for a
wrapper); packed weights are dequantized with the loader's own reading of the ``quantization`` block
(``mlx_load.mlx_specs``); stacked experts are cut back into per-expert tensors, ``embed_q`` / ``unembed_out`` joined
into ``kv_b_proj``, MLX Conv1d weights transposed back. Output is streamed shard by shard into a temporary folder
renamed to DST when complete.

Reference: mlx-lm 0.32.2 ``models/kimi_linear.py``, ``kimi_k3.py``, ``deepseek_v3.py`` (``sanitize``, which this
undoes); spec ``kimi_k2_and_quantization.md`` §5.
"""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import torch
from tqdm import tqdm

from kimi_lm import names
from kimi_lm.checkpoint import SafetensorsFile, _model_class, ST_DTYPES, weight_files, write_safetensors
from kimi_lm.config import load_config
from kimi_lm.errors import CheckpointError
from kimi_lm.quant import mlx_load
from kimi_lm.quant.mlx_layout import INDEX, _atomic_dir, finish_float_copy, official_name


def dequantize_from_mlx(src, dst, dtype: torch.dtype = torch.bfloat16, progress: bool = True) -> dict:
    """MLX-layout checkpoint ``src`` (Kimi Linear, K3, K2 / K2.5; packed or float) -> official float layout in
    ``dst``."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a checkpoint directory (expected a folder with config.json and *.safetensors)")
    config = load_config(src / "config.json")
    fam = names.family(config)
    files = {n: f for n, f in mlx_load.split_fused_files(weight_files(src)).items() if not names.skipped(n, config)}
    targets = {name: names.to_parameter(name, fam) for name in files}
    with torch.device("meta"):
        float_state = _model_class(config)(config).state_dict()
    specs = mlx_load.mlx_specs(src, config, float_state, targets, files,  # the loader's reading of the quantization block
                               lambda f: mlx_load.split_fused(SafetensorsFile(f).header, f))
    plan: dict[str, tuple] = {}  # official name -> ((dtype, shape), source shard, builder)
    n_packed = 0
    with contextlib.ExitStack() as stack, _atomic_dir(dst) as tmp:
        opened: dict[Path, SafetensorsFile] = {}
        cache: dict[str, torch.Tensor] = {}

        def shard(path: Path) -> SafetensorsFile:
            if path not in opened:
                opened[path] = stack.enter_context(SafetensorsFile(path))
                mlx_load.split_fused(opened[path].header, path)  # mlx-lm's fused K3 q/k/v: three row ranges
            return opened[path]

        def dense(name: str) -> torch.Tensor:
            """MLX weight ``name`` as a float tensor (dequantized when packed); the last one read is kept, so
            the experts of one stacked tensor are cut from a single read."""
            if name not in cache:
                if len(cache) >= 3:  # official names interleave a layer's w1, w2, w3 experts: keep all three
                    cache.pop(next(iter(cache)))
                module = name.removesuffix(".weight")
                f = shard(files[name])
                if f"{module}.scales" in files:
                    key = targets[f"{module}.scales"][0].removesuffix(".scales").removesuffix("_scales")
                    biases = shard(files[f"{module}.biases"]).read(f"{module}.biases") if specs[key].has_biases else None
                    cache[name] = specs[key].dequantize(f.read(name), shard(files[f"{module}.scales"]).read(
                        f"{module}.scales"), biases, dtype)
                else:
                    cache[name] = f.read(name)
            return cache[name]

        for name in sorted(files):
            if name.endswith((".scales", ".biases")):
                continue
            target, placement, _ = targets[name]
            if target not in float_state and not re.search(r"\.kv_b_proj\.(embed_q|unembed_out)\.weight$", target):
                raise CheckpointError(f"{files[name]}: unexpected tensor {name!r} (no such parameter in a "
                                      f"{config.model_type} model with this config.json)")
            packed = f"{name.removesuffix('.weight')}.scales" in files
            n_packed += packed
            out_dtype = dtype if packed else ST_DTYPES[shard(files[name]).dtype(name)]
            ref = float_state.get(target)
            if ref is not None and ref.dim() == 3 and target.endswith(("gate_up_proj", "down_proj")):  # stacked experts
                per_expert = {"gate_all": "gate", "up_all": "up"}.get(placement, "down")
                shape = names.expert_shape(ref.shape, per_expert)
                for e in range(ref.shape[0]):
                    plan[official_name(target, per_expert, e, fam)] = (
                        (out_dtype, shape), files[name], lambda name=name, e=e: dense(name)[e].clone())
            elif ".kv_b_proj.embed_q." in target:
                base = target.split(".embed_q.")[0]
                q_name, v_name = name, name.replace(".embed_q.", ".unembed_out.")
                if v_name not in files:
                    raise CheckpointError(f"{files[name]}: tensor {name!r} has no {v_name!r} to rebuild kv_b_proj")
                kv_dtype = dtype if packed or f"{v_name.removesuffix('.weight')}.scales" in files else out_dtype
                plan[official_name(f"{base}.weight", fam=fam)] = (
                    (kv_dtype, list(float_state[f"{base}.weight"].shape)), files[name],
                    lambda q=q_name, v=v_name, kd=kv_dtype: torch.cat(
                        [dense(q).transpose(1, 2).to(kd), dense(v).to(kd)], dim=1).reshape(-1, config.kv_lora_rank))
            elif ".kv_b_proj.unembed_out." in target:
                continue  # joined with embed_q above
            elif placement == "conv":
                f = shard(files[name])
                D, W, one = f.shape(name)
                plan[official_name(target, fam=fam)] = ((out_dtype, [D, one, W]), files[name],
                                                        lambda name=name: dense(name).transpose(1, 2).contiguous())
            else:
                shape = list(ref.shape) if ref is not None else shard(files[name]).shape(name)
                plan[official_name(target, fam=fam)] = (  # A_log: mlx-lm's K3 keeps the heads' values only
                    (out_dtype, shape), files[name], lambda name=name, n=shape[0]: mlx_load.pad_a_log(dense(name), n))
        by_shard: dict[Path, dict] = {}
        for official, (entry, file, _) in plan.items():
            by_shard.setdefault(file, {})[official] = entry
        weight_map, total = {}, 0
        for file, entries in tqdm(sorted(by_shard.items()), desc="dequantize", unit="shard", disable=not progress):
            total += write_safetensors(tmp / file.name, entries, lambda n: plan[n][2]().to(plan[n][0][0]),
                                       metadata={"format": "pt"})
            weight_map.update({name: file.name for name in entries})
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                             "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        dtype_name = finish_float_copy(src, tmp, dtype, progress)
    return {"src": str(src), "dst": str(dst), "dtype": dtype_name, "shards": len(by_shard), "packed_weights": n_packed,
            "tensors": len(plan), "bytes": total}


def is_mlx_layout(path: Path) -> bool:
    """True for a directory whose config.json carries an MLX ``quantization`` block (what --dequantize undoes)."""
    try:
        quant = mlx_load.mlx_quantization(Path(path))
    except (OSError, ValueError):
        return False
    return isinstance(quant, dict) and "bits" in quant
