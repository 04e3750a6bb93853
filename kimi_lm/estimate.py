"""Memory estimator: will this model, at this quantization and context, fit on my hardware?

``kimi-lm estimate kimi-linear-48b-a3b --quant mxfp4 --context 4k,128k,1M`` prints parameters (total, active per
token), weight bytes by component, the constant KDA state, the MLA latent cache per token, the total at each context
and, for a list of devices, whether it fits and the longest context that does. ``--json`` prints the same as one JSON
object, ``--plot`` draws memory against context; :func:`estimate` returns it all as an :class:`Estimate`.

Every number is derived from the config class through one tensor inventory (``memory.tensors``: the model built on
the meta device, named by the loader's table), never from a fitted constant. Exact: parameter counts, weight bytes of each format including scales and
biases, KDA state and MLA cache bytes (what the cache objects report as ``nbytes``). Estimates, with their
assumptions stated where they are computed: the prefill activation peak, training activations, and how much of a
device is usable (:data:`DEVICES`).

Formats, the inventory and the per-part formulas are in :mod:`kimi_lm.memory`; this module adds the devices, the
fit and the command line.

References: shared/specs/kimi_linear.md §1–§2 (config, tensor names and shapes, 49,122,681,728 parameters), §4.3
and §5.9 (MLA latent and KDA caches); shared/specs/kimi_k2_and_quantization.md §1–§2 (K2 config, tensors), §4 (FP8
block format), §5 (MXFP4, affine, mlx-lm quantization predicates and config keys), §6 (safetensors header).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kimi_lm.config import (K2_PRESETS, K3_PRESETS, PRESETS, KimiK2Config, KimiLinearConfig, config_from_dict, preset,
                             read_config_json)
from kimi_lm.errors import CheckpointError, UsageError
from kimi_lm.hub import resolve
from kimi_lm.memory import (COMPONENTS, DTYPE_BYTES, QUANT_NAMES, Quant, Tensor, int4_bias_bytes,  # noqa: F401
                            kda_state_bytes, make_quant, mha_bytes_per_token, mla_bytes_per_token, n_kda,
                            prefill_activation_bytes, recorded_quant, tensor_bytes, tensors, train_activation_bytes,
                            train_state_bytes)

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
PREFILL_CHUNK = 2048  # prompt tokens per forward during prefill (mlx-lm's default --prefill-step-size)
ALIASES = {"kimi-k2": "kimi-k2-instruct"}  # the estimator's earlier name for the K2 preset
ALL_PRESETS = [*PRESETS, *K2_PRESETS, *K3_PRESETS, *ALIASES]


# ---- the model: a config class, the format its files record, its dtype ---------------------------------------------
@dataclass(frozen=True)
class Source:
    """What the estimate is of: a config (``kimi_lm.config`` class) and what config.json says about storage."""

    name: str
    config: KimiLinearConfig | KimiK2Config
    dtype: str  # bf16 | fp16 | fp32: activations and every weight not quantized or kept in fp32
    recorded_quant: Quant | None = None  # the format config.json says the weights are stored in
    router_quant: Quant | None = None  # under MLX formats (None: the router stays in the model dtype)
    measured: int | None = None  # tensor bytes of the checkpoint's shards, when it is a directory

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


def _short_dtype(name: str | None) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", None: "bf16"}.get(name, name)


def make_source(config, raw: dict | None = None, name: str = "config", measured: int | None = None) -> Source:
    """A Source from a config object and (optionally) its raw config.json, for its quantization block."""
    dtype = _short_dtype(config.dtype)
    if dtype not in DTYPE_BYTES:
        raise CheckpointError(f"{name}: unsupported dtype {config.dtype!r}")
    raw = raw if raw is not None else {"quantization_config": getattr(config, "quantization_config", None)}
    weights, router = recorded_quant(raw, DTYPE_BYTES[dtype], name)
    if isinstance(config, KimiLinearConfig):  # mlx-lm's Kimi Linear quant_predicate: router gate at affine 8-bit g64
        router = router or make_quant("affine8", 64, DTYPE_BYTES[dtype])
    return Source(name, config, dtype, weights, router, measured)


def shard_bytes(directory: Path, config=None) -> int | None:
    """Tensor bytes in a checkpoint's safetensors shards, from their headers alone (u64 length + JSON); with
    ``config``, only the tensors the loader keeps (a wrapper's vision tower and MTP layers are not the text model)."""
    from kimi_lm import names

    shards, total = sorted(directory.glob("*.safetensors")), 0
    for shard in shards:
        try:
            with open(shard, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n)) if 0 < n <= 100_000_000 else None
            total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items()
                         if k != "__metadata__" and (config is None or not names.skipped(k, config)))
        except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError, IndexError):
            raise CheckpointError(f"{shard}: not a readable safetensors file") from None
    return total if shards else None


