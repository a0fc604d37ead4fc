"""Manifest job throughput against the seed approach (Spark binaryFile + a PIL decode UDF), same script.

    .venv/bin/python bench/bench_manifest.py [--copies 8] [--master local[2]]

Replicates ../shared/data/fruits360-100 ``--copies`` times (bytes made unique per copy by a trailer
after the JPEG end marker, so copies are not duplicates), then times in one Spark session:
  * baseline: ``binaryFile`` + a pandas UDF that decodes each file with PIL, written to Parquet;
  * ours: ``imgfeat manifest`` in ``full`` and in ``header`` mode, end to end (listing to Parquet), with
    its two stages: list + check (one Spark job, one Python task per core) and organize + write
    (one Spark job, one task).
Driver memory: the driver Python's RSS and the driver JVM's used heap after each run, at 1 copy and at
``--copies`` copies. Prints a markdown table and writes it to bench/RESULTS-manifest.md.

    .venv/bin/python bench/bench_manifest.py --realsize 10600 [--repeats 3] [--cli]

Real-size mode: ``--realsize N`` photos of ``--min-side``..``--max-side`` px (240..800 by default) made by
``sample.realsize`` from the Fruits-360 Training photos, one folder per class (10 classes), instead of
the 100x100 copies. Each round runs ours (``full``, ``header``) and the baseline, each from a cold page
cache; the table gives the median of ``--repeats`` rounds, every run's seconds, and the CPU seconds per
file of each process group (Spark's Python workers, the JVM, the driver Python) read from /proc, with the
CPU that other processes took during the run (the machine is shared). ``--cli`` also times
``python -m imgfeat.metadata`` in a fresh process (JVM and Spark start-up included). Writes
bench/RESULTS-manifest-realsize.md (``--results`` to change it).
"""

import argparse
import gc
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FRUITS = REPO.parent / "shared" / "data" / "fruits360-100"


def replicate(dst: Path, copies: int) -> int:
    n = 0
    for c in range(copies):
        for src in FRUITS.rglob("*.jpg"):
            rel = src.relative_to(FRUITS)
            out = dst / rel.parent / f"c{c}_{rel.name}"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(src.read_bytes() + f"copy{c}".encode())
            n += 1
    return n


def baseline(spark, src: Path, out: Path) -> float:
    """The seed pipelines' check: binaryFile + PIL decode in a pandas UDF, results to Parquet."""
    import pandas as pd
    from pyspark.sql import functions as F
    from pyspark.sql.functions import pandas_udf

    # pyspark's stubs lack the type-hint form (no functionType), which its docs recommend
    @pandas_udf("struct<ok:boolean,width:int,height:int>")  # type: ignore[call-overload]
    def pil_check(content: pd.Series) -> pd.DataFrame:
        import io

        from PIL import Image

        rows: list[tuple[bool, int | None, int | None]] = []
        for b in content:
            try:
                with Image.open(io.BytesIO(b)) as im:
                    rgb = im.convert("RGB")
                    rows.append((True, rgb.width, rgb.height))
            except Exception:  # noqa: BLE001 - the seed caught everything
                rows.append((False, None, None))
        return pd.DataFrame(rows, columns=["ok", "width", "height"])

    t = time.perf_counter()
    df = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(str(src))
    df.select("path", "length", pil_check("content").alias("c")).select("path", "length", "c.*") \
      .write.mode("overwrite").parquet(str(out))
    return time.perf_counter() - t


def cold_cache() -> str:
    """Drop the page cache (root only) so every pipeline starts from the same cold disk; else warm all."""
    import subprocess

    proc = subprocess.run("sync && echo 3 > /proc/sys/vm/drop_caches", shell=True, capture_output=True)
    return "cold (page cache dropped before each run)" if proc.returncode == 0 else "as found (could not drop the page cache)"


def jvm_used_mb(spark) -> float:
    rt = spark.sparkContext._jvm.java.lang.Runtime.getRuntime()
    spark.sparkContext._jvm.java.lang.System.gc()
    return (rt.totalMemory() - rt.freeMemory()) / 2**20


def make_realsize(dst: Path, n: int, min_side: int, max_side: int, seed: int = 0) -> int:
    """``n`` real-size photos in one folder per Fruits-360 class (each made from that class's photos)."""
    from sample.realsize import make_realsize_photos

    classes = sorted(p.name for p in (FRUITS / "Training").iterdir() if p.is_dir())
    for i, name in enumerate(classes):
        k = n // len(classes) + (i < n % len(classes))
        make_realsize_photos(FRUITS / "Training" / name, dst / name, k, min_side, max_side, seed=seed + i, quality=90)
    return n


