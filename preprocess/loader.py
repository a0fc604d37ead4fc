"""The DataLoader factory and a crash-contained batch iterator.

Containment (``iter_batches_contained``): decoding runs in DataLoader worker processes, so a native
crash (a segfault in a codec) kills a worker, not the run. Batches are delivered in order; when a
worker dies, every batch that may have been in flight (at most ``workers x prefetch_factor`` past
the last one delivered) is redone in a forked child process per batch. A batch whose child dies is
redone one image per child, which pins the crash on its file(s): those come back not ok with
reason ``undecodable: decoder crashed ...``. Then a fresh DataLoader carries on with the rest.
Every index is yielded exactly once. With ``num_workers=0`` there is no process to lose, and so no
containment: decode in the main process only for trusted data.
"""
from __future__ import annotations

import functools
import logging
import multiprocessing as mp
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from imgfeat.metadata.config import DecodeConfig, PreprocessConfig
from imgfeat.metadata.contracts.cv2_env import import_cv2, quiesce_before_fork
from imgfeat.preprocess.dataset import Item, ManifestDataset, collate

log = logging.getLogger(__name__)

CRASH_REASON = "undecodable"
ISOLATION_TIMEOUT_S = 120.0


def available_cores() -> int:
    """Cores this process may run on (affinity-aware, unlike os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def resolve_workers(cfg: PreprocessConfig, num_workers: int | None = None) -> int:
    """Explicit ``num_workers``, else ``cfg.num_workers``, else (-1) one per available core."""
    if num_workers is not None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        return num_workers
    return cfg.num_workers if cfg.num_workers >= 0 else available_cores()


def worker_init(worker_id: int, max_pixels: int, parent: int | None = None) -> None:
    """Per worker: die with the loading process, one torch thread and one OpenCV thread (processes give
    the parallelism), cv2 capped."""
    if parent is not None:
        die_with_parent(parent)
    torch.set_num_threads(1)
    import_cv2(max_pixels, threads=1)


def die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``); no-op elsewhere.

    A rank killed with SIGKILL (OOM killer, a preempted node, torchrun tearing a group down) would
    otherwise leave its loader workers behind, holding shared memory and the pipes of whoever
    started the rank, until their own watchdog notices.
    """
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(0)


def make_loader(dataset: Dataset, cfg: PreprocessConfig, batch_size: int | None = None, num_workers: int | None = None,
                shuffle: bool = False, batch_sampler: Sequence[Sequence[int]] | None = None, **overrides: Any) -> DataLoader:
    """A DataLoader with the defaults that pay here: per-worker threads set, pinned memory with CUDA,
    prefetch and persistent workers. Batches are ``preprocess.dataset.LoadedBatch`` tuples, built by the
    dataset's ``__getitems__`` where it has one."""
    workers = resolve_workers(cfg, num_workers)
    max_pixels = (dataset.limits if isinstance(dataset, ManifestDataset) else DecodeConfig()).max_pixels
    kwargs: dict[str, Any] = dict(
        num_workers=workers,
        collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
        worker_init_fn=functools.partial(worker_init, max_pixels=max_pixels, parent=os.getpid()) if workers else None,
    )
    if batch_sampler is not None:
        kwargs["batch_sampler"] = batch_sampler
    else:
        kwargs.update(batch_size=batch_size or cfg.batch_size, shuffle=shuffle, drop_last=False)
    if workers:
        kwargs.update(persistent_workers=True, prefetch_factor=cfg.prefetch_factor)
        quiesce_before_fork()
    else:
        import_cv2(max_pixels, threads=1)
    kwargs.update(overrides)
    return DataLoader(dataset, **kwargs)


