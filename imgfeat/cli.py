"""The ``imgfeat`` command: one subcommand per stage, plus ``run`` and ``verify``.

Logging is configured here, once; every subcommand's expected errors end as one
``imgfeat: error: ...`` line (``cli_common.report_errors``).
"""
from __future__ import annotations

import argparse
import sys

from imgfeat import plan, run_cli, verify
from imgfeat.featurize import stage_cli as featurize_cli
from imgfeat.metadata.cli_common import report_errors, setup_logging
from imgfeat.metadata.manifest import cli as manifest_cli
from imgfeat.metadata.neighbors import cli as neighbors_cli
from imgfeat.metadata.pca import cli as pca_cli
from imgfeat.metadata.tiles import cli as tiles_cli
from imgfeat.preprocess import cli as prep_cli

_STAGES = (manifest_cli, prep_cli, featurize_cli, pca_cli, neighbors_cli, tiles_cli, run_cli, verify, plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgfeat",
        description="Image collections to model features: manifest (Spark) -> prep/featurize (PyTorch) -> pca (Spark).",
    )
    # Also before the subcommand (`imgfeat -q manifest ...`), as after it.
    parser.add_argument("-v", "--verbose", dest="top_verbose", action="count", default=0,
                        help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", dest="top_quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for stage in _STAGES:
        stage.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse, configure logging once, run the subcommand; config mistakes exit 2 with one line."""
    args = build_parser().parse_args(argv)
    args.verbose += args.top_verbose
    args.quiet = args.quiet or args.top_quiet
    setup_logging(args.verbose, args.quiet)
    return report_errors(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
