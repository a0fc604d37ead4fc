"""The ``prep`` subcommand: ``imgfeat prep --manifest OUT --out PREP ...`` and ``imgfeat prep --show PREP``."""
from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from imgfeat.metadata.cli_common import add_common_args, build_config
from imgfeat.metadata.config_flags import add_config_flags, config_overrides

log = logging.getLogger(__name__)


PREP_FLAGS = ("prep.size", "prep.resize_policy", "prep.format", "prep.split", "prep.rows_per_shard", "prep.compression",
              "preprocess.num_workers")
"""Config keys offered as flags (every other key: ``--set``)."""


def add_prep_args(parser: argparse.ArgumentParser) -> None:
    """The flags of ``prep`` (shared by ``imgfeat prep`` and ``python -m imgfeat.preprocess``)."""
    parser.add_argument("--manifest", metavar="OUT", help="the manifest output folder (local path or URL)")
    parser.add_argument("--out", metavar="PREP", help="folder for the prep shards")
    add_config_flags(parser, PREP_FLAGS)
    parser.add_argument("--overwrite", action="store_true", help="remove existing shards first")
    parser.add_argument("--tiles", action="store_true",
                        help="export the tiles of OUT/tiles/ (each tile's box resized, keyed by tile_id) instead of images")
    parser.add_argument("--show", metavar="PREP", help="print counts of an existing prep folder instead")
    parser.add_argument("--contact-sheet", metavar="FILE", help="with --show: write a PNG grid of samples per class")
    add_common_args(parser)


def register(subparsers: Any) -> None:
    """Add the ``prep`` subcommand to an ``add_subparsers()`` object."""
    parser = subparsers.add_parser("prep", help="export resized uint8 training arrays (HDF5 or .npy shards)",
                                   description="Export resized uint8 arrays of the manifest's ok rows for training: "
                                   "imgfeat prep --manifest OUT --out PREP; imgfeat prep --show PREP to look at them.")
    add_prep_args(parser)
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    """Run ``prep`` from parsed flags; returns the exit code. Config mistakes raise ValueError."""
    from imgfeat.metadata.storage import check_writable
    from imgfeat.preprocess.export import run_prep
    from imgfeat.preprocess.show import show_prep

    if args.show:
        print(show_prep(args.show, args.contact_sheet))
        return 0
    if args.contact_sheet:
        raise ValueError("--contact-sheet goes with --show PREP")
    if not args.manifest or not args.out:
        raise ValueError("prep needs --manifest OUT and --out PREP (or --show PREP)")
    cfg = build_config(args, config_overrides(args))
    check_writable(args.out, "--out")
    summary = run_prep(cfg, args.manifest, args.out, overwrite=args.overwrite, tiles=args.tiles)
    log.info("prep: %d written, %d rejected of %d selected in %d shards (%d skipped as complete)",
             summary["written"], summary["rejected"], summary["selected"], summary["shards"], summary["shards_skipped"])
    print(json.dumps({k: summary[k] for k in ("selected", "written", "rejected", "shards", "shards_written",
                                              "shards_skipped", "images_per_s")}))
    return 0
