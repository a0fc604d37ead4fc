"""Duplicates, splits, shards and summary counts over the checked rows, with pyarrow and numpy.

Runs inside one Spark task over the narrow columns of every checked row (never the file bytes, never
on the driver). Pure functions, no Spark import, so the rules are testable on their own:

* duplicates: among ``ok`` rows, rows with the same ``content_hash`` form a group; its first path is
  the original, the others are duplicates of it and follow its split;
* near-duplicates (with the near-duplicate map, ``NEAR_SCHEMA``, from ``data_quality``): an original
  that is a member of a group takes its folder split, else its representative's (a member whose folder
  split differs from the representative's is a *crossing pair*, counted in ``leakage``); its rows get
  ``near_duplicate_of``; in ``drop`` mode the member original gets status ``near_duplicate`` and no shard;
* label conflicts: a family (a representative with its members, every one with its exact duplicates;
  or an exact-duplicate group in no near group) whose ok rows hold 2+ labels: ``label_conflict`` on
  each of its rows, counted in ``label_conflicts``;
* splits: the folder split when the path has one; else, per label, the originals (representatives and
  originals in no group) are ordered by a seeded hash of their content and cut at the configured ratios
  (exact per-label proportions);
* shards: originals (but dropped near-duplicates) without a previous shard are sorted by size (largest first) and dealt out over
  ``ceil(n / rows_per_shard)`` shards in a snake order, so shard sizes differ by at most one row and
  large and small files spread evenly; rows with a previous shard (incremental runs) keep it.
"""
from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

NARROW_COLUMNS = ["path", "image_id", "status", "label", "folder_split", "size_bytes", "content_hash",
                  "_pshard", "_kept", "_prev", "tiles"]
"""The checked columns the organize step reads."""

PLAN_SCHEMA = pa.schema([("split", pa.string()), ("shard", pa.int32()), ("duplicate_of", pa.string()),
                         ("first_path", pa.string()), ("near_duplicate_of", pa.string()), ("dropped_for", pa.string()),
                         ("label_conflict", pa.bool_())])
"""Per checked row, aligned with it: split, shard, the original's image_id and path (duplicates only), the
near-duplicate representative's image_id (members and their duplicates), the representative's path (the
members dropped by ``drop``), and whether its family holds two or more labels."""

PLANNED_COLUMNS = ("label_index", "split", "duplicate_of", "near_duplicate_of", "label_conflict", "shard")
"""The manifest columns organize computes over all rows (the others come from each file's check)."""


def _np(arr: pa.ChunkedArray | pa.Array, fill: Any = None) -> np.ndarray:
    if fill is not None:
        arr = pc.fill_null(arr, fill)
    return arr.to_numpy(zero_copy_only=False) if isinstance(arr, pa.Array) else arr.to_numpy()


def hash_order(content_hashes: list[str], seed: str) -> np.ndarray:
    """A seeded 64-bit sort key per content hash (splitmix64 of its first 64 bits xor the seed's)."""
    s = np.uint64(int.from_bytes(hashlib.sha256(seed.encode()).digest()[:8], "big"))
    z = np.fromiter((int(c[:16], 16) for c in content_hashes), np.uint64, len(content_hashes)) ^ s
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _group_starts(sorted_keys: pa.Array) -> np.ndarray:
    """Boolean mask of the positions where a run of equal keys starts (``sorted_keys`` sorted)."""
    n = len(sorted_keys)
    starts = np.ones(n, bool)
    if n > 1:
        starts[1:] = _np(pc.not_equal(sorted_keys[1:], sorted_keys[:-1]), True)
    return starts


