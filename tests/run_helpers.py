"""Helpers for featurize tests and benchmarks: pick images, run the stage in a subprocess, compare outputs."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def pick_images(root: Path, split: str = "Training", per_class: int = 4, offset: int = 0) -> list[dict[str, str]]:
    """``per_class`` images of every class folder under ``root/split`` as manifest file dicts (path, label, split)."""
    files: list[dict[str, str]] = []
    for cls in sorted(p for p in (root / split).iterdir() if p.is_dir()):
        images = sorted(cls.glob("*.jpg"))[offset : offset + per_class]
        files.extend({"path": str(p), "label": cls.name, "split": split.lower()} for p in images)
    return files


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The current environment with the repo and tests/ importable, no progress bar, and the fault driver
    installed when ``IMGFEAT_FAULT`` is set."""
    env = dict(os.environ)
    tests = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), tests] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["IMGFEAT_NO_PROGRESS"] = "1"
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra or {})
    if env.get("IMGFEAT_FAULT"):  # the fault driver watches the shipped code's one test hook
        env.setdefault("IMGFEAT_HOOK", "faults_driver:install")
    return env


def run_module(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m imgfeat.featurize ARGS`` in a subprocess."""
    return subprocess.run([sys.executable, "-m", "imgfeat.featurize", *args], cwd=REPO, env=subprocess_env(env),
                          capture_output=True, text=True, timeout=timeout)


def torchrun_cmd(nproc: int, args: list[str], *launcher: str) -> list[str]:
    """The torchrun command line for ``-m imgfeat.featurize ARGS`` (torchrun from this interpreter's folder)."""
    torchrun = str(Path(sys.executable).parent / "torchrun")
    return [torchrun, *launcher, f"--nproc-per-node={nproc}", "-m", "imgfeat.featurize", *args]


def features_by_id(folder: str) -> dict[str, np.ndarray]:
    """All committed features of ``folder`` as ``{image_id: vector}``."""
    from imgfeat.metadata.contracts.feature_store import read_features

    ids, feats = read_features(folder)
    return {str(i): f for i, f in zip(ids, feats)}
