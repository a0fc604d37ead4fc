"""``python -m imgfeat.preprocess --manifest OUT --out PREP ...``: the same as ``imgfeat prep``."""
from __future__ import annotations

import argparse
import sys

from imgfeat.metadata.cli_common import setup_logging
from imgfeat.preprocess.cli import add_prep_args, run_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgfeat.preprocess", description="Export resized uint8 training arrays.")
    add_prep_args(parser)
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        return run_command(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
