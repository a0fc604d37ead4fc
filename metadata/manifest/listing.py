"""Listing a source tree one folder at a time, so that every file is listed once by exactly one task.

``list_folder`` lists one folder (locally with ``os.scandir``, remotely with one delimiter listing
through fsspec): its files with size and mtime, its subfolders (``is_folder``), and one entry per thing
that could not be listed (broken links, symlink loops, unreadable folders), so nothing vanishes.
``manifest.discover`` runs it breadth-first on Spark, a depth per job, each folder in one task: the
total listing work grows with files + folders, not with files x tasks. ``list_unit`` walks a tree
with the same function in one process (the driver's bounded listing digest, benchmarks, tests).
"""
from __future__ import annotations

import os
import stat as stat_mod
from collections.abc import Iterator
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
    """A listed file or folder. ``error`` is set when it could not be stat'ed (then size/mtime are None)."""

    root: str
    path: str
    size: int | None
    mtime: float | None
    error: str | None = None
    is_folder: bool = False


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


def list_folder(root: str, folder: str) -> Iterator[Entry]:
    """The entries of one folder (not recursive): files, subfolders (``is_folder``) and what cannot be listed.

    Streams: memory stays flat however many files the folder holds (remote listings are paged by the
    store; fsspec holds one folder's page list)."""
    if folder.startswith("file://"):
        yield from _list_local_folder(root, folder)
    else:
        yield from _list_remote_folder(root, folder)


def list_unit(unit: Unit) -> Iterator[Entry]:
    """Every file of ``unit`` (its subtree when ``recursive``) listed in this process; folders are walked,
    not yielded, and what cannot be listed is an entry with ``error``."""
    stack = [unit.folder]
    while stack:
        for e in list_folder(unit.root, stack.pop()):
            if e.is_folder:
                if unit.recursive:
                    stack.append(e.path)
            else:
                yield e


def _list_local_folder(root: str, folder_uri: str) -> Iterator[Entry]:
    folder = _local_path(folder_uri)
    try:
        it = os.scandir(folder)
    except OSError as exc:
        yield Entry(root, folder_uri, None, None, f"folder cannot be listed: {exc.strerror or exc}")
        return
    with it:
        for e in it:
            uri = "file://" + e.path
            try:
                # The directory entry's type needs no stat: a plain subfolder cannot link back up.
                if not e.is_symlink() and e.is_dir(follow_symlinks=False):
                    yield Entry(root, uri, None, None, is_folder=True)
                    continue
            except OSError:
                pass  # the stat below reports it
            try:
                st = os.stat(e.path)
            except OSError as exc:
                reason = "symlink loop" if exc.errno == 40 else ("broken symlink" if e.is_symlink() else (exc.strerror or str(exc)))
                yield Entry(root, uri, None, None, reason)
                continue
            if stat_mod.S_ISDIR(st.st_mode):
                # A link back to this folder or above would recurse forever: record it, don't follow.
                if _is_loop(e.path, folder):
                    yield Entry(root, uri, None, None, "symlink loop: links to a folder above it")
                else:
                    yield Entry(root, uri, None, None, is_folder=True)
            elif stat_mod.S_ISREG(st.st_mode):
                yield Entry(root, uri, st.st_size, st.st_mtime)
            else:
                yield Entry(root, uri, None, None, "not a regular file")


def _list_remote_folder(root: str, folder_uri: str) -> Iterator[Entry]:
    fs, path = fsspec.core.url_to_fs(folder_uri)
    scheme = folder_uri.split("://", 1)[0]
    try:
        infos = fs.ls(path, detail=True)
    except OSError as exc:
        yield Entry(root, folder_uri, None, None, f"prefix cannot be listed: {exc}")
        return
    own = path.rstrip("/")
    for info in sorted(infos, key=lambda i: i["name"]):
        name = info["name"].rstrip("/")
        if name == own:  # some stores list a prefix's own placeholder object
            continue
        uri = f"{scheme}://{name}"
        if info.get("type") == "directory":
            yield Entry(root, uri, None, None, is_folder=True)
            continue
        mtime = info.get("LastModified") or info.get("mtime") or info.get("created")
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        yield Entry(root, uri, int(info.get("size") or 0), float(mtime) if mtime is not None else None)


def rel_path(root: str, path: str) -> str:
    """``path`` relative to its SRC ``root`` (both normalized URIs)."""
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path
