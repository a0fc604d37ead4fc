"""The per-file check that runs on executors: read the bytes once, hash, sniff, optionally decode.

Returns a plain dict (one manifest row without label, split, duplicate and shard columns). Never
raises for a bad file: every problem becomes a status code with a human-readable detail. With
``signals`` the decode is the reduced grey one of ``image_signals.reduced_gray_flag`` and the row gets
the perceptual hash and the quality signals from it (no second read or decode). What that costs per file
(CPU, one thread, warm cache; bench/RESULTS-quality-cost.md, 2026-12-03): 0.30 ms for a 100x100 JPEG
against 0.11 ms for ``full`` validation alone (a full-size grey decode, where validation decodes at 1/8,
and 0.15 ms of signals), 0.90 against 0.37 ms at 500x375 (a 1/2 decode against 1/8, and 0.3 ms of
signals), 1.86 against 1.53 ms at 1360x1020 (the same 1/8 decode: only the signals are extra).
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import fsspec
import numpy as np

from imgfeat.metadata.config import TilesConfig
from imgfeat.metadata.contracts.cv2_env import cv2_error_verdict, decoder_cv2, decoder_damage, quiet_decoder
from imgfeat.metadata.contracts.schema import SIGNAL_COLUMNS, image_id_for
from imgfeat.metadata.contracts.sniff import DEFAULT_MAX_JPEG_SCANS, parse_header
from imgfeat.metadata.manifest.image_signals import gray_of, image_signals, reduced_gray_flag
from imgfeat.metadata.manifest.listing import Entry, rel_path
from imgfeat.metadata.manifest.tile_checks import check_large_file, check_tiled_bytes, is_tiled


def read_bytes(uri: str, max_bytes: int | None = None, size: int | None = None) -> bytes:
    """All bytes of ``uri`` (local fast path, fsspec otherwise). Raises OSError on failure.

    ``size``: the size the listing found, if known (saves a stat; a file that grew is still read whole)."""
    if uri.startswith("file://"):
        return _read_local(uri[len("file://"):], max_bytes, size)
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.cat_file(path)


def _read_local(path: str, max_bytes: int | None, size: int | None = None) -> bytes:
    # Sized by the listing's size (or fstat): read(max_bytes + 1) would allocate the whole cap (64 MB) for
    # every small file. At most max_bytes + 1 bytes are returned, so callers still see a file over the cap.
    limit = None if max_bytes is None else max_bytes + 1
    fd = os.open(path, os.O_RDONLY)
    try:
        want = (os.fstat(fd).st_size if size is None else size) + 1
        parts: list[bytes] = []
        total = 0
        while limit is None or total < limit:
            ask = want if limit is None else min(want, limit - total)
            chunk = os.read(fd, ask)
            if chunk:
                parts.append(chunk)
                total += len(chunk)
            if len(chunk) < ask:
                break  # a short read of a regular file is its end: no second read to see 0 bytes
            want = 1 << 20
        return parts[0] if len(parts) == 1 else b"".join(parts)
    finally:
        os.close(fd)


def content_hash(data: bytes) -> str:
    """32 hex chars of sha256 over the bytes."""
    return hashlib.sha256(data).hexdigest()[:32]


def needs_bytes(entry: Entry, max_bytes: int) -> bool:
    """Whether checking ``entry`` reads the file (not for listing errors, empty or over-cap files)."""
    return entry.error is None and entry.size != 0 and not (entry.size is not None and entry.size > max_bytes)


def read_or_error(entry: Entry, max_bytes: int) -> bytes | Exception | None:
    """The file's bytes, the read error, or None when the check does not read it (for prefetching)."""
    if not needs_bytes(entry, max_bytes):
        return None
    try:
        return read_bytes(entry.path, max_bytes, entry.size)
    except (OSError, ValueError) as exc:
        return exc


