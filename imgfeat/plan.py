"""``imgfeat plan SRC...``: size a run before starting it.

A bounded breadth-first walk of the sources (at most ``--max-list`` entries) counts files and bytes, or
extrapolates them when the walk stops early, and picks a sample spread over the folders walked. On the
sample it times, on this machine, the manifest check (``header`` and ``full``), decode + resize and the
configured model's forward on CPU (unless ``--images-per-s`` is given), and the PCA's moments
accumulation at the model's feature width. From those it prints, per stage, the time on ``--nodes`` and
the nodes needed within ``--target-hours``. Every figure says whether it was counted, estimated, given
or measured.

Sizing rule: nodes = ceil(items x seconds per item / (target seconds x items a node does at once)),
where a node does ``--cores`` items at once (``--gpus-per-node`` for featurize on GPUs).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec

from imgfeat.metadata.cli_common import add_common_args, build_config
from imgfeat.metadata.config import Config, FeaturizeConfig
from imgfeat.metadata.config_flags import add_config_flags, config_overrides
from imgfeat.metadata.manifest.listing import Entry, check_source

log = logging.getLogger(__name__)

T = TypeVar("T")
PLAN_FLAGS = ("manifest.validation", "featurize.model", "featurize.weights", "featurize.precision", "preprocess.batch_size")
"""Config keys offered as flags (every other key: ``--set``)."""


@dataclass(frozen=True)
class Figure:
    """A number and where it comes from: ``counted``, ``estimated``, ``given`` or ``measured``."""

    value: float
    label: str


@dataclass
class Level:
    """What the walk found in the folders it listed at one depth."""

    folders: int = 0
    files: int = 0
    bytes: int = 0
    subfolders: int = 0


@dataclass
class Walk:
    """The result of the bounded walk: per-depth counts, folders left unlisted, the per-folder picks."""

    levels: dict[int, Level] = field(default_factory=dict)
    pending: dict[int, int] = field(default_factory=dict)
    """Folders found but not listed, by depth."""
    picks: list[list[Entry]] = field(default_factory=list)
    """Up to ``per_folder`` files of each listed folder, in walk order."""
    entries: int = 0
    partial: tuple[str, int, int, int] | None = None
    """(folder, depth, files, bytes) of a folder the walk stopped inside of (not in ``levels``)."""

    @property
    def complete(self) -> bool:
        return not self.pending and self.partial is None

    @property
    def files(self) -> int:
        return sum(lv.files for lv in self.levels.values()) + (self.partial[2] if self.partial else 0)

    @property
    def bytes(self) -> int:
        return sum(lv.bytes for lv in self.levels.values()) + (self.partial[3] if self.partial else 0)


@dataclass
class StageEstimate:
    """One stage: items, cost per item (in ``unit``-seconds), items a node does at once, time and nodes."""

    stage: str
    items: Figure
    seconds_per_item: Figure
    unit: str
    at_once: int
    seconds: Figure
    nodes_needed: int
    note: str = ""


# ---- pure estimate math ------------------------------------------------------------------------------

def nodes_needed(items: float, seconds_per_item: float, target_s: float, at_once: int) -> int:
    """The sizing rule: ceil(items x seconds per item / (target seconds x items a node does at once))."""
    if target_s <= 0 or at_once < 1:
        raise ValueError(f"target seconds must be > 0 and items at once >= 1, got {target_s} and {at_once}")
    if items <= 0:
        return 0
    return max(1, math.ceil(round(items * seconds_per_item / (target_s * at_once), 9)))


def stage_seconds(items: float, seconds_per_item: float, nodes: int, at_once: int) -> float:
    """Wall seconds for ``items`` on ``nodes`` nodes doing ``at_once`` items each (perfect spreading)."""
    return items * seconds_per_item / (nodes * at_once)


def extrapolate(levels: dict[int, Level], pending: dict[int, int]) -> tuple[float, float]:
    """(files, bytes) expected in the ``pending`` folders, each like the listed folders at its depth.

    Pending folders at a depth with no listed folder take the nearest listed depth above. Their expected
    subfolders are followed down while listed folders show what that depth holds; below the deepest
    listed depth nothing is known and nothing more is added.
    """
    listed = sorted(d for d, lv in levels.items() if lv.folders)
    if not pending or not listed:
        return 0.0, 0.0
    deepest = listed[-1]
    expected: dict[int, float] = {d: float(n) for d, n in pending.items()}
    files = size = 0.0
    for depth in range(min(expected), max(max(expected), deepest) + 1):
        count = expected.get(depth, 0.0)
        ref = level_for(levels, depth)
        if not count or ref is None:
            continue
        files += count * ref.files / ref.folders
        size += count * ref.bytes / ref.folders
        if depth < deepest:
            expected[depth + 1] = expected.get(depth + 1, 0.0) + count * ref.subfolders / ref.folders
    return files, size


def level_for(levels: dict[int, Level], depth: int) -> Level | None:
    """The listed level at ``depth``, else the nearest one above it (None when nothing was listed)."""
    listed = [d for d, lv in levels.items() if lv.folders and d <= depth]
    return levels[max(listed)] if listed else None


def collection_figures(walk: Walk, files_given: int | None = None,
                       bytes_given: int | None = None) -> tuple[Figure, Figure]:
    """(files, bytes) of the whole collection: given, else counted (walk finished), else estimated."""
    if walk.complete:
        files, size = Figure(walk.files, "counted"), Figure(walk.bytes, "counted")
    else:
        extra_files, extra_bytes = extrapolate(walk.levels, walk.pending)
        ref = level_for(walk.levels, walk.partial[1]) if walk.partial else None
        if walk.partial and ref is not None:  # the folder read in part holds at least a mean folder of its depth
            extra_files += max(0.0, ref.files / ref.folders - walk.partial[2])
            extra_bytes += max(0.0, ref.bytes / ref.folders - walk.partial[3])
        files = Figure(round(walk.files + extra_files), "estimated")
        size = Figure(round(walk.bytes + extra_bytes), "estimated")
    if files_given is not None:
        mean = walk.bytes / walk.files if walk.files else 0.0
        files = Figure(files_given, "given")
        size = Figure(round(files_given * mean), "estimated")
    if bytes_given is not None:
        size = Figure(bytes_given, "given")
    return files, size


def spread_sample(groups: Sequence[Sequence[T]], n: int) -> list[T]:
    """Up to ``n`` items, round-robin over ``groups`` (one each per round); a round with more groups than
    picks left takes evenly spaced groups, so the sample spans all of them."""
    out: list[T] = []
    depth = 0
    while len(out) < n:
        live = [g for g in groups if len(g) > depth]
        if not live:
            break
        need = n - len(out)
        if len(live) > need:
            live = [live[int(i * len(live) / need)] for i in range(need)]
        out.extend(g[depth] for g in live)
        depth += 1
    return out


def featurize_cost(cores: int, gpus_per_node: int, images_per_s: float | None, forward_core_s: float | None,
                   decode_core_s: float) -> tuple[Figure, str, int, str]:
    """(seconds per image, unit, images a node does at once, note) for featurize.

    CPU: core-seconds of the forward (measured here) plus decode, ``cores`` at once, or ``cores`` / the
    given node rate. GPUs: 1 / the given per-GPU rate, ``gpus_per_node`` at once, unless the node's cores
    decode fewer images per second than its GPUs take (then decode sets the pace)."""
    if gpus_per_node > 0:
        if images_per_s is None:
            raise ValueError("--gpus-per-node needs --images-per-s: the images/s of one such GPU, measured there")
        decode_rate = cores / decode_core_s if decode_core_s > 0 else math.inf
        if decode_rate < gpus_per_node * images_per_s:
            note = (f"decode-bound: {cores} cores decode ~{decode_rate:,.0f} images/s, "
                    f"less than {gpus_per_node} GPUs x {images_per_s:g}")
            return Figure(gpus_per_node / decode_rate, "estimated"), "GPU", gpus_per_node, note
        return Figure(1.0 / images_per_s, "given"), "GPU", gpus_per_node, ""
    if images_per_s is not None:
        return Figure(cores / images_per_s, "given"), "core", cores, f"{images_per_s:g} images/s per node given"
    if forward_core_s is None:
        raise ValueError("featurize: no measured or given speed")
    return Figure(forward_core_s + decode_core_s, "measured"), "core", cores, "CPU forward + decode, scaled linearly with cores"


def plan_stages(files: Figure, images: Figure, check_s: Figure, featurize: tuple[Figure, str, int, str], pca_row_s: Figure,
                nodes: int, cores: int, target_s: float) -> list[StageEstimate]:
    """The manifest, featurize and pca estimates on ``nodes`` nodes, and the nodes each needs for ``target_s``."""
    feat_s, feat_unit, feat_at_once, feat_note = featurize
    rows = [("manifest", files, check_s, "core", cores, "CPU of the per-file check; listing and storage waits not included"),
            ("featurize", images, feat_s, feat_unit, feat_at_once, feat_note),
            ("pca", images, pca_row_s, "core", cores, "moments accumulation only; shard reads, join, eigh, projection not included")]
    return [StageEstimate(stage, items, spi, unit, at_once,
                          Figure(stage_seconds(items.value, spi.value, nodes, at_once), "estimated"),
                          nodes_needed(items.value, spi.value, target_s, at_once), note)
            for stage, items, spi, unit, at_once, note in rows]


# ---- the bounded walk --------------------------------------------------------------------------------

def _list_folder(folder: str, budget: int) -> tuple[list[tuple[str, int]], list[str], bool]:
    """(files with sizes, subfolders, whole folder read) of one folder, reading at most ``budget`` local entries.

    Remote folders are listed whole (one fsspec ``ls``)."""
    files: list[tuple[str, int]] = []
    subs: list[str] = []
    if folder.startswith("file://"):
        try:
            with os.scandir(folder[len("file://"):]) as it:
                for n, e in enumerate(it):
                    if n >= budget:
                        return files, subs, False
                    try:
                        if e.is_dir():
                            subs.append("file://" + e.path)
                        else:
                            files.append(("file://" + e.path, e.stat().st_size))
                    except OSError:
                        files.append(("file://" + e.path, 0))  # broken link etc.: still a manifest row
        except OSError as exc:
            log.warning("cannot list %s: %s", folder, exc)
        return files, subs, True
    fs, path = fsspec.core.url_to_fs(folder)
    scheme = folder.split("://", 1)[0]
    try:
        listing = fs.ls(path, detail=True)
    except OSError as exc:
        log.warning("cannot list %s: %s", folder, exc)
        return files, subs, True
    for info in listing:
        uri = f"{scheme}://{info['name']}"
        if info.get("type") == "directory":
            if info["name"].rstrip("/") != path.rstrip("/"):
                subs.append(uri)
        else:
            files.append((uri, int(info.get("size") or 0)))
    return files, subs, True


def walk_sources(roots: Sequence[str], max_list: int, per_folder: int, seed: int = 0) -> Walk:
    """Breadth-first over the normalized ``roots``, one depth at a time in a seeded random order (so the folders
    listed at the depth where the walk stops are a fair draw of that depth), reading at most ``max_list``
    entries in all; keeps up to ``per_folder`` files of each folder (a seeded random pick)."""
    walk = Walk()
    rng = random.Random(seed)
    seen = {os.path.realpath(r[len("file://"):]) for r in roots if r.startswith("file://")}
    current, depth = [(r, r) for r in roots], 0
    while current:
        rng.shuffle(current)
        found: list[tuple[str, str]] = []
        for n, (root, folder) in enumerate(current):
            if walk.entries >= max_list:
                walk.pending[depth] = len(current) - n
                break
            files, subs, whole = _list_folder(folder, max_list - walk.entries)
            walk.entries += len(files) + len(subs)
            kept = len(found)
            for sub in subs:
                if sub.startswith("file://"):
                    real = os.path.realpath(sub[len("file://"):])
                    if real in seen:  # a symlink loop or a second way into a folder already found
                        continue
                    seen.add(real)
                found.append((root, sub))
            files.sort()
            walk.picks.append([Entry(root, uri, size, None) for uri, size in rng.sample(files, min(per_folder, len(files)))])
            if not whole:
                walk.partial = (folder, depth, len(files), sum(size for _, size in files))
                walk.pending[depth] = len(current) - n - 1
                break
            level = walk.levels.setdefault(depth, Level())
            level.folders += 1
            level.files += len(files)
            level.bytes += sum(size for _, size in files)
            level.subfolders += len(found) - kept
        if walk.entries >= max_list or walk.partial:
            if found:
                walk.pending[depth + 1] = len(found)
            break
        current, depth = found, depth + 1
    walk.pending = {d: n for d, n in walk.pending.items() if n}
    return walk


# ---- measurements on this machine --------------------------------------------------------------------

def measure_checks(entries: Sequence[Entry], cfg: Config) -> dict[str, tuple[float, list[str]]]:
    """Per validation (``header``, ``full``): CPU seconds per file of ``check_entry`` and each file's status."""
    from imgfeat.metadata.manifest.checks import check_entry

    d = cfg.decode
    out = {}
    for validation in ("header", "full"):
        c0 = time.process_time()
        rows = [check_entry(e, validation, d.max_bytes, d.max_pixels, tuple(d.formats), max_scans=d.max_jpeg_scans)
                for e in entries]
        out[validation] = ((time.process_time() - c0) / len(entries), [r["status"] for r in rows])
    return out


