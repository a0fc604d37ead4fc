"""Which shards this rank computes: from the manifest's ``shard`` column, never from rank numbers alone.

Every rank reads the manifest itself. Rank 0 lists the shards still to do (no valid marker with this
run's fingerprint and the manifest's members) and broadcasts the list; pending shard ``i`` (in shard
order) goes to rank ``i % world_size``. Each shard is computed whole by one rank, so there is no
padding, no duplicate and no lock, and changing the world size between runs is fine.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from imgfeat.metadata.contracts import shards
from imgfeat.metadata.contracts.schema import STATUS_OK, read_manifest

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["image_id", "path", "label", "label_index", "split", "format", "width", "height", "status", "shard"]


@dataclass
class ShardWork:
    """One manifest shard: its rows in a fixed order (by image_id), independent of the reader."""

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


def manifest_shards(manifest: str, split: str | None = None) -> dict[int, ShardWork]:
    """The manifest's usable rows (status ok, with a shard), grouped by shard, each sorted by image_id."""
    table = read_manifest(manifest)
    table = table.select([c for c in MANIFEST_COLUMNS if c in table.column_names])
    mask = pc.and_(pc.equal(table["status"], STATUS_OK), pc.is_valid(table["shard"]))
    if split:
        mask = pc.and_(mask, pc.equal(table["split"], split))
    table = table.filter(mask)
    if table.num_rows == 0:
        raise ValueError(f"--manifest {manifest}: no usable rows (status ok with a shard)")
    table = table.sort_by([("shard", "ascending"), ("image_id", "ascending")])
    shard_col = table.column("shard").to_numpy()
    out: dict[int, ShardWork] = {}
    start = 0
    n = len(shard_col)
    while start < n:
        s = int(shard_col[start])
        end = start
        while end < n and shard_col[end] == s:
            end += 1
        out[s] = ShardWork(s, table.slice(start, end - start))
        start = end
    return out


def shard_is_done(folder: str, work: ShardWork, fingerprint: str) -> bool:
    """A valid marker (files match their checksums) with this run's fingerprint and the manifest's members."""
    marker = shards.read_marker(folder, work.stem)
    if marker is None or marker.get("kind") != "features":
        return False
    if marker.get("fingerprint") != fingerprint or marker.get("members") != work.members:
        return False
    if int(marker.get("rows", -1)) + int(marker.get("rejects", -1)) != len(work):
        return False
    try:
        shards.verify_shard(folder, work.stem, marker)
    except shards.ShardVerificationError as exc:
        log.warning("%s: redoing it (%s)", work.stem, exc)
        return False
    return True


def pending_shards(folder: str, work: dict[int, ShardWork], fingerprint: str) -> list[int]:
    """Shards of the manifest still to compute, in shard order."""
    return [s for s in sorted(work) if not shard_is_done(folder, work[s], fingerprint)]


def assign(pending: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's share of the pending shards: the i-th pending shard goes to rank i % world_size."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    return [s for i, s in enumerate(sorted(pending)) if i % world_size == rank]


def orphan_shards(folder: str, work: dict[int, ShardWork]) -> list[str]:
    """Stems of committed feature shards that the manifest does not have."""
    wanted = {w.stem for w in work.values()}
    return sorted(s for s, m in shards.list_markers(folder).items() if m.get("kind") == "features" and s not in wanted)
