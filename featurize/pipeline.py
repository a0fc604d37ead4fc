"""``imgfeat run``: manifest -> (prep) -> featurize -> pca -> report in one run folder, resuming.

Layout of RUN: ``manifest/`` + ``manifest_summary.json`` (manifest stage), ``prep/``, ``features/``,
``pca/``, ``report.html`` + ``report.json``, ``run.json`` (what each stage ran on and how long it took)
and ``config.resolved.toml``. A stage whose inputs and config did not change since it completed is
skipped; featurize and prep always resume shard by shard.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from metadata.config import Config, dump_toml
from metadata.schema import SUMMARY_FILE
from metadata.shards import join, read_json, write_bytes_atomic, write_json_atomic

log = logging.getLogger(__name__)

RUN_STATE = "run.json"


def run_paths(run: str) -> dict[str, str]:
    """Where each stage writes inside the run folder."""
    return {"manifest": run, "prep": join(run, "prep"), "features": join(run, "features"), "pca": join(run, "pca")}


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_pipeline(cfg: Config, out: str | None = None, sources: list[str] | None = None, master: str | None = None,
                 force: bool = False) -> dict[str, Any]:
    """Run the configured stages into ``out`` (default ``[run].out``); return the report dict."""
    run_dir = out or cfg.run.out
    srcs = sources or cfg.run.sources
    if not run_dir:
        raise ValueError("run.out (or --out) is required: the folder the run is written to")
    if "manifest" in cfg.run.stages and not srcs:
        raise ValueError("run.sources (or SRC arguments) is required for the manifest stage")
    paths = run_paths(run_dir)
    state = read_json(join(run_dir, RUN_STATE)) or {"stages": {}}
    write_bytes_atomic(join(run_dir, "config.resolved.toml"), dump_toml(cfg).encode())
    t_run = time.perf_counter()

    def record(stage: str, digest: str, seconds: float, skipped: bool) -> None:
        prev = state["stages"].get(stage, {})
        state["stages"][stage] = {"digest": digest, "seconds": prev.get("seconds", seconds) if skipped else round(seconds, 3),
                                  "skipped": skipped, "finished_at": time.time()}
        write_json_atomic(join(run_dir, RUN_STATE), state)

    def done(stage: str, digest: str) -> bool:
        return not force and state["stages"].get(stage, {}).get("digest") == digest

    for stage in cfg.run.stages:
        t = time.perf_counter()
        if stage == "manifest":
            digest = _digest(cfg.fingerprint("manifest"), sorted(srcs))
            if done(stage, digest) and read_json(join(run_dir, SUMMARY_FILE)):
                log.info("manifest: up to date (same sources and config), skipped")
                record(stage, digest, 0, True)
                continue
            from metadata.manifest_job import run_manifest

            summary = run_manifest(cfg, srcs, paths["manifest"], master=master)
            record(stage, digest, time.perf_counter() - t, False)
            log.info("manifest: %d files, %s", summary["total"], summary["by_status"])
        elif stage == "prep":
            from preprocess.export import run_prep

            run_prep(cfg, paths["manifest"], paths["prep"])
            record(stage, _digest(cfg.fingerprint("prep", "preprocess")), time.perf_counter() - t, False)
        elif stage == "featurize":
            _featurize(cfg, paths)
            record(stage, _digest(cfg.fingerprint("featurize", "preprocess")), time.perf_counter() - t, False)
        elif stage == "pca":
            feat = read_json(join(paths["features"], "featurize_summary.json")) or {}
            manifest = read_json(join(run_dir, SUMMARY_FILE)) or {}
            digest = _digest(cfg.fingerprint("pca"), manifest.get("version"), manifest.get("fingerprint"),
                             feat.get("fingerprint"), feat.get("rows"), feat.get("shards"))
            if done(stage, digest) and read_json(join(paths["pca"], "pca_summary.json")):
                log.info("pca: up to date (same features and config), skipped")
                record(stage, digest, 0, True)
                continue
            from metadata.pca import run_pca

            run_pca(cfg, paths["manifest"], paths["features"], paths["pca"], master=master)
            record(stage, digest, time.perf_counter() - t, False)
    state["total_s"] = round(time.perf_counter() - t_run, 3)
    write_json_atomic(join(run_dir, RUN_STATE), state)
    from featurize.report import write_report

    return write_report(run_dir, cfg)


def _featurize(cfg: Config, paths: dict[str, str]) -> None:
    """In this process for one rank; through torchrun (standalone, this node) for several."""
    if cfg.run.nproc <= 1:
        from featurize.runner import run_featurize

        run_featurize(cfg, paths["manifest"], paths["features"])
        return
    # --config takes a local file; the run folder's copy may be on an object store.
    with tempfile.TemporaryDirectory(prefix="imgfeat-run-") as tmp:
        conf = os.path.join(tmp, "config.resolved.toml")
        with open(conf, "w", encoding="utf-8") as fh:
            fh.write(dump_toml(cfg))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.run.nproc}",
               "-m", "featurize", "--manifest", paths["manifest"], "--out", paths["features"], "--config", conf]
        log.info("featurize: %s", " ".join(cmd))
        proc = subprocess.run(cmd, env=dict(os.environ, IMGFEAT_NO_PROGRESS=os.environ.get("IMGFEAT_NO_PROGRESS", "")))
    if proc.returncode != 0:
        raise RuntimeError(f"featurize under torchrun failed with exit code {proc.returncode}; rerun to resume")
