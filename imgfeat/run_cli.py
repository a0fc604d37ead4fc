"""The ``run`` subcommand: every configured stage into one run folder, then the report."""
from __future__ import annotations

import argparse
import logging
from typing import Any

from imgfeat.metadata.cli_common import add_common_args, build_config
from imgfeat.metadata.config import Config
from imgfeat.metadata.storage import join

log = logging.getLogger(__name__)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sources", nargs="*", metavar="SRC", help="source folders or URLs (default: run.sources)")
    parser.add_argument("--out", help="run folder (default: run.out)")
    parser.add_argument("--master", help="Spark master URL for the manifest and pca stages")
    parser.add_argument("--nproc", type=int, help="featurize processes on this node; > 1 starts torchrun")
    parser.add_argument("--stages", help="comma-separated stages, e.g. manifest,featurize,pca")
    parser.add_argument("--force", action="store_true", help="rerun stages even when they are up to date")
    g = parser.add_argument_group("stage options (the same flags as the stage commands; --set reaches every other key)")
    g.add_argument("--validation", choices=["header", "full"], help="manifest check depth (manifest.validation)")
    g.add_argument("--model", help="torchvision model name (featurize.model)")
    g.add_argument("--weights", help="torchvision weights enum name or none (featurize.weights)")
    g.add_argument("--weights-path", metavar="FILE", help="a local state_dict file (featurize.weights_path)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="autocast precision (featurize.precision)")
    g.add_argument("--device", help="auto, cpu, cuda or cuda:N (featurize.device)")
    g.add_argument("--batch-size", type=int, help="images per batch (preprocess.batch_size)")
    g.add_argument("--num-workers", type=int, help="decode workers per rank (preprocess.num_workers)")
    g.add_argument("--k", type=int, help="PCA components (pca.k)")
    add_common_args(parser)


def config_from_args(args: argparse.Namespace) -> Config:
    """``--config``, then ``--set``, then the flags that were given."""
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    cfg = build_config(args, {
        "run": {"nproc": args.nproc, "stages": stages, "out": args.out, "sources": args.sources or None},
        "manifest": {"validation": args.validation},
        "featurize": {"model": args.model, "weights": args.weights, "weights_path": args.weights_path,
                      "precision": args.precision, "device": args.device},
        "preprocess": {"batch_size": args.batch_size, "num_workers": args.num_workers},
        "pca": {"k": args.k},
    })
    if args.k is not None:
        cfg.pca.variance = 0.0  # an explicit --k wins over a variance from --config, as in `imgfeat pca`
    return cfg


def run_command(args: argparse.Namespace) -> int:
    """``imgfeat run``: every configured stage, then the report; prints where things are."""
    cfg = config_from_args(args)
    from imgfeat.run import run_pipeline

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
