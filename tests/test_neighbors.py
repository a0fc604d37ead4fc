"""imgfeat neighbors: IVF pieces in numpy, the Spark job (recall, splits, pairs, both inputs) and the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_pca_stage import make_data

from imgfeat.metadata.config import Config
from imgfeat.metadata.contracts import feature_store
from imgfeat.metadata.neighbors import ivf

from helpers import gradient_image, write_image, write_manifest

pytestmark = pytest.mark.spark


def clustered(n: int, d: int, clusters: int, seed: int = 0, spread: float = 0.35) -> np.ndarray:
    """Gaussian clusters of uneven sizes around random centres (float32, not normalised)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    sizes = rng.dirichlet(np.full(clusters, 2.0))
    which = rng.choice(clusters, size=n, p=sizes)
    return (centres[which] + spread * rng.standard_normal((n, d))).astype(np.float32)


def cfg() -> Config:
    c = Config()
    c.spark.master = "local[2,3]"
    c.spark.partitions = 4
    return c.validate()


def write_shards(folder: Path, ids: list[str], x: np.ndarray, per_shard: int) -> str:
    for s, start in enumerate(range(0, len(ids), per_shard)):
        feature_store.write_feature_shard(str(folder), s, ids[start:start + per_shard], x[start:start + per_shard], [],
                                          "npy", "test")
    return str(folder)


def write_reduced(folder: Path, ids: list[str], x: np.ndarray) -> str:
    """A pca output folder as ``imgfeat pca`` writes it: reduced/ (Parquet + _SUCCESS)."""
    red = folder / "reduced"
    red.mkdir(parents=True)
    table = pa.table({"image_id": ids, "path": [None] * len(ids), "label": [None] * len(ids),
                      "label_index": pa.nulls(len(ids), pa.int32()), "split": [None] * len(ids),
                      "features_pca": pa.array(x.tolist(), pa.list_(pa.float32()))})
    half = len(ids) // 2
    pq.write_table(table.slice(0, half), red / "part-00000-a.parquet")
    pq.write_table(table.slice(half), red / "part-00001-b.parquet")
    (red / "_SUCCESS").write_text("{}\n")
    return str(folder)


def read_nb(out: Path) -> dict[str, list[tuple[str, float, int]]]:
    table = pq.read_table(out / "neighbors")
    got: dict[str, list[tuple[str, float, int]]] = {}
    for q, n, c, r in zip(*(table[name].to_pylist() for name in ("image_id", "neighbor_id", "cosine", "rank"))):
        got.setdefault(q, []).append((n, c, r))
    return {q: sorted(v, key=lambda t: t[2]) for q, v in got.items()}


# ---- numpy pieces -------------------------------------------------------------------------------------------


def test_search_in_blocks_equals_brute_force() -> None:
    x, ok = ivf.normalize_rows(np.random.default_rng(1).standard_normal((403, 12)))
    assert ok.all()
    base = x[:301]
    queries = x[250:]
    self_pos = np.where(np.arange(250, 403) < 301, np.arange(250, 403), -1)
    idx, sim = ivf.search(queries, base, 7, self_pos, q_block=37, b_block=53)
    full = queries @ base.T
    for i, p in enumerate(self_pos):
        if p >= 0:
            full[i, p] = -np.inf
    want = np.argsort(-full, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(sim, np.take_along_axis(full, want, axis=1), rtol=1e-5, atol=1e-6)
    # fewer base rows than k: padded with -1
    idx, sim = ivf.search(queries[:3], base[:4], 6)
    assert (idx[:, 4:] == -1).all() and np.isneginf(sim[:, 4:]).all() and (idx[:, :4] >= 0).all()


def test_normalize_flags_unusable_rows() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0], [np.nan, 1.0], [np.inf, 1.0]], dtype=np.float32)
    unit, ok = ivf.normalize_rows(x)
    assert ok.tolist() == [True, False, False, False]
    np.testing.assert_allclose(unit[0], [0.6, 0.8])
    assert np.isfinite(unit).all()


