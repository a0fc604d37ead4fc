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
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

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

    from metadata.cv2_env import import_cv2

    cv2 = import_cv2()
    for p in paths:
        with open(p, "rb") as fh:
            img = cv2.imdecode(np.frombuffer(fh.read(), np.uint8), cv2.IMREAD_COLOR)
        assert img is not None
    return len(paths)


def our_loader(rows: list[dict], size: int, workers: int, batch: int) -> int:
    from metadata.config import PreprocessConfig
    from preprocess.dataset import ManifestDataset
    from preprocess.loader import make_loader

    cfg = PreprocessConfig(batch_size=batch)
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
    buf, n, shard = [], 0, 0

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
    from metadata.config import Config
    from preprocess.export import run_prep

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
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS-preprocess.md"))
    args = ap.parse_args()
    if not FRUITS.exists():
        print(f"skipped: {FRUITS} is absent (../shared holds the benchmark data; see shared/README.md)")
        return 0
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
    import h5py, torch, torchvision  # noqa: F401,E401
    from PIL import Image  # noqa: F401

    import preprocess.export, preprocess.loader  # noqa: F401,E401
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
    Path(args.results).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
