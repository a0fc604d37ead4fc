"""A synthetic object store for fsspec: N keys made up on the fly, with S3 listing semantics and request counts.

Importing this module registers the protocol ``synth``. A URL names the store by its parameters in the
"bucket" part, so every process that parses the URL sees the same keys (nothing is stored anywhere)::

    synth://n=10M,fanout=100,depth=2,seed=1/            # 10,000,000 keys in 100 x 100 folders
    synth://n=100k,flat=1/                              # 100,000 keys directly under the root

``synth_url(n=..., fanout=..., ...)`` writes such a URL. Parameters (``k``/``M``/``G`` suffixes allowed):

=========  =======  ==========================================================================
``n``      1000     number of keys
``fanout`` 100      subfolders per folder
``depth``  2        folder levels above the files (0: all keys directly under the root)
``flat``   0        1: one huge flat prefix (same as ``depth=0``)
``seed``   0        changes sizes, mtimes and bytes (not names)
``minkb``  1        smallest object, KiB
``maxkb``  200      largest object, KiB
``images`` 0        1: every object is a valid 8x8 PNG, padded to its size with a private chunk
``ext``    jpg      file extension (``png`` by default with ``images=1``)
``page``   1000     most entries per LIST response (S3's MaxKeys ceiling)
``cache``  0        1: ``ls`` results are cached per process like s3fs's dircache (a cached ls costs no LIST)
=========  =======  ==========================================================================

Layout: the ``fanout ** depth`` leaf folders are ``d00/d00`` .. ``d99/d99`` (zero-padded); key ``i`` (0 .. n-1)
is ``<leaf>/img<i zero-padded>.<ext>``, the keys dealt to leaves in order (the first ``n % leaves`` leaves get
one more), so sorting the keys as strings sorts them by index. A folder with no key does not exist (S3 has
no empty folders). Sizes are ``minkb``..``maxkb`` KiB from a hash of (seed, i); mtimes lie within a year.

Requests are counted the way S3 would bill them:

* ``ls(path)``: ListObjectsV2 with delimiter ``/``, one LIST per page of at most ``page`` entries (keys and
  common prefixes together, as S3's MaxKeys counts them). An empty listing then HEADs the path (s3fs: ``ls``
  of a file gives that file).
* ``find(path)`` (no ``maxdepth``): ListObjectsV2 without delimiter, one LIST per ``page`` keys, as s3fs does.
  With ``maxdepth`` it walks with ``ls``.
* ``info``/``exists``: HEAD, then (not a key) one LIST with MaxKeys 1 to tell a folder. ``isdir``: as s3fs,
  the whole delimiter listing of the path (every page; a flat prefix of 10M keys costs 10,000 LISTs).
* ``cat_file``: one GET. ``open``: the HEAD of ``info``, then one GET per block fetched.
* ``ls_range(prefix, start_after, max_keys, delimiter, token)``: exactly one LIST, the primitive for splitting a
  key range over tasks (S3's Prefix, StartAfter, MaxKeys, Delimiter, ContinuationToken; see its docstring).

Counters (``counts()``, per process, cumulative): ``list``, ``head``, ``get`` requests; ``keys`` and ``prefixes``
returned by LISTs; ``bytes`` returned by GETs; ``calls`` (public calls); ``max_call_keys``, the most entries
one public call returned (what its caller had to hold at once). When the environment variable
``SYNTHSTORE_COUNTS`` names a folder, every public call appends its counts as one JSON line (one
``O_APPEND`` write, atomic) to ``<folder>/<host>-<pid>.jsonl``, so Spark's Python workers (separate processes,
which may end with ``os._exit``) lose nothing; ``read_counts(folder)`` sums them (``max_*`` keys: the maximum).

Memory: every call generates keys by index arithmetic, one page at a time; nothing is proportional to ``n``
except what the call itself returns (``find`` returns every key under the path, as fsspec's API wants).

Spark: executors' Python workers must import this module before they parse a ``synth://`` URL (for example
``PYTHONPATH`` with the repository root and an ``import bench.synthstore`` in the task function).
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import socket
import struct
import threading
import zlib
from dataclasses import dataclass
from typing import Any, NamedTuple

import fsspec
from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

PROTOCOL = "synth"
COUNTS_ENV = "SYNTHSTORE_COUNTS"
MAX_PAGE = 1000
_MASK = (1 << 64) - 1
_MTIME_BASE = 1_700_000_000
_YEAR = 365 * 86400
_DEFAULTS = {"n": 1000, "fanout": 100, "depth": 2, "flat": 0, "seed": 0, "minkb": 1, "maxkb": 200, "images": 0,
             "page": MAX_PAGE, "cache": 0}
_SUFFIX = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9}


# ---------------------------------------------------------------------------------------------- counters

_COUNTER_NAMES = ("list", "head", "get", "keys", "prefixes", "bytes", "calls", "max_call_keys")
_lock = threading.Lock()
_totals: dict[str, int] = dict.fromkeys(_COUNTER_NAMES, 0)
_pending: dict[str, int] = dict.fromkeys(_COUNTER_NAMES, 0)


def _add(**deltas: int) -> None:
    with _lock:
        for k, v in deltas.items():
            _totals[k] += v
            _pending[k] += v


def _call_done(returned: int) -> None:
    """End of one public call: note how many entries it returned, then flush the counts if a folder is set."""
    with _lock:
        _totals["calls"] += 1
        _pending["calls"] += 1
        _totals["max_call_keys"] = max(_totals["max_call_keys"], returned)
        _pending["max_call_keys"] = max(_pending["max_call_keys"], returned)
    flush_counts()


def counts() -> dict[str, int]:
    """This process's counters since start (or the last ``reset_counts``)."""
    with _lock:
        return dict(_totals)


