"""Listing by folders: every file listed once by exactly one task, whatever the tree's shape."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgfeat.metadata.contracts.schema import normalize_uri
from imgfeat.metadata.manifest.listing import Unit, list_folder, list_unit


def _make_tree(root: Path, shape: list[tuple[int, int]]) -> set[str]:
    """Folders by (depth, files) under ``root``: each item nests under the previous one when deeper."""
    made: set[str] = set()
    stack = [root]
    for depth, files in shape:
        depth = min(depth, len(stack))
        folder = stack[depth - 1] / f"d{len(made)}_{depth}" if depth else root
        folder.mkdir(parents=True, exist_ok=True)
        del stack[depth:]
        stack.append(folder)
        for i in range(files):
            f = folder / f"f{i:04d}.bin"
            f.write_bytes(b"x" * (i % 7))
            made.add("file://" + str(f))
    return made


def _walk(root: Path) -> set[str]:
    return {"file://" + os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs}


shapes = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 30)), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes)
def test_folder_walk_lists_every_file_once(tmp_path_factory, shape):
    root = tmp_path_factory.mktemp("tree")
    made = _make_tree(root, shape)
    uri = normalize_uri(str(root))
    listed = [e.path for e in list_unit(Unit(uri, uri, True))]
    assert len(listed) == len(set(listed)) and set(listed) == made == _walk(root)


def test_one_folder_lists_its_files_and_subfolders(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x.jpg").write_bytes(b"1")
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a")
    (tmp_path / "a" / "dead").symlink_to(tmp_path / "missing")
    root = normalize_uri(str(tmp_path))
    got = {e.path.rsplit("/", 1)[1]: e for e in list_folder(root, root + "/a")}
    assert got["b"].is_folder and got["x.jpg"].size == 1 and not got["x.jpg"].is_folder
    assert got["loop"].error and "loop" in got["loop"].error and not got["loop"].is_folder
    assert got["dead"].error == "broken symlink"


@pytest.mark.spark
@pytest.mark.parametrize("tasks", [1, 3, 8])
def test_spark_listing_covers_every_file_exactly_once(spark, tmp_path, tasks):
    """Deep folders, a flat folder of many files and empty folders: one entry per file, one listing per folder."""
    from imgfeat.metadata.manifest.discover import list_on_spark, listed_files

    made = _make_tree(tmp_path / "src", [(0, 3), (1, 0), (2, 5), (3, 2), (4, 1), (1, 400), (2, 0), (1, 7)])
    root = normalize_uri(str(tmp_path / "src"))
    info = list_on_spark(spark, [root], str(tmp_path / "listed"), tasks)
    rows = listed_files(spark, info, tasks).select("path", "error").collect()
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) and set(paths) == made and not any(r["error"] for r in rows)
    folders = {d for d, _, _ in os.walk(tmp_path / "src")}
    assert info["folders"] == len(folders)  # each folder listed once, by one task
    assert len(info["depths"]) == 5  # depth 0 (SRC) .. 4, one job each
