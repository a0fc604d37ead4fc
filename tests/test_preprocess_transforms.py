"""Resize policies, torchvision agreement, and device normalization."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from imgfeat.metadata.config import PreprocessConfig
from imgfeat.preprocess.decode import decode_image
from imgfeat.preprocess.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    needed_shorter_side,
    normalize_batch,
    resize_image,
    resize_images,
    shorter_side_dims,
)

from helpers import gradient_image

POLICIES = ("resize_shorter+center_crop", "resize", "letterbox")


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("interp", ["nearest", "linear", "area", "cubic", "lanczos"])
@pytest.mark.parametrize("hw", [(48, 64), (64, 48), (10, 300), (224, 224), (7, 7)])
def test_policy_shapes(policy, interp, hw):
    out = resize_image(gradient_image(*hw), 32, policy, interp, resize_shorter=40 if "crop" in policy else None)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8 and out.flags.c_contiguous


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("interp", ["linear", "area", "cubic"])
def test_stack_resize_equals_one_at_a_time(policy, interp):
    stack = np.stack([gradient_image(48, 80, seed=s) for s in range(5)])
    for size in (32, 64):  # shrinking and enlarging
        shorter = max(40, size) if "crop" in policy else None
        got = resize_images(stack, size, policy, interp, shorter, (9, 8, 7))
        for k in range(len(stack)):
            assert np.array_equal(got[k], resize_image(stack[k], size, policy, interp, shorter, (9, 8, 7)))


def test_letterbox_pads_with_background_and_centres():
    img = np.full((20, 40, 3), 200, np.uint8)
    out = resize_image(img, 40, "letterbox", "linear", background=(1, 2, 3))
    assert np.all(out[:10] == (1, 2, 3)) and np.all(out[30:] == (1, 2, 3))
    assert np.all(out[10:30] == 200)


def test_resize_ignores_aspect():
    img = np.zeros((10, 100, 3), np.uint8)
    img[:, 50:] = 255
    out = resize_image(img, 20, "resize", "nearest")
    assert np.all(out[:, :10] == 0) and np.all(out[:, 10:] == 255)


def test_center_crop_geometry_matches_torchvision():
    assert shorter_side_dims(100, 50, 256) == (512, 256)
    assert shorter_side_dims(333, 500, 256) == (256, 384)
    assert needed_shorter_side(224, "resize_shorter+center_crop", 256) == 256
    assert needed_shorter_side(64, "letterbox") == 64
    with pytest.raises(ValueError, match="resize_shorter"):
        resize_image(gradient_image(), 64, "resize_shorter+center_crop", "linear", resize_shorter=32)
    with pytest.raises(ValueError, match="resize_policy"):
        resize_image(gradient_image(), 64, "stretch", "linear")
    with pytest.raises(ValueError, match="interpolation"):
        resize_image(gradient_image(), 64, "resize", "bogus")


def _torchvision_reference(path, shorter: int, size: int) -> np.ndarray:
    from PIL import Image
    from torchvision import transforms as T

    with Image.open(path) as img:
        return np.asarray(T.Compose([T.Resize(shorter), T.CenterCrop(size)])(img.convert("RGB")))


@pytest.mark.parametrize("shorter,size,tol", [(256, 224, 0.5), (64, 64, 1.5), (32, 32, 3.0)])
def test_matches_torchvision_reference(fruits_dir, shorter, size, tol):
    # Both directions use PIL's antialiased bilinear (torch's uint8 kernel); OpenCV's and PIL's JPEG
    # decodes may still differ by a few levels.
    cfg = PreprocessConfig()
    files = sorted(fruits_dir.glob("Training/*/*.jpg"))[::600]
    for f in files:
        ours = resize_image(decode_image(f.read_bytes(), cfg), size, "resize_shorter+center_crop", "linear", shorter)
        ref = _torchvision_reference(f, shorter, size)
        diff = np.abs(ours.astype(float) - ref.astype(float)).mean()
        assert diff < tol, (f, diff)


def test_matches_torchvision_on_non_square(tmp_path):
    from helpers import write_image

    path = write_image(tmp_path / "wide.png", gradient_image(90, 160, seed=4), ".png")
    ours = resize_image(decode_image(path.read_bytes(), PreprocessConfig()), 224, "resize_shorter+center_crop", "linear", 256)
    ref = _torchvision_reference(path, 256, 224)
    assert np.abs(ours.astype(float) - ref.astype(float)).mean() < 1.5


def test_normalize_batch():
    batch = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    out = normalize_batch(batch, IMAGENET_MEAN, IMAGENET_STD, torch.float32, "cpu")
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(out, (batch.float() / 255 - mean) / std, atol=1e-5)
    bf = normalize_batch(batch, dtype=torch.bfloat16, device="cpu")
    assert bf.dtype == torch.bfloat16 and torch.allclose(bf.float(), out, atol=0.05)
    nhwc = batch.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last, as collate makes it
    assert torch.allclose(normalize_batch(nhwc), out)
    with pytest.raises(ValueError):
        normalize_batch(batch.float())


@pytest.mark.gpu
def test_normalize_batch_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    batch = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8).pin_memory()
    out = normalize_batch(batch, dtype=torch.float16, device="cuda")
    assert out.device.type == "cuda" and out.dtype == torch.float16
    assert torch.allclose(out.float().cpu(), normalize_batch(batch.cpu()), atol=0.01)
