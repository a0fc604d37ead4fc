"""Featurize at cluster scale: the manifest's shard index, per-rank manifest reads, restarts without hashing,
and checksums where shards are read back."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from bench.countfs import CountingFS
from imgfeat.featurize import assign as assign_mod
from imgfeat.featurize import summary as summary_mod
from imgfeat.featurize.fingerprint import digest
from imgfeat.featurize.folder import prepare_folder
from imgfeat.metadata.config import Config
from imgfeat.metadata.contracts import feature_store, shard_index, shards
from imgfeat.metadata.contracts.schema import MANIFEST_DIR, SUMMARY_FILE, conform_to_manifest, manifest_path, read_manifest
from imgfeat.verify import verify_run

ROWS, PER_SHARD, FILES, ROW_GROUP = 12_000, 250, 4, 125




def _rows(n: int, per_shard: int, seed: int = 0) -> pa.Table:
    """Synthetic manifest rows; every 50th row flagged, ok rows dealt over shards of ``per_shard``."""
    rng = np.random.default_rng(seed)
    ids = [f"{v:032x}" for v in rng.integers(0, 2**62, size=n)]
    status = ["ok" if i % 50 else "undecodable" for i in range(n)]
    ok_rank = np.cumsum([s == "ok" for s in status]) - 1
    shard = [int(r) // per_shard if s == "ok" else None for r, s in zip(ok_rank, status)]
    return conform_to_manifest(pa.table({
        "image_id": ids, "path": [f"file:///data/img/{i:07d}.jpg" for i in range(n)], "rel_path": [f"{i}.jpg" for i in range(n)],
        "label": [f"c{i % 7}" for i in range(n)], "label_index": pa.array([i % 7 for i in range(n)], pa.int32()),
        "split": ["train" if i % 4 else "val" for i in range(n)], "size_bytes": pa.array(np.full(n, 1000), pa.int64()),
        "mtime": pa.array(np.zeros(n)), "format": ["jpeg"] * n, "width": pa.array(np.full(n, 64), pa.int32()),
        "height": pa.array(np.full(n, 48), pa.int32()), "channels": pa.array(np.full(n, 3), pa.int32()),
        "content_hash": [None] * n, "duplicate_of": [None] * n, "status": status, "status_detail": [""] * n,
        "shard": pa.array(shard, pa.int32()),
    }))


def write_clustered(out: Path, table: pa.Table, files: int, row_group: int) -> Path:
    """The manifest at ``out`` written clustered by shard over ``files`` files, row groups of ``row_group``."""
    table = table.sort_by([("shard", "ascending"), ("image_id", "ascending")])
    folder = out / MANIFEST_DIR
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-table.num_rows // files)
    for k in range(files):
        pq.write_table(table.slice(k * per, per), folder / f"part-{k:05d}.parquet", row_group_size=row_group)
    ok = sum(s == "ok" for s in table.column("status").to_pylist())
    (out / SUMMARY_FILE).write_text(json.dumps({"total": table.num_rows, "by_status": {"ok": ok}, "num_shards": 0,
                                                "version": 1, "fingerprint": "test"}))
    return out


def today_members(table: pa.Table) -> dict[int, tuple[int, str]]:
    """Per shard (rows, members digest) as featurize computed them before the index: every ok row, in Python."""
    groups: dict[int, list[str]] = {}
    for image_id, status, shard in zip(*(table.column(c).to_pylist() for c in ("image_id", "status", "shard"))):
        if status == "ok" and shard is not None:
            groups.setdefault(int(shard), []).append(image_id)
    return {s: (len(ids), shards.members_digest(ids)) for s, ids in groups.items()}


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, spark) -> Path:
    """A clustered manifest with its shard index, built on Spark."""
    out = write_clustered(tmp_path_factory.mktemp("indexed"), _rows(ROWS, PER_SHARD), FILES, ROW_GROUP)
    info = shard_index.build_shard_index(spark, manifest_path(str(out)))
    assert info["rows"] == sum(1 for i in range(ROWS) if i % 50) and info["url"].endswith("/_shards.parquet")
    return out


def test_shard_index_equals_featurize_members(indexed) -> None:
    table = read_manifest(str(indexed))
    assert table.num_rows == ROWS  # _shards.parquet is not a manifest file
    index = shard_index.read_shard_index(str(indexed))
    assert index is not None and index.schema.names == ["shard", "rows", "members", "files"]
    got = {s: (n, m) for s, n, m in zip(*(index.column(c).to_pylist() for c in ("shard", "rows", "members")))}
    assert got == today_members(table)
    assert index.column("shard").to_pylist() == sorted(got)
    # files: exactly the data files holding each shard's ok rows
    where: dict[int, set[str]] = {}
    for k in range(FILES):
        part = pq.read_table(indexed / MANIFEST_DIR / f"part-{k:05d}.parquet", columns=["shard", "status"])
        for s, st in zip(part.column("shard").to_pylist(), part.column("status").to_pylist()):
            if st == "ok":
                where.setdefault(s, set()).add(f"part-{k:05d}.parquet")
    assert {s: set(f) for s, f in zip(index.column("shard").to_pylist(), index.column("files").to_pylist())} == where
    # the featurize catalog from the index equals the one from the rows (the fallback)
    from_index = assign_mod.shard_catalog(str(indexed))
    from_rows = assign_mod.catalog_from_rows(str(indexed))
    assert {s: (e.rows, e.members) for s, e in from_index.items()} == {s: (e.rows, e.members) for s, e in from_rows.items()}


def test_stale_or_missing_index_is_ignored(tmp_path, indexed, caplog) -> None:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(indexed, out)
    assert shard_index.read_shard_index(str(out)) is not None
    extra = _rows(10, 5, seed=9)
    pq.write_table(extra, out / MANIFEST_DIR / "part-00099.parquet")  # the manifest changed after the index
    with caplog.at_level(logging.WARNING):
        assert shard_index.read_shard_index(str(out)) is None
    assert "changed since the shard index was built" in caplog.text
    (out / MANIFEST_DIR / shard_index.SHARD_INDEX_FILE).unlink()
    assert shard_index.read_shard_index(str(out)) is None
    caplog.clear()
    assign_mod._fallback_logged = False
    with caplog.at_level(logging.INFO, logger="imgfeat.featurize.assign"):
        assign_mod.shard_catalog(str(out))
        assign_mod.shard_catalog(str(out))
    assert caplog.text.count("listing shards from the manifest") == 1  # said once


@pytest.mark.parametrize("world", [2, 4])
def test_rank_reads_only_its_shards(indexed, world) -> None:
    url = "countfile://" + str(indexed)
    catalog = assign_mod.shard_catalog(url)
    everything = assign_mod.manifest_shards(str(indexed))  # all rows, grouped as featurize always did
    CountingFS.bytes_read = 0
    read_manifest(url, columns=assign_mod.MANIFEST_COLUMNS)
    whole = CountingFS.bytes_read
    pending = sorted(catalog)
    seen: list[int] = []
    for rank in range(world):
        mine = assign_mod.assign(pending, rank, world)
        CountingFS.bytes_read = 0
        work = assign_mod.read_shard_rows(url, mine, catalog=catalog)
        got = CountingFS.bytes_read
        assert sorted(work) == mine
        for s in mine:  # the same rows in the same order (by image_id) as the whole-manifest read
            assert work[s].rows.equals(everything[s].rows)
        assert got < 1.5 * whole / world, (rank, got, whole)
        seen.extend(mine)
    assert sorted(seen) == pending


def test_stale_index_rows_are_refused(tmp_path, indexed) -> None:
    catalog = dict(assign_mod.shard_catalog(str(indexed)))
    e = catalog[3]
    catalog[3] = assign_mod.ShardEntry(e.shard, e.rows, "0" * 64, e.files)
    with pytest.raises(ValueError, match="shard 3 .*rebuild it"):
        assign_mod.read_shard_rows(str(indexed), [3], catalog=catalog)


# -- restarts decide from markers and sizes; read-back checks sha256 -------------------------------------------


def _committed(tmp_path: Path, fmt: str = "npy") -> tuple[str, dict[int, assign_mod.ShardEntry], dict[str, Any]]:
    """A small manifest (no index) and a feature folder with all its shards committed (fake features)."""
    out = write_clustered(tmp_path / "m", _rows(400, 40, seed=3), 2, 50)
    catalog = assign_mod.shard_catalog(str(out))
    fields = {"model": "fake", "dim": 8}
    feat = str(tmp_path / "feat")
    work = assign_mod.read_shard_rows(str(out), list(catalog), catalog=catalog)
    for s, w in work.items():
        ids = w.image_ids
        feats = np.random.default_rng(s).standard_normal((len(ids) - 1, 8)).astype(np.float32)
        rejects = [{"image_id": ids[-1], "path": "x", "reason": "undecodable", "detail": ""}]
        feature_store.write_feature_shard(feat, s, ids[:-1], feats, rejects, fmt, digest(fields))
    return feat, catalog, fields


def _no_data_reads(monkeypatch) -> None:
    """Fail on any sha256 of a file, and on opening any feature data file."""
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a shard file was hashed")

    monkeypatch.setattr(shards, "file_digest", refuse)
    monkeypatch.setattr(shards, "read_verified", refuse)
    real_open = LocalFileSystem._open

    def guarded(self: LocalFileSystem, path: str, *args: Any, **kwargs: Any) -> Any:
        if path.endswith((".npy", ".h5")):
            raise AssertionError(f"opened feature data file {path}")
        return real_open(self, path, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "_open", guarded)


def test_resume_decides_without_reading_feature_data(tmp_path, monkeypatch) -> None:
    feat, catalog, fields = _committed(tmp_path)
    cfg = Config()
    _no_data_reads(monkeypatch)
    assert prepare_folder(cfg, feat, fields, catalog) == []
    assert summary_mod._all_committed(feat, catalog, digest(fields))
    # a data file of the wrong size, and a shard without its marker, are redone; nothing else
    path = Path(feat) / "part-00002.features.npy"
    path.write_bytes(path.read_bytes()[:-4])
    (Path(feat) / "part-00005.done.json").unlink()
    assert prepare_folder(cfg, feat, fields, catalog) == [2, 5]
    assert not summary_mod._all_committed(feat, catalog, digest(fields))


def test_resume_redoes_other_members(tmp_path, monkeypatch) -> None:
    feat, catalog, fields = _committed(tmp_path)
    e = catalog[1]
    catalog[1] = assign_mod.ShardEntry(e.shard, e.rows, "f" * 64, e.files)  # the manifest's shard 1 changed
    _no_data_reads(monkeypatch)
    assert prepare_folder(Config(), feat, fields, catalog) == [1]


@pytest.mark.parametrize("fmt", ["npy", "hdf5"])
def test_flipped_byte_is_caught_on_read_back(tmp_path, fmt) -> None:
    feat, catalog, fields = _committed(tmp_path, fmt)
    name = "part-00003.features.npy" if fmt == "npy" else "part-00003.h5"
    path = Path(feat) / name
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # same size, one byte differs (feature values, not the header)
    path.write_bytes(bytes(data))
    assert prepare_folder(Config(), feat, fields, catalog) == []  # a restart checks sizes only, by design
    with pytest.raises(shards.ShardVerificationError, match=name):
        feature_store.read_features(feat)
    feature_store.read_features(feat, verify=False)  # unchecked reads still work
    v = verify_run(str(tmp_path / "m"), feat)
    assert not v.ok and name in v.problems[0] and "sha256" in v.problems[0]
    assert verify_run(str(tmp_path / "m"), feat, checksums=False).ok


# -- whole runs with a shard index ---------------------------------------------------------------------------

BASE = ["--model", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--size", "64", "--batch-size", "16", "--format", "npy",
        "--num-workers", "1", "-q"]


@pytest.fixture(scope="module")
def photo_manifests(tmp_path_factory, fruits_dir, torch_home, spark) -> tuple[Path, Path]:
    """The same photo manifest twice: with a shard index (built on Spark) and without."""
    import shutil

    from helpers import write_manifest
    from run_helpers import pick_images

    plain = write_manifest(tmp_path_factory.mktemp("plain"), pick_images(fruits_dir, per_class=3, offset=40), rows_per_shard=8)
    with_index = tmp_path_factory.mktemp("with_index") / "m"
    shutil.copytree(plain, with_index)
    shard_index.build_shard_index(spark, manifest_path(str(with_index)))
    assert shard_index.read_shard_index(str(with_index)) is not None
    return with_index, plain


def test_run_with_index_equals_run_without(tmp_path, photo_manifests, monkeypatch, caplog) -> None:
    from imgfeat.featurize.stage_cli import main as featurize_main

    from run_helpers import features_by_id

    with_index, plain = photo_manifests
    a, b = tmp_path / "a", tmp_path / "b"
    assign_mod._fallback_logged = False
    with caplog.at_level(logging.INFO, logger="imgfeat.featurize.assign"):
        assert featurize_main(["--manifest", str(with_index), "--out", str(a), *BASE]) == 0
    assert "listing shards from the manifest" not in caplog.text  # the index was used
    assert featurize_main(["--manifest", str(plain), "--out", str(b), *BASE]) == 0
    fa, fb = features_by_id(str(a)), features_by_id(str(b))
    assert fa.keys() == fb.keys() and len(fa) == 30 and all(np.array_equal(fa[k], fb[k]) for k in fa)
    ma, mb = shards.list_markers(str(a)), shards.list_markers(str(b))
    keep = ("rows", "rejects", "members", "fingerprint", "files", "dim", "dtype", "format", "manifest_rows")
    assert {s: {k: m[k] for k in keep} for s, m in ma.items()} == {s: {k: m[k] for k in keep} for s, m in mb.items()}
    sa = json.loads((a / shards.FEATURES_SUMMARY).read_text())
    sb = json.loads((b / shards.FEATURES_SUMMARY).read_text())
    assert sa.keys() == sb.keys() and sa["rows"] == sb["rows"] == 30 and sa["shards"] == sb["shards"] == 4
    # a rerun with everything committed hashes nothing and recomputes nothing
    before = {s: m["committed_at"] for s, m in ma.items()}
    _no_data_reads(monkeypatch)
    assert featurize_main(["--manifest", str(with_index), "--out", str(a), *BASE]) == 0
    assert {s: m["committed_at"] for s, m in shards.list_markers(str(a)).items()} == before


@pytest.mark.torchrun
def test_torchrun_two_ranks_with_index(tmp_path, photo_manifests) -> None:
    import subprocess

    from run_helpers import REPO, features_by_id, subprocess_env, torchrun_cmd

    with_index, plain = photo_manifests
    ref, feat = tmp_path / "ref", tmp_path / "feat"
    from imgfeat.featurize.stage_cli import main as featurize_main

    assert featurize_main(["--manifest", str(plain), "--out", str(ref), *BASE]) == 0
    res = subprocess.run(torchrun_cmd(2, ["--manifest", str(with_index), "--out", str(feat), *BASE], "--standalone"),
                         cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    markers = shards.list_markers(str(feat))
    assert {m["rank"] for m in markers.values()} == {0, 1}
    assert {s: m["rank"] for s, m in markers.items()} == {"part-00000": 0, "part-00001": 0, "part-00002": 1, "part-00003": 1}  # contiguous
    fa, fb = features_by_id(str(ref)), features_by_id(str(feat))
    assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)