def advise_read(path: str) -> None:
    """Ask the kernel to start reading a local file into the page cache; returns without waiting."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # the read itself reports the error
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


def prefetched(entries: Iterable[Entry], max_bytes: int, threads: int = 4, window: int = 32,
               local_window: int = 1024, local_bytes: int = 64 << 20) -> Iterator[tuple[Entry, bytes | Exception | None]]:
    """Yield (entry, bytes or error) in order, with the reads of the entries ahead already started.

    Reads wait on storage: a local file not in the page cache cost ~120 us here, an object-store GET
    tens of milliseconds. Entries are taken in chunks of ``local_window``: the local files of a chunk
    (up to ``local_bytes``) are announced at once with ``posix_fadvise(WILLNEED)``, so the kernel queues
    all those reads together, then read in order from the page cache (59k cold files: 1.0-1.7 s against
    4.5-6.7 s with 8 reading threads). Listing, announcing and reading in separate phases per chunk
    matters: announcing one file ahead per file read, interleaved with the listing's stats and the
    checks, cost half as much again (two processes, 59k cold files: 2.3-2.5 s against 1.3-1.7 s).
    Other files are read on ``threads`` threads, at most ``window`` ahead, which bounds their memory.
    """
    from concurrent.futures import ThreadPoolExecutor
    from itertools import islice

    advise = hasattr(os, "posix_fadvise")

    def is_local(e: Entry) -> bool:
        return advise and e.path.startswith("file://")

    it = iter(entries)
    with ThreadPoolExecutor(threads) as pool:
        while chunk := list(islice(it, local_window)):
            start = 0
            while start < len(chunk):
                end = announced = 0
                for end in range(start, len(chunk)):
                    if announced >= local_bytes:
                        break
                    e = chunk[end]
                    if is_local(e) and needs_bytes(e, max_bytes):
                        advise_read(e.path[len("file://"):])
                        announced += e.size or 0
                else:
                    end = len(chunk)
                yield from _read_in_order(chunk[start:end], pool, window, max_bytes, is_local)
                start = end


def _read_in_order(entries: list[Entry], pool: Any, window: int, max_bytes: int,
                   is_local: Callable[[Entry], bool]) -> Iterator[tuple[Entry, Any]]:
    """(entry, bytes or error) in order: local files read here, others on ``pool`` at most ``window`` ahead."""
    from collections import deque

    pending: deque = deque()
    in_flight = 0
    for e in entries:
        remote = not is_local(e) and needs_bytes(e, max_bytes)
        pending.append((e, pool.submit(read_or_error, e, max_bytes) if remote else None))
        in_flight += remote
        while in_flight >= window:
            first, fut = pending.popleft()
            in_flight -= fut is not None
            yield first, (read_or_error(first, max_bytes) if fut is None else fut.result())
    while pending:
        first, fut = pending.popleft()
        yield first, (read_or_error(first, max_bytes) if fut is None else fut.result())


def check_entry(entry: Entry, validation: str, max_bytes: int, max_pixels: int, formats: tuple[str, ...],
                data: bytes | Exception | None = None, max_scans: int = DEFAULT_MAX_JPEG_SCANS,
                signals: bool = False, tiling: TilesConfig | None = None) -> dict[str, Any]:
    """Check one listed file and return its row (``data``: its bytes or read error, if already read;
    ``max_scans``: JPEGs with more scans are ``too_large``, 0 = no limit; ``signals``: decode every
    image whose header is fine, also with ``header`` validation, and fill the ``SIGNAL_COLUMNS``;
    ``tiling``: the ``[tiles]`` section, whose large images are checked by ``tile_checks`` instead)."""
    row: dict[str, Any] = {
        "image_id": image_id_for(entry.path),
        "path": entry.path,
        "rel_path": rel_path(entry.root, entry.path),
        "size_bytes": entry.size,
        "mtime": entry.mtime,
        "format": None,
        "width": None,
        "height": None,
        "channels": None,
        "content_hash": None,
        "tiles": None,
        **dict.fromkeys(SIGNAL_COLUMNS),
        "status": "ok",
        "status_detail": "",
    }
    if entry.error is not None:
        return dict(row, status="unreadable", status_detail=entry.error)
    if entry.size == 0:
        return dict(row, status="zero_bytes", status_detail="file is empty")
    if entry.size is not None and entry.size > max_bytes:
        if tiling is not None and tiling.enabled:
            return check_large_file(row, entry.path, entry.size, tiling)
        return dict(row, status="too_large", status_detail=f"{entry.size} bytes is over the byte cap {max_bytes}")
    if data is None:
        data = read_or_error(entry, max_bytes)
    if data is None:  # not reached: read_or_error reads every file the checks above let through
        return dict(row, status="internal_error", status_detail="the file was not read")
    if isinstance(data, Exception):
        exc = data
        return dict(row, status="unreadable", status_detail=f"read failed: {getattr(exc, 'strerror', None) or exc}")
    if len(data) > max_bytes:
        return dict(row, size_bytes=len(data), status="too_large", status_detail=f"grew past the byte cap {max_bytes} while reading")
    row["size_bytes"] = len(data)
    if not data:
        return dict(row, status="zero_bytes", status_detail="file is empty")
    row["content_hash"] = content_hash(data)
    info = parse_header(data, formats, max_scans)
    row.update(format=info.format, width=info.width, height=info.height, channels=info.channels)
    if info.status != "ok":
        return dict(row, status=info.status, status_detail=info.detail)
    if tiling is not None and is_tiled(info.width, info.height, tiling):
        return check_tiled_bytes(row, data, tiling)
    if info.pixels > max_pixels:
        return dict(row, status="too_large", status_detail=f"{info.width}x{info.height} is over the pixel cap {max_pixels}")
    if signals:
        status, detail, img = _decode(data, max_pixels, reduced_gray_flag(info.width, info.height, info.format))
        if status != "ok":
            return dict(row, status=status, status_detail=detail)
        if info.format != "jpeg":
            row["channels"] = 1 if img.ndim == 2 else int(img.shape[2])
        try:
            row.update(image_signals(gray_of(img)).as_row())
        except ValueError:  # a decodable image without a grey form (unusual channel layouts) keeps no signals
            pass
    elif validation == "full":
        status, detail, channels = decode_check(data, max_pixels, info.format == "jpeg")
        if channels is not None:
            row["channels"] = channels
        if status != "ok":
            return dict(row, status=status, status_detail=detail)
    return row


def _decode(data: bytes, max_pixels: int, flag: int) -> tuple[str, str, Any]:
    """Decode with OpenCV under ``flag``: (status, detail, the image or None)."""
    cv2 = decoder_cv2(max_pixels)
    try:
        with quiet_decoder() as said:
            img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    except cv2.error as exc:
        return (*cv2_error_verdict(exc), None)
    if img is None or img.size == 0:
        return "undecodable", "OpenCV could not decode the data", None
    damage = decoder_damage(said.text)
    if damage is not None:
        return (*damage, None)
    return "ok", "", img


def decode_check(data: bytes, max_pixels: int, is_jpeg: bool = False) -> tuple[str, str, int | None]:
    """Decode with OpenCV: (status, detail, channels; None when the decode does not tell)."""
    cv2 = decoder_cv2(max_pixels)
    # A JPEG decoded at 1/8 scale still entropy-decodes every scan (what finds corruption) at ~2x speed.
    status, detail, img = _decode(data, max_pixels, cv2.IMREAD_REDUCED_GRAYSCALE_8 if is_jpeg else cv2.IMREAD_UNCHANGED)
    if status != "ok" or is_jpeg:
        return status, detail, None
    return "ok", "", 1 if img.ndim == 2 else int(img.shape[2])

