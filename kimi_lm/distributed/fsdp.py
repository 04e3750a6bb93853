"""``kimi-lm train --fsdp``: FSDP2 sharding of a built model, activation checkpointing, DCP checkpoints.

    torchrun --nproc-per-node 4 -m kimi_lm train --config tiny-k3 --data docs/ --out runs/k3 --fsdp \
        [--activation-checkpointing]

Applied from outside the model (``kimi_lm/model`` never imports this), torchtitan-style:

* :func:`shard_model`: ``fully_shard`` (``torch.distributed.fsdp``, FSDP2) on every layer's mixer (``self_attn``)
  and FFN (``block_sparse_moe`` / ``mlp``), on the embedding and ``lm_head`` (unless tied), then on the whole model,
  which keeps the small rest (norms, AttnRes pseudo-queries). Parameters, gradients (reduce-scattered, averaged
  over ranks) and the optimizer state (``optim.Optimizers(sharded=True)``: AdamW on local rows, ``GatheredMuon``)
  are all sharded along dim 0. The sublayers, not the decoder layers, are the units because Block AttnRes calls a
  layer's ``attention`` / ``feed_forward`` and reads its depth-attention weights between them: a layer unit would be
  resharded in between.
* :func:`checkpoint_activations`: each sublayer's forward runs under ``torch.utils.checkpoint`` (non-reentrant), so
  its activations are recomputed in backward instead of kept (the same losses, tested).
* Each rank takes its slice of the global batch (``--batch-size`` is global; ranks must divide it), so the gradient
  equals the one-process run's; the logged loss is the mean over ranks; the MoE load counts behind the router-bias
  update are summed over ranks, so every rank nudges the biases alike.
* Checkpoints ``RUN_DIR/step-N/``: config.json, tokenizer files, ``trainer_state.json`` and ``dcp/``, written with
  ``torch.distributed.checkpoint`` (every rank its own rows) through ``HuggingFaceStorageWriter``: safetensors files
  whose shard offsets sit in the safetensors header as JSON. The default DCP format pickles its ``.metadata``;
  this one never unpickles anything, on resume or on export. ``--resume`` reloads model and optimizer state from
  ``dcp/`` (DCP reshards, so the rank count may change). :func:`export_checkpoint` (``python -m
  kimi_lm.distributed.fsdp STEP_DIR DST``) loads ``dcp/`` into a full model in one process and writes the usual
  safetensors layout that ``kimi_lm.load`` reads.

The model is built on the meta device, sharded, and only then allocated (``to_empty``): a rank never holds more
than its rows, plus one whole parameter while it is initialised (``train.init.init_weights`` draws each parameter
whole, in the one-process order, and keeps its rows: the same weights as one process) or while Muon
orthogonalises its update.

References: PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) and DCP docs; torchtitan ``parallelize.py``
(per-block sharding, activation checkpointing) and ``checkpoint.py``; Moonlight's distributed Muon (gathered
Newton–Schulz).
"""

from __future__ import annotations

import contextlib
import functools
import json
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from kimi_lm.errors import CheckpointError, UsageError

DCP_DIR = "dcp"


# ---- sharding -------------------------------------------------------------------------------------------------------
def sublayers(model: nn.Module) -> list[nn.Module]:
    """Every decoder layer's mixer and FFN: the units of sharding and of activation checkpointing."""
    return [m for layer in model.model.layers
            for m in (layer.self_attn, layer.block_sparse_moe if layer.is_moe else layer.mlp)]


def _contexts():
    """(forward, recomputation) contexts of a checkpointed call: recomputed router calls are not new MoE load."""
    from kimi_lm.train.balance import not_counted

    return contextlib.nullcontext(), not_counted()


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # evaluation: nothing to save for backward
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, context_fn=_contexts, **kwargs)


def checkpoint_activations(model: nn.Module) -> None:
    """Recompute each sublayer's activations in backward instead of keeping them (before :func:`shard_model`, so
    FSDP's hooks stay outside the recomputed region)."""
    for m in sublayers(model):
        m.forward = functools.partial(_checkpointed, m.forward)


