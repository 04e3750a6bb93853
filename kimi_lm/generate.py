"""Text generation: chunked prefill, then one token at a time with sampling, streamed as text; ``kimi-lm generate``.

    for r in kimi_lm.stream_generate(model, tokenizer, prompt, max_tokens=64, temperature=0.7, seed=0):
        print(r.text, end="")        # one response per token: text delta, token id, logprob, finish_reason, tok/s

The prompt (text or ids) is prefilled in chunks of ``prefill_step_size`` tokens: identical logits to one pass (the
caches carry everything across chunks) with activations bounded by the chunk. Decoding feeds one token per step.
Generation stops at a stop token (``<|im_end|>`` / EOS, never emitted), at a stop string (not emitted; text that
could begin one is held back until decided) or after ``max_tokens``. With a :class:`PromptCache` the longest
exactly-restorable prefix is reused and the cache is advanced in place, so a chat can reuse it turn after turn.

The command mirrors mlx-lm's ``generate``: the prompt goes through the chat template unless
``--ignore-chat-template``; text streams to stdout; prompt / generation speed and peak memory go to stderr.

Reference: mlx-lm ``generate.py`` (stream_generate, GenerationResponse, CLI flags); gpt-fast ``generate.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, fields
from typing import Iterator

import torch

from kimi_lm.chat import partial_suffix_len
from kimi_lm.errors import CheckpointError
from kimi_lm.prompt_cache import PromptCache, PromptCacheError, load_prompt_cache
from kimi_lm.sample import Sampler, SamplingParams

DEFAULT_PREFILL_STEP = 2048
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


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    import resource  # Linux/macOS: the process's peak resident set (KB on Linux, bytes on macOS)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1e9 if sys.platform == "darwin" else 1e6)


def prefill(model, cache, ids: list[int], step: int = DEFAULT_PREFILL_STEP) -> torch.Tensor:
    """Feed ``ids`` through ``cache`` in chunks of ``step``; returns the last position's logits [V] fp32."""
    device = model.device
    logits = None
    for s in range(0, len(ids), step):
        logits = model(torch.tensor([ids[s : s + step]], device=device), cache=cache, logits_to_keep=1)[0, -1]
    return logits.float()


def _check_prompt(ids: list[int], model, tokenizer) -> None:
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    vocab = model.config.vocab_size
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        name = next((k for k, v in tokenizer.special_tokens.items() if v == bad), "") if tokenizer else ""
        raise ValueError(f"prompt token id {bad} {name} is outside the model's embedding (vocab_size {vocab})")


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
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    device = model.device
    sampler = sampler or Sampler(SamplingParams(**sampling), device=device)
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
    _check_prompt(ids, model, tokenizer)
    stops = [s for s in stop if s]
    stop_ids = set(tokenizer.stop_token_ids if stop_token_ids is None else stop_token_ids)
    if prompt_cache is None:
        prompt_cache = PromptCache(model, max_kv_size)
    else:
        prompt_cache.check_model(model)
        if max_kv_size is not None and max_kv_size != prompt_cache.max_kv_size:
            raise ValueError(f"max_kv_size {max_kv_size} differs from the prompt cache's ({prompt_cache.max_kv_size})")
    # ids the tokenizer cannot decode (a model vocabulary padded past the tokenizer's) must never be sampled
    undecodable = model.config.vocab_size > tokenizer.n_vocab

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

    p = sampler.params  # penalties look back a bounded window: keep only that much history
    window = max(p.repetition_context_size if p.repetition_penalty != 1 else 0,
                 p.penalty_context_size if p.presence_penalty or p.frequency_penalty else 0)
    recent = ids[-window:] if window else []
    detok = tokenizer.detokenizer()
    pending = ""  # decoded text not yet emitted (it may be the start of a stop string)
    t1 = time.perf_counter()
    n = 0
    while True:
        if undecodable:
            logits = logits.clone()
            logits[tokenizer.n_vocab :] = float("-inf")
        history = torch.tensor([recent], device=device) if window else None
        token_t, lp = sampler(logits[None], history)
        token = int(token_t)
        n += 1
        top = None
        if logprobs:
            values, indices = lp[0].topk(logprobs)
            top = list(zip(indices.tolist(), values.tolist()))
        finish = None
        if token in stop_ids:
            finish = "stop"
        else:
            pending += detok.add_token(token)
            if n == max_tokens:
                finish = "length"
        if finish:
            pending += detok.finalize()
        cut = min(((pending.find(s), s) for s in stops if s in pending), default=None)
        if cut is not None:
            text, finish = pending[: cut[0]], "stop"
        elif finish:
            text = pending
        else:
            keep = partial_suffix_len(pending, stops)
            text, pending = pending[: len(pending) - keep], pending[len(pending) - keep :]
        elapsed = max(time.perf_counter() - t1, 1e-9)
        yield GenerationResponse(text, token, float(lp[0, token]), top, finish, len(ids), cached, prompt_tps,
                                 n, n / elapsed, peak_memory_gb(device))
        if finish:
            return
        with torch.no_grad():
            logits = model(token_t.view(1, 1), cache=prompt_cache.cache)[0, -1].float()
        prompt_cache.advance([token], logits)
        recent = (recent + [token])[-window:] if window else recent