def reset_counts() -> None:
    """Zero this process's counters (what was already flushed to ``SYNTHSTORE_COUNTS`` stays there)."""
    with _lock:
        for k in _COUNTER_NAMES:
            _totals[k] = 0


def flush_counts() -> None:
    """Append the counts not yet written as one JSON line to ``$SYNTHSTORE_COUNTS/<host>-<pid>.jsonl``."""
    folder = os.environ.get(COUNTS_ENV)
    with _lock:
        if not any(_pending.values()):
            return
        delta = dict(_pending)
        for k in _COUNTER_NAMES:
            _pending[k] = 0
    if not folder:
        return
    line = (json.dumps(dict(delta, pid=os.getpid()), separators=(",", ":")) + "\n").encode()
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, f"{socket.gethostname()}-{os.getpid()}.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                 0o644)
    try:
        os.write(fd, line)  # one write of a short line with O_APPEND: never interleaved with another process's
    finally:
        os.close(fd)


atexit.register(flush_counts)


def read_counts(folder: str) -> dict[str, int]:
    """The counters of every process that wrote to ``folder``, summed (``max_*``: the maximum), plus ``processes``."""
    total: dict[str, int] = dict.fromkeys(_COUNTER_NAMES, 0)
    pids = set()
    if not os.path.isdir(folder):
        return dict(total, processes=0)
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".jsonl"):
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as fh:
            for line in fh:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # cannot happen with single appends; a torn line would be skipped, not fatal
                pids.add((name, row.get("pid")))
                for k in _COUNTER_NAMES:
                    v = int(row.get(k, 0))
                    total[k] = max(total[k], v) if k.startswith("max_") else total[k] + v
    return dict(total, processes=len(pids))


# ------------------------------------------------------------------------------------------------ layout

def _int(text: str) -> int:
    text = text.strip()
    if text and text[-1] in _SUFFIX:
        return int(float(text[:-1]) * _SUFFIX[text[-1]])
    return int(text)


