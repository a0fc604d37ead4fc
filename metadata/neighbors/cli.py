"""``imgfeat neighbors``: each image's k nearest neighbours in feature space, and the pairs they reveal."""
from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from imgfeat.metadata.cli_common import add_common_args, build_config
from imgfeat.metadata.config_flags import add_config_flags, config_overrides
from imgfeat.metadata.neighbors import ivf

log = logging.getLogger(__name__)

NEIGHBORS_FLAGS = ("spark.master", "spark.partitions")
"""Config keys offered as flags (every other key: ``--set``)."""


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
                   help="folder of committed feature shards, or a pca output folder (its reduced/ dataset)")
    p.add_argument("--manifest", metavar="OUT", required=True, help="folder holding manifest/ and manifest_summary.json")
    p.add_argument("--out", metavar="NB", required=True, help="output folder (local or fsspec URL)")
    p.add_argument("--k", type=int, default=10, help="neighbours per image (default 10)")
    p.add_argument("--min-cosine", type=float, default=0.95,
                   help="pairs at or above this cosine are near duplicates in the summary (default 0.95)")
    p.add_argument("--cells", type=int, default=0,
                   help=f"k-means cells; 0 = about sqrt(rows), at most sample rows / {ivf.MIN_SAMPLE_PER_CELL} "
                        f"and {ivf.MAX_CELLS} (default 0)")
    p.add_argument("--nprobe", type=int, default=ivf.NPROBE,
                   help=f"nearest cells each query searches (default {ivf.NPROBE}; more: better recall, more work)")
    p.add_argument("--sample-rows", type=int, default=ivf.SAMPLE_ROWS,
                   help=f"rows collected to the driver to fit the cells (default {ivf.SAMPLE_ROWS:,}; "
                        f"never more than {ivf.MAX_SAMPLE_BYTES >> 20} MiB)")
    p.add_argument("--block-rows", type=int, default=0,
                   help="base rows a search task holds at once; bigger cells are split (0 = 128 MiB of vectors, "
                        f"at most {ivf.MAX_BLOCK_ROWS:,})")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample and of k-means (default 0)")
    add_config_flags(p, NEIGHBORS_FLAGS)
    add_common_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit status (bad options raise ValueError: one line from the CLI)."""
    from imgfeat.metadata.neighbors.job import NeighborParams, run_neighbors

    params = NeighborParams(k=args.k, min_cosine=args.min_cosine, cells=args.cells, nprobe=args.nprobe,
                            sample_rows=args.sample_rows, block_rows=args.block_rows, seed=args.seed).validate()
    cfg = build_config(args, config_overrides(args))
    summary = run_neighbors(cfg, args.manifest, args.features, args.out, params)
    print(json.dumps({"neighbors": summary["neighbors"], "output_rows": summary["output_rows"],
                      "near_duplicate_pairs": summary["near_duplicates"]["pairs"],
                      "cross_split_pairs": summary["cross_split"]["pairs"],
                      "cross_label_pairs": summary["cross_label"]["pairs"], "timings_s": summary["timings_s"]}))
    return 0
