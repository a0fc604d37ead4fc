"""Shared fixtures: one session-scoped Spark, ../shared data, a seeded TORCH_HOME, tiny manifests."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("IMGFEAT_SHARED", REPO.parent / "shared"))
FRUITS = SHARED / "data" / "fruits360-100"
PNGSUITE = SHARED / "data" / "pngsuite" / "png"
MOBILENET = SHARED / "weights" / "mobilenet_v2-b0353104.pth"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (the ../shared folder holds the real data; see shared/README.md)")
    return path


@pytest.fixture(scope="session")
def fruits_dir() -> Path:
    return _need(FRUITS)


@pytest.fixture(scope="session")
def pngsuite_dir() -> Path:
    return _need(PNGSUITE)


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    return _need(MOBILENET)


@pytest.fixture(scope="session")
def torch_home(tmp_path_factory, mobilenet_weights) -> Path:
    """A TORCH_HOME whose hub cache holds the MobileNetV2 weights, so torchvision loads them offline."""
    home = tmp_path_factory.mktemp("torch_home")
    ckpt = home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    shutil.copy(mobilenet_weights, ckpt / mobilenet_weights.name)
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(home)
    yield home
    if old is None:
        os.environ.pop("TORCH_HOME", None)
    else:
        os.environ["TORCH_HOME"] = old


@pytest.fixture(scope="session")
def spark():
    """The one local Spark session of the test run (local[2,3]: two cores, task retries on)."""
    from metadata.config import SparkConfig
    from metadata.spark_session import get_spark

    session = get_spark(SparkConfig(master="local[2,3]", driver_memory="2g", partitions=4))
    yield session
    session.stop()
