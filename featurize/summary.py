"""The run-level summary ``FEAT/featurize_summary.json``, written when every shard is committed.

Each rank, after its last shard, writes its counts and per-stage timings to ``FEAT/_stats/ATTEMPT-rankN.json``
and checks the markers of every manifest shard; the rank that finds them all committed (the last to finish)
writes the summary: counts, timings, throughput and the slowest stage. No collective at the end, so ranks
that finish early never wait (or time out) on slow ones.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from typing import Any

from imgfeat.featurize import assign as assign_mod
from imgfeat.featurize.distributed import DistContext
from imgfeat.featurize.model import ModelInfo
from imgfeat.featurize.stats import RankStats
from imgfeat.metadata import storage
from imgfeat.metadata.config import Config
from imgfeat.metadata.contracts import feature_store, shards

log = logging.getLogger(__name__)


def read_summary(folder: str) -> dict[str, Any] | None:
    """The summary of a finished run, or None."""
    return storage.read_json(storage.join(folder, shards.FEATURES_SUMMARY))


def build_summary(cfg: Config, folder: str, work: assign_mod.ShardCatalog, fingerprint: str, info: ModelInfo,
                  per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary payload from the committed markers and the ranks' stats of this run (``per_rank``: the
    ``RankStats`` records of ``finish_run``, as read back from JSON)."""
    stems = {w.stem for w in work.values()}
    markers = {s: m for s, m in shards.list_markers(folder).items() if s in stems}
    rows = sum(int(m["rows"]) for m in markers.values())
    rejects = sum(int(m["rejects"]) for m in markers.values())
    reasons: Counter[str] = Counter()
    for stem, marker in markers.items():
        if marker["rejects"]:
            reasons.update(r.get("reason", "?") for r in feature_store.read_rejects(folder, stem))
    stages = list(per_rank[0]["timings"]) if per_rank else []
    totals = {s: round(sum(r["timings"][s] for r in per_rank), 3) for s in stages}
    wall = max((r["wall_s"] for r in per_rank), default=0.0)
    images = sum(r["images"] + r["rejects"] for r in per_rank)
    slowest = max(totals, key=totals.__getitem__) if totals and any(totals.values()) else None
    loop = max((r.get("loop_s", 0.0) for r in per_rank), default=0.0)
    loop_ips = images / loop if loop > 0 else None
    # The model-only ceiling of the whole run: the ranks' figures add up (each has its own device or cores).
    model_only = sum(float(r.get("model_only_img_s") or 0.0) for r in per_rank) or None
    fallbacks: Counter[str] = Counter()
    for r in per_rank:
        fallbacks.update(r.get("decode_fallbacks") or {})
    return {
        "version": 1,
        "fingerprint": fingerprint,
        "model": dataclasses.asdict(info),
        "manifest_rows": sum(len(w) for w in work.values()),
        "shards": len(work),
        "rows": rows,
        "rejects": rejects,
        "reject_reasons": dict(reasons),
        "dim": next((int(m["dim"]) for m in markers.values() if int(m["rows"]) > 0), info.dim),
        "format": cfg.featurize.format,
        "dtype": cfg.featurize.dtype,
        "precision": cfg.featurize.precision,
        "batch_size": cfg.preprocess.batch_size,
        "size": cfg.preprocess.size,
        "world_size": len(per_rank),
        "this_run": {
            "images": images,
            "shards": sum(len(r["shards"]) for r in per_rank),
            "wall_s": round(wall, 3),
            "loop_s": round(loop, 3),
            "images_per_s": round(images / wall, 2) if wall > 0 else None,
            "loop_images_per_s": round(loop_ips, 2) if loop_ips is not None else None,
            "model_only_img_s": round(model_only, 2) if model_only is not None else None,
            "model_efficiency": round(loop_ips / model_only, 3) if loop_ips and model_only else None,
            "decode_device": sorted({r.get("decode_device", "cpu") for r in per_rank}),
            "decode_fallbacks": dict(fallbacks),
            "gpu_decoded": sum(int(r.get("gpu_decoded") or 0) for r in per_rank),
            "stage_seconds": totals,
            "slowest_stage": slowest,
            "failed_attempts": sum(r["attempts_failed"] for r in per_rank),
            "per_rank": per_rank,
        },
        "written_at": time.time(),
    }


STATS_DIR = "_stats"
"""Per-rank stats files of each attempt, ``FEAT/_stats/ATTEMPT-rankN.json``."""


def _all_committed(folder: str, work: assign_mod.ShardCatalog, fingerprint: str) -> bool:
    """Every manifest shard has a marker of this run with the manifest's members, its files of the sizes it
    records. One listing first: while markers are missing (ranks still computing) none is read."""
    sizes = shards.folder_sizes(folder)
    if any(w.stem + shards.MARKER_SUFFIX not in sizes for w in work.values()):
        return False
    markers = shards.list_markers(folder)
    for w in work.values():
        m = markers.get(w.stem)
        if m is None or m.get("fingerprint") != fingerprint or m.get("members") != w.members:
            return False
    try:
        for w in work.values():
            shards.check_sizes(folder, w.stem, markers[w.stem], sizes)
    except shards.ShardVerificationError:
        return False
    return True


def finish_run(ctx: DistContext, cfg: Config, folder: str, work: assign_mod.ShardCatalog, fingerprint: str,
               info: ModelInfo, stats: RankStats, computed: bool, attempt: str) -> dict[str, Any] | None:
    """Record this rank's stats; whichever rank finds every shard committed writes the summary (no collective:
    ranks that finish early do not wait on the slow ones). Returns the summary when this rank wrote or kept it."""
    stats_dir = storage.join(folder, STATS_DIR)
    storage.write_json_atomic(storage.join(stats_dir, f"{attempt}-rank{ctx.rank:05d}.json"), dataclasses.asdict(stats))
    if not _all_committed(folder, work, fingerprint):
        if ctx.world_size == 1:
            log.warning("some shards are not committed: no summary; rerun the same command")
        return None
    existing = read_summary(folder)
    if existing is not None and existing.get("fingerprint") == fingerprint and not computed:
        log.info("all %d shards were already committed; summary kept", len(work))
        return existing
    import fsspec

    fs, path = fsspec.core.url_to_fs(stats_dir)
    per_rank = []
    for entry in sorted(fs.ls(path, detail=False)):
        name = entry.rsplit("/", 1)[-1]
        if name.startswith(attempt + "-rank") and name.endswith(".json"):
            data = storage.read_json(storage.join(stats_dir, name))
            if data is not None:
                per_rank.append(data)
    per_rank.sort(key=lambda r: r["rank"])
    summary = build_summary(cfg, folder, work, fingerprint, info, per_rank)
    summary["world_size"] = ctx.world_size
    storage.write_json_atomic(storage.join(folder, shards.FEATURES_SUMMARY), summary)
    t = summary["this_run"]
    log.info("featurize done: %d rows, %d rejects in %d shards; this run %d images in %.1f s (%.1f img/s; shard loop "
             "%.1f img/s, model alone %.1f img/s), slowest stage %s", summary["rows"], summary["rejects"], summary["shards"],
             t["images"], t["wall_s"], t["images_per_s"] or 0.0, t["loop_images_per_s"] or 0.0, t["model_only_img_s"] or 0.0,
             t["slowest_stage"])
    if t["decode_fallbacks"]:
        log.info("GPU decode: %d images on the device; on the CPU instead: %s", t["gpu_decoded"],
                 ", ".join(f"{k} {v}" for k, v in sorted(t["decode_fallbacks"].items())))
    return summary