def assign_splits(originals: pa.Table, ratios: dict[str, float], seed: str) -> np.ndarray:
    """The split of each original: its folder split, else its per-label cut of the seeded hash order."""
    folder = originals["folder_split"].to_pylist()
    out = np.array(folder, dtype=object)
    need = np.flatnonzero(pc.is_null(originals["folder_split"]).to_numpy(zero_copy_only=False))
    if not len(need):
        return out
    sub = originals.take(need)
    keys = pa.table({
        "label": pc.fill_null(sub["label"], "\x00"),
        "h": hash_order(sub["content_hash"].to_pylist(), seed),
        "image_id": sub["image_id"],
    })
    order = pc.sort_indices(keys, [("label", "ascending"), ("h", "ascending"), ("image_id", "ascending")]).to_numpy()
    starts = _group_starts(keys["label"].take(order).combine_chunks())
    first = np.flatnonzero(starts)
    group = np.cumsum(starts) - 1
    counts = np.diff(np.append(first, len(order)))
    frac = (np.arange(len(order)) - first[group] + 0.5) / counts[group]
    names = list(ratios)
    cum = np.cumsum([ratios[k] for k in names])
    picked = np.searchsorted(cum[:-1], frac, side="right")
    drawn = np.empty(len(order), dtype=object)
    drawn[order] = np.array(names, dtype=object)[picked]
    out[need] = drawn
    return out


def _narrow(part: pa.Table) -> pa.Table:
    """``part``'s ``NARROW_COLUMNS``; ``tiles`` null where it lacks it (rows checked without tiling)."""
    if "tiles" not in part.column_names:
        part = part.append_column("tiles", pa.nulls(part.num_rows, pa.int32()))
    return part.select(NARROW_COLUMNS)


def assign_shards(originals: pa.Table, rows_per_shard: int, base: int) -> np.ndarray:
    """The shard of each original: its previous shard, else a snake deal over new shards from ``base``."""
    pshard = originals["_pshard"]
    fresh = _np(pc.is_null(pshard))
    keys = pa.table({"kept": pa.array(~fresh), "size": originals["size_bytes"], "image_id": originals["image_id"]})
    order = pc.sort_indices(keys, [("kept", "ascending"), ("size", "descending"), ("image_id", "ascending")]).to_numpy()
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    num = max(math.ceil(int(fresh.sum()) / rows_per_shard), 1)
    block, pos = rank // num, rank % num
    snake = np.where(block % 2 == 0, pos, num - 1 - pos) + base
    return np.where(fresh, snake, _np(pshard, -1))


NEAR_SCHEMA = pa.schema([("content_hash", pa.string()), ("rep_hash", pa.string()), ("rep_id", pa.string()),
                         ("rep_path", pa.string())])
"""The near-duplicate map (``data_quality.near_duplicate_map``): per member original's content hash, its
group representative's content hash, image_id and path (the representative itself is not in it)."""

EXAMPLES = 5
"""Example rows per list in the counts (crossing pairs, label conflicts)."""


def _members(originals: pa.Table, near: pa.Table | None) -> tuple[np.ndarray, np.ndarray]:
    """Per original: whether it is a near-duplicate member, and its representative's index (else itself)."""
    n = originals.num_rows
    rep = np.arange(n)
    if near is None or not near.num_rows or not n:
        return np.zeros(n, bool), rep
    at = _np(pc.index_in(originals["content_hash"], value_set=near["content_hash"]), -1)
    rep_at = np.full(n, -1, np.int64)
    found = at >= 0
    rep_at[found] = _np(pc.index_in(near["rep_hash"].take(pa.array(at[found])), value_set=originals["content_hash"]), -1)
    member = rep_at >= 0  # a representative that is not an ok original here cannot hold its group
    rep[member] = rep_at[member]
    return member, rep


