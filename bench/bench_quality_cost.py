"""What the data-quality signals and the near-duplicate search cost the manifest job: on versus off, same script.

    .venv/bin/python bench/bench_quality_cost.py [--data fruits,realsize[,camera]] [--copies 8] [--repeats 2]
        [--modes full,header] [--master local[2]] [--size 500x375] [--camera-size 1360x1020] [--quality 90]
        [--work DIR] [--skip-cpu] [--results PATH]

Data sets, each ``--copies`` files per photo of the Fruits-360 folder of ../shared (7,424 photos: 59,392
files at 8 copies):

* ``fruits``: the 100x100 photos replicated (``bench_manifest.replicate``: each copy's bytes differ by a
  trailer, so copies are not exact duplicates, but they are pixel-identical: every photo is a near-duplicate
  group of ``--copies`` files, and frames of one rotating fruit chain those into big groups: the worst case
  for the search). The signals' decode of a 100 px JPEG is a full-size grey decode (the 128 px floor of
  ``image_signals.reduced_gray_flag``), where ``full`` validation alone decodes at 1/8.
* ``realsize``: "real data, real sizes": every photo made ``--size`` (500x375 by default) and re-encoded as
  JPEG quality ``--quality``, each copy a different view of it (``make_views``: a random 4:3 crop of 70-100 %
  of the frame, mirrored or not, turned upside down or not, its colour balance and brightness changed), so
  copies are mostly not near-duplicates of each other. The signals' decode of a 500x375 JPEG is at 1/2
  (250x188), where ``full`` validation alone decodes at 1/8.
* ``camera``: the same views at ``--camera-size`` (1360x1020 by default: a shorter side of at least 1,017 px,
  so the signals' decode is the 1/8 one, 170x128, that ``full`` validation does anyway: the case where only
  the signals and the search are extra). Not in the default ``--data`` (1.4 MP JPEGs: ~10 GB at 8 copies).

For each data set and validation mode (``--modes``): ``run_manifest`` in one Spark session with ``[manifest]
near_duplicates = "off"`` and ``"flag"``, alternating, from a cold page cache, ``--repeats`` runs each (the
machine is shared: the load average is recorded before every run). Reported: the median total wall time of
each, their ratio against the goal (issue "Data quality at Spark scale": flag / off <= 1.25), and where the
time goes, from the job's own ``timings`` (``check_s``: the check job; ``quality_s``: the quality summary
and the near-duplicate search with its summary, in the organize task up to ``job.ONE_TASK_ROWS`` rows, else
Spark jobs before organize; ``organize_s`` without it, and the rest). Then the CPU per file of the check's
parts outside Spark (one process, warm cache): the decode of each mode, ``image_signals``, and the whole
``check_entry``. Writes bench/RESULTS-quality-cost.md (``--results`` to change it).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_manifest import FRUITS, cold_cache, replicate  # noqa: E402

GOAL = 1.25


def _view(args: tuple[str, str, int, int, int, int]) -> int:
    """One file of ``make_views`` (a worker's job): the ``copy``-th view of photo ``src`` written to ``dst``."""
    import numpy as np

    from imgfeat.metadata.contracts.cv2_env import decoder_cv2

    src, dst, index, copy, width, quality = args
    cv2 = decoder_cv2()
    height = width * 3 // 4
    img = cv2.imdecode(np.fromfile(src, np.uint8), cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    rng = np.random.default_rng([index, copy])
    if copy == 0:  # the photo itself: the largest centred 4:3 crop
        cw, ch = w, min(h, w * 3 // 4)
        x0, y0 = 0, (h - ch) // 2
    else:
        cw = max(8, int(round(w * rng.uniform(0.7, 1.0))))
        ch = min(h, cw * 3 // 4)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    view = img[y0:y0 + ch, x0:x0 + cw]
    if copy:
        if rng.random() < 0.5:
            view = view[:, ::-1]
        if rng.random() < 0.3:
            view = view[::-1]
        gains = rng.uniform(0.85, 1.15, 3).astype(np.float32)
        view = np.clip(view.astype(np.float32) * gains + np.float32(rng.uniform(-12, 12)), 0, 255).astype(np.uint8)
    view = cv2.resize(np.ascontiguousarray(view), (width, height), interpolation=cv2.INTER_CUBIC)
    ok, buf = cv2.imencode(".jpg", view, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    Path(dst).write_bytes(buf.tobytes())
    return 1


def make_views(dst: Path, copies: int, width: int = 500, quality: int = 90, workers: int = 2) -> int:
    """``copies`` real-size views (``width`` x ``width * 3 / 4`` JPEGs) of every Fruits-360 photo under ``dst``,
    in the photos' folders (class labels kept). The same arguments give the same bytes."""
    from multiprocessing import get_context

    photos = sorted(FRUITS.rglob("*.jpg"))
    jobs = [(str(p), str(dst / p.relative_to(FRUITS).parent / f"v{c}_{p.name}"), i, c, width, quality)
            for c in range(copies) for i, p in enumerate(photos)]
    with get_context("spawn").Pool(workers) as pool:
        return sum(pool.imap_unordered(_view, jobs, chunksize=256))


def cpu_per_file(folder: Path, sample: int = 1500, reps: int = 5) -> dict[str, float]:
    """CPU microseconds per file (median of ``reps``, process_time, one thread, warm cache) of the check's
    parts on the first ``sample`` files of ``folder``: each mode's decode, ``image_signals`` and the whole
    ``check_entry``."""
    import numpy as np

    from imgfeat.metadata.contracts.cv2_env import decoder_cv2
    from imgfeat.metadata.contracts.sniff import parse_header
    from imgfeat.metadata.manifest.checks import check_entry
    from imgfeat.metadata.manifest.image_signals import gray_of, image_signals, reduced_gray_flag
    from imgfeat.metadata.manifest.listing import Entry

    cv2 = decoder_cv2()
    files = sorted(folder.rglob("*.jpg"))[:sample]
    blobs = [f.read_bytes() for f in files]
    infos = [parse_header(b) for b in blobs]
    flags = [reduced_gray_flag(i.width, i.height, i.format) for i in infos]
    grays = [gray_of(cv2.imdecode(np.frombuffer(b, np.uint8), f)) for b, f in zip(blobs, flags)]
    entries = [Entry(root=folder.as_uri(), path=f.as_uri(), size=len(b), mtime=0.0) for f, b in zip(files, blobs)]

    def cpu(fn: Any) -> float:
        fn()
        ts = []
        for _ in range(reps):
            t = time.process_time()
            fn()
            ts.append(time.process_time() - t)
        return statistics.median(ts) / len(files) * 1e6

    def check(mode: str, signals: bool) -> None:
        for e, b in zip(entries, blobs):
            check_entry(e, mode, 1 << 26, 100_000_000, ("jpeg", "png"), b, signals=signals)

    return {
        "decode of full validation (grey, 1/8)": cpu(
            lambda: [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8) for b in blobs]),
        f"decode of the signals ({'x'.join(map(str, grays[0].shape[::-1]))} grey)": cpu(
            lambda: [cv2.imdecode(np.frombuffer(b, np.uint8), f) for b, f in zip(blobs, flags)]),
        "image_signals (hash + 4 signals)": cpu(lambda: [image_signals(g) for g in grays]),
        "check_entry, header, off": cpu(lambda: check("header", False)),
        "check_entry, full, off": cpu(lambda: check("full", False)),
        "check_entry, flag (signals' decode + signals)": cpu(lambda: check("full", True)),
    }


def _load() -> tuple[float, float, float]:
    return os.getloadavg()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="fruits,realsize")
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", default="full,header")
    ap.add_argument("--size", default="500x375", help="realsize: width x height (4:3)")
    ap.add_argument("--camera-size", default="1360x1020", help="camera: width x height (4:3)")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--work", default=None, help="folder for the generated data (default: a temporary one, removed)")
    ap.add_argument("--skip-cpu", action="store_true", help="leave out the CPU-per-file table")
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS-quality-cost.md"))
    args = ap.parse_args()
    if not FRUITS.exists():
        sys.exit(f"needs the Fruits-360 photos at {FRUITS}")
    width, camera_width = int(args.size.split("x")[0]), int(args.camera_size.split("x")[0])
    datasets = [d.strip() for d in args.data.split(",") if d.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    from imgfeat.metadata.config import load_config
    from imgfeat.metadata.manifest import image_signals as sig_mod
    from imgfeat.metadata.manifest import job as job_mod

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="imgfeat-quality-"))
    keep = args.work is not None
    sections: list[str] = []
    verdicts: list[str] = []
    cache = ""
    try:
        warm = work / "warm" / "a"
        warm.mkdir(parents=True, exist_ok=True)
        for photo in sorted(FRUITS.rglob("*.jpg"))[:50]:
            (warm / photo.name).write_bytes(photo.read_bytes())
        # Spark's start-up and first jobs are charged to neither side.
        job_mod.run_manifest(load_config(None, {"spark": {"master": args.master}, "manifest": {"near_duplicates": "flag"}}),
                             [str(warm.parent)], str(work / "warm-out"))
        for name in datasets:
            src = work / name
            t = time.perf_counter()
            if src.exists() and any(src.iterdir()):
                n = sum(1 for _ in src.rglob("*.jpg"))
                made = "reused"
            else:
                n = (replicate(src, args.copies) if name == "fruits" else
                     make_views(src, args.copies, width if name == "realsize" else camera_width, args.quality))
                made = f"made in {time.perf_counter() - t:.0f} s"
            size_mb = sum(f.stat().st_size for f in src.rglob("*.jpg")) / 2**20
            print(f"{name}: {n:,} files, {size_mb:,.0f} MB ({made})", flush=True)
            rows, breakdown = [], []
            for mode in modes:
                runs: dict[str, list[dict[str, Any]]] = {"off": [], "flag": []}
                for _ in range(args.repeats):
                    for near in ("off", "flag"):
                        cfg = load_config(None, {"spark": {"master": args.master},
                                                 "manifest": {"validation": mode, "near_duplicates": near}})
                        cache = cold_cache()
                        load = _load()
                        out = work / f"out_{name}_{mode}_{near}"
                        summary = job_mod.run_manifest(cfg, [str(src)], str(out))
                        shutil.rmtree(out, ignore_errors=True)
                        tm = dict(summary["timings"])
                        tm.update({"load": load[0], "near": summary.get("near_duplicates") or {}})
                        runs[near].append(tm)
                        print(f"  {mode} {near}: {tm['total_s']:.1f} s (check {tm['check_s']:.1f}, quality "
                              f"{tm.get('quality_s', 0):.1f}, organize {tm.get('organize_s', 0):.1f}); load {load[0]:.1f}",
                              flush=True)

                def med(near: str, key: str) -> float:
                    return statistics.median(float(r.get(key) or 0.0) for r in runs[near])

                off, on = med("off", "total_s"), med("flag", "total_s")
                ratio = on / off
                found = runs["flag"][-1]["near"]
                loads = ", ".join(f"{r['load']:.1f}" for near in ("off", "flag") for r in runs[near])
                each = {near: ", ".join(f"{r['total_s']:.1f}" for r in runs[near]) for near in runs}
                rows.append(f"| {mode} | {n:,} | {off:.1f} ({each['off']}) | {on:.1f} ({each['flag']}) | **{ratio:.2f}** "
                            f"| {'yes' if ratio <= GOAL else 'no'} | {found.get('groups', 0):,} groups, "
                            f"{found.get('members', 0):,} files (distance {found.get('distance', '?')}) | {loads} |")
                verdicts.append(f"{name} / {mode}: flag / off = {ratio:.2f}: the {GOAL} goal is "
                                f"{'met' if ratio <= GOAL else 'NOT met'}")
                other = lambda near: med(near, "total_s") - sum(med(near, k) for k in ("check_s", "quality_s", "organize_s"))  # noqa: E731
                for near in ("off", "flag"):
                    breakdown.append(
                        f"| {mode} | {near} | {med(near, 'total_s'):.1f} | {med(near, 'check_s'):.1f} "
                        f"| {med(near, 'quality_s'):.1f} | {med(near, 'organize_s'):.1f} | {other(near):.1f} |")
                extra = on - off
                deltas = [med("flag", "check_s") - med("off", "check_s"), med("flag", "quality_s"),
                          med("flag", "organize_s") - med("off", "organize_s"), other("flag") - other("off")]
                breakdown.append(f"| {mode} | flag - off | {extra:.1f} | "
                                 + " | ".join(f"{v:.1f} ({100 * v / extra:.0f} %)" if extra > 0 else f"{v:.1f}"
                                              for v in deltas) + " |")
            cpu = {} if args.skip_cpu else cpu_per_file(src)
            sections += [
                f"### {name}: {n:,} files, {size_mb:,.0f} MB",
                "",
                ("The Fruits-360 100x100 photos x{c} (copies pixel-identical: every photo a near-duplicate group of "
                 "{c} files, and frames of one fruit chain those together).".format(c=args.copies)) if name == "fruits" else
                (f"Each Fruits-360 photo as {args.copies} views of "
                 f"{args.size if name == 'realsize' else args.camera_size} px, JPEG quality {args.quality} "
                 "(view 0: the photo's centred 4:3 crop upscaled; the others: a random 70-100 % crop, mirrored "
                 "half the time, upside down 30 % of the time, colour gains 0.85-1.15 and brightness +-12)."
                 + (" At this size the signals' decode is the 1/8 one that `full` validation does anyway."
                    if name == "camera" else "")),
                "",
                "| validation | files | off: s (runs) | flag: s (runs) | flag / off | <= 1.25? | found (`flag`) "
                "| load avg at each run start |",
                "|---|---:|---:|---:|---:|---|---|---|",
                *rows,
                "",
                "Where the time goes (medians, seconds; `flag - off`: the share of the extra time):",
                "",
                "| validation | run | total | check job | quality and near-duplicate summaries (`quality_s`) "
                "| organize | listing, start, write |",
                "|---|---|---:|---:|---:|---:|---:|",
                *breakdown,
                "",
                *(["CPU per file of the check's parts outside Spark (one process, warm cache, median of 5):",
                   "",
                   "| part | µs per file |",
                   "|---|---:|",
                   *[f"| {k} | {v:.0f} |" for k, v in cpu.items()],
                   ""] if cpu else []),
            ]
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    text = "\n".join([
        "# Cost of the data-quality signals and the near-duplicate search in the manifest job",
        "",
        f"Command: `.venv/bin/python bench/bench_quality_cost.py {' '.join(sys.argv[1:])}`  ",
        f"Code: `{Path(sig_mod.__file__).resolve().parent}`; `{args.master}` on {os.cpu_count()} CPUs, shared "
        f"with other work (load average at the end {' / '.join(f'{x:.1f}' for x in _load())}; at each run's "
        f"start in the tables); page cache {cache}; {time.strftime('%Y-%m-%d %H:%M')}",
        "",
        "Goal (issue \"Data quality at Spark scale\"): manifest time with `near_duplicates = \"flag\"` at most "
        f"{GOAL}x the time with `\"off\"`.",
        "",
        *[f"* {v}" for v in verdicts],
        "",
        *sections,
        "`off`: no perceptual hash and no quality signals (`full` decodes JPEGs at 1/8 scale only to "
        "check them; `header` does not decode). `flag`: the check's decode keeps the shorter side >= 128 px and "
        "computes the hash and the signals from it, then the quality summary and the near-duplicate search run "
        "(`quality_s`): in the organize task up to 500,000 rows (`job.ONE_TASK_ROWS`), else on Spark before organize.",
        "",
    ])
    print(text)
    Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
