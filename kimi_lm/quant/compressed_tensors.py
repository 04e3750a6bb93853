"""compressed-tensors checkpoints (``quant_method: compressed-tensors``) read as MLX packed weights, byte for byte.

Two formats, both a pure re-interpretation into an existing ``QuantSpec`` mode, so every packed kernel serves them:

* ``pack-quantized`` (Kimi K2-Thinking / K2.5 routed experts): symmetric int4, group 32. ``weight_packed`` int32
  [out, in/8] holds element c in word c//8 at bits 4·(c mod 8) as the code q+8; ``weight_scale`` [out, in/32]. That
  is MLX's affine 4-bit packing with ``scales`` = scale and ``biases`` = −8·scale (w = scale·code + bias).
* ``mxfp4-pack-quantized`` (Kimi K3 routed experts): ``weight_packed`` uint8 [out, in/2] (low nibble first, E2M1
  codes) and ``weight_scale`` uint8 E8M0 [out, in/32]: MLX's mxfp4 bytes, read as uint32 words [out, in/8].

Which modules are quantized comes from the config (``config_groups.*.targets`` minus ``ignore``, matched as
compressed-tensors does: ``re:`` prefixes are ``re.match``, else the exact module name or class name, ``Linear``),
never from file names. A module the config targets but the checkpoint stores as a float ``.weight`` stays float (K3's
ignore list misses several such Linears, spec §A4.2); packed tensors of a module the config does not target are an
error. ``weight_shape`` ([out, in], int32 or int64) is checked against the model and not loaded.

Reference: spec ``kimi_k3_and_int4.md`` §A4 and §B; compressed-tensors ``pack_to_int32`` / ``unpack_from_int32``,
``utils/match.py``; mlx-lm 0.32.2 ``utils._compressed_tensors_quantization`` and ``deepseek_v3.sanitize``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from kimi_lm.errors import CheckpointError

INT4, MXFP4 = "pack-quantized", "mxfp4-pack-quantized"
# format -> (weights.type, QuantSpec mode, packed dtype in the file, scale dtypes accepted)
FORMATS = {INT4: ("int", "affine", "I32", ("BF16", "F16", "F32")), MXFP4: ("float", "mxfp4", "U8", ("U8",))}
PACKED, SCALE, SHAPE = "weight_packed", "weight_scale", "weight_shape"


@dataclass(frozen=True)
class Group:
    format: str
    targets: tuple[str, ...]

    @property
    def spec(self):
        from kimi_lm.quant.packed import QuantSpec  # lazy: config parsing must not import the model code

        return QuantSpec(FORMATS[self.format][1], 4, 32)


@dataclass(frozen=True)
class CompressedTensors:
    groups: tuple[Group, ...]
    ignore: tuple[str, ...]

    def group_for(self, name: str, class_name: str) -> Group | None:
        """The config group quantizing module ``name`` (a checkpoint module name), or None."""
        if any(_match(name, class_name, t) for t in self.ignore):
            return None
        return next((g for g in self.groups if any(_match(name, class_name, t) for t in g.targets)), None)


def _match(name: str, class_name: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target in (name, class_name)


def parse(q: dict, source: str) -> CompressedTensors:
    """``quantization_config`` -> CompressedTensors; CheckpointError for anything but the two supported schemes."""
    where = f"{source}: quantization_config"

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"{where}{what} is not supported (supported: compressed-tensors 'pack-quantized' "
                               f"symmetric int4 group 32, or 'mxfp4-pack-quantized', weight-only)")

    if q.get("quant_method") != "compressed-tensors":
        raise refuse(f".quant_method {q.get('quant_method')!r}")
    if q.get("quantization_status", "compressed") != "compressed":
        raise refuse(f".quantization_status {q.get('quantization_status')!r} (weights not stored compressed)")
    if q.get("kv_cache_scheme") is not None:
        raise refuse(".kv_cache_scheme (KV-cache quantization)")
    raw_groups = q.get("config_groups")
    if not isinstance(raw_groups, dict) or not raw_groups:
        raise CheckpointError(f"{where}.config_groups: expected a non-empty object, found {raw_groups!r}")
    groups = []
    for gname, g in raw_groups.items():
        at = f".config_groups.{gname}"
        if not isinstance(g, dict) or not isinstance(g.get("weights"), dict):
            raise CheckpointError(f"{where}{at}: expected an object with a 'weights' object, found {g!r}")
        fmt, w = g.get("format") or q.get("format"), g["weights"]
        if fmt not in FORMATS:
            raise refuse(f"{at}.format {fmt!r}")
        for key in ("input_activations", "output_activations"):
            if g.get(key) is not None:
                raise refuse(f"{at}.{key} (activation quantization)")
        want = {"num_bits": 4, "type": FORMATS[fmt][0], "symmetric": True, "strategy": "group", "group_size": 32,
                "dynamic": False}
        for key, value in want.items():
            if w.get(key, value) != value or (key in ("num_bits", "group_size", "type") and key not in w):
                raise refuse(f"{at}.weights.{key} {w.get(key)!r} (expected {value!r})")
        if w.get("actorder") not in (None, "static", False) or w.get("zp_dtype") is not None:
            raise refuse(f"{at}.weights: actorder {w.get('actorder')!r} / zp_dtype {w.get('zp_dtype')!r}")
        targets = g.get("targets")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise CheckpointError(f"{where}{at}.targets: expected a list of strings, found {targets!r}")
        groups.append(Group(fmt, tuple(targets)))
    ignore = q.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(t, str) for t in ignore):
        raise CheckpointError(f"{where}.ignore: expected a list of strings, found {ignore!r}")
    return CompressedTensors(tuple(groups), tuple(ignore))


def plan(config, model, targets: dict, files: dict) -> dict:
    """Packed-weight key (a Linear, or ``<experts>.gate_up_proj`` / ``.down_proj``) -> QuantSpec for every module the
    config quantizes and the checkpoint stores packed; checks the packed tensors' dtypes and ``weight_shape`` (then
    drops the ``weight_shape`` entries from ``files`` and ``targets``)."""
    q = getattr(config, "quantization_config", None)
    if not isinstance(q, dict) or q.get("quant_method") != "compressed-tensors":
        stray = next((n for n in files if n.endswith((f".{PACKED}", f".{SHAPE}"))), None)
        if stray:
            raise CheckpointError(f"{files[stray]}: tensor {stray!r} is a compressed-tensors packed weight, but "
                                  f"config.json has no compressed-tensors quantization_config")
        return {}
    ct = parse(q, "config.json")
    from kimi_lm import names

    specs, headers = {}, {}
    for name, (target, placement, _) in targets.items():
        module, _, leaf = name.rpartition(".")
        if leaf not in (PACKED, SCALE):
            continue
        expert = placement in names.PER_EXPERT
        owner = target if expert else target.rpartition(".")[0]
        is_linear = expert or type(_get(model, owner)) is torch.nn.Linear
        group = ct.group_for(module, "Linear" if is_linear else type(_get(model, owner)).__name__)
        file = files[name]
        if group is None:
            raise CheckpointError(f"{file}: tensor {name!r} is a compressed-tensors packed weight, but config.json's "
                                  f"quantization_config does not quantize module {module!r} (targets / ignore)")
        header = _header(file, headers)[name]
        _, _, packed_dtype, scale_dtypes = FORMATS[group.format]
        ok = {PACKED: (packed_dtype,), SCALE: scale_dtypes}[leaf]
        if header["dtype"] not in ok:
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {header['dtype']}, expected {' or '.join(ok)} "
                                  f"({group.format})")
        if leaf == PACKED and f"{module}.{SCALE}" not in files:
            raise CheckpointError(f"{file}: tensor {name!r} has no scale {module + '.' + SCALE!r} beside it")
        out_f, in_f = (names.expert_shape(_get_param(model, target.removesuffix("_scales")).shape, placement) if expert
                       else _get(model, owner).weight.shape)
        per = 8 if packed_dtype == "I32" else 2  # codes per stored element
        want = [out_f, -(-in_f // per)] if leaf == PACKED else [out_f, -(-in_f // 32)]
        if header["shape"] != want:
            raise CheckpointError(f"{file}: tensor {name!r} has shape {header['shape']}, expected {want} ({group.format}"
                                  f" {'codes' if leaf == PACKED else 'scales'} of a [{out_f}, {in_f}] weight: "
                                  f"{f'{per} codes per {packed_dtype} element' if leaf == PACKED else 'one per 32 inputs'})")
        key = target.removesuffix("_scales") if expert else owner
        if specs.setdefault(key, group.spec) != group.spec:
            raise CheckpointError(f"{file}: tensor {name!r}: gate and up of {key!r} are quantized differently")
    _check_shapes([n for n in files if n.endswith(f".{SHAPE}")], files, headers)
    for name in [n for n in files if n.endswith(f".{SHAPE}")]:  # the model has no such tensor
        del files[name], targets[name]
    return specs


def _get(model, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise CheckpointError(f"config.json: no module {name!r} in a model with this config.json") from None


def _get_param(model, name: str) -> torch.Tensor:
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise CheckpointError(f"config.json: no parameter {name!r} in a model with this config.json") from None


def _header(file, headers: dict) -> dict:
    from kimi_lm.checkpoint import SafetensorsFile

    if file not in headers:
        headers[file] = SafetensorsFile(file).header
    return headers[file]


def _check_shapes(shape_names: list[str], files: dict, headers: dict) -> None:
    """Each ``weight_shape`` [out, in] must agree with its packed tensor (in = 8 codes per int32, 2 per byte)."""
    from kimi_lm.checkpoint import SafetensorsFile

    by_file = {}
    for name in shape_names:
        by_file.setdefault(files[name], []).append(name)
    for file, in_file in by_file.items():
        with SafetensorsFile(file) as f:
            for name in in_file:
                header, packed = f.header[name], name.removesuffix(SHAPE) + PACKED
                if header["shape"] != [2] or header["dtype"] not in ("I32", "I64"):
                    raise CheckpointError(f"{file}: tensor {name!r} is {header['dtype']} {header['shape']}, expected "
                                          f"I32 or I64 [2] (out, in)")
                if packed not in files:
                    raise CheckpointError(f"{file}: tensor {name!r} has no packed weight {packed!r} beside it")
                t = torch.empty(2, dtype=torch.int32 if header["dtype"] == "I32" else torch.int64, device="cpu")
                out_f, in_f = (int(v) for v in f.read_into(name, t).tolist())
                p = _header(files[packed], headers)[packed]
                per = 8 if p["dtype"] == "I32" else 2
                if p["shape"] != [out_f, in_f // per] or in_f % 32:
                    raise CheckpointError(
                        f"{files[packed]}: tensor {packed!r} has shape {p['shape']}, but {name!r} says [{out_f}, "
                        f"{in_f}] (expected [{out_f}, {in_f // per}], with in a multiple of 32)")


def reinterpret(header: dict, specs: dict) -> None:
    """In place, for a file's safetensors header: packed tensors as MLX uint32 words (same bytes)."""
    if not specs:
        return
    for name, info in header.items():
        if name.endswith(f".{PACKED}"):
            if info["dtype"] == "U8" and len(info["shape"]) == 2 and info["shape"][1] % 4 == 0:
                info["shape"] = [info["shape"][0], info["shape"][1] // 4]
                info["dtype"] = "U32"
            elif info["dtype"] == "I32":
                info["dtype"] = "U32"


def fill_biases(loaded: dict, specs: dict) -> None:
    """Affine biases = −8·scale (the int4 codes are stored as q+8), for every loaded packed-quantized weight."""
    for key, spec in specs.items():
        if spec.mode != "affine":
            continue
        expert = key.endswith(("gate_up_proj", "down_proj"))
        scales, biases = (f"{key}_{p}" if expert else f"{key}.{p}" for p in ("scales", "biases"))
        if scales in loaded:
            loaded[biases] = loaded[scales] * -8


# ---- writing: the bf16 reference (convert --dequantize) and the golden tensors tests compare against ---------------
def dequantize(packed: torch.Tensor, scale: torch.Tensor, shape, dtype=torch.bfloat16) -> torch.Tensor:
    """Reference int4 dequant of one ``pack-quantized`` weight: W[r, c] = (nibble − 8)·scale[r, c // 32]."""
    out_f, in_f = (int(v) for v in shape)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    nibbles = torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=-1).reshape(out_f, -1)[:, :in_f]
    w = (nibbles - 8).float() * scale.float().repeat_interleave(32, dim=1)[:, :in_f]
    return w.to(dtype)


