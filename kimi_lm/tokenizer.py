"""The Kimi tokenizer: byte-level BPE from ``tiktoken.model`` with 258 special ids, on the ``tiktoken`` library.

Files read from a checkpoint directory (nothing is executed; ``tokenization_kimi.py`` is ignored):

* ``tiktoken.model``: one ``<base64 token bytes> <rank>`` per line; ranks are the ids 0 … N−1.
* ``tokenizer_config.json``: ``added_tokens_decoder`` names special ids; ``eos_token``; optionally ``chat_template``.
* ``chat_template.jinja`` (preferred over the config's ``chat_template``), rendered by :mod:`kimi_lm.chat`.
* ``config.json``: only ``model_type``, which selects Kimi K3's XTML chat format for ``kimi_k3``.

A template given explicitly (``load_tokenizer(path, chat_template=FILE)``, the ``--chat-template`` option of
``generate`` / ``chat`` / ``serve``) replaces the checkpoint's and is always the one rendered, in the sandbox, even
for K3; it is compiled when the tokenizer loads, so a file that does not parse is an error naming it. Its content
decides the reply format (XTML when it writes ``<|open|>`` and ``<|end_of_msg|>``).

Chat format (:attr:`Tokenizer.chat_format`), decided by the checkpoint's own files, never by its directory name:
``"xtml"`` (Kimi K3, rendered in Python by :mod:`kimi_lm.xtml`) when the chat template uses
``<|open|>``/``<|end_of_msg|>``, or there is no template and ``config.json`` says ``kimi_k3`` or the tokenizer names
K3's control tokens; otherwise ``"kimi"`` (``<|im_user|>`` … ``<|im_end|>``, the checkpoint's Jinja template). A K3 tokenizer whose
config leaves its control tokens unnamed gets K3's names (:data:`kimi_lm.xtml.SPECIAL_TOKENS`).

Special ids are N … N+257 (``num_reserved_special_tokens`` 256 + 2, as the official ``TikTokenTokenizer``): ids named
in ``added_tokens_decoder`` get their names, the rest are ``<|reserved_token_{id}|>``. ``encode`` allows special
tokens by default and splits long inputs as the official class does (tiktoken's regex engine is slow or crashes on
very long runs); ``StreamingDetokenizer`` turns ids into text without ever emitting half a UTF-8 character.

Reference: spec ``shared/specs/kimi_linear.md`` §7.1–7.2; ``tokenization_kimi.py`` of Kimi-Linear-48B-A3B-Instruct.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import re
from pathlib import Path

import tiktoken

from kimi_lm.errors import CheckpointError

NUM_SPECIAL_IDS = 256 + 2  # the official class registers num_reserved_special_tokens + 2 ids
TIKTOKEN_MAX_ENCODE_CHARS = 400_000  # tiktoken panics beyond this (official comment)
MAX_RUN_CHARS = 25_000  # longest whitespace / non-whitespace run per piece (openai/tiktoken#195)

# The Kimi pre-tokenisation regex (llama.cpp: "kimi-k2"); `&&` is class intersection in tiktoken's fancy-regex.
PAT_STR = "|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])


def read_tiktoken_model(path: Path) -> dict[bytes, int]:
    """``tiktoken.model`` -> {token bytes: rank}; ranks must be exactly 0 … N−1 (they are the token ids)."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the tokenizer vocabulary ({exc.strerror})") from None
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (ValueError, binascii.Error):
            raise CheckpointError(f"{path}: line {number} is not '<base64 token> <rank>': {line[:60]!r}") from None
        if token in ranks:
            raise CheckpointError(f"{path}: line {number} repeats token {token!r} (first at rank {ranks[token]})")
        ranks[token] = rank
    if not ranks:
        raise CheckpointError(f"{path}: no tokens found")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path}: ranks must be 0 … {len(ranks) - 1}, each once (they are the token ids)")
    return ranks


def split_long_runs(text: str) -> list[str]:
    """Cut ``text`` as the official encode does: into 400k-char chunks, then so that no whitespace or non-whitespace
    run in a piece exceeds 25k chars (cuts fall at run start + k·25k). Pieces concatenate back to ``text``."""
    pieces = []
    for start in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
        chunk = text[start : start + TIKTOKEN_MAX_ENCODE_CHARS]
        cut = 0
        for run in re.finditer(r"\s+|\S+", chunk):  # Python's \s is exactly str.isspace(), as the official loop
            for at in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                pieces.append(chunk[cut:at])
                cut = at
        pieces.append(chunk[cut:])
    return pieces or [""]