def load_source(config) -> Source:
    """A preset name, config.json, checkpoint directory, dict or config object -> Source."""
    if isinstance(config, (KimiLinearConfig, KimiK2Config)):
        return make_source(config)
    if isinstance(config, dict):
        return make_source(config_from_dict(config, source="config"), config)
    name, path = str(config), Path(config)
    if name in ALL_PRESETS:
        return make_source(preset(ALIASES.get(name, name)), name=name)
    if (hub_path := resolve(config, ("config",))) != path:  # ORG/NAME[@REV]: its config.json from the Hub
        raw = read_config_json(hub_path / "config.json")
        cfg = config_from_dict(raw, f"{name}/config.json")
        return make_source(cfg, raw, name, shard_bytes(hub_path, cfg))
    if path.is_dir():
        raw = read_config_json(path / "config.json")
        cfg = config_from_dict(raw, str(path / "config.json"))
        return make_source(cfg, raw, path.resolve().name, shard_bytes(path, cfg))
    if path.is_file():
        raw = read_config_json(path)
        return make_source(config_from_dict(raw, str(path)), raw, path.name.removesuffix(".json").removesuffix(".config"))
    if name.endswith(".json") or "/" in name or os.sep in name:
        raise CheckpointError(f"{name}: no such config file or checkpoint directory")
    raise CheckpointError(f"unknown preset {name!r}; known presets: {', '.join(ALL_PRESETS)}")


def summary(src: Source, q: Quant) -> dict:
    """The config values every number is derived from (``Estimate.arch``), in family-neutral names."""
    c, n = src.config, src.config.num_hidden_layers
    kda = isinstance(c, KimiLinearConfig) and n_kda(c) > 0
    return dict(
        name=src.name, family=c.model_type if c.model_type in ("kimi_linear", "kimi_k3") else "kimi_k2",
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size, num_layers=n, intermediate_size=c.intermediate_size,
        tie_embeddings=c.tie_word_embeddings, dtype=src.dtype, max_context=c.max_context, heads=c.num_attention_heads,
        q_lora_rank=c.q_lora_rank or 0, kv_lora_rank=c.kv_lora_rank, qk_nope=c.qk_nope_head_dim,
        qk_rope=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, experts=c.routed_experts,
        experts_per_token=c.experts_per_token, shared_experts=c.shared_experts,
        moe_intermediate_size=c.moe_intermediate_size, router_bias=True,
        kda_heads=c.kda_num_heads if kda else 0, kda_head_dim=c.kda_head_dim if kda else 0,
        conv_kernel=c.conv_kernel_size if kda else 0, attn_res=bool(getattr(c, "attn_res_block_size", None)),
        kda_layers=[i for i in range(n) if c.is_kda_layer(i)], moe_layers=[i for i in range(n) if c.is_moe_layer(i)],
        router_quant=(src.router_quant.label() if src.router_quant and not (q.is_float or q.block or q.experts_only)
                      else None),
    )


# ---- devices -------------------------------------------------------------------------------------------------------
# name -> (memory in GiB, roughly as the driver or OS reports it; usable fraction; label). About 10 % of a GPU goes to
# the CUDA context, allocator and fragmentation; macOS lets the GPU wire ~75 % of unified memory by default (raise
# it with `sudo sysctl iogpu.wired_limit_mb`); the OS keeps ~10 % of RAM. A node of 8 GPUs is one pool (weights
# and cache sharded across them).
DEVICES = {
    "rtx-24gb": (24, 0.90, "24 GB GPU (RTX 3090/4090)"),
    "a100-40gb": (40, 0.90, "A100 40GB"),
    "a100-80gb": (80, 0.90, "A100 80GB"),
    "h100-80gb": (80, 0.90, "H100 80GB"),
    "h200-141gb": (140, 0.90, "H200 141GB"),
    "b200-192gb": (180, 0.90, "B200 192GB"),
    "mac-64gb": (64, 0.75, "Apple 64 GB unified"),
    "mac-128gb": (128, 0.75, "Apple 128 GB unified"),
    "mac-192gb": (192, 0.75, "Apple 192 GB unified"),
    "mac-512gb": (512, 0.75, "Apple 512 GB unified"),
    "ram-64gb": (64, 0.90, "64 GB RAM (CPU)"),
    "ram-128gb": (128, 0.90, "128 GB RAM (CPU)"),
    "ram-256gb": (256, 0.90, "256 GB RAM (CPU)"),
    "ram-512gb": (512, 0.90, "512 GB RAM (CPU)"),
    "ram-1tb": (1024, 0.90, "1 TB RAM (CPU)"),
    "8xh100": (8 * 80, 0.90, "8× H100 80GB node"),
    "8xh200": (8 * 140, 0.90, "8× H200 141GB node"),
    "8xb200": (8 * 180, 0.90, "8× B200 192GB node"),
}


