"""``kimi-lm verify``: SHA256SUMS written in sha256sum format, checked, and a single flipped byte caught."""

from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest

from kimi_lm import CheckpointError
from kimi_lm.verify import SUMS, main, read_sums, verify, write_sums


@pytest.fixture
def ckpt(tmp_path, official_checkpoint):
    d = tmp_path / "ckpt"
    shutil.copytree(official_checkpoint, d)
    return d


def test_write_then_verify_and_sha256sum_format(ckpt):
    write_sums(ckpt, progress=False)
    sums = read_sums(ckpt / SUMS)
    files = sorted(p.name for p in ckpt.iterdir() if p.name != SUMS)
    assert sorted(sums) == files and len(files) == 5  # 3 shards, index, config
    shard = ckpt / "model-00001-of-00003.safetensors"
    assert sums[shard.name] == hashlib.sha256(shard.read_bytes()).hexdigest()
    assert verify(ckpt, progress=False) == 5
    if shutil.which("sha256sum"):  # the standard tool reads our file
        subprocess.run(["sha256sum", "--check", "--quiet", SUMS], cwd=ckpt, check=True)


def test_single_flipped_byte_is_detected(ckpt, capsys):
    write_sums(ckpt, progress=False)
    shard = ckpt / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"1 of 5 file\(s\) failed: model-00002-of-00003\.safetensors \(expected"):
        verify(ckpt, progress=False)
    assert main([str(ckpt), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kimi-lm verify: ") and "Traceback" not in err


def test_missing_and_unlisted_shards(ckpt):
    write_sums(ckpt, progress=False)
    (ckpt / "model-00003-of-00003.safetensors").rename(ckpt / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"2 of 5 .*model-00003-of-00003\.safetensors \(listed, but missing\).*"
                                               r"extra\.safetensors \(a shard not listed"):
        verify(ckpt, progress=False)


@pytest.mark.parametrize("text,match", [
    ("", "lists no files"),
    ("abc  model.safetensors\n", "expected '<64 hex digits>"),
    ("0" * 64 + "  ../config.json\n", "not a plain name"),
    ("0" * 64 + "  a\n" + "1" * 64 + " *a\n", "listed twice"),
])
def test_malformed_sums_file(ckpt, text, match):
    (ckpt / SUMS).write_text(text)
    with pytest.raises(CheckpointError, match=match):
        verify(ckpt, progress=False)


def test_cli_write_and_missing_file(ckpt, capsys):
    assert main([str(ckpt), "--quiet"]) == 2  # no SHA256SUMS yet
    assert "not found" in capsys.readouterr().err
    assert main([str(ckpt), "--write", "--quiet"]) == 0
    assert main([str(ckpt), "--quiet"]) == 0
    assert "all 5 file(s) match" in capsys.readouterr().out



def test_convert_output_carries_sums(tmp_path, tmp_path_factory):
    from k2_checkpoints import build_reference, to_fp8_layout
    from kimi_lm.config import preset
    from kimi_lm.convert import dequantize_checkpoint

    hf_dir = tmp_path / "hf"
    build_reference(preset("tiny-k2"), seed=7).save_pretrained(hf_dir)
    src, _ = to_fp8_layout(hf_dir, tmp_path / "fp8")
    dst = tmp_path / "bf16"
    dequantize_checkpoint(src, dst, progress=False)
    assert set(read_sums(dst / SUMS)) == {p.name for p in dst.iterdir() if p.name != SUMS}
    assert verify(dst, progress=False) >= 3
