"""Checkpoints from the official layout into mlx-lm's (quantized) layout, tensor by tensor.

    quantize_to_mlx(src, dst, QuantSpec(...))   official Kimi Linear / K3 (bf16/fp32, or K3's MXFP4 release) ->
                                                what ``mlx_lm.convert -q`` writes
    quantize_to_mlx(src, dst, None)             (``convert --to-mlx``) a compressed-tensors checkpoint (Kimi
                                                K2-Thinking / K2.5 INT4, K3 MXFP4) -> mlx-lm's layout with its packed
                                                experts re-interpreted byte for byte, everything else float as stored
    quant.mlx_dequant.dequantize_from_mlx       the way back: MLX layout -> official float layout

compressed-tensors experts are never requantized when their packing is an MLX mode: ``pack-quantized`` int4 is MLX
affine 4-bit group 32 with biases −8·scale, ``mxfp4-pack-quantized`` is MLX mxfp4 (``compressed_tensors.packed_parts``);
they are recorded in the ``quantization`` block per module when they differ from the global mode. A ``--quantize``
to another mode dequantizes them exactly first. Vision tensors of a wrapper (K3, K2.5) are dropped, as mlx-lm does;
K3 gets mlx-lm's ``kimi_k3`` layout (KDA q/k/v and convs fused, ``A_log`` at ``num_heads``), tensor for tensor what
``mlx_lm.convert`` writes.

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

Reference: mlx-lm 0.32.2 ``utils.quantize_model`` / ``save_model`` / ``save_config``, ``models/kimi_linear.py``,
``kimi_k3.py``, ``deepseek_v3.py`` (``sanitize``, ``quant_predicate``), ``models/mla.py``; spec
``kimi_k2_and_quantization.md`` §5–§6, ``kimi_k3_and_int4.md`` §A4, §B.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from kimi_lm import names
from kimi_lm.checkpoint import SafetensorsFile, ST_DTYPES, plan_shards, weight_files, write_safetensors
from kimi_lm.config import KimiLinearConfig, load_config
from kimi_lm.errors import CheckpointError
from kimi_lm.files import atomic_dir
from kimi_lm.quant import compressed_tensors as ct
from kimi_lm.quant.packed import QuantSpec
from kimi_lm.verify import SUMS, write_sums

INDEX = "model.safetensors.index.json"
ROUTER_OVERRIDE = {"group_size": 64, "bits": 8}  # exactly the dict kimi_linear.quant_predicate returns
MAX_SHARD_BYTES = 5 << 30  # mlx-lm's make_shards default (5 GB)
# official per-expert placement -> the placement of mlx-lm's stacked tensor holding it
_STACKED = {"gate": "gate_all", "up": "up_all", "down": "copy"}


def mlx_name(target: str, placement: str = "copy", fam: str = names.KIMI_LINEAR) -> str:
    """kimi-lm parameter name -> the mlx-lm tensor name holding it (for ``gate_up_proj``: its gate_all / up_all half)."""
    return next(n for n, p in names.to_checkpoint(target, fam, names.MLX) if p in (placement, "conv"))


def official_name(target: str, placement: str = "copy", expert: int = 0, fam: str = names.KIMI_LINEAR) -> str:
    """kimi-lm parameter name -> official checkpoint name (for stacked experts: expert ``expert``'s gate/up/down)."""
    name = next(n for n, p in names.to_checkpoint(target, fam, names.HF) if p == placement)
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
    packed: Callable[[], tuple] | None = None  # already packed in the source: (weight, scales[, biases]) as they are


def _quantizable(name: str, shape: list[int]) -> bool:
    """Modules with mlx ``to_quantized``: Linear / Embedding / SwitchLinear / MultiLinear weights (≥ 2-D ``.weight``,
    not the Conv1d under ``.conv``); norms are 1-D, A_log / dt_bias / the correction bias are not ``.weight``, and a
    one-row weight [1, hidden] is a vector the model reads directly (an AttnRes pseudo-query), not a matrix."""
    return (name.endswith(".weight") and len(shape) >= 2 and not name.endswith(".conv.weight")
            and not (len(shape) == 2 and shape[0] == 1))


def _packed_group(name: str, by_expert: list[str] | None, files: dict, shard, fam: str) -> _Group:
    """A compressed-tensors packed weight (one Linear ``name``, or the experts ``by_expert`` stacked into ``name``) as
    a group already packed; ``build`` is its exact float value (for a ``--quantize`` to another mode)."""
    sources = by_expert or [name]
    spec, shape, _ = ct.packed_parts(sources[0], files, shard)  # checks the first; each is checked as it is read
    lead = [len(sources)] if by_expert else []

    def parts(sources=sources, lead=lead):
        got = [ct.packed_parts(n, files, shard) for n in sources]
        if any(g[0] != spec or g[1] != shape for g in got):
            bad = next(n for n, g in zip(sources, got) if g[0] != spec or g[1] != shape)
            raise CheckpointError(f"{files[bad]}: tensor {bad!r} is packed as {got[sources.index(bad)][:2]}, unlike "
                                  f"{sources[0]!r} ({spec}, {shape}) beside it")
        return tuple(torch.stack([g[2][i] for g in got]) if lead else got[0][2][i] for i in range(len(got[0][2])))

    scale_dtype = ST_DTYPES[shard(files[sources[0].removesuffix(ct.PACKED) + ct.SCALE]).dtype(
        sources[0].removesuffix(ct.PACKED) + ct.SCALE)]
    def dense():
        got = parts()
        return spec.dequantize(got[0], got[1], got[2] if spec.has_biases else None, torch.float32)

    return _Group(name, scale_dtype if spec.has_biases else torch.bfloat16, [*lead, *shape], dense, spec=spec,
                  packed=parts)


def _groups(src: Path, config, files: dict[str, Path], shard) -> list[_Group]:
    """Every MLX float tensor of the converted model, with a builder that reads only the source tensors it needs."""
    fam = names.family(config)
    by_target: dict[str, list] = {}
    experts: dict[tuple[str, str], dict[int, str]] = {}
    for name in sorted(files):
        if names.skipped(name, config) or (config.tie_word_embeddings and name.endswith("lm_head.weight")):
            continue
        if name.endswith(".scales") or ".switch_mlp." in name or ".embed_q." in name or ".unembed_out." in name:
            raise CheckpointError(f"{files[name]}: tensor {name!r} is already in the MLX layout; --quantize reads an "
                                  f"official float checkpoint (use --dequantize first)")
        if name.endswith((f".{ct.SCALE}", f".{ct.SHAPE}")):
            continue  # read with their weight_packed
        target, placement, expert = names.to_parameter(name, fam)
        if placement in names.PER_EXPERT:
            experts.setdefault((target, placement), {})[expert] = name
        else:
            by_target[name] = [target, placement]

    def read(name: str) -> torch.Tensor:
        return shard(files[name]).read(name)

    groups = []
    for name, (target, placement) in by_target.items():
        if name.endswith(f".{ct.PACKED}"):  # a packed Linear other than an expert
            groups.append(_packed_group(name, None, files, shard, fam))
            groups[-1].name, groups[-1].target = mlx_name(target, fam=fam), target
            continue
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

            groups.append(_Group(mlx_name(f"{base}.kv_b_proj.embed_q.weight", fam=fam), dtype, [H, config.kv_lora_rank, nope],
                                 lambda f=kvb: f("q")))
            groups.append(_Group(mlx_name(f"{base}.kv_b_proj.unembed_out.weight", fam=fam), dtype, [H, v, config.kv_lora_rank],
                                 lambda f=kvb: f("v")))
        elif target.endswith("_conv1d.weight"):
            if len(shape) != 3:
                raise CheckpointError(f"{files[name]}: tensor {name!r} has shape {shape}, expected [D, 1, W]")
            groups.append(_Group(mlx_name(target, fam=fam), dtype, [shape[0], shape[2], shape[1]],
                                 lambda name=name: read(name).transpose(1, 2).contiguous(), target=target))
        else:
            groups.append(_Group(mlx_name(target, fam=fam), dtype, shape, lambda name=name: read(name), target=target))
    for (target, placement), by_expert in sorted(experts.items()):
        n = 1 + max(by_expert)
        missing = sorted(set(range(n)) - set(by_expert))
        n_experts = getattr(config, "num_experts", None) or config.n_routed_experts
        if missing or n != n_experts:
            raise CheckpointError(f"{src}: {target} ({placement}) has experts {sorted(by_expert)[:4]}..., expected "
                                  f"0..{n_experts - 1}" + (f"; missing {missing[:8]}" if missing else ""))
        first = by_expert[0]
        if first.endswith(f".{ct.PACKED}"):
            groups.append(_packed_group(mlx_name(target, _STACKED[placement], fam), [by_expert[e] for e in range(n)],
                                        files, shard, fam))
            groups[-1].target = target
            continue
        dtype, shape = ST_DTYPES[shard(files[first]).dtype(first)], shard(files[first]).shape(first)
        groups.append(_Group(mlx_name(target, _STACKED[placement], fam), dtype, [n, *shape],
                             lambda got=by_expert, n=n: torch.stack([read(got[e]) for e in range(n)]), target=target))
    for g in groups:  # the loader's table must read every MLX name back to the parameter it was made from
        back = names.to_parameter(g.name, fam)[0]
        if g.target is not None and back != g.target:
            raise AssertionError(f"MLX name {g.name} maps back to {back}, not {g.target}")  # a bug here, not the input
    if config.model_type == names.KIMI_K3:
        groups = _as_mlx_k3(groups, config)
    return sorted(groups, key=lambda g: g.name)


def _as_mlx_k3(groups: list[_Group], config) -> list[_Group]:
    """mlx-lm's ``kimi_k3.sanitize`` layout: each KDA layer's q/k/v projections and convolutions fused along their
    output rows (``qkv_proj``, ``qkv_conv``), ``A_log`` cut to its ``num_heads`` used values (the loader pads it
    back, ``mlx_load.pad_a_log``)."""
    by_name, out, fused = {g.name: g for g in groups}, [], {}
    for g in groups:
        if (name := names.fused_name(g.name)) is not None and g.packed is None:
            fused.setdefault(name, []).append(g)
        elif g.name.endswith(".self_attn.A_log") and g.shape == [config.kda_head_dim] != [config.kda_num_heads]:
            H = config.kda_num_heads
            out.append(_Group(g.name, g.dtype, [H], lambda b=g.build, H=H: b()[:H].contiguous(), target=None))
        else:
            out.append(g)
    for name, parts in fused.items():
        parts = [by_name[p] for p in names.fused_parts(name)]  # q, k, v
        shape = [sum(p.shape[0] for p in parts), *parts[0].shape[1:]]
        out.append(_Group(name, parts[0].dtype, shape, lambda ps=parts: torch.cat([p.build() for p in ps])))
    return out


def _plan_quant(groups: list[_Group], spec: QuantSpec | None) -> dict | None:
    """mlx-lm's ``quantize_model`` decisions; returns the config ``quantization`` block it would write. ``spec`` None:
    nothing is quantized, packed source weights stay as they are (the block: their mode, or None without any)."""
    if spec is not None:  # packed source weights of another mode: dequantized (exactly), then quantized as the rest
        for g in groups:
            if g.packed is not None and g.spec != spec:
                g.packed = g.spec = None
    kept = [g for g in groups if g.packed is not None]
    block = (spec or (kept[0].spec if kept else None))
    block = None if block is None else block.to_dict()
    router = QuantSpec.from_dict(ROUTER_OVERRIDE, "router")
    for g in groups:
        module = g.name.removesuffix(".weight")
        if g.packed is not None:
            if g.spec.to_dict() != block:
                g.override, block[module] = True, g.spec.to_dict()
        # mlx-lm tests divisibility against the global group size, before asking quant_predicate
        elif spec is not None and _quantizable(g.name, g.shape) and g.shape[-1] % spec.group_size == 0:
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
    dtype_name = str(dtype).removeprefix("torch.")
    for d in (raw, raw.get("text_config")):  # a wrapper (K3, K2.5) nests its text model's quantization_config
        if isinstance(d, dict):
            d.pop("quantization", None)
            d.pop("quantization_config", None)
            for key in [k for k in ("torch_dtype", "dtype") if k in d] or (["torch_dtype"] if d is raw else []):
                d[key] = dtype_name
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


def _check_source(src: Path, spec: QuantSpec | None):
    """The source's config; what --quantize / --to-mlx accept: float Kimi Linear / K3 (``--quantize``), anything a
    compressed-tensors config packs (K2-Thinking, K2.5, K3), never an MLX-layout or FP8 checkpoint."""
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a checkpoint directory (expected a folder with config.json and *.safetensors)")
    config = load_config(src / "config.json")
    raw = json.loads((src / "config.json").read_text())
    q = raw.get("quantization_config") or raw.get("text_config", {}).get("quantization_config")
    if raw.get("quantization") or (q and (not isinstance(q, dict) or q.get("quant_method") != "compressed-tensors")):
        raise CheckpointError(f"{src / 'config.json'}: the checkpoint is already quantized "
                              f"({'quantization' if raw.get('quantization') else 'quantization_config'}); "
                              f"--quantize / --to-mlx need float or compressed-tensors weights (run --dequantize first)")
    if q:
        ct.parse(q, str(src / "config.json"))
    if spec is not None and not isinstance(config, KimiLinearConfig):
        raise CheckpointError(f"{src / 'config.json'}: model_type {config.model_type!r}; --quantize follows mlx-lm's "
                              f"quantization policy of kimi_linear / kimi_k3 only (for a K2-Thinking / K2.5 INT4 "
                              f"checkpoint use --to-mlx: its experts re-interpreted, the rest float)")
    return config, raw


def _mlx_config(raw: dict, block: dict | None) -> dict:
    """config.json of the output: the source's, its compressed-tensors block replaced by mlx-lm's ``quantization``
    (also written as ``quantization_config``, as mlx-lm does); keys sorted as ``mlx_lm.utils.save_config`` writes."""
    raw = json.loads(json.dumps(raw))
    raw.pop("quantization_config", None)
    raw.pop("_name_or_path", None)
    if isinstance(raw.get("text_config"), dict):
        raw["text_config"].pop("quantization_config", None)
    if block is not None:
        raw["quantization"] = block
        raw["quantization_config"] = block  # mlx-lm writes both (hf model tree #957)
    return dict(sorted(raw.items()))


def quantize_to_mlx(src, dst, spec: QuantSpec | None, progress: bool = True,
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> dict:
    """Official checkpoint ``src`` -> mlx-lm layout in ``dst`` (must not exist): float modules quantized by ``spec``
    (mlx-lm's policy), compressed-tensors packed experts kept as they are (see the module docstring)."""
    src, dst = Path(src), Path(dst)
    config, raw = _check_source(src, spec)
    files = weight_files(src)
    report = {"quantized": 0, "reinterpreted": 0, "float": 0, "params": 0, "bytes": 0, "errors": []}
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
        bar = tqdm(total=len(groups), desc="quantize" if spec else "to-mlx", unit="tensor", disable=not progress)

        def produce(name: str) -> torch.Tensor:
            g = owner[name]
            if g.name not in cache:
                cache.clear()
                module = g.name.removesuffix(".weight")
                if g.packed is not None:  # the source's bytes, re-interpreted
                    cache[g.name] = dict(zip([f"{module}.{p}" for p in ("weight", "scales", "biases")], g.packed()))
                    report["reinterpreted"] += 1
                    report["params"] += math.prod(g.shape)
                    bar.update(1)
                    return cache[g.name].pop(name)
                w = g.build()
                if g.spec is None:
                    cache[g.name] = {g.name: w.to(g.dtype)}
                else:
                    parts = [p.to(dt) for p, (dt, _) in zip(g.spec.quantize(w), g.entries.values())]
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
        (tmp / "config.json").write_text(json.dumps(_mlx_config(raw, block), indent=4))
        copy_extras(src, tmp)
        write_sums(tmp, progress=progress)
    errors = sorted(report.pop("errors"), reverse=True)
    head = block or {}
    return {"src": str(src), "dst": str(dst), "mode": head.get("mode"), "bits": head.get("bits"),
            "group_size": head.get("group_size"), "quantized_tensors": report["quantized"],
            "reinterpreted_tensors": report["reinterpreted"], "float_tensors": report["float"], "shards": len(shards),
            "parameters": report["params"], "bytes": report["bytes"],
            "bits_per_weight": round(8 * report["bytes"] / max(report["params"], 1), 4),
            "worst_relative_errors": [{"tensor": m, "format": f, "rel_err": round(e, 6)} for e, m, f in errors[:10]]}