def parse_device(spec: str) -> tuple[str, int, int, str]:
    """``h100-80gb``, ``2xa100-80gb``, ``48G``, ``1.5TiB``, ``4x48GB`` -> (name, capacity, usable bytes, label)."""
    key = spec.strip().lower()
    m = re.fullmatch(r"(?:(\d+)x)?(.+)", key)
    mult, base = (1, key) if key in DEVICES else (int(m.group(1) or 1), m.group(2))
    if base in DEVICES:
        gib, frac, label = DEVICES[base]
    elif size := re.fullmatch(r"(\d+(?:\.\d+)?)\s*(g|gb|gib|t|tb|tib)", base):
        gib, frac = float(size.group(1)) * (1024 if size.group(2)[0] == "t" else 1), 0.90
        label = f"{size.group(1)} {size.group(2)[0].upper()}iB"
    else:
        raise CheckpointError(f"unknown device {spec!r}; use a size like 48G or one of: {', '.join(DEVICES)}")
    capacity = int(mult * gib * GIB)
    if capacity <= 0:
        raise CheckpointError(f"device {spec!r}: size must be > 0")
    return key, capacity, int(capacity * frac), f"{mult}× {label}" if mult > 1 else label


# ---- the estimate --------------------------------------------------------------------------------------------------
@dataclass
class Estimate:
    """``kda_state_bytes`` and ``mla_cache_bytes_per_token`` are per sequence; ``cache_bytes``, ``activation_bytes``
    and ``total_bytes`` are for the batch at the first context (``per_context`` has them all). Exact except the
    activations (estimates). With ``train``, ``total_bytes`` counts weights, grads, optimizer and activations."""

    model: str
    family: str
    arch: dict  # the config values all numbers are derived from
    quant: str
    weights_dtype: str
    cache_dtype: str
    batch: int
    contexts: list[int]
    model_max_context: int
    total_params: int
    active_params: int  # per token: everything but the routed experts not selected
    active_params_no_embeddings: int
    weights_bytes: int
    weights_source: str  # "config" (computed) or "shards" (summed from the checkpoint's safetensors headers)
    kda_state_bytes: int
    mla_cache_bytes_per_token: int
    cache_bytes: int
    activation_bytes: int
    total_bytes: int
    params_by_component: dict
    weights_by_component: dict
    per_context: list[dict]
    comparison: dict  # cache bytes at each context: this model, every layer MLA, plain MHA
    devices: dict  # name -> label, capacity_bytes, usable_bytes, fits (first context), max_context (0: never)
    prefill_chunk: int
    train: dict | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))


def parse_context(text: str) -> list[int]:
    """``4k,128k,1M`` -> [4096, 131072, 1048576]: k = 1024 tokens, M = 1024²."""
    out = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*", part)
        if not m:
            raise CheckpointError(f"bad context {part.strip()!r}; use token counts like 4096, 4k, 128k or 1M")
        value = round(float(m.group(1)) * {"": 1, "k": KIB, "m": MIB}[m.group(2).lower()])
        if value <= 0:
            raise CheckpointError(f"context {part.strip()!r} must be > 0 tokens")
        out.append(value)
    return out


