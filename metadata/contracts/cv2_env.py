"""Import OpenCV with its decoder limits set first, and keep the decoders' own chatter off the terminal.

OpenCV reads ``OPENCV_IO_MAX_IMAGE_PIXELS`` once, at import; set later it is ignored. Every process
that decodes (Spark Python workers, DataLoader workers) imports cv2 through here.

Decoders talk: OpenCV logs through its own logger, and libpng (and others) write warnings straight to
file descriptor 2. A manifest run over a decoder test suite printed about 1,100 such lines, while the
verdict for each file is already in its row. So by default OpenCV's logger is silent and every decode
runs inside ``quiet_decoder()``, which catches that output; ``IMGFEAT_DECODER_LOGS=1`` (set in the
environment of the workers; the manifest job passes it on to Spark executors) shows all of it again for
debugging. Some of it is a verdict: libjpeg reports damaged data only as a warning and decodes the rest
anyway (grey or garbled parts), so ``decoder_damage`` turns those lines into the file's status.
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


_lock = threading.RLock()
_capture: tuple[int, int] | None = None
"""(pid, fd) of this process's capture file: a forked child makes its own (a shared one would mix texts)."""
_CAPTURE_LIMIT = 4096


class DecoderOutput:
    """What the decoders wrote to file descriptor 2 during one ``quiet_decoder`` block (``text``, set when the
    block ends; at most its first 4 KiB)."""

    __slots__ = ("text",)

    def __init__(self) -> None:
        self.text = ""


def _capture_fd() -> int:
    global _capture
    if _capture is None or _capture[0] != os.getpid():
        fd = os.memfd_create("imgfeat-decoder") if hasattr(os, "memfd_create") else _temp_fd()
        _capture = (os.getpid(), fd)
    return _capture[1]


def _temp_fd() -> int:
    import tempfile

    fd, path = tempfile.mkstemp(prefix="imgfeat-decoder-")
    os.unlink(path)
    return fd


@contextlib.contextmanager
def quiet_decoder() -> Iterator[DecoderOutput]:
    """Catch what the C decoders write to file descriptor 2 while one runs, off the terminal.

    libjpeg reports damaged data only there, as warnings ("Corrupt JPEG data: ...") after which OpenCV
    still returns a picture: the yielded ``DecoderOutput`` keeps the text for ``decoder_damage``. Blocks
    run one at a time per process (a lock), so each text is its own decode's; costs a few system calls per
    decode. With ``IMGFEAT_DECODER_LOGS=1`` the text is also written to the real stderr."""
    out = DecoderOutput()
    with _lock:
        sys.stderr.flush()
        fd = _capture_fd()
        saved = os.dup(2)
        os.dup2(fd, 2)
        try:
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            size = os.lseek(fd, 0, os.SEEK_END)
            if size:
                raw = os.pread(fd, min(size, _CAPTURE_LIMIT), 0)
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                out.text = raw.decode("utf-8", "replace")
                if decoder_logs():
                    os.write(2, raw)


_JPEG_DAMAGE = ("Corrupt JPEG data", "Premature end of JPEG file")
_JPEG_HARMLESS = ("Corrupt JPEG data: bad ICC marker",)


def decoder_damage(text: str) -> tuple[str, str] | None:
    """A manifest (status, detail) for damaged data that libjpeg reported in a decode's ``DecoderOutput``
    text and decoded anyway (its warnings "Corrupt JPEG data: ..." and "Premature end of JPEG file"; a bad
    ICC profile marker aside), else None. Such a picture has grey or garbled parts: ``truncated`` when the
    data ends early, ``undecodable`` otherwise; the detail is libjpeg's first such line."""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith(_JPEG_DAMAGE) and not line.startswith(_JPEG_HARMLESS):
            status = "truncated" if line.startswith("Premature end") else "undecodable"
            return status, f"libjpeg: {line[:200]}"
    return None
