"""``kimi-lm verify``: check a checkpoint directory against its ``SHA256SUMS`` (or write one with ``--write``).

    kimi-lm verify DIR            every file listed must exist and hash as listed; every *.safetensors must be listed
    kimi-lm verify DIR --write    hash every file in DIR (top level) into DIR/SHA256SUMS

The file is in ``sha256sum`` / ``shasum -a 256`` format, one ``<64 hex>  <name>`` line per file (``*<name>``, the
binary-mode marker, is read too), so ``sha256sum -c SHA256SUMS`` checks what kimi-lm writes and vice versa — the step
the Kimi-Linear MXFP4 MLX model card asks for. ``kimi-lm convert`` writes one for its output. Hashing streams 8 MiB
blocks with a tqdm bar over bytes; ``SHA256SUMS`` is written to a temporary file and renamed, never half-written.

Reference: GNU coreutils ``sha256sum`` (output and ``--check`` format); seed ``001_kimi_linear_mxfp4_mlx_model_card``.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

from tqdm import tqdm

from kimi_lm.errors import CheckpointError, UsageError
from kimi_lm.files import write_file
from kimi_lm.hub import resolve

SUMS = "SHA256SUMS"
_BLOCK = 8 << 20
_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](.+)")


def _hash_files(directory: Path, names: list[str], progress: bool) -> dict[str, str]:
    total = sum((directory / n).stat().st_size for n in names)
    digests = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc="sha256", disable=not progress) as bar:
        for name in names:
            h = hashlib.sha256()
            with open(directory / name, "rb") as fh:
                while block := fh.read(_BLOCK):
                    h.update(block)
                    bar.update(len(block))
            digests[name] = h.hexdigest()
    return digests


def write_sums(directory, progress: bool = True) -> Path:
    """Hash every regular file at the top of ``directory`` (not SHA256SUMS itself, nor hidden files) into SHA256SUMS."""
    directory = Path(directory)
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != SUMS and not p.name.startswith("."))
    digests = _hash_files(directory, names, progress)
    return write_file(directory / SUMS, "".join(f"{digests[n]}  {n}\n" for n in names))


def read_sums(path: Path) -> dict[str, str]:
    """SHA256SUMS -> {file name: lowercase hex digest}; names must be plain files of the same directory."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found (create it with `kimi-lm verify {path.parent} --write`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot be read as text ({exc})") from None
    sums = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.fullmatch(line)
        if m is None:
            raise CheckpointError(f"{path}:{i}: expected '<64 hex digits>  <file name>', found {line[:80]!r}")
        name = m.group(2)
        if "/" in name or "\\" in name or name in (".", ".."):
            raise CheckpointError(f"{path}:{i}: file name {name!r} is not a plain name in this directory")
        if name in sums:
            raise CheckpointError(f"{path}:{i}: file {name!r} is listed twice")
        sums[name] = m.group(1).lower()
    if not sums:
        raise CheckpointError(f"{path}: lists no files")
    return sums


def verify(directory, progress: bool = True) -> int:
    """Check every listed file; returns how many were checked. Raises CheckpointError naming every mismatch."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    sums = read_sums(directory / SUMS)
    problems = [f"{n} (listed, but missing)" for n in sums if not (directory / n).is_file()]
    problems += [f"{p.name} (a shard not listed in {SUMS})" for p in sorted(directory.glob("*.safetensors"))
                 if p.name not in sums]
    present = [n for n in sums if (directory / n).is_file()]
    for name, digest in _hash_files(directory, present, progress).items():
        if digest != sums[name]:
            problems.append(f"{name} (expected sha256 {sums[name]}, found {digest})")
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{directory / SUMS}: {len(problems)} of {len(sums)} file(s) failed: {shown}")
    return len(sums)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kimi-lm verify", description="Check a checkpoint directory against SHA256SUMS.")
    p.add_argument("dir", help="checkpoint directory, or a Hugging Face Hub id ORG/NAME[@REVISION] to fetch and check")
    p.add_argument("--yes", "-y", action="store_true", help="download a Hub model without asking, however large")
    p.add_argument("--write", action="store_true", help=f"create {SUMS} from the files present instead of checking")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.write:
            if not Path(args.dir).is_dir():
                raise CheckpointError(f"{args.dir}: not a directory")
            path = write_sums(args.dir, progress=not args.quiet)
            print(f"wrote {path}")
        else:
            n = verify(resolve(args.dir, confirm=not args.yes), progress=not args.quiet)
            print(f"{args.dir}: all {n} file(s) match {SUMS}")
    except (CheckpointError, UsageError) as exc:
        print(f"kimi-lm verify: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
