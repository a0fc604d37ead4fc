"""``imgfeat run``: manifest -> (prep) -> featurize -> pca -> (neighbors) -> report in one run folder, resuming.

Layout of RUN: ``manifest/`` + ``manifest_summary.json`` (manifest stage), ``prep/``, ``features/``,
``pca/``, ``neighbors/`` (``[neighbors] enabled``: after pca, on its reduced vectors), ``report.html`` +
``report.json``, ``run.json`` (what each stage ran on and how long it took) and ``config.resolved.toml``.
A stage whose inputs and config did not change since it completed is skipped; featurize and prep always
resume shard by shard.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from imgfeat.layout import RUN_STATE, run_paths
from imgfeat.metadata.cli_common import StageFailed
from imgfeat.metadata.config import Config, dump_toml
from imgfeat.metadata.contracts.pca_files import PCA_SUMMARY
from imgfeat.metadata.contracts.schema import CONFIG_FILE, SUMMARY_FILE
from imgfeat.metadata.contracts.shards import FEATURES_SUMMARY
from imgfeat.metadata.neighbors.files import NEIGHBORS_SUMMARY
from imgfeat.metadata.storage import canonical_digest, join, read_json, write_bytes_atomic, write_json_atomic
from imgfeat.preflight import preflight_run
from imgfeat.stale_features import (
    clear_features,
    marker_count,
    part_files,
    remove_changed_features,
    remove_orphan_features,
    snapshot_hashes,
)

log = logging.getLogger(__name__)

def _digest(*parts: Any) -> str:
    return canonical_digest(list(parts))


def run_pipeline(cfg: Config, out: str | None = None, sources: list[str] | None = None, master: str | None = None,
                 force: bool = False) -> dict[str, Any]:
    """Run the configured stages into ``out`` (default ``[run].out``); return the report dict."""
    run_dir = out or cfg.run.out
    srcs = sources or cfg.run.sources
    if not run_dir:
        raise ValueError("run.out (or --out) is required: the folder the run is written to")
    if "manifest" in cfg.run.stages and not srcs:
        raise ValueError("run.sources (or SRC arguments) is required for the manifest stage")
    if cfg.neighbors.enabled and "pca" not in cfg.run.stages and not read_json(join(run_paths(run_dir)["pca"], PCA_SUMMARY)):
        raise ValueError("neighbors.enabled: the neighbours stage reads the pca output; add pca to run.stages")
    preflight_run(cfg, run_dir, srcs)  # sources, run folder, weights: before any Spark or torch work
    paths = run_paths(run_dir)
    state = read_json(join(run_dir, RUN_STATE)) or {"stages": {}}
    state["started_at"] = time.time()  # the report tells this run's stages from earlier runs' records
    write_bytes_atomic(join(run_dir, CONFIG_FILE), dump_toml(cfg).encode())
    t_run = time.perf_counter()

    def record(stage: str, digest: str, seconds: float, skipped: bool, **extra: Any) -> None:
        # "seconds" stays the time of the stage's last real run (the report's bottleneck); "this_run_s" is now.
        prev = state["stages"].get(stage, {})
        state["stages"][stage] = {"digest": digest, "seconds": prev.get("seconds", seconds) if skipped else round(seconds, 3),
                                  "this_run_s": round(seconds, 3), "skipped": skipped, "finished_at": time.time(), **extra}
        write_json_atomic(join(run_dir, RUN_STATE), state)

    def done(stage: str, digest: str) -> bool:
        return not force and state["stages"].get(stage, {}).get("digest") == digest

    stages = list(cfg.run.stages)
    if cfg.tiles.enabled and "featurize" in stages:  # the tiles of tiled images, right after the images
        stages.insert(stages.index("featurize") + 1, "tiles")
    for stage in [*stages, *(["neighbors"] if cfg.neighbors.enabled else [])]:
        t = time.perf_counter()
        if stage == "manifest":
            from imgfeat.metadata.manifest.job import run_manifest

            digest = _digest(cfg.fingerprint("manifest"), sorted(srcs))
            previous = read_json(join(run_dir, SUMMARY_FILE))
            incremental = not force and previous is not None and previous.get("fingerprint") == cfg.fingerprint("manifest")
            before = None
            pending = state.pop("rebuild_pending", False)
            if incremental and not pending:
                # Before new shard numbers are dealt: a number freed earlier must not meet its old features.
                dropped = remove_orphan_features(run_dir, paths["features"])
            elif force or pending or previous is None:
                # --force recomputes everything. Otherwise the manifest the features were made from is gone (a
                # rebuild stopped before its comparison below), so no shard can be shown to hold current bytes.
                dropped = clear_features(paths["features"])
            else:  # a full rebuild ([manifest] config changed): keep the shards whose files did not change
                dropped = []
                if part_files(paths["features"]):
                    before = snapshot_hashes(cfg, run_dir, master)
                    state["rebuild_pending"] = True
                    write_json_atomic(join(run_dir, RUN_STATE), state)
            summary = run_manifest(cfg, srcs, paths["manifest"], master=master, incremental=incremental)
            if before is not None:
                dropped = remove_changed_features(cfg, run_dir, paths["features"], before, master)
                state.pop("rebuild_pending", None)
            unchanged = incremental and not summary.get("published", True)
            record(stage, digest, time.perf_counter() - t, unchanged, mode="incremental" if incremental else "full",
                   version=summary["version"], published=not unchanged, changes=summary["incremental"],
                   feature_shards_dropped=len(dropped))
            changes = summary["incremental"]
            if changes is None:
                log.info("manifest v%d: %d files, %s", summary["version"], summary["total"], summary["by_status"])
            else:
                log.info("manifest v%d%s: %d new, %d changed, %d removed, %d unchanged files", summary["version"],
                         " (kept: nothing changed)" if unchanged else "", changes["new"], changes["changed"],
                         changes["removed"], changes["unchanged"])
        elif stage == "prep":
            from imgfeat.preprocess.export import run_prep

            run_prep(cfg, paths["manifest"], paths["prep"])
            record(stage, _digest(cfg.fingerprint("prep", "preprocess")), time.perf_counter() - t, False)
        elif stage == "featurize":
            digest = _digest(cfg.fingerprint("featurize", "preprocess"))
            manifest_id = _manifest_identity(read_json(join(run_dir, SUMMARY_FILE)))
            last = read_json(join(paths["features"], FEATURES_SUMMARY))
            if (done(stage, digest) and state["stages"][stage].get("manifest") == manifest_id and last is not None
                    and marker_count(paths["features"]) == last.get("shards")):
                # Starting the model only to find every shard committed costs seconds; nothing it reads changed.
                log.info("featurize: up to date (same manifest, config and shards), skipped")
                record(stage, digest, time.perf_counter() - t, True, manifest=manifest_id, shards_computed=0,
                       shards_dropped=0)
                continue
            dropped = remove_orphan_features(run_dir, paths["features"])
            _featurize(cfg, paths)
            after = read_json(join(paths["features"], FEATURES_SUMMARY)) or {}
            fresh = last is None or after.get("written_at") != last.get("written_at")
            computed = (after.get("this_run") or {}).get("shards", 0) if fresh else 0
            record(stage, digest, time.perf_counter() - t, False, manifest=manifest_id, shards_computed=computed,
                   shards_dropped=len(dropped))
            log.info("featurize: %d shards computed, %d of %s committed shards reused", computed,
                     (after.get("shards") or 0) - computed, after.get("shards"))
        elif stage == "tiles":
            manifest = read_json(join(run_dir, SUMMARY_FILE)) or {}
            if not (manifest.get("tiles") or {}).get("tiles"):
                log.info("tiles: no tiled image in the manifest")
                record(stage, "", time.perf_counter() - t, True, tiles=0)
                continue
            _featurize(cfg, paths, tiles=True)  # resumable: shards already committed for these tiles are kept
            if cfg.tiles.pooled:
                from imgfeat.metadata.tiles.pool import pool_tiles

                pool_tiles(cfg, paths["manifest"], paths["tile_features"], paths["tiles_pooled"], master=master)
            record(stage, _digest(cfg.fingerprint("featurize", "preprocess"), _manifest_identity(manifest)),
                   time.perf_counter() - t, False, tiles=manifest["tiles"]["tiles"])
        elif stage == "pca":
            feat = read_json(join(paths["features"], FEATURES_SUMMARY)) or {}
            manifest = read_json(join(run_dir, SUMMARY_FILE)) or {}
            digest = _digest(cfg.fingerprint("pca"), manifest.get("version"), manifest.get("fingerprint"),
                             feat.get("fingerprint"), feat.get("rows"), feat.get("shards"))
            if done(stage, digest) and read_json(join(paths["pca"], PCA_SUMMARY)):
                log.info("pca: up to date (same features and config), skipped")
                record(stage, digest, time.perf_counter() - t, True)
                continue
            from imgfeat.metadata.pca.job import run_pca

            # A refit, not a projection with the previous model: see README, `imgfeat run`.
            run_pca(cfg, paths["manifest"], paths["features"], paths["pca"], master=master)
            record(stage, digest, time.perf_counter() - t, False)
        elif stage == "neighbors":
            # The pca record's digest names the reduced vectors (manifest version, features, pca config).
            pca_summary = read_json(join(paths["pca"], PCA_SUMMARY)) or {}
            digest = _digest(cfg.fingerprint("neighbors"), state["stages"].get("pca", {}).get("digest"),
                             pca_summary.get("output_rows"))
            previous = read_json(join(paths["neighbors"], NEIGHBORS_SUMMARY))
            if done(stage, digest) and previous:
                log.info("neighbors: up to date (same pca output and config), skipped")
                record(stage, digest, time.perf_counter() - t, True, **_pair_counts(previous))
                continue
            from imgfeat.metadata.neighbors.job import NeighborParams, run_neighbors

            summary = run_neighbors(cfg, paths["manifest"], paths["pca"], paths["neighbors"],
                                    NeighborParams.from_config(cfg.neighbors), master=master)
            record(stage, digest, time.perf_counter() - t, False, **_pair_counts(summary))
    state["total_s"] = round(time.perf_counter() - t_run, 3)
    write_json_atomic(join(run_dir, RUN_STATE), state)
    from imgfeat.report import write_report

    return write_report(run_dir, cfg)


def _pair_counts(summary: dict[str, Any]) -> dict[str, int]:
    """The neighbours summary's pair counts, for run.json."""
    return {f"{kind}_pairs": int(summary[kind]["pairs"]) for kind in ("near_duplicates", "cross_split", "cross_label")}