def _weights_for_timing(fcfg: FeaturizeConfig) -> tuple[FeaturizeConfig, str]:
    """``fcfg``, or a copy with random init when its torchvision weights are not in the offline cache."""
    from imgfeat.featurize.weights import NO_WEIGHTS, cached_checkpoint, seed_cache_from_packages, weights_enum

    if fcfg.model_path or fcfg.weights_path or fcfg.weights in NO_WEIGHTS:
        return fcfg, fcfg.weights_path or fcfg.weights or "none"
    enum = weights_enum(fcfg.model, fcfg.weights)
    target = cached_checkpoint(enum)
    if os.path.exists(target) or seed_cache_from_packages(enum, target):
        return fcfg, fcfg.weights
    log.info("%s weights %s are not in the torch cache: timing with random init (same speed)", fcfg.model, fcfg.weights)
    return dataclasses.replace(fcfg, weights="none"), "random init (not in the torch cache)"


def feature_dim(fcfg: FeaturizeConfig) -> int:
    """The model's feature width without loading weights (the input of the removed classifier when possible)."""
    import torch

    if not fcfg.model_path and not fcfg.layer:
        from torchvision.models import get_model, list_models

        if fcfg.model not in list_models():
            raise ValueError(f"featurize.model: {fcfg.model!r} is not a torchvision model; see torchvision.models.list_models()")
        linears = [m for m in get_model(fcfg.model, weights=None).modules() if isinstance(m, torch.nn.Linear)]
        if linears:
            return int(linears[-1].in_features)
    from imgfeat.featurize.model import build_model

    _, info = build_model(dataclasses.replace(fcfg, weights="none", weights_path="", compile=False), 64, torch.device("cpu"))
    return info.dim