def _proc_table() -> dict[int, tuple[int, str, int, int]]:
    """pid -> (ppid, kind, own CPU ticks, reaped children's CPU ticks) of every process."""
    table = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                stat = fh.read()
            with open(f"/proc/{d}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2:].split()
        kind = "jvm" if b"java" in cmd.split(b"\0")[0] else "python workers" if b"pyspark" in cmd else "other"
        table[int(d)] = (int(f[1]), kind, int(f[11]) + int(f[12]), int(f[13]) + int(f[14]))
    return table


def cpu_snapshot() -> dict[str, float]:
    """CPU seconds so far of this process tree by group (driver, jvm, python workers) and of the machine."""
    tick = os.sysconf("SC_CLK_TCK")
    table = _proc_table()
    me = os.getpid()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, *_rest) in table.items():
        kids.setdefault(ppid, []).append(pid)
    groups = {"driver": 0.0, "jvm": 0.0, "python workers": 0.0}
    stack = [me]
    while stack:
        pid = stack.pop()
        stack.extend(kids.get(pid, []))
        _, kind, own, reaped = table.get(pid, (0, "other", 0, 0))
        if pid == me:
            groups["driver"] += own / tick  # its reaped children are shells and CLI runs, timed apart
        elif kind in groups:
            groups[kind] += (own + reaped) / tick
    with open("/proc/stat") as fh:
        v = [int(x) for x in fh.readline().split()[1:9]]
    groups["machine busy"] = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / tick
    return groups


def load_note() -> str:
    return "load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg())


def cpu_breakdown(data: Path, sample: int = 2000, reps: int = 5) -> list[tuple[str, float, str]]:
    """Where the check task's CPU goes per file on ``data``: (part, CPU microseconds per file, note).

    One process, one thread, warm page cache, median of ``reps`` (process_time). The parts on the first
    ``sample`` files in listing order; the whole check task (listing -> checks -> labels -> Arrow ->
    Parquet, exactly the Spark task's code, run here as one task over every file) on all files."""
    import io
    import statistics

    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from imgfeat.metadata.config import load_config
    from imgfeat.metadata.contracts.cv2_env import decoder_cv2
    from imgfeat.metadata.contracts.sniff import DEFAULT_MAX_JPEG_SCANS, KNOWN_IMAGE_FORMATS, parse_header
    from imgfeat.metadata.manifest.checks import content_hash, decode_check, prefetched, read_bytes
    from imgfeat.metadata.manifest.discover import LISTED_SCHEMA, listed_row
    from imgfeat.metadata.manifest.job import CHECKED_SCHEMA, _make_checker
    from imgfeat.metadata.manifest.listing import Unit, check_source, list_unit
    from imgfeat.metadata.spark.parquet import _partition_writer

    root = check_source(str(data))
    entries = list(list_unit(Unit(root, root, True)))
    part = entries[:sample]
    sample = len(part)
    blobs = [read_bytes(e.path, 64 << 20, e.size) for e in part]
    sos = [b.find(b"\xff\xda") for b in blobs]

    def cpu(fn, n: int, times: int = reps) -> float:
        ts = []
        for _ in range(times):
            c = time.process_time()
            fn()
            ts.append(time.process_time() - c)
        return statistics.median(ts) / n * 1e6

    def consume(it) -> None:
        for _ in it:
            pass

    out_dir = Path(tempfile.mkdtemp(prefix="bench-manifest-task-"))

    def whole_task(mode: str) -> None:
        cfg = load_config(None, {"manifest": {"validation": mode}})
        batch = pa.RecordBatch.from_pylist([listed_row(e) for e in entries], schema=LISTED_SCHEMA)
        consume(_partition_writer(out_dir.as_uri(), CHECKED_SCHEMA, "zstd", _make_checker(cfg))(iter([batch])))

    def sniff_all() -> None:
        for b in blobs:
            parse_header(b, KNOWN_IMAGE_FORMATS, DEFAULT_MAX_JPEG_SCANS)

    def count_scans() -> None:
        for b, i in zip(blobs, sos):
            b.count(b"\xff\xda", i)

    n = len(entries)
    rows = [
        ("listing (scandir + stat), all files", cpu(lambda: consume(list_unit(Unit(root, root, True))), n), ""),
        ("read (prefetched: fadvise + read)", cpu(lambda: consume(prefetched(part, 64 << 20)), sample), "warm cache"),
        ("sha256 of all bytes (content_hash)", cpu(lambda: [content_hash(b) for b in blobs], sample), ""),
        ("header sniff (parse_header)", cpu(sniff_all, sample), ""),
        ("  of which the scan count (bytes.count of FF DA)", cpu(count_scans, sample), "inside parse_header"),
        ("decode_check (JPEG at 1/8, grey)", cpu(lambda: [decode_check(b, 100_000_000, True) for b in blobs], sample),
         "full only"),
    ]
    for mode in ("header", "full"):
        whole_task(mode)  # warm-up
        rows.append((f"whole check task, {mode}, outside Spark", cpu(lambda: whole_task(mode), n, 3),
                     "listing to Parquet file, one task"))
    shutil.rmtree(out_dir, ignore_errors=True)
    rows.append(("baseline's decode: PIL open + convert RGB", cpu(
        lambda: [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs], sample, 3), "for reference"))
    cv2 = decoder_cv2(100_000_000)
    rows.append(("  cv2.imdecode full size, colour", cpu(
        lambda: [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in blobs], sample, 3),
        "for reference"))
    return rows


