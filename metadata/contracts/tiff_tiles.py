"""Read one box of a tiled or pyramidal TIFF without reading the rest of the image.

For TIFF, GeoTIFF, BigTIFF, OME-TIFF and the whole-slide formats built on TIFF (what tifffile opens),
``read_region`` decodes only the segments (tiles, or strips of a stripped TIFF) that intersect the box,
found through the level's ``dataoffsets``/``databytecounts`` and decoded one at a time by tifffile's
segment decoder (``TiffPage.decode``, codecs from imagecodecs: JPEG with its tables, deflate, LZW, zstd,
PackBits, WebP, ...). ``check_tiff`` is the manifest's structural check: it reads the header, the IFDs
of the first series and its pyramid and their offset arrays, never tile data.

Cost per box: the header and IFDs (a few KiB, plus 8 or 16 bytes of offset arrays per tile of the level),
then the compressed bytes of the tiles the box touches: for a box of ``w x h`` and tiles of ``t x t``,
at most ``(ceil(w / t) + 1) * (ceil(h / t) + 1)`` tiles; for a stripped TIFF whole image-wide strips.
Memory: the output box plus one segment (compressed and decoded) at a time; a level whose single
decoded segment is over ``max_segment_bytes`` (a gigapixel TIFF stored as one strip) is ``too_large``.

Reason codes (``schema.STATUS_CODES``) of :class:`TiffTileError` and ``check_tiff``:

* ``zero_bytes``: the file is empty.
* ``not_image``: no TIFF byte-order mark (``II``/``MM``) at the start.
* ``truncated``: the first IFD, or a segment (offset + byte count), lies past the end of the file, or a
  read returned fewer bytes than the segment's byte count.
* ``undecodable``: tifffile rejects the structure (broken IFD, fewer offsets than segments), a pyramid
  level that does not exist, or a segment the codec rejects.
* ``unsupported_format``: pixels this reader does not turn into RGB: a sample type other than uint8
  (1..8 bits) or uint16 (9..16 bits), a colour model other than grey, RGB, palette or JPEG-YCbCr,
  volumetric (depth > 1) images, or a compression without a decoder installed.
* ``too_large``: one decoded segment of the level would be over ``max_segment_bytes``.

Only the first series (image) of the file is read, and of each level its first page (the first plane
of a stack or of an OME channel series).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import numpy as np

# A broken file is a row's reason here; tifffile's own warnings about it would repeat that once per file.
logging.getLogger("tifffile").setLevel(logging.ERROR)

MAX_SEGMENT_BYTES = 256 * 1024 * 1024
"""The largest decoded segment (tile or strip) read_region will hold; a level with a larger one is ``too_large``."""

_MINISWHITE, _MINISBLACK, _RGB, _PALETTE, _YCBCR = 0, 1, 2, 3, 6
_JPEG_COMPRESSIONS = {6, 7, 33007, 34892}
_DETAIL_MAX = 300


class TiffTileError(Exception):
    """A TIFF that cannot be read: ``reason`` is a manifest status code, ``detail`` says what is wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class TiffLevel:
    """One resolution level of the first image of a TIFF (level 0 is full resolution)."""

    index: int
    width: int
    height: int
    tile_width: int | None
    """None for a stripped level."""
    tile_height: int | None
    samples: int
    """Samples per pixel (1 grey or palette, 3 RGB, 4 RGBA, ...)."""
    dtype: str
    """numpy dtype name of a sample (``uint8``, ``uint16``; ``unknown`` when tifffile has none)."""
    compression: str
    """tifffile's compression name, lower case (``none``, ``jpeg``, ``adobe_deflate``, ``lzw``, ...)."""
    photometric: str
    segments: int
    """Number of tiles (or strips) of the level's page, all sample planes together."""
    ifd_offset: int
    """File offset of the level's page (IFD): with ``index``, what finds its pages again."""


def tiff_levels(f: IO[bytes]) -> list[TiffLevel]:
    """The resolution levels of the first image of the TIFF open as ``f`` (a seekable binary file object).

    Reads the header and IFDs only. Raises :class:`TiffTileError` for a file tifffile cannot open.
    """
    size = _file_size(f)
    with _open(f, size) as tif:
        return [_describe(i, page) for i, page in enumerate(_level_pages(tif))]


