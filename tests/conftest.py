"""Shared fixtures: one session-scoped Spark, ../shared data, a seeded TORCH_HOME, tiny manifests."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The S3 endpoint is fixed before any Spark JVM or worker starts, so every process of the test run
# (Spark's Python workers, torchrun ranks) inherits it; the moto server itself starts on first use.
S3_PORT = _free_port()
os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
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
def torch_home(tmp_path_factory, mobilenet_weights) -> Iterator[Path]:
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
    from imgfeat.metadata.config import SparkConfig
    from imgfeat.metadata.spark.session import get_spark

    session = get_spark(SparkConfig(master="local[2,3]", driver_memory="2g", partitions=4))
    yield session
    session.stop()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto's server mode) on 127.0.0.1; yields its endpoint URL."""
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", S3_PORT), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"moto S3 server did not start on port {S3_PORT}")
            time.sleep(0.2)
    yield endpoint
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture()
def s3_bucket(s3_server, request):
    """A fresh bucket on the moto server; yields its s3:// URL."""
    import fsspec

    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir(name)
    fsspec.filesystem("s3").invalidate_cache()
    yield f"s3://{name}"
