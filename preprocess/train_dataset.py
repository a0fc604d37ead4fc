"""The training-side Dataset over ``imgfeat prep`` shards: random access, little memory.

Only shards with a valid marker are read (a shard without one is not committed). Labels are loaded
once (4 bytes a row); images are read on demand: HDF5 through a handle each worker opens for
itself, .npy through a read-only memory map.
"""
from __future__ import annotations

import bisect
import logging

import numpy as np
import torch
from torch.utils.data import Dataset

from imgfeat.metadata.contracts.shards import ShardVerificationError, list_markers, verify_shard
from imgfeat.preprocess.prep_io import ShardReader

log = logging.getLogger(__name__)


class PrepDataset(Dataset):
    """Items ``(uint8 image, label)``: the image [3,H,W] (``channels_first``) or [H,W,3]; label -1 = none."""

    def __init__(self, prep: str, channels_first: bool = True, checksums: bool = False) -> None:
        self.prep = prep
        self.channels_first = channels_first
        self.readers: list[ShardReader] = []
        self.offsets: list[int] = [0]
        labels, ids = [], []
        for stem, marker in sorted(list_markers(prep).items()):
            if marker.get("kind") != "prep":
                continue
            try:
                verify_shard(prep, stem, marker, checksums=checksums)
            except ShardVerificationError as exc:
                log.warning("skipping %s: %s", stem, exc)
                continue
            reader = ShardReader(prep, stem, "hdf5" if marker.get("format") == "hdf5" else "npy")
            shard_labels, shard_ids = reader.labels_and_ids()
            if len(shard_labels) != int(marker["rows"]):
                log.warning("skipping %s: %d rows, its marker says %d", stem, len(shard_labels), marker["rows"])
                continue
            if not len(shard_labels):
                continue
            self.readers.append(reader)
            self.offsets.append(self.offsets[-1] + len(shard_labels))
            labels.append(shard_labels)
            ids.append(shard_ids)
        self.labels = np.concatenate(labels).astype(np.int64) if labels else np.zeros((0,), np.int64)
        self._ids = np.concatenate(ids) if ids else np.zeros((0,), "S32")

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, i: int) -> tuple[int, int]:
        """(shard position, row within the shard) of item ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} items")
        s = bisect.bisect_right(self.offsets, i) - 1
        return s, i - self.offsets[s]

    def image_id(self, i: int) -> str:
        return self._ids[i].decode("ascii")

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        s, j = self.locate(int(i))
        image = torch.from_numpy(self.readers[s].image(j))
        return (image.permute(2, 0, 1) if self.channels_first else image), int(self.labels[i])

    def close(self) -> None:
        for reader in self.readers:
            reader.close()
