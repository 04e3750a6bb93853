"""Kimi Linear checkpoints between the official float layout and mlx-lm's (quantized) layout, tensor by tensor.

    quantize_to_mlx(src, dst, QuantSpec(...))      official bf16/fp32 -> what ``mlx_lm.convert -q`` writes
    dequantize_from_mlx(src, dst, dtype)           MLX layout (packed or float) -> official float layout

Names: ``kimi_lm.names``, the loader's own table, read in both directions: official name -> parameter -> MLX name
and back (experts stacked as ``mlp.switch_mlp.{gate,up,down}_proj``, ``block_sparse_moe.`` -> ``mlp.``, the router
bias as ``mlp.e_score_correction_bias``, convs as MLX Conv1d [D, W, 1] under ``{q,k,v}_conv.conv``, ``kv_b_proj``
split into per-head ``embed_q`` [H, latent, nope] / ``unembed_out`` [H, v, latent]).

Quantization policy = mlx-lm 0.32.2 ``quantize_model`` with ``kimi_linear.Model.quant_predicate``: every module with
``to_quantized`` (Linear, Embedding, SwitchLinear, MultiLinear) whose input width is a multiple of the *global* group
size is quantized, except one-row weights, which the model reads as vectors (the AttnRes pseudo-queries
``*_res_proj`` [1, hidden]: mlx-lm has no AttnRes, and a port would hold them as plain arrays, not Linears); ``mlp.gate`` (the router) at affine 8-bit group 64 with biases, recorded in config.json as the
per-module override ``{"group_size": 64, "bits": 8}`` (no mode: mlx-lm's loader reads a missing mode as affine);
norms, convs, ``A_log``, ``dt_bias`` and the correction bias stay float. config.json gets ``quantization`` =
``quantization_config`` and is written with sorted keys and indent 4 like ``mlx_lm.utils.save_config``.

Memory: one output module at a time (a layer's stacked experts), as ``checkpoint.write_safetensors`` streams.
Output goes to a temporary folder next to DST (``files.atomic_dir``), renamed only when complete, with
``SHA256SUMS``.

Reference: mlx-lm 0.32.2 ``utils.quantize_model`` / ``save_model`` / ``save_config``, ``models/kimi_linear.py``
(``sanitize``, ``quant_predicate``), ``models/mla.py``; spec ``kimi_k2_and_quantization.md`` §5–§6.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from kimi_lm import names
from kimi_lm.checkpoint import SafetensorsFile, _model_class, ST_DTYPES, plan_shards, weight_files, write_safetensors
from kimi_lm.config import KimiLinearConfig, load_config
from kimi_lm.errors import CheckpointError
from kimi_lm.files import atomic_dir
from kimi_lm.quant import mlx_load
from kimi_lm.quant.packed import QuantSpec
from kimi_lm.verify import SUMS, write_sums

INDEX = "model.safetensors.index.json"
ROUTER_OVERRIDE = {"group_size": 64, "bits": 8}  # exactly the dict kimi_linear.quant_predicate returns
MAX_SHARD_BYTES = 5 << 30  # mlx-lm's make_shards default (5 GB)
# official per-expert placement -> the placement of mlx-lm's stacked tensor holding it
_STACKED = {"gate": "gate_all", "up": "up_all", "down": "copy"}


def mlx_name(target: str, placement: str = "copy") -> str:
    """kimi-lm parameter name -> the mlx-lm tensor name holding it (for ``gate_up_proj``: its gate_all / up_all half)."""
    return next(n for n, p in names.to_checkpoint(target, names.KIMI_LINEAR, names.MLX) if p in (placement, "conv"))


def official_name(target: str, placement: str = "copy", expert: int = 0) -> str:
    """kimi-lm parameter name -> official checkpoint name (for stacked experts: expert ``expert``'s gate/up/down)."""
    name = next(n for n, p in names.to_checkpoint(target, names.KIMI_LINEAR, names.HF) if p == placement)
    return name.format(E=expert)


@dataclass
class _Group:
    """One MLX float tensor (a module's weight, or a plain tensor) and how to build it from the source files."""

    name: str  # MLX tensor name
    dtype: torch.dtype
    shape: list[int]
    build: Callable[[], torch.Tensor]
    spec: QuantSpec | None = None
    override: bool = False  # recorded per module in config["quantization"]
    target: str | None = None  # kimi-lm parameter it holds (None: half of kv_b_proj)
    entries: dict = field(default_factory=dict)  # output name -> (dtype, shape)


def _quantizable(name: str, shape: list[int]) -> bool:
    """Modules with mlx ``to_quantized``: Linear / Embedding / SwitchLinear / MultiLinear weights (≥ 2-D ``.weight``,
    not the Conv1d under ``.conv``); norms are 1-D, A_log / dt_bias / the correction bias are not ``.weight``, and a
    one-row weight [1, hidden] is a vector the model reads directly (an AttnRes pseudo-query), not a matrix."""
    return (name.endswith(".weight") and len(shape) >= 2 and not name.endswith(".conv.weight")
            and not (len(shape) == 2 and shape[0] == 1))


def _groups(src: Path, config, files: dict[str, Path], shard) -> list[_Group]:
    """Every MLX float tensor of the converted model, with a builder that reads only the source tensors it needs."""
    by_target: dict[str, list] = {}
    experts: dict[tuple[str, str], dict[int, str]] = {}
    for name in sorted(files):
        if names.skipped(name, config) or (config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        if name.endswith(".scales") or ".switch_mlp." in name or ".embed_q." in name or ".unembed_out." in name:
            raise CheckpointError(f"{files[name]}: tensor {name!r} is already in the MLX layout; --quantize reads an "
                                  f"official float checkpoint (use --dequantize first)")
        target, placement, expert = names.to_parameter(name, names.KIMI_LINEAR)
        if placement in names.PER_EXPERT:
            experts.setdefault((target, placement), {})[expert] = name
        else:
            by_target[name] = [target, placement]

    def read(name: str) -> torch.Tensor:
        return shard(files[name]).read(name)

    groups = []
    for name, (target, placement) in by_target.items():
        dtype, shape = ST_DTYPES.get(shard(files[name]).dtype(name)), shard(files[name]).shape(name)
        if dtype is None or not (dtype.is_floating_point and dtype.itemsize >= 2):
            raise CheckpointError(f"{files[name]}: tensor {name!r} has dtype {shard(files[name]).dtype(name)}; "
                                  f"--quantize needs a float (F32, BF16 or F16) checkpoint")
        if target.endswith(".self_attn.kv_b_proj.weight"):
            H, nope, v = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim
            if shape != [H * (nope + v), config.kv_lora_rank]:
                raise CheckpointError(f"{files[name]}: tensor {name!r} has shape {shape}, expected "
                                      f"{[H * (nope + v), config.kv_lora_rank]}")
            base = target.removesuffix(".kv_b_proj.weight")

            def kvb(part, name=name, H=H, nope=nope):
                w = read(name).view(H, -1, config.kv_lora_rank)  # per head: k_nope rows, then v rows
                return (w[:, :nope].transpose(1, 2) if part == "q" else w[:, nope:]).contiguous()

            groups.append(_Group(mlx_name(f"{base}.kv_b_proj.embed_q.weight"), dtype, [H, config.kv_lora_rank, nope],
                                 lambda f=kvb: f("q")))
            groups.append(_Group(mlx_name(f"{base}.kv_b_proj.unembed_out.weight"), dtype, [H, v, config.kv_lora_rank],
                                 lambda f=kvb: f("v")))
        elif target.endswith("_conv1d.weight"):
            if len(shape) != 3:
                raise CheckpointError(f"{files[name]}: tensor {name!r} has shape {shape}, expected [D, 1, W]")
            groups.append(_Group(mlx_name(target), dtype, [shape[0], shape[2], shape[1]],
                                 lambda name=name: read(name).transpose(1, 2).contiguous(), target=target))
        else:
            groups.append(_Group(mlx_name(target), dtype, shape, lambda name=name: read(name), target=target))
    for (target, placement), by_expert in sorted(experts.items()):
        n = 1 + max(by_expert)
        missing = sorted(set(range(n)) - set(by_expert))
        if missing or n != config.num_experts:
            raise CheckpointError(f"{src}: {target} ({placement}) has experts {sorted(by_expert)[:4]}..., expected "
                                  f"0..{config.num_experts - 1}" + (f"; missing {missing[:8]}" if missing else ""))
        first = by_expert[0]
        dtype, shape = ST_DTYPES[shard(files[first]).dtype(first)], shard(files[first]).shape(first)
        groups.append(_Group(mlx_name(target, _STACKED[placement]), dtype, [n, *shape],
                             lambda got=by_expert, n=n: torch.stack([read(got[e]) for e in range(n)]), target=target))
    for g in groups:  # the loader's table must read every MLX name back to the parameter it was made from
        back = names.to_parameter(g.name, names.KIMI_LINEAR)[0]
        if g.target is not None and back != g.target:
            raise AssertionError(f"MLX name {g.name} maps back to {back}, not {g.target}")  # a bug here, not the input
    return sorted(groups, key=lambda g: g.name)


def _plan_quant(groups: list[_Group], spec: QuantSpec) -> dict:
    """mlx-lm's ``quantize_model`` decisions; returns the config ``quantization`` block it would write."""
    block = spec.to_dict()
    router = QuantSpec.from_dict(ROUTER_OVERRIDE, "router")
    for g in groups:
        module = g.name.removesuffix(".weight")
        # mlx-lm tests divisibility against the global group size, before asking quant_predicate
        if _quantizable(g.name, g.shape) and g.shape[-1] % spec.group_size == 0:
            if module.endswith("mlp.gate"):
                if g.shape[-1] % router.group_size:
                    raise CheckpointError(f"{module}: router input width {g.shape[-1]} is not a multiple of 64, the "
                                          f"group size mlx-lm quantizes routers with")
                g.spec, g.override = router, True
                block[module] = dict(ROUTER_OVERRIDE)
            else:
                g.spec = spec
        if g.spec is None:
            g.entries = {g.name: (g.dtype, g.shape)}
        else:
            *lead, K = g.shape
            s = g.spec
            g.entries = {f"{module}.weight": (torch.uint32, [*lead, K * s.bits // 32]),
                         f"{module}.scales": (g.dtype if s.has_biases else torch.uint8, [*lead, K // s.group_size])}
            if s.has_biases:
                g.entries[f"{module}.biases"] = (g.dtype, [*lead, K // s.group_size])
    return block


def _nbytes(entry) -> int:
    dtype, shape = entry
    n = dtype.itemsize
    for d in shape:
        n *= d
    return n


def finish_float_copy(src: Path, tmp: Path, dtype: torch.dtype, progress: bool) -> str:
    """The rest of a dequantized copy of ``src`` in ``tmp``: config.json without its quantization blocks and with the
    new dtype, every other file, SHA256SUMS (``kimi-lm verify DST`` or ``sha256sum -c`` checks the copy)."""
    raw = json.loads((src / "config.json").read_text())
    raw.pop("quantization", None)
    raw.pop("quantization_config", None)
    dtype_name = str(dtype).removeprefix("torch.")
    for key in [k for k in ("torch_dtype", "dtype") if k in raw] or ["torch_dtype"]:
        raw[key] = dtype_name
    (tmp / "config.json").write_text(json.dumps(raw, indent=2))
    copy_extras(src, tmp)
    write_sums(tmp, progress=progress)
    return dtype_name


def copy_extras(src: Path, tmp: Path) -> None:
    """Every file of a checkpoint but its weights, index, config and sums (tokenizer, chat template, remote code)."""
    for item in src.iterdir():  # tokenizer, chat template, generation config, remote code ...
        if item.name in ("config.json", INDEX, SUMS) or item.suffix == ".safetensors":
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)


def _atomic_dir(dst: Path):
    if dst.exists():
        raise CheckpointError(f"{dst}: already exists; choose a new output directory")
    return atomic_dir(dst)


def _check_source(src: Path):
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a checkpoint directory (expected a folder with config.json and *.safetensors)")
    config = load_config(src / "config.json")
    if not isinstance(config, KimiLinearConfig):
        raise CheckpointError(f"{src / 'config.json'}: model_type {config.model_type!r}; the MLX layout conversion "
                              f"supports kimi_linear only")
    return config


def quantize_to_mlx(src, dst, spec: QuantSpec, progress: bool = True, max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Official float Kimi Linear checkpoint ``src`` -> mlx-lm quantized layout in ``dst`` (must not exist)."""
    src, dst = Path(src), Path(dst)
    config = _check_source(src)
    raw = json.loads((src / "config.json").read_text())
    if raw.get("quantization") or raw.get("quantization_config"):
        raise CheckpointError(f"{src / 'config.json'}: the checkpoint is already quantized "
                              f"({'quantization' if raw.get('quantization') else 'quantization_config'}); "
                              f"--quantize needs float weights (run --dequantize first)")
    files = weight_files(src)
    report = {"quantized": 0, "float": 0, "params": 0, "bytes": 0, "errors": []}
    with contextlib.ExitStack() as stack, _atomic_dir(dst) as tmp:
        opened: dict[Path, SafetensorsFile] = {}

        def shard(path: Path) -> SafetensorsFile:
            if path not in opened:
                opened[path] = stack.enter_context(SafetensorsFile(path))
            return opened[path]

        groups = _groups(src, config, files, shard)  # every header checked before anything is written
        block = _plan_quant(groups, spec)
        # a module's parts stay together in one shard
        shards = plan_shards(groups, lambda g: sum(_nbytes(e) for e in g.entries.values()), max_shard_bytes)
        fmt = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        owner = {name: g for g in groups for name in g.entries}
        cache: dict[str, dict] = {}  # the module being written: its weight, scales and biases come from one quantize
        bar = tqdm(total=len(groups), desc="quantize", unit="tensor", disable=not progress)

        def produce(name: str) -> torch.Tensor:
            g = owner[name]
            if g.name not in cache:
                cache.clear()
                w = g.build()
                if g.spec is None:
                    cache[g.name] = {g.name: w}
                else:
                    parts = g.spec.quantize(w)
                    module = g.name.removesuffix(".weight")
                    cache[g.name] = dict(zip([f"{module}.{p}" for p in ("weight", "scales", "biases")], parts))
                    deq = g.spec.dequantize(*parts[:2], parts[2] if len(parts) > 2 else None, torch.float32)
                    err = ((deq - w.float()).norm() / w.float().norm().clamp_min(1e-30)).item()
                    report["errors"].append((err, module, f"{g.spec.mode} {g.spec.bits}-bit g{g.spec.group_size}"))
                report["quantized" if g.spec else "float"] += 1
                report["params"] += w.numel()
                bar.update(1)
            return cache[g.name].pop(name)

        weight_map = {}
        for i, part in enumerate(shards):
            file = fmt.format(i + 1, len(shards))
            entries = {name: e for g in part for name, e in g.entries.items()}
            report["bytes"] += write_safetensors(tmp / file, entries, produce, metadata={"format": "mlx"})
            weight_map.update({name: file for name in entries})
        bar.close()
        index = {"metadata": {"total_size": report["bytes"], "total_parameters": report["params"]},
                 "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX).write_text(json.dumps(index, indent=4))
        raw["quantization"] = block
        raw["quantization_config"] = block  # mlx-lm writes both (hf model tree #957)
        raw.pop("_name_or_path", None)
        (tmp / "config.json").write_text(json.dumps(dict(sorted(raw.items())), indent=4))
        copy_extras(src, tmp)
        write_sums(tmp, progress=progress)
    errors = sorted(report.pop("errors"), reverse=True)
    return {"src": str(src), "dst": str(dst), "mode": spec.mode, "bits": spec.bits, "group_size": spec.group_size,
            "quantized_tensors": report["quantized"], "float_tensors": report["float"], "shards": len(shards),
            "parameters": report["params"], "bytes": report["bytes"],
            "bits_per_weight": round(8 * report["bytes"] / max(report["params"], 1), 4),
            "worst_relative_errors": [{"tensor": m, "format": f, "rel_err": round(e, 6)} for e, m, f in errors[:10]]}


def dequantize_from_mlx(src, dst, dtype: torch.dtype = torch.bfloat16, progress: bool = True) -> dict:
    """MLX-layout Kimi Linear checkpoint ``src`` (packed or float) -> official float layout in ``dst``."""
    src, dst = Path(src), Path(dst)
    config = _check_source(src)
    files = {n: f for n, f in weight_files(src).items() if not names.skipped(n, config)}
    targets = {name: names.to_parameter(name, names.KIMI_LINEAR) for name in files}
    with torch.device("meta"):
        float_state = _model_class(config)(config).state_dict()
    specs = mlx_load.mlx_specs(src, config, float_state, targets, files,  # the loader's reading of the quantization block
                               lambda f: SafetensorsFile(f).header)
    plan: dict[str, tuple] = {}  # official name -> ((dtype, shape), source shard, builder)
    n_packed = 0
    with contextlib.ExitStack() as stack, _atomic_dir(dst) as tmp:
        opened: dict[Path, SafetensorsFile] = {}
        cache: dict[str, torch.Tensor] = {}

        def shard(path: Path) -> SafetensorsFile:
            if path not in opened:
                opened[path] = stack.enter_context(SafetensorsFile(path))
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
                    plan[official_name(target, per_expert, e)] = (
                        (out_dtype, shape), files[name], lambda name=name, e=e: dense(name)[e].clone())
            elif ".kv_b_proj.embed_q." in target:
                base = target.split(".embed_q.")[0]
                q_name, v_name = name, name.replace(".embed_q.", ".unembed_out.")
                if v_name not in files:
                    raise CheckpointError(f"{files[name]}: tensor {name!r} has no {v_name!r} to rebuild kv_b_proj")
                kv_dtype = dtype if packed or f"{v_name.removesuffix('.weight')}.scales" in files else out_dtype
                plan[f"{base}.weight"] = ((kv_dtype, list(float_state[f"{base}.weight"].shape)), files[name],
                                          lambda q=q_name, v=v_name, kd=kv_dtype: torch.cat(
                                              [dense(q).transpose(1, 2).to(kd), dense(v).to(kd)], dim=1
                                          ).reshape(-1, config.kv_lora_rank))
            elif ".kv_b_proj.unembed_out." in target:
                continue  # joined with embed_q above
            elif placement == "conv":
                f = shard(files[name])
                D, W, one = f.shape(name)
                plan[target] = ((out_dtype, [D, one, W]), files[name],
                                lambda name=name: dense(name).transpose(1, 2).contiguous())
            else:
                plan[target] = ((out_dtype, list(ref.shape) if ref is not None else shard(files[name]).shape(name)),
                                files[name], lambda name=name: dense(name))
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
