"""The manifest as a Delta table (``[manifest] table_format = "delta"``), with the ``deltalake`` package.

A Delta table is a folder of Parquet files plus ``_delta_log/``, the ordered list of commits that says
which files make each version. The manifest job writes its Parquet files as before (executors, through
fsspec), moves them into the table folder under their unique names and commits them in one Delta
transaction: version 0 creates the table, every later run is one ``overwrite`` commit that removes the
previous version's files from the table and adds the new ones (the files stay on disk for time travel
until a ``VACUUM``). No row passes through the driver: it reads each new file's Parquet footer for its
row count (O(files)) and writes the commit.

Readers must not glob the folder (it holds every version's files): ``current_files`` and
``data_file_sizes`` list the files of one version from the log, and ``open_dataset`` gives a pyarrow
dataset of it (what ``read_manifest``, Spark's reads and the shard index use). DuckDB and polars read
the same table (``duckdb.from_arrow(open_dataset(...))``, ``polars.read_delta``), and so does Spark with
Delta Lake (``spark.read.format("delta").load(OUT/manifest)``, ``versionAsOf`` for time travel) where the
Delta jars are installed, as on Databricks.

Local folders only here: delta-rs reaches object stores through its own configuration (``AWS_*``
variables), not fsspec, and that path is not tested.
"""
from __future__ import annotations

import json
import time
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from imgfeat.metadata import storage

DELTA_LOG = "_delta_log"


def is_delta(url: str) -> bool:
    """Whether the folder at ``url`` is a Delta table (it has a ``_delta_log/``)."""
    fs, root = fsspec.core.url_to_fs(storage.join(url, DELTA_LOG))
    return fs.isdir(root)


def _local(url: str) -> str:
    fs, path = fsspec.core.url_to_fs(url)
    if "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        raise ValueError(f"{url}: manifest.table_format = 'delta' works on local folders only in this release")
    return path


def _table(url: str, version: int | None = None) -> Any:
    from deltalake import DeltaTable

    return DeltaTable(_local(url), version=version)


def table_version(url: str) -> int:
    """The current version of the Delta table at ``url``."""
    return int(_table(url).version())


def data_file_sizes(url: str, version: int | None = None) -> dict[str, int]:
    """The data files of a version (default: the current one) of the table at ``url``: relative name -> bytes."""
    actions = pa.table(_table(url, version).get_add_actions(flatten=True))
    return dict(zip(actions["path"].to_pylist(), (int(v) for v in actions["size_bytes"].to_pylist())))


def current_files(url: str, version: int | None = None) -> list[str]:
    """The data files of a version (default: the current one) of the table at ``url``, as full URLs, sorted."""
    return sorted(storage.join(url, name) for name in data_file_sizes(url, version))


def open_dataset(url: str, version: int | None = None) -> Any:
    """A pyarrow dataset of a version (default: the current one) of the Delta table at ``url``."""
    return _table(url, version).to_pyarrow_dataset()


def history(url: str) -> list[dict[str, Any]]:
    """The table's commits, newest first: version, operation, timestamp and imgfeat's counts."""
    return [{k: h.get(k) for k in ("version", "operation", "timestamp", "imgfeat")} for h in _table(url).history()]


def publish_dataset(table: str, staging: str, schema: pa.Schema, note: dict[str, Any],
                    extra_files: tuple[str, ...] = ()) -> int:
    """Move the data files of the finished Parquet dataset folder ``staging`` into the Delta table folder
    ``table`` and commit them as its next version (``commit_files``); then move ``extra_files`` (names in
    ``staging``, e.g. the manifest's shard index) beside them. Returns the Delta version. A folder at
    ``table`` that is not a Delta table (an earlier Parquet layout) is removed first. Until the commit the
    moved files are in no version, so readers see the previous one."""
    fs, root = fsspec.core.url_to_fs(table)
    if fs.exists(root) and not is_delta(table):
        storage.remove_folder(table)
    sfs, sroot = fsspec.core.url_to_fs(staging)
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in sfs.ls(sroot, detail=False))
    data = [n for n in names if n.endswith(".parquet") and not n.startswith(("_", "."))]
    for name in data:
        storage.move_file(storage.join(staging, name), storage.join(table, name))
    version = commit_files(table, data, schema, note)
    for name in extra_files:
        if name in names:
            storage.move_file(storage.join(staging, name), storage.join(table, name))
    return version


def commit_files(url: str, names: list[str], schema: pa.Schema, note: dict[str, Any]) -> int:
    """Make the Parquet files ``names`` (already in the folder ``url``) the table's next version and return
    it: the table is created at version 0 when ``url`` is not a Delta table yet, else one ``overwrite``
    commit replaces the previous version's files. ``note`` (JSON-able) is kept in the commit as
    ``imgfeat`` (``history``)."""
    from deltalake import Schema
    from deltalake.transaction import AddAction, CommitProperties, create_table_with_add_actions

    path = _local(url)
    fs = fsspec.filesystem("file")
    now = int(time.time() * 1000)
    adds = []
    for name in names:
        full = f"{path.rstrip('/')}/{name}"
        rows = pq.ParquetFile(full).metadata.num_rows
        adds.append(AddAction(name, int(fs.size(full)), {}, now, True, json.dumps({"numRecords": rows})))
    props = CommitProperties(custom_metadata={"imgfeat": json.dumps(note, sort_keys=True)})
    delta_schema = Schema.from_arrow(schema)
    if not is_delta(url):
        create_table_with_add_actions(path, delta_schema, adds, mode="error", name="imgfeat manifest",
                                      commit_properties=props)
    else:
        _table(url).create_write_transaction(adds, mode="overwrite", schema=delta_schema, commit_properties=props)
    return table_version(url)
