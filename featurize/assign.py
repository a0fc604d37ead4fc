"""Which shards this rank computes, and the manifest rows it reads for them.

Rank 0 lists the manifest's shards (:func:`shard_catalog`: from the manifest's shard index
``_shards.parquet``, O(shards); without one, from the ``shard`` and ``image_id`` columns), decides the
shards still to do (:func:`pending_shards`: no marker with this run's fingerprint and the manifest's
members, or a data file whose size differs from its marker; no file is hashed, no row read) and
broadcasts both. Every rank takes a contiguous run of the pending shards (:func:`assign`) and reads only
those shards' rows (:func:`read_shard_rows`: a pyarrow filter on ``shard`` that row-group statistics
prune on a manifest clustered by shard). Each shard is computed whole by one rank, so there is no
padding, no duplicate and no lock, and changing the world size between runs is fine.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from imgfeat.metadata import storage
from imgfeat.metadata.contracts import shards
from imgfeat.metadata.contracts.schema import STATUS_OK, manifest_path, read_manifest
from imgfeat.metadata.contracts.shard_index import read_dataset_shard_index
from imgfeat.metadata.contracts.tiles import TILE_SCHEMA, tiles_path
from imgfeat.preprocess.tile_dataset import as_tile_rows

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["image_id", "path", "label", "label_index", "split", "format", "width", "height", "status", "shard"]
TILE_KEY = "tile_id"
"""The key of the tile table (read as ``image_id``: ``preprocess.tile_dataset.as_tile_rows``)."""

_fallback_logged = False


@dataclass(frozen=True)
class ShardEntry:
    """One manifest shard as rank 0 knows it before reading rows: its ok row count, members digest and the
    manifest data files holding it (relative to the manifest folder; empty when unknown)."""

    shard: int
    rows: int
    members: str
    files: tuple[str, ...] = ()

    @property
    def stem(self) -> str:
        """The shard's file stem in the feature folder."""
        return shards.shard_stem(self.shard)

    def __len__(self) -> int:
        return self.rows


ShardCatalog = Mapping[int, ShardEntry]
"""Every manifest shard of this run, by shard number."""


@dataclass
class ShardWork:
    """One manifest shard: its rows in a fixed order (by image_id; tiles by image and box), independent of the reader."""

    shard: int
    rows: pa.Table

    @property
    def stem(self) -> str:
        """The shard's file stem in the feature folder."""
        return shards.shard_stem(self.shard)

    @property
    def image_ids(self) -> list[str]:
        """The shard's image ids, in row order."""
        return self.rows.column("image_id").to_pylist()

    @property
    def members(self) -> str:
        """The digest of the shard's image ids that its marker must carry."""
        return shards.members_digest(self.image_ids)

    def __len__(self) -> int:
        return self.rows.num_rows


def _usable(split: str | None) -> pc.Expression:
    """The filter of usable rows: status ok, with a shard (and of ``split``)."""
    expr = (pc.field("status") == STATUS_OK) & pc.field("shard").is_valid()
    return expr & (pc.field("split") == split) if split else expr


def catalog_from_index(index: pa.Table) -> dict[int, ShardEntry]:
    """The catalog of a shard index table (``contracts.shard_index``)."""
    cols = [index.column(c).to_pylist() for c in ("shard", "rows", "members", "files")]
    return {int(s): ShardEntry(int(s), int(n), str(m), tuple(f or ())) for s, n, m, f in zip(*cols)}


def _key(tiles: bool) -> str:
    return TILE_KEY if tiles else "image_id"


def _read_rows(manifest: str, columns: list[str], expr: pc.Expression, tiles: bool) -> pa.Table:
    """Rows of the manifest (a Delta one through its log) or of its tile table ``OUT/tiles/``."""
    if not tiles:
        return read_manifest(manifest, columns=columns, filters=expr)
    return _dataset(manifest, None, tiles).to_table(columns=columns, filter=expr)


