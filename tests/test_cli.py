"""The ``kimi-lm`` command's own behaviour (issue 19, items 6 and 8): --version, bare ``kimi-lm``, one error style,
every option's help and default, ``python -m kimi_lm``, a closed stdout (``| head``), a binary --prompt-file, and
the chat REPL's local /commands."""

import argparse
import importlib
import io
import os
import subprocess
import sys

import pytest

import kimi_lm
from kimi_lm import chat_repl
from kimi_lm.cli import main as cli_main
from kimi_lm.cli_args import HelpFormatter


def test_version(capsys):
    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out == f"kimi-lm {kimi_lm.__version__}\n"


def test_bare_command_prints_help_to_stderr_and_exits_2(capsys):
    assert cli_main([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: kimi-lm") and "generate" in captured.err


def test_unknown_command_uses_the_argparse_error_prefix(capsys):
    assert cli_main(["frobnicate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kimi-lm: error: unknown command 'frobnicate'") and err.count("\n") == 1


@pytest.mark.parametrize("module", ["kimi_lm.generate", "kimi_lm.chat_repl", "kimi_lm.server"])
def test_every_option_has_help_that_shows_its_default(module):
    parser = importlib.import_module(module)._parser()  # kimi_lm.generate the module, not the function
    formatter = HelpFormatter(parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        text = formatter._expand_help(action) if action.help else ""
        assert len(text) > 10, f"{action.option_strings}: no description"
        if action.default is not None and action.default is not False:
            assert "default" in text, f"{action.option_strings}: default {action.default!r} not shown: {text!r}"
        else:
            assert "unset" in text or "default" in text or action.const is True, (
                f"{action.option_strings}: does not say what happens when it is not given: {text!r}")


@pytest.mark.parametrize("command", ["generate", "cache-prompt"])
def test_binary_prompt_file_is_an_error_naming_the_file(command, tmp_path, capsys):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 4)
    extra = ["--out", str(tmp_path / "state.safetensors")] if command == "cache-prompt" else []
    assert cli_main([command, "--prompt-file", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"kimi-lm {command}: error: ") and str(path) in err and "not UTF-8 text" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "state.safetensors").exists()


def test_prompt_file_is_read(tmp_path, capsys):
    text = "The for statement, " * 7
    (tmp_path / "prompt.txt").write_text(text)
    n = len(kimi_lm.load_tokenizer(kimi_lm.DEFAULT_MODEL).encode(text))
    assert cli_main(["generate", "--prompt-file", str(tmp_path / "prompt.txt"), "--max-tokens", "3",
                     "--ignore-chat-template"]) == 0
    assert f"Prompt: {n} tokens" in capsys.readouterr().err


def test_closed_stdout_exits_quietly_in_a_real_pipe():
    """``python -m kimi_lm generate ... | head -c 1``: no "Broken pipe", no traceback, 141 like coreutils."""
    run = subprocess.run(["bash", "-c", "set -o pipefail; \"$0\" -m kimi_lm generate --ignore-chat-template "
                                        "--prompt 'The for statement' --max-tokens 100 | head -c 1", sys.executable],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert len(run.stdout) == 1
    assert "Broken pipe" not in run.stderr and "Traceback" not in run.stderr and "Exception" not in run.stderr
    assert run.returncode == 141, run.stderr  # the pipe closed mid-generation (not a normal end, not exit 2)


def test_chat_help_and_unknown_commands_stay_local(monkeypatch, capsys):
    def no_model(*args, **kwargs):
        raise AssertionError("a /command was sent to the model")

    monkeypatch.setattr(chat_repl, "stream_generate", no_model)
    monkeypatch.setattr(sys, "stdin", io.StringIO("/help\n/frobnicate please\n/reset\n/exit\n"))
    assert cli_main(["chat", "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "/help lists commands" in out and "[commands]" in out and "/reset" in out
    assert "[unknown command /frobnicate; commands:]" in out and "[history cleared]" in out
