"""``imgfeat pca``: join-back and PCA, or ``--apply MODEL`` to project new feature shards."""
from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from imgfeat.metadata.cli_common import add_common_args, build_config, setup_logging

log = logging.getLogger(__name__)


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
    sel = p.add_mutually_exclusive_group()
    sel.add_argument("--k", type=int, default=None, help="number of components (pca.k, default 64)")
    sel.add_argument("--variance", type=float, default=None,
                     help="choose the smallest k reaching this explained-variance fraction (pca.variance)")
    p.add_argument("--standardize", action="store_true", default=None, help="scale columns to unit variance first")
    p.add_argument("--fit-split", default=None, help="split to fit on (pca.fit_split, default train; '' = all rows)")
    p.add_argument("--allow-extra", action="store_true", default=None,
                   help="count and drop feature rows without a manifest row (and duplicate ids) instead of failing")
    p.add_argument("--method", choices=("auto", "exact", "randomized"), default="auto",
                   help="exact d x d eigendecomposition, randomized subspace iteration, or auto (by width)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--apply", metavar="MODEL", help="project --features with this pca_model.npz instead of fitting")
    p.add_argument("--master", help="Spark master URL (spark.master)")
    add_common_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; returns the exit status."""
    setup_logging(args.verbose, args.quiet)
    try:
        cfg = build_config(args, {
            "pca": {"k": args.k, "variance": args.variance, "standardize": args.standardize,
                    "fit_split": args.fit_split, "allow_extra": args.allow_extra},
            "spark": {"master": args.master},
        })
        if args.k is not None:
            cfg.pca.variance = 0.0  # an explicit --k wins over a variance from --config
        from imgfeat.metadata.spark.session import get_spark

        if args.apply:
            from imgfeat.metadata.pca.job import apply_pca

            spark = get_spark(cfg.spark, args.master)
            summary = apply_pca(args.apply, args.features, args.out, spark, manifest=args.manifest,
                                allow_extra=cfg.pca.allow_extra, partitions=cfg.spark.partitions or None)
        else:
            if not args.manifest:
                raise ValueError("--manifest is required (unless --apply MODEL is given)")
            from imgfeat.metadata.pca.job import run_pca

            summary = run_pca(cfg, args.manifest, args.features, args.out, args.master, method=args.method,
                              plots=not args.no_plots)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    print(json.dumps({k: summary[k] for k in ("reduced", "k", "output_rows", "timings_s") if k in summary}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m imgfeat.metadata.pca.cli pca ...``) until the main CLI registers it."""
    parser = argparse.ArgumentParser(prog="imgfeat")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
