"""LIST requests of the manifest job's listing against a synthetic object store: no Spark, no cluster.

    .venv/bin/python bench/bench_listing.py [--impl baseline breadth] [--n 100k 1M] [--tasks 10 100]
                                            [--fanout 100 --depth 2] [--no-flat] [--budget 600] [--results FILE]

``list_as_tasks(sources, tasks, impl)`` makes the listing calls of the manifest job's tasks, one task after
another in one process, against ``bench/synthstore.py`` (``synth://`` URLs: N keys made up on the fly,
S3 ListObjectsV2 paging of 1,000 entries, every request counted). Two listings:

* ``baseline``: the listing before the redesign. Each task ``i`` of ``n`` walked every SRC
  (``fs.find``, no delimiter) and kept the files of its hash slice (``slice_of``: crc32 of the URI mod n).
  That code is gone from ``listing.py``; ``_baseline_*`` below is a verbatim copy of its remote path, so the
  "before" numbers stay reproducible.
* ``breadth``: the current code (``manifest/discover.py``): depth by depth, the folders of one depth are
  dealt over ``min(folders, tasks)`` tasks in contiguous runs (as ``sparkContext.parallelize`` slices a list)
  and each folder is listed once with ``listing.list_folder``; its subfolders make the next depth.

The driver part of both is ``check_source`` of each SRC (``fs.isdir``: s3fs lists the whole SRC prefix with
a delimiter). Each (impl, layout, N, tasks) runs in a fresh Python process, so its peak RSS is its own; its
counts come back through ``SYNTHSTORE_COUNTS`` (``synthstore.read_counts``) and are checked against the
process's own. A configuration whose estimated time passes ``--budget`` seconds is not run: its row is the
request model, which the measured rows match exactly, marked "projected". Prints a Markdown table.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import fsspec  # noqa: E402

from bench import synthstore  # noqa: E402  (registers synth://)

STORE_KEYS = ("list", "head", "get", "keys", "prefixes")
IMPLS = ("baseline", "breadth", "spark")


# ---------------------------------------------------------------- the pre-redesign listing (frozen copy)

@dataclass(frozen=True)
class _Entry:
    root: str
    path: str
    size: int | None
    mtime: float | None
    error: str | None = None


def _baseline_slice_of(uri: str, slices: int) -> int:
    return zlib.crc32(uri.encode("utf-8", "surrogateescape")) % slices


def _baseline_list_unit(root: str, keep: Callable[[str], bool]) -> Iterator[_Entry]:
    """``listing.list_unit(Unit(root, root, True), keep)`` for a remote SRC, as it was before the redesign."""
    fs, path = fsspec.core.url_to_fs(root)
    scheme = root.split("://", 1)[0]
    try:
        found = fs.find(path, detail=True, withdirs=False)
    except OSError as exc:
        yield _Entry(root, root, None, None, f"prefix cannot be listed: {exc}")
        return
    for e in (_baseline_entry(root, scheme, name, found[name]) for name in sorted(found)):
        if keep(e.path):
            yield e


def _baseline_entry(root: str, scheme: str, name: str, info: dict) -> _Entry:
    mtime: Any = info.get("LastModified") or info.get("mtime") or info.get("created")
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return _Entry(root, f"{scheme}://{name}", int(info.get("size") or 0), float(mtime) if mtime is not None else None)


# ------------------------------------------------------------------------------------------ measuring

def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in STORE_KEYS}


class _Task:
    """One task's tally: store requests, files kept (with a crc sum of their paths), errors, seconds."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(STORE_KEYS, 0)
        self.kept = self.crc = self.errors = 0
        self.seconds = 0.0

    def run(self, entries: Iterator) -> list:
        """Consume ``entries`` as this task; return the folders and key ranges among them (``is_folder``)
        as ``(root, folder, after, upto)``."""
        t0, before = time.perf_counter(), synthstore.counts()
        folders = []
        for e in entries:
            if getattr(e, "is_folder", False):
                folders.append((e.root, e.path, e.after, e.upto))
                continue
            self.kept += 1
            self.crc += zlib.crc32(e.path.encode())
            self.errors += e.error is not None
        for k, v in _delta(synthstore.counts(), before).items():
            self.counts[k] += v
        self.seconds += time.perf_counter() - t0
        return folders

    def as_dict(self) -> dict:
        return dict(self.counts, kept=self.kept, crc=self.crc, errors=self.errors, seconds=self.seconds)