@dataclass(frozen=True)
class Layout:
    """The keys of one synthetic bucket, all by index arithmetic (see the module docstring)."""

    n: int
    fanout: int
    depth: int
    seed: int
    minkb: int
    maxkb: int
    images: bool
    ext: str
    page: int
    cache: bool

    def __post_init__(self) -> None:
        if self.n < 0 or self.fanout < 1 or self.depth < 0 or not 1 <= self.page <= MAX_PAGE:
            raise ValueError(f"synth: bad layout {self}")
        if not 0 < self.minkb <= self.maxkb:
            raise ValueError("synth: need 0 < minkb <= maxkb")

    @property
    def leaves(self) -> int:
        return self.fanout ** self.depth

    @functools.cached_property
    def _shape(self) -> tuple[int, int, int, int, int]:
        """(keys per leaf q, leaves with q + 1 keys r, width of a folder number, of a key number, first index after the long leaves)."""
        q, r = divmod(self.n, self.leaves)
        wf = len(str(self.fanout - 1)) if self.fanout > 1 else 1
        wn = len(str(self.n - 1)) if self.n > 1 else 1
        return q, r, wf, wn, r * (q + 1)

    def leaf_of(self, i: int) -> int:
        q, r, _, _, b = self._shape
        return i // (q + 1) if i < b else r + (i - b) // q

    def leaf_start(self, j: int) -> int:
        q, r, _, _, _ = self._shape
        return j * q + min(j, r)

    def folder(self, j: int) -> str:
        """The folder of leaf ``j``: ``"d05/d17/"`` (``""`` at depth 0)."""
        return _folder(self.fanout, self.depth, self._shape[2], j)

    def key(self, i: int) -> str:
        """Key ``i`` (no bucket): ``d05/d17/img0001234.jpg``."""
        return f"{self.folder(self.leaf_of(i))}img{i:0{self._shape[3]}d}.{self.ext}"

    def parse(self, key: str) -> int | None:
        """The index of ``key``, or None when it is not a key of this bucket."""
        parts = key.split("/")
        if len(parts) != self.depth + 1:
            return None
        _, _, wf, wn, _ = self._shape
        j = 0
        for p in parts[:-1]:
            if len(p) != wf + 1 or p[0] != "d" or not p[1:].isdigit() or int(p[1:]) >= self.fanout:
                return None
            j = j * self.fanout + int(p[1:])
        name, suffix = parts[-1], "." + self.ext
        digits = name[3:-len(suffix)]
        if not (name.startswith("img") and name.endswith(suffix) and len(digits) == wn and digits.isdigit()):
            return None
        i = int(digits)
        return i if i < self.n and self.leaf_of(i) == j else None

    def lower_bound(self, s: str) -> int:
        """The first index whose key is >= ``s`` (``n`` if none): keys sort as their indices."""
        lo, hi = 0, self.n
        while lo < hi:
            mid = (lo + hi) // 2
            if self.key(mid) < s:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def upper_bound(self, s: str) -> int:
        """The first index whose key is > ``s``."""
        i = self.lower_bound(s)
        return i + 1 if i < self.n and self.key(i) == s else i

    def prefix_range(self, prefix: str) -> tuple[int, int]:
        """The indices ``[lo, hi)`` of the keys that start with ``prefix``."""
        if not prefix:
            return 0, self.n
        return self.lower_bound(prefix), self.lower_bound(_successor(prefix))

    def hashed(self, i: int) -> int:
        z = (i + 1 + self.seed * 0x632BE59BD9B4E019) * 0x9E3779B97F4A7C15 & _MASK
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
        z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK
        return z ^ (z >> 31)

    def size(self, i: int) -> int:
        lo = self.minkb * 1024
        return lo + self.hashed(i) % (self.maxkb * 1024 - lo + 1)

    def mtime(self, i: int) -> float:
        return float(_MTIME_BASE + (self.hashed(i) >> 40) % _YEAR)

    def payload(self, i: int) -> bytes:
        """The object's bytes: deterministic, unique per (seed, key), ``size(i)`` long."""
        size = self.size(i)
        block = hashlib.blake2b(f"{self.seed}:{i}".encode(), digest_size=64).digest()
        if not self.images:
            return (block * (size // 64 + 1))[:size]
        h = self.hashed(i)
        rgb = bytes(((h >> 8 * k) & 0xFF) for k in range(3))
        raw = b"".join(b"\x00" + rgb * 8 for _ in range(8))
        core = (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0))
                + _chunk(b"IDAT", zlib.compress(raw, 9)))
        pad = size - len(core) - 12 - 12  # the padding chunk and IEND, 12 bytes of framing each
        if pad < 0:
            raise ValueError(f"synth: object {i} of {size} bytes is too small for a PNG")
        return core + _chunk(b"syNt", (block * (pad // 64 + 1))[:pad]) + _chunk(b"IEND", b"")

    def file_entry(self, bucket: str, i: int) -> dict[str, Any]:
        return {"name": f"{bucket}/{self.key(i)}", "size": self.size(i), "type": "file", "mtime": self.mtime(i)}

    def file_entries(self, bucket: str, lo: int, hi: int) -> list[dict[str, Any]]:
        """Entries of keys ``lo .. hi-1``, a leaf's folder string made once per leaf."""
        out: list[dict[str, Any]] = []
        wn, ext = self._shape[3], self.ext
        lo_b, span = self.minkb * 1024, self.maxkb * 1024 - self.minkb * 1024 + 1
        seed_mix = 1 + self.seed * 0x632BE59BD9B4E019
        i = lo
        while i < hi:
            j = self.leaf_of(i)
            end = min(hi, self.leaf_start(j + 1))
            head = f"{bucket}/{self.folder(j)}img"
            for k in range(i, end):  # Layout.hashed, inlined: this loop makes every listed key
                z = (k + seed_mix) * 0x9E3779B97F4A7C15 & _MASK
                z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
                z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK
                z ^= z >> 31
                out.append({"name": f"{head}{k:0{wn}d}.{ext}", "size": lo_b + z % span, "type": "file",
                            "mtime": float(_MTIME_BASE + (z >> 40) % _YEAR)})
            i = end
        return out

    def list_page(self, bucket: str, prefix: str, lo: int, hi: int, delimiter: str, max_keys: int
                  ) -> tuple[list[dict[str, Any]], int]:
        """One ListObjectsV2 response over key indices ``[lo, hi)`` (all starting with ``prefix``).

        Returns (entries, next lo): with delimiter ``/``, keys with a ``/`` past the prefix roll up into one
        directory entry per common prefix, and the listing resumes after that prefix (as S3's continuation
        token does); keys and prefixes together count against ``max_keys``."""
        if not delimiter:
            end = min(hi, lo + max_keys)
            return self.file_entries(bucket, lo, end), end
        assert delimiter == "/", "synth: only '/' is a delimiter"
        out: list[dict[str, Any]] = []
        while lo < hi and len(out) < max_keys:
            rest = self.key(lo)[len(prefix):]
            cut = rest.find("/")
            if cut < 0:  # a key directly under the prefix: so is every key of its leaf
                end = min(hi, self.leaf_start(self.leaf_of(lo) + 1), lo + max_keys - len(out))
                out.extend(self.file_entries(bucket, lo, end))
                lo = end
            else:
                common = prefix + rest[:cut + 1]
                out.append({"name": f"{bucket}/{common[:-1]}", "size": 0, "type": "directory",
                            "StorageClass": "DIRECTORY"})
                lo = self.lower_bound(_successor(common))
        return out, lo


@functools.lru_cache(maxsize=65536)
def _folder(fanout: int, depth: int, wf: int, j: int) -> str:
    parts = []
    for _ in range(depth):
        j, d = divmod(j, fanout)
        parts.append(f"d{d:0{wf}d}/")
    return "".join(reversed(parts))


def _successor(prefix: str) -> str:
    """The smallest string greater than every string that starts with ``prefix``."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


@functools.lru_cache(maxsize=256)
def parse_bucket(bucket: str) -> Layout:
    """The layout a bucket name describes (``n=10M,fanout=100,depth=2,seed=1``); unknown keys raise."""
    values: dict[str, Any] = dict(_DEFAULTS)
    ext = None
    for part in filter(None, bucket.split(",")):
        name, eq, value = part.partition("=")
        if not eq or (name not in _DEFAULTS and name != "ext"):
            raise ValueError(f"synth: bad bucket parameter {part!r} in {bucket!r} (known: {sorted(_DEFAULTS)} and ext)")
        if name == "ext":
            ext = value
        else:
            values[name] = _int(value)
    if values.pop("flat"):
        values["depth"] = 0
    images = bool(values.pop("images"))
    return Layout(n=values["n"], fanout=values["fanout"], depth=values["depth"], seed=values["seed"],
                  minkb=values["minkb"], maxkb=values["maxkb"], images=images,
                  ext=ext or ("png" if images else "jpg"), page=values["page"], cache=bool(values["cache"]))


def synth_url(n: int = 1000, **params: Any) -> str:
    """``synth://n=...,k=v/`` for these parameters (see the module docstring); booleans as 0/1."""
    items = [f"n={n}"] + [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in params.items()]
    url = "synth://" + ",".join(items) + "/"
    parse_bucket(url[len("synth://"):-1])  # fail now on a bad parameter
    return url


def key_at(url_or_bucket: str, i: int) -> str:
    """The full fsspec name (``bucket/key``) of key ``i`` of a synthetic bucket."""
    bucket = SynthFileSystem._strip_protocol(url_or_bucket).split("/", 1)[0]
    return f"{bucket}/{parse_bucket(bucket).key(i)}"


# -------------------------------------------------------------------------------------------- filesystem

class ListPage(NamedTuple):
    """One LIST response of ``ls_range``."""

    entries: list[dict[str, Any]]
    truncated: bool
    """S3's IsTruncated: more entries follow."""
    token: str | None
    """S3's NextContinuationToken: pass it back as ``token`` (with the same prefix and delimiter) to go on."""


class SynthFileSystem(AbstractFileSystem):
    """fsspec over synthetic buckets (see the module docstring). Stateless but for the optional ls cache."""

    protocol = PROTOCOL
    root_marker = ""

    # -- helpers

    def _split(self, path: str) -> tuple[str, Layout, str]:
        path = self._strip_protocol(path)
        bucket, _, key = path.partition("/")
        if not bucket:
            raise ValueError("synth: a path needs a bucket (the parameters), e.g. synth://n=1000/")
        return bucket, parse_bucket(bucket), key.strip("/")

    def _pages(self, bucket: str, layout: Layout, prefix: str, delimiter: str):
        """Every page of a listing of ``prefix``, counting one LIST per page (an empty listing costs one too)."""
        lo, hi = layout.prefix_range(prefix)
        while True:
            entries, lo = layout.list_page(bucket, prefix, lo, hi, delimiter, layout.page)
            dirs = sum(1 for e in entries if e["type"] == "directory")
            _add(list=1, keys=len(entries) - dirs, prefixes=dirs)
            yield entries
            if lo >= hi:
                return

    def _head(self, bucket: str, layout: Layout, key: str) -> dict[str, Any] | None:
        _add(head=1)
        i = layout.parse(key) if key else None
        return None if i is None else layout.file_entry(bucket, i)

    def _has_prefix(self, layout: Layout, prefix: str) -> bool:
        """One LIST with MaxKeys 1: does any key start with ``prefix``?"""
        lo, hi = layout.prefix_range(prefix)
        _add(list=1, keys=int(lo < hi))
        return lo < hi

    # -- fsspec API

    def ls(self, path, detail=True, refresh=False, **kwargs):
        bucket, layout, key = self._split(path)
        cache_key = f"{bucket}/{key}".rstrip("/")
        if layout.cache and not refresh and cache_key in self.dircache:
            out = self.dircache[cache_key]
        else:
            out = [e for page in self._pages(bucket, layout, key + "/" if key else "", "/") for e in page]
            if not out and key:  # an empty bucket lists as [], a missing folder raises
                info = self._head(bucket, layout, key)
                if info is None:
                    _call_done(0)
                    raise FileNotFoundError(path)
                out = [info]
            elif layout.cache:
                self.dircache[cache_key] = out
        _call_done(len(out))
        return out if detail else [e["name"] for e in out]

    def find(self, path, maxdepth=None, withdirs=False, detail=False, **kwargs):
        if maxdepth is not None:
            return super().find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)
        bucket, layout, key = self._split(path)
        prefix = (key + "/" if key else "") + kwargs.get("prefix", "")
        files = [e for page in self._pages(bucket, layout, prefix, "") for e in page]
        if not files and key and not kwargs.get("prefix"):
            info = self._head(bucket, layout, key)
            files = [info] if info is not None else []
        out = files
        if withdirs:
            base = f"{bucket}/{key}".rstrip("/")
            dirs: dict[str, dict[str, Any]] = {}
            for e in files:
                parent = e["name"].rsplit("/", 1)[0]
                while len(parent) > len(base) and parent not in dirs:
                    dirs[parent] = {"name": parent, "size": 0, "type": "directory", "StorageClass": "DIRECTORY"}
                    parent = parent.rsplit("/", 1)[0]
            out = sorted(files + list(dirs.values()), key=lambda e: e["name"])
        _call_done(len(out))
        return {e["name"]: e for e in out} if detail else [e["name"] for e in out]

    def info(self, path, **kwargs):
        bucket, layout, key = self._split(path)
        if not key:
            _add(head=1)  # HeadBucket
            _call_done(1)
            return {"name": bucket, "size": 0, "type": "directory", "StorageClass": "BUCKET"}
        found = self._head(bucket, layout, key)
        if found is None and self._has_prefix(layout, key + "/"):
            found = {"name": f"{bucket}/{key}", "size": 0, "type": "directory", "StorageClass": "DIRECTORY"}
        _call_done(int(found is not None))
        if found is None:
            raise FileNotFoundError(path)
        return found

    def isdir(self, path):
        """As s3fs: a full delimiter listing of the path (every page), unless the ls cache holds it."""
        bucket, layout, key = self._split(path)
        cache_key = f"{bucket}/{key}".rstrip("/")
        if layout.cache and cache_key in self.dircache:
            ok = any(e["name"] != cache_key for e in self.dircache[cache_key])
        else:
            listed: list[dict[str, Any]] = []
            ok = False
            for page in self._pages(bucket, layout, key + "/" if key else "", "/"):
                ok = ok or bool(page)
                if layout.cache:
                    listed.extend(page)
            if layout.cache and listed:
                self.dircache[cache_key] = listed
            ok = ok or not key  # a bucket is a folder even when empty (s3fs: its listing does not raise)
        _call_done(0)
        return ok

    def cat_file(self, path, start=None, end=None, **kwargs):
        bucket, layout, key = self._split(path)
        i = layout.parse(key)
        _add(get=1)
        if i is None:
            _call_done(0)
            raise FileNotFoundError(path)
        data = layout.payload(i)[start:end]
        _add(bytes=len(data))
        _call_done(0)
        return data

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        if mode != "rb":
            raise PermissionError("synth: read-only")
        return SynthFile(self, path, mode, block_size=block_size or "default", cache_options=cache_options, **kwargs)

    def ls_range(self, prefix: str, start_after: str | None = None, max_keys: int = MAX_PAGE,
                 delimiter: str = "", token: str | None = None) -> ListPage:
        """One ListObjectsV2 request (one LIST counted): up to ``max_keys`` (<= page) entries, sorted.

        ``prefix``: ``bucket/key-prefix`` (any string, not only a folder; with or without ``synth://``).
        ``start_after``: a full name as entries carry it (``bucket/...``): only keys after it (S3's StartAfter);
        with a delimiter, keys after it still roll up into their common prefix. ``delimiter``: ``""`` (flat,
        the default) or ``"/"``. ``token``: the ``token`` of the previous page (S3's ContinuationToken;
        ``start_after`` is then ignored). Splitting a key range over tasks: task t lists from its own
        ``start_after`` and stops after the name that is the next task's ``start_after``."""
        raw = prefix[len(PROTOCOL) + 3:] if prefix.startswith(PROTOCOL + "://") else prefix
        bucket, _, key_prefix = raw.partition("/")  # kept as given: a trailing "/" is part of an S3 prefix
        layout = parse_bucket(bucket)
        lo, hi = layout.prefix_range(key_prefix)
        if token is not None:
            lo = max(lo, int(token))
        elif start_after:
            after = self._strip_protocol(start_after)
            after = after[len(bucket) + 1:] if after.startswith(bucket + "/") else after
            lo = max(lo, layout.upper_bound(after))
        entries, nxt = layout.list_page(bucket, key_prefix, lo, hi, delimiter, min(max_keys, layout.page))
        dirs = sum(1 for e in entries if e["type"] == "directory")
        _add(list=1, keys=len(entries) - dirs, prefixes=dirs)
        _call_done(len(entries))
        return ListPage(entries, nxt < hi, str(nxt) if nxt < hi else None)


class SynthFile(AbstractBufferedFile):
    """A read-only synthetic object: one GET per block fetched."""

    def _fetch_range(self, start, end):
        return self.fs.cat_file(self.path, start, end)


fsspec.register_implementation(PROTOCOL, SynthFileSystem, clobber=True)
