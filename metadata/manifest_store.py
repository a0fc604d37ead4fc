"""Where manifest versions live: commit a new version, keep history, load the previous one."""
from __future__ import annotations

import logging
import uuid

import fsspec

from metadata.schema import HISTORY_DIR, MANIFEST_DIR, SUMMARY_FILE
from metadata.shards import move_folder, read_json

log = logging.getLogger(__name__)


def current_version(out: str) -> int:
    """Version of the manifest now at ``out`` (0 when there is none)."""
    summary = read_json(out.rstrip("/") + "/" + SUMMARY_FILE)
    return int(summary.get("version", 1)) if summary else 0


def staging_url(out: str, kind: str = "staging") -> str:
    """A fresh hidden folder under ``out`` (``.manifest-<kind>-<id>``) for a run's files before they are committed."""
    return f"{out.rstrip('/')}/.manifest-{kind}-{uuid.uuid4().hex[:8]}"


def publish_manifest(out: str, staging: str, keep_history: bool) -> int:
    """Make the complete dataset at ``staging`` the new ``OUT/manifest`` and return its version number.

    Only a complete write gets here, so a failed run leaves the previous manifest as it was. The
    previous manifest moves to ``OUT/manifest_history/vN`` when ``keep_history`` (incremental runs),
    else it is removed.
    """
    fs, root = fsspec.core.url_to_fs(out)
    fs.invalidate_cache()  # tasks wrote the files; this process's listing cache has not seen them
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
    move_folder(fs, fsspec.core.url_to_fs(staging)[1], final)
    return version


def remove_folder(url: str) -> None:
    """Remove the folder at ``url`` and everything in it, if it exists."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    if fs.exists(path):
        fs.rm(path, recursive=True)


def previous_manifest(out: str, fingerprint: str) -> tuple[str, int]:
    """The URL and row count of the current manifest at ``out``, for ``--incremental``."""
    summary = read_json(out.rstrip("/") + "/" + SUMMARY_FILE)
    if summary is None:
        raise ValueError(f"--incremental: no previous manifest at {out} (no {SUMMARY_FILE}); run once without it")
    if summary.get("fingerprint") != fingerprint:
        raise ValueError(
            f"--incremental: the [manifest] config changed since the manifest at {out} was built "
            f"(fingerprint {summary.get('fingerprint')} vs {fingerprint}); run without --incremental")
    return out.rstrip("/") + "/" + MANIFEST_DIR, int(summary["total"])