def plan_batches(n_or_indices: int | Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive batches of ``batch_size`` over ``range(n)`` or the given indices."""
    indices = list(range(n_or_indices)) if isinstance(n_or_indices, int) else [int(i) for i in n_or_indices]
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]


def iter_batches_contained(dataset: Dataset, cfg: PreprocessConfig, batch_size: int | None = None,
                           num_workers: int | None = None, indices: Sequence[int] | None = None,
                           max_crashes: int = 100, collate_fn: Callable[[Any], Any] = collate) -> Iterator[Any]:
    """Yield collated batches over ``indices`` (default all), in order, each index exactly once,
    surviving native crashes of the decoder (see the module docstring). Raises RuntimeError after
    ``max_crashes`` worker deaths (something other than single bad files is wrong then). ``collate_fn``
    turns a list of items (or what the dataset's ``__getitems__`` returns) into a batch: ``Batch`` by default."""
    batches = plan_batches(len(dataset) if indices is None else indices, batch_size or cfg.batch_size)  # type: ignore[arg-type]
    workers = resolve_workers(cfg, num_workers)
    if workers == 0:
        log.info("num_workers=0: decoding in the main process, a native decoder crash is not contained")
        loader = make_loader(dataset, cfg, num_workers=0, batch_sampler=batches, collate_fn=collate_fn)
        yield from loader
        return
    window = workers * cfg.prefetch_factor
    pos, crashes = 0, 0
    while pos < len(batches):
        loader = make_loader(dataset, cfg, num_workers=workers, batch_sampler=batches[pos:], persistent_workers=False,
                             collate_fn=collate_fn)
        it = iter(loader)
        _detach_sigchld_check(it)
        try:
            while pos < len(batches):
                try:
                    batch = next(it)
                except StopIteration:
                    break
                except (RuntimeError, ConnectionError, EOFError) as exc:
                    # A worker that dies after queueing a batch but before handing over its shared-memory
                    # file descriptor shows up as a reset connection instead of torch's worker error.
                    if isinstance(exc, RuntimeError) and "DataLoader worker" not in str(exc):
                        raise
                    crashes += 1
                    log.warning("a decode worker died (%s); redoing up to %d batches in isolated processes", exc, window)
                    if crashes > max_crashes:
                        raise RuntimeError(f"{crashes} decode worker deaths: giving up") from exc
                    break
                pos += 1
                yield batch
            else:
                return
        finally:
            _shutdown(it)
        if pos >= len(batches):
            return
        for batch_indices in batches[pos : pos + window]:
            batch = isolated_batch(dataset, batch_indices, collate_fn)
            pos += 1
            yield batch


def _detach_sigchld_check(it: Any) -> None:
    # torch's SIGCHLD handler raises the worker-death error asynchronously, wherever the main thread
    # happens to be (inside the caller's model code, say), where it cannot be contained. Unregister
    # the workers from it: the death is then reported by next() itself (checked every 5 s).
    try:
        from torch.utils.data import _utils

        if getattr(it, "_worker_pids_set", False):
            _utils.signal_handling._remove_worker_pids(id(it))
            it._worker_pids_set = False
    except Exception as exc:  # pragma: no cover - private API moved
        log.debug("could not detach the SIGCHLD worker check: %s", exc)


def _shutdown(it: Any) -> None:
    try:
        it._shutdown_workers()
    except Exception:  # pragma: no cover - best effort
        pass


def isolated_batch(dataset: Dataset, batch_indices: Sequence[int], collate_fn: Callable[[Any], Any] = collate) -> Any:
    """One batch decoded in a forked child; if the child dies, each item in its own child. Items travel as
    ``(array, index, ok, reason)``; ``collate_fn`` (default ``collate``) makes the batch of them."""
    items, _ = _run_isolated(dataset, batch_indices)
    if items is None:
        items = []
        for i in batch_indices:
            one, why = _run_isolated(dataset, [i])
            if one is None:
                log.warning("decoder crashed on item %d (%s): %s", i, _describe(dataset, i), why)
                one = [_crashed_item(dataset, i, why)]
            items.extend(one)
    return collate_fn(items)


def _describe(dataset: Dataset, i: int) -> str:
    paths = getattr(dataset, "paths", None)
    return paths[i] if paths is not None else str(i)


def _crashed_item(dataset: Dataset, i: int, why: str) -> Item:
    if isinstance(dataset, ManifestDataset):
        image = dataset.empty_image()
    else:
        size = int(getattr(dataset, "size", 0))
        image = torch.zeros((3, size, size), dtype=torch.uint8)
    return image, int(i), False, f"{CRASH_REASON}: decoder crashed ({why})"


def _child(dataset: Dataset, batch_indices: Sequence[int], conn: Any) -> None:
    torch.set_num_threads(1)
    out = []
    for i in batch_indices:
        image, index, ok, reason = dataset[i]
        out.append((image.numpy(), index, ok, reason))
    conn.send(out)
    conn.close()


def _run_isolated(dataset: Dataset, batch_indices: Sequence[int]) -> tuple[list[Item] | None, str]:
    """(items, "") from a forked child, or (None, why) when the child died or hung past the timeout."""
    ctx = mp.get_context("fork")
    quiesce_before_fork()
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(dataset, list(batch_indices), send), daemon=True)
    proc.start()
    send.close()
    result, hung = None, False
    try:
        if recv.poll(ISOLATION_TIMEOUT_S):
            result = recv.recv()
        else:
            hung = True
    except (EOFError, OSError):
        result = None
    finally:
        recv.close()
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if result is None:
        code = proc.exitcode
        if hung:
            return None, f"no result after {ISOLATION_TIMEOUT_S:.0f} s"
        if code is not None and code < 0:
            return None, f"killed by {signal.Signals(-code).name}"
        return None, f"exit code {code}"
    items = [(torch.from_numpy(np.asarray(img)), int(idx), bool(ok), str(reason)) for img, idx, ok, reason in result]
    return items, ""
