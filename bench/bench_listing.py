"""LIST requests of the manifest job's listing against a synthetic object store: no Spark, no cluster.

    .venv/bin/python bench/bench_listing.py [--n 100k 1M] [--tasks 10 100] [--fanout 100 --depth 2] [--budget 600]

The manifest job (``imgfeat.metadata.manifest.job``) checks each SRC on the driver (``listing.check_source``),
then task ``i`` of ``n`` calls ``listing.list_unit(Unit(root, root, True), keep=slice_of(uri, n) == i)`` for
every SRC. ``list_as_tasks`` makes exactly those calls, one task after another in one process, against
``bench/synthstore.py`` (``synth://`` URLs: N keys made up on the fly, S3 ListObjectsV2 paging of 1,000
keys, every request counted). It is the one function to point at a new listing API.

Each (layout, N, tasks) runs in a fresh Python process, so its peak RSS is its own; its counts come back
through ``SYNTHSTORE_COUNTS`` (``synthstore.read_counts``) and are checked against the process's own.
Configurations whose estimated time passes ``--budget`` seconds are not run: their row is the request
model (every task lists all N keys) the measured rows confirm, marked "projected". Prints a Markdown
table (``--results FILE`` also writes it): the baseline before the listing redesign.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import synthstore  # noqa: E402  (registers synth://)

STORE_KEYS = ("list", "head", "get", "keys", "prefixes")


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in STORE_KEYS}


def list_as_tasks(sources: list[str], tasks: int) -> dict:
    """The manifest job's listing run as ``tasks`` tasks, one after another: the synthstore counts it made.

    Driver: ``check_source`` of each SRC. Task ``part``: for each SRC, every entry ``list_unit`` yields for
    slice ``part`` (what ``job._make_checker`` lists before checking). Zeroes this process's synthstore
    counters. Returns ``driver`` and ``tasks`` (one dict per task) of request counts, each task's ``kept``
    entries and ``crc`` (sum of crc32 of their paths, to tell every key was kept exactly once), ``seconds``,
    and ``max_call_keys``: the most entries one store call returned (what a task held at once)."""
    from imgfeat.metadata.manifest.listing import Unit, check_source, list_unit, slice_of

    synthstore.reset_counts()
    start = synthstore.counts()
    roots = sorted({check_source(s) for s in sources})
    driver = _delta(synthstore.counts(), start)
    per_task = []
    for part in range(tasks):
        t0, before = time.perf_counter(), synthstore.counts()
        kept = crc = errors = 0
        for root in roots:
            for e in list_unit(Unit(root, root, True), lambda uri, part=part: slice_of(uri, tasks) == part):
                kept += 1
                crc += zlib.crc32(e.path.encode())
                errors += e.error is not None
        per_task.append(dict(_delta(synthstore.counts(), before), kept=kept, crc=crc, errors=errors,
                             seconds=time.perf_counter() - t0))
    return {"driver": driver, "tasks": per_task, "max_call_keys": synthstore.counts()["max_call_keys"]}


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _expected_crc(url: str, n: int) -> int:
    """Sum of crc32 over every key's URI, as ``list_as_tasks`` adds them up (keys made page by page)."""
    bucket = synthstore.SynthFileSystem._strip_protocol(url).split("/", 1)[0]
    layout = synthstore.parse_bucket(bucket)
    total = 0
    for lo in range(0, n, 100_000):
        for e in layout.file_entries(bucket, lo, min(n, lo + 100_000)):
            total += zlib.crc32(f"synth://{e['name']}".encode())
    return total


def run_one(url: str, tasks: int) -> dict:
    """One configuration in this process (``--one``): counts, memory and time as a JSON-able dict."""
    import imgfeat.metadata.manifest.listing  # noqa: F401  (imported before the baseline RSS)

    rss0 = _rss_mb()
    t0 = time.perf_counter()
    out = list_as_tasks([url], tasks)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = synthstore.parse_bucket(synthstore.SynthFileSystem._strip_protocol(url).split("/", 1)[0]).n
    out.update(seconds=seconds, rss0_mb=rss0, peak_rss_mb=peak, n=n,
               once=sum(t["kept"] for t in out["tasks"]) == n and sum(t["crc"] for t in out["tasks"]) == _expected_crc(url, n))
    synthstore.flush_counts()
    return out


