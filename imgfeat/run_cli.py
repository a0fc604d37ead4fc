"""The ``run`` subcommand: every configured stage into one run folder, then the report."""
from __future__ import annotations

import argparse
import logging
from typing import Any

from imgfeat.layout import REPORT_HTML
from imgfeat.metadata.cli_common import add_common_args, build_config
from imgfeat.metadata.config import Config
from imgfeat.metadata.config_flags import add_config_flags, config_overrides, given
from imgfeat.metadata.storage import join

log = logging.getLogger(__name__)


STAGE_FLAGS = ("manifest.validation", "featurize.model", "featurize.weights", "featurize.weights_path",
               "featurize.precision", "featurize.device", "preprocess.batch_size", "preprocess.num_workers", "pca.k")
"""Stage keys offered as flags by ``run`` (the same flags as the stage commands)."""


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="*", metavar="SRC", help="source folders or URLs (default: run.sources)")
    add_config_flags(parser, ("run.out", "run.nproc", "run.stages", "spark.master"))
    parser.add_argument("--force", action="store_true", help="rerun stages even when they are up to date")
    add_config_flags(parser.add_argument_group("stage options (the same flags as the stage commands; --set reaches "
                                               "every other key)"), STAGE_FLAGS)
    add_common_args(parser)


def config_from_args(args: argparse.Namespace) -> Config:
    """``--config``, then ``--set``, then the flags that were given."""
    overrides = config_overrides(args)
    if args.sources:
        overrides.setdefault("run", {})["sources"] = args.sources
    cfg = build_config(args, overrides)
    if given(args, "pca.k") is not None:
        cfg.pca.variance = 0.0  # an explicit --k wins over a variance from --config, as in `imgfeat pca`
    return cfg


def run_command(args: argparse.Namespace) -> int:
    """``imgfeat run``: every configured stage, then the report; prints where things are."""
    cfg = config_from_args(args)
    from imgfeat.run import run_pipeline

    report = run_pipeline(cfg, force=args.force)
    acc = report.get("accounting", {})
    print(f"run folder: {report['run']}")
    if acc:
        print(f"files: {acc['manifest_rows']}, flagged in manifest: {acc['flagged_in_manifest']}, "
              f"feature rows: {acc.get('feature_rows')}, featurize rejects: {acc.get('featurize_rejects')}")
    nb = report.get("neighbors")
    if nb:
        print(f"neighbour pairs at cosine >= {nb['min_cosine']}: {nb['near_duplicates']['pairs']}, across splits: "
              f"{nb['cross_split']['pairs']}, across labels: {nb['cross_label']['pairs']}")
    weights = ((report.get("featurize") or {}).get("model") or {}).get("weights")
    if weights:
        print(f"weights used: {weights}")
    print(f"report: {join(report['run'], REPORT_HTML)}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("run", help="manifest -> featurize -> pca (and prep, neighbors) into one run folder, with a report",
                              description="Run the configured stages into one run folder, resuming what is complete.")
    add_run_arguments(p)
    p.set_defaults(func=run_command)
