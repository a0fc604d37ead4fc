"""Header sniffing in pure Python: format from magic bytes, dimensions, and whether the file is whole.

Cheap enough to run on every file (``header`` validation) and used as the guard before any decode
(pixel caps against decompression bombs, a scan cap against progressive-JPEG CPU bombs). Never raises on
arbitrary bytes: every outcome is a ``HeaderInfo`` whose ``status`` is ``ok`` or a manifest reason code.
"""
from __future__ import annotations

import dataclasses
import struct
import zlib
from dataclasses import dataclass

KNOWN_IMAGE_FORMATS = ("jpeg", "png", "gif", "bmp", "webp", "tiff")
"""Formats OpenCV decodes and this module parses."""

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
DEFAULT_MAX_JPEG_SCANS = 100
"""A JPEG with more scans is refused before decoding. Every scan makes the decoder pass over all blocks of
the image, so a small file of thousands of near-empty scans costs seconds to minutes of CPU (a 44 KB
2000x2000 file of 2,000 scans took 9 s in OpenCV here; the cost grows with scans x blocks);
libjpeg-turbo's advice is a scan limit. Encoders write at most a few dozen scans (libjpeg's progressive
script: 10 for colour, 6 for grey)."""
MAX_SIDE = 2**31 - 1
"""The largest width or height a manifest row stores (int32). A header may claim up to 2^32 - 1 (a fuzzed
TIFF declared 3,036,676,696): such values never reach a row; the file is ``too_large``."""
MAX_CHANNELS = 64
"""More samples per pixel than any image format OpenCV decodes (TIFF allows 65,535): ``undecodable``."""


@dataclass(frozen=True)
class HeaderInfo:
    """What the header says. ``status`` is ``ok`` or a reason code; ``detail`` says why."""

    status: str
    detail: str = ""
    format: str | None = None
    width: int | None = None
    height: int | None = None
    channels: int | None = None
    bit_depth: int | None = None
    scans: int | None = None
    """JPEG only: the number of start-of-scan markers (1 for baseline)."""

    @property
    def pixels(self) -> int:
        return (self.width or 0) * (self.height or 0)


