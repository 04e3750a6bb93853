"""Memory-mapped loading (kimi_lm.mapped): same logits as plain reads, weights left in the page cache, the file's
pages read only when used, corrupt files still rejected, files deletable after load."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kimi_lm
from kimi_lm import checkpoint, cpu, mapped
from kimi_lm.config import preset
from kimi_lm.mapped import SplitPackedExperts
from kimi_lm.model.kimi_linear import KimiLinearForCausalLM
from kimi_lm.quant.packed import PackedStackedExperts

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 77, 1, 200, 12, 64]])


@pytest.fixture(autouse=True)
def map_small_tensors(monkeypatch):
    """Tiny models' tensors are all under ``mapped.MIN_BYTES``: map them anyway, as a full-size model's would be."""
    monkeypatch.setattr(mapped, "MIN_BYTES", 0)


def _bench():
    spec = importlib.util.spec_from_file_location("bench_full_size", ROOT / "benchmarks" / "bench_full_size.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mlx_mxfp4(out: Path, config) -> Path:
    """A random checkpoint in mlx-lm's MXFP4 layout (the full-size benchmark's writer at a small config)."""
    _bench().write_checkpoint(out, config)
    return out


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    return mlx_mxfp4(tmp_path_factory.mktemp("mmap") / "mxfp4", preset("tiny"))


@pytest.fixture(scope="module")
def floats(tmp_path_factory) -> Path:
    """The tiny model in the official float layout, fp32."""
    from checkpoints import randomize_

    from kimi_lm.save import save

    torch.manual_seed(0)
    model = randomize_(KimiLinearForCausalLM(preset("tiny")).eval())
    return save(model, tmp_path_factory.mktemp("mmap") / "fp32", max_shard_bytes=1 << 20)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def mapped_files(path: Path) -> int:
    """Mappings of this process onto the checkpoint's shards."""
    return sum(str(path) in line for line in Path("/proc/self/maps").read_text().splitlines())


@pytest.mark.parametrize("backend", [False, True])
@pytest.mark.parametrize("which,dtype", [("packed", torch.bfloat16), ("packed", torch.float32), ("floats", torch.float32),
                                         ("floats", torch.bfloat16)])
def test_mapped_model_gives_the_logits_of_the_read_one(request, which, dtype, backend):
    path = request.getfixturevalue(which)
    models = {mmap: checkpoint.load(path, dtype=dtype, mmap=mmap) for mmap in (True, False)}
    assert mapped_files(path) > 0  # the mapped model's tensors are views of the files
    if backend:
        for model in models.values():
            cpu.prepare(model)
    if backend and which == "packed":  # mapped experts keep the plain products, read ones get the C kernels
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(logits(models[True]), logits(models[False]), rtol=tol, atol=tol)
    else:
        assert torch.equal(logits(models[True]), logits(models[False]))
    experts = models[True].model.layers[1].block_sparse_moe.experts
    if which == "packed":  # mlx-lm's gate / up halves kept apart, as views; the read model stacks them
        assert isinstance(experts, SplitPackedExperts)
        read = models[False].model.layers[1].block_sparse_moe.experts
        assert isinstance(read, PackedStackedExperts) and not isinstance(read, SplitPackedExperts)
        assert torch.equal(experts.gate_up_proj, models[False].model.layers[1].block_sparse_moe.experts.gate_up_proj)


def test_kimi_lm_load_maps_by_default_and_plain_reads_map_nothing(packed):
    model = kimi_lm.load(packed)
    assert mapped_files(packed) > 0
    del model
    import gc

    gc.collect()
    assert mapped_files(packed) == 0  # the mappings go with the tensors
    model = checkpoint.load(packed, mmap=False)
    assert mapped_files(packed) == 0
    assert torch.isfinite(logits(model)).all()


def test_misaligned_tensors_are_read_instead(packed, tmp_path):
    """safetensors does not promise aligned data: one extra header byte misaligns every tensor of the file."""
    out = tmp_path / "misaligned"
    shutil.copytree(packed, out)
    for shard in out.glob("*.safetensors"):
        raw = shard.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        shard.write_bytes((n + 1).to_bytes(8, "little") + raw[8 : 8 + n] + b" " + raw[8 + n :])
    assert torch.equal(logits(checkpoint.load(out)), logits(checkpoint.load(packed, mmap=False)))


def test_truncated_file_is_a_checkpoint_error(packed, tmp_path):
    out = tmp_path / "truncated"
    shutil.copytree(packed, out)
    shard = next(out.glob("*.safetensors"))
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size - 100)
    with pytest.raises(kimi_lm.CheckpointError, match=r"not a valid safetensors file"):
        checkpoint.load(out, mmap=True)


