"""Feature shards on disk: writing one shard (committed atomically) and reading it back.

The layout, readable with numpy/h5py alone, for shard ``part-NNNNN`` in folder FEAT:

* ``npy``: ``part-NNNNN.features.npy`` ([n, d] float32 or float16) and ``part-NNNNN.ids.npy``
  ([n] ``<U32`` image ids, row i of features belongs to ids[i]);
* ``hdf5``: ``part-NNNNN.h5`` with datasets ``features`` [n, d] and ``image_id`` [n] (``S32``),
  and the run fingerprint in its attributes;
* always ``part-NNNNN.rejects.json``: ``{"rejects": [{"image_id", "path", "reason", "detail"}]}``;
* last, the marker ``part-NNNNN.done.json`` (see ``imgfeat.metadata.contracts.shards``) with ``kind = "features"``,
  ``rows``, ``rejects``, ``dim``, ``dtype``, ``format``, ``fingerprint``, ``members`` and file checksums.

Pure Python + numpy/h5py; used by featurize (writer), pca (reader on executors) and library users.
"""
from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Sequence
from typing import Any

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from imgfeat.metadata import storage
from imgfeat.metadata.contracts import shards

ID_DTYPE = "<U32"
TILE_DTYPE = np.dtype([("tile_of", ID_DTYPE), ("level", "<i4"), ("x", "<i4"), ("y", "<i4"), ("width", "<i4"),
                       ("height", "<i4")])
"""Per row of a tile feature shard: its image's id and its box in pixels of ``level`` (``{stem}.tiles.npy``, or
the ``tiles`` dataset of the HDF5 file): a shard names its tiles' images and coordinates by itself."""
TILE_H5_DTYPE = np.dtype([("tile_of", "S32"), *[(n, "<i4") for n in ("level", "x", "y", "width", "height")]])
"""``TILE_DTYPE`` as HDF5 stores it (fixed-length bytes: h5py has no numpy unicode type)."""


def data_files(stem: str, fmt: str) -> list[str]:
    """The data file names of one feature shard in format ``fmt`` (marker excluded)."""
    if fmt == "npy":
        names = [shards.FEATURES_NPY.format(stem=stem), shards.IDS_NPY.format(stem=stem)]
    elif fmt == "hdf5":
        names = [shards.FEATURES_H5.format(stem=stem)]
    else:
        raise ValueError(f"featurize.format must be 'npy' or 'hdf5', got {fmt!r}")
    return names + [stem + shards.REJECTS_SUFFIX]


def write_feature_shard(
    folder: str,
    shard: int,
    image_ids: Sequence[str],
    features: np.ndarray,
    rejects: Sequence[dict[str, Any]],
    fmt: str,
    fingerprint: str,
    extra: dict[str, Any] | None = None,
    tiles: np.ndarray | None = None,
) -> dict[str, Any]:
    """Write and commit one shard: data files (atomic each), rejects, then the marker. Returns the marker.
    ``tiles`` (``TILE_DTYPE``, one per feature row): the image and box of each row of a tile shard."""
    stem = shards.shard_stem(shard)
    shards.fault_point("shard_start", storage.join(folder, stem))
    features = np.ascontiguousarray(features)
    if features.ndim != 2 or features.shape[0] != len(image_ids):
        raise ValueError(f"{stem}: features shape {features.shape} does not match {len(image_ids)} ids")
    ids = np.asarray(list(image_ids), dtype=ID_DTYPE)
    names = data_files(stem, fmt)
    if tiles is not None and len(tiles) != len(ids):
        raise ValueError(f"{stem}: {len(tiles)} tile boxes for {len(ids)} rows")
    if fmt == "npy":
        arrays = [(names[0], features), (names[1], ids)]
        if tiles is not None:
            names.insert(2, shards.TILES_NPY.format(stem=stem))
            arrays.append((names[2], tiles.astype(TILE_DTYPE)))
        for name, array in arrays:
            # np.save on a path would append ".npy" to the temporary name; a file handle keeps it.
            with storage.staged_file(storage.join(folder, name)) as tmp, open(tmp, "wb") as fh:
                np.save(fh, array)
    else:
        import h5py

        with storage.staged_file(storage.join(folder, names[0])) as tmp:
            with h5py.File(tmp, "w") as h5:
                h5.create_dataset("features", data=features, chunks=(min(len(ids) or 1, 1024), features.shape[1] or 1))
                h5.create_dataset("image_id", data=ids.astype("S32"))
                if tiles is not None:
                    h5.create_dataset("tiles", data=tiles.astype(TILE_DTYPE).astype(TILE_H5_DTYPE))
                h5.attrs["fingerprint"] = fingerprint
                h5.attrs["shard"] = shard
    storage.write_bytes_atomic(
        storage.join(folder, names[-1]), (json.dumps({"rejects": list(rejects)}, indent=1) + "\n").encode()
    )
    payload = {
        "kind": "features",
        "shard": shard,
        "rows": int(features.shape[0]),
        "rejects": len(rejects),
        "dim": int(features.shape[1]),
        "dtype": str(features.dtype),
        "format": fmt,
        "fingerprint": fingerprint,
        "members": shards.members_digest([*image_ids, *(r["image_id"] for r in rejects)]),
    }
    payload.update(extra or {})
    return shards.write_marker(folder, stem, names, payload)


