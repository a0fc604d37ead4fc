"""``imgfeat pool-tiles``: per tiled image, the mean of its tiles' features (one vector per image)."""
from __future__ import annotations

import argparse
import json
from typing import Any

from imgfeat.metadata.cli_common import add_common_args, build_config
from imgfeat.metadata.config_flags import add_config_flags, config_overrides

POOL_FLAGS = ("spark.master", "spark.partitions")


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``pool-tiles`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "pool-tiles", help="one vector per tiled image: the mean of its tile features (Spark)",
        description="Read the tile features of FEAT (imgfeat featurize --tiles) and the tile table OUT/tiles/, and "
        "write POOLED/ (Parquet: image_id, tiles, features), the mean of each tiled image's tile features.")
    p.add_argument("--manifest", metavar="OUT", required=True, help="folder holding manifest/ and tiles/")
    p.add_argument("--features", metavar="FEAT", required=True, help="folder of tile feature shards (featurize --tiles)")
    p.add_argument("--out", metavar="POOLED", required=True, help="output folder (local or fsspec URL)")
    add_config_flags(p, POOL_FLAGS)
    add_common_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; bad options raise ValueError (one line from the CLI)."""
    from imgfeat.metadata.contracts.feature_store import committed_shards
    from imgfeat.metadata.contracts.schema import read_summary
    from imgfeat.metadata.storage import check_writable
    from imgfeat.metadata.tiles.pool import pool_tiles

    cfg = build_config(args, config_overrides(args))
    if not (read_summary(args.manifest).get("tiles") or {}).get("tiles"):
        raise ValueError(f"--manifest {args.manifest}: the manifest has no tiles ([tiles] enabled = true)")
    if not committed_shards(args.features, verify=False):
        raise ValueError(f"--features {args.features}: no committed feature shards (run imgfeat featurize --tiles)")
    check_writable(args.out, "--out")
    summary = pool_tiles(cfg, args.manifest, args.features, args.out)
    print(json.dumps({"images": summary["images"], "out": args.out}))
    return 0
