"""ManifestDataset, collate, the loader factory and crash containment."""
from __future__ import annotations

import functools
import os
import signal

import numpy as np
import pytest
import torch

from imgfeat.metadata.config import PreprocessConfig
from imgfeat.metadata.contracts.schema import normalize_uri
from imgfeat.preprocess import dataset as dataset_mod
from imgfeat.preprocess.dataset import ManifestDataset, collate
from imgfeat.preprocess.decode import decode_image
from imgfeat.preprocess.loader import iter_batches_contained, make_loader, plan_batches, resolve_workers
from imgfeat.preprocess.transforms import resize_image

from helpers import gradient_image, write_image, write_manifest

CFG = PreprocessConfig(size=32, resize_shorter=36, batch_size=4, num_workers=0, prefetch_factor=2)


@pytest.fixture()
def images(tmp_path):
    paths = []
    for i in range(10):
        label = "cat" if i % 2 else "dog"
        paths.append(write_image(tmp_path / "src" / label / f"{i}.png", gradient_image(40, 50, seed=i), ".png"))
    return paths


@pytest.fixture()
def manifest(tmp_path, images):
    files = [{"path": p, "label": p.parent.name, "split": "train" if i < 8 else "test"} for i, p in enumerate(images)]
    files.append({"path": tmp_path / "src" / "broken.jpg", "status": "truncated"})
    return write_manifest(tmp_path / "out", files, rows_per_shard=4)


def rows_for(paths):
    return [{"image_id": f"id{i}", "path": normalize_uri(str(p)), "label_index": i % 2} for i, p in enumerate(paths)]


def test_items_and_values(images):
    ds = ManifestDataset(rows_for(images), CFG)
    image, index, ok, reason = ds[3]
    assert ok and reason == "" and index == 3
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    expect = resize_image(decode_image(images[3].read_bytes(), CFG), 32, CFG.resize_policy, "linear", 36)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), expect)
    assert ds.labels[:2] == [0, 1]


def test_from_manifest_filters(manifest):
    assert len(ManifestDataset.from_manifest(str(manifest), CFG)) == 10  # the truncated row is not ok
    assert len(ManifestDataset.from_manifest(str(manifest), CFG, split="test")) == 2
    assert len(ManifestDataset.from_manifest(str(manifest), CFG, labels=["cat"])) == 5
    assert len(ManifestDataset.from_manifest(str(manifest), CFG, shards=[0])) == 4
    ds = ManifestDataset.from_manifest(str(manifest), CFG, size=16)
    assert ds[0][0].shape == (3, 16, 16)


def test_vanished_and_changed_files_are_not_ok(images):
    ds = ManifestDataset(rows_for(images), CFG)
    os.remove(images[2])
    images[5].write_text("this is not an image any more")
    images[7].write_bytes(images[7].read_bytes()[:200])
    results = {i: ds[i] for i in range(len(ds))}
    assert results[2][2] is False and results[2][3].startswith("unreadable:")
    assert results[5][2] is False and results[5][3].startswith("not_image:")
    assert results[7][2] is False and results[7][3].startswith("truncated:")
    assert torch.count_nonzero(results[2][0]) == 0 and results[2][0].shape == (3, 32, 32)
    assert sum(r[2] for r in results.values()) == 7


def test_collate_layout(images):
    ds = ManifestDataset(rows_for(images), CFG)
    batch, idx, ok, reasons = collate([ds[i] for i in range(3)])
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.uint8
    assert batch.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(batch[1], ds[1][0])
    assert idx.tolist() == [0, 1, 2] and idx.dtype == torch.int64
    assert ok.dtype == torch.bool and ok.all() and reasons == ["", "", ""]


def test_getitems_matches_items_and_keeps_bad_rows(images, tmp_path, monkeypatch):
    # Mixed source sizes (two resize groups), one over the grouping cap (resized alone), bad rows.
    paths = images + [write_image(tmp_path / "src" / "wide.png", gradient_image(30, 70, seed=11), ".png"),
                      write_image(tmp_path / "src" / "big.png", gradient_image(90, 60, seed=12), ".png")]
    monkeypatch.setattr(dataset_mod, "GROUP_MAX_BYTES", 90 * 60 * 3 - 1)
    os.remove(paths[2])
    paths[5].write_text("not an image")
    ds = ManifestDataset(rows_for(paths), CFG)
    order = [11, 5, 0, 10, 2, 3, 1]
    got = ds.__getitems__(order)
    want = collate([ds[i] for i in order])
    assert isinstance(got, dataset_mod.LoadedBatch) and collate(got) is got
    assert got.images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(got.images, want.images) and got.indices.tolist() == order
    assert got.ok.tolist() == [True, False, True, True, False, True, True] == want.ok.tolist()
    assert got.reasons == want.reasons and got.reasons[1].startswith("not_image:")
    assert torch.count_nonzero(got.images[4]) == 0


