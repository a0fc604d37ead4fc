"""The per-rank featurize loop: manifest shards -> decoded uint8 batches -> model -> committed feature shards.

Run by every rank (or the single process). Order of work:

1. rank, device, threads; read the manifest; build the model; compute the run fingerprint;
2. rank 0 checks ``FEAT/_run.json`` (refusing another run's shards unless overwrite), cleans stale
   temporaries, writes ``_run.json`` and ``config.resolved.toml``, lists the pending shards and
   broadcasts them; every rank takes its share (``featurize.assign``);
3. per shard: its rows in a fixed order, batches of ``batch_size`` that never cross shards (so a
   shard's features do not depend on the rank or world size), decode in DataLoader workers
   (crash-contained), uint8 to the device, normalize there, forward under inference_mode + autocast,
   then ``imgfeat.metadata.contracts.feature_store.write_feature_shard`` (data files atomic, marker last). Rows that fail
   to decode go to the shard's rejects list. A shard that fails is retried up to
   ``featurize.max_shard_attempts`` times;
4. each rank records its stats; the one that finds every shard committed writes ``featurize_summary.json``.
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from imgfeat.featurize import assign as assign_mod
from imgfeat.featurize import fingerprint as fp_mod
from imgfeat.featurize.distributed import DistContext, init_distributed, set_threads, shutdown
from imgfeat.featurize.model import autocast, build_model, resolve_device
from imgfeat.metadata import storage
from imgfeat.metadata.config import Config, dump_toml
from imgfeat.metadata.contracts import feature_store, hooks, shards
from imgfeat.metadata.contracts.schema import CONFIG_FILE
from imgfeat.preprocess.transforms import BatchNormalizer

log = logging.getLogger(__name__)

STAGES = ("read_decode", "transfer", "forward", "write")


@dataclass
class RankStats:
    """What one rank did in this run."""

    rank: int = 0
    shards: list[int] = field(default_factory=list)
    images: int = 0
    rejects: int = 0
    batches: int = 0
    attempts_failed: int = 0
    timings: dict[str, float] = field(default_factory=lambda: {s: 0.0 for s in STAGES})
    wall_s: float = 0.0
    setup_s: float = 0.0
    """Start to the first shard: process group, manifest, model build and warm-up, folder checks."""
    loop_s: float = 0.0
    """The shard loop: loaders, decode waits, transfers, forwards and writes of every shard."""
    threads: int = 1
    device: str = "cpu"
    workers: int = 0
    """Decode workers (``loader_workers``)."""


def _split_reason(reason: str) -> tuple[str, str]:
    code, _, detail = reason.partition(": ")
    return code or "undecodable", detail


CORES_PER_CPU_WORKER = 4


def loader_workers(cfg: Config, ctx: DistContext, device: torch.device) -> int:
    """DataLoader workers of one rank: ``preprocess.num_workers`` >= 0 as given; -1 (auto) by device:

    - CUDA: one per core of this rank's share; the GPU computes, the CPU only decodes.
    - CPU: the model's intra-op threads already use every core of the rank, and decoding costs a few
      percent of a CPU forward. Each worker that wakes up preempts one of those threads, and one
      preempted thread stalls the whole operator. So one worker per ``CORES_PER_CPU_WORKER`` cores, at
      least one (which keeps decoder crashes contained; 0 would decode in the main process, uncontained).
    """
    from imgfeat.featurize.distributed import available_cores

    if cfg.preprocess.num_workers >= 0:
        return cfg.preprocess.num_workers
    share = max(1, available_cores() // max(1, ctx.local_world_size))
    return share if device.type == "cuda" else max(1, share // CORES_PER_CPU_WORKER)


def _batches(dataset: Any, cfg: Config, num_workers: int) -> Iterator[Any]:
    from imgfeat.preprocess.loader import iter_batches_contained

    return iter_batches_contained(dataset, cfg.preprocess, batch_size=cfg.preprocess.batch_size, num_workers=num_workers)


class _Prefetcher:
    """A thread that runs the loaders of a list of datasets one after the other into a bounded queue, so
    decoding of the next shard starts while the current one computes. Decoding itself stays in the
    loaders' worker processes; the thread only hands batches over."""

    _END = object()

    def __init__(self, datasets: list[Any], make_iter: Any, depth: int = 4) -> None:
        import queue
        import threading

        self.datasets, self.make_iter = datasets, make_iter
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="featurize-prefetch", daemon=True)
        self.thread.start()

    def _put(self, item: Any) -> bool:
        import queue

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
            if not self._put((k, self._END)):
                return

    def batches(self, k: int) -> Iterator[Any]:
        """The batches of dataset ``k`` (datasets must be consumed in order)."""
        while True:
            key, item = self.queue.get()
            if key != k:
                raise RuntimeError(f"prefetch out of order: got dataset {key}, expected {k}")
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        import queue

        self.stop.set()
        while self.thread.is_alive():
            try:
                self.queue.get(timeout=0.1)
            except queue.Empty:
                pass
            self.thread.join(timeout=0.1)


