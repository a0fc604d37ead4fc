"""The wheel as a user installs it: one top-level import name (``imgfeat``), working commands, and a
manifest job whose Spark workers import the installed package, not the source tree."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(wheel, python of a fresh venv with only that wheel of ours; the third-party packages are borrowed)."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"),
                    str(REPO)], check=True, capture_output=True)
    (wheel,) = (tmp / "dist").glob("imgfeat-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # The third-party packages of the test environment, without running its .pth files: the editable
    # install of the source tree (a .pth hook there) must not be visible in this venv.
    deps = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
    (Path(purelib) / "borrowed-deps.pth").write_text("\n".join(deps) + "\n")
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(purelib)
    scripts = venv / "bin" / "imgfeat"
    scripts.write_text(f"#!{python}\nimport sys\nfrom imgfeat.cli import main\nsys.exit(main())\n")
    scripts.chmod(0o755)
    return wheel, python


def test_the_wheel_has_one_top_level_name(installed: tuple[Path, Path]) -> None:
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as zf:
        tops = {n.split("/", 1)[0] for n in zf.namelist() if not n.split("/", 1)[0].endswith((".dist-info", ".data"))}
        top_level = next(n for n in zf.namelist() if n.endswith("top_level.txt"))
        assert zf.read(top_level).decode().split() == ["imgfeat"]
    assert tops == {"imgfeat"}


def _run(python: Path, *args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON")}
    return subprocess.run([str(python), *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=600, **kw)


def test_commands_run_from_the_installed_package(installed: tuple[Path, Path], tmp_path: Path) -> None:
    _, python = installed
    where = _run(python, "-c", "import imgfeat, imgfeat.metadata, imgfeat.featurize; "
                 "print(imgfeat.__file__); print(imgfeat.metadata.__file__)", cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert all(str(REPO) not in line for line in where.stdout.splitlines()), where.stdout
    for name in ("metadata", "preprocess", "featurize"):
        assert _run(python, "-c", f"import {name}", cwd=tmp_path).returncode != 0, f"{name} is importable"
    cli = _run(python, str(python.parent / "imgfeat"), "--help", cwd=tmp_path)
    assert cli.returncode == 0 and "manifest" in cli.stdout, cli.stderr
    module = _run(python, "-m", "imgfeat.featurize", "--help", cwd=tmp_path)
    assert module.returncode == 0 and "--manifest" in module.stdout, module.stderr


@pytest.mark.spark
def test_manifest_job_from_the_installed_package(installed: tuple[Path, Path], tmp_path: Path) -> None:
    """Spark's Python workers start the venv's interpreter and import imgfeat from the wheel."""
    import cv2
    import numpy as np

    _, python = installed
    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    for i in range(4):
        cv2.imwrite(str(src / f"{i}.png"), np.full((20, 30, 3), i * 40, np.uint8))
    (src / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import sys\n"
        "from imgfeat.cli import main\n"
        "code = main(['manifest', 'src', '--out', 'out', '--master', 'local[2]', '-q'])\n"
        "from pyspark.sql import SparkSession\n"
        "spark = SparkSession.getActiveSession()\n"
        "where = spark.sparkContext.parallelize([0, 1], 2).map(lambda _: __import__('imgfeat').__file__).collect()\n"
        "print('WORKERS', *sorted(set(where)))\n"
        "sys.exit(code)\n")
    run = _run(python, str(probe), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    workers = run.stdout.split("WORKERS", 1)[1].split()
    assert workers and all(str(REPO) not in w and "site-packages" in w for w in workers), workers
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "out" / "manifest")
    assert table.num_rows == 5 and sorted(set(table["status"].to_pylist())) == ["ok", "truncated"]