def list_on_spark_counted(sources: list[str], tasks: int) -> dict:
    """The manifest job's own listing (``discover.list_on_spark``) on Spark ``local[2]`` with ``tasks`` tasks a
    round. Spark's Python workers import the store through a ``sitecustomize`` on their ``PYTHONPATH``; their
    request counts come back through ``SYNTHSTORE_COUNTS``. Returns what ``list_as_tasks`` does, with the
    files listed checked in Spark (count, distinct paths, crc sum) and the workers' peak RSS (psutil)."""
    import threading

    import psutil

    from imgfeat.metadata.config import SparkConfig
    from imgfeat.metadata.manifest.discover import list_on_spark, listed_files
    from imgfeat.metadata.manifest.listing import check_source
    from imgfeat.metadata.spark.session import get_spark

    hook = Path(tempfile.mkdtemp(prefix="synthhook-"))
    (hook / "sitecustomize.py").write_text("import bench.synthstore  # registers synth:// in Spark's workers\n")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(hook), str(REPO), os.environ.get("PYTHONPATH", "")])
    spark = get_spark(SparkConfig(master="local[2]", driver_memory="4g"))
    peaks: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:
        me = psutil.Process()
        while not done.wait(0.2):
            for p in me.children(recursive=True):
                try:
                    if "python" in p.name():
                        peaks[p.pid] = max(peaks.get(p.pid, 0), p.memory_info().rss)
                except psutil.Error:
                    continue

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    synthstore.reset_counts()
    roots = sorted({check_source(s) for s in sources})
    driver = dict(synthstore.counts())
    with tempfile.TemporaryDirectory(prefix="listed-") as out:
        info = list_on_spark(spark, roots, out, tasks)
        from pyspark.sql import functions as F

        files = listed_files(spark, info, tasks)
        agg = files.agg(F.count("*").alias("n"), F.countDistinct("path").alias("distinct"),
                        F.sum(F.crc32(F.col("path").cast("binary"))).alias("crc")).collect()[0]
    done.set()
    spark.stop()
    return {"driver": {k: driver[k] for k in STORE_KEYS}, "tasks": [], "rounds": len(info["depths"]),
            "ranges": info["ranges"], "units": info["folders"], "spark_files": agg["n"], "spark_distinct": agg["distinct"],
            "spark_crc": int(agg["crc"] or 0), "worker_peak_mb": max(peaks.values(), default=0) / 2**20,
            "max_call_keys": synthstore.counts()["max_call_keys"]}