class ShardComputer:
    """Compute and commit shards with one model on one device."""

    def __init__(self, cfg: Config, model: torch.nn.Module, device: torch.device, out: str, fingerprint: str,
                 stats: RankStats, num_workers: int, progress: Any = None) -> None:
        self.cfg, self.model, self.device, self.out, self.fingerprint = cfg, model, device, out, fingerprint
        self.stats, self.num_workers, self.progress = stats, num_workers, progress
        self.out_dtype = np.float16 if cfg.featurize.dtype == "float16" else np.float32
        self.channels_last = cfg.featurize.channels_last
        self.normalize = BatchNormalizer(device, self.channels_last)
        self._started: tuple[list[assign_mod.ShardWork], list[Any], _Prefetcher] | None = None

    def warm_up(self) -> None:
        """One forward at the batch shape, so kernel selection and allocation are not charged to the first shard."""
        size = self.cfg.preprocess.size
        x = torch.zeros((self.cfg.preprocess.batch_size, 3, size, size), device=self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), autocast(self.device, self.cfg.featurize.precision):
            self.model(x)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def features(self, dataset: Any, batches: Iterator[Any] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(features [n, d] of all rows, ok [n], reasons [n]) for every row of ``dataset``, in row order.

        ``batches``: the dataset's batches from a prefetcher; default: a loader of its own."""
        n = len(dataset)
        feats: np.ndarray | None = None
        ok_all = np.zeros(n, dtype=bool)
        reasons = [""] * n
        timings = self.stats.timings
        non_blocking = self.device.type == "cuda"
        batch_size = self.cfg.preprocess.batch_size
        it = batches if batches is not None else _batches(dataset, self.cfg, self.num_workers)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for images, indices, ok, batch_reasons in it:
                t1 = time.perf_counter()
                timings["read_decode"] += t1 - t0
                real = images.shape[0]
                if real < batch_size:
                    # Pad the tail batch to the full batch: every forward has the same shape, so a row's
                    # features do not depend on where its shard ends or on the thread count (oneDNN picks
                    # thread-dependent kernels for small batches), and compiled models see one shape.
                    pad = images.new_zeros((batch_size - real, *images.shape[1:]))
                    images = torch.cat([images, pad.contiguous(memory_format=torch.channels_last)])
                if non_blocking and not images.is_pinned():
                    images = images.pin_memory()
                x = self.normalize(images)
                t2 = time.perf_counter()
                timings["transfer"] += t2 - t1
                with autocast(self.device, self.cfg.featurize.precision):
                    y = self.model(x)
                y = y[:real].float().cpu().numpy()
                t3 = time.perf_counter()
                timings["forward"] += t3 - t2
                idx = indices.numpy()
                if feats is None:
                    feats = np.zeros((n, y.shape[1]), dtype=self.out_dtype)
                feats[idx] = y.astype(self.out_dtype)
                ok_np = ok.numpy()
                ok_all[idx] = ok_np
                for k, i in enumerate(idx):
                    reasons[i] = batch_reasons[k]
                self.stats.batches += 1
                if self.progress is not None:
                    self.progress.update(len(idx))
                hooks.fault_point("batch_done", "")
                t0 = time.perf_counter()
        if feats is None:
            feats = np.zeros((0, 0), dtype=self.out_dtype)
        return feats, ok_all, reasons

    def dataset(self, work: assign_mod.ShardWork) -> Any:
        from imgfeat.preprocess.dataset import ManifestDataset

        return ManifestDataset(work.rows, self.cfg.preprocess)

    def run_shard(self, work: assign_mod.ShardWork, dataset: Any = None, batches: Iterator[Any] | None = None) -> dict[str, Any]:
        """Compute one shard and commit it; returns its marker."""
        shards.remove_shard(self.out, work.stem)  # a stale marker must never describe new files
        dataset = dataset if dataset is not None else self.dataset(work)
        feats, ok, reasons = self.features(dataset, batches)
        if feats.shape[0]:  # a row the model turned into NaN or inf (fp16 overflow) is a reject, not a feature
            bad = ok & ~np.isfinite(feats).all(axis=1)
            for i in np.flatnonzero(bad):
                reasons[i] = f"nonfinite_features: the model output has NaN or inf ({self.cfg.featurize.precision})"
            ok = ok & ~bad
        ids = np.asarray(dataset.image_ids)
        rejects = []
        for i in np.flatnonzero(~ok):
            code, detail = _split_reason(reasons[i])
            rejects.append({"image_id": dataset.image_ids[i], "path": dataset.paths[i], "reason": code, "detail": detail})
        kept = feats[ok] if feats.shape[0] else np.zeros((0, feats.shape[1] if feats.ndim == 2 else 0), self.out_dtype)
        t = time.perf_counter()
        marker = feature_store.write_feature_shard(
            self.out, work.shard, ids[ok].tolist(), kept, rejects, self.cfg.featurize.format, self.fingerprint,
            extra={"manifest_rows": len(work), "rank": self.stats.rank},
        )
        self.stats.timings["write"] += time.perf_counter() - t
        self.stats.images += int(ok.sum())
        self.stats.rejects += len(rejects)
        self.stats.shards.append(work.shard)
        if rejects:
            log.warning("%s: %d of %d rows rejected (first: %s %s)", work.stem, len(rejects), len(work),
                        rejects[0]["reason"], rejects[0]["path"])
        return marker

    def start(self, works: list[assign_mod.ShardWork]) -> None:
        """Start decoding ``works`` now (e.g. while the model warms up); ``run_shards(works)`` consumes it."""
        datasets = [self.dataset(w) for w in works]
        prefetch = _Prefetcher(datasets, lambda ds: _batches(ds, self.cfg, self.num_workers),
                               depth=max(2, self.cfg.preprocess.prefetch_factor))
        self._started = (works, datasets, prefetch)

    def run_shards(self, works: list[assign_mod.ShardWork]) -> None:
        """Compute and commit ``works`` in order, decoding ahead across shard boundaries (a prefetch thread
        keeps the next shard's loader running while this one computes). After a failure, the rest runs
        shard by shard with retries."""
        if not works:
            return
        if self._started is None or self._started[0] is not works:
            self.start(works)
        if self._started is None:  # start() always sets it
            raise RuntimeError("featurize runner: shards were not started")
        _, datasets, prefetch = self._started
        self._started = None
        done = 0
        try:
            for k, work in enumerate(works):
                self.run_shard(work, datasets[k], prefetch.batches(k))
                done += 1
        except (ValueError, KeyboardInterrupt):
            raise
        except Exception as exc:
            self.stats.attempts_failed += 1
            log.warning("%s: failed (%s: %s); retrying it and the rest shard by shard", works[done].stem,
                        type(exc).__name__, exc)
        finally:
            prefetch.close()
        for k in range(done, len(works)):
            self.run_shard_with_retries(works[k], first_attempt=2 if k == done else 1)

    def run_shard_with_retries(self, work: assign_mod.ShardWork, first_attempt: int = 1) -> dict[str, Any]:
        attempts = self.cfg.featurize.max_shard_attempts
        if first_attempt > attempts:
            raise RuntimeError(f"{work.stem}: failed {attempts} times")
        for attempt in range(first_attempt, attempts + 1):
            try:
                return self.run_shard(work)
            except (ValueError, KeyboardInterrupt):
                raise
            except Exception as exc:
                self.stats.attempts_failed += 1
                if attempt == attempts:
                    raise RuntimeError(f"{work.stem}: failed {attempts} times; last error: {exc}") from exc
                log.warning("%s: attempt %d of %d failed (%s: %s); retrying", work.stem, attempt, attempts,
                            type(exc).__name__, exc)
        raise AssertionError("unreachable")


def _prepare_folder(cfg: Config, out: str, fields: dict[str, Any], work: dict[int, assign_mod.ShardWork]) -> list[int]:
    """Rank 0 only: check/write the run file, clean temporaries, return the pending shards."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(out)
    fs.makedirs(path, exist_ok=True)
    digest = fp_mod.digest(fields)
    state = fp_mod.check_run_file(out, fields, cfg.featurize.overwrite)
    markers = {s: m for s, m in shards.list_markers(out).items() if m.get("kind") == "features"}
    foreign = sorted(s for s, m in markers.items() if m.get("fingerprint") != digest)
    if foreign and not cfg.featurize.overwrite:  # e.g. _run.json was deleted, but the old shards were not
        raise ValueError(
            f"{out}: shards {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''} carry another fingerprint "
            f"than this run ({digest}); use another --out, or --overwrite to replace them"
        )
    from imgfeat.featurize.summary import STATS_DIR

    stats_dir = fsspec.core.url_to_fs(storage.join(out, STATS_DIR))[1]
    if fs.exists(stats_dir):  # per-rank stats of earlier attempts (no rank of this attempt has written yet)
        fs.rm(stats_dir, recursive=True)
    removed = shards.clean_stale_temporaries(out)
    if removed:
        log.info("removed %d stale temporaries: %s", len(removed), ", ".join(removed[:5]))
    if foreign:
        for stem in foreign:
            shards.remove_shard(out, stem)
        log.warning("--overwrite: removed %d shards of another run", len(foreign))
    if state != "same" or foreign:
        summary = storage.join(out, shards.FEATURES_SUMMARY)
        if fs.exists(fsspec.core.url_to_fs(summary)[1]):
            fs.rm(fsspec.core.url_to_fs(summary)[1])
    if state != "same":
        fp_mod.write_run_file(out, fields)
    storage.write_bytes_atomic(storage.join(out, CONFIG_FILE), dump_toml(cfg).encode())
    orphans = assign_mod.orphan_shards(out, work)
    if orphans:
        log.warning("%s: %d committed shards are not in the manifest (%s...); read_features will include them",
                    out, len(orphans), orphans[0])
    return assign_mod.pending_shards(out, work, digest)


def run_featurize(cfg: Config, manifest: str, out: str, split: str | None = None) -> dict[str, Any] | None:
    """Featurize the manifest at ``manifest`` into ``out`` on this rank; returns the summary on rank 0."""
    from imgfeat.featurize.summary import finish_run

    t_start = time.perf_counter()
    ctx = init_distributed()
    hooks.install_from_env(ctx.rank)  # the test hook (IMGFEAT_HOOK); nothing without it
    try:
        device = resolve_device(cfg.featurize.device, ctx.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        threads = set_threads(ctx, device)
        stats = RankStats(rank=ctx.rank, threads=threads, device=str(device))
        work = assign_mod.manifest_shards(manifest, split=split)
        model, info = build_model(cfg.featurize, cfg.preprocess.size, device)
        fields = fp_mod.run_fingerprint(cfg, info)
        digest = fp_mod.digest(fields)
        digests = ctx.all_gather(digest)
        if len(set(digests)) > 1:
            raise ValueError(f"ranks disagree on the run fingerprint ({sorted(set(digests))}): different weights, "
                             "config or code on different nodes?")
        result: tuple[str, Any, str]
        if ctx.is_main:
            attempt = uuid.uuid4().hex[:12]  # names this attempt's per-rank stats files
            try:
                result = ("ok", _prepare_folder(cfg, out, fields, work), attempt)
            except ValueError as exc:
                result = ("error", str(exc), attempt)
        else:
            result = ("", None, "")
        result = ctx.broadcast(result)
        if result[0] == "error":
            raise ValueError(result[1])
        pending: list[int] = result[1]
        attempt = result[2]
        mine = assign_mod.assign(pending, ctx.rank, ctx.world_size)
        log.info("rank %d: %d of %d pending shards (%d in the manifest), %d threads, %s",
                 ctx.rank, len(mine), len(pending), len(work), threads, device)
        progress = None
        if ctx.is_main and mine and not os.environ.get("IMGFEAT_NO_PROGRESS"):
            from tqdm import tqdm

            progress = tqdm(total=sum(len(work[s]) for s in mine), unit="img", desc=f"featurize rank 0/{ctx.world_size}",
                            disable=not log.isEnabledFor(logging.INFO))
        stats.workers = loader_workers(cfg, ctx, device)
        log.info("rank %d: %d decode workers", ctx.rank, stats.workers)
        computer = ShardComputer(cfg, model, device, out, digest, stats, stats.workers, progress)
        my_work = [work[s] for s in mine]
        if my_work:
            computer.start(my_work)  # the first batches decode while the model warms up
            computer.warm_up()
        stats.setup_s = time.perf_counter() - t_start
        t_loop = time.perf_counter()
        computer.run_shards(my_work)
        stats.loop_s = time.perf_counter() - t_loop
        if progress is not None:
            progress.close()
        stats.wall_s = time.perf_counter() - t_start
        return finish_run(ctx, cfg, out, work, digest, info, stats, computed=len(pending) > 0, attempt=attempt)
    finally:
        shutdown(ctx)