def measure_featurize(cfg: Config, uris: Sequence[str], batches: int, model: bool) -> dict[str, Any]:
    """Decode + resize CPU seconds per image through ``ManifestDataset`` and, when ``model``, the configured
    model's forward on CPU: one warm-up batch, then ``batches`` timed batches (the sample repeated as needed)."""
    import torch

    from imgfeat.featurize.model import autocast, build_model
    from imgfeat.preprocess.dataset import ManifestDataset
    from imgfeat.preprocess.transforms import BatchNormalizer

    bs = cfg.preprocess.batch_size
    dataset = ManifestDataset([{"image_id": str(i), "path": u} for i, u in enumerate(uris)], cfg.preprocess, limits=cfg.decode)
    count = bs * (batches + 1) if model else min(bs, len(uris))
    order = [i % len(uris) for i in range(count)]
    c0 = time.process_time()
    loaded = [dataset.__getitems__(order[k:k + bs]) for k in range(0, count, bs)]
    out: dict[str, Any] = {"decode_core_s": (time.process_time() - c0) / count,
                           "decode_failed": sum(int((~b.ok).sum()) for b in loaded)}
    if not model:
        return out
    fcfg, weights = _weights_for_timing(cfg.featurize)
    device = torch.device("cpu")
    net, info = build_model(fcfg, cfg.preprocess.size, device)
    normalize = BatchNormalizer(device, fcfg.channels_last)
    with torch.inference_mode(), autocast(device, fcfg.precision):
        net(normalize(loaded[0].images))  # warm-up: kernel choice and allocation
        t0 = time.perf_counter()
        for batch in loaded[1:]:
            net(normalize(batch.images))
        wall = time.perf_counter() - t0
    threads = torch.get_num_threads()
    images = batches * bs
    out.update(dim=info.dim, weights=weights, threads=threads, images=images, images_per_s=images / wall,
               forward_core_s=wall * threads / images)
    return out


