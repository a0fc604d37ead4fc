"""``imgfeat verify RUN``: prove that no row was lost or invented.

For every manifest shard: a committed feature shard whose files match its marker, whose ids plus
rejected ids are exactly the manifest's ok rows of that shard, with no id twice. In total: manifest
rows = feature rows + rejected rows + rows flagged by the manifest + tiled images (whose features are
their tiles'). With ``--tiles``, the same for the tile table ``OUT/tiles/`` and a folder of tile features
(keyed by ``tile_id``): tile rows = feature rows + rejected tiles. The first discrepancy is named.
"""
from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa

from imgfeat.layout import run_paths
from imgfeat.metadata import storage
from imgfeat.metadata.cli_common import add_common_args
from imgfeat.metadata.contracts import feature_store, shards
from imgfeat.metadata.contracts.schema import read_manifest, read_summary
from imgfeat.metadata.contracts.tiles import tiles_path


@dataclass
class Verification:
    """What was checked and the discrepancies found (empty when all is well)."""

    manifest_rows: int = 0
    flagged: int = 0
    feature_rows: int = 0
    rejected: int = 0
    shards_checked: int = 0
    tiled: int = 0
    other_splits: int = 0
    """ok rows of other splits, when the features were made with ``featurize --split``."""
    unchecked: int = 0
    """ok rows of manifest shards whose feature shard is missing or fails its check (each one a problem)."""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _run_fields(features: str, tiles: bool) -> dict[str, Any]:
    """The fingerprint fields of ``FEAT/_run.json`` (empty for a folder without one), after checking that
    the folder holds the kind of rows asked for: tile features only with ``--tiles``."""
    fields = (storage.read_json(storage.join(features, shards.RUN_FILE)) or {}).get("fields") or {}
    holds_tiles = fields.get("rows") == "tiles"
    if holds_tiles and not tiles:
        raise ValueError(f"--features {features} holds tile features (imgfeat featurize --tiles): add --tiles")
    if tiles and fields and not holds_tiles:
        raise ValueError(f"--features {features} holds image features, not tile features: drop --tiles")
    return fields


def _rows(manifest: str, tiles: bool) -> tuple[pa.Table, int | None]:
    """``image_id, status, shard, tiles, split`` of every manifest row (``tiles``: every tile row, its
    ``tile_id`` as ``image_id``, no split), and the row count the summary promises."""
    summary = read_summary(manifest)
    if not tiles:
        try:
            table = read_manifest(manifest, columns=["image_id", "status", "shard", "tiles", "split"])
        except (KeyError, pa.ArrowInvalid):  # a manifest written before the tiles column
            table = read_manifest(manifest, columns=["image_id", "status", "shard", "split"])
            table = table.append_column("tiles", pa.nulls(table.num_rows, pa.int32()))
        return table, summary.get("total")
    import pyarrow.dataset as ds

    url = tiles_path(manifest)
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise ValueError(f"--tiles: no tile table at {url}")
    table = ds.dataset(path, filesystem=fs, format="parquet", ignore_prefixes=["_", "."]).to_table(
        columns=["tile_id", "status", "shard"])
    table = table.rename_columns(["image_id", "status", "shard"]).append_column("tiles", pa.nulls(table.num_rows, pa.int32()))
    table = table.append_column("split", pa.nulls(table.num_rows, pa.string()))
    return table, (summary.get("tiles") or {}).get("tiles")


