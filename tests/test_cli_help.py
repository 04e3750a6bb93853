"""Every option of every `kimi-lm` command has a description and shows its default in --help (issue 19, item 8)."""

import argparse

import pytest

from kimi_lm import cli


class _Captured(BaseException):
    """Raised instead of parsing: carries the command's parser out (a BaseException so no command catches it)."""

    def __init__(self, parser):
        self.parser = parser


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_option_has_help_and_default(command, monkeypatch):
    def capture(self, *args, **kwargs):
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(_Captured) as caught:
        cli.main([command])
    parser = caught.value.parser
    shows_defaults = issubclass(parser.formatter_class, argparse.ArgumentDefaultsHelpFormatter)
    undocumented, no_default = [], []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        if not action.help:
            undocumented.append(name)
        elif (action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and not shows_defaults
              and "%(default)" not in action.help and "default" not in action.help.lower()):
            no_default.append(name)
    assert not undocumented, f"kimi-lm {command}: options without a description: {undocumented}"
    assert not no_default, f"kimi-lm {command}: options whose default --help does not show: {no_default}"
