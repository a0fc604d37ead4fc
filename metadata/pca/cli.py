"""``imgfeat pca``: join-back and PCA, or ``--apply MODEL`` to project new feature shards."""
from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from imgfeat.metadata.cli_common import add_common_args, build_config
from imgfeat.metadata.config_flags import add_config_flags, config_overrides, given

log = logging.getLogger(__name__)

PCA_FLAGS = ("pca.standardize", "pca.fit_split", "pca.allow_extra", "spark.master", "spark.partitions")
"""Config keys offered as flags besides --k/--variance (every other key: ``--set``)."""


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``pca`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "pca",
        help="join feature shards back to the manifest and reduce them with PCA",
        description="Read committed feature shards on Spark executors, join them to the manifest by image_id, "
        "fit PCA on one split and write RED/reduced/ Parquet, RED/pca_model.npz, a JSON summary and plots. "
        "With --apply MODEL: project the shards of --features with a saved model into --out.",
    )
    p.add_argument("--manifest", metavar="OUT", help="folder holding manifest/ and manifest_summary.json")
    p.add_argument("--features", metavar="FEAT", required=True, help="folder of feature shards (local or fsspec URL)")
    p.add_argument("--out", metavar="RED", required=True, help="output folder (local or fsspec URL)")
    add_config_flags(p.add_mutually_exclusive_group(), ("pca.k", "pca.variance"))
    add_config_flags(p, PCA_FLAGS)
    p.add_argument("--method", choices=("auto", "exact", "randomized"), default="auto",
                   help="exact d x d eigendecomposition, randomized subspace iteration, or auto (by width)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--apply", metavar="MODEL", help="project --features with this pca_model.npz instead of fitting")
    add_common_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit status (config mistakes raise ValueError: one line from the CLI)."""
    cfg = build_config(args, config_overrides(args))
    if given(args, "pca.k") is not None:
        cfg.pca.variance = 0.0  # an explicit --k wins over a variance from --config
    from imgfeat.metadata.spark.session import get_spark
    from imgfeat.metadata.storage import check_folder, check_writable

    if not args.apply and not args.manifest:
        raise ValueError("--manifest is required (unless --apply MODEL is given)")
    check_folder(args.features, "--features", "the output of imgfeat featurize")  # before Spark starts
    check_writable(args.out, "--out")
    if args.apply:
        from imgfeat.metadata.pca.job import apply_pca

        spark = get_spark(cfg.spark)
        summary = apply_pca(args.apply, args.features, args.out, spark, manifest=args.manifest,
                            allow_extra=cfg.pca.allow_extra, partitions=cfg.spark.partitions or None)
    else:
        from imgfeat.metadata.pca.job import run_pca

        summary = run_pca(cfg, args.manifest, args.features, args.out, method=args.method, plots=not args.no_plots)
    print(json.dumps({k: summary[k] for k in ("reduced", "k", "output_rows", "timings_s") if k in summary}))
    return 0


