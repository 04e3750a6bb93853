"""Errors kimi-lm raises for bad user input (checkpoints, configs, arguments).

One exception type for everything wrong with a checkpoint so that callers (CLI, server, tests) can catch it and
show a single readable line instead of a traceback from deep inside torch.
"""


class CheckpointError(ValueError):
    """A checkpoint directory, config file or tensor is not what kimi-lm expects.

    The message always names the file, the config key or tensor, what was expected and what was found.
    """
