"""The ``kimi-lm`` command: ``kimi-lm <command> [args]`` runs ``kimi_lm.<module>.main(args)``.

Each command lives in its own module with a ``main(argv)`` function; this file only dispatches, so importing a
command never runs anything and ``python -m kimi_lm.<module>`` works the same way.
"""

from __future__ import annotations

import importlib
import sys

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "estimate": ("kimi_lm.estimate", "memory needed for a model at a quantization and context length"),
    "convert": ("kimi_lm.convert", "rewrite a checkpoint: --quantize (MLX mxfp4/affine), --dequantize (FP8 or MLX -> bf16)"),
    "verify": ("kimi_lm.verify", "check a checkpoint against SHA256SUMS (--write: create it)"),
    "generate": ("kimi_lm.generate", "generate text from a prompt, streamed"),
    "chat": ("kimi_lm.chat_repl", "chat in the terminal (history, /reset, /exit)"),
    "cache-prompt": ("kimi_lm.cache_prompt", "prefill a prompt once and save the state for generate"),
    "serve": ("kimi_lm.server", "OpenAI-compatible HTTP server (chat, completions, tools, batching)"),
    "train": ("kimi_lm.train.train", "pre-train a Kimi Linear model on text (Muon, WSD, Block AttnRes)"),
}


def _usage() -> str:
    lines = ["usage: kimi-lm <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "run `kimi-lm <command> --help` for a command's options"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"kimi-lm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