def sniff_format(head: bytes) -> str | None:
    """The image format named by the first bytes, or ``None``; other known formats get their own name."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(_PNG_SIG):
        return "png"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"BM") and len(head) >= 26:
        return "bmp"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # classic TIFF and BigTIFF
        return "tiff"
    if head[4:8] == b"ftyp" and head[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"hevc", b"heim", b"heis"):
        return "heif"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "avif"
    if head.startswith(b"\x00\x00\x01\x00") and len(head) > 6:
        return "ico"
    if head.startswith(b"8BPS"):
        return "psd"
    if head.startswith(b"\x00\x00\x00\x0cjP  ") or head.startswith(b"\xff\x4f\xff\x51"):
        return "jp2"
    if head.startswith(b"\xff\x0a") or head.startswith(b"\x00\x00\x00\x0cJXL "):
        return "jxl"
    if head.startswith(b"qoif"):
        return "qoi"
    if head[:2] in (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6") and head[2:3] in (b" ", b"\n", b"\r", b"\t"):
        return "pnm"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if stripped.startswith(b"<svg") or (stripped.startswith(b"<?xml") and b"<svg" in stripped[:512]):
        return "svg"
    return None


def parse_header(data: bytes, formats: tuple[str, ...] | list[str] = KNOWN_IMAGE_FORMATS,
                 max_scans: int = DEFAULT_MAX_JPEG_SCANS) -> HeaderInfo:
    """Parse ``data`` (the whole file) into a ``HeaderInfo``; never raises.

    A JPEG with more than ``max_scans`` scans is ``too_large`` (0 = no limit)."""
    if not data:
        return HeaderInfo("zero_bytes", "file is empty")
    fmt = sniff_format(data[:64])
    if fmt is None and b"IHDR" in data[8:24] and (data[1:4] == b"PNG" or data[:1] == b"\x89"):
        return HeaderInfo("undecodable", f"png: damaged signature {data[:8]!r}", "png")
    if fmt is None and (data[:2] == b"\xff\xd8" or data[6:10] in (b"JFIF", b"Exif")):
        return HeaderInfo("undecodable", f"jpeg: damaged signature {data[:8]!r}", "jpeg")
    if fmt is None:
        kind = "text" if _looks_like_text(data[:512]) else "binary data"
        return HeaderInfo("not_image", f"no image signature ({kind}, starts {data[:8]!r})")
    if fmt not in KNOWN_IMAGE_FORMATS or fmt not in formats:
        return HeaderInfo("unsupported_format", f"{fmt} is not an accepted format", format=fmt)
    parser = _PARSERS[fmt]
    try:
        info = parser(data)
    except (struct.error, IndexError, ValueError) as exc:
        return HeaderInfo("truncated" if len(data) < 64 else "undecodable", f"{fmt} header unreadable: {exc}", format=fmt)
    info = _bounded(info)
    if max_scans > 0 and info.scans is not None and info.scans > max_scans and info.status in ("ok", "truncated"):
        return dataclasses.replace(info, status="too_large", detail=f"jpeg: {info.scans} scans > max {max_scans}")
    return info


def _bounded(info: HeaderInfo) -> HeaderInfo:
    """``info`` with every header value inside what a row stores; a value outside it decides the status.

    Whatever a parser read is a number an attacker chose: sides over ``MAX_SIDE`` make the file
    ``too_large``, negative sides or an absurd channel count ``undecodable``, and the values themselves
    are dropped (the detail keeps them)."""
    w, h, c, d = info.width, info.height, info.channels, info.bit_depth
    sides = [v for v in (w, h) if v is not None]
    if all(0 <= v <= MAX_SIDE for v in sides) and (c is None or 0 <= c <= MAX_CHANNELS) \
            and (d is None or 0 <= d <= 64):
        return info
    fmt = info.format
    if any(v < 0 for v in sides):
        status, detail = "undecodable", f"{fmt}: header claims a negative size {w}x{h}"
    elif any(v > MAX_SIDE for v in sides):
        status, detail = "too_large", f"{fmt}: header claims {w}x{h}, over the largest side {MAX_SIDE}"
    elif c is not None and not 0 <= c <= MAX_CHANNELS:
        status, detail = "undecodable", f"{fmt}: header claims {c} samples per pixel"
    else:
        status, detail = "undecodable", f"{fmt}: header claims a bit depth of {d}"
    keep = info.status not in ("ok", "truncated")  # an earlier finding stays the reason
    return HeaderInfo(info.status if keep else status, info.detail if keep else detail, fmt)


def _looks_like_text(head: bytes) -> bool:
    if not head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(b >= 0x20 or b in (9, 10, 13) for b in head)


def _jpeg(data: bytes) -> HeaderInfo:
    pos, n = 2, len(data)
    width = height = channels = depth = None
    first_sos = None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return HeaderInfo("undecodable", f"jpeg: bad marker at byte {pos}", "jpeg", width, height, channels, depth)
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker == 0xD9:
            break
        (seg_len,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if seg_len < 2:
            return HeaderInfo("undecodable", f"jpeg: bad segment length at byte {pos}", "jpeg")
        if marker in _JPEG_SOF:
            if pos + 10 > n:
                break
            depth, height, width, channels = struct.unpack(">BHHB", data[pos + 4 : pos + 10])
        if marker == 0xDA:
            first_sos = pos
            break
        pos += 2 + seg_len
    if width is None:
        if pos + 4 > n or first_sos is not None:
            status = "truncated" if pos + 4 > n else "undecodable"
            return HeaderInfo(status, "jpeg: no frame header (SOF) before the data", "jpeg")
        return HeaderInfo("undecodable", "jpeg: no frame header (SOF)", "jpeg")
    if not width or not height:
        return HeaderInfo("undecodable", f"jpeg: zero dimension {width}x{height}", "jpeg", width, height, channels, depth)
    # Inside entropy-coded data every 0xFF is followed by 0x00 or a restart marker, so each FF DA from the
    # first scan on is a scan header: counting them is exact for well-formed files and C-speed.
    scans = data.count(b"\xff\xda", first_sos) if first_sos is not None else 0
    if first_sos is None or data.rfind(b"\xff\xd9") < first_sos:
        return HeaderInfo("truncated", "jpeg: no end-of-image marker after the scan data", "jpeg", width, height, channels,
                          depth, scans)
    return HeaderInfo("ok", "", "jpeg", width, height, channels, depth, scans)


def _png(data: bytes) -> HeaderInfo:
    n = len(data)
    pos = 8
    width = height = channels = depth = None
    seen_idat = False
    while pos + 8 <= n:
        length, ctype = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > n:
            return HeaderInfo("truncated", f"png: chunk {ctype!r} runs past the end of the file", "png", width, height, channels, depth)
        crc = struct.unpack(">I", data[end - 4 : end])[0]
        if zlib.crc32(data[pos + 4 : end - 4]) & 0xFFFFFFFF != crc:
            return HeaderInfo("undecodable", f"png: bad CRC in chunk {ctype!r}", "png", width, height, channels, depth)
        if pos == 8:
            if ctype != b"IHDR" or length != 13:
                return HeaderInfo("undecodable", "png: first chunk is not IHDR", "png")
            width, height, depth, color = struct.unpack(">IIBB", data[pos + 8 : pos + 18])
            if color not in _PNG_CHANNELS or depth not in _PNG_DEPTHS[color]:
                return HeaderInfo("undecodable", f"png: invalid colour type {color} / bit depth {depth}", "png", width, height)
            if not width or not height:
                return HeaderInfo("undecodable", f"png: zero dimension {width}x{height}", "png", width, height)
            channels = _PNG_CHANNELS[color]
        elif ctype == b"IDAT":
            seen_idat = True
        elif ctype == b"IEND":
            if not seen_idat:
                return HeaderInfo("undecodable", "png: no image data (IDAT)", "png", width, height, channels, depth)
            return HeaderInfo("ok", "", "png", width, height, channels, depth)
        elif ctype == b"tRNS" and channels == 3:
            channels = 4
        pos = end
    return HeaderInfo("truncated", "png: no IEND chunk (file cut short)", "png", width, height, channels, depth)


def _gif(data: bytes) -> HeaderInfo:
    width, height = struct.unpack("<HH", data[6:10])
    if not width or not height:
        return HeaderInfo("undecodable", f"gif: zero dimension {width}x{height}", "gif", width, height)
    if data.rstrip(b"\x00")[-1:] != b";":
        return HeaderInfo("truncated", "gif: no trailer byte", "gif", width, height, 3, 8)
    return HeaderInfo("ok", "", "gif", width, height, 3, 8)


def _bmp(data: bytes) -> HeaderInfo:
    declared, = struct.unpack("<I", data[2:6])
    dib_size, = struct.unpack("<I", data[14:18])
    if dib_size == 12:
        width, height, _, bpp = struct.unpack("<HHHH", data[18:26])
    else:
        width, height, _, bpp = struct.unpack("<iiHH", data[18:30])
    height = abs(height)
    channels = 4 if bpp == 32 else (1 if bpp in (1, 2, 4, 8) else 3)
    if width <= 0 or not height:
        return HeaderInfo("undecodable", f"bmp: invalid dimension {width}x{height}", "bmp", width, height)
    if declared > len(data):
        return HeaderInfo("truncated", f"bmp: header declares {declared} bytes, file has {len(data)}", "bmp", width, height, channels, bpp)
    return HeaderInfo("ok", "", "bmp", width, height, channels, bpp)


def _webp(data: bytes) -> HeaderInfo:
    riff_size, = struct.unpack("<I", data[4:8])
    chunk = data[12:16]
    width = height = None
    channels = 3
    if chunk == b"VP8 ":
        width, height = (v & 0x3FFF for v in struct.unpack("<HH", data[26:30]))
    elif chunk == b"VP8L":
        bits, = struct.unpack("<I", data[21:25])
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        channels = 4 if (bits >> 28) & 1 else 3
    elif chunk == b"VP8X":
        flags = data[20]
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        channels = 4 if flags & 0x10 else 3
    else:
        return HeaderInfo("undecodable", f"webp: unknown chunk {chunk!r}", "webp")
    if riff_size + 8 > len(data):
        return HeaderInfo("truncated", f"webp: RIFF declares {riff_size + 8} bytes, file has {len(data)}", "webp", width, height,
                          channels, 8)
    return HeaderInfo("ok", "", "webp", width, height, channels, 8)


_TIFF_LAYOUT = {42: ("I", "H", 12, "HHI", 8), 43: ("Q", "Q", 20, "HHQ", 12)}
"""Per TIFF version (42 classic, 43 BigTIFF): offset type, entry count type, entry size, entry head, value at."""


def _tiff(data: bytes) -> HeaderInfo:
    end = "<" if data[:2] == b"II" else ">"
    version, = struct.unpack(end + "H", data[2:4])
    off_t, count_t, entry, head_t, value_at = _TIFF_LAYOUT[43 if version == 43 else 42]
    first = 8 if version == 43 else 4
    if len(data) < first + struct.calcsize(off_t):
        return HeaderInfo("truncated", "tiff: the header is cut short", "tiff")
    ifd, = struct.unpack(end + off_t, data[first:first + struct.calcsize(off_t)])
    count_n = struct.calcsize(count_t)
    if ifd + count_n > len(data):
        return HeaderInfo("truncated", "tiff: first IFD lies past the end of the file", "tiff")
    count, = struct.unpack(end + count_t, data[ifd : ifd + count_n])
    tags: dict[int, int] = {}
    for i in range(min(count, 4096)):
        off = ifd + count_n + entry * i
        if off + entry > len(data):
            return HeaderInfo("truncated", "tiff: IFD runs past the end of the file", "tiff")
        tag, typ, _cnt = struct.unpack(end + head_t, data[off : off + value_at])
        kind = {3: "H", 16: "Q"}.get(typ, "I")
        value = struct.unpack(end + kind, data[off + value_at : off + value_at + struct.calcsize(kind)])[0]
        tags[tag] = value
    width, height = tags.get(256), tags.get(257)
    channels = tags.get(277, 1)
    depth = tags.get(258, 8) if tags.get(277, 1) == 1 else 8
    if not width or not height:
        return HeaderInfo("undecodable", "tiff: no image dimensions in the first IFD", "tiff", width, height)
    strip, = (tags.get(273, 0),)
    if strip and strip >= len(data):
        return HeaderInfo("truncated", "tiff: image data lies past the end of the file", "tiff", width, height, channels, depth)
    return HeaderInfo("ok", "", "tiff", width, height, channels, depth)


_PARSERS = {"jpeg": _jpeg, "png": _png, "gif": _gif, "bmp": _bmp, "webp": _webp, "tiff": _tiff}
