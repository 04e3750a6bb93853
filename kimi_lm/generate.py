"""Text generation: chunked prefill, then one token at a time with sampling, streamed as text; ``kimi-lm generate``.

    for r in kimi_lm.stream_generate(model, tokenizer, prompt, max_tokens=64, temperature=0.7, seed=0):
        print(r.text, end="")        # one response per token: text delta, token id, logprob, finish_reason, tok/s

The prompt (text or ids) is prefilled in chunks of ``prefill_step_size`` tokens (:func:`forward_chunk`): identical
logits to one pass (the caches carry everything across chunks) with activations bounded by the chunk. Decoding feeds
one token per step. After each forward, :class:`Decoder` (shared with the server's scheduler) samples the token,
detokenises it and decides the end: a stop token (``<|im_end|>`` / EOS, never emitted), a stop string (not emitted;
text that could begin one is held back until decided) or ``max_tokens``. With a :class:`PromptCache` the longest
exactly-restorable prefix is reused and the cache is advanced in place, so a chat can reuse it turn after turn.

The command mirrors mlx-lm's ``generate``: the prompt goes through the chat template unless
``--ignore-chat-template``; text streams to stdout; prompt / generation speed and peak memory go to stderr. Its flag
helpers live in :mod:`kimi_lm.cli_args`. A chat reply is split as it streams (:class:`ReplyPrinter`): thinking is
shown dimmed on a terminal, between ``[thinking]`` / ``[/thinking]`` lines otherwise, or not at all with
``--hide-thinking``; tool calls print as ``[tool call ID ARGS]`` lines. In Python, :func:`kimi_lm.chat.parse_reply`
splits a finished reply into ``reasoning_content``, ``content`` and ``tool_calls``.

Reference: mlx-lm ``generate.py`` (stream_generate, GenerationResponse, CLI flags); gpt-fast ``generate.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, fields
from typing import Iterator

import torch

from kimi_lm.chat import partial_suffix_len
from kimi_lm.cli_args import (DEFAULT_PREFILL_STEP, Parser, add_model_args, add_sampling_args,
                              load_model_and_tokenizer, print_stats, read_prompt, run_command, sampling_kwargs)
from kimi_lm.errors import UsageError
from kimi_lm.prompt_cache import PromptCache, PromptCacheError, load_prompt_cache
from kimi_lm.sample import Sampler, SamplingParams

_SAMPLING_KEYS = {f.name for f in fields(SamplingParams)}


@dataclass
class GenerationResponse:
    text: str  # new text since the previous response (may be "" while a character or stop string is pending)
    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None  # None while generating, then "stop" or "length"
    prompt_tokens: int  # whole prompt
    prompt_cached: int  # of which reused from the prompt cache
    prompt_tps: float  # prefill speed over the tokens actually computed
    generation_tokens: int
    generation_tps: float
    peak_memory: float  # GB


@dataclass
class DecodedToken:
    """What one :meth:`Decoder.step` produced."""

    text: str  # new text to emit (stop strings and text that may begin one are held back)
    token: int
    logprob: float
    top_logprobs: list[tuple[int, float]] | None
    finish_reason: str | None  # None, "stop" or "length"


class Decoder:
    """One sequence's per-token step after a forward pass: sample, detokenise, decide whether it ends.

    ``stop_token_ids`` (default the tokenizer's ``<|im_end|>`` and EOS) end the sequence and are never emitted;
    ``stop`` strings end it too, cut from the text; ``logprobs`` > 0 reports that many alternatives. Penalties see
    the last ``window`` ids of prompt + generated tokens. Used by :func:`stream_generate` and, per request, by the
    server's scheduler (:mod:`kimi_lm.server.engine`), so both stop and detokenise identically.
    """

    def __init__(self, tokenizer, sampler: Sampler, prompt_ids: list[int], max_tokens: int, stop=(),
                 stop_token_ids=None, logprobs: int = 0):
        self.sampler, self.max_tokens, self.logprobs = sampler, max_tokens, logprobs
        self.stops = [s for s in stop if s]
        self.stop_ids = set(tokenizer.stop_token_ids if stop_token_ids is None else stop_token_ids)
        self.n_vocab = tokenizer.n_vocab
        self.detok = tokenizer.detokenizer()
        p = sampler.params  # penalties look back a bounded window: keep only that much history
        self.window = max(p.repetition_context_size if p.repetition_penalty != 1 else 0,
                          p.penalty_context_size if p.presence_penalty or p.frequency_penalty else 0)
        self.recent = list(prompt_ids[-self.window :]) if self.window else []
        self.pending = ""  # decoded text not yet emitted (it may be the start of a stop string)
        self.n = 0  # tokens generated so far
        self.last_token = -1

    def step(self, logits: torch.Tensor) -> DecodedToken:
        """Next token from ``logits`` [V] fp32 (the last position's)."""
        if logits.shape[-1] > self.n_vocab:  # ids the tokenizer cannot decode (a padded vocabulary) never sampled
            logits = logits.clone()
            logits[self.n_vocab :] = float("-inf")
        history = torch.tensor([self.recent], device=logits.device) if self.window else None
        token_t, lp = self.sampler(logits[None], history)
        token = self.last_token = int(token_t)
        self.n += 1
        if self.window:
            self.recent = (self.recent + [token])[-self.window :]
        top = None
        if self.logprobs:
            values, indices = lp[0].topk(self.logprobs)
            top = list(zip(indices.tolist(), values.tolist()))
        return DecodedToken(self._text(token), token, float(lp[0, token]), top, self._finish)

    def _text(self, token: int) -> str:
        """The text ``token`` releases; sets ``self._finish``."""
        finish = "stop" if token in self.stop_ids else None
        if not finish:
            self.pending += self.detok.add_token(token)
            finish = "length" if self.n >= self.max_tokens else None
        if finish:
            self.pending += self.detok.finalize()
        cut = min((self.pending.find(s) for s in self.stops if s in self.pending), default=None)
        self._finish = finish if cut is None else "stop"
        if cut is not None:
            return self.pending[:cut]
        if finish:
            return self.pending
        keep = partial_suffix_len(self.pending, self.stops)
        text, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return text


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource  # Linux/macOS: the process's peak resident set (KB on Linux, bytes on macOS)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1e9 if sys.platform == "darwin" else 1e6)


def forward_chunk(model, cache, chunk: list[int]) -> torch.Tensor:
    """Feed ``chunk`` through ``cache``; the last position's logits [V] fp32 (only that row is computed)."""
    return model(torch.tensor([chunk], device=model.device), cache=cache, logits_to_keep=1)[0, -1].float()


def prefill(model, cache, ids: list[int], step: int = DEFAULT_PREFILL_STEP) -> torch.Tensor:
    """Feed ``ids`` through ``cache`` in chunks of ``step``; returns the last position's logits [V] fp32."""
    for s in range(0, len(ids), step):
        logits = forward_chunk(model, cache, ids[s : s + step])
    return logits


def check_prompt(ids: list[int], model, tokenizer) -> None:
    """A prompt the model can take: not empty, every id inside its embedding."""
    if not ids:
        raise UsageError("the prompt is empty: give at least one token")
    vocab = model.config.vocab_size
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        name = next((k for k, v in tokenizer.special_tokens.items() if v == bad), "") if tokenizer else ""
        raise UsageError(f"prompt token id {bad} {name} is outside the model's embedding (vocab_size {vocab})")


def _prompt_cache_for(model, prompt_cache: PromptCache | None, max_kv_size: int | None) -> PromptCache:
    if prompt_cache is None:
        return PromptCache(model, max_kv_size)
    prompt_cache.check_model(model)
    if max_kv_size is not None and max_kv_size != prompt_cache.max_kv_size:
        raise UsageError(f"max_kv_size {max_kv_size} differs from the prompt cache's ({prompt_cache.max_kv_size})")
    return prompt_cache


def stream_generate(model, tokenizer, prompt, *, max_tokens: int = 256, sampler: Sampler | None = None,
                    prompt_cache: PromptCache | None = None, max_kv_size: int | None = None,
                    prefill_step_size: int = DEFAULT_PREFILL_STEP, stop: list[str] | tuple = (),
                    stop_token_ids=None, logprobs: int = 0, **sampling) -> Iterator[GenerationResponse]:
    """Yield one :class:`GenerationResponse` per generated token; the last one has ``finish_reason`` set.

    ``prompt``: text (encoded as is, special tokens allowed; apply the chat template first for chat) or ids.
    ``sampling``: :class:`SamplingParams` fields (temperature, top_p, top_k, min_p, repetition_penalty, seed, …).
    ``stop_token_ids``: default the tokenizer's ``<|im_end|>`` and EOS. ``logprobs``: top-k alternatives to report.
    """
    unknown = set(sampling) - _SAMPLING_KEYS
    if unknown:
        raise TypeError(f"unknown generation argument(s): {sorted(unknown)}")
    for name, value, low in (("max_tokens", max_tokens, 1), ("prefill_step_size", prefill_step_size, 1),
                             ("logprobs", logprobs, 0)):
        if not isinstance(value, int) or value < low:
            raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
    device = model.device
    sampler = sampler or Sampler(SamplingParams(**sampling), device=device)
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    check_prompt(ids, model, tokenizer)
    prompt_cache = _prompt_cache_for(model, prompt_cache, max_kv_size)
    decoder = Decoder(tokenizer, sampler, ids, max_tokens, stop, stop_token_ids, logprobs)

    # no_grad is scoped to model calls: a grad mode entered here would leak into the caller at every yield
    t0 = time.perf_counter()
    with torch.no_grad():
        cached = prompt_cache.reuse(ids)
        todo = ids[cached:]
        if todo:
            prompt_cache.advance(todo, prefill(model, prompt_cache.cache, todo, prefill_step_size))
            prompt_cache.snapshot()  # the next turn of a chat can resume from the end of this prompt
    logits = prompt_cache.logits
    prompt_tps = len(todo) / max(time.perf_counter() - t0, 1e-9)

    t1 = time.perf_counter()
    while True:
        d = decoder.step(logits)
        elapsed = max(time.perf_counter() - t1, 1e-9)
        yield GenerationResponse(d.text, d.token, d.logprob, d.top_logprobs, d.finish_reason, len(ids), cached,
                                 prompt_tps, decoder.n, decoder.n / elapsed, peak_memory_gb(device))
        if d.finish_reason:
            return
        with torch.no_grad():
            logits = model(torch.tensor([[d.token]], device=device), cache=prompt_cache.cache)[0, -1].float()
        prompt_cache.advance([d.token], logits)


def generate(model, tokenizer, prompt, **kwargs) -> str:
    """The whole completion as one string (see :func:`stream_generate` for the arguments)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


# ---- showing a chat reply ------------------------------------------------------------------------------------------
DIM, RESET = "\x1b[2m", "\x1b[0m"


class ReplyPrinter:
    """Prints a parsed chat reply as it streams (``kimi-lm generate`` and ``chat``): thinking dimmed on a terminal,
    between ``[thinking]`` and ``[/thinking]`` lines otherwise, or hidden; tool calls as ``[tool call ...]`` lines."""

    def __init__(self, out=None, hide_thinking: bool = False, tty: bool | None = None):
        self.out = out or sys.stdout
        self.hide = hide_thinking
        self.tty = self.out.isatty() if tty is None else tty
        self.thinking = False  # inside a shown thinking block

    def show(self, delta) -> None:
        if delta.reasoning and not self.hide:
            if not self.thinking:
                self._write(DIM if self.tty else "[thinking]\n")
                self.thinking = True
            self._write(delta.reasoning)
        if delta.content or delta.tool_calls:
            self._end_thinking()
        self._write(delta.content)
        for call in delta.tool_calls:
            self._write(f"\n[tool call {call.id} {call.arguments}]\n")

    def finish(self) -> None:
        self._end_thinking()
        self._write("\n")

    def _end_thinking(self) -> None:
        if self.thinking:
            self._write(RESET + "\n\n" if self.tty else "\n[/thinking]\n")
            self.thinking = False

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()


def add_chat_template_arg(p: Parser) -> None:
    """``--chat-template FILE`` (generate, chat, serve): read by :func:`~kimi_lm.cli_args.load_model_and_tokenizer`."""
    p.add_argument("--chat-template", metavar="FILE",
                   help="Jinja chat template to use instead of the checkpoint's (rendered in the sandbox, also for "
                        "Kimi K3), or a built-in name: kimi-k2-thinking (unset: the checkpoint's own format)")


def add_chat_args(p: Parser) -> None:
    """Flags of the commands that render a chat (generate, chat)."""
    add_chat_template_arg(p)
    p.add_argument("--chat-template-config", type=_json_object, default={}, metavar="JSON",
                   help='extra chat-template arguments as a JSON object, e.g. \'{"thinking": false}\' or '
                        '\'{"thinking_effort": "low"}\' (K3) (default: none)')
    p.add_argument("--hide-thinking", action="store_true",
                   help="print only the answer, not the model's thinking (default: thinking is shown, dimmed)")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text!r}")
    return value


# ---- kimi-lm generate ----------------------------------------------------------------------------------------------
def _parser() -> Parser:
    p = Parser(prog="kimi-lm generate", description="Generate text from a prompt with a Kimi Linear model.")
    add_model_args(p)
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", "-p", default="hello", help="the prompt ('-' reads stdin)")
    source.add_argument("--prompt-file", help="read the prompt from this UTF-8 text file ('-': stdin; unset: use --prompt)")
    p.add_argument("--system", help="system message (with the chat template; unset: none)")
    add_sampling_args(p, max_tokens=256)
    p.add_argument("--stop", nargs="+", default=[], metavar="STR", help="stop when the text contains STR (not printed; default: no stop strings)")
    p.add_argument("--prompt-cache-file", help="continue from a `kimi-lm cache-prompt` file (the prompt follows it; unset: start "
                        "from an empty state)")
    p.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt text as is (default: render it with the chat template)")
    add_chat_args(p)
    return p


def _prompt_ids(args, tokenizer, pc: PromptCache | None) -> tuple[list[int], bool]:
    """The full prompt, and whether it is a chat prompt (its reply is parsed). With a cache file, like mlx-lm: the
    cached tokens, then this prompt rendered as the continuation of the cached (still open) user message."""
    prompt = read_prompt(args.prompt_file or "-") if args.prompt_file or args.prompt == "-" else args.prompt
    if pc is not None:
        if pc.metadata.get("chat_template") == "open-user-message" and not args.ignore_chat_template:
            marker = "\x00kimi-lm-query\x00"
            text = tokenizer.apply_chat_template([{"role": "user", "content": marker}])
            prompt += text[text.index(marker) + len(marker) :]  # closes the cached user message
            return pc.tokens + tokenizer.encode(prompt), True
        return pc.tokens + tokenizer.encode(prompt), False
    if not args.ignore_chat_template and tokenizer.has_chat_format:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        return tokenizer.apply_chat_template(messages + [{"role": "user", "content": prompt}], tokenize=True,
                                             **args.chat_template_config), True
    return tokenizer.encode(prompt), False


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    kwargs = sampling_kwargs(args)
    model, tokenizer = load_model_and_tokenizer(args)
    pc = load_prompt_cache(args.prompt_cache_file, model) if args.prompt_cache_file else None
    if pc is not None and args.max_kv_size is not None and args.max_kv_size != pc.max_kv_size:
        raise PromptCacheError(f"{args.prompt_cache_file}: made with max_kv_size {pc.max_kv_size}; "
                               f"--max-kv-size {args.max_kv_size} cannot change it")
    ids, chat = _prompt_ids(args, tokenizer, pc)
    parser, printer = (tokenizer.reply_parser(ids), ReplyPrinter(hide_thinking=args.hide_thinking)) if chat else (
        None, None)
    last = None
    for r in stream_generate(model, tokenizer, ids, prompt_cache=pc, max_kv_size=args.max_kv_size, stop=args.stop,
                             **kwargs):
        if parser:
            printer.show(parser.feed(r.text))
        else:
            print(r.text, end="", flush=True)
        last = r
    if parser:
        printer.show(parser.finish())
        printer.finish()
    else:
        print()
    print_stats(last)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``kimi-lm generate``: stream the completion; bad input: one line on stderr and exit 2."""
    return run_command("kimi-lm generate", _main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
