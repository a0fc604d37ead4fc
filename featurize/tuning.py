"""Choices made by measuring at start-up: CPU or GPU decode (``featurize.decode_device = auto``), the batch size
(``featurize.batch_probe``), and the model-only throughput the summary compares the run with.

Each decision is a pure function of an injected measurement (``measure(mode) -> img/s``, ``try_batch(size) ->
seconds per image``), so its logic is tested on CPU; ``featurize.compute.ShardComputer`` and
``featurize.runner`` supply the real measurements on CUDA.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

AUTO_MARGIN = 1.10
"""``auto`` takes the GPU decode only when it measured at least this much faster than the CPU decode (the CPU
path is the default and the reference; a tie keeps it)."""
BATCH_PROBE_CAP = 1024
"""The largest batch ``featurize.batch_probe`` tries (loader memory grows with it: workers x prefetch batches)."""
BATCH_PROBE_TOLERANCE = 0.02
"""Batch sizes within this fraction of the fastest per-image time count as equally fast: the smallest wins."""
MODEL_TIMING_BATCHES = {"cuda": 10, "cpu": 2}
"""Timed forwards for ``model_only_img_s`` after the warm-up forward, by device type (cheap on a CPU)."""


@dataclass
class DecodeChoice:
    """What ``auto`` measured and chose."""

    choice: str
    images_per_s: dict[str, float] = field(default_factory=dict)
    note: str = ""


def choose_decode(measure: Callable[[str], float], margin: float = AUTO_MARGIN) -> DecodeChoice:
    """Measure ``gpu`` then ``cpu`` decode (``measure(mode)`` -> end-to-end img/s on the first batches) and pick
    ``gpu`` when it is at least ``margin`` times faster, else ``cpu``. A measurement that raises counts as 0
    img/s (logged). GPU goes first: the CPU measurement then reads the same files from a warm page cache, so
    any bias favours the CPU decode, the safe choice."""
    figures: dict[str, float] = {}
    notes = []
    for mode in ("gpu", "cpu"):
        try:
            figures[mode] = float(measure(mode))
        except Exception as exc:
            log.warning("decode_device auto: measuring %s decode failed (%s: %s)", mode, type(exc).__name__, exc)
            notes.append(f"{mode} failed: {type(exc).__name__}: {exc}")
            figures[mode] = 0.0
    choice = "gpu" if figures["gpu"] > 0 and figures["gpu"] >= margin * figures["cpu"] else "cpu"
    log.info("decode_device auto: gpu decode %.1f img/s, cpu decode %.1f img/s: using %s", figures["gpu"],
             figures["cpu"], choice)
    return DecodeChoice(choice, figures, "; ".join(notes))


def is_oom(exc: BaseException) -> bool:
    """True for a CUDA out-of-memory error (``torch.cuda.OutOfMemoryError``, or its message in a RuntimeError)."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


@dataclass
class BatchProbe:
    """The batch-size probe's result: ``best`` and the seconds per image of every size that fit."""

    best: int
    seconds_per_image: dict[int, float] = field(default_factory=dict)
    stopped: str = ""
    """Why the doubling stopped: ``cap`` or ``out of memory at N``."""


def probe_batch_size(try_batch: Callable[[int], float], start: int, cap: int = BATCH_PROBE_CAP,
                     tolerance: float = BATCH_PROBE_TOLERANCE, oom: Callable[[BaseException], bool] = is_oom) -> BatchProbe:
    """Try ``start``, 2 x ``start``, ... up to ``cap`` (``try_batch(size)`` -> seconds per image) until one runs
    out of memory (``oom(exc)``; other errors propagate); the fastest per image wins, the smallest of those
    within ``tolerance`` of it. ``start`` itself out of memory is a ValueError naming preprocess.batch_size."""
    if start < 1:
        raise ValueError(f"preprocess.batch_size must be >= 1, got {start}")
    results: dict[int, float] = {}
    stopped = "cap"
    size = start
    while size <= max(cap, start):
        try:
            results[size] = float(try_batch(size))
        except Exception as exc:
            if not oom(exc):
                raise
            stopped = f"out of memory at {size}"
            break
        size *= 2
    if not results:
        raise ValueError(f"preprocess.batch_size = {start} does not fit in the device memory ({stopped})")
    fastest = min(results.values())
    best = min(s for s, t in results.items() if t <= fastest * (1 + tolerance))
    log.info("batch probe: %s; stopped: %s; using batch %d",
             ", ".join(f"{s}: {1 / t:.0f} img/s" if t > 0 else f"{s}: ?" for s, t in results.items()), stopped, best)
    return BatchProbe(best, results, stopped)


def time_forwards(step: Callable[[], Any], batches: int, sync: Callable[[], None] = lambda: None) -> float:
    """Seconds for ``batches`` calls of ``step`` (``sync`` after the last, e.g. ``torch.cuda.synchronize``)."""
    sync()
    t = time.perf_counter()
    for _ in range(batches):
        step()
    sync()
    return time.perf_counter() - t


def timed(batches: Iterable[T], stamps: list[float]) -> Iterator[T]:
    """``batches``, appending the time of each request for the next batch to ``stamps`` (and of the last one)."""
    it = iter(batches)
    while True:
        stamps.append(time.perf_counter())
        try:
            batch = next(it)
        except StopIteration:
            return
        yield batch


def steady_rate(stamps: list[float], rows: list[int], skip: int) -> float:
    """Images per second after the first ``skip`` batches: ``rows[i]`` images in batch ``i``, ``stamps[i]`` the
    request of batch ``i`` (``stamps[i + 1]``: batch ``i`` done). 0 when nothing is left after ``skip``."""
    skip = max(0, min(skip, len(rows) - 1))
    if len(stamps) < len(rows) + 1 or not rows:
        return 0.0
    dt = stamps[len(rows)] - stamps[skip]
    return sum(rows[skip:]) / dt if dt > 0 else 0.0


__all__ = ["choose_decode", "DecodeChoice", "probe_batch_size", "BatchProbe", "is_oom", "time_forwards", "timed",
           "steady_rate", "AUTO_MARGIN", "BATCH_PROBE_CAP", "MODEL_TIMING_BATCHES"]
