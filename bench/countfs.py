"""``countfile://``: the local filesystem through fsspec, counting every byte read (how many bytes of the
manifest a featurize rank reads, in bench/bench_featurize_scale.py and tests/test_featurize_share.py)."""
from __future__ import annotations

from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem


class _CountingOpener(LocalFileOpener):
    def read(self, *args: Any) -> bytes:
        data = super().read(*args)
        CountingFS.bytes_read += len(data)
        return data

    def readinto(self, buf: Any) -> int:
        n = super().readinto(buf)
        CountingFS.bytes_read += n
        return n


class CountingFS(LocalFileSystem):
    """The local filesystem as ``countfile://``, counting every byte read through it."""

    protocol = "countfile"
    bytes_read = 0

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        path = str(path)
        return super()._strip_protocol(path[len("countfile://"):] if path.startswith("countfile://") else path)

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, **kwargs: Any) -> Any:
        return _CountingOpener(self._strip_protocol(path), mode, fs=self, **kwargs)


fsspec.register_implementation("countfile", CountingFS, clobber=True)
