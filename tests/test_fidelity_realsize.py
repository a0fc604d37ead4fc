"""Features of real-size photos through imgfeat's decode + resize equal torchvision's own pipeline.

Photos of 100 to about 4,000 px are made from the shared 100x100 fruit photos (``sample.realsize``:
sharp mosaics at non-integer scales, upscaled single photos, scikit-learn's two real photos; 4:2:0
and 4:4:4, some grey, some portrait). Each goes through the batched ``ManifestDataset`` path that
featurize uses and, as the reference, through PIL + ``Resize(256)``, ``CenterCrop(224)``,
``ToTensor``, ``Normalize``; both feed the same torchvision mobilenet_v2 with the shared ImageNet
weights. The default config must reach cosine >= 0.999 on every photo. ``reduced_decode = "fast"``
(the old default) falls below it on this set, which shows the set can catch the problem.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imgfeat.metadata.config import PreprocessConfig
from imgfeat.preprocess.decode import reduced_scale
from imgfeat.preprocess.transforms import needed_shorter_side

pytestmark = pytest.mark.slow

MIN_COSINE = 0.999


@pytest.fixture(scope="module")
def photos(fruits_dir: Path, tmp_path_factory) -> list[str]:
    from sample.realsize import make_realsize_photos

    root = tmp_path_factory.mktemp("realsize")
    files = make_realsize_photos(fruits_dir, root / "mid", 24, min_side=400, max_side=3000, seed=11)
    files += make_realsize_photos(fruits_dir, root / "small", 1, min_side=100, max_side=100, seed=1)
    files += make_realsize_photos(fruits_dir, root / "large", 3, min_side=2600, max_side=4000, seed=5)
    return files


@pytest.fixture(scope="module")
def model(torch_home):
    import torch
    from torchvision.models import mobilenet_v2

    net = mobilenet_v2(weights="IMAGENET1K_V1")  # offline: the shared weights in the seeded TORCH_HOME
    net.classifier = torch.nn.Identity()
    return net.eval()


@pytest.fixture(scope="module")
def reference(photos, model):
    """Penultimate mobilenet_v2 features from torchvision's own preprocessing (PIL), [N, 1280]."""
    import torch
    from PIL import Image
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    batch = []
    for path in photos:
        with Image.open(path) as img:
            batch.append(tf(img.convert("RGB")))
    with torch.inference_mode():
        return model(torch.stack(batch))


def imgfeat_features(photos: list[str], cfg: PreprocessConfig, model: Any) -> Any:
    """Features through the DataLoader batch path of featurize: ManifestDataset.__getitems__ + normalize_batch."""
    import torch

    from imgfeat.preprocess.dataset import ManifestDataset
    from imgfeat.preprocess.transforms import normalize_batch

    rows = [{"image_id": f"{i:032x}", "path": p} for i, p in enumerate(photos)]
    ds = ManifestDataset(rows, cfg)
    out = []
    with torch.inference_mode():
        for start in range(0, len(ds), 16):
            batch = ds.__getitems__(list(range(start, min(start + 16, len(ds)))))
            assert bool(batch.ok.all()), batch.reasons
            out.append(model(normalize_batch(batch.images)))
    return torch.cat(out)


def cosines(a, b) -> np.ndarray:
    import torch

    return torch.nn.functional.cosine_similarity(a, b).numpy()


def _scales(photos: list[str], mode: str) -> list[int]:
    from PIL import Image

    cfg = PreprocessConfig()
    target = needed_shorter_side(cfg.size, cfg.resize_policy, cfg.resize_shorter)
    scales = []
    for path in photos:
        with Image.open(path) as img:
            scales.append(reduced_scale(img.width, img.height, target, mode))
    return scales


def test_photo_set_spans_sizes_and_decode_scales(photos):
    from PIL import Image

    sides = []
    for path in photos:
        with Image.open(path) as img:
            sides += list(img.size)
    assert min(sides) == 100 and max(sides) >= 3500
    # The default decodes some photos at a reduced scale (else this file would test nothing new), and
    # the old behaviour (fast) uses every scale, 1/8 included.
    assert 2 in _scales(photos, "safe")
    assert {1, 2, 4, 8} <= set(_scales(photos, "fast"))


def test_default_decode_matches_torchvision_on_real_size_photos(photos, model, reference):
    cfg = PreprocessConfig()
    assert cfg.reduced_decode == "safe"
    cos = cosines(imgfeat_features(photos, cfg, model), reference)
    worst = int(cos.argmin())
    print(f"default decode: min cosine {cos.min():.5f}, mean {cos.mean():.6f} over {len(cos)} photos")
    assert cos.min() >= MIN_COSINE, f"min cosine {cos.min():.5f} on {Path(photos[worst]).name}; " \
                                    f"{int((cos < MIN_COSINE).sum())} of {len(cos)} under {MIN_COSINE}"


def test_fast_decode_is_below_the_bar_on_this_set(photos, model, reference):
    # reduced_decode = "fast" (the pre-fix default) must fail the bar here: proof the photo set catches it.
    cos = cosines(imgfeat_features(photos, PreprocessConfig(reduced_decode="fast"), model), reference)
    print(f"fast decode: min cosine {cos.min():.5f}, {int((cos < MIN_COSINE).sum())} of {len(cos)} under {MIN_COSINE}")
    assert cos.min() < MIN_COSINE, f"fast decode reached min cosine {cos.min():.5f}"
