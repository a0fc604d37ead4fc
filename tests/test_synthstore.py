"""The synthetic object store of bench/synthstore.py: keys, S3 paging, request counts (no Spark, seconds)."""
from __future__ import annotations

import io
import math
import multiprocessing as mp
import os
import struct
import tracemalloc
import zlib

import fsspec
import pytest

from bench import synthstore
from bench.synthstore import key_at, parse_bucket, read_counts, synth_url


def _fs(url: str):
    return fsspec.core.url_to_fs(url)


@pytest.fixture(autouse=True)
def _fresh_counts(monkeypatch):
    monkeypatch.delenv(synthstore.COUNTS_ENV, raising=False)
    synthstore.flush_counts()  # drop what earlier tests left pending
    synthstore.reset_counts()


def _delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in ("list", "head", "get", "keys", "prefixes")}


def test_url_parameters_and_layout():
    url = synth_url(n=2345, fanout=7, depth=2, seed=3)
    assert url == "synth://n=2345,fanout=7,depth=2,seed=3/"
    layout = parse_bucket("n=10M,fanout=100,depth=2,seed=1")
    assert (layout.n, layout.leaves, layout.ext) == (10_000_000, 10_000, "jpg")
    assert layout.key(0) == "d00/d00/img0000000.jpg" and layout.key(9_999_999) == "d99/d99/img9999999.jpg"
    assert parse_bucket("n=1k,flat=1").depth == 0 and parse_bucket("n=5,images=1").ext == "png"
    with pytest.raises(ValueError, match="bad bucket parameter"):
        parse_bucket("n=10,colour=red")
    with pytest.raises(ValueError):
        synth_url(n=10, page=5000)


def test_keys_sort_as_indices_and_parse_back():
    for bucket in ("n=2345,fanout=7,depth=2", "n=10,fanout=5,depth=2", "n=1001,flat=1", "n=99,fanout=3,depth=3"):
        layout = parse_bucket(bucket)
        keys = [layout.key(i) for i in range(layout.n)]
        assert keys == sorted(keys) and len(set(keys)) == layout.n
        assert [layout.parse(k) for k in keys] == list(range(layout.n))
        assert layout.parse("nope.jpg") is None and layout.parse(keys[-1] + "x") is None


def test_deterministic_across_instances_and_seeds():
    a = _fs(synth_url(n=5000, fanout=10, depth=1, seed=1))
    first = a[0].find(a[1], detail=True)
    again = a[0].find(a[1], detail=True)
    assert first == again
    sizes = [e["size"] for e in first.values()]
    assert min(sizes) >= 1024 and max(sizes) <= 200 * 1024 and len(set(sizes)) > 4000
    b = _fs(synth_url(n=5000, fanout=10, depth=1, seed=2))
    other = b[0].find(b[1], detail=True)
    assert [k.split("/", 1)[1] for k in other] == [k.split("/", 1)[1] for k in first]  # same names
    assert [e["size"] for e in other.values()] != sizes  # other sizes
    name = next(iter(first))
    fs = a[0]
    data = fs.cat_file(name)
    assert data == fs.cat_file(name) and len(data) == first[name]["size"] == fs.info(name)["size"]
    assert data != fs.cat_file(list(first)[1])[: len(data)]
    assert fs.cat_file(name, 10, 20) == data[10:20]
    with fs.open(name, "rb") as fh:
        assert fh.read() == data


def test_ls_pages_like_list_objects_v2():
    url = synth_url(n=25_000, fanout=10, depth=1)  # 10 folders of 2,500 keys
    fs, root = _fs(url)
    before = synthstore.counts()
    top = fs.ls(root, detail=True)
    assert [e["type"] for e in top] == ["directory"] * 10
    assert _delta(before, synthstore.counts()) == {"list": 1, "head": 0, "get": 0, "keys": 0, "prefixes": 10}
    before = synthstore.counts()
    files = fs.ls(root + "/d3", detail=False)
    assert len(files) == 2500 and files == sorted(files)
    assert files[0] == key_at(url, 7500) and files[-1] == key_at(url, 9999)
    assert _delta(before, synthstore.counts())["list"] == 3  # 1,000 + 1,000 + 500
    before = synthstore.counts()
    assert len(fs.ls(synth_url(n=2000, flat=1), detail=False)) == 2000
    assert _delta(before, synthstore.counts())["list"] == 2  # exactly 2,000: two full pages, the second not truncated
    with pytest.raises(FileNotFoundError):
        fs.ls(root + "/d10")
    assert fs.ls(files[0]) == [fs.info(files[0])]  # s3fs: ls of a key lists that key


