"""Import OpenCV with its decoder limits set first, and keep the decoders' own chatter off the terminal.

OpenCV reads ``OPENCV_IO_MAX_IMAGE_PIXELS`` once, at import; set later it is ignored. Every process
that decodes (Spark Python workers, DataLoader workers) imports cv2 through here.

Decoders talk: OpenCV logs through its own logger, and libpng (and others) write warnings straight to
file descriptor 2. A manifest run over a decoder test suite printed about 1,100 such lines, while the
verdict for each file is already in its row. So by default OpenCV's logger is silent and every decode
runs inside ``quiet_decoder()``; ``IMGFEAT_DECODER_LOGS=1`` (set in the environment of the workers; the
manifest job passes it on to Spark executors) shows all of it again for debugging.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from types import ModuleType

DECODER_LOGS_ENV = "IMGFEAT_DECODER_LOGS"
"""Set to 1 to see what OpenCV and the C decoders print (silenced by default)."""

DEFAULT_MAX_PIXELS = 100_000_000


def import_cv2(max_pixels: int = DEFAULT_MAX_PIXELS, threads: int | None = 1) -> ModuleType:
    """Return cv2, setting its pixel limit first when this process has not imported it yet.

    ``threads`` sets ``cv2.setNumThreads`` (1 by default: callers parallelize across processes).
    """
    if "cv2" not in sys.modules:
        os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(int(max_pixels)))
        os.environ.setdefault("OPENCV_LOG_LEVEL", "INFO" if decoder_logs() else "SILENT")
    import cv2

    if threads is not None:
        cv2.setNumThreads(threads)
    return cv2


def quiesce_before_fork() -> None:
    """Stop OpenCV's pool threads in this process (``setNumThreads(1)``) if it has imported cv2, before it
    forks decode workers. A fork copies the pool's state but not its threads or the locks they hold; a
    child that then reconfigures the pool (``worker_init`` sets one thread) can wait forever. Seen once:
    a DataLoader worker hung in ``cv2.setNumThreads`` after the test process had used cv2 with its
    default threads. Processes that fork workers do not decode themselves, so one thread costs nothing."""
    cv2 = sys.modules.get("cv2")
    if cv2 is not None and cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)


_decoder_cv2: ModuleType | None = None


def decoder_cv2(max_pixels: int = DEFAULT_MAX_PIXELS) -> ModuleType:
    """cv2 for a decode loop: imported once per process through ``import_cv2`` (one thread), then cached."""
    global _decoder_cv2
    if _decoder_cv2 is None:
        _decoder_cv2 = import_cv2(max_pixels)
    return _decoder_cv2


def cv2_error_verdict(exc: BaseException) -> tuple[str, str]:
    """A ``cv2.error`` from a decode as a manifest (status, detail): ``too_large`` when OpenCV refused the
    size, else ``undecodable``; the detail is OpenCV's last message line."""
    text = str(exc).strip()
    msg = text.splitlines()[-1] if text else "cv2.error"
    if "limit" in msg.lower() or "pixels" in msg.lower():
        return "too_large", f"OpenCV refused the size: {msg}"
    return "undecodable", f"OpenCV error: {msg}"


def decoder_logs() -> bool:
    """Whether the decoders' own output is wanted (``IMGFEAT_DECODER_LOGS=1``)."""
    return os.environ.get(DECODER_LOGS_ENV, "") not in ("", "0")


_lock = threading.Lock()
_depth = 0
_saved_fd: int | None = None
_null_fd: int | None = None


@contextlib.contextmanager
def quiet_decoder() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null while a decoder runs (C libraries write there directly).

    Costs a few system calls per decode. Nested and concurrent uses share one redirection, restored when
    the last one leaves. A no-op with ``IMGFEAT_DECODER_LOGS=1``."""
    global _depth, _saved_fd, _null_fd
    if decoder_logs():
        yield
        return
    with _lock:
        if _depth == 0:
            sys.stderr.flush()
            if _null_fd is None:
                _null_fd = os.open(os.devnull, os.O_WRONLY)
            _saved_fd = os.dup(2)
            os.dup2(_null_fd, 2)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved_fd is not None:
                os.dup2(_saved_fd, 2)
                os.close(_saved_fd)
                _saved_fd = None
