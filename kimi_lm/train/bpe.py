"""Train a small byte-level BPE and write it in the Kimi tokenizer layout (``tiktoken.model`` + config + template).

The merges are learned by Hugging Face ``tokenizers`` (Rust ``BpeTrainer``) with Kimi's own pre-tokenisation regex
(``tokenizer.PAT_STR``) followed by its byte-level alphabet, then converted to tiktoken ranks: ranks 0–255 are the
single bytes, then one rank per merge in the order learned. tiktoken's encoder (merge the adjacent pair whose
concatenation has the lowest rank) then reproduces the BPE's segmentation; the test compares the two encoders.

``write_tokenizer`` lays the files out as the official checkpoints do: the special tokens sit right after the base
vocabulary with the official offsets (``[BOS]`` = N, ``[EOS]`` = N+1, ``<|im_end|>`` = N+2, …, ``[PAD]`` = N+255) and
the chat template is Kimi Linear's.

Reference: ``tokenizers`` BpeTrainer; tiktoken ``_educational.py`` (rank-order merging); spec
``kimi_linear.md`` §7.1–7.2 (file layout and special ids).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from kimi_lm.tokenizer import PAT_STR

# offset from the base-vocabulary size -> special token (Kimi-K2 / Kimi-Linear tokenizer_config.json, spec §7.2)
SPECIAL_OFFSETS = {
    0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>", 6: "<|start_header_id|>",
    7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>", 11: "<|tool_calls_section_begin|>",
    12: "<|tool_calls_section_end|>", 13: "<|tool_call_begin|>", 14: "<|tool_call_argument_begin|>",
    15: "<|tool_call_end|>", 17: "<|im_middle|>", 254: "[UNK]", 255: "[PAD]",
}


def _byte_decoder() -> dict[str, int]:
    """Inverse of the GPT-2 byte -> printable-character map that byte-level BPE vocabularies are written in."""
    from tokenizers import pre_tokenizers

    # ByteLevel's alphabet is the 256 characters; recover the map with the same construction GPT-2 uses
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    decoder = {chr(c): b for b, c in zip(printable, chars)}
    assert set(decoder) == set(pre_tokenizers.ByteLevel.alphabet())
    return decoder


def train_hf_bpe(texts, vocab_size: int):
    """A ``tokenizers`` byte-level BPE with ``vocab_size`` entries, pre-tokenised by Kimi's regex."""
    try:
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
    except ImportError:
        raise ImportError("training a tokenizer needs the `tokenizers` package: pip install tokenizers") from None
    if vocab_size <= 256:
        raise ValueError(f"vocab_size must exceed the 256 single bytes, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def tiktoken_ranks(tok) -> dict[bytes, int]:
    """{token bytes: rank}: the 256 single bytes in byte order, then each merge's result in the order learned."""
    merges = json.loads(tok.to_str())["model"]["merges"]
    decode = _byte_decoder()
    ranks = {bytes([b]): b for b in range(256)}
    for merge in merges:
        a, b = merge.split(" ") if isinstance(merge, str) else merge
        ranks.setdefault(bytes(decode[c] for c in a + b), len(ranks))  # two merges may spell the same bytes
    return ranks


def train_bpe(texts, vocab_size: int) -> dict[bytes, int]:
    """Byte-level BPE ranks {token bytes: id} with about ``vocab_size`` entries (256 bytes + merges)."""
    return tiktoken_ranks(train_hf_bpe(texts, vocab_size))


def write_tokenizer(directory: str | Path, ranks: dict[bytes, int], chat_template: str | None = None) -> int:
    """Write ``tiktoken.model``, ``tokenizer_config.json`` (and ``chat_template.jinja``); returns the base size."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    (directory / "tiktoken.model").write_text("\n".join(lines) + "\n")
    n = len(ranks)
    decoder = {str(n + off): {"content": name, "special": not 11 <= off <= 15}  # tool markers are special=false
               for off, name in SPECIAL_OFFSETS.items()}
    config = {"added_tokens_decoder": decoder, "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]",
              "unk_token": "[UNK]", "tokenizer_class": "TikTokenTokenizer", "model_max_length": 1048576}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if chat_template is not None:
        (directory / "chat_template.jinja").write_text(chat_template)
    return n
