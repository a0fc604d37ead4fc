"""Listing a source tree one folder at a time, so that every file is listed once by exactly one task.

``list_folder`` lists one folder (locally with ``os.scandir``, remotely with delimiter listings a
page at a time, a big flat folder split into key ranges by ``key_ranges``): its files with size and
mtime, its subfolders (``is_folder``), and one entry per thing that could not be listed (broken
links, symlink loops, unreadable folders), so nothing vanishes.
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
from imgfeat.metadata.manifest.key_ranges import Paging, info_mtime, list_range, page_lister


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
    after: str | None = None
    """With ``upto``, on a folder entry: only the keys of ``path`` in ``(after, upto]`` are meant (a key
    range still to list, ``key_ranges``); both None: the whole folder."""
    upto: str | None = None

    @property
    def is_range(self) -> bool:
        """A key range of a folder still to list (not a subfolder)."""
        return self.after is not None or self.upto is not None


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
        lister = page_lister(fs)
        # One LIST: s3fs's ``isdir`` lists the whole prefix (10,000 requests for 10M keys).
        ok = bool(lister(path.rstrip("/") + "/", None, None, 1).entries) if lister else fs.isdir(path)
    except Exception as exc:  # noqa: BLE001 - any backend error is reported with the SRC name
        raise ValueError(f"SRC {src!r}: cannot be listed: {exc}") from exc
    if not ok:
        raise ValueError(f"SRC {src!r}: no such folder or prefix")
    return uri


def check_out_outside_sources(out: str, roots: list[str]) -> None:
    """Fail, naming both, when the output folder ``out`` is one of the source folders ``roots`` (normalized
    URIs, as ``check_source`` returns them) or inside one: every later run would list the manifest's own
    files as inputs. Local paths are compared after resolving symlinks."""
    def real(uri: str) -> str:
        return "file://" + os.path.realpath(_local_path(uri)) if uri.startswith("file://") else uri.rstrip("/")

    target = real(normalize_uri(out))
    for root in roots:
        folder = real(root)
        if target == folder or target.startswith(folder.rstrip("/") + "/"):
            raise ValueError(f"--out {out!r} is inside SRC {root!r}: a later run would list the manifest's own files "
                             "as images; choose an output folder outside the sources")


def _is_loop(child: str, folder: str) -> bool:
    """True when the folder ``child`` resolves to ``folder`` itself or one of its ancestors."""
    real_child, real_folder = os.path.realpath(child), os.path.realpath(folder)
    return real_folder == real_child or real_folder.startswith(real_child.rstrip("/") + "/")


def list_folder(root: str, folder: str, after: str | None = None, upto: str | None = None,
                paging: Paging = Paging()) -> Iterator[Entry]:
    """The entries of one folder (not recursive): files, subfolders (``is_folder``) and what cannot be listed.

    On an object store with a page primitive (``key_ranges``), only the keys in ``(after, upto]`` are
    listed, and a long range ends with the rest of it as range entries (``Entry.is_range``) for other
    tasks. Streams: memory stays flat however many files the folder holds (a page at a time; stores
    without a page primitive are listed whole by fsspec)."""
    if folder.startswith("file://"):
        yield from _list_local_folder(root, folder)
    else:
        yield from _list_remote_folder(root, folder, after, upto, paging)


def list_unit(unit: Unit, paging: Paging = Paging()) -> Iterator[Entry]:
    """Every file of ``unit`` (its subtree when ``recursive``) listed in this process; folders are walked,
    not yielded, and what cannot be listed is an entry with ``error``."""
    stack: list[tuple[str, str | None, str | None]] = [(unit.folder, None, None)]
    while stack:
        for e in list_folder(unit.root, *stack.pop(), paging=paging):
            if e.is_range:
                stack.append((e.path, e.after, e.upto))
            elif e.is_folder:
                if unit.recursive:
                    stack.append((e.path, None, None))
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


def _list_remote_folder(root: str, folder_uri: str, after: str | None, upto: str | None,
                        paging: Paging) -> Iterator[Entry]:
    fs, path = fsspec.core.url_to_fs(folder_uri)
    scheme = folder_uri.split("://", 1)[0]
    lister = page_lister(fs)
    if lister is None:
        yield from _list_whole_remote_folder(root, folder_uri, fs, path)
        return
    try:
        for item in list_range(lister, path, after, upto, paging):
            if isinstance(item, tuple):
                yield Entry(root, folder_uri, None, None, is_folder=True, after=item[0], upto=item[1])
            else:
                yield Entry(root, f"{scheme}://{item.name}", item.size, item.mtime, is_folder=item.is_dir)
    except OSError as exc:
        yield Entry(root, folder_uri, None, None, f"prefix cannot be listed: {exc}")


def _list_whole_remote_folder(root: str, folder_uri: str, fs: fsspec.AbstractFileSystem, path: str) -> Iterator[Entry]:
    """A folder of a store without a page primitive: one ``fs.ls`` (fsspec holds its whole listing)."""
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
        yield Entry(root, uri, int(info.get("size") or 0), info_mtime(info))


def rel_path(root: str, path: str) -> str:
    """``path`` relative to its SRC ``root`` (both normalized URIs)."""
    prefix = root.rstrip("/") + "/"
    return path[len(prefix):] if path.startswith(prefix) else path