def _child(url: str, tasks: int, counts_dir: str) -> dict:
    env = dict(os.environ, SYNTHSTORE_COUNTS=counts_dir)
    proc = subprocess.run([sys.executable, __file__, "--one", url, str(tasks)], env=env, capture_output=True, text=True,
                          check=False)
    if proc.returncode:
        raise SystemExit(f"{url} x {tasks} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", nargs="+", default=["100k", "1M"], help="keys (k/M suffixes)")
    ap.add_argument("--tasks", nargs="+", type=int, default=[10, 100])
    ap.add_argument("--fanout", type=int, default=100)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--no-flat", action="store_true", help="skip the flat layout rows (one prefix, at the smallest N)")
    ap.add_argument("--budget", type=float, default=600, help="seconds one configuration may take (estimated)")
    ap.add_argument("--results", help="also write the Markdown here")
    ap.add_argument("--one", nargs=2, metavar=("URL", "TASKS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]))))
        return

    sizes = sorted(synthstore._int(x) for x in args.n)
    configs = [("tree", n, t) for n in sizes for t in args.tasks]
    if not args.no_flat:
        configs += [("flat", sizes[0], t) for t in args.tasks]
    page = synthstore.MAX_PAGE
    rows, sec_per_key = [], None
    for layout, n, tasks in configs:
        params = {"flat": 1} if layout == "flat" else {"fanout": args.fanout, "depth": args.depth}
        url = synthstore.synth_url(n=n, seed=1, **params)
        estimate = sec_per_key * n * (tasks + 1) if sec_per_key else 0.0
        if estimate > args.budget:
            rows.append({"layout": layout, "n": n, "tasks": tasks, "projected": True, "estimate": estimate,
                         "driver": 1 if layout == "tree" else math.ceil(n / page)})
            print(f"# {layout} N={n:,} x {tasks} tasks: ~{estimate:,.0f}s estimated > budget, projected", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory(prefix="synthcounts-") as counts_dir:
            res = _child(url, tasks, counts_dir)
            folder = synthstore.read_counts(counts_dir)
        own = {k: res["driver"][k] + sum(t[k] for t in res["tasks"]) for k in STORE_KEYS}
        assert all(folder[k] == own[k] for k in STORE_KEYS), (folder, own)
        sec_per_key = max(sec_per_key or 0.0, res["seconds"] / (n * (tasks + 1)))
        rows.append(dict(res, layout=layout, slices=tasks, projected=False, folder=folder))
        print(f"# {layout} N={n:,} x {tasks}: {folder['list']:,} LIST in {res['seconds']:.1f}s", file=sys.stderr)

    measured = [r for r in rows if not r["projected"]]
    per_key_mb = max(((r["peak_rss_mb"] - r["rss0_mb"]) / r["n"] for r in measured), default=0.0)
    rss0 = max((r["rss0_mb"] for r in measured), default=0.0)
    lines = [
        "## Manifest listing requests (baseline, before the listing redesign)",
        "",
        f"Store: `bench/synthstore.py` (S3 ListObjectsV2 semantics, at most {page:,} entries per LIST); tree = "
        f"{args.fanout}^{args.depth} folders, flat = every key under one prefix. A task = `listing.list_unit` over "
        "its hash slice, as `job._make_checker` calls it; driver = `listing.check_source` (`fs.isdir`, which "
        "s3fs answers with the full delimiter listing of the SRC). Every task runs in one process, one after "
        f"another. Command: `.venv/bin/python bench/bench_listing.py {' '.join(sys.argv[1:])}`",
        "",
        "| layout | N keys | tasks | LIST total | LIST driver | LIST per task | model: tasks x ceil(N/1000) + driver "
        "| HEAD + GET | keys returned | keys returned / N | keys held by a task (largest response) "
        "| every key kept once | peak RSS MB (at start) | seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        n, tasks = r["n"], r.get("slices", r["tasks"])
        if r["projected"]:
            model = tasks * math.ceil(n / page) + r["driver"]
            lines.append(f"| {r['layout']} | {n:,} | {tasks} | {model:,} (projected) | {r['driver']:,} "
                         f"| {math.ceil(n / page):,} | {model:,} | 0 | {n * (tasks + 1 if r['layout'] == 'flat' else tasks):,} "
                         f"| {tasks + (r['layout'] == 'flat')} | {n:,} | not run (~{r['estimate'] / 60:,.0f} min est.) "
                         f"| ~{_fmt(per_key_mb * n + rss0)} (projected) | |")
            continue
        f, per_task, driver = r["folder"], [t["list"] for t in r["tasks"]], r["driver"]["list"]
        model = tasks * math.ceil(n / page) + driver
        spread = f"{min(per_task):,}" if min(per_task) == max(per_task) else f"{min(per_task):,}-{max(per_task):,}"
        lines.append(f"| {r['layout']} | {n:,} | {tasks} | {f['list']:,} | {driver:,} | {spread} | {model:,} "
                     f"| {f['head'] + f['get']:,} | {f['keys']:,} | {f['keys'] / n:,.1f} | {r['max_call_keys']:,} "
                     f"| {'yes' if r['once'] else 'NO'} | {_fmt(r['peak_rss_mb'])} ({_fmt(r['rss0_mb'])}) "
                     f"| {r['seconds']:,.1f} |")
    lines += [
        "",
        "LIST per task = ceil(N/1000): every task pages through all N keys (`fs.find`, no delimiter) and keeps "
        "1/tasks of them, so LIST requests and keys transferred grow as N x tasks, and each task holds all N "
        "entries at once (`find` returns one dict; then `sorted` and an `Entry` per key). Projected rows are that "
        "model, which every measured row matches exactly; their RSS is the largest measured MB per key times N, "
        "plus the start RSS. Counts come from the store's per-process files (`SYNTHSTORE_COUNTS`), checked equal "
        "to the process's own counters.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
