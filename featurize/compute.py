"""Compute and commit feature shards with one model on one device (``ShardComputer``).

Per shard: its rows in a fixed order, batches of ``batch_size`` that never cross shards (so a shard's
features do not depend on the rank or world size), decode in DataLoader workers (crash-contained), uint8
to the device, normalize there, forward under inference_mode + autocast, then
``imgfeat.metadata.contracts.feature_store.write_feature_shard`` (data files atomic, marker last). Rows
that fail to decode, or that the model turns into NaN or inf, go to the shard's rejects list. A shard
that fails is retried up to ``featurize.max_shard_attempts`` times.

On a CUDA device the copy of batch n+1 runs on a side stream while batch n computes (``featurize.overlap``).
With ``featurize.decode_device = gpu`` the workers only read bytes and JPEGs are decoded and resized on the
device (``featurize.gpu_decode``); ``auto`` measures both on the first batches (``choose_decode``). The warm-up
also times the model alone at the batch shape (``RankStats.model_only_img_s``).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch

from imgfeat.featurize import tuning
from imgfeat.featurize.assign import ShardWork
from imgfeat.featurize.gpu_decode import DecodeFn, GpuDecoder, RawBytesDataset, collate_raw
from imgfeat.featurize.model import autocast
from imgfeat.featurize.overlap import CopyAhead, CudaBackend
from imgfeat.featurize.prefetch import Prefetcher
from imgfeat.featurize.stats import RankStats
from imgfeat.metadata.config import Config
from imgfeat.metadata.contracts import feature_store, hooks, shards
from imgfeat.preprocess.dataset import Batch, ManifestDataset
from imgfeat.preprocess.decode import split_reason
from imgfeat.preprocess.loader import iter_batches_contained
from imgfeat.preprocess.tile_dataset import TileDataset
from imgfeat.preprocess.transforms import BatchNormalizer

# The shard loop's messages keep the logger name they had before it moved out of ``runner``.
log = logging.getLogger("imgfeat.featurize.runner")


class Progress(Protocol):
    """A progress bar (``tqdm``): told how many rows each batch finished, closed by the runner."""

    def update(self, n: int = 1) -> object: ...

    def close(self) -> None: ...


def _batches(dataset: ManifestDataset, cfg: Config, num_workers: int) -> Iterator[Any]:
    """The dataset's batches from a crash-contained loader: ``Batch`` es, or ``RawBatch`` es for GPU decode."""
    collate_fn = collate_raw if isinstance(dataset, RawBytesDataset) else None
    if collate_fn is None:
        return iter_batches_contained(dataset, cfg.preprocess, batch_size=cfg.preprocess.batch_size, num_workers=num_workers)
    return iter_batches_contained(dataset, cfg.preprocess, batch_size=cfg.preprocess.batch_size, num_workers=num_workers,
                                  collate_fn=collate_fn)