def test_kmeans_is_deterministic_with_a_seed() -> None:
    x, _ = ivf.normalize_rows(clustered(2000, 16, 20, seed=3))
    a = ivf.kmeans(x, 20, seed=7)
    b = ivf.kmeans(x, 20, seed=7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, ivf.kmeans(x, 20, seed=8))
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-5)
    # more cells than distinct points: empty cells are re-seeded, never NaN
    dup, _ = ivf.normalize_rows(np.repeat(np.eye(4, dtype=np.float32), 10, axis=0))
    c = ivf.kmeans(dup, 8, seed=0)
    assert c.shape == (8, 4) and np.isfinite(c).all()


def test_probe_cells_extend_until_k_neighbours_exist() -> None:
    cents = np.eye(4, dtype=np.float32)
    counts = np.array([1, 0, 3, 50])
    x = np.array([[1.0, 0.1, 0.05, 0.0]], dtype=np.float32)
    assert ivf.probe_cells(x, cents, 1, counts, need=1)[0].tolist() == [0]
    # 1 + 0 + 3 < 11: the fourth cell is needed too
    assert ivf.probe_cells(x, cents, 1, counts, need=11)[0].tolist() == [0, 1, 2, 3]
    assert ivf.probe_cells(x, cents, 1, counts, need=4)[0].tolist() == [0, 1, 2]


