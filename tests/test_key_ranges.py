"""Key-range listing of object-store folders: every key listed once by exactly one range, whatever the
keys and wherever the cuts fall; on S3 (moto) and on Spark, a big flat prefix split over many tasks."""
from __future__ import annotations

import bisect

import fsspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgfeat.metadata.manifest.key_ranges import Listed, Page, Paging, list_range, split_points


class SortedStore:
    """A bucket of keys listed with S3's ListObjectsV2 semantics (delimiter ``/``, StartAfter, MaxKeys,
    continuation), counting requests."""

    def __init__(self, keys: set[str]) -> None:
        self.keys = sorted(keys)
        self.requests = 0

    def page(self, prefix: str, start_after: str | None, token: str | None, max_keys: int) -> Page:
        self.requests += 1
        bucket, _, kp = prefix.partition("/")
        i = int(token) if token is not None else bisect.bisect_right(self.keys, start_after.partition("/")[2]) \
            if start_after else bisect.bisect_left(self.keys, kp)
        out: list[Listed] = []
        while i < len(self.keys) and self.keys[i].startswith(kp) and len(out) < max_keys:
            rest = self.keys[i][len(kp):]
            if "/" in rest:  # roll every key under the subfolder into one common prefix
                sub = kp + rest.split("/", 1)[0] + "/"
                out.append(Listed(f"{bucket}/{sub[:-1]}", True))
                i = bisect.bisect_left(self.keys, sub[:-1] + chr(ord("/") + 1))
            else:
                out.append(Listed(f"{bucket}/{self.keys[i]}", False, 1, 0.0))
                i += 1
        more = i < len(self.keys) and self.keys[i].startswith(kp)
        return Page(out, more, str(i) if more else None)


def walk(store: SortedStore, paging: Paging) -> tuple[list[str], int]:
    """Breadth-first over folders and key ranges, as ``discover.list_on_spark`` does: (keys, units listed)."""
    frontier: list[tuple[str, str | None, str | None]] = [("b", None, None)]
    keys: list[str] = []
    units = 0
    while frontier:
        nxt: list[tuple[str, str | None, str | None]] = []
        for folder, after, upto in frontier:
            units += 1
            for item in list_range(store.page, folder, after, upto, paging):
                if isinstance(item, tuple):
                    nxt.append((folder, item[0], item[1]))
                elif item.is_dir:
                    nxt.append((item.name, None, None))
                else:
                    keys.append(item.name.partition("/")[2])
        frontier = nxt
    return keys, units


names = st.text(alphabet="ab09_.-/é", min_size=1, max_size=7).filter(
    lambda k: not k.startswith("/") and not k.endswith("/") and "//" not in k)


@settings(max_examples=150, deadline=None)
@given(keys=st.sets(names, max_size=120), page_keys=st.integers(1, 6), split_pages=st.integers(1, 4))
def test_every_key_is_listed_once_by_one_range(keys, page_keys, split_pages):
    # a key may not also be a folder (S3 allows it, a file system does not): drop such keys
    keys = {k for k in keys if not any(o.startswith(k + "/") for o in keys)}
    store = SortedStore(keys)
    got, _ = walk(store, Paging(page_keys=page_keys, split_pages=split_pages))
    assert sorted(got) == sorted(keys)


@pytest.mark.parametrize("pattern", ["img{:07d}.jpg", "{:08x}.png", "n0144_{:05d}.JPEG"])
def test_a_flat_folder_splits_into_balanced_ranges_at_little_cost(pattern):
    import random

    rng = random.Random(0)
    count = 60_000
    keys = {pattern.format(i if "x" not in pattern else rng.getrandbits(32)) for i in range(count)}
    store = SortedStore(keys)
    got, units = walk(store, Paging(page_keys=100, split_pages=20))  # 2,000 keys per task before a split
    assert sorted(got) == sorted(keys)
    assert units >= 10  # spread over tasks: one task would hold all 60,000
    assert store.requests <= 1.2 * len(keys) / 100 + units


@given(seen=st.lists(st.text("019az", min_size=3, max_size=6), min_size=1, max_size=2),
       last=st.text("019az", min_size=3, max_size=6), upto=st.one_of(st.none(), st.text("019az", max_size=6)))
def test_split_points_lie_strictly_inside_the_range(seen, last, upto):
    points = split_points(seen, last, upto, 1)
    assert points == sorted(set(points))
    assert all(p > last and (upto is None or p < upto) for p in points)


@pytest.mark.s3
def test_s3_flat_prefix_is_split_and_every_object_listed_once(s3_bucket):
    from imgfeat.metadata.manifest.listing import Unit, list_unit

    fs = fsspec.filesystem("s3")
    keys = {f"src/img{i:04d}.jpg" for i in range(230)} | {f"src/sub/x{i}.jpg" for i in range(7)} | {"src/zz.png"}
    fs.pipe({f"{s3_bucket[5:]}/{k}": b"x" for k in keys})
    root = f"{s3_bucket}/src"
    got = [e.path for e in list_unit(Unit(root, root, True), Paging(page_keys=10, split_pages=3))]
    assert sorted(got) == sorted(f"{s3_bucket}/{k}" for k in keys)
    assert all(e.size == 1 for e in list_unit(Unit(root, root, True), Paging(page_keys=10, split_pages=3)))


@pytest.mark.spark
@pytest.mark.s3
def test_spark_listing_splits_a_flat_s3_prefix_over_tasks(spark, s3_bucket, tmp_path):
    from imgfeat.metadata.manifest.discover import list_on_spark, listed_files

    fs = fsspec.filesystem("s3")
    keys = {f"src/img{i:04d}.jpg" for i in range(300)} | {f"src/d/{i}.png" for i in range(5)}
    fs.pipe({f"{s3_bucket[5:]}/{k}": b"xy" for k in keys})
    root = f"{s3_bucket}/src"
    info = list_on_spark(spark, [root], str(tmp_path / "listed"), 4, Paging(page_keys=10, split_pages=3))
    paths = [r["path"] for r in listed_files(spark, info, 4).select("path").collect()]
    assert sorted(paths) == sorted(f"{s3_bucket}/{k}" for k in keys)
    assert info["ranges"] >= 5