def catalog_from_rows(manifest: str, split: str | None = None, tiles: bool = False) -> dict[int, ShardEntry]:
    """The catalog computed from the manifest's (or tile table's) ``shard`` and id columns (O(rows): tables
    without a shard index, and ``--split``)."""
    key = _key(tiles)
    table = _read_rows(manifest, ["shard", key], _usable(split), tiles).rename_columns(["shard", "image_id"])
    if table.num_rows == 0:
        raise ValueError(f"--manifest {manifest}: no usable rows (status ok with a shard)")
    table = table.sort_by([("shard", "ascending"), ("image_id", "ascending")])
    out: dict[int, ShardEntry] = {}
    for s, part in _groups(table):
        out[s] = ShardEntry(s, part.num_rows, shards.members_digest(part.column("image_id").to_pylist()))
    return out


def shard_catalog(manifest: str, split: str | None = None, tiles: bool = False) -> dict[int, ShardEntry]:
    """Every usable shard of the manifest at ``manifest`` (``tiles``: of its tile table): from its shard index
    when it has a valid one (O(shards)), else from its ``shard`` and id columns (said once in the log)."""
    global _fallback_logged
    index = read_dataset_shard_index(_root(manifest, tiles)) if split is None else None
    if index is not None:
        catalog = catalog_from_index(index)
        if not catalog:
            raise ValueError(f"--manifest {manifest}: no usable rows (status ok with a shard)")
        return catalog
    if not _fallback_logged:
        _fallback_logged = True
        why = f"--split {split} (the index covers every split)" if split else "the manifest has no valid shard index"
        log.info("%s: listing shards from the manifest's shard and image_id columns (every row, on rank 0)", why)
    return catalog_from_rows(manifest, split, tiles)


def _groups(table: pa.Table) -> list[tuple[int, pa.Table]]:
    """Slices of ``table`` (sorted by shard) with one shard each."""
    col = table.column("shard").to_numpy()
    if len(col) == 0:
        return []
    cuts = [0, *(np.flatnonzero(np.diff(col)) + 1).tolist(), len(col)]
    return [(int(col[a]), table.slice(a, b - a)) for a, b in zip(cuts[:-1], cuts[1:])]


MAX_RANGES = 64
"""Ranges of consecutive shards spelled out in a rank's filter (more: one range from the first to the last)."""


def shard_filter(wanted: Sequence[int]) -> pc.Expression:
    """``shard IN wanted``, and the ranges of consecutive shards it covers: pyarrow prunes row groups by their
    statistics against ranges, but against an ``IN`` only for short value lists."""
    ordered = sorted({int(s) for s in wanted})
    runs: list[tuple[int, int]] = []
    for s in ordered:
        if runs and s == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], s)
        else:
            runs.append((s, s))
    if len(runs) > MAX_RANGES:
        runs = [(ordered[0], ordered[-1])]
    field = pc.field("shard")
    ranges = [(field >= a) & (field <= b) for a, b in runs]
    any_range = ranges[0]
    for r in ranges[1:]:
        any_range = any_range | r
    return field.isin(ordered) & any_range


def _root(manifest: str, tiles: bool) -> str:
    return tiles_path(manifest) if tiles else manifest_path(manifest)


def _dataset(manifest: str, files: Sequence[str] | None, tiles: bool = False) -> ds.Dataset:
    """The manifest dataset (``tiles``: the tile table), or only its data ``files`` (relative to its folder)."""
    root = _root(manifest, tiles)
    fs, path = fsspec.core.url_to_fs(root)
    if files is None:
        if not fs.exists(path):
            what = "tile table" if tiles else "manifest"
            hint = "run `imgfeat manifest` with [tiles] enabled = true" if tiles else "run `imgfeat manifest` first"
            raise ValueError(f"--manifest {manifest}: no {what} at {root}; {hint}")
        return ds.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=True, ignore_prefixes=["_", "."])
    paths = [fsspec.core.url_to_fs(storage.join(root, f))[1] for f in files]
    return ds.dataset(paths, filesystem=fs, format="parquet")