def organize(parts: list[pa.Table], ratios: dict[str, float], seed: str, rows_per_shard: int, base: int = 0,
             previous_rows: int = 0, near: pa.Table | None = None, drop: bool = False) -> tuple[list[pa.Table], dict[str, Any]]:
    """Plan tables aligned with ``parts`` (``PLAN_SCHEMA``) and the summary counts.

    ``parts``: checked rows with ``NARROW_COLUMNS``; ``base``: the first free shard number;
    ``previous_rows``: rows of the previous manifest (incremental runs), for the removed count;
    ``near``: the near-duplicate map (``NEAR_SCHEMA``) or None; ``drop``: its members other than the
    representatives get status ``near_duplicate`` and no shard.
    """
    t = pa.concat_tables([_narrow(p) for p in parts]).combine_chunks()
    n = t.num_rows
    status = t["status"]
    ok_idx = np.flatnonzero(_np(pc.equal(status, "ok"), False))
    okt = t.take(ok_idx)
    order = pc.sort_indices(okt, [("content_hash", "ascending"), ("path", "ascending")]).to_numpy()
    starts = _group_starts(okt["content_hash"].take(order).combine_chunks())
    first_pos = np.flatnonzero(starts)
    group = np.cumsum(starts) - 1
    first_row = order[first_pos]  # index into okt of each group's original (its first path)
    orig_of = np.empty(len(order), np.int64)
    orig_of[order] = first_row[group]
    group_of = np.empty(len(order), np.int64)
    group_of[order] = group
    is_dup = orig_of != np.arange(len(order))

    originals = okt.take(first_row)
    member, rep = _members(originals, near)
    dropped = member & drop
    splits = np.empty(originals.num_rows, dtype=object)
    lead = np.flatnonzero(~member)  # representatives and originals in no group: their own split
    splits[lead] = assign_splits(originals.take(lead), ratios, seed)
    folder = np.array(originals["folder_split"].to_pylist(), dtype=object)
    mem = np.flatnonzero(member)
    splits[mem] = np.where(_is_none(folder[mem]), splits[rep[mem]], folder[mem])
    tiled = _np(pc.is_valid(originals["tiles"]), False)  # a tiled image's shards are its tiles' (OUT/tiles/)
    dealt = np.flatnonzero(~dropped & ~tiled)
    shards = np.full(originals.num_rows, -1, np.int64)
    shards[dealt] = assign_shards(originals.take(dealt), rows_per_shard, base)

    # A family: a representative, its members and all their exact duplicates; 2+ labels in it is a conflict.
    family = rep[group_of]
    labels = pa.table({"family": family, "label": okt["label"]})
    per_family = labels.group_by("family").aggregate([("label", "count_distinct")])
    conflicted = np.zeros(originals.num_rows, bool)
    conflicted[_np(per_family["family"])[_np(per_family["label_count_distinct"]) > 1]] = True
    row_conflict = conflicted[family]

    split_col = np.full(n, None, dtype=object)
    split_col[ok_idx] = splits[group_of]
    shard_col = np.full(n, -1, np.int64)
    shard_col[ok_idx[~is_dup]] = shards[group_of[~is_dup]]
    dup_rows = ok_idx[is_dup]
    dup_of = np.full(n, None, dtype=object)
    first_path = np.full(n, None, dtype=object)
    orig_ids, orig_paths = okt["image_id"].to_numpy(zero_copy_only=False), okt["path"].to_numpy(zero_copy_only=False)
    dup_of[dup_rows] = orig_ids[orig_of[is_dup]]
    first_path[dup_rows] = orig_paths[orig_of[is_dup]]
    rep_ids, rep_paths = orig_ids[first_row[rep]], orig_paths[first_row[rep]]
    near_of = np.full(n, None, dtype=object)
    in_group = member[group_of]
    near_of[ok_idx[in_group]] = rep_ids[group_of[in_group]]
    drop_detail = np.full(n, None, dtype=object)
    dropped_rows = ok_idx[dropped[group_of] & ~is_dup]
    drop_detail[dropped_rows] = rep_paths[group_of[dropped[group_of] & ~is_dup]]
    conflict_col = np.zeros(n, bool)
    conflict_col[ok_idx] = row_conflict
    plan = pa.table({
        "split": pa.array(split_col, pa.string()),
        "shard": pa.array(shard_col, pa.int32(), mask=shard_col < 0),
        "duplicate_of": pa.array(dup_of, pa.string()),
        "first_path": pa.array(first_path, pa.string()),
        "near_duplicate_of": pa.array(near_of, pa.string()),
        "dropped_for": pa.array(drop_detail, pa.string()),
        "label_conflict": pa.array(conflict_col, pa.bool_()),
    }, schema=PLAN_SCHEMA)
    plans, offset = [], 0
    for p in parts:
        plans.append(plan.slice(offset, p.num_rows))
        offset += p.num_rows

    counts = np.diff(np.append(first_pos, len(order)))
    multi = counts > 1
    last_paths = okt["path"].take(order[first_pos[multi] + counts[multi] - 1]) if multi.any() else None
    counted = np.flatnonzero(~dropped)  # by label and split: every original that stays, tiled images too
    pairs = Counter(zip((str(x) for x in originals["label"].take(pa.array(counted, pa.int64())).to_pylist()),
                        (str(v) for v in splits[counted])))
    summary = _summary(t, originals.take(dealt), pairs, shards[dealt], int(is_dup.sum()), last_paths, previous_rows)
    if dropped.any():
        by_status, examples = summary["by_status"], summary["example_by_status"]
        count_as(by_status, examples, "near_duplicate", int(dropped.sum()),
                 min(originals["path"].take(pa.array(np.flatnonzero(dropped))).to_pylist()))
        summary["by_status"], summary["example_by_status"] = dict(sorted(by_status.items())), dict(sorted(examples.items()))
    crossing = mem[splits[mem] != splits[rep[mem]]]
    cross = sorted(zip(originals["path"].take(pa.array(crossing, pa.int64())).to_pylist(), splits[crossing],
                       rep_paths[crossing], splits[rep[crossing]]))
    in_conflict = np.flatnonzero(conflicted)
    summary["leakage"] = {
        "near_duplicate_members": int(member.sum()),
        "crossing_pairs": len(cross),
        "crossing_examples": [{"path": a, "split": b, "near_duplicate_of": c, "representative_split": d}
                              for a, b, c, d in cross[:EXAMPLES]],
    }
    summary["label_conflicts"] = {
        "families": len(in_conflict),
        "rows": int(row_conflict.sum()),
        "examples": sorted(originals["path"].take(pa.array(in_conflict, pa.int64())).to_pylist())[:EXAMPLES],
    }
    return plans, summary


