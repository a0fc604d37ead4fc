"""Where manifest versions live: commit a new version, keep history, load the previous one."""
from __future__ import annotations

import hashlib
import logging
import uuid
from typing import TYPE_CHECKING

import fsspec

from imgfeat.metadata.contracts.schema import HISTORY_DIR, MANIFEST_DIR, MANIFEST_SCHEMA, SUMMARY_FILE
from imgfeat.metadata.manifest.listing import Entry, Unit, list_unit
from imgfeat.metadata.storage import file_sha256, join, publish_folder, read_json

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)


def current_version(out: str) -> int:
    """Version of the manifest now at ``out`` (0 when there is none)."""
    summary = read_json(join(out, SUMMARY_FILE))
    return int(summary.get("version", 1)) if summary else 0


def staging_url(out: str, kind: str = "staging") -> str:
    """A fresh hidden folder under ``out`` (``.manifest-<kind>-<id>``) for a run's files before they are committed."""
    return f"{out.rstrip('/')}/.manifest-{kind}-{uuid.uuid4().hex[:8]}"


def publish_manifest(out: str, staging: str, keep_history: bool, table_format: str = "parquet",
                     note: dict | None = None) -> int:
    """Make the complete dataset at ``staging`` the new ``OUT/manifest`` and return its version number.

    Only a complete write gets here, so a failed run leaves the previous manifest as it was. Parquet: the
    previous manifest moves to ``OUT/manifest_history/vN`` when ``keep_history`` (incremental runs),
    else it is removed. Delta (``publish_delta``): one more version of the table, which keeps the history.
    """
    version = current_version(out) + 1
    if table_format == "delta":
        publish_delta(join(out, MANIFEST_DIR), staging, dict(note or {}, imgfeat_version=version))
        return version
    keep = join(out, f"{HISTORY_DIR}/v{version - 1:04d}") if keep_history else None
    publish_folder(staging, join(out, MANIFEST_DIR), keep_previous_at=keep)
    if keep and fsspec.core.url_to_fs(keep)[0].exists(fsspec.core.url_to_fs(keep)[1]):
        log.info("previous manifest kept at %s", keep)
    return version


def publish_delta(table: str, staging: str, note: dict) -> int:
    """The staged manifest as the next version of the Delta table ``table``, with its shard index
    (``contracts.delta.publish_dataset``); returns the Delta version."""
    from imgfeat.metadata.contracts import delta
    from imgfeat.metadata.contracts.shard_index import SHARD_INDEX_FILE

    version = delta.publish_dataset(table, staging, MANIFEST_SCHEMA, note, extra_files=(SHARD_INDEX_FILE,))
    log.info("manifest: Delta table %s at version %d", table, version)
    return version


def labels_digest(url: str) -> str:
    """sha256 of the labels CSV at ``url``: unchanged files keep their rows, but their labels come from it."""
    return file_sha256(url)


DRIVER_LISTING_MAX = 100_000
"""Up to this many files the driver lists local sources itself to tell a no-change rerun without Spark."""


class ListingDigest:
    """An order-free digest of listed entries: each path with its size and mtime, or its listing error."""

    def __init__(self) -> None:
        self.total = 0
        self.count = 0

    def add(self, e: Entry) -> None:
        """Count one listed entry."""
        h = hashlib.blake2b(repr((e.path, e.size, e.mtime, e.error)).encode("utf-8", "surrogateescape"),
                            digest_size=16).digest()
        self.total = (self.total + int.from_bytes(h, "big")) % (1 << 128)
        self.count += 1

    def value(self) -> str:
        """The digest as text: the entry count and the 128-bit sum."""
        return f"{self.count}-{self.total:032x}"


def walk_small_local(roots: list[str], limit: int = DRIVER_LISTING_MAX) -> tuple[list[Entry], str] | None:
    """Small local sources walked by the driver: (entries, ``ListingDigest``), or None when a source is
    remote or they hold more than ``limit`` entries (then Spark lists them).

    Bounded by ``limit`` (100,000 entries, about 20 MB and a second of stat calls): at 60,000 files it saves
    a Spark job per folder depth, and the digest tells an incremental rerun that nothing changed
    without starting Spark."""
    if not all(r.startswith("file://") for r in roots):
        return None
    digest = ListingDigest()
    entries: list[Entry] = []
    for root in roots:
        for e in list_unit(Unit(root, root, True)):
            if digest.count >= limit:
                return None
            digest.add(e)
            entries.append(e)
    return entries, digest.value()


def listing_digest(roots: list[str], limit: int = DRIVER_LISTING_MAX) -> str | None:
    """The ``ListingDigest`` of ``walk_small_local(roots, limit)``; None where Spark must list them."""
    walked = walk_small_local(roots, limit)
    return walked[1] if walked is not None else None


def same_rows(spark: SparkSession, a: str, b: str, keys: DataFrame) -> bool:
    """Whether the manifest datasets at ``a`` and ``b`` hold the same rows (every column) for the paths
    in ``keys`` (a DataFrame with a ``path`` column).

    On Spark: both sides semi-joined to ``keys`` and compared with ``exceptAll`` (a shuffle; null- and
    NaN-safe), so no task or the driver holds more than its share of the rows."""
    from imgfeat.metadata.spark.parquet import read_parquet_dataset

    left, right = (read_parquet_dataset(spark, url).join(keys, "path", "left_semi") for url in (a, b))
    if left.schema != right.schema:
        return False
    return left.exceptAll(right).isEmpty() and right.exceptAll(left).isEmpty()


def previous_manifest(out: str, fingerprint: str) -> tuple[str, int]:
    """The URL and row count of the current manifest at ``out``, for ``--incremental``."""
    summary = read_json(join(out, SUMMARY_FILE))
    if summary is None:
        raise ValueError(f"--incremental: no previous manifest at {out} (no {SUMMARY_FILE}); run once without it")
    if summary.get("fingerprint") != fingerprint:
        raise ValueError(
            f"--incremental: the [manifest] config changed since the manifest at {out} was built "
            f"(fingerprint {summary.get('fingerprint')} vs {fingerprint}); run without --incremental")
    return join(out, MANIFEST_DIR), int(summary["total"])
