"""Prep shard files: writing one shard (HDF5 or .npy, each file committed atomically) and opening one.

Layout of shard ``part-NNNNN`` in the prep folder:
- hdf5: ``part-NNNNN.h5`` with ``images`` [n,H,W,3] uint8 (chunked, compressed), ``labels`` int32
  [n] (-1 = no label), ``image_id`` S32 [n], and attributes (config JSON, fingerprint, size).
- npy: ``part-NNNNN.images.npy``, ``part-NNNNN.labels.npy``, ``part-NNNNN.ids.npy`` (same content).
The marker ``part-NNNNN.done.json`` (imgfeat.metadata.contracts.shards) is written after these, by the caller.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from imgfeat.metadata.contracts.shards import IDS_NPY, PREP_H5, PREP_IMAGES_NPY, PREP_LABELS_NPY
from imgfeat.metadata.storage import is_local, join, staged_file

CHUNK_BYTES = 64 * 1024
"""Target HDF5 chunk size: a few small images per chunk, so random access decompresses little."""


def shard_files(stem: str, fmt: str) -> list[str]:
    """The data file names of one shard, in the order they are written."""
    if fmt == "hdf5":
        return [PREP_H5.format(stem=stem)]
    return [PREP_IMAGES_NPY.format(stem=stem), PREP_LABELS_NPY.format(stem=stem), IDS_NPY.format(stem=stem)]


def write_shard(folder: str, stem: str, fmt: str, images: np.ndarray, labels: np.ndarray, ids: list[str],
                compression: str = "lzf", attrs: dict[str, Any] | None = None) -> list[str]:
    """Write one shard's data files (each to a temporary name, renamed when closed); return their names."""
    ids_arr = np.array([s.encode("ascii") for s in ids], dtype="S32") if ids else np.zeros((0,), "S32")
    labels = np.asarray(labels, np.int32)
    if fmt == "hdf5":
        _write_h5(join(folder, PREP_H5.format(stem=stem)), images, labels, ids_arr, compression, attrs or {})
    elif fmt == "npy":
        for name, arr in zip(shard_files(stem, "npy"), (images, labels, ids_arr)):
            with staged_file(join(folder, name)) as tmp, open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(arr), allow_pickle=False)
    else:
        raise ValueError(f"prep.format must be 'hdf5' or 'npy', got {fmt!r}")
    return shard_files(stem, fmt)


def _write_h5(url: str, images: np.ndarray, labels: np.ndarray, ids: np.ndarray, compression: str,
              attrs: dict[str, Any]) -> None:
    import h5py

    n = images.shape[0]
    per_image = int(np.prod(images.shape[1:])) or 1
    opts: dict[str, Any] = {}
    if n:
        opts["chunks"] = (max(1, min(n, CHUNK_BYTES // per_image)),) + tuple(images.shape[1:])
        if compression == "gzip":
            opts.update(compression="gzip", compression_opts=4, shuffle=False)
        elif compression == "lzf":
            opts["compression"] = "lzf"
    with staged_file(url) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.create_dataset("images", data=images, dtype=np.uint8, **opts)
            h5.create_dataset("labels", data=labels, dtype=np.int32)
            h5.create_dataset("image_id", data=ids, dtype="S32")
            for key, value in attrs.items():
                h5.attrs[key] = value if isinstance(value, (int, float, str)) else json.dumps(value, sort_keys=True)


class ShardReader:
    """Random access to one committed shard; opened lazily, in the process that reads."""

    def __init__(self, folder: str, stem: str, fmt: str) -> None:
        self.folder, self.stem, self.fmt = folder, stem, fmt
        self._h5: Any = None
        self._images: Any = None
        self._pid = os.getpid()

    def _open(self) -> Any:
        if self._pid != os.getpid():  # forked: a handle from the parent must not be shared
            self._h5, self._images, self._pid = None, None, os.getpid()
        if self.fmt == "hdf5":
            if self._h5 is None:
                import h5py

                url = join(self.folder, PREP_H5.format(stem=self.stem))
                if is_local(url):
                    self._h5 = h5py.File(_local(url), "r")
                else:
                    import fsspec

                    self._h5 = h5py.File(fsspec.open(url, "rb").open(), "r")
            return self._h5["images"]
        if self._images is None:
            self._images = _load_npy(join(self.folder, PREP_IMAGES_NPY.format(stem=self.stem)), mmap=True)
        return self._images

    def image(self, j: int) -> np.ndarray:
        """Image ``j`` as an HxWx3 uint8 array (a copy, safe to hand to torch)."""
        return np.array(self._open()[j])

    def labels_and_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """All labels (int32) and image ids (S32) of the shard, read once and closed again."""
        if self.fmt == "hdf5":
            import h5py

            url = join(self.folder, PREP_H5.format(stem=self.stem))
            if is_local(url):
                with h5py.File(_local(url), "r") as h5:
                    return h5["labels"][:], h5["image_id"][:]
            import fsspec

            with fsspec.open(url, "rb") as fh, h5py.File(fh, "r") as h5:
                return h5["labels"][:], h5["image_id"][:]
        labels = _load_npy(join(self.folder, PREP_LABELS_NPY.format(stem=self.stem)), mmap=False)
        ids = _load_npy(join(self.folder, IDS_NPY.format(stem=self.stem)), mmap=False)
        return np.asarray(labels), np.asarray(ids)

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
        self._h5 = None
        self._images = None

    def __getstate__(self) -> dict[str, Any]:
        # Open handles never cross a process boundary: each worker opens its own.
        return {"folder": self.folder, "stem": self.stem, "fmt": self.fmt, "_h5": None, "_images": None,
                "_pid": -1}


def _local(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def _load_npy(url: str, mmap: bool) -> np.ndarray:
    if is_local(url):
        return np.load(_local(url), mmap_mode="r" if mmap else None, allow_pickle=False)
    import io

    import fsspec

    with fsspec.open(url, "rb") as fh:
        return np.load(io.BytesIO(fh.read()), allow_pickle=False)
