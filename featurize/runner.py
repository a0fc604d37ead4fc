"""The per-rank featurize run (``run_featurize``): set up the rank, claim the folder, compute this rank's
shards, record the run. Run by every rank (or the single process). Order of work:

1. rank, device, threads; rank 0 lists the manifest's shards (``assign.shard_catalog``: from the shard
   index ``_shards.parquet``, O(shards), else from two manifest columns); build the model; compute the
   run fingerprint;
2. rank 0 claims ``FEAT`` (``featurize.folder``: checks ``_run.json``, refusing another run's shards
   unless overwrite, cleans stale temporaries, writes ``_run.json`` and ``config.resolved.toml``, lists
   the pending shards from markers and file sizes) and broadcasts the shard list and the pending shards;
   every rank takes its share (``featurize.assign``) and reads the manifest rows of those shards only;
3. this rank's shards are computed and committed in order (``featurize.compute.ShardComputer``, decoding
   ahead across shards with ``featurize.prefetch``), each retried up to ``featurize.max_shard_attempts``;
   on CUDA, ``featurize.batch_probe`` picks the batch size right after the model is built, and
   ``decode_device = auto`` times the CPU and GPU decodes before the first shard (``featurize.tuning``);
4. each rank records its stats (``featurize.stats``); the one that finds every shard committed writes
   ``featurize_summary.json`` (``featurize.summary``).
"""
from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any

import torch

from imgfeat.featurize import assign as assign_mod
from imgfeat.featurize import distributed, tuning
from imgfeat.featurize import fingerprint as fp_mod
from imgfeat.featurize.compute import Progress, ShardComputer, forward_seconds_per_image
from imgfeat.featurize.distributed import DistContext, init_distributed, set_threads, shutdown
from imgfeat.featurize.folder import prepare_folder
from imgfeat.featurize.gpu_decode import resolve_decode_device
from imgfeat.featurize.model import build_model, resolve_device
from imgfeat.featurize.stats import RankStats
from imgfeat.featurize.summary import finish_run
from imgfeat.metadata.config import Config
from imgfeat.metadata.contracts import hooks

log = logging.getLogger(__name__)

CORES_PER_CPU_WORKER = 4