def generate(model, tokenizer, prompt, **kwargs) -> str:
    """The whole completion as one string (see :func:`stream_generate` for the arguments)."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, **kwargs))


# ---- shared command-line pieces (also used by `kimi-lm chat` and `kimi-lm cache-prompt`) ---------------------------
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error; main() prints it
        raise CheckpointError(message)


def add_model_args(p: argparse.ArgumentParser) -> None:
    from kimi_lm import DEFAULT_MODEL  # the package imports this module: resolve at call time

    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="checkpoint directory (config.json, *.safetensors, tiktoken.model); default: the bundled "
                        "tiny model trained on Python's documentation")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the config's; default)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu (default) or cuda")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", "-m", type=int, default=max_tokens,
                   help=f"tokens to generate (default {max_tokens})")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (default 0 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x top probability (default 0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalise recent tokens (default 1 = off)")
    p.add_argument("--repetition-context-size", type=int, default=20, help="tokens the penalty looks at (default 20)")
    p.add_argument("--seed", type=int, help="random seed: same seed, same output")
    p.add_argument("--max-kv-size", type=int, help="MLA layers keep only the last N tokens (changes the output "
                                                    "past N tokens; KDA state is constant-size anyway)")
    p.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP,
                   help=f"prompt tokens per forward pass (default {DEFAULT_PREFILL_STEP}); bounds prefill memory")


def sampling_kwargs(args) -> dict:
    """The sampling flags as stream_generate arguments, checked before any model is loaded."""
    for flag, value, low in (("--max-tokens", args.max_tokens, 1), ("--prefill-step-size", args.prefill_step_size, 1),
                             ("--max-kv-size", args.max_kv_size, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    SamplingParams(temperature=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                   repetition_penalty=args.repetition_penalty,
                   repetition_context_size=args.repetition_context_size).validate()
    return dict(max_tokens=args.max_tokens, temperature=args.temp, top_p=args.top_p, top_k=args.top_k,
                min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                repetition_context_size=args.repetition_context_size, seed=args.seed,
                prefill_step_size=args.prefill_step_size)


def load_model_and_tokenizer(args):
    from kimi_lm import load
    from kimi_lm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(args.model)  # first: it fails fast and cheaply on a wrong directory
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise CheckpointError(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"--device {args.device}: no CUDA device is available")
    return load(args.model, dtype=args.dtype, device=device), tokenizer


def print_stats(r: GenerationResponse, out=None) -> None:
    out = out or sys.stderr
    cached = f" ({r.prompt_cached} from the prompt cache)" if r.prompt_cached else ""
    print(f"Prompt: {r.prompt_tokens} tokens{cached}, {r.prompt_tps:.3f} tokens-per-sec", file=out)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=out)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=out)


def run_command(prog: str, body, argv) -> int:
    """Run a command body; bad input becomes one line on stderr and exit code 2."""
    try:
        return body(argv)
    except (CheckpointError, PromptCacheError, ValueError, OSError) as exc:
        msg = str(exc) if not isinstance(exc, OSError) or not exc.filename else f"{exc.filename}: {exc.strerror}"
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)


# ---- kimi-lm generate ----------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="kimi-lm generate", description="Generate text from a prompt with a Kimi Linear model.")
    add_model_args(p)
    p.add_argument("--prompt", "-p", default="hello", help="the prompt ('-' reads stdin; default 'hello')")
    p.add_argument("--system", help="system message (with the chat template)")
    add_sampling_args(p, max_tokens=256)
    p.add_argument("--stop", nargs="+", default=[], metavar="STR", help="stop when the text contains STR (not printed)")
    p.add_argument("--prompt-cache-file", help="continue from a `kimi-lm cache-prompt` file (the prompt follows it)")
    p.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt text as is")
    return p


def _prompt_ids(args, tokenizer, pc: PromptCache | None) -> list[int]:
    """The full prompt. With a cache file, like mlx-lm: the cached tokens, then this prompt rendered as the
    continuation of the cached (still open) user message."""
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if pc is not None:
        if pc.metadata.get("chat_template") == "open-user-message" and not args.ignore_chat_template:
            marker = "\x00kimi-lm-query\x00"
            text = tokenizer.apply_chat_template([{"role": "user", "content": marker}])
            prompt += text[text.index(marker) + len(marker) :]  # closes the cached user message
        return pc.tokens + tokenizer.encode(prompt)
    if not args.ignore_chat_template and tokenizer.chat_template is not None:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt = tokenizer.apply_chat_template(messages + [{"role": "user", "content": prompt}])
    return tokenizer.encode(prompt)


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    kwargs = sampling_kwargs(args)
    model, tokenizer = load_model_and_tokenizer(args)
    pc = load_prompt_cache(args.prompt_cache_file, model) if args.prompt_cache_file else None
    if pc is not None and args.max_kv_size is not None and args.max_kv_size != pc.max_kv_size:
        raise PromptCacheError(f"{args.prompt_cache_file}: made with max_kv_size {pc.max_kv_size}; "
                               f"--max-kv-size {args.max_kv_size} cannot change it")
    ids = _prompt_ids(args, tokenizer, pc)
    last = None
    for r in stream_generate(model, tokenizer, ids, prompt_cache=pc, max_kv_size=args.max_kv_size, stop=args.stop,
                             **kwargs):
        print(r.text, end="", flush=True)
        last = r
    print()
    print_stats(last)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``kimi-lm generate``: stream the completion; bad input: one line on stderr and exit 2."""
    return run_command("kimi-lm generate", _main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
