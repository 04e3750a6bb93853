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