def loader_workers(cfg: Config, ctx: DistContext, device: torch.device) -> int:
    """DataLoader workers of one rank: ``preprocess.num_workers`` >= 0 as given; -1 (auto) by device:

    - CUDA: one per core of this rank's share; the GPU computes, the CPU only decodes.
    - CPU: the model's intra-op threads already use every core of the rank, and decoding costs a few
      percent of a CPU forward. Each worker that wakes up preempts one of those threads, and one
      preempted thread stalls the whole operator. So one worker per ``CORES_PER_CPU_WORKER`` cores, at
      least one (which keeps decoder crashes contained; 0 would decode in the main process, uncontained).
    """
    if cfg.preprocess.num_workers >= 0:
        return cfg.preprocess.num_workers
    share = max(1, distributed.available_cores() // max(1, ctx.local_world_size))
    return share if device.type == "cuda" else max(1, share // CORES_PER_CPU_WORKER)


def probe_batch(cfg: Config, model: torch.nn.Module, device: torch.device, ctx: DistContext, stats: RankStats) -> None:
    """``featurize.batch_probe``: on CUDA, set ``preprocess.batch_size`` to the fastest per image of doubling sizes
    that fit (``tuning.probe_batch_size``; every rank takes rank 0's choice). On a CPU device: nothing."""
    if device.type != "cuda":
        log.info("featurize.batch_probe: CUDA only; batch size %d kept on %s", cfg.preprocess.batch_size, device)
        return
    result = tuning.probe_batch_size(lambda b: forward_seconds_per_image(model, device, cfg, b), cfg.preprocess.batch_size)
    best = ctx.broadcast(result.best)
    stats.batch_probe = {str(k): round(1.0 / v, 1) for k, v in result.seconds_per_image.items() if v > 0}
    cfg.preprocess.batch_size = best
    if cfg.featurize.compile:  # forget the shapes the probe compiled: the run compiles its one batch shape
        torch._dynamo.reset()


def run_featurize(cfg: Config, manifest: str, out: str, split: str | None = None,
                  tiles: bool = False) -> dict[str, Any] | None:
    """Featurize the manifest at ``manifest`` (``tiles``: its tile table, one feature row per tile, keyed by
    ``tile_id``) into ``out`` on this rank; returns the summary on rank 0."""
    t_start = time.perf_counter()
    ctx = init_distributed()
    hooks.install_from_env(ctx.rank)  # the test hook (IMGFEAT_HOOK); nothing without it
    try:
        device = resolve_device(cfg.featurize.device, ctx.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        threads = set_threads(ctx, device)
        stats = RankStats(rank=ctx.rank, threads=threads, device=str(device))
        # Tiles are boxes read from their images on the CPU (region reads), never whole files on the GPU.
        decode = "cpu" if tiles else resolve_decode_device(cfg.featurize.decode_device, device, cfg.preprocess)
        catalog: dict[int, assign_mod.ShardEntry] | None = None
        catalog_error = ""
        if ctx.is_main:
            try:
                catalog = assign_mod.shard_catalog(manifest, split=split, tiles=tiles)
            except ValueError as exc:
                if ctx.world_size == 1:
                    raise
                catalog_error = str(exc)  # told to every rank with the claim
        model, info = build_model(cfg.featurize, cfg.preprocess.size, device)
        if cfg.featurize.batch_probe:
            probe_batch(cfg, model, device, ctx, stats)
        fields = fp_mod.run_fingerprint(cfg, info)
        if tiles:  # a folder of tile features is never taken for one of image features, nor the reverse
            fields["rows"] = "tiles"
        if split:  # the shards hold this split's rows only: another split is another folder (and verify reads it)
            fields["split"] = split
        digest = fp_mod.digest(fields)
        digests = ctx.all_gather(digest)
        if len(set(digests)) > 1:
            raise ValueError(f"ranks disagree on the run fingerprint ({sorted(set(digests))}): different weights, "
                             "config or code on different nodes?")
        # Rank 0 claims the folder and sends (pending shards, or None with the error; the attempt id; the
        # manifest's shards) to all.
        claim: tuple[list[int] | None, str, str, dict[int, assign_mod.ShardEntry] | None] = (None, "", "", None)
        if ctx.is_main:
            attempt = uuid.uuid4().hex[:12]  # names this attempt's per-rank stats files
            try:
                if catalog is None:
                    raise ValueError(catalog_error)
                claim = (prepare_folder(cfg, out, fields, catalog), "", attempt, catalog)
            except ValueError as exc:
                claim = (None, str(exc), attempt, None)
        claimed, error, attempt, catalog = ctx.broadcast(claim)
        if claimed is None or catalog is None:
            raise ValueError(error)
        pending = claimed
        mine = assign_mod.assign(pending, ctx.rank, ctx.world_size)
        work = assign_mod.read_shard_rows(manifest, mine, split=split, catalog=catalog, tiles=tiles)
        log.info("rank %d: %d of %d pending shards (%d in the manifest), %d threads, %s",
                 ctx.rank, len(mine), len(pending), len(catalog), threads, device)
        progress: Progress | None = None
        if ctx.is_main and mine and not os.environ.get("IMGFEAT_NO_PROGRESS"):
            from tqdm import tqdm

            progress = tqdm(total=sum(len(work[s]) for s in mine), unit="img", desc=f"featurize rank 0/{ctx.world_size}",
                            disable=not log.isEnabledFor(logging.INFO))
        stats.workers = loader_workers(cfg, ctx, device)
        log.info("rank %d: %d decode workers", ctx.rank, stats.workers)
        computer = ShardComputer(cfg, model, device, out, digest, stats, stats.workers, progress, decode=decode)
        my_work = [work[s] for s in mine]
        if decode == "auto":
            if my_work:
                computer.warm_up()  # before timing the two decodes
            computer.choose_decode(my_work)  # no rows, or too few to measure: cpu
            if my_work:
                computer.start(my_work)
        elif my_work:
            computer.start(my_work)  # the first batches decode while the model warms up
            computer.warm_up()
        log.info("rank %d: decode on %s", ctx.rank, "the GPU (nvJPEG)" if computer.decode == "gpu" else "the CPU")
        stats.setup_s = time.perf_counter() - t_start
        t_loop = time.perf_counter()
        computer.run_shards(my_work)
        stats.loop_s = time.perf_counter() - t_loop
        if progress is not None:
            progress.close()
        stats.wall_s = time.perf_counter() - t_start
        return finish_run(ctx, cfg, out, catalog, digest, info, stats, computed=len(pending) > 0, attempt=attempt)
    finally:
        shutdown(ctx)
