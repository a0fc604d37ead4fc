"""``imgfeat verify RUN``: prove that no row was lost or invented.

For every manifest shard: a committed feature shard whose files match its marker, whose ids plus
rejected ids are exactly the manifest's ok rows of that shard, with no id twice. In total: manifest
rows = feature rows + rejected rows + rows flagged by the manifest. The first discrepancy is named.
"""
from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from imgfeat.layout import run_paths
from imgfeat.metadata import storage
from imgfeat.metadata.cli_common import add_common_args
from imgfeat.metadata.contracts import feature_store, shards
from imgfeat.metadata.contracts.schema import read_manifest, read_summary


@dataclass
class Verification:
    """What was checked and the discrepancies found (empty when all is well)."""

    manifest_rows: int = 0
    flagged: int = 0
    feature_rows: int = 0
    rejected: int = 0
    shards_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_run(manifest: str, features: str, checksums: bool = True) -> Verification:
    """Check the feature folder ``features`` against the manifest at ``manifest``."""
    v = Verification()
    table = read_manifest(manifest, columns=["image_id", "status", "shard"])
    v.manifest_rows = table.num_rows
    summary = read_summary(manifest)
    if summary.get("total") != table.num_rows:
        v.problems.append(f"manifest: summary says {summary.get('total')} rows, the Parquet has {table.num_rows}")
    expected: dict[int, set[str]] = {}
    for image_id, status, shard in zip(*(table.column(c).to_pylist() for c in ("image_id", "status", "shard"))):
        if status == "ok":
            expected.setdefault(int(shard), set()).add(image_id)
        else:
            v.flagged += 1
    markers = shards.list_markers(features)
    seen: Counter[str] = Counter()
    for shard, ids in sorted(expected.items()):
        stem = shards.shard_stem(shard)
        marker = markers.get(stem)
        if marker is None:
            v.problems.append(f"{storage.join(features, stem)}: manifest shard {shard} has no committed feature shard")
            continue
        try:
            if not checksums:
                shards.verify_shard(features, stem, marker, checksums=False)
            # with checksums: every file checked (size and sha256) on the bytes read, in one pass
            got, _ = feature_store.read_feature_shard(features, stem, marker, verify=checksums)
        except (shards.ShardVerificationError, OSError, ValueError) as exc:
            v.problems.append(str(exc))
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
    if v.feature_rows + v.rejected + v.flagged != v.manifest_rows and not v.problems:
        v.problems.append(f"total: {v.feature_rows} features + {v.rejected} rejects + {v.flagged} flagged "
                          f"!= {v.manifest_rows} manifest rows")
    return v


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", nargs="?", metavar="RUN", help="an `imgfeat run` folder (manifest at RUN, features at RUN/features)")
    parser.add_argument("--manifest", metavar="OUT", help="manifest folder (default: RUN)")
    parser.add_argument("--features", metavar="FEAT", help="feature folder (default: RUN/features)")
    parser.add_argument("--no-checksums", action="store_true", help="check sizes only, not sha256")
    add_common_args(parser)


def verify_command(args: argparse.Namespace) -> int:
    manifest = args.manifest or args.run
    features = args.features or (run_paths(args.run)["features"] if args.run else None)
    if not manifest or not features:
        raise ValueError("give RUN, or both --manifest and --features")
    v = verify_run(manifest, features, checksums=not args.no_checksums)
    print(f"manifest rows {v.manifest_rows} = feature rows {v.feature_rows} + rejected {v.rejected} "
          f"+ flagged {v.flagged}  ({v.shards_checked} shards checked)")
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
