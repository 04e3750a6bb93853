"""``kimi-lm download ORG/NAME[@REVISION]``: fetch a model from the Hugging Face Hub without running it.

Only the files kimi-lm reads come down (config, tokenizer, safetensors weights, SHA256SUMS), into the Hub cache
(``HF_HOME`` / ``HF_HUB_CACHE``) that ``--model ORG/NAME`` then finds, offline too. Prints the snapshot directory on
stdout, so ``kimi-lm generate --model "$(kimi-lm download ORG/NAME --yes)"`` works. Large downloads are announced
with what ``kimi_lm.estimate`` predicts for this machine, and asked about unless ``--yes``. See :mod:`kimi_lm.hub`.
"""

from __future__ import annotations

import sys

from kimi_lm.cli_args import Parser, run_command
from kimi_lm.errors import UsageError
from kimi_lm.hub import ALL, download, parse_id


def _parser() -> Parser:
    p = Parser(prog="kimi-lm download", description="Fetch a model from the Hugging Face Hub into its cache.")
    p.add_argument("model", help="ORG/NAME or ORG/NAME@REVISION (a branch, tag or commit)")
    p.add_argument("--part", choices=ALL, action="append",
                   help="fetch only this part (repeatable; default: config, tokenizer and weights)")
    p.add_argument("--yes", "-y", action="store_true", help="download without asking, however large")
    return p


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    hub_id = parse_id(args.model)
    if hub_id is None:
        raise UsageError(f"{args.model!r} is not a Hugging Face Hub id; expected ORG/NAME or ORG/NAME@REVISION")
    path = download(*hub_id, parts=tuple(dict.fromkeys(args.part or ALL)), confirm=not args.yes)
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("kimi-lm download", _main, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
