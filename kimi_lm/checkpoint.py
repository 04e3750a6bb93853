"""Checkpoint loading: config.json + safetensors (single file or shards with an index) -> model.

The model class follows ``model_type`` (Kimi Linear, or Kimi K2 / DeepSeek-V3). It is built on the meta device.
With ``mmap`` (the default on CPU) each shard is memory-mapped and every tensor the model keeps as stored (packed
codes and scales, floats at the compute dtype) is a view of the file's pages (``kimi_lm.mapped``): nothing is read
at load, pages come in as a forward pass first touches them and stay shared with the page cache, so a model larger
than RAM runs, paged. Tensors that need a conversion, and every tensor without ``mmap``, are read once, straight
from the file into their final memory with plain reads. Only safetensors are read: nothing is ever unpickled and no
checkpoint code is executed.

Names: checkpoint tensor names become parameter names through ``kimi_lm.names`` (one declarative table, shared
with the writers): per-expert matrices (Kimi Linear ``w1/w3/w2``, K2 ``gate_proj/up_proj/down_proj``, with their FP8
scales; mlx-lm's ``switch_mlp``) are stacked into ``gate_up_proj`` / ``down_proj``, and ``names.SKIP`` lists what is
dropped (``rotary_emb.inv_freq``, multi-token-prediction layers).

FP8 block checkpoints (``quantization_config.quant_method`` ``fp8``): a module is quantized iff the checkpoint has a
``weight_scale_inv`` for it; those modules are swapped for ``kimi_lm.quant.fp8_block`` ones before loading, and their
fp8 weights are kept as they are. compressed-tensors checkpoints (K2-Thinking / K2.5 INT4, K3's MXFP4 experts) and
MLX ones keep their packed bytes (``quant.compressed_tensors``, ``quant.mlx_load``; mlx-lm's fused K3 q/k/v are read
as three row ranges). A module stored twice (float and packed) is refused. Every problem raises ``CheckpointError``
naming the file, tensor or key, what was expected and what was found; a partial load is never returned.

Reference: safetensors format (8-byte little-endian header length, JSON header, raw little-endian data);
spec ``kimi_k2_and_quantization.md`` §2.6 (K2 tensor names) and §4 (FP8 layout).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from kimi_lm import mapped, names
from kimi_lm.config import KimiK2Config, load_config
from kimi_lm.errors import CheckpointError
from kimi_lm.cpu import malloc
from kimi_lm.quant import compressed_tensors
from kimi_lm.quant.fp8_block import FP8, quantize_modules
from kimi_lm.quant import mlx_load
from kimi_lm.quant.packed import swap_modules

# Kept in fp32 whatever the model dtype: they feed exp() / selection / dequantization and are tiny (spec §8.3).
FP32_SUFFIXES = ("A_log", "dt_bias", "e_score_correction_bias", "_scale_inv")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_KEEP_DTYPES = (FP8, torch.uint32, torch.uint8)  # stored as read: fp8 blocks, MLX packed codes and E8M0 scales
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# safetensors dtype codes
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "U32": torch.uint32, "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
log = logging.getLogger(__name__)


def resolve_dtype(dtype, config) -> torch.dtype:
    if dtype is None or dtype == "auto":
        dtype = config.dtype or "bfloat16"
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"dtype {dtype!r} is not supported; expected one of {list(_DTYPE_NAMES)} or 'auto'")
        dtype = _DTYPE_NAMES[dtype]
    if dtype not in _FLOAT_DTYPES:
        raise CheckpointError(f"dtype {dtype} is not supported; expected torch.float32, torch.bfloat16 or torch.float16")
    return dtype


class SafetensorsFile:
    """The header of one ``.safetensors`` file, and reads of its tensors into memory the caller owns."""

    def __init__(self, path: Path, mmap: bool = False):
        self.path, self.mmap = Path(path), mmap
        self._fh = self._mapping = None
        size = self.path.stat().st_size
        try:
            with open(self.path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if not 0 < n <= size - 8:
                    raise ValueError(f"header length {n} does not fit a file of {size} bytes")
                header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            spans = []
            for name, info in header.items():
                if info["dtype"] not in ST_DTYPES:
                    raise ValueError(f"tensor {name!r} has unknown dtype {info['dtype']!r}")
                begin, end = (int(x) for x in info["data_offsets"])
                nbytes = ST_DTYPES[info["dtype"]].itemsize * _numel(info["shape"])
                if not 0 <= begin <= end <= size - 8 - n or end - begin != nbytes:
                    raise ValueError(f"tensor {name!r} has data offsets {[begin, end]} that do not fit its shape and the file")
                spans.append((begin, end, name))
            # The data must be exactly the tensors back to back: an overlap means two tensors share bytes, a gap
            # means bytes nobody accounts for (both signs of a corrupt or hand-crafted file).
            pos = 0
            for begin, end, name in sorted(spans):
                if begin != pos:
                    raise ValueError(f"tensor {name!r} starts at byte {begin}, expected {pos} (overlap or gap)")
                pos = end
            if pos != size - 8 - n:
                raise ValueError(f"tensor data ends at byte {pos} but the file holds {size - 8 - n} data bytes")
        except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise CheckpointError(f"{self.path}: not a valid safetensors file ({exc})") from None
        self.header, self.data_start, self.size = header, 8 + n, size

    def __enter__(self) -> "SafetensorsFile":
        self._fh = open(self.path, "rb", buffering=0)
        if self.mmap:
            try:
                self._mapping = mapped.Mapping(self.path, self.size)
            except (OSError, ValueError) as exc:
                self._fh.close()
                raise CheckpointError(f"{self.path}: cannot be memory-mapped ({exc}); load with mmap=False") from None
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()
        if self._mapping is not None:
            self._mapping.close()  # tensors mapped from the file keep their mappings
        self._fh = self._mapping = None

    def keys(self) -> list[str]:
        return list(self.header)

    def dtype(self, name: str) -> str:
        return self.header[name]["dtype"]

    def shape(self, name: str) -> list[int]:
        return list(self.header[name]["shape"])

    def _span(self, name: str, rows: tuple[int, int] | None) -> tuple[int, int]:
        """Data offsets of tensor ``name``, or of its ``rows`` = (first, count) along dim 0 (contiguous in the file)."""
        begin, end = self.header[name]["data_offsets"]
        if rows is not None:
            per_row = (end - begin) // self.shape(name)[0]
            begin, end = begin + rows[0] * per_row, begin + (rows[0] + rows[1]) * per_row
        return begin, end

    def read_into(self, name: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Fill ``out`` (contiguous, CPU, the file's dtype and shape) with tensor ``name``'s bytes; ``rows`` = (first,
        count): only those entries along dim 0 (``out`` shaped so), the others' bytes never read."""
        begin, end = self._span(name, rows)
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        self._fh.seek(self.data_start + begin)
        got = 0
        while got < end - begin:
            n = self._fh.readinto(buf[got:])
            if not n:
                raise CheckpointError(f"{self.path}: tensor {name!r} is truncated ({got} of {end - begin} bytes)")
            got += n
        return out

    def read(self, name: str, mapped: bool = False, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` (``rows``: its entries [first, first + count) along dim 0) in memory of its own; ``mapped``
        (in a file opened with ``mmap``): a view of the file's pages instead, unless not aligned for its dtype."""
        dtype = self.dtype(name)
        if dtype not in ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {dtype}, which kimi-lm cannot read")
        shape = self.shape(name) if rows is None else [rows[1], *self.shape(name)[1:]]
        if mapped and self._mapping is not None:
            begin, end = self._span(name, rows)
            t = self._mapping.view(self.data_start + begin, end - begin, ST_DTYPES[dtype], shape)
            if t is not None:
                return t
        return self.read_into(name, torch.empty(shape, dtype=ST_DTYPES[dtype]), rows)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def plan_shards(items: list, nbytes, max_bytes: int) -> list[list]:
    """Consecutive runs of ``items``, each at most ``max_bytes`` by ``nbytes(item)`` (an item bigger than that gets a
    shard alone), as ``save_pretrained`` and mlx-lm's make_shards split checkpoints."""
    shards, size = [[]], 0
    for item in items:
        n = nbytes(item)
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n
    return shards


def write_safetensors(path: Path, entries: dict[str, tuple[torch.dtype, list[int]]], produce, metadata=None) -> int:
    """Write a safetensors file tensor by tensor: ``entries`` name -> (dtype, shape) fixes the header, then
    ``produce(name)`` supplies each tensor in turn, so only one is in memory at a time. Returns the data bytes."""
    header, offset = {}, 0
    order = sorted(entries)
    for name in order:
        dtype, shape = entries[name]
        nbytes = dtype.itemsize * _numel(shape)
        header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for name in order:
            t = produce(name)
            if t.dtype != entries[name][0] or list(t.shape) != list(entries[name][1]):
                raise ValueError(f"{name}: produced {t.dtype} {list(t.shape)}, header says {entries[name]}")
            fh.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    return offset


def weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> shard file, from the index if present, else from the single file or every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"'weight_map' is a {type(weight_map).__name__}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index (expected a 'weight_map' object): {exc}") from None
        files = {}
        for name, shard in weight_map.items():
            # shard names are plain file names inside the checkpoint: never follow a path elsewhere
            if not isinstance(shard, str) or Path(shard).name != shard or not shard.endswith(".safetensors"):
                raise CheckpointError(f"{index}: tensor {name!r} maps to {shard!r}, expected a .safetensors file name")
            if not (path / shard).is_file():
                raise CheckpointError(f"{index}: tensor {name!r} is listed in shard {shard!r}, which does not exist")
            files[name] = path / shard
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        hint = f" (found {pickles}: pickle files are never loaded, convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"{path}: no *.safetensors weights found{hint}")
    return {name: shard for shard in shards for name in SafetensorsFile(shard).keys()}


def _target_name(name: str, config) -> tuple[str, str, int]:
    """Checkpoint tensor name -> (parameter name, placement, expert index or -1), by the names table."""
    return names.to_parameter(name, names.family(config))


def _model_class(config):
    if config.model_type == "kimi_k3":
        from kimi_lm.model.kimi_k3 import KimiK3ForCausalLM

        return KimiK3ForCausalLM
    if isinstance(config, KimiK2Config):
        from kimi_lm.model.kimi_k2 import KimiK2ForCausalLM

        return KimiK2ForCausalLM
    from kimi_lm.model.kimi_linear import KimiLinearForCausalLM

    return KimiLinearForCausalLM


def _check_one_source(targets: dict[str, tuple], files: dict[str, Path]) -> None:
    """Two checkpoint tensors filling the same part of one parameter (a module stored both float and packed, e.g.
    ``w2.weight`` beside ``w2.weight_packed``) would silently overwrite each other: refuse them."""
    seen: dict[tuple, str] = {}
    for name, slot in targets.items():
        if (other := seen.setdefault(slot, name)) != name:
            raise CheckpointError(f"{files[name]}: tensors {other!r} and {name!r} both hold parameter {slot[0]!r}"
                                  + (f" (expert {slot[2]}, {slot[1]})" if slot[2] >= 0 else "")
                                  + "; a module is stored once, float or packed")


def _fp8_modules(config, targets: dict[str, tuple], files: dict[str, Path]) -> set[str]:
    """Names of the modules the checkpoint stores as FP8 blocks: those with a ``*_scale_inv`` tensor."""
    modules = set()
    for name, (target, _, _) in targets.items():
        if not target.endswith("_scale_inv"):
            continue
        if getattr(config, "quantization_config", None) is None:
            raise CheckpointError(
                f"{files[name]}: tensor {name!r} is an FP8 block scale, but config.json has no quantization_config"
            )
        # "x.weight_scale_inv" -> module "x"; stacked experts: "x.experts.gate_up_proj_scale_inv" -> "x.experts"
        modules.add(target.rsplit(".", 1)[0])
    return modules


def load(path, dtype=torch.bfloat16, device="cpu", mmap: bool | None = None, split=None):
    """Load a Kimi Linear or Kimi K2 / DeepSeek-V3 checkpoint directory; returns the plain model (``kimi_lm.model``
    modules, quantized ones swapped in where the checkpoint is quantized) in eval mode, no grads. Only loads: the
    runtime set-up for a device (``kimi_lm.cpu.prepare``) is applied by ``kimi_lm.load``.

    ``dtype`` is the compute dtype; FP8 block weights stay fp8 and are dequantized inside the forward pass.
    ``mmap`` (default: on for CPU): tensors kept as stored are views of the memory-mapped files (``kimi_lm.mapped``).
    ``split`` (``kimi_lm.distributed.load``'s loader of one rank's part of a packed checkpoint; no mmap): called on
    the meta model once its quantized modules are in place, it splits the model and returns a
    ``kimi_lm.distributed.load.RankPart``: of each expert tensor only the rank's experts [first, first + count) are
    read (``.experts``: per-expert tensors of others skipped, stacked ones read as that row range), of every other
    split tensor only the rank's slice (``.cut``: read from a memory-mapped view, so only its pages are touched)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory (expected a folder with config.json and *.safetensors)")
    config = load_config(path / "config.json")
    dtype = resolve_dtype(dtype, config)
    files = mlx_load.split_fused_files(weight_files(path))  # mlx-lm's fused K3 q/k/v read as three tensors
    mlx_names = any(".switch_mlp." in n or "_conv.conv." in n for n in files)  # mlx-lm's layout (sanitized names)
    fam = names.family(config)
    vision = sum(names.vision_tensor(name, fam) for name in files)
    if vision:  # a multimodal wrapper (Kimi K3): the text model only
        log.info("%s: skipping %d vision tensors (vision_tower., mm_projector.); loading the text model", path, vision)
    files = {name: file for name, file in files.items() if not names.skipped(name, config)}
    targets = {name: _target_name(name, config) for name in files}
    _check_one_source(targets, files)
    fp8 = _fp8_modules(config, targets, files)
    with torch.device("meta"):
        model = _model_class(config)(config)
        quantize_modules(model, lambda name, module: name in fp8)
        specs = mlx_load.mlx_specs(path, config, model.state_dict(), targets, files,
                                   lambda f: mlx_load.split_fused(SafetensorsFile(f).header, f))
        specs.update(ct_specs := compressed_tensors.plan(config, model, targets, files))  # INT4 / MXFP4 as MLX
        unpacked = mlx_load.dequantized_on_load(model, specs)
        split_kvb = {t.rsplit(".", 2)[0] for t, _, _ in targets.values() if ".kv_b_proj.embed_q." in t}
        swap_modules(model, specs, split_kvb, dtype=dtype)
        use_mmap = torch.device(device).type == "cpu" if mmap is None and split is None else bool(mmap)
        if use_mmap:  # mlx-lm's gate / up expert halves kept apart, so that they stay mapped
            targets = mapped.split_targets(targets, mapped.split_experts(model, targets))
    full_shapes = {n: t.shape for n, t in model.state_dict().items()}
    rank = split(model) if split is not None else None  # this rank's part (kimi_lm.distributed.load.RankPart)
    ranges = rank.experts if rank is not None else {}  # experts module -> (first, count, total) held here
    expected = model.state_dict()
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    loaded: dict[str, torch.Tensor] = {}
    expert_slots: dict[str, set] = {}  # stacked parameter -> {(placement, expert)} filled so far
    parts: dict[tuple[str, str], dict] = {}  # (packed key, placement) -> {"weight"/"scales"/"biases": tensor}
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)

    def place(file, name, target, placement, expert, read_into=None, t=None) -> None:
        """Put one checkpoint tensor (``t``, or read straight into place by ``read_into``) into its parameter."""
        ref = expected[target]
        want_dtype = (ref.dtype if ref.dtype in _KEEP_DTYPES else torch.float32 if target.endswith(FP32_SUFFIXES)
                      else dtype)
        if placement in names.PER_EXPERT and expert >= ref.shape[0]:
            raise CheckpointError(
                f"{file}: tensor {name!r} names expert {expert}, but config.json has num_experts={ref.shape[0]}")
        cut = rank.cut(target, placement) if rank is not None else None  # this rank's slice of the tensor read
        if placement in ("copy", "conv"):
            t = read_into(None, want_dtype if placement == "copy" else None, cut) if t is None else t
            t = cut.take(t).contiguous() if cut is not None else t
            t = t.transpose(1, 2).contiguous() if placement == "conv" else t  # MLX Conv1d [D, W, 1]
            loaded[target] = t.to(device=device, dtype=want_dtype)
            if loaded[target] is not t:
                trim.freed(t.numel() * t.element_size())
            return
        if target not in loaded:
            loaded[target] = torch.empty(ref.shape, dtype=want_dtype, device=device)
            expert_slots[target] = set()
        dest = names.expert_slice(loaded[target], placement, expert)
        if t is None and cut is None and dest.device.type == "cpu" and dest.is_contiguous() and \
                read_into(dest) is not None:
            pass  # read straight into the stacked tensor, no temporary
        else:
            t = read_into(None, None, cut) if t is None else t
            dest.copy_(t if cut is None else cut.take(t))
            trim.freed(t.numel() * t.element_size())
        if placement in names.PER_EXPERT:
            expert_slots[target].add((placement, expert))
        else:  # MLX: all experts' gate (or up) rows at once
            expert_slots[target].update((placement.removesuffix("_all"), e) for e in range(ref.shape[0]))

    trim = malloc.ReleaseEvery(16 << 20)  # read buffers freed after a dtype conversion: back to the OS as we go
    for file, in_file in by_file.items():
        with SafetensorsFile(file, mmap=use_mmap or rank is not None) as f:
            if rank is not None:  # no read-ahead: the kernel would read past this rank's parts into other ranks'
                os.posix_fadvise(f._fh.fileno(), 0, 0, os.POSIX_FADV_RANDOM)
            compressed_tensors.reinterpret(f.header, ct_specs)
            mlx_load.split_fused(f.header, file)
            for name in in_file:
                if name not in f.header:
                    raise CheckpointError(f"{file}: tensor {name!r} is listed in the index but missing from this file")
                target, placement, expert = targets[name]
                first, count, total = ranges.get(target.rpartition(".")[0], (0, None, None))
                rows = None if count is None or placement in names.PER_EXPERT else (first, count)  # stacked: [E, ...]
                if count is not None and placement in names.PER_EXPERT:
                    if expert >= total:
                        raise CheckpointError(f"{file}: tensor {name!r} names expert {expert}, but config.json has "
                                              f"num_experts={total}")
                    if not first <= expert < first + count:
                        continue  # another rank's expert: never read
                    expert -= first
                key, part = mlx_load.packed_part(target)
                if key in unpacked:  # packed in the file, float in the model: gather weight, scales, biases
                    got = parts.setdefault((key, placement), {})
                    got[part] = f.read(name, rows=rows)
                    spec, param = unpacked[key]
                    if len(got) == (3 if spec.has_biases else 2):
                        stored = names.checkpoint_shape(full_shapes[param], placement)  # rows: of a stack [E, ...]
                        t = mlx_load.dequantize_part(file, name, spec, got, checkpoint_shape=stored if rows is None
                                                     else [rows[1], *stored[1:]], dtype=dtype)
                        place(file, name, param, placement, expert, t=t)
                        del parts[(key, placement)]
                    continue
                if target.startswith("?"):  # a wrapper family's tensor without the wrapper's prefix
                    raise CheckpointError(
                        f"{file}: tensor {name!r} lacks the {names.WRAPPER_PREFIX!r} prefix that every text-model "
                        f"tensor of a {config.model_type} checkpoint has (vision tensors aside)")
                if target not in expected:
                    raise CheckpointError(
                        f"{file}: unexpected tensor {name!r} (no such parameter in a {config.model_type} model with this "
                        f"config.json; check num_hidden_layers, layer types and expert counts)"
                    )
                shape, file_dtype = f.shape(name), f.dtype(name)
                want_shape = names.checkpoint_shape(full_shapes[target], placement)
                if mlx_names and target.endswith(".A_log") and len(shape) == 1 and want_shape == [config.kda_head_dim] \
                        and shape[0] == config.kda_num_heads:  # mlx-lm's K3 layout: the heads' values only
                    place(file, name, target, placement, expert, t=mlx_load.pad_a_log(f.read(name), want_shape[0]))
                    continue
                if shape != want_shape:
                    raise CheckpointError(f"{file}: tensor {name!r} has shape {shape}, expected {want_shape}"
                                          + _scale_hint(target, placement, expected))
                _check_dtype(file, name, file_dtype, expected[target].dtype, config)

                def read_into(dest, keep=None, cut=None, f=f, name=name, file_dtype=file_dtype, rows=rows):
                    if dest is None and cut is not None:  # a view of the file, of which only the slice is read
                        return mapped.random_access(f.read(name, mapped=True, rows=rows))
                    if dest is None:  # mapped (a view of the file) when kept as stored (``keep``: its dtype)
                        return f.read(name, mapped=use_mmap and ST_DTYPES[file_dtype] == keep, rows=rows)
                    return f.read_into(name, dest, rows) if ST_DTYPES[file_dtype] == dest.dtype else None

                place(file, name, target, placement, expert, read_into=read_into)

    compressed_tensors.fill_biases(loaded, ct_specs)
    missing = [n for n in expected if n not in loaded]
    missing += [f"{key} ({', '.join(sorted(got))} found; scales and weight needed)" for (key, _), got in parts.items()]
    for target, slots in expert_slots.items():
        ref = expected[target]
        halves = ("gate", "up") if "gate_up_proj" in target else ("down",)
        want = {(h, e) for h in halves for e in range(ref.shape[0])}
        missing += [f"{target} (expert {e}, {h})" for h, e in sorted(want - slots, key=lambda s: (s[1], s[0]))]
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint: {shown}")
    model.load_state_dict(loaded, strict=not config.tie_word_embeddings, assign=True)
    loaded.clear()  # the model now holds the only references: packing below frees each plain weight as it goes
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval().requires_grad_(False)
    return model


def _check_dtype(file: Path, name: str, file_dtype: str, param_dtype: torch.dtype, config) -> None:
    if param_dtype in (torch.uint32, torch.uint8):  # MLX packed codes / E8M0 scales
        if file_dtype != ST_NAMES[param_dtype]:
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {file_dtype}, expected {ST_NAMES[param_dtype]} "
                                  f"(its module is quantized per config.json's quantization block)")
    elif file_dtype in ("U32", "U8"):
        raise CheckpointError(f"{file}: tensor {name!r} has dtype {file_dtype} (packed), but its module is not quantized: "
                              f"config.json's quantization block names no mode for it and it has no .scales tensor")
    elif param_dtype == FP8:
        if file_dtype != "F8_E4M3":
            raise CheckpointError(
                f"{file}: tensor {name!r} has dtype {file_dtype}, expected F8_E4M3 (the checkpoint has an FP8 block "
                f"scale for it)"
            )
    elif file_dtype == "F8_E4M3":
        if getattr(config, "quantization_config", None) is None:
            raise CheckpointError(f"{file}: tensor {name!r} has dtype F8_E4M3, but config.json has no quantization_config")
        raise CheckpointError(
            f"{file}: tensor {name!r} has dtype F8_E4M3, but its block scale {name + '_scale_inv'!r} is missing"
        )
    elif file_dtype not in ("F32", "BF16", "F16"):
        raise CheckpointError(f"{file}: tensor {name!r} has dtype {file_dtype}, expected a float type (F32, BF16 or F16)")


def _scale_hint(target: str, placement: str, expected: dict) -> str:
    """For a wrong FP8 scale shape: the weight shape it has to cover."""
    if not target.endswith("_scale_inv"):
        return ""
    weight = target.removesuffix("_scale_inv")  # "x.weight" or stacked "x.experts.gate_up_proj"
    if weight not in expected:
        return ""
    w_shape = list(expected[weight].shape) if placement == "copy" else names.expert_shape(expected[weight].shape, placement)
    return f" = ceil(out/128) x ceil(in/128) for its weight of shape {w_shape}"