def shard_model(model: nn.Module, activation_checkpointing: bool = False, device: str = "cpu") -> nn.Module:
    """FSDP2 over the default process group's ranks (one mesh dimension) on ``device``; returns ``model``, sharded
    in place. ``model`` may be on the meta device: then ``model.to_empty(device=...)`` allocates each rank's rows."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if activation_checkpointing:
        checkpoint_activations(model)
    # the MoE returns a view of its output (a reshape); the model only ever adds sublayer outputs out of place, so
    # the case FSDP2 warns about (an in-place op on that view dropping its backward hook) cannot happen
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for m in sublayers(model):
        fully_shard(m, mesh=mesh)
    if not model.config.tie_word_embeddings:  # a tied weight belongs to one unit: leave it to the root
        fully_shard(model.model.embed_tokens, mesh=mesh)
        fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def rows_of(full: torch.Tensor, p) -> torch.Tensor:
    """The rows of ``full`` (a whole parameter's value) that this rank holds of parameter ``p``: FSDP2's Shard(0)
    placement, ``torch.chunk`` along dim 0 by mesh rank (trailing ranks may hold none). A plain tensor: all."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor):
        return full
    chunks = torch.chunk(full, p.device_mesh.size(), dim=0)
    rank = p.device_mesh.get_local_rank()
    rows = chunks[rank] if rank < len(chunks) else full[:0]
    if rows.shape != p.to_local().shape:
        raise RuntimeError(f"parameter sharded as {tuple(p.to_local().shape)} on rank {rank}, expected rows "
                           f"{tuple(rows.shape)} of {tuple(full.shape)} (FSDP2 Shard(0) placement)")
    return rows


# ---- per-step helpers ------------------------------------------------------------------------------------------------
def local_rows(t: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a global batch [B, ...] (B divisible by the world size: checked at start)."""
    n = t.shape[0] // dist.get_world_size()
    return t[dist.get_rank() * n : (dist.get_rank() + 1) * n]


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    value = value.detach().clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> float:
    """``torch.nn.utils.clip_grad_norm_`` over sharded gradients: the global L2 norm from every rank's local squares,
    then the same clamped scale on every shard. Returns the norm before clipping."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
    squares = torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros(())
    total = sum_over_ranks(squares).sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return total.item()


# ---- checkpoints ------------------------------------------------------------------------------------------------------
def _state(model: nn.Module, optim=None) -> dict[str, torch.Tensor]:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    if optim is not None:
        state.update({f"optim.{k}": v for k, v in optim.live_state().items()})
    return state


def save_checkpoint(model: nn.Module, optim, path: Path, files: dict[str, bytes | str]) -> None:
    """Write ``path`` (a ``step-N`` directory) from every rank: ``dcp/`` (each rank its rows), then rank 0 adds
    ``files`` (config, tokenizer, trainer state) and renames the finished ``path.tmp`` into place."""
    import torch.distributed.checkpoint as dcp

    tmp = path.with_name(path.name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(_state(model, optim), storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / DCP_DIR),
                                                                             save_distributed=True))
    dist.barrier()  # every rank's files are complete
    if dist.get_rank() == 0:
        for name, content in files.items():
            (tmp / name).write_bytes(content.encode() if isinstance(content, str) else content)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    dist.barrier()


def _load_into(state: dict[str, torch.Tensor], path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    folder = path / DCP_DIR
    if not folder.is_dir():
        raise CheckpointError(f"{path}: no {DCP_DIR}/ folder; not a checkpoint written by `kimi-lm train --fsdp`")
    try:
        dcp.load(state, storage_reader=dcp.HuggingFaceStorageReader(str(folder)))
    except Exception as exc:  # DCP wraps every reader failure (missing key, short file) in its own exception type
        raise CheckpointError(f"{folder}: cannot load the sharded checkpoint ({str(exc).strip()[:300]})") from None


def load_checkpoint(model: nn.Module, optim, path: Path) -> None:
    """``--resume``: the sharded model and optimizer state of ``path`` into the already sharded ``model`` / ``optim``
    (in place; DCP reads each rank's rows, whatever the rank count that wrote them)."""
    _load_into(_state(model, optim), path)


def export_checkpoint(src, dst, dtype: torch.dtype | None = None) -> Path:
    """A ``kimi-lm train --fsdp`` checkpoint ``src`` (step-N with ``dcp/``) -> ``dst`` in the layout
    ``kimi_lm.load`` reads (config, safetensors shards + index, tokenizer files), in one process, no pickle."""
    from kimi_lm.config import load_config
    from kimi_lm.save import save
    from kimi_lm.train.train import new_model

    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src}: no config.json; expected a step-N directory of `kimi-lm train --fsdp`")
    if dst.exists():
        raise CheckpointError(f"{dst}: already exists; choose a new output directory")
    model = new_model(load_config(src / "config.json"))
    state = _state(model)
    with _quiet_no_dist_warning():
        _load_into(state, src)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    return save(model, dst, dtype=dtype, tokenizer_dir=src)


class _quiet_no_dist_warning:
    """DCP warns that it runs without a process group when loading in one process: that is the intent here."""

    def __enter__(self):
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def main(argv: list[str] | None = None) -> int:
    """``python -m kimi_lm.distributed.fsdp STEP_DIR DST [--dtype bfloat16]``: export a sharded checkpoint."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m kimi_lm.distributed.fsdp",
                                description="Write a `kimi-lm train --fsdp` checkpoint (step-N with dcp/) as a "
                                            "checkpoint directory kimi_lm.load reads.")
    p.add_argument("src", help="step-N directory written by kimi-lm train --fsdp")
    p.add_argument("dst", help="output directory (must not exist; written atomically)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights' dtype in the output (default float32, as trained)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        out = export_checkpoint(args.src, args.dst, getattr(torch, args.dtype))
    except (UsageError, CheckpointError, OSError) as exc:
        print(f"{p.prog}: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"src": args.src, "dst": str(out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
