"""Featurize at cluster scale, without a model: what each rank reads of the manifest, and what rank 0 reads
to decide the pending shards on a restart.

    .venv/bin/python bench/bench_featurize_scale.py [--rows 200000] [--rows-per-shard 1000] [--files 8]
        [--row-group 2000] [--worlds 1,2,4] [--dims 64,2048] [--index spark|arrow] [--torchrun] [--results FILE]

* A synthetic manifest (every manifest column, realistic strings; 2% of rows flagged) written with pyarrow
  clustered by shard (sorted by shard, split over ``--files`` files, row groups of ``--row-group`` rows),
  and its shard index ``_shards.parquet`` built on Spark (``contracts.shard_index.build_shard_index``,
  local[2]) or, with ``--index arrow``, from the rows with pyarrow (same file, no Spark).
* Manifest bytes per rank, counted under the reader (an fsspec filesystem that counts every byte read):
  before = every rank reads the whole manifest (featurize's 10 columns); after = each rank reads its own
  shards only (``assign.read_shard_rows``), with the index (its files, then row-group statistics) and
  without (row-group statistics over every file). Ranks are simulated: rank r of world w calls the
  per-rank read for ``assign.assign(pending, r, w)``.
* Rank 0's pending decision when every shard is committed (fake npy shards of float32 features with valid
  markers) at two feature sizes: after = ``assign.pending_shards`` (markers + one listing: O(shards));
  before = the check featurize made until now (each marker read alone, every file hashed with sha256).
  Page cache warm (the files were just written), so "before" is a lower bound for a cold object store.
* ``--torchrun``: each world also runs under ``torchrun --nproc-per-node W`` (``featurize_scale_rank.py``:
  rank 0 reads the shard index and broadcasts it, each rank reads its own shards, bytes counted in the
  rank's process), the largest rank's bytes beside the simulated figure.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import fsspec  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from bench.countfs import CountingFS  # noqa: E402
from imgfeat.featurize import assign as assign_mod  # noqa: E402
from imgfeat.metadata.contracts import feature_store, shard_index, shards  # noqa: E402
from imgfeat.metadata.contracts.schema import MANIFEST_DIR, MANIFEST_SCHEMA, SUMMARY_FILE, conform_to_manifest, manifest_path, read_manifest  # noqa: E402


def synthetic_manifest(out: Path, rows: int, per_shard: int, files: int, row_group: int) -> pa.Table:
    """Write the manifest at ``out`` clustered by shard; return its table."""
    rng = np.random.default_rng(0)
    ids = np.char.mod("%032x", rng.integers(0, 2**62, size=rows)).astype(str)
    flagged = rng.random(rows) < 0.02
    ok_rank = np.cumsum(~flagged) - 1
    shard = np.where(flagged, -1, ok_rank // per_shard)
    labels = np.char.mod("class_%03d", np.arange(rows) % 100).astype(str)
    paths = np.char.add(np.char.add("s3://bucket/images/", labels), np.char.mod("/img_%09d.jpg", np.arange(rows))).astype(str)
    n = rows
    table = conform_to_manifest(pa.table({
        "image_id": ids, "path": paths, "rel_path": np.char.mod("img_%09d.jpg", np.arange(rows)).astype(str),
        "label": labels, "label_index": pa.array(np.arange(rows) % 100, pa.int32()),
        "split": np.where(np.arange(rows) % 5 == 0, "val", "train"), "size_bytes": rng.integers(10_000, 500_000, n),
        "mtime": rng.random(n) * 1e9, "format": ["jpeg"] * n, "width": pa.array(rng.integers(64, 4000, n), pa.int32()),
        "height": pa.array(rng.integers(64, 4000, n), pa.int32()), "channels": pa.array(np.full(n, 3), pa.int32()),
        "content_hash": np.char.mod("%016x", rng.integers(0, 2**62, size=rows)).astype(str), "duplicate_of": pa.nulls(n, pa.string()),
        "status": np.where(flagged, "undecodable", "ok"), "status_detail": pa.nulls(n, pa.string()),
        "shard": pa.array(shard, pa.int32(), mask=shard < 0),
    }))
    table = table.sort_by([("shard", "ascending"), ("image_id", "ascending")])
    folder = out / MANIFEST_DIR
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-rows // files)
    for k in range(files):
        pq.write_table(table.slice(k * per, per), folder / f"part-{k:05d}.parquet", row_group_size=row_group, compression="zstd")
    (out / SUMMARY_FILE).write_text('{"total": %d, "by_status": {}, "num_shards": 0, "version": 1, "fingerprint": "bench"}' % rows)
    return table


def index_with_arrow(out: Path) -> None:
    """The shard index from the rows with pyarrow (same file as the Spark builder writes)."""
    dataset = manifest_path(str(out))
    catalog = assign_mod.catalog_from_rows(str(out))
    where: dict[int, set[str]] = {}
    for rel in shard_index.dataset_data_files(dataset):
        t = pq.read_table(Path(dataset) / rel, columns=["shard", "status"])
        for s in set(t.filter(pa.compute.equal(t["status"], "ok")).column("shard").to_pylist()):
            where.setdefault(int(s), set()).add(rel)
    table = pa.table({"shard": pa.array(list(catalog), pa.int32()), "rows": [e.rows for e in catalog.values()],
                      "members": [e.members for e in catalog.values()], "files": [sorted(where[s]) for s in catalog]})
    shard_index.write_shard_index(shard_index.index_url(dataset), table, shard_index.dataset_data_files(dataset))


def index_with_spark(out: Path) -> None:
    from imgfeat.metadata.config import SparkConfig
    from imgfeat.metadata.spark.session import get_spark

    spark = get_spark(SparkConfig(master="local[2]", driver_memory="2g", partitions=4))
    try:
        shard_index.build_shard_index(spark, manifest_path(str(out)))
    finally:
        spark.stop()


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def torchrun_reads(out: Path, world: int) -> tuple[int, int]:
    """(largest rank's manifest bytes, its rows) from ``torchrun --nproc-per-node world`` of
    ``featurize_scale_rank.py``: featurize's own start-up reads in real rank processes."""
    import json
    import subprocess

    torchrun = Path(sys.executable).with_name("torchrun")
    with tempfile.TemporaryDirectory(prefix="ranks-") as results:
        cmd = [str(torchrun), "--standalone", f"--nproc-per-node={world}",
               str(REPO / "bench" / "featurize_scale_rank.py"), str(out), results]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
        if proc.returncode:
            raise SystemExit(f"torchrun with {world} ranks failed:\n{proc.stderr[-3000:]}")
        ranks = [json.loads(p.read_text()) for p in Path(results).glob("rank-*.json")]
    if len(ranks) != world:
        raise SystemExit(f"torchrun with {world} ranks: {len(ranks)} rank results")
    worst = max(ranks, key=lambda r: r["bytes"])
    return worst["bytes"], worst["rows"]


def per_rank_reads(out: Path, worlds: list[int], use_torchrun: bool = False) -> list[list[str]]:
    url = "countfile://" + str(out)
    CountingFS.bytes_read = 0
    t0 = time.perf_counter()
    read_manifest(url, columns=assign_mod.MANIFEST_COLUMNS)
    whole, whole_s = CountingFS.bytes_read, time.perf_counter() - t0
    with_index = assign_mod.shard_catalog(url)
    pending = sorted(with_index)
    no_files = {s: assign_mod.ShardEntry(e.shard, e.rows, e.members) for s, e in with_index.items()}
    rows_out = []
    for world in worlds:
        stats: dict[str, list[tuple[int, float, int]]] = {"index": [], "stats": []}
        for rank in range(world):
            mine = assign_mod.assign(pending, rank, world)
            for key, catalog in (("index", with_index), ("stats", no_files)):
                CountingFS.bytes_read = 0
                t0 = time.perf_counter()
                work = assign_mod.read_shard_rows(url, mine, catalog=catalog)
                stats[key].append((CountingFS.bytes_read, time.perf_counter() - t0, sum(len(w) for w in work.values())))
        idx, st = stats["index"], stats["stats"]
        worst = max(b for b, _, _ in idx)
        row = [str(world), fmt_bytes(whole), fmt_bytes(worst), f"{worst / whole:.3f} (1/{world} = {1 / world:.3f})",
               fmt_bytes(max(b for b, _, _ in st)), f"{max(r for _, _, r in idx):,}",
               f"{whole_s:.3f} / {max(t for _, t, _ in idx):.3f}"]
        if use_torchrun:
            got, rows = torchrun_reads(out, world)
            row.append(f"{fmt_bytes(got)} ({got / whole:.3f}), {rows:,} rows")
        rows_out.append(row)
    return rows_out


def old_is_done(folder: str, entry: assign_mod.ShardEntry, fingerprint: str) -> bool:
    """The restart check featurize made until now: read the marker, then hash every file it lists."""
    marker = shards.read_marker(folder, entry.stem)
    if marker is None or marker.get("fingerprint") != fingerprint or marker.get("members") != entry.members:
        return False
    try:
        shards.verify_shard(folder, entry.stem, marker, checksums=True)
    except shards.ShardVerificationError:
        return False
    return True


def pending_decision(out: Path, tmp: Path, dims: list[int]) -> list[list[str]]:
    catalog = assign_mod.shard_catalog(str(out))
    work = assign_mod.read_shard_rows(str(out), list(catalog), catalog=catalog)
    rows_out = []
    rng = np.random.default_rng(1)
    for dim in dims:
        feat = tmp / f"feat-{dim}"
        t0 = time.perf_counter()
        for s, w in work.items():
            feats = rng.standard_normal((len(w), dim), dtype=np.float32)
            feature_store.write_feature_shard(str(feat), s, w.image_ids, feats, [], "npy", "fp-bench")
        write_s = time.perf_counter() - t0
        nbytes = sum(p.stat().st_size for p in feat.iterdir())
        t0 = time.perf_counter()
        pending = assign_mod.pending_shards(str(feat), catalog, "fp-bench")
        new_s = time.perf_counter() - t0
        assert pending == [], pending
        t0 = time.perf_counter()
        old = [s for s in sorted(catalog) if not old_is_done(str(feat), catalog[s], "fp-bench")]
        old_s = time.perf_counter() - t0
        assert old == []
        rows_out.append([str(dim), str(len(catalog)), fmt_bytes(nbytes), f"{new_s:.3f}", f"{old_s:.3f}", f"{write_s:.1f}"])
        shutil.rmtree(feat)
    return rows_out


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--rows-per-shard", type=int, default=1000)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--row-group", type=int, default=2000)
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--dims", default="64,2048")
    ap.add_argument("--index", choices=("spark", "arrow"), default="spark")
    ap.add_argument("--results", default=None, help="also write the Markdown to this file")
    ap.add_argument("--torchrun", action="store_true", help="also measure each world under torchrun (real rank processes)")
    args = ap.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]
    dims = [int(d) for d in args.dims.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="imgfeat-bench-scale-"))
    try:
        out = tmp / "out"
        t0 = time.perf_counter()
        synthetic_manifest(out, args.rows, args.rows_per_shard, args.files, args.row_group)
        manifest_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        (index_with_spark if args.index == "spark" else index_with_arrow)(out)
        index_s = time.perf_counter() - t0
        index_bytes = (Path(manifest_path(str(out))) / shard_index.SHARD_INDEX_FILE).stat().st_size
        manifest_bytes = sum(shard_index.dataset_data_files(manifest_path(str(out))).values())
        reads = per_rank_reads(out, worlds, args.torchrun)
        decide = pending_decision(out, tmp, dims)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cmd = " ".join([".venv/bin/python", "bench/bench_featurize_scale.py", *sys.argv[1:]])
    load = os.getloadavg()[0]
    text = "\n".join([
        "# Featurize at scale: manifest reads per rank, restart decision",
        "",
        f"Command: `{cmd}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, pyarrow {pa.__version__}; load average {load:.1f}.  ",
        f"Manifest: {args.rows:,} rows ({fmt_bytes(manifest_bytes)} zstd Parquet) in {args.files} files clustered by shard, "
        f"row groups of {args.row_group}, shards of {args.rows_per_shard} (written in {manifest_s:.1f} s); shard index "
        f"`_shards.parquet` {index_bytes / 1e3:.1f} kB, built with {args.index} in {index_s:.1f} s.",
        "",
        "Manifest bytes read per rank (counted under the reader; the largest rank):",
        "",
        table(["world", "before: whole manifest, every rank", "after: own shards, with index", "after / before",
               "after, no index (row-group stats only)", "rows per rank", "time s before / after",
               *(["under torchrun: largest rank (after / before), its rows"] if args.torchrun else [])], reads),
        "",
        "Rank 0 deciding the pending shards, every shard committed (npy float32, page cache warm):",
        "",
        table(["dim", "shards", "feature bytes", "after: markers + listing, s", "before: markers + sha256, s", "(write s)"], decide),
        "",
    ])
    print(text)
    if args.results:
        Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