def verify_run(manifest: str, features: str, checksums: bool = True, tiles: bool = False) -> Verification:
    """Check the feature folder ``features`` against the manifest at ``manifest`` (``tiles``: a folder of tile
    features against its tile table). Features made with ``featurize --split`` (recorded in ``FEAT/_run.json``)
    account for that split's rows; the ok rows of the others are counted as ``other_splits``."""
    v = Verification()
    split = _run_fields(features, tiles).get("split")
    table, promised = _rows(manifest, tiles)
    v.manifest_rows = table.num_rows
    if promised != table.num_rows:
        what = "tile table" if tiles else "manifest"
        v.problems.append(f"{what}: summary says {promised} rows, the Parquet has {table.num_rows}")
    expected: dict[int, set[str]] = {}
    cols = (table.column(c).to_pylist() for c in ("image_id", "status", "shard", "tiles", "split"))
    for image_id, status, shard, n_tiles, row_split in zip(*cols):
        if status == "ok" and split is not None and row_split != split:
            v.other_splits += 1
        elif status == "ok" and shard is not None:
            expected.setdefault(int(shard), set()).add(image_id)
        elif status == "ok" and n_tiles is not None:
            v.tiled += 1
        else:
            v.flagged += 1
    markers = shards.list_markers(features)
    seen: Counter[str] = Counter()
    for shard, ids in sorted(expected.items()):
        stem = shards.shard_stem(shard)
        marker = markers.get(stem)
        if marker is None:
            v.problems.append(f"{storage.join(features, stem)}: manifest shard {shard} has no committed feature shard")
            v.unchecked += len(ids)
            continue
        try:
            if not checksums:
                shards.verify_shard(features, stem, marker, checksums=False)
            # with checksums: every file checked (size and sha256) on the bytes read, in one pass
            got, _ = feature_store.read_feature_shard(features, stem, marker, verify=checksums)
        except (shards.ShardVerificationError, OSError, ValueError) as exc:
            v.problems.append(str(exc))
            v.unchecked += len(ids)
            continue
        rejects = [r["image_id"] for r in feature_store.read_rejects(features, stem)]
        written = [str(i) for i in got]
        seen.update(written)
        seen.update(rejects)
        v.feature_rows += len(written)
        v.rejected += len(rejects)
        v.shards_checked += 1
        if len(written) + len(rejects) != len(ids):
            v.problems.append(f"{stem}: {len(written)} rows + {len(rejects)} rejects != {len(ids)} manifest rows")
        unknown = (set(written) | set(rejects)) - ids
        missing = ids - set(written) - set(rejects)
        if unknown:
            v.problems.append(f"{stem}: {len(unknown)} ids not in this manifest shard, e.g. {sorted(unknown)[0]}")
        if missing:
            v.problems.append(f"{stem}: {len(missing)} manifest rows neither written nor rejected, e.g. {sorted(missing)[0]}")
    extra = sorted(set(markers) - {shards.shard_stem(s) for s in expected})
    if extra:
        v.problems.append(f"{storage.join(features, extra[0])}: committed shard not in the manifest ({len(extra)} such)")
    dups = [i for i, n in seen.items() if n > 1]
    if dups:
        v.problems.append(f"image_id {dups[0]} appears {seen[dups[0]]} times ({len(dups)} ids repeated)")
    if v.feature_rows + v.rejected + v.flagged + v.tiled + v.other_splits != v.manifest_rows and not v.problems:
        v.problems.append(f"total: {v.feature_rows} features + {v.rejected} rejects + {v.flagged} flagged "
                          f"+ {v.tiled} tiled + {v.other_splits} of other splits != {v.manifest_rows} manifest rows")
    return v


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", nargs="?", metavar="RUN", help="an `imgfeat run` folder (manifest at RUN, features at RUN/features)")
    parser.add_argument("--manifest", metavar="OUT", help="manifest folder (default: RUN)")
    parser.add_argument("--features", metavar="FEAT", help="feature folder (default: RUN/features)")
    parser.add_argument("--no-checksums", action="store_true", help="check sizes only, not sha256")
    parser.add_argument("--tiles", action="store_true",
                        help="check tile features (FEAT from `imgfeat featurize --tiles`) against OUT/tiles/")
    add_common_args(parser)


def verify_command(args: argparse.Namespace) -> int:
    manifest = args.manifest or args.run
    features = args.features or (run_paths(args.run)["features"] if args.run else None)
    if not manifest or not features:
        raise ValueError("give RUN, or both --manifest and --features")
    read_summary(manifest)  # the manifest first: without one, nothing else matters
    storage.check_folder(features, "--features", "the output of imgfeat featurize")
    v = verify_run(manifest, features, checksums=not args.no_checksums, tiles=args.tiles)
    tiled = f" + tiled {v.tiled}" if v.tiled else ""
    tiled += f" + other splits {v.other_splits}" if v.other_splits else ""
    tiled += f" + in missing or damaged shards {v.unchecked}" if v.unchecked else ""
    print(f"{'tile' if args.tiles else 'manifest'} rows {v.manifest_rows} = feature rows {v.feature_rows} + rejected "
          f"{v.rejected} + flagged {v.flagged}{tiled}  ({v.shards_checked} shards checked)")
    if v.ok:
        print("verify: OK")
        return 0
    print(f"verify: FAILED: {v.problems[0]}")
    for p in v.problems[1:10]:
        print(f"  also: {p}")
    return 1


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("verify", help="check that every manifest row is a feature, a reject or a flag",
                              description="Reconcile a run: exits 1 and names the first discrepancy.")
    add_verify_arguments(p)
    p.set_defaults(func=verify_command)
