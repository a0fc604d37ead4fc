"""Listing a source tree inside executor tasks (the driver's memory stays flat in files).

The one exception is bounded: an incremental rerun streams a listing of at most
``store.DRIVER_LISTING_MAX`` local files on the driver to tell that nothing changed without Spark.

Each task walks the tree (locally with ``os.scandir``, remotely through fsspec) and keeps the files of
its own slice (``slice_of``: a stable hash of the URI), so the files are split evenly over tasks with no
shuffle; only the kept files are stat'ed. It yields one ``Entry`` per file, or per thing that could not
be listed (broken links, symlink loops, unreadable folders), so nothing vanishes.
"""
from __future__ import annotations

import os
import stat as stat_mod
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import fsspec

from imgfeat.metadata.contracts.schema import normalize_uri


@dataclass(frozen=True)
class Unit:
    """A folder to list: only its own files (``recursive=False``) or its whole subtree."""

    root: str
    """The SRC this folder belongs to (a normalized URI), for relative paths and labels."""
    folder: str
    recursive: bool


@dataclass(frozen=True)
class Entry:
    """A listed file. ``error`` is set when it could not be stat'ed (then size/mtime are None)."""

    root: str
    path: str
    size: int | None
    mtime: float | None
    error: str | None = None


def _local_path(uri: str) -> str:
    return uri[len("file://"):] if uri.startswith("file://") else uri


def check_source(src: str) -> str:
    """Normalize SRC and fail fast, naming it, when it does not exist or is not a folder."""
    uri = normalize_uri(src)
    if uri.startswith("file://"):
        path = _local_path(uri)
        if not os.path.isdir(path):
            raise ValueError(f"SRC {src!r}: no such folder" if not os.path.exists(path) else f"SRC {src!r}: not a folder")
        return uri
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        ok = fs.isdir(path)
    except Exception as exc:  # noqa: BLE001 - any backend error is reported with the SRC name
        raise ValueError(f"SRC {src!r}: cannot be listed: {exc}") from exc
    if not ok:
        raise ValueError(f"SRC {src!r}: no such folder or prefix")
    return uri


def _is_loop(child: str, folder: str) -> bool:
    """True when the folder ``child`` resolves to ``folder`` itself or one of its ancestors."""
    real_child, real_folder = os.path.realpath(child), os.path.realpath(folder)
    return real_folder == real_child or real_folder.startswith(real_child.rstrip("/") + "/")


def slice_of(uri: str, slices: int) -> int:
    """The slice (0 .. ``slices`` - 1) a file belongs to: a stable hash of its URI, the same in every process."""
    return zlib.crc32(uri.encode("utf-8", "surrogateescape")) % slices


def list_unit(unit: Unit, keep: Callable[[str], bool] | None = None) -> Iterator[Entry]:
    """Every file in a unit, with size and mtime; unlistable things become entries with ``error``.

    ``keep(uri)``, when given, selects the entries to yield; the others are never stat'ed (the walk
    itself reads directories only), so tasks that each keep one slice share the cost of the stats.
    """
    if unit.folder.startswith("file://"):
        yield from _list_local(unit, keep)
    else:
        yield from (e for e in _list_remote(unit) if keep is None or keep(e.path))


def _list_local(unit: Unit, keep: Callable[[str], bool] | None = None) -> Iterator[Entry]:
    stack = [_local_path(unit.folder)]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                # Inode order (free from the directory entry) roughly follows the disk layout: cold reads go faster.
                entries = sorted(it, key=lambda e: e.inode())
        except OSError as exc:
            uri = "file://" + folder
            if keep is None or keep(uri):
                yield Entry(unit.root, uri, None, None, f"folder cannot be listed: {exc.strerror or exc}")
            continue
        for e in entries:
            uri = "file://" + e.path
            mine = keep is None or keep(uri)
            try:
                # The directory entry's type needs no stat: plain folders are walked by every task (a plain
                # subfolder cannot link back up), plain files are stat'ed only by the task that keeps them.
                if not e.is_symlink():
                    if e.is_dir(follow_symlinks=False):
                        if unit.recursive:
                            stack.append(e.path)
                        continue
                    if not mine:
                        continue
            except OSError:
                pass  # the stat below reports it
            try:
                st = os.stat(e.path)
            except OSError as exc:
                if mine:
                    reason = "symlink loop" if exc.errno == 40 else ("broken symlink" if e.is_symlink() else (exc.strerror or str(exc)))
                    yield Entry(unit.root, uri, None, None, reason)
                continue
            if stat_mod.S_ISDIR(st.st_mode):
                # A link back to this folder or above would recurse forever: record it, don't follow.
                if _is_loop(e.path, folder):
                    if mine:
                        yield Entry(unit.root, uri, None, None, "symlink loop: links to a folder above it")
                elif unit.recursive:
                    stack.append(e.path)
            elif not mine:
                continue
            elif stat_mod.S_ISREG(st.st_mode):
                yield Entry(unit.root, uri, st.st_size, st.st_mtime)
            else:
                yield Entry(unit.root, uri, None, None, "not a regular file")


def _list_remote(unit: Unit) -> Iterator[Entry]:
    fs, path = fsspec.core.url_to_fs(unit.folder)
    scheme = unit.folder.split("://", 1)[0]
    try:
        if unit.recursive:
            found = fs.find(path, detail=True, withdirs=False)
        else:
            found = {e["name"]: e for e in fs.ls(path, detail=True) if e.get("type") != "directory"}
    except OSError as exc:
        yield Entry(unit.root, unit.folder, None, None, f"prefix cannot be listed: {exc}")
        return
    for name in sorted(found):
        info = found[name]
        mtime = info.get("LastModified") or info.get("mtime") or info.get("created")
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        uri = f"{scheme}://{name}"
        yield Entry(unit.root, uri, int(info.get("size") or 0), float(mtime) if mtime is not None else None)


def rel_path(root: str, path: str) -> str:
    """``path`` relative to its SRC ``root`` (both normalized URIs)."""
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path
