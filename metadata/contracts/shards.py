"""The shard contract: file names, the JSON marker, and the atomic commit protocol.

Used by every writer of shards (``imgfeat prep`` and ``featurize``) and every reader (pca, the
training Dataset, ``read_features``). A shard ``part-NNNNN`` is complete only when its marker
``part-NNNNN.done.json`` exists and matches its data files (sizes and sha256). Data files are
written under a hidden temporary name in the same folder and renamed when closed; on object stores
(no rename) they are uploaded under their final keys, which never expose a partial object. The marker
is always written last; the atomic writes themselves are ``imgfeat.metadata.storage``'s. Pure Python with
fsspec; no Spark, no torch.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

import fsspec

from imgfeat.metadata.contracts.hooks import fault_point
from imgfeat.metadata.storage import TMP_TAG, join, read_json, write_json_atomic

MARKER_SUFFIX = ".done.json"
REJECTS_SUFFIX = ".rejects.json"
RUN_FILE = "_run.json"

# Feature shards (featurize): npy pair or one HDF5 file per shard.
FEATURES_NPY = "{stem}.features.npy"
IDS_NPY = "{stem}.ids.npy"
FEATURES_H5 = "{stem}.h5"
FEATURES_SUMMARY = "featurize_summary.json"

# Training shards (prep).
PREP_IMAGES_NPY = "{stem}.images.npy"
PREP_LABELS_NPY = "{stem}.labels.npy"
PREP_H5 = "{stem}.h5"
PREP_SUMMARY = "prep_summary.json"


def shard_stem(shard: int) -> str:
    """``part-00042`` for shard 42."""
    return f"part-{int(shard):05d}"


def members_digest(image_ids: Sequence[str]) -> str:
    """sha256 over the sorted ids: changes when a shard's membership changes."""
    h = hashlib.sha256()
    for image_id in sorted(image_ids):
        h.update(image_id.encode())
        h.update(b"\n")
    return h.hexdigest()


def file_digest(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, str]:
    """(size, sha256) of one file."""
    h = hashlib.sha256()
    size = 0
    with fs.open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def write_marker(folder: str, stem: str, data_files: Sequence[str], payload: dict[str, Any]) -> dict[str, Any]:
    """Write the marker last: ``payload`` plus size and sha256 of each committed data file."""
    fault_point("marker_next", join(folder, stem))
    fs, _ = fsspec.core.url_to_fs(folder)
    files = {}
    for name in data_files:
        size, digest = file_digest(fs, fsspec.core.url_to_fs(join(folder, name))[1])
        files[name] = {"bytes": size, "sha256": digest}
    marker = dict(payload, stem=stem, files=files, committed_at=time.time())
    write_json_atomic(join(folder, stem + MARKER_SUFFIX), marker)
    fault_point("marker_done", join(folder, stem))
    return marker


def read_marker(folder: str, stem: str) -> dict[str, Any] | None:
    return read_json(join(folder, stem + MARKER_SUFFIX))


class ShardVerificationError(ValueError):
    """A committed shard does not match its marker."""


def verify_shard(folder: str, stem: str, marker: dict[str, Any] | None = None, checksums: bool = True) -> dict[str, Any]:
    """Check that every file the marker names exists with its size (and sha256); return the marker."""
    marker = marker if marker is not None else read_marker(folder, stem)
    if marker is None:
        raise ShardVerificationError(f"{join(folder, stem)}: no marker {stem + MARKER_SUFFIX} (shard not committed)")
    fs, _ = fsspec.core.url_to_fs(folder)
    for name, expect in marker.get("files", {}).items():
        path = fsspec.core.url_to_fs(join(folder, name))[1]
        if not fs.exists(path):
            raise ShardVerificationError(f"{join(folder, name)}: missing, but its marker lists it")
        if checksums:
            size, digest = file_digest(fs, path)
            if size != expect["bytes"] or digest != expect["sha256"]:
                raise ShardVerificationError(
                    f"{join(folder, name)}: does not match its marker (bytes {size} vs {expect['bytes']}, sha256 differs)"
                )
        elif fs.size(path) != expect["bytes"]:
            raise ShardVerificationError(f"{join(folder, name)}: size {fs.size(path)} differs from its marker {expect['bytes']}")
    return marker


def list_markers(folder: str) -> dict[str, dict[str, Any]]:
    """All valid markers in ``folder`` by stem (unreadable markers are left out)."""
    fs, path = fsspec.core.url_to_fs(folder)
    if not fs.exists(path):
        return {}
    out = {}
    for entry in sorted(fs.ls(path, detail=False)):
        name = entry.rsplit("/", 1)[-1]
        if name.startswith("part-") and name.endswith(MARKER_SUFFIX):
            marker = read_json(join(folder, name))
            if marker is not None:
                out[name[: -len(MARKER_SUFFIX)]] = marker
    return out


def clean_stale_temporaries(folder: str) -> list[str]:
    """Remove hidden temporaries left by killed writers; return what was removed."""
    fs, path = fsspec.core.url_to_fs(folder)
    if not fs.exists(path):
        return []
    removed = []
    for entry in fs.ls(path, detail=False):
        name = entry.rsplit("/", 1)[-1]
        if name.startswith(".") and TMP_TAG in name:
            fs.rm(entry)
            removed.append(name)
    return removed


def remove_shard(folder: str, stem: str) -> None:
    """Remove a shard's marker first (so it is never half-valid), then its other files."""
    fs, path = fsspec.core.url_to_fs(folder)
    marker_path = fsspec.core.url_to_fs(join(folder, stem + MARKER_SUFFIX))[1]
    if fs.exists(marker_path):
        fs.rm(marker_path)
    if fs.exists(path):
        for entry in fs.ls(path, detail=False):
            if entry.rsplit("/", 1)[-1].startswith(stem + "."):
                fs.rm(entry)


