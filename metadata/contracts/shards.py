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
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from imgfeat.metadata.contracts.hooks import fault_point
from imgfeat.metadata.storage import TMP_TAG, join, read_json, write_json_atomic

MARKER_SUFFIX = ".done.json"
REJECTS_SUFFIX = ".rejects.json"
RUN_FILE = "_run.json"
MARKER_FETCH_THREADS = 16
"""Markers fetched at once from an object store (``list_markers``)."""

# Feature shards (featurize): npy pair or one HDF5 file per shard.
FEATURES_NPY = "{stem}.features.npy"
IDS_NPY = "{stem}.ids.npy"
TILES_NPY = "{stem}.tiles.npy"
"""Tile feature shards: per row its image's id and box (``feature_store.TILE_DTYPE``)."""
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


def _redo(name: str) -> str:
    """The fix for a damaged file of a committed shard (a rerun skips committed shards without re-hashing)."""
    return f"; to recompute the shard, delete {name.split('.', 1)[0] + MARKER_SUFFIX} and rerun the command that wrote it"


def _mismatch(folder: str, name: str, size: int, expect: dict[str, Any]) -> ShardVerificationError:
    return ShardVerificationError(
        f"{join(folder, name)}: does not match its marker (bytes {size} vs {expect['bytes']}, sha256 differs)"
        + _redo(name))


def verify_file(folder: str, name: str, expect: dict[str, Any], checksums: bool = True) -> None:
    """Check one file of a shard against its marker entry ``expect`` (``bytes``, ``sha256``); the error names it."""
    fs, _ = fsspec.core.url_to_fs(folder)
    path = fsspec.core.url_to_fs(join(folder, name))[1]
    if not fs.exists(path):
        raise ShardVerificationError(f"{join(folder, name)}: missing, but its marker lists it" + _redo(name))
    if checksums:
        size, digest = file_digest(fs, path)
        if size != expect["bytes"] or digest != expect["sha256"]:
            raise _mismatch(folder, name, size, expect)
    elif fs.size(path) != expect["bytes"]:
        raise ShardVerificationError(f"{join(folder, name)}: size {fs.size(path)} differs from its marker {expect['bytes']}"
                                     + _redo(name))


def read_verified(folder: str, name: str, expect: dict[str, Any] | None) -> bytes:
    """The bytes of one shard file, checked (size and sha256) against its marker entry ``expect`` as they are
    read: one pass over the file. ``expect`` None: read unchecked."""
    fs, _ = fsspec.core.url_to_fs(folder)
    try:
        data = fs.cat_file(fsspec.core.url_to_fs(join(folder, name))[1])
    except FileNotFoundError:
        raise ShardVerificationError(f"{join(folder, name)}: missing, but its marker lists it" + _redo(name)) from None
    if expect is not None and (len(data) != expect["bytes"] or hashlib.sha256(data).hexdigest() != expect["sha256"]):
        raise _mismatch(folder, name, len(data), expect)
    return bytes(data)


def verify_shard(folder: str, stem: str, marker: dict[str, Any] | None = None, checksums: bool = True) -> dict[str, Any]:
    """Check that every file the marker names exists with its size (and sha256); return the marker."""
    marker = marker if marker is not None else read_marker(folder, stem)
    if marker is None:
        raise ShardVerificationError(f"{join(folder, stem)}: no marker {stem + MARKER_SUFFIX} (shard not committed)")
    for name, expect in marker.get("files", {}).items():
        verify_file(folder, name, expect, checksums)
    return marker


def folder_sizes(folder: str) -> dict[str, int]:
    """Every file directly in ``folder`` by name, with its size: one listing, no file opened."""
    fs, path = fsspec.core.url_to_fs(folder)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return {}
    out = {}
    for info in fs.ls(path, detail=True):
        if info.get("type", "file") == "file":
            out[str(info["name"]).rstrip("/").rsplit("/", 1)[-1]] = int(info.get("size") or 0)
    return out


def check_sizes(folder: str, stem: str, marker: Mapping[str, Any], sizes: Mapping[str, int]) -> None:
    """Check that every file the marker names is in the listing ``sizes`` (``folder_sizes``) with the size it
    records: what a restart checks (O(1) per shard, no file read). Raises ``ShardVerificationError``."""
    for name, expect in marker.get("files", {}).items():
        if name not in sizes:
            raise ShardVerificationError(f"{join(folder, name)}: missing, but its marker lists it" + _redo(name))
        if sizes[name] != expect["bytes"]:
            raise ShardVerificationError(f"{join(folder, name)}: size {sizes[name]} differs from its marker {expect['bytes']}")


def list_markers(folder: str) -> dict[str, dict[str, Any]]:
    """All valid markers in ``folder`` by stem (unreadable markers are left out). One listing; the markers
    are fetched together (concurrently on object stores)."""
    fs, path = fsspec.core.url_to_fs(folder)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return {}
    paths = {}
    for entry in sorted(fs.ls(path, detail=False)):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith("part-") and name.endswith(MARKER_SUFFIX):
            paths[entry] = name[: -len(MARKER_SUFFIX)]
    if not paths:
        return {}
    blobs = _fetch_all(fs, list(paths))
    out = {}
    for entry, stem in paths.items():
        blob = blobs.get(entry)
        if blob is None:
            continue
        try:
            marker = json.loads(blob.decode())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(marker, dict):
            out[stem] = marker
    return out


def _fetch_all(fs: fsspec.AbstractFileSystem, paths: list[str]) -> dict[str, bytes | None]:
    """The bytes of each of ``paths`` (None where it cannot be read): in turn locally, by a few threads on
    remote stores, where each read is a request."""
    def fetch(p: str) -> bytes | None:
        try:
            return bytes(fs.cat_file(p))
        except (FileNotFoundError, OSError):
            return None

    if isinstance(fs, LocalFileSystem) or len(paths) < 2:
        return {p: fetch(p) for p in paths}
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(MARKER_FETCH_THREADS, len(paths))) as pool:
        return dict(zip(paths, pool.map(fetch, paths)))


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