def _load_npy(fs: fsspec.AbstractFileSystem, path: str | io.BytesIO) -> np.ndarray:
    """An ``.npy`` array from a path on ``fs`` or from bytes already read."""
    if isinstance(path, io.BytesIO) or isinstance(fs, LocalFileSystem):
        return np.load(path, allow_pickle=False)
    return np.load(io.BytesIO(fs.cat_file(path)), allow_pickle=False)


def read_feature_shard(folder: str, stem: str, marker: dict[str, Any], verify: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(image_ids [n] str, features [n, d]) of one committed shard, as its marker describes it.

    ``verify``: check every file the marker lists (size and sha256): the data files on the very bytes that
    are parsed (one read), the others (rejects) by themselves; ``ShardVerificationError`` names the file."""
    fs, _ = fsspec.core.url_to_fs(folder)
    expected: dict[str, Any] = dict(marker.get("files", {})) if verify else {}

    def load(name: str) -> Any:
        """A file to parse: its verified bytes (``verify``), else a path or the bytes (remote)."""
        if verify:
            return io.BytesIO(shards.read_verified(folder, name, expected.pop(name, None)))
        return fsspec.core.url_to_fs(storage.join(folder, name))[1]

    if marker["format"] == "npy":
        feats = _load_npy(fs, load(shards.FEATURES_NPY.format(stem=stem)))
        ids = _load_npy(fs, load(shards.IDS_NPY.format(stem=stem)))
    else:
        import h5py

        src = load(shards.FEATURES_H5.format(stem=stem))
        with (contextlib.nullcontext(src) if verify else fs.open(src, "rb")) as fh:
            with h5py.File(fh, "r") as h5:
                feats = h5["features"][...]
                ids = h5["image_id"][...].astype(ID_DTYPE)
    for name, expect in expected.items():  # the files not parsed here (rejects)
        shards.verify_file(folder, name, expect)
    if feats.shape[0] != marker["rows"] or ids.shape[0] != marker["rows"]:
        raise shards.ShardVerificationError(
            f"{storage.join(folder, stem)}: {feats.shape[0]} rows on disk, marker says {marker['rows']}"
        )
    return ids, feats


def read_feature_head(folder: str, stem: str, marker: dict[str, Any], rows: int) -> np.ndarray:
    """The first ``rows`` feature rows of one committed shard, reading only those bytes."""
    fs, _ = fsspec.core.url_to_fs(folder)
    take = max(0, min(int(rows), int(marker["rows"])))
    if marker["format"] == "npy":
        path = fsspec.core.url_to_fs(storage.join(folder, shards.FEATURES_NPY.format(stem=stem)))[1]
        with fs.open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            shape, fortran, dtype = header(fh) if header else ((), True, None)
            if fortran or len(shape) != 2 or dtype is None:
                return read_feature_shard(folder, stem, marker)[1][:take]
            data = fh.read(take * shape[1] * dtype.itemsize)
        return np.frombuffer(data, dtype=dtype).reshape(take, shape[1])
    import h5py

    with fs.open(fsspec.core.url_to_fs(storage.join(folder, shards.FEATURES_H5.format(stem=stem)))[1], "rb") as fh:
        with h5py.File(fh, "r") as h5:
            return h5["features"][:take]


def read_tile_boxes(folder: str, stem: str, marker: dict[str, Any]) -> np.ndarray | None:
    """The ``TILE_DTYPE`` rows of a tile feature shard (None for a shard of whole images)."""
    fs, _ = fsspec.core.url_to_fs(folder)
    if marker.get("format") == "hdf5":
        import h5py

        with fs.open(fsspec.core.url_to_fs(storage.join(folder, shards.FEATURES_H5.format(stem=stem)))[1], "rb") as fh:
            with h5py.File(fh, "r") as h5:
                return h5["tiles"][:].astype(TILE_DTYPE) if "tiles" in h5 else None
    name = shards.TILES_NPY.format(stem=stem)
    if name not in (marker.get("files") or {}):
        return None
    return _load_npy(fs, fsspec.core.url_to_fs(storage.join(folder, name))[1])


def read_rejects(folder: str, stem: str) -> list[dict[str, Any]]:
    data = storage.read_json(storage.join(folder, stem + shards.REJECTS_SUFFIX))
    return list(data.get("rejects", [])) if data else []


def committed_shards(folder: str, verify: bool = True) -> dict[str, dict[str, Any]]:
    """Markers of every committed feature shard in ``folder``; with ``verify``, check files against them."""
    markers = {s: m for s, m in shards.list_markers(folder).items() if m.get("kind") == "features"}
    if verify:
        for stem, marker in markers.items():
            shards.verify_shard(folder, stem, marker)
    return markers


def read_features(folder: str, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """All committed shards of ``folder`` as ``(image_ids, matrix)``, in shard order.

    ``verify``: every file is checked against its marker (size and sha256) as it is read."""
    markers = committed_shards(folder, verify=False)
    if not markers:
        raise ValueError(f"{folder}: no committed feature shards (no part-*.done.json markers)")
    ids, feats = [], []
    for stem in sorted(markers):
        i, f = read_feature_shard(folder, stem, markers[stem], verify=verify)
        ids.append(i)
        feats.append(f)
    return np.concatenate(ids), np.concatenate(feats)