def list_as_tasks(sources: list[str], tasks: int, impl: str = "breadth") -> dict:
    """The manifest job's listing of ``sources`` as ``tasks`` tasks, one after another: what it cost the store.

    Zeroes this process's synthstore counters. Returns ``driver`` (request counts of ``check_source``),
    ``tasks`` (per task: request counts, ``kept`` files and ``crc``, the sum of crc32 of their paths, to tell
    that every key was kept exactly once, ``errors``, ``seconds``), ``rounds`` (listing jobs: 1, or one per
    depth) and ``max_call_keys``: the most entries one store call returned (what a task held at once)."""
    from imgfeat.metadata.manifest.listing import check_source

    synthstore.reset_counts()
    start = synthstore.counts()
    roots = sorted({check_source(s) for s in sources})
    driver = _delta(synthstore.counts(), start)
    per_task = [_Task() for _ in range(tasks)]
    rounds = ranges = 0
    if impl == "baseline":
        rounds = 1
        for part, task in enumerate(per_task):
            def keep(uri: str, part: int = part) -> bool:
                return _baseline_slice_of(uri, tasks) == part

            for root in roots:
                task.run(_baseline_list_unit(root, keep))
    elif impl == "breadth":
        from imgfeat.metadata.manifest.listing import list_folder

        frontier = [(r, r, None, None) for r in roots]
        while frontier:  # discover.list_on_spark: one job per round, folders sliced like parallelize does
            rounds += 1
            ranges += sum(1 for f in frontier if f[2] is not None or f[3] is not None)
            parts, found = max(1, min(len(frontier), tasks)), []
            for p in range(parts):
                for root, folder, after, upto in frontier[p * len(frontier) // parts:(p + 1) * len(frontier) // parts]:
                    found += per_task[p].run(list_folder(root, folder, after, upto))
            frontier = sorted(found, key=lambda f: (f[0], f[1], f[2] or "", f[3] or ""))
    else:
        raise ValueError(f"impl: one of {IMPLS}")
    return {"driver": driver, "tasks": [t.as_dict() for t in per_task], "rounds": rounds, "ranges": ranges,
            "max_call_keys": synthstore.counts()["max_call_keys"]}


def model_lists(impl: str, url: str, tasks: int) -> tuple[int, int]:
    """(driver, task) LIST requests the listing should make, by arithmetic on the layout (no listing)."""
    layout = synthstore.parse_bucket(synthstore.SynthFileSystem._strip_protocol(url).split("/", 1)[0])
    page = layout.page

    def pages(entries: int) -> int:
        return max(1, math.ceil(entries / page))

    def children(level: int, p: int) -> int:
        """Entries of the folder with index ``p`` at ``level`` (level ``depth``: a leaf, its keys)."""
        span = layout.fanout ** (layout.depth - level)  # leaves under it
        if level == layout.depth:
            return layout.leaf_start(p + 1) - layout.leaf_start(p)
        first = p * layout.fanout
        return sum(1 for c in range(first, first + layout.fanout) if layout.leaf_start(c * span // layout.fanout) < layout.n)

    driver = 1  # check_source: one LIST of at most one key
    if impl == "baseline":
        return driver, tasks * pages(layout.n)
    total = 0
    for level in range(layout.depth + 1):
        span = layout.fanout ** (layout.depth - level)
        total += sum(pages(children(level, p)) for p in range(layout.fanout ** level) if layout.leaf_start(p * span) < layout.n)
    return driver, total


# ------------------------------------------------------------------------------------------------- runs

def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _expected_crc(url: str, n: int) -> int:
    """Sum of crc32 over every key's URI, as ``_Task`` adds them up (keys made a page at a time)."""
    bucket = synthstore.SynthFileSystem._strip_protocol(url).split("/", 1)[0]
    layout = synthstore.parse_bucket(bucket)
    total = 0
    for lo in range(0, n, 100_000):
        for e in layout.file_entries(bucket, lo, min(n, lo + 100_000)):
            total += zlib.crc32(f"synth://{e['name']}".encode())
    return total


def run_one(impl: str, url: str, tasks: int) -> dict:
    """One configuration in this process (``--one``): counts, memory and time as a JSON-able dict."""
    import imgfeat.metadata.manifest.listing  # noqa: F401  (imported before the baseline RSS)

    rss0 = _rss_mb()
    t0 = time.perf_counter()
    out = list_on_spark_counted([url], tasks) if impl == "spark" else list_as_tasks([url], tasks, impl)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n = synthstore.parse_bucket(synthstore.SynthFileSystem._strip_protocol(url).split("/", 1)[0]).n
    if impl == "spark":
        once = out["spark_files"] == out["spark_distinct"] == n and out["spark_crc"] == _expected_crc(url, n)
    else:
        once = sum(t["kept"] for t in out["tasks"]) == n and sum(t["crc"] for t in out["tasks"]) == _expected_crc(url, n)
    out.update(seconds=seconds, rss0_mb=rss0, peak_rss_mb=peak, n=n, once=once)
    synthstore.flush_counts()
    return out


def _child(impl: str, url: str, tasks: int, counts_dir: str) -> dict:
    env = dict(os.environ, SYNTHSTORE_COUNTS=counts_dir)
    proc = subprocess.run([sys.executable, __file__, "--one", impl, url, str(tasks)], env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{impl} {url} x {tasks} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.1f}"


def _projected_rss(row: dict, measured: list[dict]) -> str:
    """A task's peak does not depend on the number of tasks: the measured row of the same impl, layout and N."""
    same = [r["peak_rss_mb"] for r in measured if (r["impl"], r["layout"], r["n"]) == (row["impl"], row["layout"], row["n"])]
    if same:
        return f"~{_fmt(max(same))} (as measured with other tasks)"
    mine = [r for r in measured if r["impl"] == row["impl"] and r["layout"] == row["layout"]]
    if not mine:
        return "?"
    per_key = max((r["peak_rss_mb"] - r["rss0_mb"]) / r["n"] for r in mine)
    return f"~{_fmt(per_key * row['n'] + max(r['rss0_mb'] for r in mine))} (MB per key x N)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", nargs="+", choices=IMPLS, default=list(IMPLS))
    ap.add_argument("--n", nargs="+", default=["100k", "1M"], help="keys (k/M suffixes)")
    ap.add_argument("--tasks", nargs="+", type=int, default=[10, 100])
    ap.add_argument("--fanout", type=int, default=100)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--no-flat", action="store_true", help="skip the flat layout rows (one prefix)")
    ap.add_argument("--flat-n", nargs="+", default=None, help="keys of the flat layout rows (default: the smallest --n)")
    ap.add_argument("--budget", type=float, default=600, help="seconds one configuration may take (estimated)")
    ap.add_argument("--results", help="also write the Markdown here")
    ap.add_argument("--one", nargs=3, metavar=("IMPL", "URL", "TASKS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], int(args.one[2]))))
        return

    sizes = sorted(synthstore._int(x) for x in args.n)
    rows: list[dict] = []
    for impl in args.impl:
        configs = [("tree", n, t) for n in sizes for t in args.tasks]
        if not args.no_flat:
            flat = sorted(synthstore._int(x) for x in args.flat_n) if args.flat_n else sizes[:1]
            configs += [("flat", n, t) for n in flat for t in args.tasks]
        sec_per_key = 0.0  # seconds per key listed by a task, the largest measured so far
        for layout, n, tasks in configs:
            params = {"flat": 1} if layout == "flat" else {"fanout": args.fanout, "depth": args.depth}
            url = synthstore.synth_url(n=n, seed=1, **params)
            listed = n * (tasks if impl == "baseline" else 1) + n  # keys the tasks list, + the crc check
            row = {"impl": impl, "layout": layout, "n": n, "slices": tasks, "url": url,
                   "model": model_lists(impl, url, tasks), "estimate": sec_per_key * listed}
            if row["estimate"] > args.budget:
                rows.append(dict(row, projected=True))
                print(f"# {impl} {layout} N={n:,} x {tasks}: ~{row['estimate']:,.0f}s estimated, projected", file=sys.stderr)
                continue
            with tempfile.TemporaryDirectory(prefix="synthcounts-") as counts_dir:
                res = _child(impl, url, tasks, counts_dir)
                folder = synthstore.read_counts(counts_dir)
            if impl != "spark":  # Spark's workers count in their own processes: only the folder has them all
                own = {k: res["driver"][k] + sum(t[k] for t in res["tasks"]) for k in STORE_KEYS}
                assert all(folder[k] == own[k] for k in STORE_KEYS), (folder, own)
            sec_per_key = max(sec_per_key, res["seconds"] / listed)
            rows.append(dict(res, **row, projected=False, folder=folder))
            print(f"# {impl} {layout} N={n:,} x {tasks}: {folder['list']:,} LIST in {res['seconds']:.1f}s", file=sys.stderr)

    measured = [r for r in rows if not r["projected"]]
    lines = [
        "## Manifest listing requests against a synthetic object store",
        "",
        f"Store: `bench/synthstore.py` (S3 ListObjectsV2 semantics, at most 1,000 entries per LIST); tree = "
        f"{args.fanout}^{args.depth} folders of keys, flat = every key under one prefix. baseline = the listing "
        "before the redesign (every task `fs.find`s the whole SRC and keeps its hash slice; frozen copy); "
        "breadth = the current `discover.list_on_spark` scheme simulated in one process (one round per depth, "
        "each folder or key range listed once by `listing.list_folder`; a task lists at most 100 pages of a "
        "folder and hands the rest on as key ranges, `key_ranges.py`), tasks one after another; spark = the "
        "real `discover.list_on_spark` on Spark local[2] (Python workers import the store through a "
        "`sitecustomize`), files checked in Spark. Driver = `check_source` (one LIST of at most one key). "
        "Goal: LIST total <= 1.1 x N/1000 + prefixes. "
        f"Command: `.venv/bin/python bench/bench_listing.py {' '.join(sys.argv[1:])}`",
        "",
        "| listing | layout | N keys | tasks | LIST total | LIST driver | LIST per task (min-max) | model LIST | goal "
        "| jobs | key ranges | HEAD + GET | keys returned | keys returned / N | keys held (largest response) "
        "| every key once | peak RSS MB (at start) | seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        n, tasks, (m_driver, m_tasks) = r["n"], r["slices"], r["model"]
        model = m_driver + m_tasks
        head = f"| {r['impl']} | {r['layout']} | {n:,} | {tasks} "
        if r["projected"]:
            if r["impl"] == "baseline":  # every task lists all N keys; the driver lists the top level
                keys = n * tasks + (n if r["layout"] == "flat" else 0)
                lines.append(head + f"| {model:,} (projected) | {m_driver:,} | {m_tasks // tasks:,} | {model:,} | | 1 | | 0 "
                             f"| {keys:,} | {keys / n:,.0f} | {n:,} | not run (~{r['estimate'] / 60:,.0f} min est.) "
                             f"| {_projected_rss(r, measured)} | |")
            else:
                lines.append(head + f"| {model:,} (projected) | {m_driver:,} | | {model:,} | | | | | | | | "
                             f"not run (~{r['estimate'] / 60:,.0f} min est.) | {_projected_rss(r, measured)} | |")
            continue
        f, per_task, driver = r["folder"], [t["list"] for t in r["tasks"]], r["driver"]["list"]
        if per_task:
            spread = f"{min(per_task):,}" if min(per_task) == max(per_task) else f"{min(per_task):,}-{max(per_task):,}"
        else:
            spread = "(Spark tasks)"
        prefixes = 1 if r["layout"] == "flat" else args.fanout ** args.depth + args.fanout + 1
        goal = f["list"] <= 1.1 * n / 1000 + prefixes
        memory = f"{_fmt(r['peak_rss_mb'])} ({_fmt(r['rss0_mb'])})"
        if r["impl"] == "spark":
            memory = f"driver {memory}, largest worker {_fmt(r['worker_peak_mb'])}"
        lines.append(head + f"| {f['list']:,} | {driver:,} | {spread} | {model:,} | {'met' if goal else 'NOT met'} "
                     f"| {r['rounds']} | {r.get('ranges', '')} | {f['head'] + f['get']:,} | {f['keys']:,} "
                     f"| {f['keys'] / n:,.1f} | {f['max_call_keys']:,} | {'yes' if r['once'] else 'NO'} | {memory} "
                     f"| {r['seconds']:,.1f} |")
    lines += [
        "",
        "Model LIST: driver = 1 (`check_source`); baseline tasks = tasks x ceil(N/1000) (every task pages "
        "through all N keys and keeps 1/tasks of them, holding all N entries at once: `find` returns one dict); "
        "breadth and spark = sum over existing folders of ceil(entries/1000), whatever the number of tasks "
        "(a floor: each key range adds its last partial page). Counts come from the store's per-process files "
        "(`SYNTHSTORE_COUNTS`), checked equal to the process's own counters (spark: the workers count in "
        "their own processes; the files have them all).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.results:
        Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