def test_block_split_bounds() -> None:
    assert ivf.blocks_for(100, 100) == 1 and ivf.blocks_for(101, 100) == 2 and ivf.blocks_for(1000, 100) == 13
    vids = (np.arange(1000) // 100 << 32) | (np.arange(1000) % 100)  # (shard, row) numbers
    blocks = ivf.block_of(vids, 13)
    assert np.bincount(blocks, minlength=13).max() <= 100  # about 1000 / 13 = 77 each
    np.testing.assert_array_equal(blocks, ivf.block_of(vids, np.full(1000, 13)))
    assert (ivf.block_of(vids, 1) == 0).all()
    assert ivf.default_block_rows(128) == 65_536 and ivf.default_block_rows(2048) == 16_384


# ---- the Spark job -------------------------------------------------------------------------------------------


def test_ivf_recall_and_output_schema(spark, tmp_path) -> None:
    from imgfeat.metadata.neighbors.job import NeighborParams, run_neighbors

    n, d, k = 3000, 24, 10
    data = make_data(tmp_path, n=n, d=d, per_shard=1000)
    x = clustered(n, d, 40, seed=5)
    feat = write_shards(tmp_path / "feat_c", data["ids"], x, 600)
    out = tmp_path / "nb"
    # block_rows 100: the biggest cells are split into blocks (a query searches every block of a cell it probes)
    summary = run_neighbors(cfg(), data["manifest"], feat, str(out), NeighborParams(k=k, nprobe=4, block_rows=100), spark=spark)
    table = pq.read_table(out / "neighbors")
    assert table.schema.names == ["image_id", "neighbor_id", "cosine", "rank"]
    assert [str(t) for t in table.schema.types] == ["string", "string", "float", "int32"]
    assert (out / "neighbors" / "_SUCCESS").exists() and (out / "neighbors_summary.json").exists()
    got = read_nb(out)
    assert len(got) == n and all(len(v) == k for v in got.values())
    assert summary["output_rows"] == n * k and summary["queries_short"] == 0
    assert all(q != nb for q, v in got.items() for nb, _, _ in v)
    assert all([r for _, _, r in v] == list(range(1, k + 1)) for v in got.values())
    assert summary["index"]["cells"] == round(n ** 0.5) and summary["index"]["split_cells"] >= 1
    # recall against brute force, and the cosines are the true ones
    unit, _ = ivf.normalize_rows(x)
    exact, exact_sim = ivf.brute_force(unit, k)
    ids = np.asarray(data["ids"])
    found = [[nb for nb, _, _ in got[i]] for i in ids]
    recall = ivf.recall_at_k(found, [ids[row].tolist() for row in exact])
    assert recall >= 0.95, recall
    pos = {i: j for j, i in enumerate(ids)}
    q0 = ids[0]
    for nb, c, _ in got[q0]:
        assert abs(c - float(unit[0] @ unit[pos[nb]])) < 1e-5


def planted(tmp_path: Path) -> dict:
    """120 random vectors (labels a/b/c by i % 3, split test when i % 5 == 0) with four planted near-duplicate
    pairs: same split and label, across splits only, across labels only, across both."""
    data = make_data(tmp_path, n=120, d=32)
    files = data["files"]
    x = np.random.default_rng(11).standard_normal((120, 32)).astype(np.float32)

    def find(same_split: bool, same_label: bool, taken: set[int]) -> tuple[int, int]:
        for i in range(120):
            for j in range(i + 1, 120):
                if i in taken or j in taken:
                    continue
                if (files[i]["split"] == files[j]["split"]) == same_split and (files[i]["label"] == files[j]["label"]) == same_label:
                    return i, j
        raise AssertionError("no such pair")

    taken: set[int] = set()
    pairs = {}
    for kind, ss, sl in (("dup", True, True), ("split", False, True), ("label", True, False), ("both", False, False)):
        i, j = find(ss, sl, taken)
        taken |= {i, j}
        x[j] = 1.5 * x[i] + 0.01 * np.random.default_rng(j).standard_normal(32).astype(np.float32)
        pairs[kind] = (data["ids"][i], data["ids"][j])
    feat = write_shards(tmp_path / "feat_p", data["ids"], x, 50)
    return {**data, "x": x, "pairs": pairs, "feat_p": feat}


def test_planted_pairs_from_shards_and_from_a_pca_output(spark, tmp_path) -> None:
    from imgfeat.metadata.neighbors.job import NeighborParams, run_neighbors

    data = planted(tmp_path)
    pairs = data["pairs"]
    out = tmp_path / "nb"
    # nprobe above the number of cells (11): every query searches every cell, so the search is exact
    s = run_neighbors(cfg(), data["manifest"], data["feat_p"], str(out), NeighborParams(k=5, nprobe=16), spark=spark)
    assert s["source"] == "shards" and s["rows"]["vectors"] == 120 and s["output_rows"] == 600
    nd = s["near_duplicates"]
    assert nd["pairs"] == 4 and nd["pairs_without_manifest_row"] == 0
    assert {tuple(sorted((e["image_id"], e["neighbor_id"]))) for e in nd["examples"]} == {tuple(sorted(p)) for p in pairs.values()}
    assert all(e["path"].startswith("file:///data/img/") and e["cosine"] >= 0.95 for e in nd["examples"])
    xs, xl = s["cross_split"], s["cross_label"]
    assert xs["pairs"] == 2 and xs["by_splits"] == {"test|train": 2}
    assert {tuple(sorted((e["image_id"], e["neighbor_id"]))) for e in xs["examples"]} == {
        tuple(sorted(pairs["split"])), tuple(sorted(pairs["both"]))}
    assert all(e["split"] != e["neighbor_split"] for e in xs["examples"])
    assert xl["pairs"] == 2 and sum(p["pairs"] for p in xl["label_pairs"]) == 2
    assert {tuple(sorted((e["image_id"], e["neighbor_id"]))) for e in xl["examples"]} == {
        tuple(sorted(pairs["label"])), tuple(sorted(pairs["both"]))}
    # each planted pair is each other's first neighbour
    got = read_nb(out)
    for a, b in pairs.values():
        assert got[a][0][0] == b and got[b][0][0] == a and got[a][0][1] > 0.99
    exact, _ = ivf.brute_force(ivf.normalize_rows(data["x"])[0], 5)
    ids = np.asarray(data["ids"])
    assert {q: [t[0] for t in v] for q, v in got.items()} == {ids[i]: ids[row].tolist() for i, row in enumerate(exact)}
    # the same vectors as a pca output folder (reduced/), cells over 7 rows split into blocks:
    # the same neighbours
    red = write_reduced(tmp_path / "red", data["ids"], data["x"])
    s2 = run_neighbors(cfg(), data["manifest"], red, str(tmp_path / "nb2"), NeighborParams(k=5, nprobe=16, block_rows=7),
                       spark=spark)
    assert s2["source"] == "reduced" and s2["near_duplicates"]["pairs"] == 4 and s2["cross_split"]["pairs"] == 2
    assert s2["index"]["split_cells"] >= 3 and s2["index"]["units"] > s2["index"]["cells"]
    got2 = read_nb(tmp_path / "nb2")
    assert {q: [t[0] for t in v] for q, v in got2.items()} == {q: [t[0] for t in v] for q, v in got.items()}


def test_unknown_or_missing_folder_is_a_value_error(tmp_path) -> None:
    from imgfeat.metadata.neighbors.job import detect_source

    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="junk: neither committed feature shards"):
        detect_source(str(tmp_path / "junk"))
    with pytest.raises(ValueError, match="no such folder"):
        detect_source(str(tmp_path / "absent"))


