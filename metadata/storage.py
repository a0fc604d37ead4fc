"""Storage: the one place for URL joins, atomic writes, JSON files, canonical digests and folder publishing.

Every path may be local or any fsspec URL (``s3://``...). Writes are atomic: readers see the old content
or all of the new (a temporary renamed in the same folder locally; one PUT on object stores, which never
expose a partial object). A folder is published whole: the complete new folder replaces the old one,
so a failed run leaves the previous output readable. Pure Python with fsspec; no Spark, no torch.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from imgfeat.metadata.contracts.hooks import fault_point

TMP_TAG = ".tmp-"
"""Marks a temporary written next to its final name (``.NAME.tmp-PID-ID``); stale ones are swept."""
SUCCESS_FILE = "_SUCCESS"
"""The commit marker of a Parquet dataset folder, written by its last task."""


def join(base: str, name: str) -> str:
    """``base/name`` for a local path or URL (one slash, whatever ``base`` ends with)."""
    return base.rstrip("/") + "/" + name


def is_local(url: str) -> bool:
    """Whether ``url`` is a local path (plain or ``file://``)."""
    return "://" not in url or url.startswith("file://")


def check_folder(url: str, option: str, hint: str = "") -> None:
    """Raise ``ValueError`` naming ``option`` unless ``url`` is an existing folder (``hint``: what belongs
    there, e.g. ``"the output of imgfeat featurize"``). Meant for a command's input before heavy work starts."""
    fs, root = fsspec.core.url_to_fs(url)
    if not fs.isdir(root):
        raise ValueError(f"{option} {url}: no such folder" + (f" ({hint})" if hint else ""))


def check_writable(url: str, option: str) -> None:
    """Create ``url`` as a folder if needed and prove it takes a file (written and removed again); else raise
    ``ValueError`` naming ``option`` (an existing file there, a file on the way, no permission, ...). Meant
    for a command's output folder before any Spark or torch work starts."""
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:  # an unknown protocol, or its package missing
        raise ValueError(f"{option} {url}: {exc}") from None
    try:
        if fs.isfile(root):
            raise ValueError(f"{option} {url}: is a file, not a folder")
        fs.makedirs(root, exist_ok=True)
        probe = join(root, f".imgfeat-write-probe-{uuid.uuid4().hex[:8]}")
        with fs.open(probe, "wb") as fh:
            fh.write(b"ok")
        fs.rm(probe)
    except OSError as exc:
        raise ValueError(f"{option} {url}: cannot write there ({type(exc).__name__}: {exc})") from None


def canonical_digest(obj: Any, length: int = 16) -> str:
    """The first ``length`` hex chars of sha256 over ``obj`` as canonical JSON (sorted keys, no spaces).

    Values JSON cannot write are written with ``str``: the digest of configs, fingerprints and stage inputs."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_sha256(url: str) -> str:
    """sha256 hex digest of the file at ``url`` (local or any fsspec URL), read in 1 MiB chunks."""
    h = hashlib.sha256()
    with fsspec.open(url, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def staged_file(url: str) -> Iterator[str]:
    """Yield a local path to write ``url``'s content into; commit it under ``url`` on success.

    Local: a hidden temporary in the same folder, fsynced and renamed (atomic on POSIX).
    Remote: a local temporary uploaded to the final key (a PUT is all-or-nothing).
    On error nothing is committed and the temporary is removed.
    """
    fs, path = fsspec.core.url_to_fs(url)
    if is_local(url):
        folder, name = os.path.split(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    else:
        fd, tmp = tempfile.mkstemp(prefix="imgfeat-", suffix=os.path.splitext(path)[1])
        os.close(fd)
    try:
        yield tmp
        if is_local(url):
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            fault_point("staged", tmp)
            os.replace(tmp, path)
        else:
            fault_point("staged", tmp)
            fs.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` to ``url`` so readers see the old content or all of the new."""
    with staged_file(url) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def write_json_atomic(url: str, payload: dict[str, Any]) -> None:
    """``payload`` as indented JSON with sorted keys, written atomically (values JSON cannot write: ``str``)."""
    write_bytes_atomic(url, (json.dumps(payload, indent=1, sort_keys=True, default=_jsonable) + "\n").encode())


def _jsonable(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def read_json(url: str) -> dict[str, Any] | None:
    """The JSON at ``url``, or None when it does not exist or is not valid JSON."""
    fs, path = fsspec.core.url_to_fs(url)
    try:
        with fs.open(path, "rb") as fh:
            return json.loads(fh.read().decode())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def read_json_required(url: str) -> dict[str, Any]:
    """The JSON object at ``url``; ``FileNotFoundError`` naming it when it is missing or not valid JSON."""
    data = read_json(url)
    if not isinstance(data, dict):
        raise FileNotFoundError(f"{url}: missing or not a JSON object")
    return data


def move_folder(fs: fsspec.AbstractFileSystem, src: str, dst: str) -> None:
    """Move folder ``src`` to ``dst`` on ``fs``: a rename locally, copy-then-delete per file on object stores.

    On object stores files named ``_*`` (commit markers such as ``_SUCCESS``) are copied last, so a
    reader that trusts them never sees a partly copied folder.
    """
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(dst.rstrip("/")), exist_ok=True)
        os.replace(src, dst)
        return
    files = sorted(fs.find(src), key=lambda p: p.rsplit("/", 1)[-1].startswith("_"))
    for path in files:
        fs.copy(path, join(dst, path[len(src.rstrip("/")) + 1:]))
    fs.rm(files)
    fs.invalidate_cache()


def move_file(src: str, dst: str) -> None:
    """Move one file (locally a rename, on object stores a copy then a delete), creating ``dst``'s folder."""
    fs, src_path = fsspec.core.url_to_fs(src)
    dst_path = fsspec.core.url_to_fs(dst)[1]
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(dst_path), exist_ok=True)
        os.replace(src_path, dst_path)
        return
    fs.copy(src_path, dst_path)
    fs.rm(src_path)


