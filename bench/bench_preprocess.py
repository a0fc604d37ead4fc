"""Benchmark of the preprocess stage on Fruits-360 (../shared/data/fruits360-100).

Measures, in one process tree on this machine:
- the raw decode ceiling: read + cv2.imdecode, no resize, one process (images/s per core);
- our DataLoader (ManifestDataset + make_loader): decode + resize to 224 and to 64, uint8 batches;
- the PIL baseline: torchvision ImageFolder + transforms (Resize, CenterCrop, ToTensor, Normalize — the
  usual recipe — and a uint8 variant with PILToTensor), same worker count and batch size;
- ``run_prep`` of every image to 64x64 HDF5, against a PIL ImageFolder export writing the same shards;
  and ``run_prep`` to 20x20 (the seed pipeline's size).

Each loader pass includes worker start-up; each figure is the best of ``--repeat`` passes.
Run: ``.venv/bin/python bench/bench_preprocess.py [--quick]``; writes bench/RESULTS-preprocess.md.

Real-size mode (``--realsize N [--min-side 240 --max-side 2000]``): the same loader comparison (ours
vs the PIL ImageFolder loaders, same workers and batch) on N real-size JPEGs made once from the
Fruits-360 photos by ``sample.realsize`` and cached under ``--cache`` (/tmp), once per JPEG
reduced-decode mode of ``[preprocess] reduced_decode`` (``--modes``: the default, all, or a list); then,
in one process and one thread, the CPU time per image of decode vs resize for each contender. Each
figure is the median of ``--repeat`` (default 3) interleaved rounds; ratios are medians of the per-round
ratios. It writes (or replaces) only the "Preprocess on real-size photos" subsection of the results
file; the 100x100 run keeps that subsection when it rewrites the rest.
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

FRUITS = Path(os.environ.get("IMGFEAT_SHARED", REPO.parent / "shared")) / "data" / "fruits360-100"


class Rate:
    """Best wall-clock images/s and best images per CPU-second (all processes: this one and its
    finished children) over the passes seen. On a shared machine the wall figure moves with other
    people's load; the CPU figure is images/s per fully used core and barely does."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def add(self, n: int, wall_s: float, cpu_s: float) -> None:
        self.wall = max(self.wall, n / wall_s)
        self.cpu = max(self.cpu, n / cpu_s if cpu_s > 0 else 0.0)


def _cpu_seconds() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def one_pass(fn, n: int, rate: Rate) -> None:
    gc.collect()
    c0, t0 = _cpu_seconds(), time.perf_counter()
    got = fn()
    gc.collect()  # joins the DataLoader workers, so their CPU time is counted
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    assert got == n, (got, n)
    rate.add(n, wall, cpu)


def best_rate(fn, n: int, repeat: int) -> Rate:
    rate = Rate()
    for _ in range(repeat):
        one_pass(fn, n, rate)
    return rate


