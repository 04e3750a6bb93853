"""Models by Hugging Face Hub id: ``ORG/NAME[@REVISION]`` wherever a checkpoint directory is accepted.

Every entry point (``kimi_lm.load``, ``load_tokenizer``, the CLI's ``--model``, ``convert``, ``estimate``, ``verify``,
``train --config/--tokenizer``, ``kimi-lm download``) calls :func:`resolve` once:

* a local path that exists always wins; a ``str`` of the form ``ORG/NAME`` or ``ORG/NAME@REVISION`` that is no
  local path is fetched with ``huggingface_hub.snapshot_download`` (a ``pathlib.Path`` is always a local path, and
  so is a name ending in ``.json``: a config file);
* only the files kimi-lm reads come down (:data:`PARTS`: config, tokenizer, weights and the files SHA256SUMS lists,
  which ``verify`` checks; ``estimate`` takes the config alone), into the Hub cache that transformers, mlx-lm and
  vLLM share (``HF_HOME`` / ``HF_HUB_CACHE``); files already there are not fetched again, an interrupted transfer resumes with a range request and a re-run fetches only
  the files still missing; ``HF_HUB_OFFLINE=1`` uses the cache alone, ``HF_TOKEN`` (or ``hf auth login``) opens
  gated and private repositories, ``HF_ENDPOINT`` points at a mirror;
* before a download of :data:`ASK_ABOVE` bytes or more it says how much (from the Hub's file list) and what
  ``kimi_lm.estimate`` predicts for this machine; the CLI then asks (``--yes`` skips the question; without a
  terminal to ask on it refuses and names ``--yes``), the Python API goes ahead as transformers does;
* the repository is checked before anything comes down (the files kimi-lm needs are in its list) and before the
  weights come down (config.json, fetched first, must be a model kimi-lm runs);
* every failure is one :class:`~kimi_lm.errors.CheckpointError` (unknown id, no network, offline with nothing
  cached, gated without a token, not a supported model) or :class:`~kimi_lm.errors.UsageError` (declined).

Reference: ``huggingface_hub.snapshot_download`` (cache layout ``models--ORG--NAME/{blobs,refs,snapshots}``);
mlx-lm ``utils.load`` / vLLM ``--model`` (Hub ids accepted where paths are).
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from kimi_lm.errors import CheckpointError, UsageError

GIB = 1 << 30
ASK_ABOVE = 10 * GIB  # bytes still to download from which the size is announced and the CLI asks first
# what each part of a checkpoint is, as huggingface_hub patterns (top-level files only: see IGNORE)
PARTS = {
    "config": ("config.json",),
    "tokenizer": ("tiktoken.model", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                  "generation_config.json"),
    "weights": ("*.safetensors", "*.safetensors.index.json", "SHA256SUMS"),
}
ALL = tuple(PARTS)
IGNORE = ("*/*",)  # shards in sub-folders (original/, consolidated/) are other formats kimi-lm does not read
HUB_ID = re.compile(r"(?!.*\.json$)(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")


def parse_id(text: str) -> tuple[str, str | None] | None:
    """``"ORG/NAME@REV"`` -> ``("ORG/NAME", "REV")``; ``"ORG/NAME"`` -> ``("ORG/NAME", None)``; else None."""
    m = HUB_ID.fullmatch(text)
    return (m["repo"], m["revision"]) if m else None


def resolve(model: str | Path, parts: tuple[str, ...] = ALL, *, confirm: bool = False) -> Path:
    """The local directory of ``model``: the path itself, or the Hub snapshot holding ``parts`` of ``ORG/NAME[@REV]``.

    ``confirm``: ask on the terminal before a large download (the CLI without ``--yes``); False announces it only.
    """
    path = Path(model)
    if isinstance(model, Path) or path.exists() or not (hub_id := parse_id(str(model))):
        return path
    return download(*hub_id, parts=parts, confirm=confirm)


def download(repo_id: str, revision: str | None = None, parts: tuple[str, ...] = ALL, *, confirm: bool = False) -> Path:
    """Fetch ``parts`` of a Hub repository into the Hub cache (or find them there) and return the snapshot folder."""
    from huggingface_hub import constants

    patterns = [p for part in parts for p in PARTS[part]]
    try:
        if constants.is_offline_mode():
            return _cached(repo_id, revision, patterns, None)
        try:
            plan = _plan(repo_id, revision, patterns)
        except Exception as exc:  # no network: the cache may hold it (transformers and mlx-lm fall back the same way)
            cause = exc.__cause__ if type(exc).__name__ == "DryRunError" and exc.__cause__ else exc
            if not _is_network_error(cause):
                raise cause from None
            return _cached(repo_id, revision, patterns, cause)
        _check_files(repo_id, plan, parts)
        config = _fetch_config(repo_id, plan) if "weights" in parts else None
        if "weights" in parts and (listed := _listed_in_sums(repo_id, plan, patterns)):
            patterns += listed
            plan = _plan(repo_id, plan[0].commit_hash, patterns)
        todo = sum(f.file_size or 0 for f in plan if f.will_download)
        if todo >= ASK_ABOVE:
            _announce_and_confirm(repo_id, revision, plan, todo, config, confirm)
        elif todo:
            print(f"Downloading {repo_id}: {_fmt(todo)} in {sum(f.will_download for f in plan)} file(s)",
                  file=sys.stderr)
        return Path(_snapshot(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as exc:
        if isinstance(exc, (CheckpointError, UsageError)):
            raise
        raise _explain(exc, repo_id, revision) from None


# ---- steps ----------------------------------------------------------------------------------------------------------
def _snapshot(repo_id: str, **kw):
    from huggingface_hub import snapshot_download

    from kimi_lm import __version__

    return snapshot_download(repo_id, ignore_patterns=list(IGNORE), library_name="kimi-lm",
                             library_version=__version__, **kw)


def _plan(repo_id: str, revision: str | None, patterns: list[str]) -> list:
    """The Hub's file list for ``patterns`` (always with config.json): size, commit, whether each is cached."""
    from tqdm.auto import tqdm

    class Quiet(tqdm):  # the dry run's "Fetching N files" bar would only be noise
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    plan = _snapshot(repo_id, revision=revision, allow_patterns=[*patterns, "config.json"], dry_run=True,
                     tqdm_class=Quiet)
    return sorted(plan, key=lambda f: f.filename)


