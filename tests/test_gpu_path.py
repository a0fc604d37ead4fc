"""The GPU path of featurize (issue 17): GPU JPEG decode with per-image CPU fallback, copy/compute overlap,
the auto decode choice, the batch-size probe and the model-only figure.

Every decision runs here on CPU with injected decoders, timings and a fake device; the tests marked ``gpu``
run the real thing (nvJPEG, CUDA streams) and are skipped without CUDA.
"""
from __future__ import annotations

import io
import json
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from imgfeat.featurize import tuning
from imgfeat.featurize.gpu_decode import (
    LEARN_AFTER,
    GpuDecoder,
    RawBatch,
    RawBytesDataset,
    collate_raw,
    gpu_fallback_reason,
    jpeg_layout,
    nvjpeg_decode,
    orient,
    resize_on_device,
    resolve_decode_device,
)
from imgfeat.featurize.overlap import CopyAhead
from imgfeat.metadata.config import Config, PreprocessConfig
from imgfeat.preprocess.dataset import ManifestDataset
from imgfeat.preprocess.transforms import resize_images

from helpers import write_image, write_manifest

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is false)")


# ---------------------------------------------------------------- images

def photo_like(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A photographic-ish RGB uint8 image: smooth gradients, soft blobs, a few hard edges and sensor noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        a, b = rng.uniform(-1, 1, 2)
        img[..., c] = 128 + 60 * (a * x / w + b * y / h)
    for _ in range(6):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * min(h, w)
        img += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None] * rng.uniform(-80, 80, 3)
    for _ in range(3):
        y0, x0 = int(rng.integers(0, h - 4)), int(rng.integers(0, w - 4))
        img[y0 : y0 + int(rng.integers(4, h // 3 + 5)), x0 : x0 + int(rng.integers(4, w // 3 + 5))] = rng.uniform(0, 255, 3)
    img += rng.normal(0, 4, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg_bytes(rgb: np.ndarray, **params: int) -> bytes:
    import cv2

    flags = [k for kv in params.items() for k in (getattr(cv2, kv[0]), kv[1])]
    bgr = rgb[..., ::-1] if rgb.ndim == 3 else rgb
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(bgr), flags)
    assert ok
    return buf.tobytes()


def with_segment(data: bytes, marker: int, body: bytes) -> bytes:
    """``data`` (a JPEG) with one more segment right after SOI."""
    return data[:2] + bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body + data[2:]


def exif_segment(orientation: int) -> bytes:
    tiff = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1) + struct.pack(">HHIHH", 0x0112, 3, 1, orientation, 0)
    return b"Exif\x00\x00" + tiff + struct.pack(">I", 0)


def without_quant_tables(data: bytes) -> bytes:
    """A JPEG with its DQT segments removed: the header parses, no decoder can decode it."""
    out, pos = bytearray(data[:2]), 2
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xDA:
            out += data[pos:]
            break
        (n,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker != 0xDB:
            out += data[pos : pos + 2 + n]
        pos += 2 + n
    return bytes(out)


def rows_for(files: list[Path], dims: dict[Path, tuple[int, int]] | None = None) -> list[dict[str, Any]]:
    dims = dims or {}
    return [{"image_id": f"{i:032x}", "path": str(p), "width": dims.get(p, (None, None))[0],
             "height": dims.get(p, (None, None))[1]} for i, p in enumerate(files)]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> dict[str, Path]:
    """A small mixed set: colour JPEGs (4:2:0, 4:4:4, progressive), grey, EXIF-rotated, PNG, CMYK, truncated,
    a JPEG without quantization tables, a text file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("mixed")
    files: dict[str, Path] = {}

    def put(name: str, data: bytes) -> None:
        files[name] = root / name
        files[name].write_bytes(data)

    put("a.jpg", jpeg_bytes(photo_like(120, 160, 1), IMWRITE_JPEG_QUALITY=90))
    put("b444.jpg", jpeg_bytes(photo_like(97, 131, 2), IMWRITE_JPEG_SAMPLING_FACTOR=0x111111))
    put("c_prog.jpg", jpeg_bytes(photo_like(150, 100, 3), IMWRITE_JPEG_PROGRESSIVE=1))
    put("d_grey.jpg", jpeg_bytes(photo_like(80, 90, 4)[..., 1]))
    put("e_rot6.jpg", with_segment(jpeg_bytes(photo_like(60, 110, 5)), 0xE1, exif_segment(6)))
    put("f_small.jpg", jpeg_bytes(photo_like(40, 30, 6)))
    write_image(root / "g.png", photo_like(70, 70, 7), ".png")
    files["g.png"] = root / "g.png"
    buf = io.BytesIO()
    Image.fromarray(photo_like(64, 48, 8)).convert("CMYK").save(buf, "JPEG")
    put("h_cmyk.jpg", buf.getvalue())
    whole = jpeg_bytes(photo_like(90, 90, 9))
    put("i_cut.jpg", whole[: len(whole) // 2])
    put("j_nodqt.jpg", without_quant_tables(jpeg_bytes(photo_like(64, 64, 10))))
    put("k.txt", b"not an image at all\n" * 10)
    return files


PRE = PreprocessConfig(size=64, resize_shorter=73, batch_size=4, num_workers=0)


def cpu_path(files: Sequence[Path], cfg: PreprocessConfig = PRE) -> tuple[torch.Tensor, list[bool], list[str]]:
    ds = ManifestDataset(rows_for(list(files)), cfg)
    batch = ds.__getitems__(list(range(len(ds))))
    return batch.images, batch.ok.tolist(), batch.reasons


def raw_batch(ds: RawBytesDataset) -> RawBatch:
    return collate_raw(ds.__getitems__(list(range(len(ds)))))


def close_images(a: torch.Tensor, b: torch.Tensor, max_diff: int = 1, frac: float = 0.02) -> None:
    d = (a.to(torch.int16) - b.to(torch.int16)).abs()
    assert int(d.max()) <= max_diff, f"max abs diff {int(d.max())}"
    assert float((d > 0).float().mean()) <= frac, f"{float((d > 0).float().mean()):.4f} of the values differ"


# ---------------------------------------------------------------- header decisions

def test_jpeg_layout_and_fallback_reasons(mixed) -> None:
    read = {k: p.read_bytes() for k, p in mixed.items()}
    assert gpu_fallback_reason(read["a.jpg"]) == "" and gpu_fallback_reason(read["b444.jpg"]) == ""
    prog = jpeg_layout(read["c_prog.jpg"])
    assert prog is not None and prog.sof == 0xC2 and prog.kind == "progressive" and (prog.width, prog.height) == (100, 150)
    assert gpu_fallback_reason(read["c_prog.jpg"]) == ""
    grey = jpeg_layout(read["d_grey.jpg"])
    assert grey is not None and grey.components == 1 and grey.kind == "baseline_grey"
    rot = jpeg_layout(read["e_rot6.jpg"])
    assert rot is not None and rot.orientation == 6 and (rot.width, rot.height) == (110, 60)
    assert gpu_fallback_reason(read["g.png"]) == "not_jpeg" and gpu_fallback_reason(read["k.txt"]) == "not_jpeg"
    assert gpu_fallback_reason(read["h_cmyk.jpg"]) == "cmyk"
    a = read["a.jpg"]
    sof = a.index(b"\xff\xc0")
    assert gpu_fallback_reason(a[:sof + 1] + b"\xc9" + a[sof + 2:]) == "jpeg_frame"  # arithmetic coding
    assert gpu_fallback_reason(a[:sof + 4] + b"\x0c" + a[sof + 5:]) == "jpeg_precision"  # 12-bit samples
    adobe_rgb = with_segment(a, 0xEE, b"Adobe" + b"\x00\x64" + b"\x00\x00" + b"\x00\x00" + b"\x00")
    assert gpu_fallback_reason(adobe_rgb) == "rgb_jpeg"
    adobe_ycc = with_segment(a, 0xEE, b"Adobe" + b"\x00\x64" + b"\x00\x00" + b"\x00\x00" + b"\x01")
    assert gpu_fallback_reason(adobe_ycc) == ""
    assert gpu_fallback_reason(b"\xff\xd8\xff\xe0\x00") == "jpeg_header" and jpeg_layout(b"\xff\xd8\xff\xe0\x00") is None


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_the_cpu_decoder(orientation: int) -> None:
    from imgfeat.metadata.contracts.cv2_env import import_cv2
    from imgfeat.preprocess.decode import apply_orientation

    img = photo_like(5, 7, orientation)
    want = apply_orientation(import_cv2(), img, orientation)
    got = orient(torch.from_numpy(img).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert np.array_equal(got, want)


@pytest.mark.parametrize("policy", ["resize_shorter+center_crop", "resize", "letterbox"])
@pytest.mark.parametrize("hw", [(375, 500), (500, 375), (100, 100), (64, 256), (231, 317), (30, 40)])
def test_device_resize_matches_cpu_geometry(policy: str, hw: tuple[int, int]) -> None:
    h, w = hw
    stack = np.stack([photo_like(h, w, s) for s in range(2)])
    want = resize_images(stack, 224, policy, "linear", 256, (255, 0, 10))
    got = resize_on_device(torch.from_numpy(stack).permute(0, 3, 1, 2), 224, policy, 256, (255, 0, 10))
    assert tuple(got.shape) == (2, 3, 224, 224) and got.dtype == torch.uint8
    extreme = max(h, w) >= 4 * min(h, w)  # 4:1 frames: one axis up, the other down; the CPU's fixed point differs more
    close_images(got.permute(0, 2, 3, 1).contiguous(), torch.from_numpy(want), 2 if extreme else 1, 0.08 if extreme else 0.01)


# ---------------------------------------------------------------- decode with injected decoders

class Recorder:
    """A decode function that records its calls and refuses images as told; decodes with torchvision on CPU."""

    def __init__(self, refuse: set[bytes] | None = None, wrong_shape: set[bytes] | None = None,
                 refuse_progressive: bool = False) -> None:
        self.calls: list[int] = []
        self.refuse, self.wrong_shape = refuse or set(), wrong_shape or set()
        self.refuse_progressive = refuse_progressive
        self.seen: list[bytes] = []

    def __call__(self, datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        self.calls.append(len(datas))
        raw = [d.numpy().tobytes() for d in datas]
        self.seen.extend(raw)
        for b in raw:
            layout = jpeg_layout(b)
            if b in self.refuse or (self.refuse_progressive and layout is not None and layout.sof == 0xC2):
                raise RuntimeError("nvjpeg: simulated failure")
        out = list(nvjpeg_decode(datas, device))
        return [o[:, :-1] if b in self.wrong_shape else o for o, b in zip(out, raw)]


def test_mixed_set_matches_the_cpu_path(mixed) -> None:
    """Same ok rows, same reject reasons, pixels within 1 of 255: JPEGs through the (injected) GPU decoder, the
    PNG and the CMYK JPEG through the CPU decoder in the worker, the rest rejected with the CPU path's reasons."""
    files = list(mixed.values())
    want_images, want_ok, want_reasons = cpu_path(files)
    ds = RawBytesDataset(rows_for(files), PRE)
    dec = Recorder()
    decoder = GpuDecoder(PRE, CPU, decode_fn=dec)
    images, ok, reasons = decoder.decode(raw_batch(ds), ds)
    assert ok.tolist() == want_ok
    assert reasons == want_reasons
    names = [p.name for p in files]
    assert {n for n, good in zip(names, want_ok) if not good} == {"i_cut.jpg", "j_nodqt.jpg", "k.txt"}
    assert reasons[names.index("i_cut.jpg")].startswith("truncated")
    close_images(images.cpu(), want_images)
    # the decode function got the GPU's 7 JPEGs in one call, then halves around the undecodable one
    assert dec.calls[0] == 7 and sum(dec.calls) < 7 * 4 and decoder.gpu_images == 6
    assert decoder.fallbacks == {"not_jpeg": 1, "cmyk": 1, "gpu_error": 1}  # j_nodqt: refused by both decoders
    assert images.is_contiguous(memory_format=torch.channels_last)


def test_batch_failure_is_isolated_to_the_bad_image(mixed, tmp_path) -> None:
    files = []
    for i in range(8):
        files.append(tmp_path / f"{i}.jpg")
        files[-1].write_bytes(jpeg_bytes(photo_like(50 + i, 70, i)))
    bad = files[5].read_bytes()
    ds = RawBytesDataset(rows_for(files), PRE)
    dec = Recorder(refuse={bad})
    decoder = GpuDecoder(PRE, CPU, decode_fn=dec)
    images, ok, reasons = decoder.decode(raw_batch(ds), ds)
    want_images, want_ok, _ = cpu_path(files)
    assert ok.all() and reasons == [""] * 8  # the refused one came back from the CPU decoder
    close_images(images, want_images)
    assert decoder.fallbacks == {"gpu_error": 1} and decoder.gpu_images == 7
    assert dec.calls[0] == 8 and len(dec.calls) <= 1 + 2 * 3  # halving, not one call per image
    assert sorted(dec.calls[1:]) == sorted([4, 4, 2, 2, 1, 1])  # the good halves decoded once each


def test_both_decoders_failing_is_the_cpu_reject(mixed) -> None:
    files = [mixed["a.jpg"], mixed["j_nodqt.jpg"]]
    _, want_ok, want_reasons = cpu_path(files)
    ds = RawBytesDataset(rows_for(files), PRE)
    decoder = GpuDecoder(PRE, CPU, decode_fn=Recorder(refuse={mixed["j_nodqt.jpg"].read_bytes()}))
    _, ok, reasons = decoder.decode(raw_batch(ds), ds)
    assert ok.tolist() == want_ok == [True, False]
    assert reasons == want_reasons and reasons[1].startswith("undecodable")


def test_shape_mismatch_falls_back(mixed) -> None:
    files = [mixed["a.jpg"], mixed["b444.jpg"], mixed["f_small.jpg"]]
    want_images, _, _ = cpu_path(files)
    # a mis-decode (one column short) of one file
    ds = RawBytesDataset(rows_for(files), PRE)
    decoder = GpuDecoder(PRE, CPU, decode_fn=Recorder(wrong_shape={files[1].read_bytes()}))
    images, ok, _ = decoder.decode(raw_batch(ds), ds)
    assert ok.all() and decoder.fallbacks == {"shape_mismatch": 1} and decoder.gpu_images == 2
    close_images(images, want_images)
    # the manifest says another size than the decoder gives: the CPU decoder has the last word
    ds = RawBytesDataset(rows_for(files, {files[0]: (160, 120), files[2]: (31, 40)}), PRE)
    decoder = GpuDecoder(PRE, CPU, decode_fn=Recorder())
    images, ok, _ = decoder.decode(raw_batch(ds), ds)
    assert ok.all() and decoder.fallbacks == {"shape_mismatch": 1}
    close_images(images, want_images)


def test_a_kind_that_always_fails_goes_to_the_cpu(mixed, tmp_path) -> None:
    files = []
    for i in range(6):
        files.append(tmp_path / f"p{i}.jpg")
        files[-1].write_bytes(jpeg_bytes(photo_like(40, 50, i), IMWRITE_JPEG_PROGRESSIVE=int(i % 2 == 0)))
    dec = Recorder(refuse_progressive=True)
    decoder = GpuDecoder(PRE, CPU, decode_fn=dec)
    ds = RawBytesDataset(rows_for(files[:4]), PRE)
    _, ok, _ = decoder.decode(raw_batch(ds), ds)
    assert ok.all() and decoder.fallbacks == {"gpu_error": LEARN_AFTER} and "progressive" in decoder.cpu_kinds
    before = len(dec.seen)
    ds = RawBytesDataset(rows_for(files[4:]), PRE)
    _, ok, _ = decoder.decode(raw_batch(ds), ds)
    assert ok.all() and decoder.fallbacks["gpu_unsupported_progressive"] == 1
    assert dec.seen[before:] == [files[5].read_bytes()]  # the progressive one was not sent to the GPU again
    # failures of a kind that succeeds in the same batch do not send that kind to the CPU
    decoder = GpuDecoder(PRE, CPU, decode_fn=Recorder(refuse={files[1].read_bytes(), files[3].read_bytes()}))
    ds = RawBytesDataset(rows_for([files[1], files[3], files[5]]), PRE)  # baseline: fails, fails, works
    _, ok, _ = decoder.decode(raw_batch(ds), ds)
    assert ok.all() and decoder.fallbacks == {"gpu_error": 2} and not decoder.cpu_kinds


def test_raw_dataset_keeps_the_reject_reasons_and_worker_fallbacks(mixed) -> None:
    files = list(mixed.values())
    ds = RawBytesDataset(rows_for(files), PRE)
    batch = raw_batch(ds)
    names = [p.name for p in files]
    sizes = (batch.offsets[1:] - batch.offsets[:-1]).tolist()
    gpu = {n for n, s in zip(names, sizes) if s}
    assert gpu == {"a.jpg", "b444.jpg", "c_prog.jpg", "d_grey.jpg", "e_rot6.jpg", "f_small.jpg", "j_nodqt.jpg"}
    assert batch.reasons[names.index("g.png")] == "not_jpeg" and batch.reasons[names.index("h_cmyk.jpg")] == "cmyk"
    k = names.index("e_rot6.jpg")
    assert batch.meta[k].tolist() == [60, 110, 6, 0xC0, 3]
    assert batch.images.shape == (len(files), 3, 64, 64)
    # an all-JPEG batch carries no image block
    only = collate_raw([ds[names.index("a.jpg")]])
    assert only.images.numel() == 0 and int(only.offsets[-1]) == mixed["a.jpg"].stat().st_size


def test_decode_device_resolution_names_the_key() -> None:
    pre = PreprocessConfig()
    assert resolve_decode_device("cpu", CPU, pre) == "cpu"
    assert resolve_decode_device("auto", CPU, pre) == "cpu"
    with pytest.raises(ValueError, match="featurize.decode_device = gpu"):
        resolve_decode_device("gpu", CPU, pre)
    with pytest.raises(ValueError, match="preprocess.interpolation"):
        resolve_decode_device("gpu", torch.device("cuda"), PreprocessConfig(interpolation="cubic"))
    assert resolve_decode_device("auto", torch.device("cuda"), PreprocessConfig(interpolation="area")) == "cpu"
    with pytest.raises(ValueError, match="featurize.decode_device"):
        Config().featurize.__class__(decode_device="nvjpeg").validate()
    with pytest.raises(ValueError, match="preprocess.interpolation"):
        GpuDecoder(PreprocessConfig(interpolation="nearest"), CPU)


# ---------------------------------------------------------------- the shard computer on CPU

def _computer(tmp_path: Path, decode: str = "cpu", decode_fn: Any = None, workers: int = 0) -> Any:
    from imgfeat.featurize.compute import ShardComputer
    from imgfeat.featurize.model import build_model
    from imgfeat.featurize.stats import RankStats

    cfg = Config()
    cfg.featurize.model, cfg.featurize.weights, cfg.featurize.device = "resnet18", "none", "cpu"
    cfg.preprocess.size, cfg.preprocess.resize_shorter, cfg.preprocess.batch_size = 64, 73, 4
    cfg.preprocess.num_workers = workers
    cfg.validate()
    model, _ = build_model(cfg.featurize, cfg.preprocess.size, CPU)
    return ShardComputer(cfg, model, CPU, str(tmp_path / "feat"), "fp", RankStats(), workers, decode=decode,
                         decode_fn=decode_fn)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_gpu_decode_features_equal_cpu_features_through_a_worker(mixed, tmp_path) -> None:
    """The whole GPU-decode loop on a CPU device: a DataLoader worker packs RawBatches, the decoder runs in the
    main process, the tail batch (11 rows, batch 4) is padded on the device."""
    import pyarrow as pa

    computer = _computer(tmp_path, decode="gpu", decode_fn=Recorder(), workers=1)
    rows = pa.Table.from_pylist(rows_for(list(mixed.values())))
    raw_ds = computer.make_dataset(rows)
    assert isinstance(raw_ds, RawBytesDataset)
    feats, ok, reasons = computer.features(raw_ds)
    ref_feats, ref_ok, ref_reasons = computer.features(computer.make_dataset(rows, "cpu"))
    assert ok.tolist() == ref_ok.tolist() and reasons == ref_reasons
    assert _cosines(feats[ok], ref_feats[ok]).min() >= 0.999
    assert computer.stats.decode_fallbacks == {"not_jpeg": 1, "cmyk": 1, "gpu_error": 1} and computer.stats.gpu_decoded == 6


class FakeDevice:
    """A ``DeviceBackend`` that logs every operation and checks that a pinned buffer is never restaged while a
    copy from it is in flight (an event completes only when the host synchronizes on it)."""

    def __init__(self, log: list[tuple[Any, ...]]) -> None:
        self.log = log
        self.in_flight: dict[int, int] = {}  # buffer id -> event id
        self.events = 0
        self.buffers: set[int] = set()

    def compute_stream(self) -> str:
        return "compute"

    def side_stream(self) -> str:
        return "side"

    def stage(self, host: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
        if buffer is not None and buffer.shape == host.shape:
            assert id(buffer) not in self.in_flight, "a pinned buffer was restaged while its copy was in flight"
        else:
            buffer = torch.empty_like(host)
        buffer.copy_(host)
        self.buffers.add(id(buffer))
        self.log.append(("stage", int(host[0, 0, 0, 0])))
        return buffer

    def copy(self, src: torch.Tensor, stream: Any) -> torch.Tensor:
        assert stream == "side"
        self._last = id(src)
        self.log.append(("copy", int(src[0, 0, 0, 0])))
        return src.clone()

    def record(self, stream: Any) -> int:
        self.events += 1
        self.in_flight[self._last] = self.events
        self.log.append(("record", stream, self.events))
        return self.events

    def wait(self, stream: Any, event: Any) -> None:
        self.log.append(("wait", stream, event))

    def synchronize(self, event: Any) -> None:
        self.in_flight = {b: e for b, e in self.in_flight.items() if e != event}
        self.log.append(("sync", event))

    def keep_alive(self, tensor: torch.Tensor, stream: Any) -> None:
        self.log.append(("keep", int(tensor[0, 0, 0, 0]), stream))


def test_overlap_order_with_a_fake_device() -> None:
    log: list[tuple[Any, ...]] = []
    batches = [torch.full((2, 3, 4, 4), n, dtype=torch.uint8) for n in range(5)]

    def loader() -> Any:
        for n, b in enumerate(batches):
            log.append(("loaded", n))
            yield b

    device = FakeDevice(log)
    ahead = CopyAhead(loader(), host=lambda b: b, backend=device)
    seen = []
    for batch, on_device in ahead:
        n = int(batch[0, 0, 0, 0])
        log.append(("forward_start", n))
        assert torch.equal(on_device, batch)
        ahead.issue_next()  # as the shard loop does after queueing the forward
        log.append(("forward_end", n))
        seen.append(n)
    assert seen == [0, 1, 2, 3, 4]
    pos = {entry: i for i, entry in enumerate(log)}
    for n in range(5):
        event = n + 1
        assert pos[("copy", n)] < pos[("record", "side", event)] < pos[("wait", "compute", event)] < pos[("forward_start", n)]
        assert pos[("keep", n, "compute")] < pos[("forward_start", n)]
        if n < 4:
            assert pos[("copy", n + 1)] < pos[("forward_end", n)], "the next copy must be issued before the forward ends"
            assert pos[("forward_start", n)] < pos[("copy", n + 1)], "one batch ahead, not more"
    assert len(device.buffers) == 2  # two pinned buffers, reused
    assert ("sync", 1) in log and pos[("sync", 1)] < pos[("stage", 2)]  # buffer 0 restaged only after copy 0 completed


def test_overlap_without_a_device_passes_batches_through_and_caller_may_skip_issue_next() -> None:
    batches = [torch.full((1, 3, 2, 2), n, dtype=torch.uint8) for n in range(3)]
    ahead = CopyAhead(iter(batches), host=lambda b: b, backend=None)
    out = [(b, t) for b, t in ahead]  # issue_next never called by the caller: the iterator does it
    assert [int(b[0, 0, 0, 0]) for b, _ in out] == [0, 1, 2] and all(b is t for b, t in out)
    assert ahead.wait_s >= 0 and ahead.stage_s >= 0


def test_overlapped_loop_equals_the_plain_loop(tmp_path) -> None:
    """``features_overlapped`` (the CUDA loop) on a CPU device with the fake device equals the plain loop."""
    import pyarrow as pa

    files = []
    for i in range(7):
        files.append(write_image(tmp_path / f"{i}.jpg", photo_like(60 + i, 80, i)))
    computer = _computer(tmp_path)
    ds = computer.make_dataset(pa.Table.from_pylist(rows_for(files)))
    ref, ref_ok, _ = computer.features(ds)
    computer._backend = FakeDevice([])
    got, ok, _ = computer.features_overlapped(ds)
    assert ok.all() and ref_ok.all() and np.array_equal(got, ref)


# ---------------------------------------------------------------- auto choice, batch probe, model-only figure

def test_auto_choice_with_injected_timings(tmp_path) -> None:
    calls: list[str] = []

    def measure(figures: dict[str, float]) -> Any:
        def f(mode: str) -> float:
            calls.append(mode)
            return figures[mode]
        return f

    assert tuning.choose_decode(measure({"gpu": 2000.0, "cpu": 900.0})).choice == "gpu"
    assert calls == ["gpu", "cpu"]  # GPU first: the CPU then reads from a warm cache, a bias towards the default
    assert tuning.choose_decode(measure({"gpu": 950.0, "cpu": 900.0})).choice == "cpu"  # within the margin
    assert tuning.choose_decode(measure({"gpu": 0.0, "cpu": 0.0})).choice == "cpu"

    def broken(mode: str) -> float:
        if mode == "gpu":
            raise RuntimeError("nvjpeg missing")
        return 100.0

    result = tuning.choose_decode(broken)
    assert result.choice == "cpu" and result.images_per_s == {"gpu": 0.0, "cpu": 100.0} and "nvjpeg" in result.note
    computer = _computer(tmp_path, decode="auto")
    chosen = computer.choose_decode([], measure=measure({"gpu": 3000.0, "cpu": 1000.0}))
    assert chosen is not None and computer.decode == "gpu" and computer.stats.decode_probe == {"gpu": 3000.0, "cpu": 1000.0}
    assert computer.stats.decode_device == "gpu"
    computer = _computer(tmp_path, decode="auto")
    assert computer.choose_decode([]) is not None and computer.decode == "cpu"  # nothing to measure on


def test_steady_rate_skips_the_start_up_backlog() -> None:
    # 1 s to the first batch (worker start), then 4 batches of 10 images, 0.5 s each
    stamps = [0.0, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert tuning.steady_rate(stamps, [10, 10, 10, 10, 10], skip=1) == pytest.approx(40 / 2.0)
    assert tuning.steady_rate(stamps, [10, 10, 10, 10, 10], skip=0) == pytest.approx(50 / 3.0)
    assert tuning.steady_rate([0.0], [], skip=1) == 0.0
    got: list[float] = []
    assert list(tuning.timed(iter("ab"), got)) == ["a", "b"] and len(got) == 3


def test_batch_probe_with_injected_oom() -> None:
    per_image = {64: 0.010, 128: 0.006, 256: 0.005}
    tried: list[int] = []

    def try_batch(size: int) -> float:
        tried.append(size)
        if size not in per_image:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return per_image[size]

    result = tuning.probe_batch_size(try_batch, 64)
    assert result.best == 256 and tried == [64, 128, 256, 512] and result.stopped == "out of memory at 512"
    assert result.seconds_per_image == per_image
    # sizes within the tolerance of the fastest: the smallest wins; the cap stops the doubling
    flat = tuning.probe_batch_size(lambda s: {32: 0.0100, 64: 0.0050, 128: 0.00495}[s], 32, cap=128)
    assert flat.best == 64 and flat.stopped == "cap"
    with pytest.raises(ValueError, match="preprocess.batch_size = 64"):
        tuning.probe_batch_size(lambda s: try_batch(s * 100), 64)
    none: dict[int, float] = {}
    with pytest.raises(KeyError):  # not an out-of-memory error: not swallowed
        tuning.probe_batch_size(lambda s: none[s], 8)
    assert tuning.is_oom(RuntimeError("CUDA error: out of memory")) and not tuning.is_oom(RuntimeError("shape"))


def test_batch_probe_is_a_no_op_on_cpu(tmp_path, caplog) -> None:
    from imgfeat.featurize.distributed import DistContext
    from imgfeat.featurize.runner import probe_batch
    from imgfeat.featurize.stats import RankStats

    cfg = Config()
    cfg.featurize.batch_probe = True
    stats = RankStats()
    probe_batch(cfg, torch.nn.Identity(), CPU, DistContext(), stats)
    assert cfg.preprocess.batch_size == 64 and stats.batch_probe == {}


def test_cpu_run_records_model_only_figure(tmp_path) -> None:
    """A tiny CPU run: the summary has the model-only img/s next to the end-to-end one; the default decode is cpu."""
    from imgfeat.featurize.stage_cli import main as featurize_main
    from imgfeat.metadata.contracts import shards

    files = [{"path": str(write_image(tmp_path / "img" / f"{i}.jpg", photo_like(50, 60 + i, i)))} for i in range(6)]
    manifest = write_manifest(tmp_path / "m", files, rows_per_shard=4)
    feat = tmp_path / "feat"
    args = ["--manifest", str(manifest), "--out", str(feat), "--model", "resnet18", "--weights", "none", "--size", "32",
            "--batch-size", "4", "--num-workers", "0", "--device", "cpu", "-q"]
    assert featurize_main(args) == 0
    summary = json.loads((feat / shards.FEATURES_SUMMARY).read_text())
    t = summary["this_run"]
    assert t["model_only_img_s"] > 0 and t["loop_images_per_s"] > 0 and t["model_efficiency"] > 0
    assert t["decode_device"] == ["cpu"] and t["decode_fallbacks"] == {} and t["gpu_decoded"] == 0
    assert t["per_rank"][0]["model_only_img_s"] == t["model_only_img_s"] and t["per_rank"][0]["batch_size"] == 4
    assert featurize_main([*args[:-1], "--decode-device", "gpu", "-q"]) == 2  # no CUDA here: a one-line error


def test_decode_device_is_not_in_the_fingerprint() -> None:
    from imgfeat.featurize.fingerprint import run_fingerprint
    from imgfeat.featurize.model import ModelInfo

    info = ModelInfo("resnet18", "none", "", "penultimate", "avg", dim=512)
    a, b = Config(), Config()
    b.featurize.decode_device, b.featurize.batch_probe = "gpu", True
    assert run_fingerprint(a, info) == run_fingerprint(b, info)


# ---------------------------------------------------------------- on CUDA

@pytest.fixture(scope="module")
def photo_set(tmp_path_factory) -> list[Path]:
    """Real-size JPEGs (about 500x375, some portrait, 4:2:0 and 4:4:4, progressive, grey, EXIF-rotated)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(17)
    files = []
    for i in range(24):
        h, w = (375, 500) if i % 3 else (500, 375)
        h, w = h + int(rng.integers(-40, 40)), w + int(rng.integers(-40, 40))
        img = photo_like(h, w, 100 + i)
        params: dict[str, int] = {"IMWRITE_JPEG_QUALITY": int(rng.integers(80, 96))}
        if i % 4 == 1:
            params["IMWRITE_JPEG_SAMPLING_FACTOR"] = 0x111111
        if i % 5 == 2:
            params["IMWRITE_JPEG_PROGRESSIVE"] = 1
        data = jpeg_bytes(img[..., 0] if i % 7 == 3 else img, **params)
        if i % 6 == 5:
            data = with_segment(data, 0xE1, exif_segment(int(rng.integers(2, 9))))
        files.append(root / f"{i:02d}.jpg")
        files[-1].write_bytes(data)
    return files


@pytest.mark.gpu
@needs_cuda
def test_gpu_decode_matches_cpu_decode_on_real_size_jpegs(photo_set) -> None:
    from imgfeat.featurize.model import build_model
    from imgfeat.preprocess.transforms import normalize_batch

    cuda = torch.device("cuda")
    pre = PreprocessConfig()
    ds_cpu = ManifestDataset(rows_for(photo_set), pre)
    want = ds_cpu.__getitems__(list(range(len(ds_cpu))))
    ds = RawBytesDataset(rows_for(photo_set), pre)
    decoder = GpuDecoder(pre, cuda)
    images, ok, reasons = decoder.decode(raw_batch(ds), ds)
    assert ok.all() and want.ok.all() and decoder.gpu_images == len(photo_set), decoder.fallbacks
    d = (images.cpu().to(torch.int16) - want.images.to(torch.int16)).abs().float()
    print(f"GPU vs CPU decode: mean abs diff {d.mean():.3f}, p99.9 {d.flatten().quantile(0.999):.0f}, max {d.max():.0f}")
    assert d.mean() < 1.5 and d.flatten().quantile(0.999) <= 24
    cfg = Config().featurize
    cfg.model, cfg.weights = "resnet50", "none"
    model, _ = build_model(cfg, 224, cuda)
    with torch.inference_mode():
        a = model(normalize_batch(images, device=cuda)).float().cpu().numpy()
        b = model(normalize_batch(want.images, device=cuda)).float().cpu().numpy()
    cos = _cosines(a, b)
    print(f"features: min cosine {cos.min():.6f}, mean {cos.mean():.6f}")
    assert cos.min() >= 0.999


@pytest.mark.gpu
@needs_cuda
def test_featurize_gpu_decode_run_equals_cpu_run(photo_set, tmp_path) -> None:
    from imgfeat.featurize.stage_cli import main as featurize_main
    from imgfeat.metadata.contracts import feature_store, shards

    from run_helpers import features_by_id

    extra = tmp_path / "extra"
    extra.mkdir()
    write_image(extra / "p.png", photo_like(300, 400, 1), ".png")
    cut = photo_set[0].read_bytes()
    (extra / "cut.jpg").write_bytes(cut[: len(cut) // 2])  # corrupt: cut short after the manifest
    (extra / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    files = [{"path": str(p)} for p in [*photo_set, extra / "p.png", extra / "cut.jpg", extra / "garbage.jpg"]]
    manifest = write_manifest(tmp_path / "m", files, rows_per_shard=10)
    base = ["--manifest", str(manifest), "--model", "resnet18", "--weights", "none", "--size", "224", "--batch-size", "8",
            "--device", "cuda", "-q"]
    outs = {}
    for mode in ("cpu", "gpu"):
        outs[mode] = tmp_path / f"feat-{mode}"
        assert featurize_main([*base, "--out", str(outs[mode]), "--decode-device", mode]) == 0

    def rejects(folder: Path) -> dict[str, str]:
        return {r["path"]: r["reason"] for s in feature_store.committed_shards(str(folder))
                for r in feature_store.read_rejects(str(folder), s)}

    assert rejects(outs["gpu"]) == rejects(outs["cpu"]) and len(rejects(outs["cpu"])) == 2
    a, b = features_by_id(str(outs["cpu"])), features_by_id(str(outs["gpu"]))
    assert a.keys() == b.keys() and len(a) == len(photo_set) + 1
    keys = sorted(a)
    cos = _cosines(np.stack([a[k] for k in keys]), np.stack([b[k] for k in keys]))
    assert cos.min() >= 0.999, cos.min()
    t = json.loads((outs["gpu"] / shards.FEATURES_SUMMARY).read_text())["this_run"]
    assert t["decode_device"] == ["gpu"] and t["decode_fallbacks"].get("not_jpeg") == 1
    assert t["gpu_decoded"] == len(photo_set) and t["model_only_img_s"] > 0


@pytest.mark.gpu
@needs_cuda
def test_overlap_on_a_real_stream() -> None:
    from imgfeat.featurize.overlap import CudaBackend

    cuda = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 255, (64, 3, 224, 224), dtype=torch.uint8, generator=gen) for _ in range(6)]
    backend = CudaBackend(cuda)
    ahead = CopyAhead(iter(batches), host=lambda b: b, backend=backend)
    w = torch.randn(4096, 4096, device=cuda)
    sums = []
    for host, on_device in ahead:
        assert on_device.device.type == "cuda" and torch.cuda.current_stream(cuda) != backend.side_stream()
        x = on_device.float()
        for _ in range(20):  # some compute for the next copy to overlap with
            w = torch.tanh(w @ w) * 0.01
        s = x.sum()
        ahead.issue_next()
        sums.append((float(s), float(host.float().sum())))
    torch.cuda.synchronize()
    assert len(sums) == 6 and all(a == b for a, b in sums)


@pytest.mark.gpu
@needs_cuda
def test_batch_probe_and_model_timing_on_cuda() -> None:
    from imgfeat.featurize.compute import forward_seconds_per_image
    from imgfeat.featurize.model import build_model

    cuda = torch.device("cuda")
    cfg = Config()
    cfg.featurize.model, cfg.featurize.weights, cfg.preprocess.size = "resnet18", "none", 64
    model, _ = build_model(cfg.featurize, 64, cuda)
    result = tuning.probe_batch_size(lambda b: forward_seconds_per_image(model, cuda, cfg, b), 16, cap=64)
    assert set(result.seconds_per_image) == {16, 32, 64} and result.best in (16, 32, 64)