def test_files_can_be_deleted_or_replaced_after_load(packed, tmp_path):
    """On Linux a mapping keeps its inode: deleting the checkpoint (or replacing a shard by a rename, as convert and
    downloads do) leaves the loaded model working. Truncating or rewriting a shard in place is not supported."""
    out = tmp_path / "gone"
    shutil.copytree(packed, out)
    model = kimi_lm.load(out)
    want = logits(checkpoint.load(packed, mmap=False))
    shard = next(out.glob("*.safetensors"))
    replacement = out / "new.tmp"
    replacement.write_bytes(b"\0" * shard.stat().st_size)
    os.replace(replacement, shard)  # a new file under the old name
    assert torch.allclose(logits(model), want, atol=1e-2, rtol=1e-2)  # the backend's kernels vs plain: near
    shutil.rmtree(out)
    assert torch.allclose(logits(model), want, atol=1e-2, rtol=1e-2)


RSS_SCRIPT = """
import json, re, sys, os, torch, kimi_lm
from kimi_lm.checkpoint import _model_class
from kimi_lm.config import preset
import kimi_lm.mapped
from kimi_lm.mapped import shared_and_private
kimi_lm.mapped.MIN_BYTES = 0  # at full size ~all bytes are in tensors over it; here most non-expert ones are under
with torch.device("meta"):
    _model_class(preset("tiny"))(preset("tiny"))
for f in os.listdir(sys.argv[1]):  # cold: the shards' pages out of the page cache
    fd = os.open(os.path.join(sys.argv[1], f), os.O_RDONLY); os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED); os.close(fd)
def measure():
    # the checkpoint's own resident pages (smaps Rss of its mappings): libraries the first load brings in (the C
    # kernels, oneDNN) count in RssFile too, and how much of them is resident varies from run to run
    out, in_checkpoint = shared_and_private(), False
    out["Checkpoint"] = 0
    for line in open("/proc/self/smaps"):
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's header line: address range ... path
            in_checkpoint = sys.argv[1] in line
        elif in_checkpoint and line.startswith("Rss:"):
            out["Checkpoint"] += int(line.split()[1]) * 1024
    return out
before = measure()
model = kimi_lm.load(sys.argv[1])
after = measure()
with torch.no_grad():
    model(torch.tensor([[1]]), cache=model.make_cache(1))
one = measure()
print(json.dumps({k: {"after_load": after[k] - before[k], "after_token": one[k] - before[k]} for k in before}))
"""


def test_rss_after_load_stays_far_below_the_file_size(tmp_path):
    """A packed checkpoint (~200 MB, experts dominate): loading maps, it reads nothing, so RSS grows by a fraction of
    the files; a decode step reads the experts its token uses (a few of 128 per layer), not every expert."""
    config = dataclasses.replace(preset("bench"), num_experts=128)
    path = mlx_mxfp4(tmp_path / "big", config)
    disk = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path)], capture_output=True, text=True, check=True,
                         cwd=ROOT / "tests")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"\n{disk / 2**20:.0f} MiB on disk: " + ", ".join(f"{k} {v['after_load'] / 2**20:.1f} / {v['after_token'] / 2**20:.1f}"
                                                           f" MiB" for k, v in r.items()))
    assert disk > 150 * 2**20
    assert r["Checkpoint"]["after_load"] < 0.05 * disk  # mapped, not read
    assert r["RssAnon"]["after_load"] < 0.1 * disk
    assert r["Checkpoint"]["after_token"] < 0.5 * disk  # one token: its experts (and the dense weights), not all
    assert r["RssAnon"]["after_token"] < 0.15 * disk


def test_config_json_of_the_writer_is_the_official_one(packed):
    raw = json.loads((packed / "config.json").read_text())
    assert raw["quantization"]["mode"] == "mxfp4" and raw["quantization"] == raw["quantization_config"]
    assert raw["quantization"]["model.layers.1.mlp.gate"] == {"group_size": 64, "bits": 8}


def test_estimator_ram_answer_fits_or_runs_paged(capsys):
    """The 48B model in MXFP4 (26 GB): on 24 GiB it runs paged when mapped and does not fit when read; on 64 GiB
    it fits. Resident bytes are the runtime and what loading converts (nothing, for mlx-lm's layout)."""
    from kimi_lm.estimate import main

    assert main(["kimi-linear-48b-a3b", "--quant", "mxfp4", "--context", "4k", "--ram", "24G", "--json"]) == 0
    ram = json.loads(capsys.readouterr().out)["ram"]
    assert ram["mmap"]["verdict"] == "runs, paged" and ram["read"]["verdict"] == "does not fit"
    assert ram["mmap"]["mapped_bytes"] > 24e9 and ram["mmap"]["resident_bytes"] < 2 * 2**30
    assert main(["kimi-linear-48b-a3b", "--quant", "mxfp4", "--context", "4k", "--ram", "64G"]) == 0
    assert "memory-mapped (default)" in (out := capsys.readouterr().out) and ": fits" in out