def _cached(repo_id: str, revision: str | None, patterns: list[str], network_error: Exception | None) -> Path:
    """The snapshot already in the Hub cache (offline mode, or the Hub not reachable)."""
    from huggingface_hub import constants

    try:
        path = Path(_snapshot(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception as exc:
        name = f"{repo_id}@{revision}" if revision else repo_id
        incomplete = type(exc).__name__ == "IncompleteSnapshotError"
        held = "is only partly in" if incomplete else "is not in"
        if network_error is None:
            why = "offline mode is on (HF_HUB_OFFLINE=1)"
            fix = "unset HF_HUB_OFFLINE"
        else:
            why = f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached ({_first_line(network_error)})"
            fix = "connect to the network"
        raise CheckpointError(f"{name}: {why}, and it {held} the Hub cache {constants.HF_HUB_CACHE}; {fix} and run "
                              f"`kimi-lm download {name}` (or copy the model there, or give a local directory)") from None
    if network_error is not None:
        print(f"{repo_id}: the Hugging Face Hub cannot be reached ({_first_line(network_error)}); using the cached "
              f"copy {path}", file=sys.stderr)
    return path


def _check_files(repo_id: str, plan: list, parts: tuple[str, ...]) -> None:
    """The repository holds what kimi-lm reads, before anything comes down."""
    names = {f.filename for f in plan}
    need = []
    if ("config" in parts or "weights" in parts) and "config.json" not in names:
        need.append("config.json")
    if "tokenizer" in parts and "tiktoken.model" not in names:
        need.append("tiktoken.model (Kimi's tokenizer)")
    if "weights" in parts and not any(n.endswith(".safetensors") for n in names):
        need.append("*.safetensors weights")
    if need:
        raise CheckpointError(f"{repo_id}: not a model kimi-lm can run: the repository has no {', '.join(need)} "
                              f"(kimi-lm reads Kimi Linear and Kimi K2 checkpoints in safetensors, official or MLX)")


def _listed_in_sums(repo_id: str, plan: list, patterns: list[str]) -> list[str]:
    """Files SHA256SUMS lists beyond ``patterns``: ``kimi-lm verify`` checks every one (kimi-lm writes it so)."""
    from fnmatch import fnmatch

    from huggingface_hub import hf_hub_download

    from kimi_lm.verify import SUMS, read_sums

    if not any(f.filename == SUMS for f in plan):
        return []
    sums = read_sums(Path(hf_hub_download(repo_id, SUMS, revision=plan[0].commit_hash)))
    return [n for n in sums if "/" not in n and not any(fnmatch(n, p) for p in patterns)]


def _fetch_config(repo_id: str, plan: list) -> Path:
    """config.json first (a few KB), checked to be a model kimi-lm runs before the weights are fetched."""
    from huggingface_hub import hf_hub_download

    from kimi_lm.config import config_from_dict, read_config_json

    commit = plan[0].commit_hash
    path = Path(hf_hub_download(repo_id, "config.json", revision=commit))
    try:
        config_from_dict(read_config_json(path), f"{repo_id}/config.json")
    except CheckpointError as exc:
        raise CheckpointError(f"{repo_id}: not a model kimi-lm can run: {exc}") from None
    return path


def _announce_and_confirm(repo_id: str, revision: str | None, plan: list, todo: int, config: Path | None,
                          confirm: bool) -> None:
    """Say how much comes down and whether it fits this machine; with ``confirm``, ask (or refuse without a TTY)."""
    from huggingface_hub import constants

    files = [f for f in plan if f.will_download]
    cached = sum(f.file_size or 0 for f in plan if not f.will_download)
    commit = plan[0].commit_hash[:8]
    lines = [f"{repo_id} (revision {revision or 'main'}, commit {commit}): {_fmt(todo)} to download in "
             f"{len(files)} file(s)" + (f" ({_fmt(cached)} already cached)" if cached else "")]
    cache = Path(constants.HF_HUB_CACHE)
    existing = next((p for p in (cache, *cache.parents) if p.exists()), None)
    free = shutil.disk_usage(existing).free if existing else None
    room = "" if free is None else f", {_fmt(free)} free" + (" - NOT ENOUGH" if free < todo else "")
    lines.append(f"  into the Hub cache {cache}{room}")
    if config is not None:
        lines.append("  " + _fit_line(config))
    print("\n".join(lines), file=sys.stderr)
    if not confirm:
        return
    name = f"{repo_id}@{revision}" if revision else repo_id
    if not sys.stdin.isatty():
        raise UsageError(f"{name}: not downloading {_fmt(todo)} without confirmation, and there is no terminal to ask "
                         f"on; pass --yes to download it (or `kimi-lm download {name} --yes` first)")
    print(f"Download {_fmt(todo)}? [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline().strip().lower()
    if answer not in ("y", "yes"):
        raise UsageError(f"{name}: download declined; nothing was downloaded")


def _fit_line(config: Path) -> str:
    """What ``kimi_lm.estimate`` predicts for running the model (4k context, batch 1) against this machine."""
    from kimi_lm.estimate import estimate, fmt_tokens

    machine = [(f"{ram / GIB:.1f}G", f"{ram / GIB:.1f} GiB RAM")] if (ram := ram_bytes()) else []
    try:
        import torch

        if torch.cuda.is_available():
            n, mem = torch.cuda.device_count(), torch.cuda.get_device_properties(0).total_memory
            machine.append((f"{n}x{mem / GIB:.1f}G", f"{n} x {mem / GIB:.1f} GiB GPU"))
        e = estimate(config, context=4096, devices=[spec for spec, _ in machine])
    except CheckpointError as exc:
        return f"kimi_lm.estimate: unavailable ({exc})"
    text = f"kimi_lm.estimate: {_fmt(e.total_bytes)} to run it ({e.quant} weights, 4k context, batch 1)"
    verdicts = []
    for (_, label), d in zip(machine, e.devices.values()):
        if d["fits"]:
            verdicts.append(f"{label}: fits (up to {fmt_tokens(d['max_context'])} tokens)")
        else:
            verdicts.append(f"{label}: does NOT fit ({_fmt(d['usable_bytes'])} usable)")
    return text + ("; this machine: " + "; ".join(verdicts) if verdicts else "")


def ram_bytes() -> int | None:
    """Physical memory of this machine: /proc/meminfo's MemTotal, else sysconf (macOS, BSD); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


# ---- errors ---------------------------------------------------------------------------------------------------------
def _is_network_error(exc: BaseException) -> bool:
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    return isinstance(exc, (httpx2.TransportError, OfflineModeIsEnabled, ConnectionError, TimeoutError))


def _explain(exc: BaseException, repo_id: str, revision: str | None) -> CheckpointError:
    """One readable line for whatever huggingface_hub raised."""
    from huggingface_hub import constants, errors
    from huggingface_hub.utils import get_token

    name = f"{repo_id}@{revision}" if revision else repo_id
    url = f"{constants.ENDPOINT}/{repo_id}"
    if isinstance(exc, errors.GatedRepoError):
        who = "your token has no access to it yet" if get_token() else "no Hugging Face token is set"
        return CheckpointError(f"{name}: a gated model and {who}: accept its conditions at {url}, then log in "
                               f"(`hf auth login`) or set HF_TOKEN")
    if isinstance(exc, errors.RepositoryNotFoundError):
        return CheckpointError(f"{name}: no such local directory, and no model {repo_id} on the Hugging Face Hub "
                               f"({url}); check the name, or if it is private, log in (`hf auth login`) or set HF_TOKEN")
    if isinstance(exc, errors.RevisionNotFoundError):
        return CheckpointError(f"{name}: {repo_id} has no revision {revision!r} (a branch, tag or commit of {url})")
    if isinstance(exc, errors.HFValidationError):
        return CheckpointError(f"{name}: no such local directory, and not a valid Hugging Face Hub id ({exc})")
    if _is_network_error(exc) or isinstance(exc, errors.LocalEntryNotFoundError):
        return CheckpointError(f"{name}: download failed ({_first_line(exc)}); files already complete are kept in "
                               f"the Hub cache, run the same command again to fetch the rest")
    if isinstance(exc, errors.HfHubHTTPError):
        return CheckpointError(f"{name}: the Hugging Face Hub answered: {_first_line(exc)}")
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return CheckpointError(f"{name}: {where}{exc.strerror or exc}")
    return CheckpointError(f"{name}: {type(exc).__name__}: {_first_line(exc)}")


def _first_line(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def _fmt(n: float) -> str:
    from kimi_lm.estimate import fmt_bytes

    return fmt_bytes(n)
