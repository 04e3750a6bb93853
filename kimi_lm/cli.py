"""The ``kimi-lm`` command: ``kimi-lm <command> [args]`` runs ``kimi_lm.<module>.main(args)``.

Each command lives in its own module with a ``main(argv)`` function; this file only dispatches, so importing a
command never runs anything and ``python -m kimi_lm.<module>`` works the same way (``python -m kimi_lm`` is this
dispatcher). Errors follow argparse's style, ``kimi-lm[ COMMAND]: error: MESSAGE`` and exit 2; bare ``kimi-lm``
prints the help to stderr and exits 2 as a usage error.

A closed stdout (``kimi-lm generate ... | head -1``) ends the command quietly, as coreutils do: no "Broken pipe"
message or traceback, exit status 141 (128 + SIGPIPE, what the shell reports for ``yes | head -1``'s ``yes``).
The recipe is the Python documentation's (``signal`` module, "Note on SIGPIPE"): point stdout at /dev/null so the
interpreter's final flush cannot fail again. Ctrl-C likewise exits 130 without a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "estimate": ("kimi_lm.estimate", "memory needed for a model at a quantization and context length"),
    "convert": ("kimi_lm.convert", "rewrite a checkpoint: --quantize (MLX mxfp4/affine), --dequantize (FP8 or MLX -> bf16)"),
    "verify": ("kimi_lm.verify", "check a checkpoint against SHA256SUMS (--write: create it)"),
    "generate": ("kimi_lm.generate", "generate text from a prompt, streamed"),
    "chat": ("kimi_lm.chat_repl", "chat in the terminal (history, /help, /reset, /exit)"),
    "cache-prompt": ("kimi_lm.cache_prompt", "prefill a prompt once and save the state for generate"),
    "serve": ("kimi_lm.server", "OpenAI-compatible HTTP server (chat, completions, tools, batching)"),
    "train": ("kimi_lm.train.train", "pre-train a Kimi Linear model on text (Muon, WSD, Block AttnRes)"),
    "download": ("kimi_lm.download", "fetch a model from the Hugging Face Hub (ORG/NAME) into its cache"),
}
EXIT_SIGPIPE, EXIT_SIGINT = 128 + 13, 128 + 2


def _usage() -> str:
    lines = ["usage: kimi-lm [--version] <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "run `kimi-lm <command> --help` for a command's options"]
    return "\n".join(lines)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kimi-lm")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from kimi_lm import __version__

        return __version__


def _dispatch(argv: list[str]) -> int:
    if not argv:
        print(_usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"kimi-lm {_version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"kimi-lm: error: unknown command {name!r} (choose from {', '.join(COMMANDS)}); "
              f"`kimi-lm --help` lists them", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


def main(argv: list[str] | None = None) -> int:
    try:
        code = _dispatch(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()  # inside the try: a reader that left shows up here, not at interpreter exit
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_SIGPIPE
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return EXIT_SIGINT


if __name__ == "__main__":
    sys.exit(main())
