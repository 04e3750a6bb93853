"""Atomic writes (``kimi_lm.files``): complete or absent, ordinary permissions, errors that name the real target."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

import kimi_lm
from kimi_lm.cli import main as cli
from kimi_lm.files import atomic_dir, atomic_path, write_file


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_file_gets_umask_permissions_and_no_temp_is_left(tmp_path, umask_022):
    write_file(tmp_path / "a.txt", "hello")
    assert (tmp_path / "a.txt").read_text() == "hello" and mode(tmp_path / "a.txt") == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    write_file(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "a.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert (tmp_path / "a.txt").read_text() == "old" and len(list(tmp_path.iterdir())) == 1


def test_errors_name_the_target_not_the_temp_file(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError) as exc:
        write_file(tmp_path / "out", b"x")
    assert exc.value.filename == str(tmp_path / "out") and ".tmp" not in str(exc.value)
    with pytest.raises(FileNotFoundError) as exc:
        write_file(tmp_path / "missing" / "f.bin", b"x")
    assert exc.value.filename == str(tmp_path / "missing" / "f.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_directory_gets_umask_permissions_and_overwrite_swaps(tmp_path, umask_022):
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("1")
    assert mode(tmp_path / "d") == 0o755 and (tmp_path / "d" / "f").read_text() == "1"
    with pytest.raises(FileExistsError):
        with atomic_dir(tmp_path / "d"):
            pass
    with atomic_dir(tmp_path / "d", overwrite=True) as tmp:
        (tmp / "g").write_text("2")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["g"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_converted_directory_is_0755(tmp_path, capsys, umask_022):
    """Issue 19 item 8: converted directories were 0700 (mkdtemp's mode)."""
    dst = tmp_path / "q"
    assert cli(["convert", str(kimi_lm.DEFAULT_MODEL), str(dst), "--quantize", "--quiet"]) == 0
    assert mode(dst) == 0o755 and mode(dst / "config.json") == 0o644 and mode(dst / "SHA256SUMS") == 0o644


def test_cache_prompt_out_directory_names_that_directory(tmp_path, capsys):
    """Issue 19 item 6: ``cache-prompt --out DIR`` named a temp file."""
    (tmp_path / "doc.txt").write_text("some text to cache")
    (tmp_path / "outdir").mkdir()
    code = cli(["cache-prompt", "--prompt-file", str(tmp_path / "doc.txt"), "--out", str(tmp_path / "outdir")])
    err = capsys.readouterr().err
    assert code == 2 and str(tmp_path / "outdir") in err and ".tmp" not in err, err
    assert sorted(p.name for p in (tmp_path / "outdir").iterdir()) == []