def test_pages_count_prefixes_and_keys_together():
    fs, root = _fs(synth_url(n=3000, fanout=2500, depth=1))  # 2,500 folders of 1 or 2 keys
    before = synthstore.counts()
    assert len(fs.ls(root)) == 2500
    assert _delta(before, synthstore.counts()) == {"list": 3, "head": 0, "get": 0, "keys": 0, "prefixes": 2500}


def test_find_covers_every_key_once():
    for url in (synth_url(n=2345, fanout=7, depth=2, page=100), synth_url(n=10, fanout=5, depth=2),
                synth_url(n=3456, flat=1)):
        fs, root = _fs(url)
        layout = parse_bucket(root)
        expected = [key_at(url, i) for i in range(layout.n)]
        before = synthstore.counts()
        found = fs.find(root)
        assert found == expected
        assert _delta(before, synthstore.counts()) == {"list": math.ceil(layout.n / layout.page), "head": 0, "get": 0,
                                                       "keys": layout.n, "prefixes": 0}
        # a walk through ls (folders that hold no key do not exist) gives the same keys
        assert fs.find(root, maxdepth=10) == expected
        sub = expected[-1].rsplit("/", 1)[0]
        assert fs.find(sub) == [k for k in expected if k.startswith(sub + "/")]
    fs, root = _fs(synth_url(n=10, fanout=5, depth=2))
    with_dirs = fs.find(root, withdirs=True)
    assert root + "/d0" in with_dirs and root + "/d0/d0" in with_dirs and root + "/d4" not in with_dirs


def test_info_isdir_exists():
    url = synth_url(n=10, fanout=5, depth=2)  # 25 leaves: only the first 10 hold a key
    fs, root = _fs(url)
    assert fs.isdir(root) and fs.isdir(root + "/d1") and fs.isdir(root + "/d1/d4")
    assert not fs.isdir(root + "/d2") and not fs.exists(root + "/d2/d0") and not fs.exists(root + "/d0/d0/x.jpg")
    assert fs.info(root + "/d0")["type"] == "directory"
    key = key_at(url, 3)
    assert fs.info(key)["type"] == "file" and fs.isfile(key) and not fs.isdir(key)
    before = synthstore.counts()
    fs.info(root + "/d0")
    assert _delta(before, synthstore.counts()) == {"list": 1, "head": 1, "get": 0, "keys": 1, "prefixes": 0}
    with pytest.raises(FileNotFoundError):
        fs.cat_file(root + "/d0/d0/img99.jpg")


def test_ls_range_splits_a_key_range():
    url = synth_url(n=5000, fanout=10, depth=1)
    fs, root = _fs(url)
    before = synthstore.counts()
    page = fs.ls_range(url, max_keys=1000)
    assert len(page.entries) == 1000 and page.truncated and _delta(before, synthstore.counts())["list"] == 1
    # start_after: resume after any name, as S3's StartAfter
    after = fs.ls_range(root + "/", start_after=page.entries[-1]["name"], max_keys=300)
    assert [e["name"] for e in after.entries] == [key_at(url, i) for i in range(1000, 1300)]
    # a prefix need not be a folder; the last page is not truncated
    part = fs.ls_range(root + "/d4/img20", max_keys=1000)
    assert [e["name"] for e in part.entries] == [key_at(url, i) for i in range(2000, 2100)] and not part.truncated
    # continuation token, with a delimiter: prefixes and keys share the page
    names, token = [], None
    while True:
        p = fs.ls_range(root + "/", delimiter="/", max_keys=3, token=token)
        names += [e["name"] for e in p.entries]
        if not p.truncated:
            break
        token = p.token
    assert names == [f"{root}/d{i}" for i in range(10)]
    assert [e["name"] for e in fs.ls_range(root + "/", delimiter="/", start_after=key_at(url, 1234)).entries] == \
        [f"{root}/d{i}" for i in range(2, 10)]
    # tasks that each take a boundary of their own cover every key once
    bounds = [None] + [key_at(url, i) for i in (1499, 2999, 4199)] + [None]
    got = []
    for lo, hi in zip(bounds, bounds[1:]):
        start = lo
        while True:
            p = fs.ls_range(root + "/", start_after=start)
            keep = [e["name"] for e in p.entries if hi is None or e["name"] <= hi]
            got += keep
            if not p.truncated or len(keep) < len(p.entries):
                break
            start = p.entries[-1]["name"]
    assert got == [key_at(url, i) for i in range(5000)]


