"""``kimi-lm chat``: an interactive chat in the terminal, as mlx-lm's ``chat``.

Each turn renders the whole history with the chat template and generates with one :class:`PromptCache` kept across
turns, so only the new tokens are prefilled (the cache resumes from the last exactly-restorable boundary; the reply
the model generated is re-tokenised by the template and may differ from the sampled ids, which the cache handles).
The reply streams as it is generated, thinking apart from the answer (dimmed, or hidden with ``--hide-thinking``);
tool calls are shown as ``[tool call functions.NAME:IDX {...}]`` lines and kept in the history with their canonical
ids, never as raw marker text. The reply's reasoning is kept in the history as ``reasoning_content``: the chat
format decides whether to render it (K2-Thinking drops it from earlier turns; K3 keeps it).

Lines whose first word is a ``/command`` are handled here and never sent to the model: ``/help`` lists the
commands, ``/reset`` clears the history, ``/exit`` (or Ctrl-D) quits; an unknown ``/x`` says so. A line that merely
starts with a slash but is more (``/usr/bin is ...``) is a message.
"""

from __future__ import annotations

import re
import sys

from kimi_lm.chat import count_tool_calls, message_from_delta
from kimi_lm.cli_args import (Parser, add_model_args, add_sampling_args, load_model_and_tokenizer, print_stats,
                              run_command, sampling_kwargs)
from kimi_lm.errors import CheckpointError
from kimi_lm.generate import ReplyPrinter, add_chat_args, stream_generate
from kimi_lm.prompt_cache import PromptCache

COMMANDS = {"/help": "list these commands", "/reset": "clear the conversation history",
            "/exit": "quit (also /quit, q or Ctrl-D)"}
BANNER = "[kimi-lm chat] type a message; /help lists commands, /reset clears the history, /exit quits."
_COMMAND = re.compile(r"/[A-Za-z_]+")  # a whole first word like /help; "/usr/bin ..." is a message


def _parser() -> Parser:
    p = Parser(prog="kimi-lm chat", description="Chat with a Kimi Linear model in the terminal.")
    add_model_args(p)
    p.add_argument("--system", help="system message at the start of the conversation (unset: none)")
    add_sampling_args(p, max_tokens=512)
    p.add_argument("--verbose", action="store_true", help="print speed and memory after each reply (default: off)")
    add_chat_args(p)
    return p


def _reply(model, tokenizer, messages: list[dict], pc: PromptCache, kwargs: dict, args) -> dict:
    """Generate, stream and return the assistant message for the conversation so far."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                        **args.chat_template_config)
    parser = tokenizer.reply_parser(ids, count_tool_calls(messages))
    printer = ReplyPrinter(sys.stdout, hide_thinking=args.hide_thinking)
    whole = parser.feed("")
    last = None

    def show(delta) -> None:
        nonlocal whole
        whole += delta
        printer.show(delta)
        for call in delta.invalid_calls:  # its text is in the reply; say why it is not a call
            print(f"\n[unusable tool call: {call.error}]", flush=True)

    for last in stream_generate(model, tokenizer, ids, prompt_cache=pc, **kwargs):
        show(parser.feed(last.text))
    show(parser.finish())
    printer.finish()
    if args.verbose:
        print_stats(last, out=sys.stdout)
    message = message_from_delta(whole)
    message.pop("tool_call_errors", None)
    return message


def _command_help(word: str) -> str:
    """What /help (or an unknown /command) prints."""
    listing = "\n".join(f"  {name:<8} {text}" for name, text in COMMANDS.items())
    if word == "/help":
        return f"[commands]\n{listing}"
    return f"[unknown command {word}; commands:]\n{listing}"


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    kwargs = sampling_kwargs(args)
    model, tokenizer = load_model_and_tokenizer(args)
    if not tokenizer.has_chat_format:
        raise CheckpointError(f"{args.model}: no chat template "
                              f"(chat_template.jinja or tokenizer_config.json 'chat_template')")
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    pc = PromptCache(model, args.max_kv_size)
    print(BANNER)
    while True:
        try:
            line = input(">> ")
        except EOFError:
            print()
            return 0
        word = line.split()[0] if line.strip() else ""
        if word in ("/exit", "/quit") or line.strip() == "q":
            return 0
        if word == "/reset":
            messages = list(start)
            print("[history cleared]")
            continue
        if _COMMAND.fullmatch(word):
            print(_command_help(word))
            continue
        if not word:
            continue
        messages.append({"role": "user", "content": line})
        messages.append(_reply(model, tokenizer, messages, pc, kwargs, args))


def main(argv: list[str] | None = None) -> int:
    """``kimi-lm chat``: the REPL; bad input: one line on stderr and exit 2."""
    return run_command("kimi-lm chat", _main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
