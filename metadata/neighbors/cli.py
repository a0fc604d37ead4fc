"""``imgfeat neighbors``: each image's k nearest neighbours in feature space, and the pairs they reveal."""
from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from imgfeat.metadata.cli_common import add_common_args, build_config
from imgfeat.metadata.config_flags import add_config_flags, config_overrides

log = logging.getLogger(__name__)

NEIGHBORS_FLAGS = ("spark.master", "spark.partitions", "neighbors.k", "neighbors.min_cosine", "neighbors.cells",
                   "neighbors.nprobe", "neighbors.sample_rows", "neighbors.block_rows", "neighbors.seed")
"""Config keys offered as flags (every other key: ``--set``); ``[neighbors]`` in ``--config`` sets their defaults."""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``neighbors`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "neighbors",
        help="k nearest neighbours by cosine on Spark; near-duplicate, cross-split and cross-label pairs",
        description="Find each feature row's k nearest neighbours by cosine on Spark (IVF: a k-means codebook on a "
        "bounded sample, each query searched exactly in its nprobe nearest cells) and write NB/neighbors/ (Parquet: "
        "image_id, neighbor_id, cosine, rank) and NB/neighbors_summary.json: pairs at or above --min-cosine, those "
        "across splits (leakage) and across labels (probable label errors), with examples from the manifest.",
    )
    p.add_argument("--features", metavar="FEAT", required=True,
                   help="folder of committed feature shards, or a pca output folder (its reduced/ dataset, Parquet or Delta)")
    p.add_argument("--manifest", metavar="OUT", required=True, help="folder holding manifest/ and manifest_summary.json")
    p.add_argument("--out", metavar="NB", required=True, help="output folder (local or fsspec URL)")
    add_config_flags(p, NEIGHBORS_FLAGS)
    add_common_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit status (bad options raise ValueError: one line from the CLI)."""
    from imgfeat.metadata.neighbors.job import NeighborParams, run_neighbors
    from imgfeat.metadata.storage import check_writable

    cfg = build_config(args, config_overrides(args))
    params = NeighborParams.from_config(cfg.neighbors).validate()
    check_writable(args.out, "--out")
    summary = run_neighbors(cfg, args.manifest, args.features, args.out, params)
    print(json.dumps({"neighbors": summary["neighbors"], "output_rows": summary["output_rows"],
                      "near_duplicate_pairs": summary["near_duplicates"]["pairs"],
                      "cross_split_pairs": summary["cross_split"]["pairs"],
                      "cross_label_pairs": summary["cross_label"]["pairs"], "timings_s": summary["timings_s"]}))
    return 0