def check_tiff(f: IO[bytes], size: int, level: int = 0, *,
               max_segment_bytes: int = MAX_SEGMENT_BYTES) -> tuple[str, str] | None:
    """Check the structure of ``level`` of the TIFF ``f`` of ``size`` bytes without decoding pixels.

    None when ``read_region`` can read it, else ``(reason, detail)`` (reason codes: module docstring).
    Reads the IFDs and offset arrays, not the tile data: cheap for a gigapixel file.
    """
    try:
        with _open(f, size) as tif:
            _level_page(tif, level, size, max_segment_bytes)
    except TiffTileError as exc:
        return exc.reason, exc.detail
    return None


def read_region(f: IO[bytes], level: int, x: int, y: int, width: int, height: int, *,
                max_segment_bytes: int = MAX_SEGMENT_BYTES) -> np.ndarray:
    """The box ``(x, y, width, height)`` of pyramid ``level`` as an HxWx3 uint8 RGB array.

    The box is in that level's pixels and is clipped to the image: a box reaching past an edge returns
    only its inside part (a smaller array; one with a zero side when the box misses the image). Only the
    segments that intersect the box are read and decoded. Conversion: grey is repeated to 3 channels,
    alpha and further samples are dropped, palette images go through their colour map, MinIsWhite is
    inverted; samples of ``b`` bits (uint16 for 9..16) keep their top 8 bits (``v >> (b - 8)``, so a
    full-range uint16 maps by ``v >> 8``; data using fewer bits than declared looks dark), samples of
    fewer than 8 bits are stretched to 0..255. Other sample types raise :class:`TiffTileError`
    (``unsupported_format``), as do missing levels and broken, truncated or undecodable segments
    (reasons in the module docstring). A segment with no data (offset or byte count 0) reads as 0.
    """
    if width < 0 or height < 0:
        raise ValueError(f"negative box size {width}x{height}")
    size = _file_size(f)
    with _open(f, size) as tif:
        page = _level_page(tif, level, size, max_segment_bytes)
        return _read_box(f, page, x, y, width, height)


class TiffRegionReader:
    """``read_region`` for many boxes of one TIFF: the file is opened and its level checked once, not per box,
    and the last decoded segments are kept (``cache_bytes``, 64 MiB: a row of 512 px RGB tiles across 40,000 px).

    Use as a context manager, or call :meth:`close`. ``opener`` returns a fresh seekable binary file object
    (e.g. ``fsspec.open(url, "rb").open``)."""

    def __init__(self, opener: Any, max_segment_bytes: int = MAX_SEGMENT_BYTES,
                 cache_bytes: int = 64 * 1024 * 1024) -> None:
        self._f = opener()
        try:
            self._size = _file_size(self._f)
            self._ctx = _open(self._f, self._size)
            self._tif = self._ctx.__enter__()
        except BaseException:
            self._f.close()
            raise
        self._pages: dict[int, Any] = {}
        self._max = max_segment_bytes
        self._cache = SegmentCache(cache_bytes)

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """As :func:`read_region` on this file."""
        if width < 0 or height < 0:
            raise ValueError(f"negative box size {width}x{height}")
        if level not in self._pages:
            self._pages[level] = _level_page(self._tif, level, self._size, self._max)
        return _read_box(self._f, self._pages[level], x, y, width, height, self._cache)

    def close(self) -> None:
        """Close the TIFF and its file object."""
        try:
            self._ctx.__exit__(None, None, None)
        finally:
            self._f.close()

    def __enter__(self) -> "TiffRegionReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- opening and checking ---------------------------------------------------------------------------


def _file_size(f: IO[bytes]) -> int:
    try:
        return int(f.seek(0, 2))
    except Exception as exc:  # noqa: BLE001 - any I/O failure of a foreign file object
        raise TiffTileError("unreadable", _short(exc)) from exc


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _DETAIL_MAX else text[:_DETAIL_MAX] + "..."


