"""MLX-quantized checkpoints at load time: which ``QuantSpec`` each packed module has, and the few packed weights the
model keeps as float.

As mlx-lm's ``load_model``: a module named in config.json's ``quantization`` block takes that entry (missing mode =
affine), any other the bits and group size its packed shapes imply (``infer_quant_config``). mlx-lm also writes packed
weights no packed module can hold here (a stacked expert whose other half stayed float, a one-row Linear such as the
AttnRes pseudo-queries); the loader dequantizes those to the compute dtype (``dequantized_on_load``).

mlx-lm's K3 fuses each KDA layer's q/k/v (``qkv_proj``, ``qkv_conv``) and keeps ``A_log`` at ``num_heads`` values:
``split_fused_files`` / ``split_fused`` read a fused tensor as three row ranges of the file (names in
``kimi_lm.names.FUSED``), ``pad_a_log`` zero-pads ``A_log`` to the head dim the model holds.

Reference: mlx-lm 0.32.2 ``utils.py`` (load_model, infer_quant_config), ``models/kimi_k3.py`` (``sanitize``); spec
``kimi_k2_and_quantization.md`` §5, ``kimi_k3_and_int4.md`` §C1.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kimi_lm import names
from kimi_lm.errors import CheckpointError
from kimi_lm.quant.packed import QuantSpec, infer_spec


def split_fused_files(files: dict) -> dict:
    """Tensor name -> file with each fused mlx-lm tensor replaced by its three parts (same file)."""
    out = {}
    for name, file in files.items():
        for part in names.fused_parts(name) or [name]:
            out[part] = file
    return out


def split_fused(header: dict, where="") -> dict:
    """In place (and returned), a safetensors header with each fused tensor as three entries for its row thirds:
    row-major rows are contiguous, so each part is a byte range of the fused tensor's data."""
    for name in [n for n in header if names.fused_parts(n)]:
        info = header.pop(name)
        rows, (begin, end) = info["shape"][0] if info["shape"] else 0, info["data_offsets"]
        if rows % 3 or rows == 0:
            raise CheckpointError(f"{where}: tensor {name!r} has {rows} rows, expected q, k and v: a multiple of 3")
        step = (end - begin) // 3
        for i, part in enumerate(names.fused_parts(name)):
            header[part] = {"dtype": info["dtype"], "shape": [rows // 3, *info["shape"][1:]],
                            "data_offsets": [begin + i * step, begin + (i + 1) * step]}
    return header


def pad_a_log(t: torch.Tensor, size: int) -> torch.Tensor:
    """mlx-lm's K3 ``A_log`` [num_heads] zero-padded to the [head_dim] the release stores and the model holds."""
    return torch.cat([t, t.new_zeros(size - t.shape[0])]) if t.dim() == 1 and t.shape[0] < size else t


def dequantized_on_load(model, specs: dict) -> dict:
    """Packed weights the model holds as float, taken out of ``specs``: packed key -> (spec, float parameter).

    Two cases, both of what mlx-lm writes: a stacked expert weight whose other half stayed float (experts narrower
    than the group size: mlx-lm quantizes ``switch_mlp.{gate,up}_proj`` and keeps ``down_proj``, or the reverse), and
    a one-row Linear read as a vector (the AttnRes pseudo-queries ``*_res_proj``, which no packed module can serve).
    They are few and small, so the loader dequantizes them to the compute dtype."""
    out = {}
    for key in list(specs):
        stem, _, half = key.rpartition(".")
        if half in ("gate_up_proj", "down_proj") and stem.endswith(".experts"):
            other = f"{stem}.{'down_proj' if half == 'gate_up_proj' else 'gate_up_proj'}"
            if other not in specs:
                out[key] = (specs.pop(key), key)
        elif ".kv_b_proj." not in key:  # kv_b_proj halves are split modules of their own, made by swap_modules
            module = model.get_submodule(key)
            if isinstance(module, torch.nn.Linear) and module.out_features == 1:
                out[key] = (specs.pop(key), f"{key}.weight")
    return out


def packed_part(target: str) -> tuple[str, str]:
    """Parameter name of a packed tensor -> (packed key, "weight" | "scales" | "biases"): ``x.scales`` -> ``x``;
    stacked experts ``x.gate_up_proj_scales`` -> ``x.gate_up_proj``."""
    for sep in ("_", "."):
        for part in ("scales", "biases"):
            if target.endswith(sep + part):
                return target.removesuffix(sep + part), part
    return target.removesuffix(".weight"), "weight"


def dequantize_part(file, name, spec, got: dict, checkpoint_shape: list[int], dtype) -> torch.Tensor:
    if "weight" not in got or "scales" not in got:
        raise CheckpointError(f"{file}: tensor {name!r}: packed weight and scales do not come together")
    try:
        t = spec.dequantize(got["weight"], got["scales"], got.get("biases"), dtype)
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{file}: tensor {name!r} cannot be dequantized as {spec} ({exc})") from None
    if list(t.shape) != checkpoint_shape:
        raise CheckpointError(f"{file}: tensor {name!r} dequantizes to shape {list(t.shape)}, expected {checkpoint_shape}")
    return t


def mlx_quantization(path: Path) -> dict | None:
    """config.json's MLX ``quantization`` block (mlx-lm also copies it to ``quantization_config``)."""
    raw = json.loads((path / "config.json").read_text())
    quant = raw.get("quantization")
    if quant is None and isinstance(raw.get("quantization_config"), dict) and "bits" in raw["quantization_config"]:
        quant = raw["quantization_config"]
    return quant


def mlx_specs(path: Path, config, float_state: dict, targets: dict, files: dict, header_of) -> dict:
    """Packed-weight key (a module, or ``<experts>.gate_up_proj`` / ``.down_proj``) -> QuantSpec, for every MLX
    ``*.scales`` tensor. As mlx-lm's loader: a module named in config.json's quantization block takes that dict
    (missing mode = affine); any other takes the bits and group size its packed shapes imply. ``header_of(file)``
    gives a safetensors file's header."""
    scales = [name for name, (target, _, _) in targets.items() if name.endswith(".scales")]
    if not scales:
        return {}
    quant = mlx_quantization(path)
    if not isinstance(quant, dict):
        raise CheckpointError(f"{files[scales[0]]}: tensor {scales[0]!r} is an MLX quantization scale, but "
                              f"{path / 'config.json'} has no 'quantization' block")
    try:
        QuantSpec.from_dict(quant, f"{path / 'config.json'}: quantization")
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    specs, headers = {}, {}
    for name in scales:
        module, target = name.removesuffix(".scales"), targets[name][0]
        key = target.removesuffix(".scales").removesuffix("_scales")
        file = files[name]
        try:
            if isinstance(quant.get(module), dict):
                spec = QuantSpec.from_dict(quant[module], f"{path / 'config.json'}: quantization[{module!r}]")
            else:
                header = headers.setdefault(file, header_of(file))
                if f"{module}.weight" not in files:
                    raise ValueError(f"packed weight {module + '.weight'!r} is missing")
                w_header = headers.setdefault(files[f"{module}.weight"], header_of(files[f"{module}.weight"]))
                spec = infer_spec(w_header[f"{module}.weight"]["shape"], header[name]["shape"],
                                  header[name]["dtype"] == "U8", in_features(key, float_state, config), f"{file}: {name!r}")
        except ValueError as exc:
            raise CheckpointError(str(exc) if str(exc).startswith(str(file)) or "config.json" in str(exc)
                                  else f"{file}: tensor {name!r}: {exc}") from None
        if specs.get(key, spec) != spec:
            raise CheckpointError(f"{file}: tensor {name!r} is quantized as {spec}, but the other half of its stacked "
                                  f"expert weight is {specs[key]}; gate and up must match")
        specs[key] = spec
    return specs


def in_features(key: str, float_state: dict, config) -> int:
    if key.endswith(".kv_b_proj.embed_q"):
        return config.qk_nope_head_dim
    if key.endswith(".kv_b_proj.unembed_out"):
        return config.kv_lora_rank
    ref = float_state.get(key) if key.endswith(("gate_up_proj", "down_proj")) and key in float_state else None
    ref = ref if ref is not None else float_state.get(f"{key}.weight")
    if ref is None:
        raise ValueError(f"no module {key!r} in a {config.model_type} model with this config.json")
    return ref.shape[-1]