def _pad(images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``images`` padded with zero images to ``batch_size`` rows (channels-last), on their device."""
    pad = images.new_zeros((batch_size - images.shape[0], *images.shape[1:]))
    return torch.cat([images, pad.contiguous(memory_format=torch.channels_last)])


AUTO_MIN_BATCHES = 3
"""``decode_device = auto`` measures only when the rank has at least this many batches to spare for it."""


def _seconds_per_image(model: torch.nn.Module, device: torch.device, cfg: Config, batch: int, repeats: int) -> float:
    size = cfg.preprocess.size
    x = torch.zeros((batch, 3, size, size), device=device)
    if cfg.featurize.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        with torch.inference_mode(), autocast(device, cfg.featurize.precision):
            model(x).float().cpu()

    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    step()
    return tuning.time_forwards(step, repeats, sync) / (repeats * batch)


def forward_seconds_per_image(model: torch.nn.Module, device: torch.device, cfg: Config, batch: int, repeats: int = 3) -> float:
    """Seconds per image of ``model`` at ``batch`` x 3 x size x size (one untimed forward first); for the batch probe."""
    try:
        return _seconds_per_image(model, device, cfg, batch, repeats)
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


class _ShardArrays:
    """One shard's features [n, d] (made at its first batch), ok flags and reject reasons, filled batch by batch."""

    def __init__(self, n: int, dtype: Any) -> None:
        self.n, self.dtype = n, dtype
        self.feats: np.ndarray | None = None
        self.ok = np.zeros(n, dtype=bool)
        self.reasons = [""] * n

    def add(self, y: np.ndarray, idx: np.ndarray, ok_np: np.ndarray, batch_reasons: list[str]) -> None:
        """The features ``y`` of rows ``idx``, their ok flags and reasons."""
        if self.feats is None:
            self.feats = np.zeros((self.n, y.shape[1]), dtype=self.dtype)
        self.feats[idx] = y.astype(self.dtype)
        self.ok[idx] = ok_np
        for k, i in enumerate(idx):
            self.reasons[i] = batch_reasons[k]

    def result(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(features, ok, reasons); features [0, 0] when no batch came."""
        feats = self.feats if self.feats is not None else np.zeros((0, 0), dtype=self.dtype)
        return feats, self.ok, self.reasons


class ShardComputer:
    """Compute and commit shards with one model on one device."""

    overlap = True
    """On CUDA, copy batch n+1 while batch n computes (``features_overlapped``); False: the plain loop."""

    def __init__(self, cfg: Config, model: torch.nn.Module, device: torch.device, out: str, fingerprint: str,
                 stats: RankStats, num_workers: int, progress: Progress | None = None, decode: str = "cpu",
                 decode_fn: DecodeFn | None = None) -> None:
        """``decode``: ``cpu``, ``gpu`` or ``auto`` (``gpu_decode.resolve_decode_device``; ``auto`` is settled by
        ``choose_decode``); ``decode_fn``: the GPU decode function (default nvJPEG through torchvision)."""
        self.cfg, self.model, self.device, self.out, self.fingerprint = cfg, model, device, out, fingerprint
        self.stats, self.num_workers, self.progress = stats, num_workers, progress
        self.out_dtype = np.float16 if cfg.featurize.dtype == "float16" else np.float32
        self.channels_last = cfg.featurize.channels_last
        self.normalize = BatchNormalizer(device, self.channels_last)
        if decode not in ("cpu", "gpu", "auto"):
            raise ValueError(f"featurize.decode_device must be one of cpu, gpu, auto; got {decode!r}")
        self.decode, self.decode_fn = decode, decode_fn
        self._gpu: GpuDecoder | None = None
        self._backend: CudaBackend | None = None
        self._started: tuple[list[ShardWork], list[ManifestDataset], Prefetcher[ManifestDataset, Any]] | None = None
        stats.decode_device = decode
        stats.batch_size = cfg.preprocess.batch_size

    @property
    def gpu_decoder(self) -> GpuDecoder:
        """The GPU decoder of this computer (its fallback counts last for the run)."""
        if self._gpu is None:
            self._gpu = GpuDecoder(self.cfg.preprocess, self.device, self.cfg.decode, self.decode_fn)
        return self._gpu

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
        self.time_model(x)

    def time_model(self, x: torch.Tensor) -> float:
        """Images/s of the warm model alone on the batch ``x`` (``tuning.MODEL_TIMING_BATCHES`` timed forwards,
        each with its features brought to the host, as the shard loop does); kept in ``stats.model_only_img_s``."""
        device = self.device

        def step() -> None:
            with torch.inference_mode(), autocast(device, self.cfg.featurize.precision):
                self.model(x).float().cpu()

        batches = tuning.MODEL_TIMING_BATCHES.get(device.type, 2)
        sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
        seconds = tuning.time_forwards(step, batches, sync)
        self.stats.model_only_img_s = round(batches * x.shape[0] / seconds, 2) if seconds > 0 else 0.0
        log.info("model alone: %.1f img/s at batch %d (%d timed forwards)", self.stats.model_only_img_s, x.shape[0], batches)
        return self.stats.model_only_img_s

    def features(self, dataset: ManifestDataset,
                 batches: Iterator[Any] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(features [n, d] of all rows, ok [n], reasons [n]) for every row of ``dataset``, in row order.

        ``batches``: the dataset's batches from a prefetcher; default: a loader of its own. A ``RawBytesDataset``
        (GPU decode) goes through ``features_gpu_decode``; on CUDA the CPU-decoded batches through
        ``features_overlapped``; on a CPU device the loop below."""
        if isinstance(dataset, RawBytesDataset):
            return self.features_gpu_decode(dataset, batches)
        if self.device.type == "cuda" and self.overlap:
            return self.features_overlapped(dataset, batches)
        n = len(dataset)
        arrays = _ShardArrays(n, self.out_dtype)
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
                self._record(arrays, y, indices.numpy(), ok.numpy(), batch_reasons)
                t0 = time.perf_counter()
        return arrays.result()

    def _record(self, arrays: _ShardArrays, y: np.ndarray, idx: np.ndarray, ok_np: np.ndarray,
                batch_reasons: list[str]) -> None:
        """Store one batch's features and status in the shard's arrays; count it and move the progress bar."""
        arrays.add(y, idx, ok_np, batch_reasons)
        self.stats.batches += 1
        if self.progress is not None:
            self.progress.update(len(idx))
        hooks.fault_point("batch_done", "")

    def _backend_for_device(self) -> CudaBackend:
        if self._backend is None:
            self._backend = CudaBackend(self.device)
        return self._backend

    def features_overlapped(self, dataset: ManifestDataset,
                            batches: Iterator[Any] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``features`` on CUDA with CPU decode: batch n+1 is copied on a side stream while batch n computes
        (``overlap.CopyAhead``); the tail batch is padded on the host, as on a CPU device."""
        n = len(dataset)
        arrays = _ShardArrays(n, self.out_dtype)
        timings = self.stats.timings
        batch_size = self.cfg.preprocess.batch_size
        it = batches if batches is not None else _batches(dataset, self.cfg, self.num_workers)

        def host(batch: Batch) -> torch.Tensor:
            images = batch[0]
            return _pad(images, batch_size) if images.shape[0] < batch_size else images

        ahead: CopyAhead[Batch] = CopyAhead(it, host, self._backend_for_device())
        waited = staged = 0.0
        t0 = time.perf_counter()
        with torch.inference_mode():
            for (images, indices, ok, batch_reasons), on_device in ahead:
                real = images.shape[0]
                x = self.normalize(on_device)
                with autocast(self.device, self.cfg.featurize.precision):
                    y_dev = self.model(x)
                ahead.issue_next()  # the loader wait and the next copy overlap this forward
                y = y_dev[:real].float().cpu().numpy()
                t3 = time.perf_counter()
                wait, stage = ahead.wait_s - waited, ahead.stage_s - staged
                waited, staged = ahead.wait_s, ahead.stage_s
                timings["read_decode"] += wait
                timings["transfer"] += stage
                timings["forward"] += max(0.0, t3 - t0 - wait - stage)
                self._record(arrays, y, indices.numpy(), ok.numpy(), batch_reasons)
                t0 = t3
        return arrays.result()

    def features_gpu_decode(self, dataset: RawBytesDataset,
                            batches: Iterator[Any] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """``features`` with JPEGs decoded on the device (``gpu_decode.GpuDecoder``): the decode counts as
        ``read_decode``, normalizing as ``transfer``; the tail batch is padded on the device."""
        n = len(dataset)
        arrays = _ShardArrays(n, self.out_dtype)
        timings = self.stats.timings
        batch_size = self.cfg.preprocess.batch_size
        decoder = self.gpu_decoder
        it = batches if batches is not None else _batches(dataset, self.cfg, self.num_workers)
        t0 = time.perf_counter()
        try:
            with torch.inference_mode():
                for raw in it:
                    images, ok, batch_reasons = decoder.decode(raw, dataset)
                    t1 = time.perf_counter()
                    timings["read_decode"] += t1 - t0
                    real = images.shape[0]
                    if real < batch_size:
                        images = _pad(images, batch_size)
                    x = self.normalize(images)
                    t2 = time.perf_counter()
                    timings["transfer"] += t2 - t1
                    with autocast(self.device, self.cfg.featurize.precision):
                        y = self.model(x)
                    y = y[:real].float().cpu().numpy()
                    timings["forward"] += time.perf_counter() - t2
                    self._record(arrays, y, raw.indices.numpy(), ok.numpy(), batch_reasons)
                    t0 = time.perf_counter()
        finally:
            self.stats.decode_fallbacks = dict(decoder.fallbacks)
            self.stats.gpu_decoded = decoder.gpu_images
        return arrays.result()

    def make_dataset(self, rows: pa.Table, decode: str | None = None) -> ManifestDataset:
        """The dataset over ``rows`` for ``decode`` (default this computer's): ``RawBytesDataset`` for ``gpu``."""
        if "tile_of" in rows.column_names:  # tile rows: boxes read from their images, always on the CPU
            return TileDataset(rows, self.cfg.preprocess, limits=self.cfg.decode)
        if (decode or self.decode) == "gpu":
            return RawBytesDataset(rows, self.cfg.preprocess, limits=self.cfg.decode)
        return ManifestDataset(rows, self.cfg.preprocess, limits=self.cfg.decode)

    def dataset(self, work: ShardWork) -> ManifestDataset:
        """The decoding dataset over ``work``'s rows."""
        return self.make_dataset(work.rows)

    def choose_decode(self, works: list[ShardWork],
                      measure: Callable[[str], float] | None = None) -> tuning.DecodeChoice | None:
        """Settle ``decode = auto``: time GPU and CPU decode end to end on the first rows of ``works`` (their
        features are thrown away) and keep the faster (``tuning.choose_decode``). Without enough rows for
        ``AUTO_MIN_BATCHES`` batches: cpu. ``measure(mode) -> img/s`` replaces the timing (tests)."""
        if self.decode != "auto":
            return None
        batch_size = self.cfg.preprocess.batch_size
        total = sum(len(w) for w in works)
        workers = max(1, self.num_workers)
        # Enough batches that the loader's start-up backlog (about one batch per worker) is skipped and the
        # steady rate shows, but no more than a quarter of this rank's rows.
        n_batches = min(max(2 * AUTO_MIN_BATCHES, 3 * workers), total // 4 // batch_size)
        if measure is None and n_batches < AUTO_MIN_BATCHES:
            log.info("decode_device auto: %d rows are too few to measure; using cpu", total)
            self.decode = "cpu"
            self.stats.decode_device = "cpu"
            return tuning.DecodeChoice("cpu", note=f"{total} rows: too few to measure")
        if measure is None:
            rows = pa.concat_tables([w.rows for w in works]).slice(0, n_batches * batch_size)
            skip = min(workers, n_batches // 3)

            def measure(mode: str) -> float:
                return self._measure_decode(rows, mode, skip)

        result = tuning.choose_decode(measure)
        self.decode = result.choice
        self.stats.decode_device = result.choice
        self.stats.decode_probe = {k: round(v, 1) for k, v in result.images_per_s.items()}
        self._gpu = None  # the measurement's fallback counts are not the run's
        return result

    def _measure_decode(self, rows: pa.Table, mode: str, skip: int) -> float:
        """End-to-end img/s of ``rows`` with ``mode`` decode after ``skip`` batches (features discarded)."""
        dataset = self.make_dataset(rows, mode)
        stamps: list[float] = []
        sizes: list[int] = []

        def counted(it: Iterator[Any]) -> Iterator[Any]:
            for batch in it:
                sizes.append(int(batch[1].shape[0]))
                yield batch

        saved = self.stats, self.progress
        self.stats = RankStats(rank=saved[0].rank, device=saved[0].device)
        self.progress = None
        try:
            self.features(dataset, counted(tuning.timed(_batches(dataset, self.cfg, self.num_workers), stamps)))
        finally:
            self.stats, self.progress = saved
        return tuning.steady_rate(stamps, sizes, skip)

    def run_shard(self, work: ShardWork, dataset: ManifestDataset | None = None,
                  batches: Iterator[Any] | None = None) -> dict[str, Any]:
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
            code, detail = split_reason(reasons[i])
            rejects.append({"image_id": dataset.image_ids[i], "path": dataset.paths[i], "reason": code, "detail": detail})
        kept = feats[ok] if feats.shape[0] else np.zeros((0, feats.shape[1] if feats.ndim == 2 else 0), self.out_dtype)
        t = time.perf_counter()
        marker = feature_store.write_feature_shard(
            self.out, work.shard, ids[ok].tolist(), kept, rejects, self.cfg.featurize.format, self.fingerprint,
            extra={"manifest_rows": len(work), "rank": self.stats.rank},
            tiles=dataset.tile_records(np.flatnonzero(ok)) if isinstance(dataset, TileDataset) else None,
        )
        self.stats.timings["write"] += time.perf_counter() - t
        self.stats.images += int(ok.sum())
        self.stats.rejects += len(rejects)
        self.stats.shards.append(work.shard)
        if rejects:
            log.warning("%s: %d of %d rows rejected (first: %s %s)", work.stem, len(rejects), len(work),
                        rejects[0]["reason"], rejects[0]["path"])
        return marker

    def start(self, works: list[ShardWork]) -> None:
        """Start decoding ``works`` now (e.g. while the model warms up); ``run_shards(works)`` consumes it."""
        datasets = [self.dataset(w) for w in works]
        prefetch: Prefetcher[ManifestDataset, Any] = Prefetcher(
            datasets, lambda ds: _batches(ds, self.cfg, self.num_workers), depth=max(2, self.cfg.preprocess.prefetch_factor))
        self._started = (works, datasets, prefetch)

    def run_shards(self, works: list[ShardWork]) -> None:
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

    def run_shard_with_retries(self, work: ShardWork, first_attempt: int = 1) -> dict[str, Any]:
        """``run_shard(work)`` from attempt ``first_attempt`` up to ``featurize.max_shard_attempts``; returns
        its marker. ``ValueError`` (a configuration problem) is not retried."""
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
