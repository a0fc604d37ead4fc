"""Reruns of ``imgfeat run`` on real-size photos: first run, a rerun with nothing changed, a rerun after
new photos arrived, and one after a photo was changed in place. The baseline is the first run (what a
tool without incremental reruns costs every time).

Photos: made by ``sample.realsize`` from the shared 100x100 Fruits-360 photos (real-size JPEGs of
``--min-side`` to ``--max-side`` px) in ``--classes`` class folders. Model: mobilenet_v2 with the shared
ImageNet weights (seeded into a temporary TORCH_HOME), CPU. Each run is the CLI as a user runs it
(``python -m imgfeat run SRC --out RUN``), Spark start-up included.

    .venv/bin/python bench/bench_incremental.py --photos 240
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))


def _photos(out: Path, n: int, classes: int, min_side: int, max_side: int, seed: int = 0) -> list[Path]:
    from sample.realsize import make_realsize_photos

    made: list[Path] = []
    per = max(1, n // classes)
    for c in range(classes):
        folder = out / f"class{c}"
        made += [Path(p) for p in make_realsize_photos(SHARED / "data" / "fruits360-100", folder, per,
                                                         min_side=min_side, max_side=max_side, seed=seed + c)]
    return made


def _run(src: Path, run: Path, env: dict[str, str]) -> tuple[float, dict]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "imgfeat", "run", str(src), "--out", str(run), "--model", "mobilenet_v2",
                           "--weights", "IMAGENET1K_V1", "--k", "16", "-q"], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"imgfeat run failed:\n{proc.stderr[-3000:]}")
    report = json.loads((run / "report.json").read_text())
    return seconds, report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=240)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--min-side", type=int, default=400)
    ap.add_argument("--max-side", type=int, default=2000)
    ap.add_argument("--results", default=str(REPO / "bench" / "RESULTS-incremental.md"))
    args = ap.parse_args()
    weights = SHARED / "weights" / "mobilenet_v2-b0353104.pth"
    if not weights.exists():
        raise SystemExit(f"{weights} is absent: this benchmark needs ../shared")
    with tempfile.TemporaryDirectory(prefix="imgfeat-bench-inc-") as tmp_name:
        tmp = Path(tmp_name)
        home = tmp / "torch" / "hub" / "checkpoints"
        home.mkdir(parents=True)
        shutil.copy(weights, home / weights.name)
        env = dict(os.environ, TORCH_HOME=str(tmp / "torch"), IMGFEAT_NO_PROGRESS="1")
        src, run = tmp / "src", tmp / "run"
        photos = _photos(src, args.photos, args.classes, args.min_side, args.max_side)
        # Other seeds: new photos, not copies of the ones already there (those would be duplicates).
        extra = _photos(tmp / "extra", 2 * args.classes, args.classes, args.min_side, args.max_side, seed=1000)
        rows = []
        load = os.getloadavg()[0]
        seconds, report = _run(src, run, env)
        rows.append(("first run", seconds, report))
        seconds, report = _run(src, run, env)
        rows.append(("rerun, nothing changed", seconds, report))
        for p in extra[:2]:
            shutil.copy(p, src / p.parent.name / f"new-{p.name}")
        seconds, report = _run(src, run, env)
        rows.append(("rerun, 2 photos added", seconds, report))
        victim = photos[0]
        shutil.copy(extra[-1], victim)  # changed in place: new bytes under the same name
        seconds, report = _run(src, run, env)
        rows.append(("rerun, 1 photo changed in place", seconds, report))
        load_end = os.getloadavg()[0]
    first = rows[0][1]
    lines = ["# `imgfeat run` reruns on real-size photos", "",
             f"Command: `.venv/bin/python bench/bench_incremental.py --photos {args.photos}`  ",
             f"Photos: {len(photos)} JPEGs of {args.min_side} to {args.max_side} px made by `sample.realsize` from the shared "
             f"Fruits-360 photos, {args.classes} classes; mobilenet_v2 (ImageNet weights), CPU, k = 16; each run through "
             f"the CLI with Spark start-up. Load average (1 min) before/after: {load:.1f} / {load_end:.1f}.", "",
             "| run | seconds | vs first run | manifest | featurize shards computed | pca | files added / changed / removed |",
             "|---|---:|---:|---|---:|---|---|"]
    for name, seconds, report in rows:
        ch = report.get("changes") or {}
        stages = ch.get("stages") or {}
        manifest = stages.get("manifest", "") + ("" if ch.get("manifest_published", True) else ", version kept")
        lines.append(f"| {name} | {seconds:.1f} | {seconds / first:.2f}x | {manifest} | "
                     f"{ch.get('feature_shards_computed') or 0} | {stages.get('pca', '')} | "
                     f"{ch.get('added')} / {ch.get('changed')} / {ch.get('removed')} |")
    text = "\n".join(lines) + "\n"
    Path(args.results).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
