"""``kimi-lm convert``: rewrite a checkpoint's weights in another format, shard by shard.

    kimi-lm convert --dequantize SRC DST [--dtype bfloat16|float16|float32]

``--dequantize`` turns an FP8 block checkpoint (the official DeepSeek-V3 / Kimi K2 release) into plain float weights
in the same layout: same shard names and tensor names, every ``*.weight_scale_inv`` folded into its weight
(W = Q · S per 128×128 block, ``quant.fp8_block.dequantize_rows``, equal to the reference ``dequantize``), the
index's weight map and ``total_size`` updated, ``quantization_config`` dropped from config.json (a wrapper's
``text_config`` too) and every other file (tokenizer, chat template, remote code) copied. transformers and kimi-lm
read the result like any bf16 checkpoint. compressed-tensors checkpoints (K2-Thinking / K2.5 INT4, K3's MXFP4
experts) go the same way: ``weight_packed`` + ``weight_scale`` [+ ``weight_shape``] -> one float ``weight``.

Each output shard is streamed tensor by tensor (``checkpoint.write_safetensors``), so memory stays at about one
tensor. Output goes to a temporary folder next to DST, renamed to DST only when complete (``files.atomic_dir``): DST is
never half-written, and gets ordinary permissions (0755 under the usual umask).

    kimi-lm convert --quantize SRC DST --q-mode {affine,mxfp4,mxfp8,nvfp4} [--q-bits N] [--q-group-size G]

``--quantize`` writes an official Kimi Linear or Kimi K3 checkpoint in mlx-lm's quantized layout (mlx-lm's own
``quant_predicate`` policy and config ``quantization`` block; ``quant.mlx_layout``) and prints a report: tensors
quantized, bits per weight, size, worst relative errors. K3's MXFP4 experts are kept byte for byte under
``--q-mode mxfp4`` (dequantized exactly, then quantized, under another mode). ``--dequantize`` on such an MLX
directory (one whose config.json has a ``quantization`` block) goes back to the official float layout.

    kimi-lm convert --to-mlx SRC DST

``--to-mlx`` writes a compressed-tensors checkpoint (Kimi K2-Thinking / K2.5 native INT4, Kimi K3's MXFP4 experts)
in mlx-lm's layout without requantizing anything: INT4 ``pack-quantized`` is MLX affine 4-bit group 32 with
biases = −8·scale, ``mxfp4-pack-quantized`` is MLX mxfp4, so the codes and scales are copied bit for bit; every other
tensor stays float as stored. mlx-lm and kimi-lm load the result.

    kimi-lm convert --to-hf SRC DST [--dtype bfloat16|float16|float32]

``--to-hf`` writes a Kimi Linear checkpoint (without Block AttnRes, e.g. one from ``kimi-lm train``) in the
official layout with a config.json that ``transformers.KimiLinearForCausalLM`` loads (``save.export_to_transformers``).

Reference: DeepSeek-V3 ``inference/fp8_cast_bf16.py`` (the official FP8 -> bf16 converter); spec §4.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from kimi_lm.checkpoint import ST_DTYPES, SafetensorsFile, weight_files, write_safetensors
from kimi_lm.config import load_config
from kimi_lm.errors import CheckpointError, UsageError
from kimi_lm.files import atomic_dir
from kimi_lm.hub import resolve
from kimi_lm.quant import compressed_tensors as ct
from kimi_lm.quant.fp8_block import dequantize_rows, scale_shape
from kimi_lm.quant.mlx_dequant import dequantize_from_mlx, is_mlx_layout
from kimi_lm.quant.mlx_layout import finish_float_copy, quantize_to_mlx
from kimi_lm.quant.packed import MODES, QuantSpec

INDEX = "model.safetensors.index.json"
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def dequantize_checkpoint(src, dst, dtype: torch.dtype = torch.bfloat16, progress: bool = True) -> dict:
    """FP8 block checkpoint ``src`` -> float checkpoint ``dst`` (must not exist). Returns a summary dict."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src}: not a checkpoint directory (expected a folder with config.json and *.safetensors)")
    if dst.exists():
        raise CheckpointError(f"{dst}: already exists; choose a new output directory")
    config = load_config(src / "config.json")
    if getattr(config, "quantization_config", None) is None:
        raise CheckpointError(f"{src / 'config.json'}: has no quantization_config; nothing to dequantize")
    files = weight_files(src)
    shards: dict[Path, list[str]] = {}
    for name, file in files.items():
        shards.setdefault(file, []).append(name)
    with atomic_dir(dst) as tmp:
        with contextlib.ExitStack() as stack:
            opened: dict[Path, SafetensorsFile] = {}

            def shard(path: Path) -> SafetensorsFile:  # each header parsed once; a scale may sit in another shard
                if path not in opened:
                    opened[path] = stack.enter_context(SafetensorsFile(path))
                return opened[path]

            # every header checked before anything is written: a bad scale fails at once, not after hours of writing
            plans = {file: _plan_shard(shard(file), names, files, shard, dtype) for file, names in sorted(shards.items())}
            n_fp8 = sum(1 for plan in plans.values() for _, scale in plan.values() if scale is not None)
            weight_map, total = {}, 0
            for file, plan in tqdm(plans.items(), desc="dequantize", unit="shard", disable=not progress):

                def produce(name: str, f=shard(file), plan=plan) -> torch.Tensor:
                    scale = plan[name][1]
                    if scale is not None and scale.endswith(ct.PACKED):
                        return ct.dense(scale, files, shard, dtype)
                    t = f.read(name)
                    return t if scale is None else dequantize_rows(t, shard(files[scale]).read(scale).float(), dtype)

                entries = {name: entry for name, (entry, _) in plan.items()}
                total += write_safetensors(tmp / file.name, entries, produce, metadata={"format": "pt"})
                weight_map.update({name: file.name for name in entries})
        if (src / INDEX).is_file():
            index = json.loads((src / INDEX).read_text())
            index["weight_map"] = dict(sorted(weight_map.items()))
            index.setdefault("metadata", {})["total_size"] = total
            (tmp / INDEX).write_text(json.dumps(index, indent=2))
        dtype_name = finish_float_copy(src, tmp, dtype, progress)
    return {"src": str(src), "dst": str(dst), "dtype": dtype_name, "shards": len(shards), "fp8_weights": n_fp8,
            "bytes": total}


