"""Folder removal in imgfeat.metadata.storage."""
from __future__ import annotations

import errno

import pytest
from fsspec.implementations.local import LocalFileSystem

from imgfeat.metadata import storage


def _racing_rm(monkeypatch, failures: int) -> list[int]:
    """Make the first ``failures`` removals fail as a removal does when a straggling task adds a file."""
    real = LocalFileSystem.rm
    calls: list[int] = []

    def rm(self, path, recursive=False, maxdepth=None):
        calls.append(1)
        if len(calls) <= failures:
            raise OSError(errno.ENOTEMPTY, "Directory not empty", path)
        return real(self, path, recursive=recursive, maxdepth=maxdepth)

    monkeypatch.setattr(LocalFileSystem, "rm", rm)
    return calls


def test_remove_folder_retries_a_folder_that_changed_under_it(tmp_path, monkeypatch) -> None:
    (tmp_path / "work" / "checked").mkdir(parents=True)
    (tmp_path / "work" / "checked" / "part-0.parquet").write_bytes(b"x")
    calls = _racing_rm(monkeypatch, failures=2)
    storage.remove_folder(str(tmp_path / "work"))
    assert not (tmp_path / "work").exists() and len(calls) == 3


def test_remove_folder_gives_up_after_its_attempts(tmp_path, monkeypatch) -> None:
    (tmp_path / "work").mkdir()
    calls = _racing_rm(monkeypatch, failures=10)
    with pytest.raises(OSError, match="not empty"):
        storage.remove_folder(str(tmp_path / "work"), attempts=3)
    assert len(calls) == 3


def test_remove_folder_of_a_missing_folder_is_a_no_op(tmp_path) -> None:
    storage.remove_folder(str(tmp_path / "never-made"))


def test_a_failed_manifest_run_reports_its_own_error_not_the_cleanup(monkeypatch) -> None:
    from imgfeat.metadata.manifest import job

    def cannot_remove(url: str) -> None:
        raise OSError(errno.ENOTEMPTY, "Directory not empty", url)

    monkeypatch.setattr(job, "remove_folder", cannot_remove)
    with pytest.raises(RuntimeError, match="the job's own error"):
        try:
            raise RuntimeError("the job's own error")
        finally:
            job._remove_run_folders("work", "staging")
    with pytest.raises(OSError, match="not empty"):  # after a run that succeeded, a cleanup failure is the error
        job._remove_run_folders("work")
