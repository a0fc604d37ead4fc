"""Does the manifest job's driver and per-task memory stay flat as the number of files grows?

    .venv/bin/python bench/bench_manifest_scale.py [--sizes 250000 1000000] [--validations header full]
        [--master 'local[2]'] [--per-folder 1000] [--root /tmp/imgfeat-scale] [--results FILE]

For each size N: N distinct 16x16 greyscale JPEGs (quality 90) on local disk under
``ROOT/N/images/cNNN/`` (``--per-folder`` files per class folder, so the number of labels grows with N,
as in real collections), made once by 2 processes and reused while ``ROOT/N/READY`` exists. Each image
is four uniform 8x8 blocks whose grey levels are the four bytes of its index: the quantised DC terms
differ, so no two files have the same bytes (the run asserts 0 duplicates).
For each size and validation, ``python -m imgfeat.metadata SRC --out OUT --validation V --master M -q``
runs as a fresh subprocess (JVM start-up included in the wall time); every ``--interval`` s (psutil) the
RSS of the driver Python (the subprocess), of the JVM (its java child) and of every Python process under
the JVM (``pyspark.daemon`` and its forked workers) is sampled. The table gives each group's peak (for the
workers: the largest peak of any one process). Page cache as found (the files were just written or read).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent


def _write_folder(job: tuple[str, int, int]) -> int:
    """Write the images with indexes [start, stop) into ``folder``; one cv2.imencode per file."""
    folder, start, stop = job
    Path(folder).mkdir(parents=True, exist_ok=True)
    img = np.empty((16, 16), np.uint8)
    for i in range(start, stop):
        b = i.to_bytes(4, "big")
        img[:8, :8], img[:8, 8:], img[8:, :8], img[8:, 8:] = b[0], b[1], b[2], b[3]
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        with open(os.path.join(folder, f"img_{i:07d}.jpg"), "wb") as fh:
            fh.write(buf.tobytes())
    return stop - start


def make_images(root: Path, n: int, per_folder: int) -> tuple[Path, float]:
    """``root/n/images`` with ``n`` distinct JPEGs (reused when ``root/n/READY`` says so); seconds spent."""
    base = root / str(n)
    src, ready = base / "images", base / "READY"
    key = f"{n} files, {per_folder} per folder, 16x16 grey JPEG q90\n"
    if ready.exists() and ready.read_text() == key:
        return src, 0.0
    shutil.rmtree(base, ignore_errors=True)
    folders = (n + per_folder - 1) // per_folder
    width = max(3, len(str(folders - 1)))
    jobs = [(str(src / f"c{f:0{width}d}"), f * per_folder, min(n, (f + 1) * per_folder)) for f in range(folders)]
    t = time.perf_counter()
    with multiprocessing.Pool(2) as pool:
        written = sum(pool.imap_unordered(_write_folder, jobs))
    assert written == n, (written, n)
    ready.write_text(key)
    return src, time.perf_counter() - t


def _is_java(p: psutil.Process) -> bool:
    cmd = p.cmdline()
    return bool(cmd) and os.path.basename(cmd[0]) == "java"


def sample(driver: psutil.Process, peaks: dict[str, dict[int, int]]) -> None:
    """One sample: RSS of the driver, of each java process under it, of each Python process under a java."""
    try:
        peaks["driver"][driver.pid] = max(peaks["driver"].get(driver.pid, 0), driver.memory_info().rss)
        kids = driver.children(recursive=True)
    except psutil.Error:
        return
    for p in kids:
        try:
            if _is_java(p):
                group = "jvm"
            elif "python" in p.name() and any(_is_java(a) for a in p.parents()):
                group = "workers"
            else:
                continue
            rss = p.memory_info().rss
        except psutil.Error:  # gone between listing and reading
            continue
        peaks[group][p.pid] = max(peaks[group].get(p.pid, 0), rss)


def run_job(src: Path, out: Path, validation: str, master: str, interval: float) -> dict:
    """The manifest CLI in a subprocess, sampled; wall seconds, peaks (MB), samples and the job's summary."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "imgfeat.metadata", str(src), "--out", str(out), "--validation", validation,
           "--master", master, "-q"]
    peaks: dict[str, dict[int, int]] = {"driver": {}, "jvm": {}, "workers": {}}
    samples = 0
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    driver = psutil.Process(proc.pid)
    while proc.poll() is None:
        sample(driver, peaks)
        samples += 1
        time.sleep(interval)
    wall = time.perf_counter() - t
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if proc.returncode:
        sys.exit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{err[-4000:]}")
    summary = json.loads((out / "manifest_summary.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    mb = {g: max(v.values(), default=0) / 2**20 for g, v in peaks.items()}
    return {"wall": wall, "mb": mb, "workers_seen": len(peaks["workers"]), "samples": samples, "summary": summary}


def load_note() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[250_000, 1_000_000], help="numbers of files")
    parser.add_argument("--validations", nargs="+", default=["header", "full"], choices=["header", "full"])
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--per-folder", type=int, default=1000, help="files per class folder")
    parser.add_argument("--root", default="/tmp/imgfeat-scale", help="where the images are made (and kept)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between RSS samples")
    parser.add_argument("--results", default=str(REPO / "bench" / "RESULTS-scale-run.md"))
    args = parser.parse_args()
    command = shlex.join([".venv/bin/python", "bench/bench_manifest_scale.py", "--sizes", *map(str, args.sizes),
                          "--validations", *args.validations, "--master", args.master,
                          "--per-folder", str(args.per_folder), "--root", args.root])
    root = Path(args.root)
    made = []
    for n in args.sizes:
        src, secs = make_images(root, n, args.per_folder)
        made.append(f"{n:,} files {'made in %.0f s' % secs if secs else 'reused'}")
        print(f"{n:,} files in {src}: {made[-1]}", flush=True)
    load_start = load_note()
    rows = []
    for n in args.sizes:
        for v in args.validations:
            r = run_job(root / str(n) / "images", root / f"out-{n}-{v}", v, args.master, args.interval)
            s = r["summary"]
            assert s["total"] == n and s["by_status"].get("ok") == n, (n, s["by_status"])
            rows.append((n, v, r))
            print(f"{n:,} {v}: {r['wall']:.1f} s, peaks MB {r['mb']}, {r['samples']} samples", flush=True)
    load_end = load_note()

    mem = psutil.virtual_memory().total / 2**30
    first = root / str(args.sizes[0]) / "images"
    nbytes = os.path.getsize(min(min(first.iterdir()).iterdir()))
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, Python {platform.python_version()}, "
        f"Spark master {args.master}; load average (1/5/15 min) at start {load_start}, at end {load_end} "
        f"(other jobs may share the cores: wall times are noisy, memory peaks much less so).  ",
        f"Data: 16x16 greyscale JPEGs (about {nbytes} bytes each), all distinct, {args.per_folder:,} per class folder "
        f"on local disk ({'; '.join(made)}); "
        f"page cache as found. Each run: `python -m imgfeat.metadata SRC --out OUT --validation V --master "
        f"'{args.master}' -q` in a fresh process; RSS sampled every {args.interval} s with psutil.  ",
        "",
        "| files | validation | wall s | files/s | job s (summary) | driver Python peak MB | JVM peak MB "
        "| max Python worker peak MB | Python workers seen | samples |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, v, r in rows:
        mb, total = r["mb"], r["summary"].get("timings", {}).get("total_s", float("nan"))
        lines.append(f"| {n:,} | {v} | {r['wall']:.1f} | {n / r['wall']:,.0f} | {total:.1f} | {mb['driver']:.0f} "
                     f"| {mb['jvm']:.0f} | {mb['workers']:.0f} | {r['workers_seen']} | {r['samples']} |")
    lines.append("")
    lo, hi = min(args.sizes), max(args.sizes)
    if lo != hi:
        for v in args.validations:
            a = next(r["mb"] for n, vv, r in rows if n == lo and vv == v)
            b = next(r["mb"] for n, vv, r in rows if n == hi and vv == v)
            ratio = {g: b[g] / a[g] if a[g] else float("nan") for g in b}
            flat = ratio["driver"] <= 1.2 and ratio["workers"] <= 1.2
            lines.append(f"Ratio {hi:,} / {lo:,} files, `{v}`: driver Python {ratio['driver']:.2f}x, max Python worker "
                         f"{ratio['workers']:.2f}x (JVM {ratio['jvm']:.2f}x); goal: driver and per-worker peaks within "
                         f"1.2x: {'met' if flat else 'NOT met'}.  ")
    text = "\n".join(lines)
    print(text)
    Path(args.results).write_text(f"# Manifest at 250k and 1M files (local disk)\n\n{text}\n")
    print(f"written to {args.results}")


if __name__ == "__main__":
    main()