def _plan_shard(f: SafetensorsFile, names: list[str], files: dict[str, Path], shard, dtype: torch.dtype) -> dict:
    """name -> ((output dtype, shape), FP8 scale tensor name or None) for every tensor one output shard holds."""
    plan = {}
    for name in names:
        if name.endswith((f".{ct.PACKED}", f".{ct.SCALE}", f".{ct.SHAPE}")):
            if name.endswith(f".{ct.PACKED}"):  # compressed-tensors INT4: dense weight from packed, scale, shape
                plan[name.removesuffix("_packed")] = ((dtype, ct.dense_shape(name, files, shard)), name)
            continue
        if name.endswith("_scale_inv"):
            if name.removesuffix("_scale_inv") not in files:
                raise CheckpointError(f"{f.path}: block scale {name!r} has no weight {name.removesuffix('_scale_inv')!r}")
            continue  # folded into its weight
        if name not in f.header:
            raise CheckpointError(f"{f.path}: tensor {name!r} is listed in the index but missing from this file")
        shape, code = f.shape(name), f.dtype(name)
        if code not in ST_DTYPES:
            raise CheckpointError(f"{f.path}: tensor {name!r} has dtype {code}, which kimi-lm cannot read")
        if code != "F8_E4M3":
            plan[name] = ((ST_DTYPES[code], shape), None)
            continue
        scale = name + "_scale_inv"
        if scale not in files:
            raise CheckpointError(f"{f.path}: tensor {name!r} has dtype F8_E4M3, but its block scale {scale!r} is missing")
        found = shard(files[scale]).shape(scale)
        want = list(scale_shape(*shape)) if len(shape) == 2 else None
        if found != want:
            raise CheckpointError(
                f"{files[scale]}: tensor {scale!r} has shape {found}, expected {want} = ceil(out/128) x ceil(in/128) "
                f"for its weight of shape {shape}"
            )
        plan[name] = ((dtype, shape), scale)
    return plan


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kimi-lm convert", description="Rewrite a checkpoint's weights in another format.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""examples:
  kimi-lm convert moonshotai/Kimi-K2-Thinking k2t-mlx --to-mlx       INT4 experts -> MLX affine 4-bit, bit for bit
  kimi-lm convert moonshotai/Kimi-K3 k3-mlx --to-mlx                 MXFP4 experts -> MLX mxfp4, bit for bit
  kimi-lm convert moonshotai/Kimi-K3 k3-mxfp4 --quantize --q-mode mxfp4   the rest quantized too, experts kept
  kimi-lm convert moonshotai/Kimi-K2.5 k25-bf16 --dequantize         INT4 / MXFP4 / FP8 / MLX -> bf16""")
    p.add_argument("src", help="checkpoint directory to read, or a Hugging Face Hub id ORG/NAME[@REVISION]")
    p.add_argument("--yes", "-y", action="store_true", help="download a Hub model without asking, however large")
    p.add_argument("dst", help="output directory (must not exist; written atomically)")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dequantize", action="store_true",
                      help="FP8 128x128 block weights (DeepSeek-V3 / Kimi K2 release), compressed-tensors INT4 / "
                           "MXFP4 (K2-Thinking, K2.5, K3) or an MLX-layout directory -> plain float weights")
    mode.add_argument("--quantize", action="store_true",
                      help="official Kimi Linear / Kimi K3 -> mlx-lm's quantized layout (mlx_lm.load reads the "
                           "output); K3's MXFP4 experts are kept as they are under --q-mode mxfp4")
    mode.add_argument("--to-mlx", action="store_true",
                      help="compressed-tensors INT4 / MXFP4 (Kimi K2-Thinking, K2.5, K3) -> mlx-lm's layout, the packed "
                           "experts re-interpreted bit for bit (INT4 = MLX affine 4-bit g32, biases -8*scale; MXFP4 = "
                           "MLX mxfp4), the rest float as stored; no requantization")
    p.add_argument("--q-mode", choices=list(MODES), default="affine", help="--quantize format (default affine)")
    p.add_argument("--q-bits", type=int, default=None, help="--quantize bits (affine 2-8, default 4; mxfp4, nvfp4: 4; mxfp8: 8)")
    p.add_argument("--q-group-size", type=int, default=None,
                   help="--quantize group size (affine 32/64/128, default 64; mxfp4, mxfp8: 32; nvfp4: 16)")
    mode.add_argument("--to-hf", action="store_true",
                      help="Kimi Linear (no AttnRes) -> official layout + config that transformers loads")
    mode.add_argument("--from-fsdp", action="store_true",
                      help="a `kimi-lm train --fsdp` checkpoint (RUN/step-N with dcp/: one safetensors file per rank) "
                           "-> one directory kimi_lm.load, generate and serve read")
    p.add_argument("--dtype", choices=list(_DTYPES), default="bfloat16",
                   help="output dtype for --dequantize, --to-hf and --from-fsdp (default bfloat16)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.src = str(resolve(args.src, confirm=not args.yes))  # ORG/NAME: from the Hub (kimi_lm.hub)
        if args.quantize or args.to_mlx:
            return _quantize_main(args)
        if args.from_fsdp:
            from kimi_lm.distributed.fsdp import export_checkpoint

            out = export_checkpoint(args.src, args.dst, _DTYPES[args.dtype])
            print(f"wrote {out}: the sharded training checkpoint {args.src} gathered into one model in {args.dtype}")
            print(json.dumps({"src": args.src, "dst": str(out), "dtype": args.dtype}))
            return 0
        if args.to_hf:
            from kimi_lm.save import export_to_transformers

            summary = export_to_transformers(args.src, args.dst, _DTYPES[args.dtype])
            print(f"wrote {summary['dst']}: {summary['parameters'] / 1e6:.2f}M parameters in {summary['dtype']}, "
                  f"official layout with a transformers config")
            print(json.dumps(summary))
            return 0
        if args.q_bits is not None or args.q_group_size is not None or args.q_mode != "affine":
            raise CheckpointError("--q-mode, --q-bits and --q-group-size apply to --quantize only")
        if args.dequantize and is_mlx_layout(Path(args.src)):  # MLX packed layout -> official float layout
            summary = dequantize_from_mlx(args.src, args.dst, _DTYPES[args.dtype], progress=not args.quiet)
            print(f"wrote {summary['dst']}: {summary['tensors']} tensors in the official layout, "
                  f"{summary['packed_weights']} packed weights dequantized to {summary['dtype']}, "
                  f"{summary['bytes'] / 2**30:.2f} GiB")
            print(json.dumps(summary))
            return 0
        summary = dequantize_checkpoint(args.src, args.dst, _DTYPES[args.dtype], progress=not args.quiet)
    except (CheckpointError, UsageError) as exc:
        print(f"kimi-lm convert: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {summary['dst']}: {summary['shards']} shard(s), {summary['fp8_weights']} FP8 weights dequantized "
          f"to {summary['dtype']}, {summary['bytes'] / 2**30:.2f} GiB")
    print(json.dumps(summary))
    return 0


def _quantize_main(args) -> int:
    spec = None
    if args.to_mlx:
        if args.q_bits is not None or args.q_group_size is not None or args.q_mode != "affine":
            raise CheckpointError("--to-mlx keeps the checkpoint's own packing; --q-mode, --q-bits and --q-group-size "
                                  "apply to --quantize only")
    else:
        # mlx-lm's defaults per mode (quantize_model's defaults_for_mode)
        default_group, default_bits = {"affine": (64, 4), "mxfp4": (32, 4), "nvfp4": (16, 4),
                                       "mxfp8": (32, 8)}[args.q_mode]
        try:
            spec = QuantSpec(args.q_mode, args.q_bits or default_bits,
                             args.q_group_size or default_group).checked("kimi-lm convert --quantize")
        except ValueError as exc:
            raise CheckpointError(str(exc)) from None
    s = quantize_to_mlx(args.src, args.dst, spec, progress=not args.quiet)
    mode = f"{s['mode']} {s['bits']}-bit g{s['group_size']}" if s["mode"] else "none"
    print(f"wrote {s['dst']}: {s['reinterpreted_tensors']} packed tensors re-interpreted bit for bit, "
          f"{s['quantized_tensors']} quantized ({mode}{', routers affine 8-bit g64' if spec else ''}), "
          f"{s['float_tensors']} kept float; {s['bits_per_weight']:.3f} bits per weight; "
          f"{s['bytes'] / 2**20:.2f} MiB in {s['shards']} shard(s)")
    for e in s["worst_relative_errors"]:
        print(f"  rel. error {e['rel_err']:.4g}  {e['tensor']} ({e['format']})")
    print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
