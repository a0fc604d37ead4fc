"""Import OpenCV with its decoder limits set first.

OpenCV reads ``OPENCV_IO_MAX_IMAGE_PIXELS`` once, at import; set later it is ignored. Every process
that decodes (Spark Python workers, DataLoader workers) imports cv2 through here.
"""
from __future__ import annotations

import os
import sys
from types import ModuleType

DEFAULT_MAX_PIXELS = 100_000_000


def import_cv2(max_pixels: int = DEFAULT_MAX_PIXELS, threads: int | None = 1) -> ModuleType:
    """Return cv2, setting its pixel limit first when this process has not imported it yet.

    ``threads`` sets ``cv2.setNumThreads`` (1 by default: callers parallelize across processes).
    """
    if "cv2" not in sys.modules:
        os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(int(max_pixels)))
        os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    import cv2

    if threads is not None:
        cv2.setNumThreads(threads)
    return cv2