def dense_shape(packed: str, files: dict, shard) -> list[int]:
    """[out, in] of a packed weight: ``pack-quantized`` from its ``weight_shape``, ``mxfp4-pack-quantized`` (U8, no
    ``weight_shape``) from the packed width (2 codes per byte). ``shard(path)`` opens a file once."""
    base = packed.removesuffix(PACKED)
    if base + SCALE not in files:
        raise CheckpointError(f"{files[packed]}: tensor {packed!r} has no {base + SCALE!r} beside it")
    p = shard(files[packed])
    if p.dtype(packed) == "U8":
        if len(p.shape(packed)) != 2 or (2 * p.shape(packed)[1]) % 32:
            raise CheckpointError(f"{files[packed]}: tensor {packed!r} is U8 {p.shape(packed)}, expected mxfp4 codes "
                                  f"[out, in/2] with in a multiple of 32")
        return [p.shape(packed)[0], 2 * p.shape(packed)[1]]
    name = base + SHAPE
    if name not in files:
        raise CheckpointError(f"{files[packed]}: tensor {packed!r} has no {name!r} beside it")
    f = shard(files[name])
    if f.shape(name) != [2] or f.dtype(name) not in ("I32", "I64"):
        raise CheckpointError(f"{files[name]}: tensor {name!r} is {f.dtype(name)} {f.shape(name)}, expected I32 or I64 [2]")
    out_f, in_f = (int(v) for v in f.read(name).tolist())
    if p.dtype(packed) != "I32" or p.shape(packed) != [out_f, -(-in_f // 8)]:
        raise CheckpointError(f"{files[packed]}: tensor {packed!r} is {p.dtype(packed)} {p.shape(packed)}, expected "
                              f"I32 [{out_f}, {-(-in_f // 8)}] for weight_shape [{out_f}, {in_f}]")
    return [out_f, in_f]


def packed_parts(packed: str, files: dict, shard) -> tuple[object, list[int], tuple[torch.Tensor, ...]]:
    """One packed weight as MLX tensors, the bytes unchanged: (QuantSpec, [out, in], (weight uint32, scales[,
    biases])). ``pack-quantized``: affine 4-bit g32, scales as stored, biases −8·scale (exact: a power-of-two
    multiple); ``mxfp4-pack-quantized``: mxfp4, E8M0 scales as stored."""
    from kimi_lm.quant.packed import QuantSpec

    shape = dense_shape(packed, files, shard)
    scale = packed.removesuffix(PACKED) + SCALE
    f = shard(files[scale])
    mxfp4 = shard(files[packed]).dtype(packed) == "U8"
    want = ("U8",) if mxfp4 else FORMATS[INT4][3]
    if f.dtype(scale) not in want or f.shape(scale) != [shape[0], -(-shape[1] // 32)]:
        raise CheckpointError(f"{files[scale]}: tensor {scale!r} is {f.dtype(scale)} {f.shape(scale)}, expected "
                              f"{' or '.join(want)} [{shape[0]}, {-(-shape[1] // 32)}]")
    if shape[1] % 32:
        raise CheckpointError(f"{files[packed]}: tensor {packed!r} has {shape[1]} inputs, not a multiple of the group "
                              f"size 32 (the MLX layout cannot hold it; use --dequantize)")
    q, s = shard(files[packed]).read(packed).view(torch.uint32), f.read(scale)
    if mxfp4:
        return QuantSpec("mxfp4", 4, 32), shape, (q, s)
    return QuantSpec("affine", 4, 32), shape, (q, s, s * -8)


def dense(packed: str, files: dict, shard, dtype) -> torch.Tensor:
    """The float weight of one packed module (``convert --dequantize``): int4 by the reference unpack, mxfp4 by its
    codec (every value exact in bf16)."""
    shape = dense_shape(packed, files, shard)
    if shard(files[packed]).dtype(packed) == "U8":
        spec, _, parts = packed_parts(packed, files, shard)
        return spec.dequantize(*parts, None, dtype)
    scale = packed.removesuffix(PACKED) + SCALE
    s = shard(files[scale]).read(scale)
    if list(s.shape) != [shape[0], -(-shape[1] // 32)]:
        raise CheckpointError(f"{files[scale]}: tensor {scale!r} has shape {list(s.shape)}, expected "
                              f"[{shape[0]}, {-(-shape[1] // 32)}]")
    return dequantize(shard(files[packed]).read(packed), s, shape, dtype)