def _manifest_identity(summary: dict[str, Any] | None) -> str:
    """Names one manifest version of a run folder (an unchanged rerun keeps it; a publish changes it)."""
    s = summary or {}
    return _digest(s.get("version"), s.get("fingerprint"), s.get("total"), s.get("num_shards"), s.get("by_status"))


def _featurize(cfg: Config, paths: dict[str, str], tiles: bool = False) -> None:
    """In this process for one rank; through torchrun (standalone, this node) for several. ``tiles``: the tile
    table into ``tile_features``."""
    features = paths["tile_features" if tiles else "features"]
    if cfg.run.nproc <= 1:
        from imgfeat.featurize.runner import run_featurize

        run_featurize(cfg, paths["manifest"], features, tiles=tiles)
        return
    # --config takes a local file; the run folder's copy may be on an object store.
    with tempfile.TemporaryDirectory(prefix="imgfeat-run-") as tmp:
        conf = os.path.join(tmp, CONFIG_FILE)
        with open(conf, "w", encoding="utf-8") as fh:
            fh.write(dump_toml(cfg))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={cfg.run.nproc}",
               "-m", "imgfeat.featurize", "--manifest", paths["manifest"], "--out", features, "--config", conf,
               *(["--tiles"] if tiles else [])]
        log.info("featurize: %s", " ".join(cmd))
        proc = subprocess.run(cmd, env=dict(os.environ, IMGFEAT_NO_PROGRESS=os.environ.get("IMGFEAT_NO_PROGRESS", "")))
    if proc.returncode != 0:
        raise StageFailed(f"featurize under torchrun failed with exit code {proc.returncode}; rerun to resume")
