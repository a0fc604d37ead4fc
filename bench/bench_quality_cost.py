"""What the data-quality signals and the near-duplicate search cost the manifest job: on versus off, same script.

    .venv/bin/python bench/bench_quality_cost.py [--copies 8] [--master local[2]] [--repeats 2]

The Fruits-360 100x100 photos of ../shared replicated ``--copies`` times (``bench_manifest.replicate``: each
copy's bytes differ by a trailer, so copies are not exact duplicates, but they are pixel-identical: every
photo is a near-duplicate group of ``--copies`` files, the worst case for the search), then
``run_manifest`` in one Spark session with ``[manifest] near_duplicates = "off"`` and ``"flag"``, in
``full`` and ``header`` validation, from a cold page cache; the median of ``--repeats`` runs each. Goal
(issue "Data quality at Spark scale"): on / off <= 1.25 in ``full`` mode. Writes
bench/RESULTS-quality-cost.md (``--results`` to change it).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_manifest import FRUITS, cold_cache, load_note, replicate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--copies", type=int, default=8)
    ap.add_argument("--master", default="local[2]")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS-quality-cost.md"))
    args = ap.parse_args()
    if not FRUITS.exists():
        sys.exit(f"needs the Fruits-360 photos at {FRUITS}")
    from imgfeat.metadata.config import load_config
    from imgfeat.metadata.manifest.job import run_manifest

    work = Path(tempfile.mkdtemp(prefix="imgfeat-quality-"))
    try:
        src = work / "src"
        n = replicate(src, args.copies)
        warm = work / "warm" / "a"
        warm.mkdir(parents=True)
        for photo in sorted(FRUITS.rglob("*.jpg"))[:50]:
            (warm / photo.name).write_bytes(photo.read_bytes())
        # Spark's start-up and first jobs are charged to neither side.
        run_manifest(load_config(None, {"spark": {"master": args.master}, "manifest": {"near_duplicates": "flag"}}),
                     [str(warm.parent)], str(work / "warm-out"))
        rows = []
        for mode in ("full", "header"):
            seconds: dict[str, list[float]] = {"off": [], "flag": []}
            found: dict[str, Any] = {}
            for _ in range(args.repeats):
                for near in ("off", "flag"):
                    cfg = load_config(None, {"spark": {"master": args.master},
                                             "manifest": {"validation": mode, "near_duplicates": near}})
                    cache = cold_cache()
                    out = work / f"out_{mode}_{near}"
                    summary = run_manifest(cfg, [str(src)], str(out))
                    seconds[near].append(summary["timings"]["total_s"])
                    found[near] = summary.get("near_duplicates")
                    shutil.rmtree(out, ignore_errors=True)
            off, on = statistics.median(seconds["off"]), statistics.median(seconds["flag"])
            groups = found["flag"] or {}
            rows.append(f"| {mode} | {n:,} | {off:.1f} ({', '.join(f'{s:.1f}' for s in seconds['off'])}) "
                        f"| {on:.1f} ({', '.join(f'{s:.1f}' for s in seconds['flag'])}) | {on / off:.2f} "
                        f"| {groups.get('groups', 0):,} groups, {groups.get('duplicates', 0):,} members |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = "\n".join([
        "# Cost of the data-quality signals and the near-duplicate search in the manifest job",
        "",
        f"Command: `.venv/bin/python bench/bench_quality_cost.py {' '.join(sys.argv[1:])}`  ",
        f"Data: the Fruits-360 100x100 photos x{args.copies} (every photo a near-duplicate group of {args.copies} "
        f"pixel-identical files); `{args.master}`, {os.cpu_count()} CPUs; page cache {cache}; {load_note()}",
        "",
        "| validation | files | off: s (runs) | flag: s (runs) | on / off | found (`flag`) |",
        "|---|---:|---:|---:|---:|---|",
        *rows,
        "",
        "`off` (the default): no perceptual hash and no quality signals (`full` decodes JPEGs at 1/8 scale only to "
        "check them; `header` does not decode). "
        "`flag`: the check's decode keeps the shorter side >= 128 px and computes the hash and the signals from "
        "it (for these 100 px photos: a full-size grey decode), then the quality aggregates and the "
        "near-duplicate search run on Spark before organize.",
        "",
    ])
    print(text)
    Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
