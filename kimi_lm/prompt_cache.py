"""Prompt caches: the model's state after a token sequence, reusable by later prompts and savable to a file.

A hybrid model's state cannot be rewound like a KV cache. The MLA layers' latent cache can be cut to any length,
but a KDA layer holds one recurrent state (plus its conv tail) for the whole prefix: the state after token n cannot
be recovered from the state after token m > n. So a :class:`PromptCache` keeps, besides the live state, KDA
*snapshots* at chosen boundaries (the end of each prompt it prefilled). A new prompt reuses the longest common
prefix only down to the largest boundary it can restore exactly: the live end, or a snapshot (MLA cut to the same
length); otherwise it starts cold. Reuse therefore never changes the output: a cache hit gives exactly the tokens
of a cold run.

``max_kv_size`` makes the MLA layers sliding windows (:class:`RotatingMLACache`, as mlx-lm's rotating cache): they
keep the latents of the last N tokens only, which changes the model's output once the context exceeds N. Such a
cache cannot be cut, so it is reused only when the new prompt extends everything it holds.

File format (safetensors, nothing pickled): ``tokens`` [N] int64, ``logits`` [V] fp32 (the last position's, so a
prompt equal to the cached one needs no forward pass), ``layers.{i}.conv_state`` / ``.state`` (KDA) or
``.latent`` [1, L, 576] (MLA), ``snapshots.{n}.…`` likewise; metadata: format, version, the model fingerprint
(hash of config.json, every weight's name, shape and dtype, and a few weight values), max_kv_size, and free-form
entries such as the chat template mode used by ``kimi-lm cache-prompt``.

Reference: mlx-lm ``models/cache.py`` (save/load_prompt_cache, RotatingKVCache, can_trim_prompt_cache).
"""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kimi_lm.cache import KDACache, MLACache, ModelCache
from kimi_lm.files import atomic_path

FORMAT = "kimi-lm prompt cache"
VERSION = "2"  # 2: the model fingerprint hashes the weights by name (1: in state_dict order)
MAX_SNAPSHOTS = 4  # KDA snapshots kept in memory (each is a few tens of MB for the 48B model)


class PromptCacheError(ValueError):
    """A prompt cache file is unreadable, from another model, or cannot serve the prompt."""


class RotatingMLACache(MLACache):
    """MLA latents of the last ``max_size`` tokens only. Each call still sees the kept window plus its own new
    tokens; the oldest are dropped afterwards. Storage is compacted (amortised O(1) per token) instead of rolled."""

    def __init__(self, batch_size: int, width: int, max_size: int, dtype: torch.dtype, device="cpu"):
        super().__init__(batch_size, width, dtype, device)
        self.max_size = max_size
        self.start = 0  # index in ``buffer`` of the oldest kept latent

    def append(self, latent: torch.Tensor) -> torch.Tensor:
        B, T, W = latent.shape
        need = self.length + T
        if self.start + need > self.buffer.shape[1]:
            kept = self.buffer[:, self.start : self.start + self.length]
            capacity = max(2 * need, 256)
            if capacity > self.buffer.shape[1]:
                grown = self.buffer.new_empty(B, capacity, W)
                grown[:, : self.length] = kept
                self.buffer = grown
            else:
                self.buffer[:, : self.length] = kept.clone()  # ranges may overlap
            self.start = 0
        end = self.start + need
        self.buffer[:, self.start + self.length : end] = latent
        window = self.buffer[:, self.start : end]
        drop = max(0, need - self.max_size)
        self.start, self.length = self.start + drop, need - drop
        return window

    def latents(self) -> torch.Tensor:
        return self.buffer[:, self.start : self.start + self.length]

    def padded(self, multiple: int) -> None:
        return None  # the window ``append`` returns no longer ends at ``start + length``


def make_cache(model, batch_size: int = 1, max_kv_size: int | None = None) -> ModelCache:
    """``model.make_cache``, with the MLA layers as sliding windows of ``max_kv_size`` tokens if given."""
    cache = model.make_cache(batch_size=batch_size)
    if max_kv_size is not None:
        if max_kv_size < 1:
            raise ValueError(f"max_kv_size must be a positive number of tokens, got {max_kv_size}")
        for i, layer in enumerate(cache.layers):
            if isinstance(layer, MLACache):
                b = layer.buffer
                cache.layers[i] = RotatingMLACache(b.shape[0], b.shape[2], max_kv_size, b.dtype, b.device)
    return cache


_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def model_fingerprint(model) -> str:
    """Hash of the config, every weight's name/shape/dtype (by name) and the first values of the first by name.
    Computed once per model object, and by ``kimi_lm.cpu.prepare`` before it swaps the modules: it reads
    ``state_dict()``, which the backend's packed modules answer with dense copies of every weight (the same names,
    shapes and dtypes), and the server makes a prompt cache per request."""
    if model not in _fingerprints:
        _fingerprints[model] = _fingerprint(model)
    return _fingerprints[model]


