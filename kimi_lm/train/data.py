"""Training data: text files -> token ids -> fixed-length sequences, a held-out eval split, deterministic batches.

    data = PackedData.from_paths(["docs/", "notes.txt"], tokenizer, seq_len=256, eval_fraction=0.05, seed=0)
    x, y = data.train_batch(step, batch_size)          # [B, T] inputs and next-token targets

* Documents: each ``.txt`` / ``.md`` / ``.rst`` file is one document (a directory is searched recursively, in
  sorted order); each line of a ``.jsonl`` file is one chat document ``{"messages": [...]}`` rendered with the
  tokenizer's chat template (the only place special-token text is allowed). Every document ends with EOS.
* Split: documents are shuffled with ``seed`` and the last ones, about ``eval_fraction`` of the tokens (at least
  one sequence's worth), are held out, so eval text is never seen in training.
* Packing: each split's documents are concatenated and cut into windows of ``seq_len + 1`` tokens overlapping by
  one (inputs are the first T, targets the last T); the tail shorter than a window is dropped.
* Batches: epoch e visits the training windows in the permutation drawn from ``seed + e``; the batch of step s is
  a pure function of s, so a resumed run sees exactly the batches of an uninterrupted one.

Reference: nanoGPT ``data/*/prepare.py`` + ``get_batch``; torchtitan ``datasets/hf_datasets.py`` (packing).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from jinja2 import TemplateError

from kimi_lm.errors import UsageError

TEXT_SUFFIXES = (".txt", ".md", ".rst")
CHAT_SUFFIX = ".jsonl"


class DataError(UsageError):
    """A --data path that cannot be read as training text (the message names the file, and the line in a .jsonl)."""


def find_files(paths: list[str | Path]) -> list[Path]:
    """Expand files and directories into the sorted list of text / chat files they name."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES + (CHAT_SUFFIX,))
            if not found:
                raise DataError(f"{p}: no {'/'.join(TEXT_SUFFIXES + (CHAT_SUFFIX,))} files in this directory")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    return files


def read_documents(files: list[Path], tokenizer) -> list[list[int]]:
    """Token ids of every document, each followed by EOS."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents")
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            line = exc.object[: exc.start].count(b"\n") + 1
            raise DataError(f"{f}:{line}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise DataError(f"{f}: cannot read ({exc.strerror})") from None
        if f.suffix == CHAT_SUFFIX:
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    docs.append(tokenizer.encode(_chat_text(tokenizer, line, f, number)) + [eos])
        elif text.strip():
            docs.append(tokenizer.encode(text, allow_special_tokens=False) + [eos])
    if not docs:
        raise DataError(f"{', '.join(map(str, files))}: no text found")
    return docs


def _chat_text(tokenizer, line: str, f: Path, number: int) -> str:
    where = f"{f}:{number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not JSON ({exc})") from None
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        if not isinstance(record, dict):
            found = f"a JSON {type(record).__name__}"
        elif "messages" in record:
            found = f"'messages' as a JSON {type(record['messages']).__name__}"
        else:
            found = f"keys {sorted(record)}"
        raise DataError(f"{where}: expected a JSON object with a 'messages' list, found {found}")
    try:
        return tokenizer.apply_chat_template(record["messages"], add_generation_prompt=False)
    except (ValueError, TypeError, TemplateError) as exc:  # a malformed message fails in the template's checks or code
        raise DataError(f"{where}: cannot render with the tokenizer's chat template: {exc}") from None


def pack(tokens: list[int], seq_len: int) -> torch.Tensor:
    """[N, seq_len + 1] windows starting every seq_len tokens (the tail that does not fill one is dropped)."""
    n = max(len(tokens) - 1, 0) // seq_len  # an empty split has no window (not -1 of them)
    t = torch.tensor(tokens[: n * seq_len + 1], dtype=torch.long)
    return t.unfold(0, seq_len + 1, seq_len) if n else t.new_empty(0, seq_len + 1)


class PackedData:
    def __init__(self, train: torch.Tensor, eval: torch.Tensor, seed: int):
        self.train, self.eval, self.seed = train, eval, seed
        self._perms: dict[int, torch.Tensor] = {}

    @classmethod
    def from_paths(cls, paths, tokenizer, seq_len: int, eval_fraction: float = 0.05, seed: int = 0) -> "PackedData":
        docs = read_documents(find_files(paths), tokenizer)
        random.Random(seed).shuffle(docs)
        total = sum(map(len, docs))
        want_eval = max(int(eval_fraction * total), seq_len + 1)
        held, held_tokens = 0, 0
        while held < len(docs) - 1 and held_tokens < want_eval:
            held += 1
            held_tokens += len(docs[-held])
        train_docs, eval_docs = docs[: len(docs) - held], docs[len(docs) - held :]
        if len(docs) == 1:  # a single document: hold out its tail instead
            cut = max(total - want_eval, 0)  # want_eval exceeds the text when --seq-len is over half of it
            train_docs, eval_docs = [docs[0][:cut]], [docs[0][cut:]]
        train = pack([t for d in train_docs for t in d], seq_len)
        eval = pack([t for d in eval_docs for t in d], seq_len)
        if len(train) == 0 or len(eval) == 0:
            raise DataError(
                f"{', '.join(map(str, paths))}: {total} tokens is too little text for --seq-len {seq_len} and "
                f"--eval-fraction {eval_fraction} (need at least two sequences of {seq_len + 1} tokens: one to train "
                f"on, one held out; pass a smaller --seq-len or more text)"
            )
        return cls(train, eval, seed)

    @property
    def train_tokens(self) -> int:
        return self.train.shape[0] * (self.train.shape[1] - 1)

    def train_batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of 0-based ``step``: windows step·B … step·B + B − 1 of the epoch-wise permuted order."""
        n = self.train.shape[0]
        rows = []
        for i in range(step * batch_size, (step + 1) * batch_size):
            epoch, j = divmod(i, n)
            if epoch not in self._perms:
                self._perms = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))}
            rows.append(self._perms[epoch][j])
        w = self.train[torch.stack(rows)]
        return w[:, :-1], w[:, 1:]

    def eval_batches(self, batch_size: int, max_batches: int | None = None):
        """The held-out windows in order, ``batch_size`` at a time."""
        for k, s in enumerate(range(0, self.eval.shape[0], batch_size)):
            if max_batches is not None and k >= max_batches:
                return
            w = self.eval[s : s + batch_size]
            yield w[:, :-1], w[:, 1:]
