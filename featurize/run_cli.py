"""The ``run`` subcommand: every configured stage into one run folder, then the report."""
from __future__ import annotations

import argparse
import logging
from typing import Any

from metadata.cli_common import add_common_args, build_config
from metadata.shards import join

log = logging.getLogger(__name__)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="*", metavar="SRC", help="source folders or URLs (default: run.sources)")
    parser.add_argument("--out", help="run folder (default: run.out)")
    parser.add_argument("--master", help="Spark master URL for the manifest and pca stages")
    parser.add_argument("--nproc", type=int, help="featurize processes on this node; > 1 starts torchrun")
    parser.add_argument("--stages", help="comma-separated stages, e.g. manifest,featurize,pca")
    parser.add_argument("--force", action="store_true", help="rerun stages even when they are up to date")
    add_common_args(parser)


def run_command(args: argparse.Namespace) -> int:
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    cfg = build_config(args, {"run": {"nproc": args.nproc, "stages": stages, "out": args.out,
                                      "sources": args.sources or None}})
    from featurize.pipeline import run_pipeline

    report = run_pipeline(cfg, master=args.master, force=args.force)
    acc = report.get("accounting", {})
    print(f"run folder: {report['run']}")
    if acc:
        print(f"files: {acc['manifest_rows']}, flagged in manifest: {acc['flagged_in_manifest']}, "
              f"feature rows: {acc.get('feature_rows')}, featurize rejects: {acc.get('featurize_rejects')}")
    weights = ((report.get("featurize") or {}).get("model") or {}).get("weights")
    if weights:
        print(f"weights used: {weights}")
    print(f"report: {join(report['run'], 'report.html')}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("run", help="manifest -> featurize -> pca (and prep) into one run folder, with a report",
                              description="Run the configured stages into one run folder, resuming what is complete.")
    add_run_arguments(p)
    p.set_defaults(func=run_command)
