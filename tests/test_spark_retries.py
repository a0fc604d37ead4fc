"""Spark task retries (local[2,3]): a check task that dies on its first attempt changes nothing."""
from __future__ import annotations

import pytest

from helpers import gradient_image, write_image
from metadata import manifest_job
from metadata.config import load_config
from metadata.schema import read_manifest

pytestmark = [pytest.mark.spark, pytest.mark.slow]


def test_manifest_survives_a_failed_task_attempt(spark, tmp_path, monkeypatch):
    assert spark.sparkContext.master == "local[2,3]"
    src = tmp_path / "src"
    for label in ("a", "b"):
        for i in range(8):
            write_image(src / label / f"{i}.jpg", gradient_image(seed=i + (20 if label == "b" else 0)))
    (src / "a" / "cut.jpg").write_bytes((src / "a" / "0.jpg").read_bytes()[:200])
    cfg = load_config(None, {"manifest": {"rows_per_shard": 4}})
    manifest_job.run_manifest(cfg, [str(src)], str(tmp_path / "clean"))

    real = manifest_job._make_checker
    injected = tmp_path / "injected"

    def flaky_checker(c):
        check = real(c)

        def first_attempt_dies(batches):
            from pyspark import TaskContext

            ctx = TaskContext.get()
            for i, out in enumerate(check(batches)):
                yield out
                if ctx.attemptNumber() == 0 and i == 0 and not injected.exists():
                    injected.write_text(str(ctx.partitionId()))
                    raise RuntimeError("injected failure on the first attempt")

        return first_attempt_dies

    monkeypatch.setattr(manifest_job, "_make_checker", flaky_checker)
    manifest_job.run_manifest(cfg, [str(src)], str(tmp_path / "retried"))
    clean = sorted(read_manifest(str(tmp_path / "clean")).to_pylist(), key=lambda r: r["image_id"])
    retried = sorted(read_manifest(str(tmp_path / "retried")).to_pylist(), key=lambda r: r["image_id"])
    assert len({r["image_id"] for r in retried}) == len(retried) == len(clean) == 17
    for a, b in zip(clean, retried):
        assert {k: v for k, v in a.items() if k != "mtime"} == {k: v for k, v in b.items() if k != "mtime"}
    assert (tmp_path / "retried" / "manifest" / "_SUCCESS").is_file()
    assert injected.exists(), "the failure was never injected"