def realsize_main(args) -> None:
    """The bench on ``--realsize`` real-size photos: ours full/header vs the baseline, median of rounds."""
    import json
    import statistics
    import subprocess

    sys.path.insert(0, str(REPO))
    from imgfeat.metadata.config import load_config
    from imgfeat.metadata.manifest.job import run_manifest
    from imgfeat.metadata.spark.session import get_spark

    n = args.realsize
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-manifest-real-"))
    data, warm = work / f"real{n}_{args.min_side}-{args.max_side}", work / "real_warm"
    for folder, count, seed in ((data, n, 0), (warm, 300, 1000)):
        if not folder.exists() or sum(1 for _ in folder.rglob("*.jpg")) != count:
            shutil.rmtree(folder, ignore_errors=True)
            make_realsize(folder, count, args.min_side, args.max_side, seed)
    files = sorted(data.rglob("*.jpg"))
    sizes = [p.stat().st_size for p in files]
    kinds = {k: sum(1 for p in files if p.name.split("_")[1] == k) for k in ("mosaic", "single", "photo")}
    start_note = load_note()
    breakdown = cpu_breakdown(data)
    for name, us, note in breakdown:
        print(f"{name:50s} {us:8.1f} us/file  {note}", flush=True)
    tiny = work / "tiny"
    if not tiny.exists():
        (tiny / "a").mkdir(parents=True)
        for p in sorted(warm.rglob("*.jpg"))[:20]:
            shutil.copy(p, tiny / "a" / p.name)
    cfgs = {m: load_config(None, {"spark": {"master": args.master}, "manifest": {"validation": m}})
            for m in ("full", "header")}
    spark = get_spark(cfgs["full"].spark)
    for m in ("full", "header"):  # warm-up: JVM, Python workers and their imports, both paths
        run_manifest(cfgs[m], [str(warm)], str(work / f"warm_{m}"))
    baseline(spark, warm, work / "warm_base")
    fixed = {}  # one run's fixed cost: the same job on 20 photos (warm page cache), median of 5
    for m in ("full", "header"):
        fixed[m] = statistics.median(run_manifest(cfgs[m], [str(tiny)], str(work / f"tiny_{m}"))["timings"]["total_s"]
                                     for _ in range(5))
    fixed["baseline"] = statistics.median(baseline(spark, tiny, work / "tiny_base") for _ in range(5))

    runs: dict[str, list[dict]] = {"full": [], "header": [], "baseline": []}
    cache = ""
    for r in range(args.repeats):
        for name in ("full", "header", "baseline"):
            cache = cold_cache()
            load = os.getloadavg()[0]
            before = cpu_snapshot()
            if name == "baseline":
                secs, stages = baseline(spark, data, work / "base_out"), None
            else:
                summary = run_manifest(cfgs[name], [str(data)], str(work / f"out_{name}"))
                assert summary["total"] == n and summary["by_status"].get("ok") == n, summary["by_status"]
                secs, stages = summary["timings"]["total_s"], summary["timings"]
            after = cpu_snapshot()
            cpu = {k: after[k] - before[k] for k in after}
            ours = sum(v for k, v in cpu.items() if k != "machine busy")
            runs[name].append({"s": secs, "stages": stages, "cpu": cpu, "others": cpu["machine busy"] - ours,
                               "load": load})
            print(f"round {r} {name}: {secs:.2f}s cpu {ours:.1f}s others {cpu['machine busy'] - ours:.1f}s "
                  f"load {load:.1f}", flush=True)
    cli = []
    if args.cli:
        for m in ("full", "header"):
            cache = cold_cache()
            busy0 = cpu_snapshot()["machine busy"]
            t = time.perf_counter()
            out = work / f"cli_{m}"
            subprocess.run([sys.executable, "-m", "imgfeat.metadata", str(data), "--out", str(out), "--master", args.master,
                            "--validation", m, "-q"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t
            busy = cpu_snapshot()["machine busy"] - busy0  # its JVM is not reaped by it: count the whole machine
            cli.append((m, wall, json.loads((out / "manifest_summary.json").read_text())["timings"], busy))
    spark.stop()

    med = {k: statistics.median(r["s"] for r in v) for k, v in runs.items()}
    lines = [
        f"Data: {n} JPEG photos made by `sample.realsize` (seeds 0-9, one per class) from the Fruits-360 Training "
        f"photos, in 10 class folders: {kinds['mosaic']} mosaics of photo tiles, {kinds['single']} single upscaled "
        f"photos, {kinds['photo']} crops of scikit-learn's two sample photos; both sides {args.min_side} to "
        f"{args.max_side} px, JPEG quality 85 to 95, about 12 % grey; "
        f"{sum(sizes) / 1e6:.0f} MB, {statistics.mean(sizes) / 1e3:.1f} KB mean, "
        f"{statistics.median(sizes) / 1e3:.1f} KB median per file.  ",
        f"Machine: {os.cpu_count()} cores, Spark master {args.master}, files {cache}; {args.repeats} rounds of "
        f"(full, header, baseline), medians below; {start_note} at the start, {load_note()} at the end. Command: "
        f"`.venv/bin/python bench/bench_manifest.py --realsize {n} --repeats {args.repeats}"
        f"{' --cli' if args.cli else ''} --master '{args.master}'`",
        "",
        "| pipeline | files | seconds (median) | every run (s) | files/s | vs baseline (medians) | list + check s |"
        " organize + write s | CPU ms/file: Python workers | JVM | driver | other processes' CPU s during the run |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, title in (("full", "imgfeat manifest (full)"), ("header", "imgfeat manifest (header)"),
                        ("baseline", "baseline: binaryFile + PIL pandas UDF")):
        rs = runs[name]
        st = rs[0]["stages"]
        split = ("| | |" if st is None else
                 f"| {statistics.median(r['stages']['check_s'] for r in rs):.2f} "
                 f"| {statistics.median(r['stages']['organize_s'] + r['stages']['write_s'] for r in rs):.2f} |")
        per = {k: statistics.median(r["cpu"][k] for r in rs) / n * 1e3 for k in ("python workers", "jvm", "driver")}
        every = ", ".join(f"{r['s']:.2f}" for r in rs)
        others = ", ".join(f"{r['others']:.1f}" for r in rs)
        lines.append(
            f"| {title} | {n} | {med[name]:.2f} | {every} | {n / med[name]:,.0f} "
            f"| {med['baseline'] / med[name]:.1f}x {split} {per['python workers']:.2f} | {per['jvm']:.2f} "
            f"| {per['driver']:.2f} | {others} |")
    lines.append("")
    for name, goal in (("full", 10), ("header", 30)):
        per_round = [b["s"] / o["s"] for o, b in zip(runs[name], runs["baseline"])]
        ratio = med["baseline"] / med[name]
        lines.append(f"Goal for `{name}`: at least {goal}x the baseline; measured {ratio:.1f}x on the medians "
                     f"(per round: {', '.join(f'{x:.1f}x' for x in per_round)}): "
                     f"{'met' if ratio >= goal else 'NOT met'}.  ")
    for m, wall, t, busy in cli:
        lines.append(f"CLI `python -m imgfeat.metadata --validation {m}` in a fresh process (page cache dropped first): "
                     f"{wall:.1f} s wall ({med['baseline'] / wall:.1f}x the in-process baseline median); inside: "
                     f"Spark start {t['spark_start_s']:.1f} s, list + check {t['check_s']:.2f} s, organize + write "
                     f"{t['organize_s'] + t['write_s']:.2f} s, total {t['total_s']:.1f} s; CPU used on the machine "
                     f"during it (its processes and any others) {busy:.1f} s.  ")
    lines += [
        "",
        f"Fixed cost of one run (the same job on 20 of these photos, warm page cache, median of 5): ours full "
        f"{fixed['full']:.2f} s, header {fixed['header']:.2f} s; baseline {fixed['baseline']:.2f} s.",
        "",
        f"Where the check task's CPU goes (one process, one thread, warm page cache, median of 5; parts on the first "
        f"{min(n, 2000):,} photos, whole task on all {n:,}; command above):",
        "",
        "| part | CPU us per file | note |",
        "|---|---:|---|",
    ]
    lines += [f"| {name.strip()} | {us:.1f} | {note} |" for name, us, note in breakdown]
    text = "\n".join(lines)
    print(text)
    out = Path(args.results) if args.results else REPO / "bench" / "RESULTS-manifest-realsize.md"
    out.write_text("## Manifest on real-size photos\n\n" + text + "\n")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--keep", help="reuse/keep the replicated tree in this folder")
    parser.add_argument("--realsize", type=int, default=0, metavar="N",
                        help="bench on N real-size photos (sample.realsize) instead of the 100x100 copies")
    parser.add_argument("--min-side", type=int, default=240, help="real-size mode: smallest side (px)")
    parser.add_argument("--max-side", type=int, default=800, help="real-size mode: largest side (px)")
    parser.add_argument("--repeats", type=int, default=3, help="real-size mode: rounds (medians reported)")
    parser.add_argument("--cli", action="store_true", help="real-size mode: also time `python -m imgfeat.metadata`")
    parser.add_argument("--results", help="markdown output (default bench/RESULTS-manifest[-realsize].md)")
    args = parser.parse_args()
    if not FRUITS.exists():
        sys.exit(f"skip: {FRUITS} is absent (see shared/README.md)")
    if args.realsize:
        realsize_main(args)
        return
    sys.path.insert(0, str(REPO))
    from imgfeat.metadata.config import load_config
    from imgfeat.metadata.manifest.job import run_manifest
    from imgfeat.metadata.spark.session import get_spark

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-manifest-"))
    small, big = work / "x1", work / f"x{args.copies}"
    n_small = sum(1 for _ in small.rglob("*.jpg")) if small.exists() else replicate(small, 1)
    n_big = sum(1 for _ in big.rglob("*.jpg")) if big.exists() else replicate(big, args.copies)
    cfg = load_config(None, {"spark": {"master": args.master}})
    spark = get_spark(cfg.spark)
    rows = []
    # Warm-up: JVM, Python workers, page cache, for both paths.
    run_manifest(cfg, [str(small)], str(work / "warm"))
    baseline(spark, small, work / "warm_base")

    mem = []
    cache = ""
    for label, src, n in (("x1", small, n_small), (f"x{args.copies}", big, n_big)):
        gc.collect()
        for mode in ("full", "header"):
            cfg_mode = load_config(None, {"spark": {"master": args.master}, "manifest": {"validation": mode}})
            cache = cold_cache()
            summary = run_manifest(cfg_mode, [str(src)], str(work / f"out_{label}_{mode}"))
            assert summary["total"] == n, (summary["total"], n)
            rows.append((f"imgfeat manifest ({mode})", label, n, summary["timings"]["total_s"], summary["timings"]))
        mem.append((label, n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, jvm_used_mb(spark)))
        cache = cold_cache()
        secs = baseline(spark, src, work / f"base_{label}")
        rows.append(("baseline: binaryFile + PIL pandas UDF", label, n, secs, None))

    base = {r[1]: r[3] for r in rows if r[0].startswith("baseline")}
    lines = [
        f"Machine: {os.cpu_count()} cores, Spark master {args.master}, files {cache}. Command: "
        f"`.venv/bin/python bench/bench_manifest.py --copies {args.copies} --master '{args.master}'`",
        "",
        "| pipeline | data | files | seconds (end to end) | files/s | vs baseline | list + check s | organize + write s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, label, n, secs, stages in rows:
        ratio = base[label] / secs
        split = ("| | |" if stages is None else
                 f"| {stages['check_s']:.2f} | {stages['organize_s'] + stages['write_s']:.2f} |")
        lines.append(f"| {name} | {label} | {n} | {secs:.1f} | {n / secs:,.0f} | {ratio:.1f}x {split}")
    goals = {"full": 10, "header": 30}
    lines.append("")
    for name, label, n, secs, _ in rows:
        goal = name[name.find("(") + 1:-1] if name.startswith("imgfeat") else ""
        if goal in goals and label != "x1":
            ratio = base[label] / secs
            lines.append(f"Goal for `{goal}` on {label}: at least {goals[goal]}x the baseline; measured "
                         f"{ratio:.1f}x: {'met' if ratio >= goals[goal] else 'NOT met'}.  ")
    lines += ["", "| data | files | driver Python max RSS (MB) | driver JVM used heap after GC (MB) |", "|---|---:|---:|---:|"]
    lines += [f"| {label} | {n} | {rss:.0f} | {heap:.0f} |" for label, n, rss, heap in mem]
    text = "\n".join(lines)
    print(text)
    (Path(args.results) if args.results else REPO / "bench" / "RESULTS-manifest.md").write_text(
        "## Manifest job\n\n" + text + "\n")
    spark.stop()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