def test_loader_with_workers_covers_everything(images):
    os.remove(images[4])
    ds = ManifestDataset(rows_for(images), CFG)
    loader = make_loader(ds, CFG, num_workers=2)
    assert loader.num_workers == 2 and loader.persistent_workers and loader.prefetch_factor == 2
    seen, bad = [], []
    for batch, idx, ok, reasons in loader:
        assert batch.shape[1:] == (3, 32, 32)
        seen += idx.tolist()
        bad += [(i, r) for i, o, r in zip(idx.tolist(), ok.tolist(), reasons) if not o]
    assert sorted(seen) == list(range(10))
    assert [i for i, _ in bad] == [4] and bad[0][1].startswith("unreadable")


def test_worker_defaults():
    assert resolve_workers(PreprocessConfig(num_workers=-1)) == len(os.sched_getaffinity(0))
    assert resolve_workers(PreprocessConfig(num_workers=3)) == 3
    assert resolve_workers(PreprocessConfig(), 0) == 0
    assert plan_batches(5, 2) == [[0, 1], [2, 3], [4]]
    assert plan_batches([7, 9, 11], 2) == [[7, 9], [11]]


def _crashing_decode(crash_on: bytes):
    real = dataset_mod.decode_image

    def decode(data, cfg, target=None, limits=None):
        if data == crash_on:
            os.kill(os.getpid(), signal.SIGSEGV)  # what a native codec crash looks like
        return real(data, cfg, target, limits)

    return decode


@pytest.mark.slow
def test_worker_crash_is_contained(images, monkeypatch):
    bad = 6
    monkeypatch.setattr(dataset_mod, "decode_image", _crashing_decode(images[bad].read_bytes()))
    ds = ManifestDataset(rows_for(images), CFG)
    seen, results = [], {}
    for batch, idx, ok, reasons in iter_batches_contained(ds, CFG, batch_size=3, num_workers=2):
        seen += idx.tolist()
        for i, o, r in zip(idx.tolist(), ok.tolist(), reasons):
            results[i] = (o, r)
    assert seen == list(range(10))  # in order, each exactly once
    assert results[bad][0] is False and "crashed" in results[bad][1] and "SIGSEGV" in results[bad][1]
    assert results[bad][1].startswith("undecodable:")
    assert all(results[i][0] for i in range(10) if i != bad)


def test_contained_iteration_without_crash(images):
    ds = ManifestDataset(rows_for(images), CFG)
    got = [i for _, idx, _, _ in iter_batches_contained(ds, CFG, batch_size=4, num_workers=2, indices=[1, 3, 5, 7, 9])
           for i in idx.tolist()]
    assert got == [1, 3, 5, 7, 9]
    got0 = [i for _, idx, _, _ in iter_batches_contained(ds, CFG, batch_size=4, num_workers=0) for i in idx.tolist()]
    assert got0 == list(range(10))


def test_loader_workers_die_with_a_killed_parent(tmp_path):
    """A loading process killed with SIGKILL takes its loader workers with it (no orphans holding pipes)."""
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys, time, multiprocessing as mp\n"
        "from preprocess.loader import die_with_parent\n"
        "def child(parent):\n"
        "    die_with_parent(parent)\n"
        "    time.sleep(60)\n"
        "if __name__ == '__main__':\n"
        "    p = mp.get_context('fork').Process(target=child, args=(os.getpid(),))\n"
        "    p.start()\n"
        "    print(p.pid, flush=True)\n"
        "    time.sleep(60)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path.parent), os.getcwd(), *sys.path]))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.stdout is not None
    worker = int(proc.stdout.readline())
    time.sleep(0.5)  # the child has asked for PR_SET_PDEATHSIG
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and os.path.exists(f"/proc/{worker}") and \
            open(f"/proc/{worker}/stat").read().split(")")[-1].split()[0] != "Z":
        time.sleep(0.05)
    alive = os.path.exists(f"/proc/{worker}") and open(f"/proc/{worker}/stat").read().split(")")[-1].split()[0] != "Z"
    assert not alive, "the worker outlived its killed parent"
    loader = make_loader(ManifestDataset([], CFG), CFG, num_workers=1)
    init = loader.worker_init_fn
    assert isinstance(init, functools.partial)
    assert init.keywords["parent"] == os.getpid()


def test_a_loader_with_workers_stops_the_parents_opencv_threads_before_forking(images):
    """A forked worker must not inherit a pool of OpenCV threads it cannot join (see ``quiesce_before_fork``)."""
    import cv2

    cv2.setNumThreads(2)
    cv2.GaussianBlur(np.zeros((512, 512, 3), np.uint8), (0, 0), 3)  # the pool runs
    ds = ManifestDataset(rows_for(images), CFG)
    batches = list(iter_batches_contained(ds, CFG, batch_size=4, num_workers=1))
    assert cv2.getNumThreads() == 1 and sum(len(b[0]) for b in batches) == len(ds)
