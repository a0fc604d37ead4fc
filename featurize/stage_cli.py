"""The featurize command line, shared by ``imgfeat featurize`` and ``python -m imgfeat.featurize`` (torchrun).

``register(subparsers)`` adds the subcommand to the ``imgfeat`` CLI; ``main(argv)`` is the standalone
entry point. Both use ``add_featurize_args``, so the flags exist in one place.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from imgfeat.metadata.cli_common import add_common_args, build_config, report_errors, setup_logging
from imgfeat.metadata.config import Config
from imgfeat.metadata.config_flags import add_config_flags, config_overrides

log = logging.getLogger(__name__)

HELP = "model features for every manifest row, as resumable shards (one process, or every rank under torchrun)"
EPILOG = """\
Several GPUs or nodes: torchrun --nproc-per-node=N -m imgfeat.featurize --manifest OUT --out FEAT
(add --nnodes/--node-rank/--rdzv-endpoint for several nodes). Rerun the same command to resume.
Weights are read from the torch cache ($TORCH_HOME/hub/checkpoints) or an installed offline-weights
package; when they are in neither, one download is tried before any work starts. Offline: seed the
cache, pass --weights-path FILE, or --weights none for random weights.
"""


MODEL_FLAGS = ("featurize.model", "featurize.weights", "featurize.weights_path", "featurize.model_path",
               "featurize.layer", "featurize.pool")
SPEED_FLAGS = ("featurize.precision", "preprocess.batch_size", "preprocess.num_workers", "featurize.device",
               "featurize.decode_device", "featurize.batch_probe", "featurize.compile", "featurize.channels_last")
OUTPUT_FLAGS = ("featurize.format", "featurize.dtype", "featurize.overwrite")
"""Config keys offered as flags, by group (every other key: ``--set``)."""


def add_featurize_args(parser: argparse.ArgumentParser) -> None:
    """All featurize flags (and the common ones); flags left unset keep the config file's values."""
    parser.add_argument("--manifest", required=True, metavar="OUT", help="the manifest folder (imgfeat manifest --out)")
    parser.add_argument("--out", required=True, metavar="FEAT", help="feature folder (local path or s3://...)")
    parser.add_argument("--split", default=None, help="featurize only this split (default: every row)")
    parser.add_argument("--tiles", action="store_true",
                        help="featurize the tile table OUT/tiles/ (one row per tile, keyed by tile_id) instead of "
                             "the whole images")
    add_config_flags(parser.add_argument_group("model"), MODEL_FLAGS)
    g = parser.add_argument_group("speed")
    add_config_flags(g, SPEED_FLAGS)
    g.add_argument("--size", type=int, help="model input size (preprocess.size); the resize-before-crop side "
                   "(preprocess.resize_shorter) scales with it")
    add_config_flags(parser.add_argument_group("output"), OUTPUT_FLAGS)
    add_common_args(parser)


def config_from_args(args: argparse.Namespace) -> Config:
    """``--config`` plus the flags that were given."""
    cfg = build_config(args, config_overrides(args))
    if args.size is not None:
        if args.size < 1:
            raise ValueError("--size (preprocess.size) must be >= 1")
        pre = cfg.preprocess
        # Keep the configured resize/crop ratio (256/224 by default), as ManifestDataset does.
        pre.resize_shorter = max(args.size, round(args.size * pre.resize_shorter / pre.size))
        pre.size = args.size
        cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    """Run the stage for parsed ``args``; expected errors raise ``ValueError`` (one line from the CLI)."""
    from imgfeat.featurize.runner import run_featurize
    from imgfeat.featurize.weights import check_weights
    from imgfeat.metadata.contracts.schema import read_summary
    from imgfeat.metadata.storage import check_writable

    cfg = config_from_args(args)
    summary = read_summary(args.manifest)  # a clear error before the model loads when there is no manifest
    check_writable(args.out, "--out")
    check_weights(cfg.featurize)
    if args.tiles and not (summary.get("tiles") or {}).get("tiles"):
        raise ValueError(f"--tiles: the manifest at {args.manifest} has no tiles (run `imgfeat manifest` with "
                         "[tiles] enabled = true on images with a side >= tiles.min_side)")
    run_featurize(cfg, args.manifest, args.out, split=args.split, tiles=args.tiles)
    return 0


def _run_with_logging(args: argparse.Namespace) -> int:
    setup_logging(args.verbose, args.quiet)
    rank = os.environ.get("RANK")
    if rank not in (None, "0"):  # other ranks: warnings and errors only, tagged with the rank
        logging.getLogger().setLevel(logging.WARNING if not args.verbose else logging.INFO)
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
                                                   "%H:%M:%S"))
    return report_errors(run, args)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``featurize`` to the ``imgfeat`` CLI (``func(args) -> int`` set as default)."""
    parser = subparsers.add_parser("featurize", help=HELP, description=HELP, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    add_featurize_args(parser)
    parser.set_defaults(func=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m imgfeat.featurize", description=HELP, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_featurize_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m imgfeat.featurize`` (what torchrun starts on every rank)."""
    args = build_parser().parse_args(argv)
    return _run_with_logging(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
