"""Shared fixtures: tiny random checkpoints written by transformers, in both layouts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoints import build_reference, save_reference, to_official_layout  # noqa: E402
from kimi_lm.config import preset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_config():
    return preset("tiny")


@pytest.fixture(scope="session")
def reference_model(tiny_config):
    return build_reference(tiny_config, seed=0)


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory, reference_model):
    """Directory as transformers' save_pretrained writes it (transformers config keys, one file)."""
    return save_reference(reference_model, tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="session")
def official_checkpoint(tmp_path_factory, hf_checkpoint):
    """Directory in the official remote-code layout (linear_attn_config, dense layer as mlp.*, 3 shards + index)."""
    return to_official_layout(hf_checkpoint, tmp_path_factory.mktemp("official"))


@pytest.fixture
def token_ids(tiny_config):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, tiny_config.vocab_size, (2, 77), generator=g)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|, in fp32."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def one_call_and_calls(moe, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A CPU backend MoE block's output for one token x through its one-call plan (moe_decode) and through the
    multi-call path (the plan set aside for one call, then restored)."""
    one_call = moe(x)
    plan, moe._plan = moe._plan, None
    calls = moe(x)
    moe._plan = plan
    return one_call, calls


LOAD_RSS_SCRIPT = """
import json, sys, torch, kimi_lm
from kimi_lm.checkpoint import _model_class
from kimi_lm.config import preset
def kib(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key))
# one-time costs that do not grow with the model (torch's first CPU kernels map ~75 MB of libraries): pay them on a
# tiny model of the same family first, so the measurement is what loading *this* checkpoint adds
with torch.device("meta"):
    _model_class(preset(sys.argv[2]))(preset(sys.argv[2]))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = kib("VmRSS:")
dtype = torch.bfloat16 if sys.argv[3] == "default" else getattr(torch, sys.argv[3])
model = kimi_lm.load(sys.argv[1], dtype=dtype)
print(json.dumps({"peak": (kib("VmHWM:") - before) * 1024, "after": (kib("VmRSS:") - before) * 1024,
                  "lm_head": type(model.lm_head).__name__}))
"""


def load_rss_growth(ckpt, warmup_preset: str, dtype: str = "default", threads: int | None = None) -> dict:
    """kimi_lm.load(ckpt) in a fresh process: growth of its peak and final resident memory in bytes while loading
    ({"peak", "after"}), and the loaded lm_head's class name ({"lm_head"})."""
    import json
    import os
    import subprocess

    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    out = subprocess.run([sys.executable, "-c", LOAD_RSS_SCRIPT, str(ckpt), warmup_preset, dtype],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])
