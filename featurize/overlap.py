"""Copy the next batch to the device while the current one computes (``CopyAhead``).

On CUDA the host-to-device copy of batch n+1 runs on a side stream while the model runs batch n on the compute
stream: the host batch is in pinned memory (the loader's pinned batch as it is, else staged into one of two
reused pinned buffers), the copy is ``non_blocking`` on the side stream, an event is recorded after it, and the
compute stream waits on that event before it touches batch n+1; ``record_stream`` tells the caching allocator
that the compute stream uses the copy (so its memory is not handed to the side stream while in use). A pinned
buffer is restaged only after the event of the copy that last read it has completed.

The logic is written against a small ``DeviceBackend`` (streams, events, copies) so that tests run it on CPU
with a fake that records the order of operations; ``CudaBackend`` is the real one. Without a backend (a CPU
device) the batches pass through: the caller copies synchronously, as before.

Use::

    ahead = CopyAhead(batches, host=lambda b: b.images, backend=CudaBackend(device))
    for batch, x in ahead:          # x: batch n on the device, safe to use on the compute stream
        y = model(x)                # queued on the compute stream
        ahead.issue_next()          # wait for the loader and start copying batch n+1 meanwhile
        y = y.cpu()                 # then wait for batch n's result
"""
from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch

B = TypeVar("B")
"""A batch from the loader (whatever the iterator yields)."""


class DeviceBackend(Protocol):
    """The stream, event and copy operations ``CopyAhead`` needs."""

    def compute_stream(self) -> Any:
        """The stream the caller computes on."""

    def side_stream(self) -> Any:
        """The stream copies run on."""

    def stage(self, host: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
        """``host`` copied into pinned memory: ``buffer`` when it fits (it is not in flight), else a new one."""

    def copy(self, src: torch.Tensor, stream: Any) -> torch.Tensor:
        """A non-blocking copy of the pinned ``src`` to the device, issued on ``stream``."""

    def record(self, stream: Any) -> Any:
        """An event recorded on ``stream`` now."""

    def wait(self, stream: Any, event: Any) -> None:
        """Make ``stream`` wait for ``event`` (no host wait)."""

    def synchronize(self, event: Any) -> None:
        """Wait on the host until ``event`` has completed."""

    def keep_alive(self, tensor: torch.Tensor, stream: Any) -> None:
        """Tell the allocator that ``stream`` uses ``tensor`` (``Tensor.record_stream``)."""


class CudaBackend:
    """``DeviceBackend`` on one CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._side = torch.cuda.Stream(device=device)

    def compute_stream(self) -> Any:
        return torch.cuda.current_stream(self.device)

    def side_stream(self) -> Any:
        return self._side

    def stage(self, host: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
        if buffer is None or buffer.shape != host.shape or buffer.dtype != host.dtype or buffer.stride() != host.stride():
            buffer = torch.empty_strided(host.shape, host.stride(), dtype=host.dtype, pin_memory=True)
        buffer.copy_(host)
        return buffer

    def copy(self, src: torch.Tensor, stream: Any) -> torch.Tensor:
        with torch.cuda.stream(stream):
            return src.to(self.device, non_blocking=True)

    def record(self, stream: Any) -> Any:
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def wait(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def synchronize(self, event: Any) -> None:
        event.synchronize()

    def keep_alive(self, tensor: torch.Tensor, stream: Any) -> None:
        tensor.record_stream(stream)


@dataclass
class _Slot:
    """A reused pinned host buffer and the event of the last copy that read it."""

    buffer: torch.Tensor | None = None
    event: Any = None


@dataclass
class _Staged(Generic[B]):
    batch: B
    tensor: torch.Tensor
    """On the device (or the host tensor itself without a backend)."""
    event: Any = None
    source: torch.Tensor | None = None
    """The pinned host memory the copy reads: kept alive until the batch is handed over."""


class CopyAhead(Generic[B]):
    """Yield ``(batch, device tensor)`` for each batch of ``batches``, the copy of the next batch already issued
    on a side stream (see the module docstring). ``host(batch)`` is the CPU tensor to copy (padded as needed).

    ``wait_s``: seconds spent waiting for ``batches``; ``stage_s``: seconds staging and issuing copies."""

    def __init__(self, batches: Iterable[B], host: Callable[[B], torch.Tensor], backend: DeviceBackend | None,
                 slots: int = 2) -> None:
        self._it = iter(batches)
        self.host, self.backend = host, backend
        self._slots = [_Slot() for _ in range(max(1, slots))]
        self._next_slot = 0
        self._pending: deque[_Staged[B]] = deque()
        self._issued = False
        self._exhausted = False
        self.wait_s = 0.0
        self.stage_s = 0.0
        if backend is not None:
            self._compute = backend.compute_stream()
            self._side = backend.side_stream()

    def issue_next(self) -> None:
        """Take the next batch from the loader and issue its copy (at most once per yielded batch)."""
        if self._issued:
            return
        self._issued = True
        self._issue()

    def _issue(self) -> None:
        if self._exhausted:
            return
        t0 = time.perf_counter()
        try:
            batch = next(self._it)
        except StopIteration:
            self._exhausted = True
            self.wait_s += time.perf_counter() - t0
            return
        t1 = time.perf_counter()
        self.wait_s += t1 - t0
        host = self.host(batch)
        if self.backend is None:
            self._pending.append(_Staged(batch, host))
        else:
            slot = None
            if host.is_pinned():
                src = host
            else:
                slot = self._slots[self._next_slot]
                self._next_slot = (self._next_slot + 1) % len(self._slots)
                if slot.event is not None:
                    self.backend.synchronize(slot.event)  # the copy that last read this buffer is done
                src = slot.buffer = self.backend.stage(host, slot.buffer)
            tensor = self.backend.copy(src, self._side)
            event = self.backend.record(self._side)
            if slot is not None:
                slot.event = event
            self._pending.append(_Staged(batch, tensor, event, src))
        self.stage_s += time.perf_counter() - t1

    def __iter__(self) -> Iterator[tuple[B, torch.Tensor]]:
        self._issued = True
        self._issue()
        while self._pending:
            staged = self._pending.popleft()
            if self.backend is not None:
                self.backend.wait(self._compute, staged.event)  # the compute stream waits for the copy
                self.backend.keep_alive(staged.tensor, self._compute)
            self._issued = False
            yield staged.batch, staged.tensor
            self.issue_next()  # when the caller did not


__all__ = ["CopyAhead", "CudaBackend", "DeviceBackend"]
