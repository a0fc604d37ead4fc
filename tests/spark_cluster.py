"""A real Spark standalone cluster on 127.0.0.1 (master + workers via pyspark's spark-class), for tests."""
from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spark_class() -> str:
    import pyspark

    return str(Path(pyspark.__file__).parent / "bin" / "spark-class")


def _wait_for(log: Path, pattern: str, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if log.exists() and re.search(pattern, log.read_text(errors="replace")):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"{log.name}: process exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)
    raise RuntimeError(f"{log.name}: no {pattern!r} within {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


@contextlib.contextmanager
def standalone_cluster(workdir: Path, workers: int = 1, cores: int = 1, memory: str = "1g") -> Iterator[str]:
    """Start a master and ``workers`` workers on 127.0.0.1; yield the master URL; stop them after.

    Worker ``i`` runs its executors under ``workdir/work{i}/APP_ID/EXECUTOR_ID/`` (with their stderr logs).
    """
    env = dict(os.environ, SPARK_LOCAL_IP="127.0.0.1", PYSPARK_PYTHON=sys.executable,
               SPARK_WORKER_DIR=str(workdir / "work"), SPARK_LOG_DIR=str(workdir))
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs: list[subprocess.Popen] = []
    try:
        mlog = workdir / "master.log"
        master = subprocess.Popen(
            [spark_class(), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port", str(port),
             "--webui-port", str(free_port())], stdout=mlog.open("w"), stderr=subprocess.STDOUT, env=env)
        procs.append(master)
        _wait_for(mlog, r"I have been elected leader|Starting Spark master", master)
        url = f"spark://127.0.0.1:{port}"
        started = []
        for i in range(workers):  # started together, then awaited: JVM start-up dominates
            wlog = workdir / f"worker{i}.log"
            w = subprocess.Popen(
                [spark_class(), "org.apache.spark.deploy.worker.Worker", url, "--host", "127.0.0.1", "--cores", str(cores),
                 "--memory", memory, "--webui-port", str(free_port()), "--work-dir", str(workdir / f"work{i}")],
                stdout=wlog.open("w"), stderr=subprocess.STDOUT, env=env)
            procs.append(w)
            started.append((wlog, w))
        for wlog, w in started:
            _wait_for(wlog, r"Successfully registered with master", w)
        yield url
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