@contextmanager
def _open(f: IO[bytes], size: int) -> Iterator[Any]:
    """tifffile.TiffFile over ``f`` from its first byte; errors become TiffTileError."""
    import tifffile

    if size <= 0:
        raise TiffTileError("zero_bytes", "the file is empty")
    try:
        f.seek(0)
        head = f.read(16)
    except Exception as exc:  # noqa: BLE001
        raise TiffTileError("unreadable", _short(exc)) from exc
    if head[:2] not in (b"II", b"MM"):
        raise TiffTileError("not_image", "no TIFF byte-order mark (II or MM) at the start")
    _check_first_ifd(head, size)
    try:
        f.seek(0)
        tif = tifffile.TiffFile(f)
    except Exception as exc:  # noqa: BLE001 - tifffile raises many kinds on broken files
        raise TiffTileError("undecodable", _short(exc)) from exc
    try:
        yield tif
    finally:
        tif.close()  # does not close f: tifffile closes only handles it opened itself


def _check_first_ifd(head: bytes, size: int) -> None:
    if len(head) < 8:
        raise TiffTileError("truncated", f"the file ends inside the TIFF header ({size} bytes)")
    order = "<" if head[:2] == b"II" else ">"
    version = int.from_bytes(head[2:4], "little" if order == "<" else "big")
    if version == 43 and len(head) >= 16:
        first = int.from_bytes(head[8:16], "little" if order == "<" else "big")
    elif version == 42:
        first = int.from_bytes(head[4:8], "little" if order == "<" else "big")
    else:
        return  # let tifffile judge the variants it knows
    if first >= size:
        raise TiffTileError("truncated", f"the first IFD is at byte {first}, past the end of the file ({size} bytes)")


def _level_pages(tif: Any) -> list[Any]:
    try:
        series = tif.series
        if not series:
            raise TiffTileError("undecodable", "the TIFF holds no image")
        return [lvl.keyframe for lvl in series[0].levels]
    except TiffTileError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise TiffTileError("undecodable", _short(exc)) from exc


def _level_page(tif: Any, level: int, size: int, max_segment_bytes: int) -> Any:
    """The page of ``level``, its structure checked (offsets inside the file, a pixel type we convert)."""
    pages = _level_pages(tif)
    if not 0 <= level < len(pages):
        raise TiffTileError("undecodable", f"pyramid level {level} does not exist (the file has {len(pages)})")
    page = pages[level]
    try:
        _check_page(page, size, max_segment_bytes)
    except TiffTileError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise TiffTileError("undecodable", _short(exc)) from exc
    return page


def _enum_name(value: Any) -> str:
    return str(getattr(value, "name", value)).lower()


def _describe(index: int, page: Any) -> TiffLevel:
    return TiffLevel(
        index=index,
        width=int(page.imagewidth),
        height=int(page.imagelength),
        tile_width=int(page.tilewidth) if page.is_tiled else None,
        tile_height=int(page.tilelength) if page.is_tiled else None,
        samples=int(page.samplesperpixel),
        dtype=np.dtype(page.dtype).name if page.dtype is not None else "unknown",
        compression=_enum_name(page.compression),
        photometric=_enum_name(page.photometric),
        segments=len(page.dataoffsets),
        ifd_offset=int(page.offset),
    )


@dataclass(frozen=True)
class _Grid:
    """Where a page's segments lie: ``seg_h`` x ``seg_w`` pixels, ``across`` per row, ``per_plane`` per sample plane."""

    seg_w: int
    seg_h: int
    across: int
    per_plane: int
    planes: int


def _grid(page: Any) -> _Grid:
    width, height = int(page.imagewidth), int(page.imagelength)
    planes = int(page.samplesperpixel) if page.planarconfig == 2 else 1
    if page.is_tiled:
        tw, th = int(page.tilewidth), int(page.tilelength)
        across = math.ceil(width / tw)
        return _Grid(tw, th, across, across * math.ceil(height / th), planes)
    rows = min(int(page.rowsperstrip), height)
    return _Grid(width, rows, 1, math.ceil(height / rows), planes)