def measure_pca_row(dim: int, rows: int = 4096) -> float:
    """Core-seconds per row of the PCA's moments accumulation (``Moments.add`` + settle, float32 rows of
    width ``dim``, one BLAS thread, a shard's worth of rows at a time)."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    from imgfeat.metadata.pca.fit import Moments

    x = np.random.default_rng(0).standard_normal((rows, dim), dtype=np.float32)
    with threadpool_limits(limits=1, user_api="blas"):
        Moments().add(x[:256]).settle()  # warm-up
        mom = Moments()
        t0 = time.process_time()
        for i in range(0, rows, 512):
            mom.add(x[i:i + 512])
        mom.settle()
        return (time.process_time() - t0) / rows


# ---- the command -------------------------------------------------------------------------------------

def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``plan`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "plan", help="estimate the time and nodes a run over SRC needs, from a sample timed on this machine",
        description="Walk SRC breadth-first (bounded), sample files over its folders, time the manifest check, "
        "featurize and the PCA accumulation on this machine, and print the time per stage on --nodes and the nodes "
        "needed within --target-hours. Each figure is labelled counted, estimated, given or measured.")
    p.add_argument("sources", nargs="+", metavar="SRC", help="source folders or URLs (as for imgfeat manifest)")
    p.add_argument("--sample", type=int, default=300, metavar="N", help="files to sample (default 300)")
    p.add_argument("--per-folder", type=int, default=20, metavar="K", help="at most K sampled files per folder (default 20)")
    p.add_argument("--max-list", type=int, default=20000, metavar="N",
                   help="entries the walk reads at most; past it files and bytes are estimated (default 20000)")
    p.add_argument("--files", type=int, metavar="N", help="number of files in the collection (e.g. from an S3 inventory)")
    p.add_argument("--bytes", type=int, metavar="B", help="bytes in the collection")
    p.add_argument("--images-per-s", type=float, metavar="X",
                   help="featurize speed measured elsewhere: images/s per GPU with --gpus-per-node, else per node; "
                        "skips the model timing here")
    p.add_argument("--batches", type=int, default=3, metavar="N", help="timed featurize batches (default 3, after one warm-up)")
    p.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes of the cluster (default 1)")
    p.add_argument("--cores", type=int, metavar="C", help="cores per node (default: this machine's)")
    p.add_argument("--gpus-per-node", type=int, default=0, metavar="G", help="GPUs per node for featurize (needs --images-per-s)")
    p.add_argument("--target-hours", type=float, default=24.0, metavar="H", help="finish each stage within H hours (default 24)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    add_config_flags(p, PLAN_FLAGS)
    add_common_args(p)
    p.set_defaults(func=run)
    return p


def _check_args(args: argparse.Namespace) -> None:
    for name, low in (("sample", 1), ("per_folder", 1), ("max_list", 1), ("batches", 1), ("nodes", 1), ("gpus_per_node", 0)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    for name in ("cores", "files", "bytes"):
        value = getattr(args, name)
        if value is not None and value < (1 if name == "cores" else 0):
            raise ValueError(f"--{name} must be >= {1 if name == 'cores' else 0}, got {value}")
    if args.target_hours <= 0:
        raise ValueError(f"--target-hours must be > 0, got {args.target_hours}")
    if args.images_per_s is not None and args.images_per_s <= 0:
        raise ValueError(f"--images-per-s must be > 0, got {args.images_per_s}")
    if args.gpus_per_node and args.images_per_s is None:
        raise ValueError("--gpus-per-node needs --images-per-s: the images/s of one such GPU, measured there")


def make_plan(args: argparse.Namespace, cfg: Config) -> dict[str, Any]:
    """Walk, sample, measure and estimate; the plan as a JSON-ready dict."""
    from imgfeat.preprocess.loader import available_cores

    roots = [check_source(s) for s in args.sources]
    walk = walk_sources(roots, args.max_list, args.per_folder)
    if not walk.files:
        if walk.complete:
            raise ValueError(f"no files under {', '.join(args.sources)}")
        raise ValueError(f"the walk read --max-list {args.max_list} entries and found only folders: raise --max-list")
    files, size = collection_figures(walk, args.files, args.bytes)
    sample = spread_sample(walk.picks, args.sample)
    checks = measure_checks(sample, cfg)
    statuses = checks[cfg.manifest.validation][1]
    ok_frac = statuses.count("ok") / len(sample)
    decodable = [e.path for e, s in zip(sample, checks["full"][1]) if s == "ok"]
    if not ok_frac:
        raise ValueError(f"no image among the {len(sample)} sampled files ({dict(Counter(statuses))})")
    if not decodable:
        raise ValueError(f"none of the {len(sample)} sampled files decodes (statuses under full validation: "
                         f"{dict(Counter(checks['full'][1]))})")
    exact = files.label == "counted" and len(sample) == walk.files
    images = Figure(round(files.value * ok_frac), "counted" if exact else "estimated")
    feat = measure_featurize(cfg, decodable, args.batches, model=args.images_per_s is None)
    dim = feat.get("dim") or feature_dim(cfg.featurize)
    pca_s = measure_pca_row(dim)
    here = available_cores()
    cores = args.cores or here
    cost = featurize_cost(cores, args.gpus_per_node, args.images_per_s, feat.get("forward_core_s"), feat["decode_core_s"])
    check_s = Figure(checks[cfg.manifest.validation][0], "measured")
    stages = plan_stages(files, images, check_s, cost, Figure(pca_s, "measured"), args.nodes, cores, args.target_hours * 3600)
    notes = [f"sample spread over the {len(walk.picks)} folders walked" + ("" if not walk.pending else
             f" (breadth-first, a random draw of the last depth; {sum(walk.pending.values()):,} more folders found, not listed)")]
    if walk.partial:
        how = ("taken as at least a mean folder of its depth" if level_for(walk.levels, walk.partial[1])
               else "no other folder to compare: files and bytes are a lower bound")
        notes.append(f"the walk stopped inside {walk.partial[0]} (read in part, {how}): pass --files N for an exact figure")
    return {
        "sources": roots,
        "walk": {"entries": walk.entries, "folders_listed": len(walk.picks), "folders_unlisted": sum(walk.pending.values()),
                 "complete": walk.complete},
        "collection": {"files": dataclasses.asdict(files), "bytes": dataclasses.asdict(size), "images": dataclasses.asdict(images)},
        "sample": {"files": len(sample), "ok": statuses.count("ok"), "statuses": dict(Counter(statuses)),
                   "validation": cfg.manifest.validation},
        "machine": {"cores": here, "featurize_device": "cpu"},
        "measured": {
            "check_header_cpu_s_per_file": checks["header"][0], "check_full_cpu_s_per_file": checks["full"][0],
            "decode_resize_cpu_s_per_image": feat["decode_core_s"], "size": cfg.preprocess.size,
            "featurize": None if args.images_per_s is not None else {
                k: feat[k] for k in ("images_per_s", "threads", "images", "weights", "forward_core_s")},
            "model": cfg.featurize.model_path or cfg.featurize.model, "precision": cfg.featurize.precision,
            "feature_dim": dim, "pca_cpu_s_per_row": pca_s},
        "cluster": {"nodes": args.nodes, "cores": cores, "cores_label": "given" if args.cores else "measured",
                    "gpus_per_node": args.gpus_per_node, "images_per_s": args.images_per_s, "target_hours": args.target_hours},
        "stages": [dataclasses.asdict(s) for s in stages],
        "notes": notes,
    }


def _num(v: float) -> str:
    return f"{v:,.0f}"


def _bytes(v: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if v < 1000 or unit == "TB":
            return f"{v:,.0f} {unit}" if unit == "B" else f"{v:,.1f} {unit}"
        v /= 1000
    return f"{v:.1f} PB"  # pragma: no cover


def _duration(s: float) -> str:
    if s < 0.1:
        return "< 0.1 s"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h" if s < 48 * 3600 else f"{s / 86400:.1f} d"


def _per_item(s: float) -> str:
    return f"{s * 1000:.3g} ms" if s < 1 else f"{s:.3g} s"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as plain text: collection, measurements, then one table row per stage."""
    col, m, cl, w = plan["collection"], plan["measured"], plan["cluster"], plan["walk"]
    stopped = "" if w["complete"] else f" (stopped at --max-list; {w['folders_unlisted']:,} folders not listed)"
    lines = [f"imgfeat plan: {len(plan['sources'])} source(s), walked {_num(w['entries'])} entries in "
             f"{w['folders_listed']} folders{stopped}",
             f"collection: {_num(col['files']['value'])} files ({col['files']['label']}), {_bytes(col['bytes']['value'])} "
             f"({col['bytes']['label']}), {_num(col['images']['value'])} images ok ({col['images']['label']}: "
             f"{plan['sample']['ok']} of {plan['sample']['files']} sampled files ok under {plan['sample']['validation']})",
             "",
             f"measured on this machine ({plan['machine']['cores']} cores, {plan['sample']['files']} sampled files):"]
    f = m["featurize"]
    if f is None:
        feat = (f"not timed: {cl['images_per_s']:g} images/s per {'GPU' if cl['gpus_per_node'] else 'node'} (given)")
    else:
        feat = (f"{f['images_per_s']:.1f} images/s on {f['threads']} CPU threads = {_per_item(f['forward_core_s'])} core-time "
                f"per image (measured: {f['images']} images; weights: {f['weights']})")
    rows = [("manifest check, header", f"{_per_item(m['check_header_cpu_s_per_file'])} CPU per file (measured)"),
            ("manifest check, full", f"{_per_item(m['check_full_cpu_s_per_file'])} CPU per file (measured)"),
            (f"decode + resize to {m['size']} px", f"{_per_item(m['decode_resize_cpu_s_per_image'])} CPU per image (measured)"),
            (f"featurize {m['model']} {m['precision']}", feat),
            (f"pca moments, d = {m['feature_dim']}",
             f"{_per_item(m['pca_cpu_s_per_row'])} CPU per row (measured: numpy accumulation, one BLAS thread)")]
    width = max(len(k) for k, _ in rows)
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    lines += [
              "",
              f"estimate on {cl['nodes']} node(s) x {cl['cores']} cores ({cl['cores_label']})"
              + (f" x {cl['gpus_per_node']} GPUs" if cl["gpus_per_node"] else "") + f", target {cl['target_hours']:g} h:"]
    table = [["stage", "items", "per item", "at once/node", f"time on {cl['nodes']} node(s)", f"nodes for {cl['target_hours']:g} h"]]
    for s in plan["stages"]:
        table.append([s["stage"], f"{_num(s['items']['value'])} ({s['items']['label']})",
                      f"{_per_item(s['seconds_per_item']['value'])} {s['unit']}-time ({s['seconds_per_item']['label']})",
                      f"{s['at_once']} {s['unit']}s", f"{_duration(s['seconds']['value'])} ({s['seconds']['label']})",
                      str(s["nodes_needed"])])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    lines += [""] + [f"note: {s['stage']}: {s['note']}" for s in plan["stages"] if s["note"]]
    lines += [f"note: {n}" for n in plan["notes"]]
    lines.append("sizing rule: nodes = ceil(items x seconds per item / (target seconds x items a node does at once))")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the subcommand; bad options and sources raise ValueError (one line from the CLI)."""
    _check_args(args)
    cfg = build_config(args, config_overrides(args))
    plan = make_plan(args, cfg)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0
