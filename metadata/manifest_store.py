"""Where manifest versions live: commit a new version, keep history, load the previous one."""
from __future__ import annotations

import logging
import math
import uuid

import fsspec

from metadata.schema import HISTORY_DIR, MANIFEST_DIR, SUMMARY_FILE
from metadata.shards import read_json

log = logging.getLogger(__name__)

ROWS_PER_FILE = 500_000


def _spark_path(url: str) -> str:
    return url if "://" in url else "file://" + fsspec.core.url_to_fs(url)[1]


def current_version(out: str) -> int:
    """Version of the manifest now at ``out`` (0 when there is none)."""
    summary = read_json(out.rstrip("/") + "/" + SUMMARY_FILE)
    return int(summary.get("version", 1)) if summary else 0


def commit_manifest(df, out: str, keep_history: bool, rows: int) -> int:
    """Write ``df`` as the new ``OUT/manifest`` and return its version number.

    Spark writes a staging folder first; only a complete write replaces the current manifest, which
    moves to ``OUT/manifest_history/vN`` when ``keep_history`` (incremental runs), else is removed.
    A failed write leaves the previous manifest as it was.
    """
    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    staging = f"{root}/.manifest-staging-{uuid.uuid4().hex[:8]}"
    files = max(1, math.ceil(rows / ROWS_PER_FILE))
    (df.repartitionByRange(files, "path").sortWithinPartitions("path")
       .write.mode("errorifexists").parquet(_spark_path(out.rstrip("/") + staging[len(root):])))
    version = current_version(out) + 1
    final = f"{root}/{MANIFEST_DIR}"
    if fs.exists(final):
        if keep_history:
            hist = f"{root}/{HISTORY_DIR}/v{version - 1:04d}"
            fs.makedirs(f"{root}/{HISTORY_DIR}", exist_ok=True)
            fs.mv(final, hist, recursive=True)
            log.info("previous manifest kept at %s", hist)
        else:
            fs.rm(final, recursive=True)
    fs.mv(staging, final, recursive=True)
    return version


def load_previous(spark, out: str, fingerprint: str):
    """The current manifest at ``out`` as a DataFrame, for ``--incremental``."""
    summary = read_json(out.rstrip("/") + "/" + SUMMARY_FILE)
    if summary is None:
        raise ValueError(f"--incremental: no previous manifest at {out} (no {SUMMARY_FILE}); run once without it")
    if summary.get("fingerprint") != fingerprint:
        raise ValueError(
            f"--incremental: the [manifest] config changed since the manifest at {out} was built "
            f"(fingerprint {summary.get('fingerprint')} vs {fingerprint}); run without --incremental")
    return spark.read.parquet(_spark_path(out.rstrip("/") + "/" + MANIFEST_DIR))