def _check_page(page: Any, size: int, max_segment_bytes: int) -> None:
    import tifffile

    width, height = int(page.imagewidth), int(page.imagelength)
    if width <= 0 or height <= 0:
        raise TiffTileError("undecodable", f"image size {width}x{height}")
    if int(page.imagedepth) != 1:
        raise TiffTileError("unsupported_format", f"volumetric TIFF (depth {page.imagedepth})")
    dtype = None if page.dtype is None else np.dtype(page.dtype)
    bits = int(page.bitspersample)
    if not ((dtype == np.uint8 and 1 <= bits <= 8) or (dtype == np.uint16 and 9 <= bits <= 16)):
        raise TiffTileError("unsupported_format", f"samples of {bits} bits ({dtype}, sample format "
                                                  f"{_enum_name(page.sampleformat)}): only uint8 and uint16 are read")
    photometric, samples = int(page.photometric), int(page.samplesperpixel)
    compression = int(page.compression)
    if photometric == _YCBCR and compression in _JPEG_COMPRESSIONS:
        pass  # tifffile's JPEG decode returns RGB
    elif photometric in (_MINISBLACK, _MINISWHITE, _PALETTE):
        if photometric == _PALETTE and page.colormap is None:
            raise TiffTileError("undecodable", "palette image without a colour map")
    elif photometric == _RGB:
        if samples < 3:
            raise TiffTileError("undecodable", f"RGB image with {samples} samples per pixel")
    else:
        raise TiffTileError("unsupported_format", f"colour model {_enum_name(page.photometric)} "
                                                  f"with {_enum_name(page.compression)} compression")
    if compression != 1 and compression not in tifffile.TIFF.DECOMPRESSORS:
        raise TiffTileError("unsupported_format", f"no decoder for {_enum_name(page.compression)} compression")

    grid = _grid(page)
    contig = samples if page.planarconfig != 2 else 1
    seg_bytes = grid.seg_w * grid.seg_h * contig * dtype.itemsize
    if seg_bytes > max_segment_bytes:
        kind = "tile" if page.is_tiled else "strip"
        raise TiffTileError("too_large", f"one {kind} of {grid.seg_w}x{grid.seg_h} decodes to {seg_bytes} bytes "
                                         f"(over {max_segment_bytes}): the reader cannot read a box of it cheaply")
    expected = grid.per_plane * grid.planes
    offsets = np.asarray(page.dataoffsets, dtype=np.uint64)
    counts = np.asarray(page.databytecounts, dtype=np.uint64)
    if len(offsets) < expected or len(counts) < expected:
        raise TiffTileError("undecodable", f"{len(offsets)} offsets and {len(counts)} byte counts "
                                           f"for {expected} segments")
    offsets, counts = offsets[:expected], counts[:expected]
    past = np.flatnonzero((counts > 0) & (offsets > 0) & (offsets + counts > np.uint64(size)))
    if past.size:
        i = int(past[0])
        raise TiffTileError("truncated", f"segment {i} of {expected} (bytes {int(offsets[i])}..{int(offsets[i] + counts[i])}) "
                                         f"ends past the end of the file ({size} bytes; {past.size} such segments)")


# -- reading a box ----------------------------------------------------------------------------------


class SegmentCache:
    """Decoded segments of one file, least recently used first out, up to ``max_bytes`` in all: neighbouring
    boxes that overlap (tiles with overlap, or a box grid that does not line up with the TIFF's tiles) decode
    each TIFF tile once instead of once per box."""

    def __init__(self, max_bytes: int) -> None:
        from collections import OrderedDict

        self.max_bytes = max_bytes
        self.nbytes = 0
        self._items: OrderedDict[tuple[int, int], tuple[np.ndarray, int, int]] = OrderedDict()

    def get(self, key: tuple[int, int]) -> tuple[np.ndarray, int, int] | None:
        hit = self._items.get(key)
        if hit is not None:
            self._items.move_to_end(key)
        return hit

    def put(self, key: tuple[int, int], value: tuple[np.ndarray, int, int]) -> None:
        if value[0].nbytes > self.max_bytes:
            return
        self._items[key] = value
        self.nbytes += value[0].nbytes
        while self.nbytes > self.max_bytes:
            _, (old, _, _) = self._items.popitem(last=False)
            self.nbytes -= old.nbytes


def _segment(f: IO[bytes], page: Any, index: int, decodeargs: dict[str, Any],
             cache: SegmentCache | None) -> tuple[np.ndarray, int, int] | None:
    """Segment ``index`` of ``page`` decoded, with its top-left pixel ``(sy, sx)``; None for an empty one."""
    key = (int(page.offset), index)
    if cache is not None and (hit := cache.get(key)) is not None:
        return hit
    offsets, counts = page.dataoffsets, page.databytecounts
    data = _read_segment(f, index, int(offsets[index]), int(counts[index]))
    if data is None:
        return None  # an empty segment: no data written, reads as 0
    try:
        segment, (_, _, sy, sx, _), _ = page.decode(data, index, **decodeargs)
    except Exception as exc:  # noqa: BLE001 - codec errors come in many types
        raise TiffTileError("undecodable", f"segment {index}: {_short(exc)}") from exc
    if segment is None:
        return None
    value = (segment[0], int(sy), int(sx))  # (rows, cols, contiguous samples)
    if cache is not None:
        cache.put(key, value)
    return value