def test_cli_end_to_end(spark, tmp_path, capsys) -> None:
    from imgfeat.cli import main

    data = make_data(tmp_path, n=40, d=8, per_shard=10)
    out = tmp_path / "nb"
    rc = main(["neighbors", "--features", data["features"], "--manifest", data["manifest"], "--out", str(out),
               "--k", "3", "--min-cosine", "0.9", "--partitions", "2", "-q"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["output_rows"] == 120
    summary = json.loads((out / "neighbors_summary.json").read_text())
    assert summary["k"] == 3 and summary["min_cosine"] == 0.9 and summary["queries"] == 40
    assert len(pq.read_table(out / "neighbors")) == 120
    # expected errors: one line, exit 2, before any Spark work
    assert main(["neighbors", "--features", str(tmp_path), "--manifest", data["manifest"], "--out", str(out)]) == 2
    assert "imgfeat: error: --features" in capsys.readouterr().err
    assert main(["neighbors", "--features", data["features"], "--manifest", data["manifest"], "--out", str(out),
                 "--k", "0"]) == 2
    assert "imgfeat: error: neighbors.k must be >= 1" in capsys.readouterr().err


def test_the_config_section_holds_the_job_defaults() -> None:
    from imgfeat.metadata.config import NeighborsConfig, load_config
    from imgfeat.metadata.neighbors.job import NeighborParams

    assert NeighborParams.from_config(NeighborsConfig()) == NeighborParams()
    assert NeighborsConfig().enabled is False  # a Spark job more per run: opt-in
    with pytest.raises(ValueError, match=r"neighbors\.nprobe must be >= 1"):
        load_config(None, {"neighbors": {"nprobe": 0}})
    with pytest.raises(ValueError, match=r"neighbors\.min_cosine"):
        load_config(None, settings=["neighbors.min_cosine=1.5"])


# ---- a pca output as a Delta table ----------------------------------------------------------------------------


def _reduced_table(ids: list[str], x: np.ndarray) -> pa.Table:
    from imgfeat.metadata.pca.project import REDUCED_SCHEMA

    n = len(ids)
    return pa.table({"image_id": ids, "path": pa.nulls(n, pa.string()), "label": pa.nulls(n, pa.string()),
                     "label_index": pa.nulls(n, pa.int32()), "split": pa.nulls(n, pa.string()),
                     "features_pca": pa.array(x.tolist(), pa.list_(pa.float32()))}, schema=REDUCED_SCHEMA)


def _commit_version(table_dir: Path, tag: str, table: pa.Table) -> int:
    """Two files of ``table`` moved into the Delta table folder and committed as its next version (as pca does)."""
    from imgfeat.metadata.contracts import delta

    table_dir.mkdir(parents=True, exist_ok=True)
    half = table.num_rows // 2
    names = [f"part-00000-{tag}.parquet", f"part-00001-{tag}.parquet"]
    pq.write_table(table.slice(0, half), table_dir / names[0])
    pq.write_table(table.slice(half), table_dir / names[1])
    return delta.commit_files(str(table_dir), names, table.schema, {"rows": table.num_rows})


def test_a_delta_reduced_table_is_read_through_its_log(spark, tmp_path) -> None:
    """Version 1 drops 20 rows and changes every vector; version 0's files stay in the folder. A glob would
    read 220 rows (ids repeated); the log gives exactly version 1's 100 rows and their neighbours."""
    pytest.importorskip("deltalake", reason="the deltalake package is not installed (pip install -e .[test])")
    from imgfeat.metadata.neighbors.job import NeighborParams, run_neighbors

    data = planted(tmp_path)
    ids, x = np.asarray(data["ids"]), data["x"]
    planted_ids = {image_id for pair in data["pairs"].values() for image_id in pair}
    dropped = [i for i in range(120) if ids[i] not in planted_ids][:20]
    keep = np.array([i for i in range(120) if i not in dropped])
    red = tmp_path / "red_delta"
    old = np.random.default_rng(99).standard_normal((120, 32)).astype(np.float32)
    assert _commit_version(red / "reduced", "v0", _reduced_table(ids.tolist(), old)) == 0
    assert _commit_version(red / "reduced", "v1", _reduced_table(ids[keep].tolist(), x[keep])) == 1
    assert len(list((red / "reduced").glob("*.parquet"))) == 4  # version 0's files are still there

    out = tmp_path / "nb_delta"
    s = run_neighbors(cfg(), data["manifest"], str(red), str(out), NeighborParams(k=5, nprobe=16), spark=spark)
    assert s["source"] == "reduced" and s["source_delta_version"] == 1
    assert s["rows"]["feature_rows"] == 100 and s["output_rows"] == 500
    got = read_nb(out)
    assert set(got) == set(ids[keep].tolist())
    exact, _ = ivf.brute_force(ivf.normalize_rows(x[keep])[0], 5)
    assert {q: [t[0] for t in v] for q, v in got.items()} == {
        ids[keep][i]: ids[keep][row].tolist() for i, row in enumerate(exact)}
    assert s["near_duplicates"]["pairs"] == 4 and s["cross_split"]["pairs"] == 2 and s["cross_label"]["pairs"] == 2


# ---- in `imgfeat run` and its report ----------------------------------------------------------------------------


def _run_folder(root: Path) -> tuple[Path, dict[str, tuple[str, str]]]:
    """A run folder after the featurize stage: 90 real JPEGs (labels a/b/c, split test when i % 5 == 0) in the
    manifest, and feature shards with three planted near-duplicate pairs: same split and label, across splits,
    across labels."""
    from imgfeat.metadata.contracts.schema import image_id_for, normalize_uri

    files = [{"path": str(write_image(root / "src" / "abc"[i % 3] / f"{i:03d}.jpg", gradient_image(40, 56, seed=i))),
              "label": "abc"[i % 3], "split": "train" if i % 5 else "test"} for i in range(90)]
    run = root / "run"
    write_manifest(run, files)
    ids = [image_id_for(normalize_uri(f["path"])) for f in files]
    x = np.random.default_rng(5).standard_normal((90, 32)).astype(np.float32)
    pairs = {"same": (1, 4), "split": (5, 8), "label": (16, 17)}
    for kind, (i, j) in pairs.items():
        a, b = files[i], files[j]
        assert ((a["split"] != b["split"]), (a["label"] != b["label"])) == (kind == "split", kind == "label")
    for i, j in pairs.values():
        x[j] = x[i] + 1e-3 * np.random.default_rng(j).standard_normal(32).astype(np.float32)
    write_shards(run / "features", ids, x, 30)
    return run, {k: (ids[i], ids[j]) for k, (i, j) in pairs.items()}


def test_run_with_neighbors_enabled_reads_the_delta_pca_output_reports_pairs_and_skips_when_unchanged(spark, tmp_path) -> None:
    from imgfeat.metadata.config import load_config
    from imgfeat.run import run_pipeline

    run, pairs = _run_folder(tmp_path)
    conf = load_config(None, {"run": {"out": str(run), "stages": ["pca"]}, "spark": {"master": "local[2,3]", "partitions": 4},
                              "pca": {"k": 16, "table_format": "delta"},
                              "neighbors": {"enabled": True, "k": 5, "min_cosine": 0.99, "nprobe": 16}})
    report = run_pipeline(conf)
    state = json.loads((run / "run.json").read_text())["stages"]
    assert state["neighbors"]["skipped"] is False
    assert (state["neighbors"]["near_duplicates_pairs"], state["neighbors"]["cross_split_pairs"],
            state["neighbors"]["cross_label_pairs"]) == (3, 1, 1)
    nb = report["neighbors"]
    assert nb["source"] == "reduced" and nb["source_delta_version"] == 0 and nb["rows"]["vectors"] == 90
    assert {tuple(sorted((e["image_id"], e["neighbor_id"]))) for e in nb["near_duplicates"]["examples"]} == {
        tuple(sorted(p)) for p in pairs.values()}
    assert (run / "neighbors" / "neighbors" / "_SUCCESS").exists()

    page = (run / "report.html").read_text()
    section = page.split("<h2 id='neighbours'>Neighbours</h2>", 1)[1].split("<h2", 1)[0]
    assert "<b>3</b> semantic near duplicate(s), of which <b>1</b> across splits (leaks) and <b>1</b> across labels" in section
    assert "test|train" in section and "b / c" in section
    # one example pair per kind (the cross-split and cross-label pairs are near duplicates too: shown once), side by side
    assert section.count("<div class='pair'>") == 3 and section.count("data:image/png;base64,") == 6
    for kind in ("across splits", "across labels", "near duplicate"):
        assert f"<b>{kind}</b>" in section
    assert "neighbors ran" in page

    run_pipeline(conf)  # nothing changed: pca and neighbours are skipped, the section stays
    state = json.loads((run / "run.json").read_text())["stages"]
    assert state["pca"]["skipped"] and state["neighbors"]["skipped"] and state["neighbors"]["cross_label_pairs"] == 1
    assert "<h2 id='neighbours'>Neighbours</h2>" in (run / "report.html").read_text()
    conf.neighbors.k = 4  # a changed [neighbors] key reruns the stage only
    run_pipeline(conf)
    state = json.loads((run / "run.json").read_text())["stages"]
    assert state["pca"]["skipped"] and not state["neighbors"]["skipped"]
    assert json.loads((run / "neighbors" / "neighbors_summary.json").read_text())["k"] == 4


def test_neighbors_without_a_pca_output_is_refused_before_any_work(tmp_path) -> None:
    from imgfeat.metadata.config import load_config
    from imgfeat.run import run_pipeline

    write_manifest(tmp_path / "run", [{"path": "/data/img/a/0.jpg", "label": "a"}])
    conf = load_config(None, {"run": {"out": str(tmp_path / "run"), "stages": ["featurize"]}, "neighbors": {"enabled": True}})
    with pytest.raises(ValueError, match="neighbors.enabled: the neighbours stage reads the pca output"):
        run_pipeline(conf)


def test_the_report_has_no_neighbours_section_without_a_summary() -> None:
    from imgfeat.report import render_html

    page = render_html({"run": "r", "created_at": "now", "versions": {}}, [], {})
    assert "Neighbours" not in page