def interleaved(fns: dict, n: int, repeat: int) -> dict[str, Rate]:
    """Best rates of each contender, their passes taken in turn so that load from other processes on
    the machine falls on all of them alike."""
    rates = {name: Rate() for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            one_pass(fn, n, rates[name])
    return rates


def raw_decode(paths: list[str]) -> int:
    import numpy as np

    from imgfeat.metadata.contracts.cv2_env import import_cv2

    cv2 = import_cv2()
    for p in paths:
        with open(p, "rb") as fh:
            img = cv2.imdecode(np.frombuffer(fh.read(), np.uint8), cv2.IMREAD_COLOR)
        assert img is not None
    return len(paths)


def our_loader(rows: list[dict], size: int, workers: int, batch: int, mode: str | bool | None = None) -> int:
    """One pass of imgfeat's loader; ``mode``: ``preprocess.reduced_decode`` (None: the config default)."""
    from imgfeat.metadata.config import PreprocessConfig
    from imgfeat.preprocess.dataset import ManifestDataset
    from imgfeat.preprocess.loader import make_loader

    # A bool mode is an older config's (see reduced_decode_modes); PreprocessConfig still maps it, outside its str type.
    cfg = (PreprocessConfig(batch_size=batch) if mode is None
           else PreprocessConfig(batch_size=batch, reduced_decode=mode))  # type: ignore[arg-type]
    ds = ManifestDataset(rows, cfg, size=size, resize_shorter=256 if size == 224 else size)
    n = 0
    for images, idx, ok, _ in make_loader(ds, cfg, num_workers=workers, persistent_workers=False):
        assert bool(ok.all())
        n += len(idx)
    return n


def pil_dataset(files: list[str], size: int, uint8: bool):
    import torch
    from PIL import Image
    from torchvision import transforms as T

    shorter = 256 if size == 224 else size
    tail = [T.PILToTensor()] if uint8 else [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    tf = T.Compose([T.Resize(shorter), T.CenterCrop(size), *tail])

    class Folder(torch.utils.data.Dataset):
        # torchvision.datasets.ImageFolder's loading (pil_loader + transform) over our file list, which
        # spans both Training/ and Test/ folders.
        def __len__(self) -> int:
            return len(files)

        def __getitem__(self, i: int):
            with open(files[i], "rb") as fh:
                img = Image.open(fh).convert("RGB")
            return tf(img), 0

    return Folder()


def pil_loader(files: list[str], size: int, workers: int, batch: int, uint8: bool) -> int:
    import torch

    loader = torch.utils.data.DataLoader(pil_dataset(files, size, uint8), batch_size=batch, num_workers=workers)
    return sum(len(y) for _, y in loader)


def pil_export(files: list[str], out: str, size: int, workers: int, batch: int, rows_per_shard: int) -> int:
    """The baseline export: PIL ImageFolder loader -> uint8 HDF5 shards (lzf), same layout as prep."""
    import h5py
    import numpy as np
    import torch

    loader = torch.utils.data.DataLoader(pil_dataset(files, size, True), batch_size=batch, num_workers=workers)
    buf: list[np.ndarray] = []
    n, shard = 0, 0

    def flush() -> None:
        nonlocal buf, shard
        arr = np.concatenate(buf).transpose(0, 2, 3, 1)
        with h5py.File(os.path.join(out, f"part-{shard:05d}.h5"), "w") as h5:
            h5.create_dataset("images", data=arr, chunks=(5, size, size, 3), compression="lzf")
            h5.create_dataset("labels", data=np.zeros(len(arr), np.int32))
        buf, shard = [], shard + 1

    for x, _ in loader:
        buf.append(x.numpy())
        n += len(x)
        if sum(len(b) for b in buf) >= rows_per_shard:
            flush()
    if buf:
        flush()
    return n


def our_prep(manifest: str, out: str, size: int, workers: int) -> int:
    from imgfeat.metadata.config import Config
    from imgfeat.preprocess.export import run_prep

    cfg = Config()
    cfg.prep.size = size
    cfg.preprocess.num_workers = workers
    summary = run_prep(cfg, manifest, out, overwrite=True)
    return summary["written"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="use 1,500 images and one pass each")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=None, help="passes per contender (default 2; 3 with --realsize)")
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS-preprocess.md"))
    rs = ap.add_argument_group("real-size photos (sample.realsize)")
    rs.add_argument("--realsize", type=int, default=0, metavar="N",
                    help="run the loader comparison on N real-size JPEGs instead of the 100x100 photos")
    rs.add_argument("--min-side", type=int, default=240)
    rs.add_argument("--max-side", type=int, default=2000)
    rs.add_argument("--seed", type=int, default=0)
    rs.add_argument("--sizes", default="224,64", help="output sides, comma-separated (default 224,64)")
    rs.add_argument("--modes", default="all",
                    help="reduced_decode modes to run: 'default' (the config default only), 'all' (default), "
                         "or a comma-separated list")
    rs.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "imgfeat-bench-realsize"),
                    help="folder the generated photos are cached in (one subfolder per N/sides/seed)")
    args = ap.parse_args()
    if not FRUITS.exists():
        print(f"skipped: {FRUITS} is absent (../shared holds the benchmark data; see shared/README.md)")
        return 0
    if args.realsize:
        return realsize_main(args)
    if args.repeat is None:
        args.repeat = 2
    os.environ.setdefault("TQDM_DISABLE", "1")
    from helpers import write_manifest

    files = sorted(str(p) for p in FRUITS.glob("*/*/*.jpg"))
    if args.quick:
        files = files[:: max(1, len(files) // 1500)][:1500]
        args.repeat = 1
    n, w = len(files), args.workers
    rows = [{"image_id": str(i), "path": "file://" + p, "label_index": 0} for i, p in enumerate(files)]
    for p in files:  # page cache warm for every contender
        Path(p).read_bytes()
    # Import everything before timing: the first pass must not pay for importing torch.
    import h5py  # noqa: F401,E401
    import torch
    import torchvision
    from PIL import Image  # noqa: F401

    import imgfeat.preprocess.export  # noqa: F401,E401
    import imgfeat.preprocess.loader
    load_start = os.getloadavg()[0]
    results: list[tuple[str, Rate, str]] = []

    def record(name: str, rate: Rate, note: str = "") -> Rate:
        results.append((name, rate, note))
        print(f"{name:<58} {rate.wall:>8.0f} img/s  {rate.cpu:>8.0f} img/CPU-s  {note}", flush=True)
        return rate

    raw = record("raw read + cv2.imdecode, 1 process, no resize (ceiling)", best_rate(lambda: raw_decode(files), n, args.repeat),
                 "no resize")
    ratios = {}
    for size in (224, 64):
        rates = interleaved({
            "ours": lambda: our_loader(rows, size, w, args.batch),
            "pil": lambda: pil_loader(files, size, w, args.batch, False),
            "pil8": lambda: pil_loader(files, size, w, args.batch, True),
        }, n, args.repeat)
        ours = record(f"ours: DataLoader decode+resize {size}, {w} workers", rates["ours"], "uint8 NCHW batches")
        pil = record(f"PIL ImageFolder {size} (ToTensor+Normalize), {w} workers", rates["pil"], "float32 batches")
        pil8 = record(f"PIL ImageFolder {size} (PILToTensor), {w} workers", rates["pil8"], "uint8 batches")
        ratios[size] = (ours, pil, pil8)

    tmp = tempfile.mkdtemp(prefix="bench-prep-")
    try:
        manifest = os.path.join(tmp, "manifest_out")
        write_manifest(Path(manifest), [{"path": p, "label": Path(p).parent.name} for p in files], rows_per_shard=1000)
        os.makedirs(os.path.join(tmp, "pil64"), exist_ok=True)
        rates = interleaved({
            "ours": lambda: our_prep(manifest, os.path.join(tmp, "p64"), 64, w),
            "pil": lambda: pil_export(files, os.path.join(tmp, "pil64"), 64, w, args.batch, 2048),
        }, n, args.repeat)
        prep64 = record(f"ours: run_prep {n} images -> 64x64 HDF5 (lzf), {w} workers", rates["ours"], "")
        pilprep = record(f"PIL ImageFolder export -> 64x64 HDF5 (lzf), {w} workers", rates["pil"], "")
        prep20 = record(f"ours: run_prep {n} images -> 20x20 HDF5 (lzf), {w} workers",
                        best_rate(lambda: our_prep(manifest, os.path.join(tmp, "p20"), 20, w), n, args.repeat),
                        "the seed's size; 1/4-scale JPEG decode")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    cmd = "$ .venv/bin/python bench/bench_preprocess.py" + "".join(" " + a for a in sys.argv[1:])
    load = os.getloadavg()
    lines = [
        "# Preprocess benchmark", "",
        "```", cmd, "```", "",
        f"Machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores available, Python {platform.python_version()}; "
        f"load average {load_start:.1f} at the start, {load[0]:.1f} at the end (other processes share these cores). "
        f"Images: {n} Fruits-360 JPEGs (100x100). Workers {w}, batch {args.batch}, best of {args.repeat} pass(es), "
        "contenders' passes interleaved; each loader pass includes worker start-up.", "",
        "*images/s* is wall-clock throughput (moves with the machine's load); *img per CPU-s* is images per "
        "second of CPU time summed over the main process and its workers, i.e. images/s per fully used core.", "",
        "| pipeline | images/s | img per CPU-s (per core) | note |", "|---|---:|---:|---|",
    ]
    for name, rate, note in results:
        lines.append(f"| {name} | {rate.wall:,.0f} | {rate.cpu:,.0f} | {note} |")
    lines += ["", "| target | ours / PIL ToTensor+Normalize (per core; wall) | ours / PIL uint8 (per core; wall) "
              "| ours per core / raw-decode ceiling |", "|---|---:|---:|---:|"]
    for size, (ours, pil, pil8) in ratios.items():
        lines.append(f"| {size} px | {ours.cpu / pil.cpu:.2f}x; {ours.wall / pil.wall:.2f}x | "
                     f"{ours.cpu / pil8.cpu:.2f}x; {ours.wall / pil8.wall:.2f}x | {ours.cpu / raw.cpu:.0%} |")
    lines += ["", f"Prep to 64x64 HDF5: ours {prep64.cpu:,.0f} img per CPU-s ({prep64.wall:,.0f} img/s wall) vs the PIL "
              f"export {pilprep.cpu:,.0f} ({pilprep.wall:,.0f}): {prep64.cpu / pilprep.cpu:.2f}x per core. "
              f"At 20x20: {prep20.cpu:,.0f} img per CPU-s, so 67,000 images take {67000 / prep20.cpu:.1f} CPU-seconds "
              f"({67000 / prep20.cpu / w:.1f} s on {w} fully used cores)."]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    write_results(Path(args.results), text, realsize=False)
    return 0


# --- real-size photos --------------------------------------------------------------------------------

REALSIZE_HEADING = "### Preprocess on real-size photos"


def write_results(path: Path, text: str, realsize: bool) -> None:
    """Write the 100x100 part (``realsize=False``) or the real-size subsection of the results file,
    keeping the other part as it is."""
    old = path.read_text() if path.exists() else ""
    cut = old.find("\n" + REALSIZE_HEADING + "\n")
    head, tail = (old, "") if cut < 0 else (old[: cut + 1], old[cut + 1 :])
    if realsize:
        tail = text
        head = head or "# Preprocess benchmark\n"
    else:
        head = text
    path.write_text(head.rstrip("\n") + "\n" + ("\n" + tail.rstrip("\n") + "\n" if tail else ""))


def realsize_photos(args) -> list[str]:
    """The cached photos for (N, sides, seed), made with sample.realsize the first time."""
    import json

    folder = Path(args.cache) / f"n{args.realsize}-side{args.min_side}-{args.max_side}-seed{args.seed}"
    marker = folder / "_complete.json"
    if marker.exists():
        return [str(folder / name) for name in json.loads(marker.read_text())["files"]]
    from sample.realsize import make_realsize_photos

    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    t0 = time.perf_counter()
    paths = make_realsize_photos(FRUITS, work, args.realsize, args.min_side, args.max_side, seed=args.seed)
    (work / "_complete.json").write_text(json.dumps({"files": [Path(p).name for p in paths]}))
    try:
        os.rename(work, folder)
    except OSError:  # made meanwhile by another run: use that one
        shutil.rmtree(work, ignore_errors=True)
    print(f"generated {len(paths)} photos into {folder} in {time.perf_counter() - t0:.0f} s", flush=True)
    return realsize_photos(args)


def reduced_decode_modes() -> tuple[list[str | bool], str | bool]:
    """(every value ``[preprocess] reduced_decode`` accepts, the default), whichever form the config has
    (a mode string such as off/safe/fast, or the older bool)."""
    import dataclasses

    import imgfeat.metadata.config as mc

    default = {f.name: f for f in dataclasses.fields(mc.PreprocessConfig)}["reduced_decode"].default
    if not isinstance(default, (str, bool)):
        raise TypeError(f"PreprocessConfig.reduced_decode: expected a str or bool default, got {default!r}")
    if isinstance(default, bool):
        return [True, False], default
    declared = next((v for k, v in vars(mc).items() if "REDUCED" in k.upper() and isinstance(v, (tuple, list))), None)
    candidates = list(declared or ("off", "safe", "fast"))
    if default not in candidates:
        candidates.insert(0, default)
    modes: list[str | bool] = []
    for m in candidates:
        try:
            mc.PreprocessConfig(reduced_decode=m).validate()
        except (ValueError, TypeError):
            continue
        modes.append(m)
    return modes, default


def mode_name(mode) -> str:
    return ("on" if mode else "off") if isinstance(mode, bool) else str(mode)


def _median(values: list[float]) -> float:
    import statistics

    return statistics.median(values) if values else float("nan")


def _pass_rates(fn, n: int) -> tuple[float, float]:
    """One pass: (images/s wall, images per CPU-second of this process and its finished children)."""
    gc.collect()
    c0, t0 = _cpu_seconds(), time.perf_counter()
    got = fn()
    gc.collect()
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    assert got == n, (got, n)
    return n / wall, (n / cpu if cpu > 0 else 0.0)


def breakdown(files: list[str], sizes: list[int], modes: list) -> dict:
    """One process, one thread, one pass: CPU seconds summed over the files, per step.

    ours: read + guards + decode (``decode_rgb``; JPEG reduced-size decode per mode), then the resize +
    crop (``resize_images``); the decoded shorter side gives the DCT scale used. PIL: read + open +
    convert("RGB") (full decode, as ImageFolder's pil_loader), then Resize + CenterCrop, then
    ToTensor + Normalize."""
    import torch
    from PIL import Image
    from torchvision import transforms as T

    from imgfeat.metadata.config import DecodeConfig, PreprocessConfig
    from imgfeat.metadata.contracts.cv2_env import import_cv2
    from imgfeat.preprocess.dataset import decode_rgb
    from imgfeat.preprocess.transforms import resize_images

    torch.set_num_threads(1)
    import_cv2(threads=1)
    clock = time.process_time
    out: dict = {}
    from imgfeat.metadata.manifest.checks import read_bytes
    from imgfeat.preprocess.decode import check_header

    limits, guard = DecodeConfig(), 0.0
    for p in files:  # the part of ours' decode that is not OpenCV: read through fsspec + the header guards
        t0 = clock()
        check_header(read_bytes("file://" + p, limits.max_bytes), limits)
        guard += clock() - t0
    out["guard"] = {"guard": guard}
    for size in sizes:
        shorter = 256 if size == 224 else size
        for mode in modes:
            cfg = PreprocessConfig(reduced_decode=mode)
            dec = res = 0.0
            scales: dict[int, int] = {}
            for p in files:
                t0 = clock()
                rgb = decode_rgb("file://" + p, cfg, size, "resize_shorter+center_crop", shorter)
                t1 = clock()
                resize_images(rgb[None], size, "resize_shorter+center_crop", cfg.interpolation, shorter)
                t2 = clock()
                dec, res = dec + t1 - t0, res + t2 - t1
                orig = _dims_from_name(p)
                scale = round(min(orig) / min(rgb.shape[:2])) if orig else 0
                scales[scale] = scales.get(scale, 0) + 1
            out[("ours", size, mode_name(mode))] = {"decode": dec, "resize": res, "scales": scales}
    tfs = {size: (T.Compose([T.Resize(256 if size == 224 else size), T.CenterCrop(size)]),
                  T.Compose([T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]))
           for size in sizes}
    acc = {size: {"decode": 0.0, "resize": 0.0, "tensor": 0.0} for size in sizes}
    pil_scales: dict[int, int] = {}
    for p in files:
        t0 = clock()
        with open(p, "rb") as fh:
            img = Image.open(fh).convert("RGB")
        dec = clock() - t0
        orig = _dims_from_name(p)
        scale = round(min(orig) / min(img.size)) if orig else 0
        pil_scales[scale] = pil_scales.get(scale, 0) + 1
        for size, (resize, tail) in tfs.items():
            t1 = clock()
            small = resize(img)
            t2 = clock()
            tail(small)
            t3 = clock()
            acc[size]["decode"] += dec
            acc[size]["resize"] += t2 - t1
            acc[size]["tensor"] += t3 - t2
    for size in sizes:
        out[("pil", size, "")] = {**acc[size], "scales": pil_scales}
    return out


def _dims_from_name(path: str) -> tuple[int, int] | None:
    """(width, height) from sample.realsize's file name ``NNNNN_<kind>_<W>x<H>.jpg``."""
    try:
        w, h = Path(path).stem.rsplit("_", 1)[1].split("x")
        return int(w), int(h)
    except (IndexError, ValueError):
        return None


def realsize_main(args) -> int:
    import statistics

    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.repeat is None:
        args.repeat = 3
    sizes = [int(v) for v in args.sizes.split(",") if v.strip()]
    all_modes, default = reduced_decode_modes()
    if args.modes == "default":
        modes = [default]
    elif args.modes == "all":
        modes = all_modes
    else:
        wanted = [m.strip() for m in args.modes.split(",") if m.strip()]
        modes = [m for m in all_modes if mode_name(m) in wanted]
        if len(modes) != len(wanted):
            print(f"error: --modes {args.modes}: accepted modes are {', '.join(mode_name(m) for m in all_modes)}",
                  file=sys.stderr)
            return 2
    files = realsize_photos(args)
    n, w = len(files), args.workers
    rows = [{"image_id": str(i), "path": "file://" + p, "label_index": 0} for i, p in enumerate(files)]
    total_bytes = sum(len(Path(p).read_bytes()) for p in files)  # page cache warm for every contender
    dims = [d for d in map(_dims_from_name, files) if d]
    shorter_sides = sorted(min(d) for d in dims)
    mpix = sorted(d[0] * d[1] / 1e6 for d in dims)
    kinds: dict[str, int] = {}
    for p in files:
        kind = Path(p).stem.split("_")[1] if Path(p).stem.count("_") >= 2 else "?"
        kinds[kind] = kinds.get(kind, 0) + 1
    import h5py  # noqa: F401,E401
    import torch
    import torchvision
    from PIL import Image  # noqa: F401

    import imgfeat.preprocess.loader  # noqa: F401

    def load_now() -> str:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())

    load_start = load_now()
    print(f"{n} real-size photos, load average {load_start}; modes {[mode_name(m) for m in modes]} "
          f"(default {mode_name(default)}), sizes {sizes}, {args.repeat} round(s)", flush=True)
    # rates[(contender, size)] = list of (wall, cpu) per round, contenders interleaved within a round.
    rates: dict[tuple[str, int], list[tuple[float, float]]] = {}
    rounds: list[dict] = []
    for r in range(args.repeat):
        for size in sizes:
            fns: dict[str, Callable[[], int]] = {
                f"ours:{mode_name(m)}": functools.partial(our_loader, rows, size, w, args.batch, m) for m in modes}
            fns["pil"] = functools.partial(pil_loader, files, size, w, args.batch, False)
            fns["pil8"] = functools.partial(pil_loader, files, size, w, args.batch, True)
            for name, fn in fns.items():
                rate = _pass_rates(fn, n)
                rates.setdefault((name, size), []).append(rate)
                print(f"round {r + 1} {size:>4} px {name:<12} {rate[0]:>7.0f} img/s {rate[1]:>7.0f} img/CPU-s "
                      f"(load {load_now()})", flush=True)
        rounds.append(breakdown(files, sizes, modes))
        print(f"round {r + 1} breakdown done (load {load_now()})", flush=True)
    load_end = load_now()
    # Median over the rounds of each step's CPU seconds; the decoded scales are the same every round.
    parts: dict[Any, dict[str, Any]] = {key: {k: (_median([rd[key][k] for rd in rounds]) if k != "scales" else v) for k, v in val.items()}
             for key, val in rounds[0].items()}

    def med(name: str, size: int, k: int) -> float:
        return _median([v[k] for v in rates[(name, size)]])

    def ratio(a: str, b: str, size: int, k: int) -> float:
        return _median([x[k] / y[k] for x, y in zip(rates[(a, size)], rates[(b, size)])])

    def rng(name: str, size: int) -> str:
        cpu = [v[1] for v in rates[(name, size)]]
        return f"{min(cpu):,.0f}-{max(cpu):,.0f}"

    cmd = "$ .venv/bin/python bench/bench_preprocess.py" + "".join(" " + a for a in sys.argv[1:])
    lines = [
        REALSIZE_HEADING, "",
        "```", cmd, "```", "",
        f"Data: {n} real-size JPEGs made by `sample.realsize` from the Fruits-360 photos (seed {args.seed}; "
        f"{', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}), both sides in {args.min_side}..{args.max_side} px: "
        f"shorter side min/median/max {shorter_sides[0]}/{statistics.median(shorter_sides):.0f}/{shorter_sides[-1]} px, "
        f"{statistics.median(mpix):.2f} megapixels median ({mpix[-1]:.2f} max), {total_bytes / n / 1e3:.0f} kB per file "
        f"on average; cached in `{Path(args.cache)}`, page cache warm. "
        f"Machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores available, Python {platform.python_version()}; "
        f"load average (1/5/15 min) {load_start} at the start, {load_end} at the end "
        "(other people's processes share these cores: the wall figures move with them; the per-CPU-second figures "
        "and the ratios, taken within one round, much less, but contention still touches both sides).", "",
        f"Loaders: workers {w}, batch {args.batch}, {args.repeat} rounds; in each round every contender runs one "
        "full pass (worker start-up included), in turn. Figures are medians over the rounds (range of img per "
        "CPU-s in brackets); ratios are medians of the per-round ratios. ours = `ManifestDataset` + `make_loader` "
        "(uint8 batches) with `[preprocess] reduced_decode` set to each mode; PIL = ImageFolder's loader "
        "(open + convert) + torchvision Resize(256 for 224, else the size) + CenterCrop, then ToTensor + Normalize "
        "(float32) or PILToTensor (uint8).", "",
        "| size | pipeline | reduced_decode | images/s | img per CPU-s (range) | ours / PIL ToTensor+Normalize (per core; wall) "
        "| ours / PIL uint8 (per core; wall) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for size in sizes:
        for m in modes:
            name = f"ours:{mode_name(m)}"
            tag = mode_name(m) + (" (default)" if m == default else "")
            lines.append(
                f"| {size} px | ours: DataLoader decode+resize | {tag} | {med(name, size, 0):,.0f} | "
                f"{med(name, size, 1):,.0f} ({rng(name, size)}) | "
                f"**{ratio(name, 'pil', size, 1):.2f}x**; {ratio(name, 'pil', size, 0):.2f}x | "
                f"{ratio(name, 'pil8', size, 1):.2f}x; {ratio(name, 'pil8', size, 0):.2f}x |")
        lines.append(f"| {size} px | PIL ImageFolder (ToTensor+Normalize) | - | {med('pil', size, 0):,.0f} | "
                     f"{med('pil', size, 1):,.0f} ({rng('pil', size)}) | 1 | |")
        lines.append(f"| {size} px | PIL ImageFolder (PILToTensor) | - | {med('pil8', size, 0):,.0f} | "
                     f"{med('pil8', size, 1):,.0f} ({rng('pil8', size)}) | | 1 |")
    lines += [
        "", "Where the CPU goes: one process, one thread, one pass over the same files per round (after that "
        "round's loader passes), CPU milliseconds per image, median over the rounds (ours: read + guards + OpenCV "
        "decode, then resize + crop; PIL: read + open + convert, then Resize + CenterCrop, then ToTensor + "
        "Normalize). The loaders add worker start-up, batching and transfer on top. The last column is measured: "
        "source shorter side / decoded shorter side.", "",
        "| size | pipeline | reduced_decode | decode ms | resize ms | to-tensor ms | decode share | img per CPU-s "
        "(in-process) | ours / PIL ToTensor+Normalize (in-process) | JPEG decoded at 1/1, 1/2, 1/4, 1/8 (files) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for size in sizes:
        pb = parts[("pil", size, "")]
        pil_tot = pb["decode"] + pb["resize"] + pb["tensor"]
        for m in modes:
            b = parts[("ours", size, mode_name(m))]
            tot = b["decode"] + b["resize"]
            sc = b["scales"]
            lines.append(f"| {size} px | ours | {mode_name(m)}{' (default)' if m == default else ''} | "
                         f"{b['decode'] / n * 1e3:.2f} | {b['resize'] / n * 1e3:.2f} | - | {b['decode'] / tot:.0%} | "
                         f"{n / tot:,.0f} | {pil_tot / tot:.2f}x | {', '.join(str(sc.get(k, 0)) for k in (1, 2, 4, 8))} |")
        sc = pb["scales"]
        lines.append(f"| {size} px | PIL ImageFolder | - | {pb['decode'] / n * 1e3:.2f} | {pb['resize'] / n * 1e3:.2f} | "
                     f"{pb['tensor'] / n * 1e3:.2f} | {pb['decode'] / pil_tot:.0%} | {n / pil_tot:,.0f} | 1 | "
                     f"{', '.join(str(sc.get(k, 0)) for k in (1, 2, 4, 8))} |")
    lines += ["", f"Of ours' decode figure, {parts['guard']['guard'] / n * 1e3:.2f} ms per image is the read (fsspec) + "
              "the header guards (format, dimensions, scan count, whole-file check); the rest is OpenCV's decode "
              "and the BGR -> RGB conversion."]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    write_results(Path(args.results), text, realsize=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