def _read_box(f: IO[bytes], page: Any, x: int, y: int, width: int, height: int,
              cache: SegmentCache | None = None) -> np.ndarray:
    img_w, img_h = int(page.imagewidth), int(page.imagelength)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + width, img_w), min(y + height, img_h)
    out = np.zeros((max(y1 - y0, 0), max(x1 - x0, 0), 3), dtype=np.uint8)
    if out.size == 0:
        return out
    grid = _grid(page)
    photometric = int(page.photometric)
    # which sample planes feed the output: grey/palette need sample 0, RGB samples 0..2
    wanted = 1 if photometric in (_MINISBLACK, _MINISWHITE, _PALETTE) else 3
    planes = range(min(wanted, grid.planes))
    lut = _palette_lut(page) if photometric == _PALETTE else None
    decodeargs: dict[str, Any] = {}
    if int(page.compression) in _JPEG_COMPRESSIONS:
        decodeargs = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader}
    cols = range(x0 // grid.seg_w, (x1 - 1) // grid.seg_w + 1)
    rows = range(y0 // grid.seg_h, (y1 - 1) // grid.seg_h + 1)
    for plane in planes:
        for row in rows:
            for col in cols:
                index = plane * grid.per_plane + row * grid.across + col
                decoded = _segment(f, page, index, decodeargs, cache)
                if decoded is None:
                    continue
                seg, sy, sx = decoded
                # the part of this segment inside both the box and the image (edge tiles are padded)
                ay0, ay1 = max(y0, sy), min(y1, sy + seg.shape[0])
                ax0, ax1 = max(x0, sx), min(x1, sx + seg.shape[1])
                if ay0 >= ay1 or ax0 >= ax1:
                    continue
                piece = seg[ay0 - sy:ay1 - sy, ax0 - sx:ax1 - sx]
                target = out[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0]
                _put(target, piece, page, photometric, plane, grid.planes > 1, lut)
    return out


def _read_segment(f: IO[bytes], index: int, offset: int, count: int) -> bytes | None:
    if offset == 0 or count == 0:
        return None
    try:
        f.seek(offset)
        data = f.read(count)
    except Exception as exc:  # noqa: BLE001
        raise TiffTileError("unreadable", f"segment {index}: {_short(exc)}") from exc
    if len(data) < count:
        raise TiffTileError("truncated", f"segment {index} holds {count} bytes at {offset}, the file gave {len(data)}")
    return data


def _to_uint8(values: np.ndarray, bits: int) -> np.ndarray:
    if values.dtype == np.uint16:
        return np.minimum(values >> (bits - 8), 255).astype(np.uint8)
    if bits < 8:
        return (values.astype(np.uint16) * 255 // ((1 << bits) - 1)).astype(np.uint8)
    return values.astype(np.uint8, copy=False)


def _palette_lut(page: Any) -> np.ndarray:
    cmap = np.asarray(page.colormap)  # (3, 2**bits), usually 16-bit values
    if cmap.ndim != 2 or cmap.shape[0] < 3:
        raise TiffTileError("undecodable", f"colour map of shape {cmap.shape}")
    cmap = cmap[:3].T
    if cmap.max(initial=0) > 255:
        cmap = cmap >> 8
    return np.ascontiguousarray(cmap.astype(np.uint8))


def _put(target: np.ndarray, piece: np.ndarray, page: Any, photometric: int, plane: int, planar: bool,
         lut: np.ndarray | None) -> None:
    bits = int(page.bitspersample)
    if lut is not None:
        target[:] = lut[np.minimum(piece[..., 0], len(lut) - 1)]
    elif photometric in (_MINISBLACK, _MINISWHITE):
        grey = _to_uint8(piece[..., 0], bits)
        if photometric == _MINISWHITE:
            grey = 255 - grey
        target[:] = grey[..., None]
    elif planar:
        target[..., plane] = _to_uint8(piece[..., 0], bits)
    else:
        target[:] = _to_uint8(piece[..., :3], bits)
