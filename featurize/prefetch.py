"""Decode ahead across shard boundaries: a thread runs the batch iterators of a list of datasets one
after the other into a bounded queue, so the next shard's batches decode while the current one computes.

Decoding itself stays in the loaders' worker processes; the thread only hands batches over. An error
of a dataset's iterator is handed to the consumer in its place (the consumer decides about retries).
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

D = TypeVar("D")
"""A dataset (whatever ``make_iter`` takes)."""
B = TypeVar("B")
"""A batch (whatever ``make_iter`` yields)."""


class _End:
    """The marker after the last batch of a dataset."""


_END = _End()


class Prefetcher(Generic[D, B]):
    """A thread that runs ``make_iter(dataset)`` for each of ``datasets`` in order into a queue of ``depth``
    batches; ``batches(k)`` hands dataset ``k``'s batches to the consumer. Always ``close()`` it."""

    def __init__(self, datasets: list[D], make_iter: Callable[[D], Iterator[B]], depth: int = 4) -> None:
        self.datasets, self.make_iter = datasets, make_iter
        self.queue: queue.Queue[tuple[int, B | _End | BaseException]] = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="featurize-prefetch", daemon=True)
        self.thread.start()

    def _put(self, item: tuple[int, B | _End | BaseException]) -> bool:
        """Queue ``item`` unless ``close()`` was called first (then False)."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        for k, dataset in enumerate(self.datasets):
            try:
                it = self.make_iter(dataset)
                try:
                    for batch in it:
                        if not self._put((k, batch)):
                            return
                finally:
                    close = getattr(it, "close", None)
                    if close is not None:
                        close()
            except BaseException as exc:  # handed to the consumer, which retries the shard itself
                self._put((k, exc))
                return
            if not self._put((k, _END)):
                return

    def batches(self, k: int) -> Iterator[B]:
        """The batches of dataset ``k`` (datasets must be consumed in order)."""
        while True:
            key, item = self.queue.get()
            if key != k:
                raise RuntimeError(f"prefetch out of order: got dataset {key}, expected {k}")
            if isinstance(item, _End):
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the thread (a batch it is waiting to queue is dropped) and wait for it to end."""
        self.stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.1)
            except queue.Empty:
                pass
            self.thread.join(timeout=0.1)
