"""``python -m kimi_lm <command> ...``: the same as the ``kimi-lm`` command."""

import sys

from kimi_lm.cli import main

if __name__ == "__main__":
    sys.exit(main())
