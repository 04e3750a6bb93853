"""Fuzz the loader with corrupted checkpoint files: every case must raise CheckpointError (nothing else, no hang).

Mutations (deterministic, 240 in all): truncated shards, flipped bytes in the header length or the JSON header,
huge header lengths, overlapping / gapped data offsets, unknown or non-float dtypes, missing shards, broken indexes
(invalid JSON, wrong types, paths outside the checkpoint) and truncated config.json files.
"""

import json
import random
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import kimi_lm
from kimi_lm import CheckpointError

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def base(tmp_path_factory, official_checkpoint):
    """The official-layout tiny checkpoint, re-saved without header metadata (a flip inside free-form metadata
    would be a harmless change, not a corruption) and with a compact config.json."""
    d = tmp_path_factory.mktemp("fuzz-base")
    for f in official_checkpoint.iterdir():
        if f.suffix == ".safetensors":
            save_file(load_file(f), d / f.name)
        else:
            shutil.copy(f, d / f.name)
    (d / "config.json").write_text(json.dumps(json.loads((d / "config.json").read_text())))
    kimi_lm.load(d, dtype=torch.float32)  # the unmutated base loads
    return d


def header_span(path):
    """(header length n, end of the JSON text inside the header, i.e. without trailing padding spaces)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return n, 8 + len(raw[8 : 8 + n].rstrip(b" "))


def mutations(base, seed=0):
    """Yield (description, function that corrupts a copy of the checkpoint directory)."""
    rng = random.Random(seed)
    shards = sorted(p.name for p in base.glob("*.safetensors"))

    def truncate(d, shard, length):
        p = d / shard
        p.write_bytes(p.read_bytes()[:length])

    def flip(d, shard, pos, mask):
        p = d / shard
        raw = bytearray(p.read_bytes())
        raw[pos] ^= mask
        p.write_bytes(bytes(raw))

    def set_header_len(d, shard, n):
        p = d / shard
        p.write_bytes(struct.pack("<Q", n) + p.read_bytes()[8:])

    def edit_header(d, shard, fn):
        p = d / shard
        raw = p.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8 : 8 + n])
        fn(header)
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        p.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])

    def shift_offsets(header, name, delta):
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin + delta, end + delta]

    for shard in shards:
        size = (base / shard).stat().st_size
        n, json_end = header_span(base / shard)
        for _ in range(15):
            length = rng.randrange(0, size)
            yield f"truncate {shard} to {length}", lambda d, s=shard, k=length: truncate(d, s, k)
        for _ in range(25):
            pos = rng.randrange(0, json_end)
            mask = rng.randrange(1, 256)
            yield f"flip {shard} byte {pos} ^ {mask}", lambda d, s=shard, p=pos, m=mask: flip(d, s, p, m)
        for huge in (0, n - 1, size, 2**31, 2**63 + 5, 2**64 - 1):
            yield f"header length {huge} in {shard}", lambda d, s=shard, h=huge: set_header_len(d, s, h)
        names = [k for k in json.loads((base / shard).read_bytes()[8 : 8 + n]) if k != "__metadata__"]
        for _ in range(8):
            name, delta = rng.choice(names), rng.choice([-4, -1, 1, 4, 64])
            yield f"offsets of {name} moved by {delta}", lambda d, s=shard, k=name, x=delta: edit_header(
                d, s, lambda h: shift_offsets(h, k, x))
        for dtype in ("F31", "Q8", "", "I32", "U32", "F64"):  # unknown, or known but not what the model holds
            name = rng.choice(names)
            yield f"dtype {dtype!r} for {name}", lambda d, s=shard, k=name, t=dtype: edit_header(
                d, s, lambda h: h[k].update(dtype=t))
        yield f"missing shard {shard}", lambda d, s=shard: (d / s).unlink()

    def write_index(d, text):
        (d / INDEX).write_text(text)

    index = json.loads((base / INDEX).read_text())
    a_name = next(iter(index["weight_map"]))
    bad_indexes = [
        "", "{", "[]", "null", '{"weight_map": []}', '{"weight_map": "x"}', '{"metadata": {}}',
        json.dumps({"weight_map": {**index["weight_map"], a_name: "../" + shards[0]}}),
        json.dumps({"weight_map": {**index["weight_map"], a_name: "/etc/passwd"}}),
        json.dumps({"weight_map": {**index["weight_map"], a_name: 7}}),
        json.dumps({"weight_map": {**index["weight_map"], a_name: "model-99.safetensors"}}),
        json.dumps({"weight_map": {k: v for k, v in index["weight_map"].items() if k != a_name}}),
    ]
    for text in bad_indexes:
        yield f"index {text[:40]!r}", lambda d, t=text: write_index(d, t)

    config = (base / "config.json").read_text()
    for _ in range(30):
        cut = rng.randrange(0, len(config) - 1)
        yield f"config.json cut at {cut}", lambda d, k=cut: (d / "config.json").write_text(config[:k])
    for key, value in [("num_hidden_layers", 5), ("hidden_size", 65), ("num_experts", 4), ("vocab_size", "x"),
                       ("linear_attn_config", None), ("model_type", None), ("kv_lora_rank", 33)]:
        def edit(d, k=key, v=value):
            cfg = json.loads(config)
            cfg[k] = v
            (d / "config.json").write_text(json.dumps(cfg))
        yield f"config {key}={value!r}", edit


def test_every_mutation_raises_checkpoint_error(base, tmp_path):
    cases = list(mutations(base))
    assert len(cases) >= 200
    failures = []
    for i, (what, mutate) in enumerate(cases):
        d = tmp_path / f"case{i}"
        shutil.copytree(base, d)
        mutate(d)
        try:
            kimi_lm.load(d, dtype=torch.float32)
            failures.append(f"{what}: loaded without error")
        except CheckpointError:
            pass
        except Exception as exc:  # noqa: BLE001 - the point is that nothing but CheckpointError escapes
            failures.append(f"{what}: {type(exc).__name__}: {exc}")
        shutil.rmtree(d)
    assert not failures, "\n".join(failures[:20])