def test_images_are_valid_pngs_of_the_stated_size():
    fs, root = _fs(synth_url(n=20, flat=1, images=True, maxkb=3))
    for name, info in list(fs.find(root, detail=True).items())[:5]:
        data = fs.cat_file(name)
        assert name.endswith(".png") and len(data) == info["size"] and data[:8] == b"\x89PNG\r\n\x1a\n"
        pos, tags = 8, []
        while pos < len(data):
            (length,) = struct.unpack(">I", data[pos:pos + 4])
            tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
            assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(tag + body)
            tags.append(tag)
            pos += 12 + length
        assert pos == len(data) and tags == [b"IHDR", b"IDAT", b"syNt", b"IEND"]
        try:
            from PIL import Image
        except ImportError:
            continue
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (8, 8) and im.convert("RGB").getpixel((3, 3)) == im.convert("RGB").getpixel((0, 0))


def _child_lists(url: str, folder: str) -> None:
    from bench import synthstore as store  # registers synth:// in the child

    fs, root = fsspec.core.url_to_fs(url)
    fs.find(root)  # 3 LIST, 2,500 keys
    fs.cat_file(fs.ls(root + "/d0", detail=False)[0])  # 1 LIST (folder of 250), 1 GET
    assert os.environ[store.COUNTS_ENV] == folder


def test_counts_add_up_across_processes(tmp_path, monkeypatch):
    folder = str(tmp_path / "counts")
    monkeypatch.setenv(synthstore.COUNTS_ENV, folder)
    url = synth_url(n=2500, fanout=10, depth=1)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_child_lists, args=(url, folder)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    total = read_counts(folder)
    assert total["processes"] == 2 and len(os.listdir(folder)) == 2
    assert (total["list"], total["get"], total["keys"]) == (2 * 4, 2, 2 * 2750)
    assert total["max_call_keys"] == 2500
    fs, root = _fs(url)  # this process adds its own line
    fs.ls(root)
    assert read_counts(folder)["list"] == 9 and read_counts(folder)["processes"] == 3
    assert read_counts(str(tmp_path / "none"))["list"] == 0


def test_memory_stays_small_at_ten_million_keys():
    url = synth_url(n=10_000_000, fanout=100, depth=2, seed=1)
    fs, root = _fs(url)
    tracemalloc.start()
    try:
        folder = fs.ls(root + "/d42/d17", detail=True)
        top = fs.ls(root)
        assert fs.isdir(root + "/d99/d99") and fs.info(key_at(url, 9_999_999))["type"] == "file"
        pages = 0
        start = None
        while pages < 5:  # stream a flat range of the 10M keys, a page at a time
            page = fs.ls_range(url, start_after=start)
            start, pages = page.entries[-1]["name"], pages + 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(folder) == 1000 and folder[0]["name"] == key_at(url, 4217 * 1000) and len(top) == 100
    assert start == key_at(url, 4999)
    assert peak < 8 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_ls_cache_and_empty_bucket():
    fs, root = _fs(synth_url(n=3000, fanout=2, depth=1, cache=1))
    before = synthstore.counts()
    first = fs.ls(root + "/d0")
    assert fs.ls(root + "/d0") == first and fs.isdir(root + "/d0")
    assert _delta(before, synthstore.counts())["list"] == 2  # cached: the second ls and isdir cost nothing
    assert len(fs.ls(root + "/d0", refresh=True)) == 1500 and _delta(before, synthstore.counts())["list"] == 4
    empty, bucket = _fs(synth_url(n=0))
    assert empty.ls(bucket) == [] and empty.find(bucket) == [] and empty.isdir(bucket) and not empty.exists(bucket + "/d00")