def count_as(by_status: dict[str, int], examples: dict[str, str], status: str, n: int, example: str) -> None:
    """Count ``n`` of the ``ok`` rows as ``status`` instead (duplicates, dropped near-duplicates), with an example."""
    by_status["ok"] -= n
    if not by_status["ok"]:
        del by_status["ok"]
    by_status[status] = n
    examples[status] = example


def _is_none(values: np.ndarray) -> np.ndarray:
    """Elementwise ``is None`` of an object array."""
    return np.fromiter((v is None for v in values), bool, len(values))


def _summary(t: pa.Table, dealt: pa.Table, pairs: Mapping[tuple[str, str], int], shards: np.ndarray, dups: int,
             dup_last_paths: pa.Array | None, previous_rows: int) -> dict[str, Any]:
    """The counts of the summary: ``dealt`` are the sharded originals (``shards`` theirs), ``pairs`` the
    originals that stay (tiled images too) counted per (label, split)."""
    by_status: dict[str, int] = {}
    examples: dict[str, str] = {}
    for r in t.group_by("status").aggregate([("path", "min"), ("path", "count")]).to_pylist():
        by_status[r["status"]] = r["path_count"]
        if r["status"] != "ok":
            examples[r["status"]] = r["path_min"]
    if dups:
        count_as(by_status, examples, "duplicate", dups, pc.min(dup_last_paths).as_py())
    labelled = pc.and_(pc.is_valid(t["label"]), pc.not_equal(t["status"], "bad_label"))
    names = sorted(pc.unique(t["label"].filter(labelled)).to_pylist())
    shard_rows = shard_bytes = None
    if len(shards):
        uniq, inv = np.unique(shards, return_inverse=True)
        rows = np.bincount(inv)
        nbytes = np.bincount(inv, weights=_np(dealt["size_bytes"], 0).astype(np.float64))
        shard_rows = (int(rows.min()), int(rows.max()))
        shard_bytes = (int(nbytes.min()), int(nbytes.max()))
    kept = int(pc.sum(t["_kept"]).as_py() or 0)
    prev = int(pc.sum(t["_prev"]).as_py() or 0)
    new = int(pc.sum(pc.and_(pc.invert(t["_kept"]), pc.invert(t["_prev"]))).as_py() or 0)
    return {
        "total": t.num_rows,
        "by_status": dict(sorted(by_status.items())),
        **label_split_counts(pairs),
        "example_by_status": dict(sorted(examples.items())),
        "total_bytes": int(pc.sum(t["size_bytes"]).as_py() or 0),
        "labels": len(names),
        "label_names": names,
        "shard_rows": {"min": shard_rows and shard_rows[0], "max": shard_rows and shard_rows[1]},
        "shard_bytes": {"min": shard_bytes and shard_bytes[0], "max": shard_bytes and shard_bytes[1]},
        "num_shards": len(np.unique(shards)) if len(shards) else 0,
        "incremental": {"unchanged": kept, "new": new, "changed": t.num_rows - kept - new,
                        "removed": previous_rows - prev},
    }


