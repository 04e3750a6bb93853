"""Tokenizer: special ids, the Kimi pre-tokenisation regex, long-input splitting, round trips, streaming decode."""

import json
import random

import pytest
import regex

from kimi_lm.errors import CheckpointError
from kimi_lm.tokenizer import MAX_RUN_CHARS, PAT_STR, load_tokenizer, split_long_runs
from kimi_lm.train.bpe import SPECIAL_OFFSETS
from tiny_chat import CORPUS, TEMPLATE, train_bpe, write_tokenizer

TEXTS = [
    "Hello world! The quick brown fox.",
    "naïve café — Ünïcödé, combining: e\u0301 a\u0308; emoji 🦊👩‍💻; RTL: שלום",
    "漢字漢字 你好，世界。Hello世界 and 世界hello",
    "digits 12345 1234567 3.14159 2024-01-01 1000000",
    "whitespace   runs\n\n\n\t\t  and\r\n\r\n   trailing   ",
    "<|im_system|>system<|im_middle|>S<|im_end|><|im_user|>user<|im_middle|>Hi<|im_end|>",
    "don't DON'T we'll I'M they've",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    write_tokenizer(d, train_bpe(CORPUS, merges=60), TEMPLATE.read_text())
    return d


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_special_ids_follow_the_base_vocabulary(tok):
    n = tok.num_base_tokens
    assert n == 316 and tok.n_vocab == n + 258
    for off, name in SPECIAL_OFFSETS.items():
        assert tok.special_tokens[name] == n + off
    assert tok.special_tokens[f"<|reserved_token_{n + 5}|>"] == n + 5  # unnamed ids get reserved names
    assert tok.special_tokens[f"<|reserved_token_{n + 257}|>"] == n + 257
    assert tok.eos_token_id == n + 1 and tok.im_end_id == n + 2
    assert tok.stop_token_ids == {n + 1, n + 2}


def test_special_tokens_are_allowed_by_default(tok):
    n = tok.num_base_tokens
    assert tok.encode("<|im_end|>") == [n + 2]
    assert tok.encode(f"a<|reserved_token_{n + 5}|>b") == [ord("a"), n + 5, ord("b")]
    plain = tok.encode("<|im_end|>", allow_special_tokens=False)
    assert len(plain) > 1 and all(i < n for i in plain)
    assert tok.decode(plain) == "<|im_end|>"


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_tokens_never_cross_pre_tokenisation_pieces(tok, text):
    # Oracle: the same regex run by the `regex` module (V1 supports the `&&` class intersection). Every piece
    # boundary must be a token boundary (special tokens off, so the regex sees the whole text).
    boundaries, pos = set(), 0
    for piece in regex.compile(PAT_STR, flags=regex.V1).findall(text):
        pos += len(piece.encode())
        boundaries.add(pos)
    token_ends, pos = set(), 0
    for i in tok.encode(text, allow_special_tokens=False):
        pos += len(tok.token_bytes(i))
        token_ends.add(pos)
    assert pos == len(text.encode()) and boundaries <= token_ends


def test_digits_group_by_three_even_with_longer_merges(tok):
    assert tok.token_to_id("12345") is not None  # the merge exists ...
    pieces = [tok.token_bytes(i) for i in tok.encode("12345678")]
    assert pieces == [b"123", b"4", b"5", b"6", b"7", b"8"]  # ... but \p{N}{1,3} never lets it be used


def test_han_and_latin_split_apart(tok):
    ids = tok.encode("Hello漢字")
    assert [tok.token_bytes(i) for i in ids][-1] == "漢字".encode()


def _official_split(s: str, max_len: int):
    """tokenization_kimi.py's _split_whitespaces_or_nonwhitespaces, verbatim logic: the oracle."""
    current_len, current_is_space, start = 0, s[0].isspace() if s else False, 0
    for i in range(len(s)):
        now = s[i].isspace()
        if current_is_space ^ now:
            current_len, current_is_space = 1, now
        else:
            current_len += 1
            if current_len > max_len:
                yield s[start:i]
                start, current_len = i, 1
    yield s[start:]


def test_long_runs_are_cut_as_the_official_tokenizer_does():
    rng = random.Random(0)
    for _ in range(20):
        runs = [rng.choice("ab\u00a0 \n\t") * rng.choice([1, 7, MAX_RUN_CHARS - 1, MAX_RUN_CHARS, MAX_RUN_CHARS + 3,
                                                            2 * MAX_RUN_CHARS + 1]) for _ in range(6)]
        text = "".join(runs)
        assert split_long_runs(text) == list(_official_split(text, MAX_RUN_CHARS))


def test_very_long_input_round_trips(tok):
    text = "a" * 60_000 + " " * 30_000 + "漢字" * 10 + "b"
    assert tok.decode(tok.encode(text)) == text


def test_streaming_detokenizer_never_emits_broken_utf8(tok):
    text = "漢字 🦊 naïve 世界"
    ids = [b for ch in text for b in ch.encode()]  # byte tokens are ids 0-255: every multi-byte char is split
    detok = tok.detokenizer()
    deltas = [detok.add_token(i) for i in ids] + [detok.finalize()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[:3] == ["", "", "漢"]  # held until the third byte completes the character


def test_streaming_matches_decode_on_invalid_bytes(tok):
    ids = [0xE6, 0xBC, ord("a"), 0x80, 0xF0, 0x9F]  # truncated char, stray continuation, unfinished tail
    detok = tok.detokenizer()
    streamed = "".join(detok.add_token(i) for i in ids) + detok.finalize()
    assert streamed == tok.decode(ids) == bytes(ids).decode("utf-8", errors="replace")


def test_missing_vocabulary_names_the_file(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="tiktoken.model"):
        load_tokenizer(tmp_path)


def test_bad_vocabulary_line_names_file_and_line(tmp_path):
    (tmp_path / "tiktoken.model").write_text("YQ== 0\nnot-base64! 1\n")
    with pytest.raises(CheckpointError, match=r"tiktoken.model: line 2"):
        load_tokenizer(tmp_path)


def test_ranks_must_be_the_ids(tmp_path):
    (tmp_path / "tiktoken.model").write_text("YQ== 0\nYg== 5\n")
    with pytest.raises(CheckpointError, match="ranks must be 0 … 1"):
        load_tokenizer(tmp_path)


def test_added_token_outside_the_special_range_names_the_field(tok_dir, tmp_path):
    (tmp_path / "tiktoken.model").write_text((tok_dir / "tiktoken.model").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"5": {"content": "<x>"}}}))
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json: added_tokens_decoder id 5"):
        load_tokenizer(tmp_path)


def test_ids_outside_the_vocabulary_are_a_clear_error(tok):
    with pytest.raises(ValueError, match=f"token id {tok.n_vocab} is outside"):
        tok.decode([1, tok.n_vocab])