def remove_folder(url: str, attempts: int = 5) -> None:
    """Remove the folder at ``url`` and everything in it, if it exists.

    Retried a few times: a task of a failed Spark job that is still being stopped may add a file
    while the folder is removed (``Directory not empty``).
    """
    fs, path = fsspec.core.url_to_fs(url)
    for attempt in range(attempts):
        fs.invalidate_cache()
        if not fs.exists(path):
            return
        try:
            fs.rm(path, recursive=True)
            return
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2 ** attempt)


def publish_folder(staging: str, url: str, keep_previous_at: str | None = None) -> None:
    """Make the complete folder at ``staging`` the folder at ``url``; the previous one moves to
    ``keep_previous_at`` (a URL on the same storage) or is removed.

    Locally two renames, the old copy removed only after the new one is in place. On object stores
    the old folder's ``_SUCCESS`` goes first and the new one's ``_*`` files are copied last, so readers
    that trust the commit marker never see a mix of two versions.
    """
    fs, src = fsspec.core.url_to_fs(staging)
    fs.invalidate_cache()  # tasks wrote the files; this process's listing cache has not seen them
    dst = fsspec.core.url_to_fs(url)[1]
    keep = fsspec.core.url_to_fs(keep_previous_at)[1] if keep_previous_at else None
    if isinstance(fs, LocalFileSystem):
        old = None
        if os.path.exists(dst):
            old = keep or os.path.join(os.path.dirname(dst.rstrip("/")), f".old-{uuid.uuid4().hex[:12]}")
            os.makedirs(os.path.dirname(old.rstrip("/")), exist_ok=True)
            os.replace(dst, old)
        os.makedirs(os.path.dirname(dst.rstrip("/")), exist_ok=True)
        os.replace(src, dst)
        if old and not keep:
            shutil.rmtree(old, ignore_errors=True)
        return
    if fs.exists(dst):
        if keep:  # copied whole (its _SUCCESS last), then every old file goes in one delete
            move_folder(fs, dst, keep)
        else:
            success = join(dst, SUCCESS_FILE)
            if fs.exists(success):
                fs.rm(success)
            fs.rm(dst, recursive=True)
    move_folder(fs, src, dst)