def label_split_counts(pairs: Mapping[tuple[str, str], int]) -> dict[str, Any]:
    """The summary's ``by_label``, ``by_split`` and ``by_label_split`` from the originals counted per
    (label, split) pair (both organize paths count them so; labels and splits as text, ``"None"`` for none)."""
    by_label: Counter = Counter()
    by_split: Counter = Counter()
    by_label_split: dict[str, dict[str, int]] = {}
    for (label, split), k in sorted(pairs.items()):
        by_label[label] += k
        by_split[split] += k
        by_label_split.setdefault(label, {})[split] = k
    return {"by_label": dict(sorted(by_label.items())), "by_split": dict(sorted(by_split.items())),
            "by_label_split": dict(sorted(by_label_split.items()))}


def finish(checked: pa.Table, plan: pa.Table, label_names: list[str], schema: pa.Schema) -> pa.Table:
    """Manifest rows (``schema``) from checked rows and their aligned plan, sorted by path."""
    status = checked["status"]
    is_dup = pc.is_valid(plan["duplicate_of"])
    index = pc.index_in(checked["label"], value_set=pa.array(label_names, pa.string()))
    is_dropped = pc.is_valid(plan["dropped_for"])
    cols = {
        "label_index": pc.if_else(pc.equal(status, "bad_label"), pa.scalar(None, pa.int32()), index.cast(pa.int32())),
        "split": plan["split"],
        "duplicate_of": plan["duplicate_of"],
        "near_duplicate_of": plan["near_duplicate_of"],
        "label_conflict": plan["label_conflict"],
        "status": pc.if_else(is_dup, "duplicate", pc.if_else(is_dropped, "near_duplicate", status)),
        "status_detail": pc.if_else(
            is_dup, pc.binary_join_element_wise("same bytes as ", plan["first_path"], ""),
            pc.if_else(is_dropped, pc.binary_join_element_wise("near duplicate of ", plan["dropped_for"], ""),
                       checked["status_detail"])),
        "shard": plan["shard"],
    }
    table = pa.table({f.name: (cols[f.name] if f.name in cols else checked[f.name]).cast(f.type) for f in schema})
    return table.sort_by("path").cast(schema)
