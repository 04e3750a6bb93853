r"""A tiny Kimi checkpoint that can chat: random tiny model + a small BPE ``tiktoken.model`` + tokenizer config + the
official Kimi Linear chat template, laid out as the real checkpoint directory.

The vocabulary is 256 single bytes plus merges learned from a short corpus. The trainer keeps digit runs whole, so
merges like "12345" exist that Kimi's ``\p{N}{1,3}`` rule must never let the encoder use. Special ids follow the
base vocabulary with the real model's offsets (``<|im_end|>`` = base + 2, …); the model's embedding has base + 256
rows, so — as in Kimi Linear, whose ids 163840/163841 exceed the 163840-row embedding — the last two special ids
cannot be fed to the model.

:func:`k3_chat_checkpoint` is a tiny random Kimi K3 (``tiny-k3``: SiTU, latent MoE, gates, AttnRes) in the release
layout (``kimi_k3`` wrapper config, two shards, vision tensors) with a K3 tokenizer: K3's special tokens
(``<|open|>``, ``<|close|>``, ``<|sep|>``, ``<|end_of_msg|>`` at base + 3, 4, 5, 2) and no Jinja template, so the
XTML chat format is selected from the checkpoint's own files, as for the real release.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import randomize_
from kimi_lm.config import preset
from kimi_lm.model.kimi_linear import KimiLinearForCausalLM
from kimi_lm.train.bpe import write_tokenizer
from kimi_lm.xtml import SPECIAL_TOKENS as K3_SPECIAL_TOKENS

TEMPLATE = Path(__file__).parent / "data" / "kimi-linear-48b-a3b-instruct.chat_template.jinja"
# A Jinja template in the XTML format (messages, thinking on/off), as a user would pass with --chat-template
XTML_JINJA = """{%- for m in messages -%}
<|open|>message role="{{ m.role }}"<|sep|>{{ m.content }}<|close|>message<|sep|><|end_of_msg|>
{%- endfor -%}
{%- if add_generation_prompt -%}
<|open|>message role="assistant"<|sep|><|open|>{{ 'think' if thinking | default(true) else 'response' }}<|sep|>
{%- endif -%}"""
CORPUS = (
    "The quick brown fox jumps over the lazy dog. the then there these those this that. "
    "Hello world! hello again, world. 12345 123456 1234567 12345678 2024 3.14159 1000000 "
    "漢字漢字 你好你好 世界世界 "
) * 3
_BUILT: dict[str, Path] = {}


def train_bpe(corpus: str, merges: int) -> dict[bytes, int]:
    """Byte-level BPE: ranks 0-255 are the single bytes, then one rank per most-frequent-pair merge."""
    ranks = {bytes([b]): b for b in range(256)}
    words = Counter(tuple(bytes([b]) for b in w.encode()) for w in re.findall(r"\d+|\s?[^\s\d]+", corpus))
    for _ in range(merges):
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        merged = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return ranks


def build_model_dir(directory: Path, vocab_size: int, seed: int) -> Path:
    """A random tiny Kimi Linear written as transformers 5 lays it out (stacked experts, one safetensors file).

    Built with kimi-lm's own module (no transformers import: these tests check generation against the same model's
    full forward, not parity, which tests/test_model.py covers). Gates get realistic ranges so KDA state matters.
    """
    cfg = dataclasses.replace(preset("tiny"), vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = randomize_(KimiLinearForCausalLM(cfg), router_bias=0.0)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return directory


def chat_checkpoint(tmp_path_factory, seed: int = 0) -> Path:
    """Build (once per test session and seed) the tiny chat checkpoint directory."""
    key = f"seed{seed}"
    if key not in _BUILT:
        ranks = train_bpe(CORPUS, merges=60)
        directory = build_model_dir(tmp_path_factory.mktemp(f"chat_{key}"), len(ranks) + 256, seed)
        write_tokenizer(directory, ranks, TEMPLATE.read_text())
        _BUILT[key] = directory
    return _BUILT[key]


def write_k3_tokenizer(directory: Path, ranks: dict[bytes, int], named: bool = True,
                       model_type: str | None = None) -> int:
    """A K3-layout tokenizer: ``tiktoken.model`` + ``tokenizer_config.json`` naming K3's special ids (or none, with
    ``named=False``); with ``model_type``, a ``config.json`` that says it."""
    n = write_tokenizer(directory, ranks)
    decoder = {str(n + off): {"content": name, "special": True} for off, name in K3_SPECIAL_TOKENS.items()}
    config = {"added_tokens_decoder": decoder if named else {}, "bos_token": "[BOS]", "eos_token": "[EOS]",
              "tokenizer_class": "TikTokenTokenizer"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if model_type:
        (directory / "config.json").write_text(json.dumps({"model_type": model_type}))
    return n


def k3_chat_checkpoint(tmp_path_factory, seed: int = 0) -> Path:
    """A tiny random Kimi K3 checkpoint (release layout) with a K3 tokenizer, built once per session and seed."""
    from k3_checkpoints import random_model, tiny_config, write_checkpoint

    key = f"k3_seed{seed}"
    if key not in _BUILT:
        ranks = train_bpe(CORPUS, merges=60)
        # the embedding has base + 256 rows, as the real model's: the last two special ids cannot be fed to it
        model = random_model(tiny_config(vocab_size=len(ranks) + 256), seed)
        directory = write_checkpoint(model, tmp_path_factory.mktemp(f"chat_{key}"))
        write_k3_tokenizer(directory, ranks)
        _BUILT[key] = directory
    return _BUILT[key]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread (and the test machine is shared): restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The chat checkpoint, its model and tokenizer, as module-scoped fixtures for the generation tests.
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return chat_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def model(ckpt):
    import kimi_lm

    return kimi_lm.load(ckpt, dtype=torch.float32)


@pytest.fixture(scope="module")
def tok(ckpt):
    import kimi_lm

    return kimi_lm.load_tokenizer(ckpt)
