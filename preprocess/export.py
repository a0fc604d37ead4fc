"""``imgfeat prep``: resized uint8 training arrays from the manifest's ok rows, in committed shards.

Rows are the manifest's ok rows (of ``prep.split`` when set), ordered by image_id (a hash, so classes
mix across shards), cut into shards of ``prep.rows_per_shard``. Each shard's files are committed
atomically, then its marker (rows, rejects, config fingerprint, membership digest) is written last.
A rerun skips shards whose marker is valid for the same config and rows. Rows that fail to decode now
are rejects, recorded in the marker: written + rejected = selected, always.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter
from typing import Any

import fsspec
import numpy as np
from tqdm import tqdm

from imgfeat.metadata.config import Config, dump_toml
from imgfeat.metadata.contracts.schema import CONFIG_FILE
from imgfeat.metadata.contracts.shards import (
    PREP_SUMMARY,
    ShardVerificationError,
    clean_stale_temporaries,
    list_markers,
    members_digest,
    remove_shard,
    shard_stem,
    verify_shard,
    write_marker,
)
from imgfeat.metadata.storage import canonical_digest, join, write_bytes_atomic, write_json_atomic
from imgfeat.preprocess.dataset import ManifestDataset, read_ok_rows
from imgfeat.preprocess.decode import split_reason
from imgfeat.preprocess.loader import iter_batches_contained, resolve_workers
from imgfeat.preprocess.prep_io import write_shard
from imgfeat.preprocess.tile_dataset import TileDataset, read_tile_rows

log = logging.getLogger(__name__)

PREP_KIND = "prep"
PREP_CODE_VERSION = "prep-2"
"""Bump when a code change alters the pixels written for the same inputs and config."""
_PIXEL_KEYS = ("interpolation", "alpha", "background", "exif_orientation", "reduced_decode")
"""The ``[preprocess]`` keys that change exported pixels (with every ``[decode]`` key)."""


def prep_fingerprint(cfg: Config, tiles: bool = False) -> str:
    """sha256 (16 hex) over everything that changes the pixels or the shard layout of a prep export."""
    pre = dataclasses.asdict(cfg.preprocess)
    pixels = {**{k: pre[k] for k in _PIXEL_KEYS}, **dataclasses.asdict(cfg.decode)}
    data: dict[str, Any] = {"prep": dataclasses.asdict(cfg.prep), "preprocess": pixels,
                            "code_version": PREP_CODE_VERSION}
    if tiles:  # rows are tiles (their boxes are in their ids)
        data["rows"] = "tiles"
    return canonical_digest(data)


def prep_preprocess_config(cfg: Config):
    """The decode settings of ``cfg.preprocess`` with the prep size and policy (shorter side = size)."""
    return dataclasses.replace(cfg.preprocess, size=cfg.prep.size, resize_policy=cfg.prep.resize_policy,
                               resize_shorter=cfg.prep.size)


def class_names(table: Any) -> list[str]:
    """Label names by label_index, from the manifest rows ("" where an index has no name here)."""
    names: dict[int, str] = {}
    if "label" in table.column_names and "label_index" in table.column_names:
        for label, index in zip(table.column("label").to_pylist(), table.column("label_index").to_pylist()):
            if label is not None and index is not None:
                names[int(index)] = label
    size = max(names, default=-1) + 1
    return [names.get(i, "") for i in range(size)]


def run_prep(cfg: Config, manifest: str, out: str, overwrite: bool = False, tiles: bool = False) -> dict[str, Any]:
    """Export the selected ok manifest rows (``tiles``: the tile table's rows, each tile's box resized, keyed
    by ``tile_id``) as prep shards under ``out``; return the summary dict."""
    cfg.validate()
    started = time.time()
    p = cfg.prep
    table = read_tile_rows(manifest, p.split or None) if tiles else read_ok_rows(manifest, split=p.split or None)
    if table.num_rows == 0:
        where = f" in split {p.split!r}" if p.split else ""
        raise ValueError(f"prep.split: no ok rows{where} in the manifest at {manifest}")
    table = table.sort_by("image_id")
    ids = table.column("image_id").to_pylist()
    n = len(ids)
    n_shards = math.ceil(n / p.rows_per_shard)
    fingerprint = prep_fingerprint(cfg, tiles)

    fs, root = fsspec.core.url_to_fs(out)
    fs.makedirs(root, exist_ok=True)
    if overwrite:
        for stem in list_markers(out):
            remove_shard(out, stem)
    removed = clean_stale_temporaries(out)
    if removed:
        log.info("removed %d stale temporaries from an interrupted run", len(removed))

    markers = {s: m for s, m in list_markers(out).items() if m.get("kind") == PREP_KIND}
    todo: list[int] = []
    for k in range(n_shards):
        stem = shard_stem(k)
        members = members_digest(ids[k * p.rows_per_shard : (k + 1) * p.rows_per_shard])
        marker = markers.get(stem)
        if marker is None:
            remove_shard(out, stem)  # data files of a shard killed before its marker
            todo.append(k)
            continue
        if marker.get("fingerprint") != fingerprint:
            raise ValueError(f"--out {out}: holds prep shards written with another config "
                             f"(fingerprint {marker.get('fingerprint')} vs {fingerprint}); pass --overwrite")
        try:
            verify_shard(out, stem, marker, checksums=False)
            valid = marker.get("members") == members
        except ShardVerificationError as exc:
            log.warning("%s: %s; rewriting it", stem, exc)
            valid = False
        if not valid:
            remove_shard(out, stem)
            todo.append(k)
    for stem in sorted(set(markers) - {shard_stem(k) for k in range(n_shards)}):
        log.warning("%s: not part of this export (the manifest has fewer rows now); removing it", stem)
        remove_shard(out, stem)
    log.info("prep: %d rows in %d shards; %d to write, %d already complete", n, n_shards, len(todo), n_shards - len(todo))

    classes = class_names(table)
    if todo:
        _write_shards(cfg, table, ids, todo, out, fingerprint, classes)
    decode_s = time.time() - started
    done_rows = sum(min(p.rows_per_shard, n - k * p.rows_per_shard) for k in todo)

    summary = _summarize(cfg, out, manifest, n, n_shards, fingerprint, classes)
    summary.update(shards_written=len(todo), shards_skipped=n_shards - len(todo), rows_processed=done_rows,
                   elapsed_s=round(decode_s, 3),
                   images_per_s=round(done_rows / decode_s, 1) if done_rows and decode_s > 0 else None)
    if summary["written"] + summary["rejected"] != n:
        raise RuntimeError(f"prep counts do not reconcile: {summary['written']} written + {summary['rejected']} "
                           f"rejected != {n} selected")
    write_json_atomic(join(out, PREP_SUMMARY), summary)
    write_bytes_atomic(join(out, CONFIG_FILE), dump_toml(cfg).encode())
    return summary


def _write_shards(cfg: Config, table: Any, ids: list[str], todo: list[int], out: str, fingerprint: str,
                  classes: list[str]) -> None:
    p = cfg.prep
    pre = prep_preprocess_config(cfg)
    kind = TileDataset if "tile_of" in table.column_names else ManifestDataset
    dataset = kind(table, pre, size=p.size, policy=p.resize_policy, resize_shorter=p.size, limits=cfg.decode)
    n = len(dataset)
    indices = [i for k in todo for i in range(k * p.rows_per_shard, min(n, (k + 1) * p.rows_per_shard))]
    attrs = {"config": cfg.to_dict(), "fingerprint": fingerprint, "size": p.size, "resize_policy": p.resize_policy,
             "classes": classes}
    workers = resolve_workers(pre)
    shard: _ShardBuffer | None = None
    with tqdm(total=len(indices), unit="img", desc="prep", disable=None) as bar:
        for images, idx, ok, reasons in iter_batches_contained(dataset, pre, num_workers=workers, indices=indices):
            hwc = images.permute(0, 2, 3, 1).numpy()  # a view: the batch is channels-last in memory
            idx_np, ok_np = idx.numpy(), ok.numpy()
            shard_of = idx_np // p.rows_per_shard
            for k in np.unique(shard_of):  # batches are in order: one shard, or the end of one and the next
                if shard is None or shard.k != k:
                    start = int(k) * p.rows_per_shard
                    shard = _ShardBuffer(int(k), start, min(n, start + p.rows_per_shard), p.size)
                here = shard_of == k
                good = here & ok_np
                rows = idx_np[good].tolist()
                shard.add_many(hwc[good], [dataset.labels[i] for i in rows], [dataset.image_ids[i] for i in rows])
                for j in np.flatnonzero(here & ~ok_np):
                    i = int(idx_np[j])
                    shard.reject(dataset.image_ids[i], dataset.paths[i], reasons[j])
                if shard.complete:
                    shard.commit(out, p.format, p.compression, attrs, fingerprint, ids)
            bar.update(len(idx))


class _ShardBuffer:
    """Rows of one shard as they arrive (in order), then its files and marker."""

    def __init__(self, k: int, start: int, stop: int, size: int) -> None:
        self.k, self.start, self.stop = k, start, stop
        self.images = np.empty((stop - start, size, size, 3), np.uint8)
        self.labels: list[int] = []
        self.ids: list[str] = []
        self.rejects: list[dict[str, str]] = []

    @property
    def seen(self) -> int:
        return len(self.ids) + len(self.rejects)

    @property
    def complete(self) -> bool:
        return self.seen == self.stop - self.start

    def add_many(self, images: np.ndarray, labels: list[int], image_ids: list[str]) -> None:
        at = len(self.ids)
        self.images[at : at + len(image_ids)] = images
        self.labels.extend(labels)
        self.ids.extend(image_ids)

    def reject(self, image_id: str, path: str, reason: str) -> None:
        code, detail = split_reason(reason)  # the record featurize writes: code and detail apart
        self.rejects.append({"image_id": image_id, "path": path, "reason": code, "detail": detail})

    def commit(self, out: str, fmt: str, compression: str, attrs: dict[str, Any], fingerprint: str,
               all_ids: list[str]) -> None:
        stem = shard_stem(self.k)
        rows = len(self.ids)
        files = write_shard(out, stem, fmt, self.images[:rows], np.asarray(self.labels, np.int32), self.ids,
                            compression, dict(attrs, stem=stem))
        write_marker(out, stem, files, {
            "kind": PREP_KIND, "rows": rows, "rejects": self.rejects, "fingerprint": fingerprint,
            "members": members_digest(all_ids[self.start : self.stop]), "selected": self.stop - self.start,
            "format": fmt, "size": int(self.images.shape[1]),
        })
        if self.rejects:
            log.warning("%s: %d of %d rows rejected (first: %s)", stem, len(self.rejects), self.stop - self.start,
                        self.rejects[0]["reason"])


def _summarize(cfg: Config, out: str, manifest: str, n: int, n_shards: int, fingerprint: str,
               classes: list[str]) -> dict[str, Any]:
    markers = {s: m for s, m in list_markers(out).items() if m.get("kind") == PREP_KIND}
    written = sum(int(m["rows"]) for m in markers.values())
    rejects = [r for m in markers.values() for r in m.get("rejects", [])]
    by_reason = Counter(r["reason"].split(":", 1)[0] for r in rejects)
    return {
        "kind": PREP_KIND, "manifest": manifest, "selected": n, "written": written, "rejected": len(rejects),
        "rejects_by_reason": dict(sorted(by_reason.items())), "shards": n_shards, "format": cfg.prep.format,
        "size": cfg.prep.size, "resize_policy": cfg.prep.resize_policy, "split": cfg.prep.split,
        "rows_per_shard": cfg.prep.rows_per_shard, "classes": classes, "fingerprint": fingerprint,
    }