def estimate(config, quant: str | None = None, context=None, batch: int = 1, *, group_size: int | None = None,
             cache_dtype: str | None = None, devices=None, prefill_chunk: int = PREFILL_CHUNK, train: bool = False,
             optimizer: str = "adamw") -> Estimate:
    """Memory for ``config``: a preset name, config.json, checkpoint directory, dict or KimiLinearConfig.

    ``quant``: weight format (default: what the config records, else its dtype; a checkpoint directory in that
    format is measured from its shards); ``context``: tokens per sequence as an int, a list or "4k,128k,1M" (default
    4k, 128k and the model's maximum); ``batch``: sequences; ``devices``: names or sizes (default :data:`DEVICES`).
    Bad input raises :class:`CheckpointError`.
    """
    src = load_source(config)
    cfg, measured, dtype_bytes = src.config, src.measured, src.dtype_bytes
    if quant is None and group_size is None and src.recorded_quant and not train:
        q = src.recorded_quant
    else:
        q = make_quant(quant or src.dtype, group_size, dtype_bytes)
        if q != (src.recorded_quant or make_quant(src.dtype)):
            measured = None  # the shards hold another format
    if isinstance(context, str):
        contexts = parse_context(context)
    elif context is None:
        contexts = [4 * KIB, 128 * KIB] + ([cfg.max_context] if cfg.max_context > 128 * KIB else [])
    else:
        contexts = [context] if isinstance(context, int) else list(context)
    if not contexts or any(not isinstance(c, int) or c <= 0 for c in contexts):
        raise CheckpointError(f"context must be a positive number of tokens, got {context!r}")
    for value, what in ((batch, "batch"), (prefill_chunk, "prefill chunk")):
        if not isinstance(value, int) or value <= 0:
            raise CheckpointError(f"{what} must be a positive integer, got {value!r}")
    if optimizer not in ("adamw", "muon"):
        raise CheckpointError(f"unknown optimizer {optimizer!r}; known: adamw, muon")
    if train and not q.is_float:
        raise CheckpointError(f"training is estimated for unquantized weights, not {q.name}")
    cache_dtype = _short_dtype(cache_dtype) if cache_dtype else src.dtype
    if cache_dtype not in DTYPE_BYTES:
        raise CheckpointError(f"unknown cache dtype {cache_dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    cb = DTYPE_BYTES[cache_dtype]

    ts = tensors(cfg)
    params = {c: sum(t.numel for t in ts if t.component == c) for c in COMPONENTS}
    wbytes = {c: sum(tensor_bytes(t, q, dtype_bytes, src.router_quant) for t in ts if t.component == c)
              for c in COMPONENTS}
    active = sum(t.active_numel for t in ts)
    weights = measured if measured is not None else sum(wbytes.values())
    kda, per_token = kda_state_bytes(cfg, dtype_bytes), mla_bytes_per_token(cfg, cb)
    state = train_state_bytes(cfg, dtype_bytes, optimizer) if train else None
    resident = sum(state.values()) if train else weights

    def at(T: int) -> tuple[int, int]:  # (cache, activations) for the batch at context T
        if train:
            return 0, train_activation_bytes(cfg, dtype_bytes, batch, T)
        return batch * (kda + T * per_token), prefill_activation_bytes(cfg, dtype_bytes, batch, min(T, prefill_chunk))

    def longest(usable: int) -> int:  # memory grows with context: binary search up to the model's maximum
        lo, hi = 0, cfg.max_context
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if resident + sum(at(mid)) <= usable else (lo, mid - 1)
        return lo

    per_context = []
    for T in contexts:
        cache, act = at(T)
        per_context.append(dict(context=T, cache_bytes=cache, activation_bytes=act, total_bytes=resident + cache + act))
    cmp = {"contexts": contexts, "this_model": [batch * (kda + T * per_token) for T in contexts],
           "all_mla": [batch * T * mla_bytes_per_token(cfg, cb, cfg.num_hidden_layers) for T in contexts],
           "mha": [batch * T * mha_bytes_per_token(cfg, cb) for T in contexts]}
    cmp["saving_vs_all_mla"] = [1 - h / m for h, m in zip(cmp["this_model"], cmp["all_mla"])]
    cmp["saving_vs_mha"] = [1 - h / m for h, m in zip(cmp["this_model"], cmp["mha"])]
    dev = {}
    for spec in DEVICES if devices is None else devices:
        name, capacity, usable, label = parse_device(spec)
        dev[name] = dict(label=label, capacity_bytes=capacity, usable_bytes=usable,
                         fits=per_context[0]["total_bytes"] <= usable, max_context=longest(usable))
    notes = [f"context {T:,} is beyond the model's maximum of {cfg.max_context:,} tokens"
             for T in contexts if T > cfg.max_context]
    if bias := int4_bias_bytes(ts, q):
        notes.append(f"weights are the INT4 files' bytes; mlx-lm (and kimi-lm with backend=None) hold the experts "
                     f"as MLX affine 4-bit with biases (-8*scale): +{fmt_bytes(bias)}; kimi-lm's CPU backend derives "
                     f"them instead")
    arch = summary(src, q)
    return Estimate(
        model=src.name, family=arch["family"], arch=arch, quant=q.label(), weights_dtype=src.dtype,
        cache_dtype=cache_dtype, batch=batch, contexts=contexts, model_max_context=cfg.max_context,
        total_params=sum(params.values()), active_params=active,
        active_params_no_embeddings=active - params["embeddings"], weights_bytes=weights,
        weights_source="config" if measured is None else "shards", kda_state_bytes=kda,
        mla_cache_bytes_per_token=per_token, cache_bytes=per_context[0]["cache_bytes"],
        activation_bytes=per_context[0]["activation_bytes"], total_bytes=per_context[0]["total_bytes"],
        params_by_component=params, weights_by_component=wbytes, per_context=per_context, comparison=cmp,
        devices=dev, prefill_chunk=prefill_chunk, train=dict(state, optimizer=optimizer) if train else None,
        notes=notes,
    )


# ---- output --------------------------------------------------------------------------------------------------------
def fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", GIB << 10), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_tokens(n: int) -> str:
    return f"{n // MIB}M" if n % MIB == 0 else f"{n // KIB}k" if n % KIB == 0 else f"{n:,}"


def render(e: Estimate) -> str:
    """The human-readable table."""
    a, c = e.arch, e.comparison
    n_kda, n_mla = len(a["kda_layers"]), a["num_layers"] - len(a["kda_layers"])
    mixers = f"{n_kda} KDA + {n_mla} MLA" if n_kda else f"{n_mla} MLA"
    router = f", router {a['router_quant']}" if a["router_quant"] else ""
    out = [f"{e.model} ({e.family}, {a['num_layers']} layers: {mixers}) · weights {e.quant}{router} · "
           f"cache {e.cache_dtype} · batch {e.batch}", "",
           f"parameters  {e.total_params:>17,} total",
           f"            {e.active_params:>17,} active per token: {a['experts_per_token']} of {a['experts']} routed "
           f"experts + shared expert + everything else ({e.active_params_no_embeddings:,} without the embedding table)",
           f"weights     {fmt_bytes(e.weights_bytes):>17} "
           + ("(measured: safetensors shard headers)" if e.weights_source == "shards" else "(from the config)")]
    out += [f"  {k:<14} {n:>17,} params {fmt_bytes(e.weights_by_component[k]):>11}"
            for k, n in e.params_by_component.items() if n]
    if e.train:
        out.append(f"training    {e.train['optimizer']}: " + ", ".join(
            f"{k.replace('_', ' ')} {fmt_bytes(v)}" for k, v in e.train.items() if k != "optimizer"))
    else:
        if n_kda:
            H, K, W = a["kda_heads"], a["kda_head_dim"], a["conv_kernel"]
            out.append(f"KDA state   {fmt_bytes(e.kda_state_bytes):>17} per sequence, constant in context: {n_kda} "
                       f"layers × ({H}×{K}×{K} fp32 state + 3×{H * K}×{W - 1} {e.weights_dtype} conv tail)")
        out.append(f"MLA cache   {fmt_bytes(e.mla_cache_bytes_per_token):>17} per sequence and token: "
                   f"{n_mla} layers × ({a['kv_lora_rank']} + {a['qk_rope']}) × {DTYPE_BYTES[e.cache_dtype]} B")
    what = "training, estimate" if e.train else f"prefill chunk of {e.prefill_chunk} tokens, estimate"
    out += ["", f"  {'context':>8} {'cache':>11} {'activations':>11} {'total':>11}   (activations: {what})"]
    out += [f"  {fmt_tokens(r['context']):>8} {'-' if e.train else fmt_bytes(r['cache_bytes']):>11} "
            f"{fmt_bytes(r['activation_bytes']):>11} {fmt_bytes(r['total_bytes']):>11}" for r in e.per_context]
    if not e.train:
        T, i = fmt_tokens(c["contexts"][-1]), -1
        line = f"cache at {T}: this model {fmt_bytes(c['this_model'][i])}"
        if n_kda:
            line += f"; every layer MLA {fmt_bytes(c['all_mla'][i])} (hybrid saves {c['saving_vs_all_mla'][i]:.1%})"
        out += ["", line + f"; plain MHA {fmt_bytes(c['mha'][i])} (saves {c['saving_vs_mha'][i]:.1%})"]
    out += ["", f"  {'device':<28} {'memory':>11} {'usable':>11} {'fits ' + fmt_tokens(e.contexts[0]):>9}  "
                f"longest context"]
    for d in e.devices.values():
        mc = d["max_context"]
        longest = "none" if mc == 0 else f"{mc:,}" + (" (model max)" if mc == e.model_max_context else "")
        out.append(f"  {d['label']:<28} {fmt_bytes(d['capacity_bytes']):>11} {fmt_bytes(d['usable_bytes']):>11} "
                   f"{'yes' if d['fits'] else 'no':>9}  {longest}")
    return "\n".join(out + [f"note: {n}" for n in e.notes])


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error; main() prints it
        raise CheckpointError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kimi-lm estimate", description="Memory for a Kimi model at a quantization, context and batch.")
    p.add_argument("model", help=f"a preset ({', '.join(ALL_PRESETS)}), a config.json, a checkpoint directory "
                                 "or a Hugging Face Hub id ORG/NAME[@REVISION] (its config.json alone is fetched)")
    p.add_argument("--quant", help=f"weight format: {', '.join(QUANT_NAMES)} (default: as the config records)")
    p.add_argument("--group-size", type=int, help="affine group: 32, 64 (default) or 128")
    p.add_argument("--context", help="tokens per sequence, comma-separated, e.g. 4k,128k,1M (default: 4k, 128k, max)")
    p.add_argument("--batch", default="1", help="sequences decoded together (default 1)")
    p.add_argument("--cache-dtype", help="MLA cache: bf16, fp16, fp32 or fp8 (default: the model dtype)")
    p.add_argument("--prefill-chunk", default=str(PREFILL_CHUNK), help=f"prompt tokens per step (default {PREFILL_CHUNK})")
    p.add_argument("--train", action="store_true", help="full-parameter training; context = sequence length")
    p.add_argument("--optimizer", default="adamw", help="with --train: adamw (default) or muon")
    p.add_argument("--devices", help=f"comma-separated: {', '.join(DEVICES)}, sizes like 48G, or NxDEVICE")
    p.add_argument("--ram", help="this machine's RAM (e.g. 24G): resident vs memory-mapped bytes, fits or runs paged")
    p.add_argument("--tp", default="1", help="also the memory per rank of `generate --tp N` (default 1)")
    p.add_argument("--ep", default="1", help="also the memory per rank of `generate --ep N` (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", metavar="FILE.png", help="also write memory against context as a PNG")
    return p


def _positive_int(text: str, what: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", text) or int(text) <= 0:
        raise CheckpointError(f"{what} must be a positive integer, got {text!r}")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    """``kimi-lm estimate``: the table (or JSON) and exit 0; bad input: one line on stderr and exit 2."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = _parser().parse_args(argv)
        kw = dict(quant=args.quant, group_size=args.group_size, cache_dtype=args.cache_dtype,
                  batch=_positive_int(args.batch, "--batch"), train=args.train, optimizer=args.optimizer,
                  prefill_chunk=_positive_int(args.prefill_chunk, "--prefill-chunk"),
                  devices=args.devices.split(",") if args.devices else None)
        e = estimate(args.model, context=args.context, **kw)
        if args.plot:
            from kimi_lm.estimate_plot import plot  # matplotlib only when asked for

            plot(args.model, args.plot, **kw)
        if args.ram:  # resident vs mapped bytes against RAM (kimi_lm.paging)
            from kimi_lm.paging import ram_report

            ram, ram_text = ram_report(args.model, args.ram, e, args.quant, args.group_size)
        tp, ep = _positive_int(args.tp, "--tp"), _positive_int(args.ep, "--ep")
        if tp > 1 or ep > 1:  # per rank, split as kimi_lm.distributed splits a run
            from kimi_lm.distributed import memory as split

            ranks = split.per_rank(args.model, e, tp, ep, args.quant, args.group_size)
    except (CheckpointError, UsageError, OSError) as exc:  # an OSError names the file: the --plot target
        msg = f"{exc.filename}: {exc.strerror}" if isinstance(exc, OSError) and exc.filename else exc
        print(f"kimi-lm estimate: error: {msg}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    try:
        text = e.to_json() if args.json else render(e)
        if args.ram:
            text = json.dumps({**json.loads(text), "ram": ram}) if args.json else f"{text}\n{ram_text}"
        if tp > 1 or ep > 1:
            text = json.dumps({**json.loads(text), "per_rank": ranks}) if args.json else f"{text}\n\n{split.render(ranks)}"
        print(text, flush=True)
    except BrokenPipeError:  # `kimi-lm estimate ... | head`: the reader left; that is not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
    return 0


if __name__ == "__main__":
    sys.exit(main())
