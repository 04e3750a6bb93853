"""``kimi-lm cache-prompt``: prefill a long prompt once and save the model state, as mlx-lm's ``cache_prompt``.

    kimi-lm cache-prompt --model DIR --prompt-file doc.txt --out doc.safetensors
    kimi-lm generate --model DIR --prompt-cache-file doc.safetensors --prompt "Summarise the document."

With the chat template (default), the file's text is cached as the start of a user message that stays open:
``generate`` then appends its prompt to that message, closes it and adds the generation prompt. With
``--ignore-chat-template`` the raw text is cached and ``generate`` appends its raw prompt. The file format is in
:mod:`kimi_lm.prompt_cache`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from kimi_lm.errors import UsageError
from kimi_lm.cli_args import Parser, add_model_args, load_model_and_tokenizer, read_prompt, run_command
from kimi_lm.generate import DEFAULT_PREFILL_STEP
from kimi_lm.prompt_cache import PromptCache, save_prompt_cache

_MARKER = "\x00kimi-lm-document\x00"


def _parser() -> Parser:
    p = Parser(prog="kimi-lm cache-prompt", description="Prefill a prompt once and save the model state to a file.")
    add_model_args(p)
    p.add_argument("--prompt-file", required=True, help="text to cache ('-' reads stdin)")
    p.add_argument("--out", required=True, help="where to write the cache (.safetensors)")
    p.add_argument("--system", help="system message before the cached user text (with the chat template)")
    p.add_argument("--ignore-chat-template", action="store_true", help="cache the raw text")
    p.add_argument("--max-kv-size", type=int, help="MLA layers keep only the last N tokens (sliding window)")
    p.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP,
                   help=f"prompt tokens per forward pass (default {DEFAULT_PREFILL_STEP})")
    return p


def cached_text(tokenizer, document: str, system: str | None, use_template: bool) -> str:
    """The text the cache covers: the document inside an open user message, or the document itself."""
    if not use_template:
        return document
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": _MARKER}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    return rendered[: rendered.index(_MARKER)] + document


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    for flag, value in (("--prefill-step-size", args.prefill_step_size), ("--max-kv-size", args.max_kv_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    document = read_prompt(args.prompt_file)  # a binary or missing file: an error naming it
    out = Path(args.out)
    if out.is_dir():  # checked before the prefill, not after minutes of it
        raise UsageError(f"--out {out}: is a directory; give the cache file's name, e.g. {out / 'prompt.safetensors'}")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist")
    model, tokenizer = load_model_and_tokenizer(args)
    use_template = not args.ignore_chat_template and tokenizer.chat_template is not None
    ids = tokenizer.encode(cached_text(tokenizer, document, args.system, use_template))
    if not ids:
        raise ValueError(f"{args.prompt_file}: nothing to cache (empty prompt)")
    if max(ids) >= model.config.vocab_size:
        raise ValueError(f"{args.prompt_file}: token id {max(ids)} is outside the model's embedding")

    pc = PromptCache(model, args.max_kv_size)
    step = args.prefill_step_size
    device = model.lm_head.weight.device
    t0 = time.perf_counter()
    with torch.no_grad(), tqdm(total=len(ids), unit="tok", desc="prefill", file=sys.stderr,
                                      disable=None) as bar:
        for s in range(0, len(ids), step):
            chunk = ids[s : s + step]
            logits = model(torch.tensor([chunk], device=device), cache=pc.cache)[0, -1].float()
            pc.advance(chunk, logits)
            bar.update(len(chunk))
    seconds = time.perf_counter() - t0
    save_prompt_cache(out, pc, metadata={"chat_template": "open-user-message" if use_template else "none"})
    print(f"Cached {len(ids)} tokens in {seconds:.2f} s ({len(ids) / max(seconds, 1e-9):.1f} tokens-per-sec); "
          f"state {pc.nbytes / 1e6:.2f} MB -> {out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``kimi-lm cache-prompt``: write the cache file; bad input: one line on stderr and exit 2."""
    return run_command("kimi-lm cache-prompt", _main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