def read_shard_rows(manifest: str, wanted: Sequence[int], split: str | None = None,
                    catalog: ShardCatalog | None = None, tiles: bool = False) -> dict[int, ShardWork]:
    """The usable rows of the shards ``wanted`` only, grouped by shard, each sorted by image_id.

    A pyarrow scan filtered by :func:`shard_filter` (Parquet row-group statistics skip the rest on a manifest
    clustered by shard), over only the data files the ``catalog`` names for them when it knows them.
    With a ``catalog``, each shard's rows must match its row count and members digest (else the shard
    index is stale: ``ValueError``)."""
    wanted = sorted({int(s) for s in wanted})
    if not wanted:
        return {}
    files: list[str] | None = None
    if catalog is not None and all(s in catalog and catalog[s].files for s in wanted):
        files = sorted({f for s in wanted for f in catalog[s].files})
    dataset = _dataset(manifest, files, tiles)
    wanted_columns = TILE_SCHEMA.names if tiles else MANIFEST_COLUMNS
    columns = [c for c in wanted_columns if c in dataset.schema.names]
    table = dataset.to_table(columns=columns, filter=shard_filter(wanted) & _usable(split))
    table = as_tile_rows(table) if tiles else table.sort_by([("shard", "ascending"), ("image_id", "ascending")])
    out = {s: ShardWork(s, part) for s, part in _groups(table)}
    missing = [s for s in wanted if s not in out]
    if missing:
        raise ValueError(f"--manifest {manifest}: shard {missing[0]} has no usable rows ({len(missing)} such), but the "
                         "shard list says it has: the manifest changed since, or its shard index (_shards.parquet) is "
                         "stale: rebuild it")
    if catalog is not None:
        for s, work in out.items():
            entry = catalog.get(s)
            if entry is None or len(work) != entry.rows or work.members != entry.members:
                raise ValueError(
                    f"--manifest {manifest}: shard {s} has {len(work)} usable rows, the shard list says "
                    f"{entry.rows if entry else 'none'} (or other members): the shard index (_shards.parquet) "
                    "does not describe this manifest: rebuild it")
    return out


def manifest_shards(manifest: str, split: str | None = None, tiles: bool = False) -> dict[int, ShardWork]:
    """Every usable shard's rows (the whole manifest or tile table: small ones, tools and tests)."""
    catalog = shard_catalog(manifest, split, tiles)
    return read_shard_rows(manifest, list(catalog), split, catalog, tiles)


def shard_is_done(folder: str, entry: ShardEntry, fingerprint: str, marker: Mapping[str, Any] | None,
                  sizes: Mapping[str, int]) -> bool:
    """Whether the shard is committed for this run: a features marker with this run's fingerprint, the
    manifest's members and row count, whose files all exist with the sizes it records (``sizes``: the
    folder listing, ``shards.folder_sizes``). No file is opened: checksums are checked where shards are
    read back (``feature_store``, ``imgfeat verify``, pca)."""
    if marker is None or marker.get("kind") != "features":
        return False
    if marker.get("fingerprint") != fingerprint or marker.get("members") != entry.members:
        return False
    if int(marker.get("rows", -1)) + int(marker.get("rejects", -1)) != entry.rows:
        return False
    try:
        shards.check_sizes(folder, entry.stem, marker, sizes)
    except shards.ShardVerificationError as exc:
        log.warning("%s: redoing it (%s)", entry.stem, exc)
        return False
    return True


def pending_shards(folder: str, catalog: ShardCatalog, fingerprint: str,
                   markers: Mapping[str, Mapping[str, Any]] | None = None,
                   sizes: Mapping[str, int] | None = None) -> list[int]:
    """Shards of the manifest still to compute, in shard order: O(shards), from the markers and one folder
    listing (given, or read here)."""
    markers = markers if markers is not None else shards.list_markers(folder)
    sizes = sizes if sizes is not None else shards.folder_sizes(folder)
    return [s for s in sorted(catalog) if not shard_is_done(folder, catalog[s], fingerprint, markers.get(catalog[s].stem), sizes)]


def assign(pending: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's share of the pending shards: a contiguous run of them in shard order, the runs' lengths
    differing by one at most. Contiguous, so a rank's rows sit together in a manifest clustered by shard."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    ordered = sorted(pending)
    n = len(ordered)
    return ordered[rank * n // world_size:(rank + 1) * n // world_size]


def orphan_shards(folder: str, catalog: ShardCatalog, markers: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """Stems of committed feature shards that the manifest does not have."""
    wanted = {w.stem for w in catalog.values()}
    markers = markers if markers is not None else shards.list_markers(folder)
    return sorted(s for s, m in markers.items() if m.get("kind") == "features" and s not in wanted)
