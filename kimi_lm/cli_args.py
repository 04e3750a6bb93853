"""Command-line pieces shared by ``kimi-lm generate``, ``chat``, ``serve`` and ``cache-prompt``.

* :class:`Parser`: argparse with one error style (``kimi-lm CMD: error: MESSAGE``, exit 2, no usage block) and
  every option's default shown in ``--help`` (:class:`HelpFormatter`);
* ``add_model_args`` / ``add_sampling_args`` / ``sampling_kwargs``: the flags every generating command takes;
* :func:`load_model_and_tokenizer`, :func:`read_prompt` (stdin or a file, naming the file when it is not text),
  :func:`print_stats` (mlx-lm's speed and memory lines) and :func:`run_command` (bad input -> one line, exit 2).

Reference: mlx-lm ``generate.py`` (flag names and defaults); argparse's ``prog: error: message`` convention.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from kimi_lm.errors import UsageError
from kimi_lm.sample import SamplingParams

DEFAULT_PREFILL_STEP = 2048


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to each option's help, except where there is nothing to show: a flag that is off
    unless given, an option that is unset by default (its help says what happens then), or a help text that
    already states its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or unset or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage, so :func:`run_command` prints one line."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(message)


def add_model_args(p: argparse.ArgumentParser) -> None:
    from kimi_lm import DEFAULT_MODEL  # the package imports this module's users: resolve at call time

    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="checkpoint directory (config.json, *.safetensors, tiktoken.model) or Hugging Face Hub id "
                        "ORG/NAME[@REVISION], fetched once into the Hub cache; default: the bundled tiny model "
                        "trained on Python's documentation")
    p.add_argument("--yes", "-y", action="store_true", help="download a Hub model without asking, however large")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (the config's)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    if p.prog in ("kimi-lm generate", "kimi-lm serve"):  # the commands that run split (kimi_lm.distributed)
        from kimi_lm.distributed.launch import add_parallel_args

        add_parallel_args(p)


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", "-m", type=int, default=max_tokens, help="tokens to generate")
    p.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x top probability (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="penalise recent tokens (1 = off)")
    p.add_argument("--repetition-context-size", type=int, default=20, help="tokens the repetition penalty looks at")
    p.add_argument("--seed", type=int, help="random seed: same seed, same output (unset: a fresh draw each run)")
    p.add_argument("--max-kv-size", type=int, help="MLA layers keep only the last N tokens (changes the output "
                                                    "past N tokens; KDA state is constant-size anyway; unset: all)")
    p.add_argument("--prefill-step-size", type=int, default=DEFAULT_PREFILL_STEP,
                   help="prompt tokens per forward pass; bounds prefill memory")


def check_positive(*flags: tuple[str, int | None]) -> None:
    """Raise UsageError for the first ``(flag, value)`` whose value is given and below 1."""
    for flag, value in flags:
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")


def sampling_kwargs(args) -> dict:
    """The sampling flags as stream_generate arguments, checked before any model is loaded."""
    check_positive(("--max-tokens", args.max_tokens), ("--prefill-step-size", args.prefill_step_size),
                   ("--max-kv-size", args.max_kv_size))
    params = dict(temperature=args.temp, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                  repetition_penalty=args.repetition_penalty, repetition_context_size=args.repetition_context_size)
    try:
        SamplingParams(**params).validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return dict(max_tokens=args.max_tokens, seed=args.seed, prefill_step_size=args.prefill_step_size, **params)


def load_model_and_tokenizer(args):
    from kimi_lm import load
    from kimi_lm.distributed import launch
    from kimi_lm.hub import resolve
    from kimi_lm.tokenizer import load_tokenizer

    if launch.wanted(args):  # --tp / --ep, or launched by torchrun: this rank's slices (kimi_lm.distributed)
        return launch.load_parallel(args)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available")
    path = resolve(args.model, confirm=not args.yes)  # ORG/NAME from the Hub; args.model stays the name given
    # before the model: it fails fast and cheaply on a wrong directory (or a --chat-template that does not parse)
    tokenizer = load_tokenizer(path, getattr(args, "chat_template", None))
    return load(path, dtype=args.dtype, device=device), tokenizer


def read_prompt(source: str) -> str:
    """The text of ``source``: '-' reads stdin, anything else is a file path. A file that is not UTF-8 text (a
    binary given by mistake) is an error naming the file, not a decoding traceback."""
    if source == "-":
        return sys.stdin.read()
    try:
        return Path(source).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{source}: not UTF-8 text (byte {exc.start} is 0x{exc.object[exc.start]:02x}); "
                         f"give a text file") from None
    except IsADirectoryError:
        raise UsageError(f"{source}: is a directory, not a text file") from None


def print_stats(r, out=None) -> None:
    """mlx-lm's summary of a :class:`~kimi_lm.generate.GenerationResponse`: prompt and generation speed, memory."""
    out = out or sys.stderr
    cached = f" ({r.prompt_cached} from the prompt cache)" if r.prompt_cached else ""
    print(f"Prompt: {r.prompt_tokens} tokens{cached}, {r.prompt_tps:.3f} tokens-per-sec", file=out)
    print(f"Generation: {r.generation_tokens} tokens, {r.generation_tps:.3f} tokens-per-sec", file=out)
    print(f"Peak memory: {r.peak_memory:.3f} GB", file=out)


def run_command(prog: str, body, argv) -> int:
    """Run a command body; bad input becomes one line ``PROG: error: MESSAGE`` on stderr and exit code 2.

    BrokenPipeError (stdout closed by ``| head``) is not bad input: it propagates to :func:`kimi_lm.cli.main`,
    which exits quietly as a well-behaved filter does.
    """
    try:
        return body(argv)
    except BrokenPipeError:
        raise
    except (ValueError, OSError) as exc:  # KimiLMError and PromptCacheError are ValueErrors
        msg = str(exc) if not isinstance(exc, OSError) or not exc.filename else f"{exc.filename}: {exc.strerror}"
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