class Tokenizer:
    """Kimi tokenizer: ``encode``/``decode``, special ids, ``apply_chat_template`` and a streaming detokenizer."""

    def __init__(self, mergeable_ranks: dict[bytes, int], special_names: dict[int, str] | None = None,
                 chat_template: str | None = None, eos_token: str = "[EOS]", name: str = "kimi",
                 model_type: str | None = None, template_override: bool = False):
        from kimi_lm.xtml import SPECIAL_TOKENS as K3_SPECIAL

        n = len(mergeable_ranks)
        special_names = dict(special_names or {})
        if model_type == "kimi_k3":  # K3's control tokens, where the config leaves them unnamed
            taken = set(special_names.values())
            for off, token in K3_SPECIAL.items():
                if n + off not in special_names and token not in taken:
                    special_names[n + off] = token
        self.special_tokens = {special_names.get(i, f"<|reserved_token_{i}|>"): i
                               for i in range(n, n + NUM_SPECIAL_IDS)}
        self.encoding = tiktoken.Encoding(name, pat_str=PAT_STR, mergeable_ranks=mergeable_ranks,
                                          special_tokens=self.special_tokens)
        self.num_base_tokens = n
        self._ranks = mergeable_ranks
        self.n_vocab = n + NUM_SPECIAL_IDS
        self.chat_template = chat_template
        self.eos_token_id = self.special_tokens.get(eos_token)
        self.im_end_id = self.special_tokens.get("<|im_end|>")
        self.end_of_msg_id = self.special_tokens.get("<|end_of_msg|>")
        # an explicit template is rendered as it is (never by the XTML renderer); its content names the format
        self.render_template = template_override and chat_template is not None
        self.chat_format = _chat_format(None if self.render_template else model_type, chat_template,
                                        self.special_tokens)

    @classmethod
    def from_dir(cls, path: str | Path, chat_template: str | None = None) -> "Tokenizer":
        """``chat_template``: use this template instead of the checkpoint's: a file path, or the name of one that
        kimi-lm ships (``kimi-k2-thinking``, see :func:`kimi_lm.chat.builtin_template`)."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a checkpoint directory "
                                  f"(expected tiktoken.model and tokenizer_config.json)")
        vocab = path / "tiktoken.model"
        if not vocab.is_file():
            raise CheckpointError(f"{vocab}: tokenizer vocabulary not found (Kimi checkpoints ship a tiktoken.model)")
        config = _read_tokenizer_config(path / "tokenizer_config.json")
        ranks = read_tiktoken_model(vocab)
        names = _special_names(config, path / "tokenizer_config.json", len(ranks))
        template_file = path / "chat_template.jinja"
        template = config.get("chat_template")
        if isinstance(template, list):  # transformers' list of named templates: take "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
        if chat_template is not None:
            template = _template_override(chat_template)
            _check_template(template, chat_template)
        eos = config.get("eos_token", "[EOS]")
        eos = eos.get("content", "[EOS]") if isinstance(eos, dict) else eos
        model_type = _read_tokenizer_config(path / "config.json").get("model_type")
        return cls(ranks, names, template if isinstance(template, str) else None, eos_token=eos, name=str(path),
                   model_type=model_type if isinstance(model_type, str) else None,
                   template_override=chat_template is not None)

    # ---- ids <-> text -----------------------------------------------------------------------------------------
    def encode(self, text: str, allow_special_tokens: bool = True) -> list[int]:
        """Text -> ids. Special-token strings in ``text`` become their ids unless ``allow_special_tokens=False``."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        kw = {"allowed_special": "all"} if allow_special_tokens else {"disallowed_special": ()}
        ids: list[int] = []
        for piece in split_long_runs(text):
            ids.extend(self.encoding.encode(piece, **kw))
        return ids

    def decode(self, ids) -> str:
        """Ids -> text; bytes that are not valid UTF-8 become U+FFFD (as the official decode)."""
        ids = [ids] if isinstance(ids, int) else list(ids)
        self._check_ids(ids)
        return self.encoding.decode(ids, errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        self._check_ids([token_id])
        return self.encoding.decode_single_token_bytes(token_id)

    def token_to_id(self, token: str) -> int | None:
        """Id of a special token or of a base token given as text (its UTF-8 bytes); None if there is none."""
        if token in self.special_tokens:
            return self.special_tokens[token]
        return self._ranks.get(token.encode("utf-8"))

    def _check_ids(self, ids: list[int]) -> None:
        bad = next((i for i in ids if not 0 <= int(i) < self.n_vocab), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the tokenizer's vocabulary (0 … {self.n_vocab - 1})")

    @property
    def stop_token_ids(self) -> set[int]:
        """Ids that end a chat turn: ``<|im_end|>`` (Kimi) or ``<|end_of_msg|>`` (K3), what the model is trained to
        emit, and the tokenizer's EOS."""
        return {i for i in (self.im_end_id, self.end_of_msg_id, self.eos_token_id) if i is not None}

    @property
    def has_thinking(self) -> bool:
        """True when the chat format has a thinking channel (K3's ``think``; a template with ``<think>`` blocks):
        then generated reasoning is separated from the answer."""
        template = self.chat_template or ""
        return self.chat_format == "xtml" or "<think>" in template or "reasoning_content" in template

    def reply_parser(self, prompt_ids=(), first_index: int = 0):
        """A streaming parser (``feed``/``finish`` -> :class:`~kimi_lm.chat.ChatDelta`) for replies to
        ``prompt_ids`` in this tokenizer's chat format (see :func:`kimi_lm.chat.reply_parser`)."""
        from kimi_lm.chat import reply_parser

        return reply_parser(self, prompt_ids, first_index)

    def detokenizer(self) -> "StreamingDetokenizer":
        return StreamingDetokenizer(self)

    # ---- chat ---------------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True, tokenize: bool = False, **kwargs):
        """Render ``messages`` with the checkpoint's chat template (jinja2 sandbox); ids if ``tokenize``."""
        from kimi_lm.chat import render_chat_template

        if self.chat_format == "xtml" and not self.render_template:  # K3: in Python, tokenised per segment
            from kimi_lm.xtml import render_segments

            segments = render_segments(messages, tools, add_generation_prompt, **kwargs)
            if not tokenize:
                return "".join(text for text, _ in segments)
            missing = {text for text, special in segments if special and text not in self.special_tokens}
            if missing:
                raise ValueError(f"this tokenizer has no special token {sorted(missing)[0]} that Kimi K3's chat "
                                 f"format needs (name it in tokenizer_config.json's added_tokens_decoder)")
            return [i for text, special in segments
                    for i in ([self.special_tokens[text]] if special else self.encode(text, False))]
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (no chat_template.jinja and no 'chat_template' "
                             "in tokenizer_config.json); pass the prompt text directly")
        text = render_chat_template(self.chat_template, messages, tools=tools,
                                    add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text) if tokenize else text

    @property
    def has_chat_format(self) -> bool:
        """True when :meth:`apply_chat_template` can render a conversation (a template, or K3's XTML)."""
        return self.chat_format == "xtml" or self.chat_template is not None


def _check_template(template: str, source: str) -> None:
    """Compile a chat template given by the user now, so that a syntax error names its file and line at once
    instead of surfacing as an HTTP 400 on every request."""
    import jinja2

    from kimi_lm.chat import compile_template

    try:
        compile_template(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise CheckpointError(f"chat template {source}: not a valid Jinja template (line {exc.lineno}: "
                              f"{exc.message})") from None


class StreamingDetokenizer:
    """Ids in, text deltas out. Bytes of a character split across tokens are held until the character is complete,
    so a delta never contains a broken UTF-8 sequence; ``finalize`` flushes an unfinished tail as U+FFFD."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""

    def add_token(self, token_id: int) -> str:
        delta = self._utf8.decode(self.tokenizer.token_bytes(int(token_id)))
        self.text += delta
        return delta

    def finalize(self) -> str:
        delta = self._utf8.decode(b"", final=True)
        self.text += delta
        return delta


def load_tokenizer(path: str | Path, chat_template: str | None = None) -> Tokenizer:
    """The tokenizer of a checkpoint directory (``tiktoken.model`` + ``tokenizer_config.json``); ``chat_template``
    (a file, or a built-in name such as ``kimi-k2-thinking``) replaces the checkpoint's template."""
    from kimi_lm.hub import resolve

    return Tokenizer.from_dir(resolve(path, ("config", "tokenizer")), chat_template)


def _template_override(source: str) -> str:
    from kimi_lm.chat import builtin_template

    if Path(source).is_file():
        return Path(source).read_text(encoding="utf-8")
    try:
        return builtin_template(source)
    except ValueError as exc:
        raise CheckpointError(f"chat template {source!r}: not a file, and {exc}") from None


def _chat_format(model_type: str | None, template: str | None, special_tokens: dict[str, int]) -> str:
    """"xtml" for Kimi K3, else "kimi". A template decides by its content (a K3 model trained by ``kimi-lm train``
    with a Kimi-format tokenizer keeps that format); without one, config.json's ``kimi_k3`` or K3's control
    tokens select XTML (the release ships no template)."""
    if template is not None:
        return "xtml" if "<|open|>" in template and "<|end_of_msg|>" in template else "kimi"
    if model_type == "kimi_k3":
        return "xtml"
    k3_tokens = ("<|open|>", "<|close|>", "<|sep|>", "<|end_of_msg|>")
    return "xtml" if all(t in special_tokens for t in k3_tokens) else "kimi"


def _read_tokenizer_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def _special_names(config: dict, source: Path, num_base: int) -> dict[int, str]:
    """``added_tokens_decoder`` {"163586": {"content": "<|im_end|>", ...}} -> {163586: "<|im_end|>"}."""
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise CheckpointError(f"{source}: 'added_tokens_decoder' must be an object of id -> token")
    names = {}
    for key, entry in decoder.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not str(key).isdigit() or not isinstance(content, str):
            raise CheckpointError(f"{source}: added_tokens_decoder[{key!r}] must map an integer id "
                                  f"to {{'content': str}}")
        i = int(key)
        if not num_base <= i < num_base + NUM_SPECIAL_IDS:
            raise CheckpointError(
                f"{source}: added_tokens_decoder id {i} ({content!r}) is outside the special ids "
                f"{num_base} … {num_base + NUM_SPECIAL_IDS - 1} that follow the {num_base} tiktoken.model tokens"
            )
        names[i] = content
    if len(set(names.values())) != len(names):
        raise CheckpointError(f"{source}: added_tokens_decoder gives the same name to two ids")
    return names
