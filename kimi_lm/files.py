"""Atomic writes: a file or directory appears complete under its final name, or not at all.

    with atomic_path("out.png") as tmp:        # write tmp any way you like (a path: safetensors, savefig, ...)
        fig.savefig(tmp, format="png")
    write_file("SHA256SUMS", text)             # the same for bytes or str in one call
    with atomic_dir("run/step-100") as tmp:    # fill the directory tmp; it is renamed to run/step-100 at the end
        ...

Everything is written beside the target (same directory, so the final ``os.replace`` / ``rename`` is atomic on one
filesystem) under a hidden name ``.<target>.<random>.tmp``, and removed again if anything fails, including Ctrl-C.
Permissions are those a plain ``open()`` / ``mkdir()`` would give (``0o666`` / ``0o777`` less the umask), not the
private ``0o600`` / ``0o700`` of ``tempfile.mkstemp`` / ``mkdtemp``. An ``OSError`` names the target the caller
asked for, never the temporary name.

Reference: POSIX ``rename(2)`` (atomic replacement within one filesystem); Python ``os.replace``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set, then put back at once
    os.umask(mask)
    return mask


def _as_target_error(exc: OSError, target: Path) -> OSError:
    """The same error, naming ``target`` (the temporary name means nothing to the user)."""
    return type(exc)(exc.errno, exc.strerror or str(exc), str(target))


def _check_target(target: Path, want_dir: bool) -> None:
    if not target.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, f"the folder {target.parent} does not exist", str(target))
    if not want_dir and target.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory, expected a file name", str(target))


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; when the block ends without an error it replaces ``path``."""
    target = Path(path)
    _check_target(target, want_dir=False)
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    except OSError as exc:
        raise _as_target_error(exc, target) from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        try:
            os.replace(tmp, target)
        except OSError as exc:
            raise _as_target_error(exc, target) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_file(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (str as UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False):
    """Yield a temporary directory beside ``path``; when the block ends without an error it becomes ``path``.

    An existing ``path`` is an error (``FileExistsError``) unless ``overwrite``: then the old directory is swapped
    out by two renames (it is missing for an instant, never half-written) and deleted."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(errno.EEXIST, "already exists; choose a new output directory", str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    except OSError as exc:
        raise _as_target_error(exc, target) from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; the output is an ordinary directory
        yield tmp
        try:
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(target)
        except OSError as exc:
            raise _as_target_error(exc, target) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
