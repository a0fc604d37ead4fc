"""Listing one object-store folder page by page, and splitting a big flat folder into key ranges.

Object stores list in key order, a page (at most 1,000 entries on S3) per request, and can start
after any key (S3's ``StartAfter``). So a folder is split into key ranges ``(after, upto]``, each
listed by one task: a task lists up to ``Paging.split_pages`` pages of its range and, when the range goes on,
hands the rest back as smaller ranges (``split_points``) that the next round of tasks lists. The ranges
partition the key space by construction, so every key is listed by exactly one task whatever the split
points are; the points only decide the balance. They are cut at the character positions where the keys
already listed vary, with the characters seen there (digits for numbered names, hex digits for hashes),
so a folder of 10M numbered keys becomes about a hundred ranges of about 100,000 keys after three
rounds, at a cost of a few empty LISTs per split.

Cost: LIST requests = keys / page + ranges (each range's last, partial page) + empty ranges; memory: one
page. Stores with a page primitive: S3 (s3fs's ``list_objects_v2``) and the benchmark's synthetic store
(``ls_range``); others are listed whole with ``fs.ls`` by one task.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

MAX_PARTS = 64
"""Most ranges one split makes."""


@dataclass(frozen=True)
class Paging:
    """How a folder is listed: entries per LIST request, and pages a task lists from its key range
    before it hands the rest back as smaller ranges."""

    page_keys: int = 1000
    """S3's MaxKeys ceiling."""
    split_pages: int = 100
    """100,000 keys: a few seconds of LISTs per task, and one extra LIST per 100 at most."""


@dataclass(frozen=True)
class Listed:
    """One listing entry: ``name`` as the store names it (``bucket/key``, no scheme; a folder has no
    trailing slash), size and mtime for a file."""

    name: str
    is_dir: bool
    size: int | None = None
    mtime: float | None = None

    @property
    def order_key(self) -> str:
        """Where the store sorts it: a folder (common prefix) sorts as its name with the delimiter."""
        return self.name + "/" if self.is_dir else self.name


@dataclass(frozen=True)
class Page:
    """One LIST response."""

    entries: list[Listed]
    truncated: bool
    token: str | None


PageLister = Callable[[str, "str | None", "str | None", int], Page]
"""``(prefix, start_after, token, max_keys) -> Page``: one delimiter LIST of ``prefix`` (``bucket/key-prefix/``)."""


def info_mtime(info: dict[str, Any]) -> float | None:
    """The modification time of an fsspec/boto listing entry, in seconds (None when it has none)."""
    value: Any = info.get("LastModified") or info.get("mtime") or info.get("created")
    if value is None:
        return None
    return float(value.timestamp() if hasattr(value, "timestamp") else value)


def _s3_lister(fs: Any) -> PageLister:
    def page(prefix: str, start_after: str | None, token: str | None, max_keys: int) -> Page:
        bucket, _, key_prefix = prefix.partition("/")
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": key_prefix, "Delimiter": "/", "MaxKeys": max_keys}
        if token is not None:
            kwargs["ContinuationToken"] = token
        elif start_after:
            kwargs["StartAfter"] = start_after.partition("/")[2]
        out = fs.call_s3("list_objects_v2", **kwargs)
        entries = [Listed(f"{bucket}/{c['Prefix'].rstrip('/')}", True) for c in out.get("CommonPrefixes", [])]
        entries += [Listed(f"{bucket}/{o['Key']}", False, int(o.get("Size") or 0), info_mtime(o))
                    for o in out.get("Contents", []) if o["Key"] != key_prefix]  # a folder's placeholder object
        entries.sort(key=lambda e: e.order_key)
        return Page(entries, bool(out.get("IsTruncated")), out.get("NextContinuationToken"))
    return page


def _synth_lister(fs: Any) -> PageLister:
    def page(prefix: str, start_after: str | None, token: str | None, max_keys: int) -> Page:
        got = fs.ls_range(prefix, start_after=start_after, max_keys=max_keys, delimiter="/", token=token)
        entries = [Listed(e["name"].rstrip("/"), e["type"] == "directory", e.get("size"), info_mtime(e))
                   for e in got.entries]
        return Page(entries, got.truncated, got.token)
    return page


def page_lister(fs: Any) -> PageLister | None:
    """The one-page LIST of ``fs``, or None when the store has none (then a folder is listed whole)."""
    if callable(getattr(fs, "ls_range", None)):
        return _synth_lister(fs)
    if "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)) and hasattr(fs, "call_s3"):
        return _s3_lister(fs)
    return None


def list_range(lister: PageLister, folder: str, after: str | None, upto: str | None,
               paging: Paging = Paging()) -> Iterator[Listed | tuple[str | None, str | None]]:
    """The entries of ``folder`` (``bucket/key``, no scheme) whose order key is in ``(after, upto]``
    (None: open), a page at a time. After ``paging.split_pages`` pages with more to come, it stops and
    yields the rest of the range as ``(after, upto)`` tuples instead (``split_points``)."""
    prefix = folder.rstrip("/") + "/"
    token: str | None = None
    seen: list[str] = []  # the first and last order keys of this task's pages: where the keys vary
    last = after
    pages = 0
    while True:
        page = lister(prefix, after, token, paging.page_keys)
        pages += 1
        for e in page.entries:
            key = e.order_key
            if after is not None and key <= after:
                continue  # a folder whose keys straddle ``after`` is listed by the range before
            if upto is not None and key > upto:
                return
            yield e
            last = key
            if len(seen) < 2:
                seen.append(key)
            else:
                seen[1] = key
        if not page.truncated:
            return
        token = page.token
        if pages >= paging.split_pages and last is not None and last != after:  # hand back only after progress
            cuts = [p for p in split_points(seen, last, upto, len(prefix)) if p > last]
            bounds = [last, *cuts, upto]
            for lo, hi in zip(bounds, bounds[1:]):
                yield (lo, hi)
            return


def _common_len(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def split_points(seen: list[str], last: str, upto: str | None, start: int) -> list[str]:
    """Sorted cut points for the keys after ``last`` up to ``upto``.

    ``seen``: the first and last keys a task listed; ``start``: where the keys' names begin (the folder
    prefix's length). The keys vary at position ``d``, where ``seen``'s keys first differ; the cuts are
    ``last[:j] + c`` for each position ``j`` from ``start`` to ``d`` and each character ``c`` above
    ``last[j]`` among those the listed keys have at ``d``. Any points give a correct partition."""
    first = seen[0] if seen else last
    d = min(_common_len(first, last), len(last) - 1)
    if d < start:
        return []
    alphabet = sorted({k[d] for k in (first, last) if len(k) > d} | set(_class_of(last[d])))
    points: list[str] = []
    for j in range(start, d + 1):
        for c in alphabet:
            if c > last[j]:
                p = last[:j] + c
                if upto is None or p < upto:
                    points.append(p)
    if len(points) > MAX_PARTS - 1:  # keep the coarse cuts: they split the most keys
        points.sort(key=len)
        points = points[: MAX_PARTS - 1]
    return sorted(set(points))


_CLASSES = ("0123456789", "0123456789abcdef", "0123456789ABCDEF", "abcdefghijklmnopqrstuvwxyz",
            "ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _class_of(c: str) -> str:
    """The characters a key position holding ``c`` likely takes: its digit or letter class."""
    for cls in _CLASSES:
        if c in cls:
            return cls
    return c