def _fingerprint(model) -> str:
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    state = sorted(model.state_dict().items())  # by name: the backend's modules list theirs in another order
    for name, t in state:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    h.update(state[0][1].detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def _layer_tensors(layer) -> dict[str, torch.Tensor]:
    """The state tensors of one layer cache, by file name suffix."""
    if isinstance(layer, KDACache):
        return {"conv_state": layer.conv_state, "state": layer.state}
    if isinstance(layer, RotatingMLACache):
        return {"latent": layer.latents()}
    return {"latent": layer.buffer[:, : layer.length]}


@dataclass
class Snapshot:
    kda: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (conv_state, state) clones
    logits: torch.Tensor | None  # [V] fp32 at this boundary


class PromptCache:
    """A batch-1 model cache plus the tokens it has consumed, the last logits and KDA snapshots."""

    def __init__(self, model, max_kv_size: int | None = None):
        self.model = model
        self.fingerprint = model_fingerprint(model)
        self.max_kv_size = max_kv_size
        self.metadata: dict[str, str] = {}
        self.reset()

    def reset(self) -> None:
        self.cache = make_cache(self.model, 1, self.max_kv_size)
        self.tokens: list[int] = []
        self.logits: torch.Tensor | None = None
        self.snapshots: dict[int, Snapshot] = {}

    @property
    def nbytes(self) -> int:
        snaps = sum(c.nbytes + s.nbytes for snap in self.snapshots.values() for c, s in snap.kda.values())
        return self.cache.nbytes + snaps

    def check_model(self, model) -> None:
        if model_fingerprint(model) != self.fingerprint:
            raise PromptCacheError("this prompt cache was made with a different model "
                                   "(config, weights or dtype differ)")

    def advance(self, tokens: list[int], logits: torch.Tensor) -> None:
        """Record that the model just consumed ``tokens`` through ``self.cache``; ``logits`` [V] of the last one."""
        self.tokens.extend(int(t) for t in tokens)
        self.logits = logits

    def snapshot(self) -> None:
        """Remember the KDA state at the current length so a later prompt can resume from exactly here."""
        if self.max_kv_size is not None or not self.tokens:
            return  # a sliding window cannot be cut back to this length later
        kda = {i: (layer.conv_state.clone(), layer.state.clone())
               for i, layer in enumerate(self.cache.layers) if isinstance(layer, KDACache)}
        self.snapshots[len(self.tokens)] = Snapshot(kda, None if self.logits is None else self.logits.clone())
        while len(self.snapshots) > MAX_SNAPSHOTS:
            del self.snapshots[min(self.snapshots)]

    def restorable(self, prompt: list[int]) -> int:
        """Length of the longest prefix of ``prompt`` whose state is known exactly (0 = none); changes nothing.

        A boundary equal to the whole prompt counts only if its logits are stored (the next token needs them).
        """
        n = 0
        for a, b in zip(self.tokens, prompt):
            if a != b:
                break
            n += 1
        usable = lambda b, logits: b > 0 and (b < len(prompt) or logits is not None)  # noqa: E731
        candidates = [len(self.tokens)] if n == len(self.tokens) and usable(n, self.logits) else []
        candidates += [b for b, s in self.snapshots.items() if b <= n and usable(b, s.logits)]
        return max(candidates, default=0)

    def reuse(self, prompt: list[int]) -> int:
        """Rewind to ``restorable(prompt)`` tokens; returns that length (0 = cold)."""
        best = self.restorable(prompt)
        if best == 0:
            self.reset()
        elif best != len(self.tokens):
            self._rewind(best)
        return best

    def _rewind(self, n: int) -> None:
        snap = self.snapshots[n]
        for i, layer in enumerate(self.cache.layers):
            if isinstance(layer, KDACache):
                conv, state = snap.kda[i]
                layer.conv_state.copy_(conv)  # in place: the model may hold views of these tensors
                layer.state.copy_(state)
            else:
                layer.length = n  # MLA latents of tokens 0 … n−1 are still in the buffer
        self.cache.offset = n
        self.tokens = self.tokens[:n]
        self.logits = snap.logits
        self.snapshots = {b: s for b, s in self.snapshots.items() if b <= n}


# ---- files ----------------------------------------------------------------------------------------------------------
def save_prompt_cache(path: str | Path, pc: PromptCache, metadata: dict[str, str] | None = None) -> None:
    """Write ``pc`` as safetensors (atomically: a crash never leaves a truncated cache behind)."""
    path = Path(path)
    tensors = {"tokens": torch.tensor(pc.tokens, dtype=torch.int64)}
    if pc.logits is not None:
        tensors["logits"] = pc.logits.float().cpu()
    for i, layer in enumerate(pc.cache.layers):
        for key, t in _layer_tensors(layer).items():
            tensors[f"layers.{i}.{key}"] = t
    for n, snap in pc.snapshots.items():
        for i, (conv, state) in snap.kda.items():
            tensors[f"snapshots.{n}.layers.{i}.conv_state"] = conv
            tensors[f"snapshots.{n}.layers.{i}.state"] = state
        if snap.logits is not None:
            tensors[f"snapshots.{n}.logits"] = snap.logits.float().cpu()
    meta = {**pc.metadata, **(metadata or {})}
    meta.update(format=FORMAT, version=VERSION, fingerprint=pc.fingerprint, num_tokens=str(len(pc.tokens)),
                max_kv_size="" if pc.max_kv_size is None else str(pc.max_kv_size))
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def load_prompt_cache(path: str | Path, model) -> PromptCache:
    """Read a prompt cache for ``model``; every problem raises one :class:`PromptCacheError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise PromptCacheError(f"{path}: prompt cache file not found")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise PromptCacheError(f"{path}: not a readable safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise PromptCacheError(f"{path}: not a kimi-lm prompt cache (metadata 'format' is {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise PromptCacheError(f"{path}: prompt cache version {meta.get('version')!r}, this kimi-lm reads {VERSION!r}; "
                               f"make it again with `kimi-lm cache-prompt`")
    if meta.get("fingerprint") != model_fingerprint(model):
        raise PromptCacheError(f"{path}: this prompt cache was made with a different model (config, weights or dtype "
                               f"differ); make it again with `kimi-lm cache-prompt` for this model")
    try:
        max_kv = int(meta["max_kv_size"]) if meta.get("max_kv_size") else None
        pc = PromptCache(model, max_kv)
        tokens = _take(tensors, "tokens", path, dtype=torch.int64, ndim=1).tolist()
        if str(len(tokens)) != meta.get("num_tokens"):
            raise PromptCacheError(f"{path}: 'tokens' holds {len(tokens)} ids, metadata says {meta.get('num_tokens')}")
        for i, layer in enumerate(pc.cache.layers):
            _fill_layer(layer, i, tensors, path, len(tokens), max_kv)
        pc.cache.offset = len(tokens)
        pc.tokens = tokens
        pc.logits = _logits(tensors, "logits", path, model)
        for key in sorted({k.split(".")[1] for k in tensors if k.startswith("snapshots.")}):
            if not key.isdigit() or not 0 < int(key) <= len(tokens):
                raise PromptCacheError(f"{path}: snapshot {key!r} is not a token count within the cached prompt")
            kda = {}
            for i, layer in enumerate(pc.cache.layers):
                if isinstance(layer, KDACache):
                    conv = _take(tensors, f"snapshots.{key}.layers.{i}.conv_state", path, like=layer.conv_state)
                    kda[i] = (conv, _take(tensors, f"snapshots.{key}.layers.{i}.state", path, like=layer.state))
            pc.snapshots[int(key)] = Snapshot(kda, _logits(tensors, f"snapshots.{key}.logits", path, model))
    except KeyError as exc:
        raise PromptCacheError(f"{path}: tensor {exc.args[0]!r} is missing") from None
    pc.metadata = {k: v for k, v in meta.items() if k not in ("format", "version", "fingerprint", "num_tokens")}
    return pc


def _take(tensors: dict, key: str, path: Path, like: torch.Tensor | None = None, dtype=None, ndim=None) -> torch.Tensor:
    t = tensors[key]
    if like is not None and (t.shape != like.shape or t.dtype != like.dtype):
        raise PromptCacheError(f"{path}: tensor {key!r} is {list(t.shape)} {t.dtype}, this model needs "
                               f"{list(like.shape)} {like.dtype}")
    if (dtype is not None and t.dtype != dtype) or (ndim is not None and t.dim() != ndim):
        raise PromptCacheError(f"{path}: tensor {key!r} is {list(t.shape)} {t.dtype}, expected {ndim}-d {dtype}")
    return t if like is None else t.to(like.device)


def _logits(tensors: dict, key: str, path: Path, model) -> torch.Tensor | None:
    if key not in tensors:
        return None
    t = tensors[key]
    if t.shape != (model.config.vocab_size,) or t.dtype != torch.float32:
        raise PromptCacheError(f"{path}: tensor {key!r} must be [{model.config.vocab_size}] float32")
    return t.to(model.lm_head.weight.device)


def _fill_layer(layer, i: int, tensors: dict, path: Path, n_tokens: int, max_kv: int | None) -> None:
    if isinstance(layer, KDACache):
        layer.conv_state.copy_(_take(tensors, f"layers.{i}.conv_state", path, like=layer.conv_state))
        layer.state.copy_(_take(tensors, f"layers.{i}.state", path, like=layer.state))
        return
    key = f"layers.{i}.latent"
    latent = tensors[key]
    kept = n_tokens if max_kv is None else min(n_tokens, max_kv)
    want = [1, kept, layer.buffer.shape[2]]
    if list(latent.shape) != want or latent.dtype != layer.buffer.dtype:
        raise PromptCacheError(f"{path}: tensor {key!r} is {list(latent.shape)} {latent.dtype}, this model needs "
                               f"{want} {layer.buffer.dtype}")
    layer.append(latent.to(layer.buffer.device))
