"""Where manifest versions live: commit a new version, keep history, load the previous one."""
from __future__ import annotations

import logging
import math
import uuid

import fsspec

from metadata.schema import HISTORY_DIR, MANIFEST_DIR, SUMMARY_FILE
from metadata.shards import move_folder, read_json

log = logging.getLogger(__name__)

ROWS_PER_FILE = 500_000


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
    from metadata.parquet_io import write_parquet_dataset
    from metadata.schema import MANIFEST_SCHEMA

    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    name = f".manifest-staging-{uuid.uuid4().hex[:8]}"
    staging = f"{root}/{name}"
    files = max(1, math.ceil(rows / ROWS_PER_FILE))
    # Tasks write through fsspec (local or s3://) with a _SUCCESS file last: no Hadoop connector needed.
    write_parquet_dataset(df.repartitionByRange(files, "path").sortWithinPartitions("path"),
                          out.rstrip("/") + "/" + name, schema=MANIFEST_SCHEMA)
    fs.invalidate_cache()  # the tasks wrote the files; this process's listing cache has not seen them
    version = current_version(out) + 1
    final = f"{root}/{MANIFEST_DIR}"
    if fs.exists(final):
        if keep_history:
            hist = f"{root}/{HISTORY_DIR}/v{version - 1:04d}"
            fs.makedirs(f"{root}/{HISTORY_DIR}", exist_ok=True)
            move_folder(fs, final, hist)
            log.info("previous manifest kept at %s", hist)
        else:
            fs.rm(final, recursive=True)
    move_folder(fs, staging, final)
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
    from metadata.parquet_io import read_parquet_dataset

    return read_parquet_dataset(spark, out.rstrip("/") + "/" + MANIFEST_DIR)
