"""Errors kimi-lm raises for bad user input, one hierarchy so callers (CLI, server, tests) show one readable line.

    KimiLMError                  anything kimi-lm reports to a user instead of a traceback
    ├── CheckpointError          a checkpoint directory, config file, tokenizer file or tensor is not as expected
    └── UsageError               a bad argument or option (a CLI flag, an API parameter, a request field)

Both also derive from ``ValueError`` so that code written against the earlier single exception keeps working. The
message always names the file, key, tensor or parameter, what was expected and what was found.
"""


class KimiLMError(ValueError):
    """Base of every error kimi-lm raises on purpose for bad input."""


class CheckpointError(KimiLMError):
    """A checkpoint directory, config file, tokenizer file or tensor is not what kimi-lm expects."""


class UsageError(KimiLMError):
    """An argument, option or request parameter is not what kimi-lm expects (not a problem of the checkpoint)."""
