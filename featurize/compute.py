"""Compute and commit feature shards with one model on one device (``ShardComputer``).

Per shard: its rows in a fixed order, batches of ``batch_size`` that never cross shards (so a shard's
features do not depend on the rank or world size), decode in DataLoader workers (crash-contained), uint8
to the device, normalize there, forward under inference_mode + autocast, then
``imgfeat.metadata.contracts.feature_store.write_feature_shard`` (data files atomic, marker last). Rows
that fail to decode, or that the model turns into NaN or inf, go to the shard's rejects list. A shard
that fails is retried up to ``featurize.max_shard_attempts`` times.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch

from imgfeat.featurize.assign import ShardWork
from imgfeat.featurize.model import autocast
from imgfeat.featurize.prefetch import Prefetcher
from imgfeat.featurize.stats import RankStats
from imgfeat.metadata.config import Config
from imgfeat.metadata.contracts import feature_store, hooks, shards
from imgfeat.preprocess.dataset import Batch, ManifestDataset
from imgfeat.preprocess.loader import iter_batches_contained
from imgfeat.preprocess.transforms import BatchNormalizer

# The shard loop's messages keep the logger name they had before it moved out of ``runner``.
log = logging.getLogger("imgfeat.featurize.runner")


class Progress(Protocol):
    """A progress bar (``tqdm``): told how many rows each batch finished, closed by the runner."""

    def update(self, n: int = 1) -> object: ...

    def close(self) -> None: ...


def _split_reason(reason: str) -> tuple[str, str]:
    code, _, detail = reason.partition(": ")
    return code or "undecodable", detail


def _batches(dataset: ManifestDataset, cfg: Config, num_workers: int) -> Iterator[Batch]:
    return iter_batches_contained(dataset, cfg.preprocess, batch_size=cfg.preprocess.batch_size, num_workers=num_workers)


class ShardComputer:
    """Compute and commit shards with one model on one device."""

    def __init__(self, cfg: Config, model: torch.nn.Module, device: torch.device, out: str, fingerprint: str,
                 stats: RankStats, num_workers: int, progress: Progress | None = None) -> None:
        self.cfg, self.model, self.device, self.out, self.fingerprint = cfg, model, device, out, fingerprint
        self.stats, self.num_workers, self.progress = stats, num_workers, progress
        self.out_dtype = np.float16 if cfg.featurize.dtype == "float16" else np.float32
        self.channels_last = cfg.featurize.channels_last
        self.normalize = BatchNormalizer(device, self.channels_last)
        self._started: tuple[list[ShardWork], list[ManifestDataset], Prefetcher[ManifestDataset, Batch]] | None = None

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

    def features(self, dataset: ManifestDataset,
                 batches: Iterator[Batch] | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
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

    def dataset(self, work: ShardWork) -> ManifestDataset:
        """The decoding dataset over ``work``'s rows."""
        return ManifestDataset(work.rows, self.cfg.preprocess, limits=self.cfg.decode)

    def run_shard(self, work: ShardWork, dataset: ManifestDataset | None = None,
                  batches: Iterator[Batch] | None = None) -> dict[str, Any]:
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

    def start(self, works: list[ShardWork]) -> None:
        """Start decoding ``works`` now (e.g. while the model warms up); ``run_shards(works)`` consumes it."""
        datasets = [self.dataset(w) for w in works]
        prefetch = Prefetcher(datasets, lambda ds: _batches(ds, self.cfg, self.num_workers),
                              depth=max(2, self.cfg.preprocess.prefetch_factor))
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
