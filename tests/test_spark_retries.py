"""Spark task retries (local[2,3]): a check task that dies on its first attempt changes nothing."""
from __future__ import annotations

import pytest

from imgfeat.metadata.config import load_config
from imgfeat.metadata.contracts.schema import read_manifest
from imgfeat.metadata.manifest import job as manifest_job

from helpers import gradient_image, write_image

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
            assert ctx is not None  # run inside a Spark task
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


def test_failed_manifest_rerun_keeps_previous_output(spark, tmp_path, monkeypatch):
    """A rerun whose check tasks fail on every attempt leaves the committed manifest as it was."""
    src = tmp_path / "src"
    for i in range(6):
        write_image(src / "a" / f"{i}.jpg", gradient_image(seed=i))
    cfg = load_config(None, {"manifest": {"rows_per_shard": 4}})
    out = tmp_path / "out"
    manifest_job.run_manifest(cfg, [str(src)], str(out))

    def snapshot() -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    before = snapshot()
    rows_before = read_manifest(str(out)).to_pylist()
    write_image(src / "a" / "new.jpg", gradient_image(seed=99))

    def always_dies(c):
        def check(batches):
            raise RuntimeError("injected failure on every attempt")
            yield  # pragma: no cover - makes this a generator like the real checker

        return check

    monkeypatch.setattr(manifest_job, "_make_checker", always_dies)
    with pytest.raises(Exception, match="injected failure"):
        manifest_job.run_manifest(cfg, [str(src)], str(out))
    assert snapshot() == before
    assert read_manifest(str(out)).to_pylist() == rows_before


def _reduced_rows(out) -> list[dict]:
    import pyarrow.parquet as pq

    return sorted(pq.read_table(out / "reduced").to_pylist(), key=lambda r: r["image_id"])


def test_pca_survives_failed_task_attempts(spark, tmp_path, monkeypatch):
    """A fit task and a projection/write task each die once: same model and output as a clean run."""
    from test_pca_stage import cfg, make_data

    from imgfeat.metadata.pca import job as pca
    from imgfeat.metadata.pca import project, reduce

    assert spark.sparkContext.master == "local[2,3]"
    data = make_data(tmp_path, n=120, per_shard=20)
    pca.run_pca(cfg(k=3), data["manifest"], data["features"], str(tmp_path / "clean"), spark=spark, plots=False)

    real_groups, real_project = reduce.shard_groups, project.project_task
    fit_flag, write_flag = tmp_path / "fit-injected", tmp_path / "write-injected"

    def dies_once(flag, items):
        from pyspark import TaskContext

        ctx = TaskContext.get()
        assert ctx is not None  # run inside a Spark task
        for i, item in enumerate(items):
            yield item
            if ctx.attemptNumber() == 0 and i == 0 and not flag.exists():
                flag.write_text(str(ctx.partitionId()))
                raise RuntimeError(f"injected failure ({flag.name})")

    def flaky_groups(batches, folder, stems, markers):  # the fit's tasks come first: this one fails
        return dies_once(fit_flag, real_groups(batches, folder, stems, markers))

    def flaky_project(folder, markers, model, *rest):
        run = real_project(folder, markers, model, *rest)
        return lambda batches: dies_once(write_flag, run(batches))

    monkeypatch.setattr(reduce, "shard_groups", flaky_groups)  # as the fit's tasks read their rows
    monkeypatch.setattr(project, "project_task", flaky_project)
    pca.run_pca(cfg(k=3), data["manifest"], data["features"], str(tmp_path / "retried"), spark=spark, plots=False)
    assert fit_flag.exists() and write_flag.exists(), "a failure was never injected"
    clean, retried = _reduced_rows(tmp_path / "clean"), _reduced_rows(tmp_path / "retried")
    assert len({r["image_id"] for r in retried}) == len(retried) == len(clean) == 120
    assert clean == retried
    assert (tmp_path / "retried" / "reduced" / "_SUCCESS").is_file()
    assert not list((tmp_path / "retried").glob("_pca_scratch-*"))


def test_failed_pca_rerun_keeps_previous_output(spark, tmp_path, monkeypatch):
    """A rerun that fails (while writing, or on a corrupted shard) leaves reduced/ and the model as they were."""
    from test_pca_stage import cfg, make_data

    from imgfeat.metadata.contracts.shards import ShardVerificationError
    from imgfeat.metadata.pca import job as pca
    from imgfeat.metadata.pca import project

    data = make_data(tmp_path, n=60, per_shard=20)
    out = tmp_path / "red"
    pca.run_pca(cfg(k=3), data["manifest"], data["features"], str(out), spark=spark, plots=False)
    before = {p.name: p.read_bytes() for p in (out / "reduced").iterdir()}
    model = (out / "pca_model.npz").read_bytes()
    rows = _reduced_rows(out)

    def always_fails(folder, markers, model, *rest):
        def run(batches):
            raise RuntimeError("injected write failure")
            yield  # pragma: no cover

        return run

    with monkeypatch.context() as m:
        m.setattr(project, "project_task", always_fails)
        with pytest.raises(Exception, match="injected write failure"):
            pca.run_pca(cfg(k=2), data["manifest"], data["features"], str(out), spark=spark, plots=False)
    victim = tmp_path / "feat" / "part-00001.features.npy"
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0xFF
    victim.write_bytes(bytes(raw))
    with pytest.raises(ShardVerificationError, match="part-00001"):
        pca.run_pca(cfg(k=2), data["manifest"], data["features"], str(out), spark=spark, plots=False)
    assert {p.name: p.read_bytes() for p in (out / "reduced").iterdir()} == before
    assert (out / "pca_model.npz").read_bytes() == model and _reduced_rows(out) == rows
    assert sorted(p.name for p in out.iterdir()) == ["config.resolved.toml", "pca_model.npz", "pca_summary.json", "reduced"]
