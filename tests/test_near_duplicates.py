"""Near-duplicate groups by perceptual hash (``manifest/near_duplicates.py``).

Band keys (pure Python and numpy) against the pigeonhole property; the one-task search's numpy parts
(``near_pairs``, ``components_of``) against brute force and a union-find; on Spark, the band keys, the
candidate pairs and the connected components against brute force (all O(n²) hash pairs, a union-find), and
the groups' representative rule, null hashes, carried columns and independence from the input's
partitioning, for both the one-task search and the Spark one.
"""
from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TypeGuard

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgfeat.metadata.manifest import near_duplicates as nd
from imgfeat.metadata.manifest.near_duplicates import (
    band_join_size,
    band_key_rows,
    band_keys,
    band_layout,
    band_values,
    candidate_pairs,
    components_of,
    connected_components,
    near_duplicate_counts,
    near_duplicate_groups,
    near_duplicate_search,
    near_pairs,
)

INT64 = st.integers(-(1 << 63), (1 << 63) - 1)
MASK64 = (1 << 64) - 1
LOGGER = nd.__name__


def popcount(x: int, y: int) -> int:
    return ((x ^ y) & MASK64).bit_count()


def signed(u: int) -> int:
    return u - (1 << 64) if u >> 63 else u


def flip(h: int, bits: Iterable[int]) -> int:
    u = h & MASK64
    for b in bits:
        u ^= 1 << b
    return signed(u)


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, x: str, y: str) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            self.parent[max(rx, ry)] = min(rx, ry)

    def components(self) -> dict[str, str]:
        """Every node seen -> the smallest node of its component."""
        groups: dict[str, list[str]] = {}
        for x in list(self.parent):
            groups.setdefault(self.find(x), []).append(x)
        return {x: min(members) for members in groups.values() for x in members}


def uf_components(edges: Iterable[tuple[str | None, str | None]]) -> dict[str, str]:
    uf = UnionFind()
    for a, b in edges:
        if a is not None and b is not None and a != b:
            uf.union(a, b)
    return uf.components()


def searched(h: int | None) -> TypeGuard[int]:
    """The search's contract on one hash: present, with at least ``MIN_HASH_BITS`` bits set."""
    return h is not None and (h & MASK64).bit_count() >= nd.MIN_HASH_BITS


def expected_edges(rows: list[tuple[str, int | None]], d: int) -> set[tuple[str, str]]:
    """``candidate_pairs``' contract by brute force: a star per equal hash, then every pair of distinct
    hashes within ``d`` (all O(U²) of them) as an edge between their smallest ids; hashes that are not
    ``searched`` are in no edge."""
    reps: dict[int, str] = {}
    for i, h in rows:
        if searched(h):
            reps[h] = min(reps.get(h, i), i)
    edges = {(reps[h], i) for i, h in rows if searched(h) and i != reps[h]}
    hs = sorted(reps)
    for x in range(len(hs)):
        for y in range(x + 1, len(hs)):
            if popcount(hs[x], hs[y]) <= d:
                a, b = sorted((reps[hs[x]], reps[hs[y]]))
                edges.add((a, b))
    return edges


def expected_groups(rows: list[tuple[str, str, int | None]], d: int) -> dict[str, str]:
    """image_id -> representative's image_id for the non-representative members, by brute force (rows whose
    hash is not ``searched`` are in no group)."""
    hashed = [(i, p, h) for i, p, h in rows if searched(h)]
    uf = UnionFind()
    for i, _, _ in hashed:
        uf.find(i)
    for x in range(len(hashed)):
        for y in range(x + 1, len(hashed)):
            if popcount(hashed[x][2], hashed[y][2]) <= d:
                uf.union(hashed[x][0], hashed[y][0])
    comp = uf.components()
    members: dict[str, list[tuple[str, str]]] = {}
    for i, p, _ in hashed:
        members.setdefault(comp[i], []).append((p, i))
    out = {}
    for group in members.values():
        if len(group) > 1:
            rep = min(group)[1]
            out.update({i: rep for _, i in group if i != rep})
    return out


COMMON = 0x0F0F_0F0F_0F0F_0F0E
"""A hash with 31 bits set, as a photo's: ``random_hashes`` repeats it many times (a big equal-hash star)."""


def random_hashes(rng: random.Random, n: int, d: int) -> list[int]:
    """``n`` hashes: random ones (half with the sign bit set), near variants (<= d flips, some of bit 63),
    far variants sharing band 0, a common hash many times, a blank one (0: never searched) a few times and
    a repeated negative hash."""
    hs: list[int] = []
    width0 = band_layout(d)[0][1]
    while len(hs) < n:
        kind = rng.random()
        if not hs or kind < 0.35:
            hs.append(signed(rng.getrandbits(64)))
        elif kind < 0.6:
            bits = rng.sample(range(64), rng.randint(1, max(d, 1)))
            if rng.random() < 0.3:
                bits = list({*bits[1:], 63})
            hs.append(flip(rng.choice(hs), bits))
        elif kind < 0.7 and width0 < 64:  # agrees on band 0 but further than d
            hs.append(flip(rng.choice(hs), rng.sample(range(width0, 64), min(d + 1 + rng.randint(0, 2), 64 - width0))))
        elif kind < 0.8:
            hs.append(COMMON)
        elif kind < 0.85:
            hs.append(0)
        else:
            hs.append(-0x1234_5678_9ABC_DEF0)
    return hs


def rounds_logged(caplog: pytest.LogCaptureFixture) -> list[int]:
    out = []
    for rec in caplog.records:
        m = re.match(r"connected components: stars after (\d+) round", rec.getMessage())
        if rec.name == LOGGER and m:
            out.append(int(m.group(1)))
    return out


# ---- band keys: pure Python and numpy ----

@pytest.mark.parametrize("d", [0, 1, 2, 3, 7, 16, 63])
def test_band_layout_covers_64_bits(d: int) -> None:
    layout = band_layout(d)
    assert len(layout) == d + 1
    assert layout[0][0] == 0
    assert all(s2 == s1 + w1 for (s1, w1), (s2, _) in zip(layout, layout[1:]))
    assert sum(w for _, w in layout) == 64
    assert max(w for _, w in layout) - min(w for _, w in layout) <= 1


@pytest.mark.parametrize("bad", [-1, 64, 1.0, True])
def test_band_layout_rejects_bad_distances(bad: object) -> None:
    with pytest.raises(ValueError):
        band_layout(bad)  # type: ignore[arg-type]


def test_band_keys_values() -> None:
    assert band_keys(-1, 0) == [(0, -1)]  # one band: the signed int64 itself
    assert band_keys(MASK64, 0) == [(0, -1)]  # the same bits given unsigned
    assert band_keys(-1, 1) == [(0, 0xFFFF_FFFF), (1, 0xFFFF_FFFF)]
    assert band_keys(1 << 63, 1) == band_keys(-(1 << 63), 1) == [(0, 0), (1, 1 << 31)]
    assert band_keys(0x0123_4567_89AB_CDEF, 3) == [(0, 0xCDEF), (1, 0x89AB), (2, 0x4567), (3, 0x0123)]
    with pytest.raises(ValueError):
        band_keys(1 << 64, 1)


@settings(max_examples=400, deadline=None)
@given(h=INT64, d=st.integers(0, 16), data=st.data())
def test_pairs_within_distance_share_a_band(h: int, d: int, data: st.DataObject) -> None:
    bits = data.draw(st.sets(st.integers(0, 63), max_size=d))
    other = flip(h, bits)
    assert popcount(h, other) == len(bits) <= d
    assert set(band_keys(h, d)) & set(band_keys(other, d))


@settings(max_examples=50, deadline=None)
@given(hs=st.lists(INT64, min_size=1, max_size=20), d=st.integers(0, 20))
def test_band_values_match_band_keys(hs: list[int], d: int) -> None:
    want = [[v for _, v in band_keys(h, d)] for h in hs]
    arr = np.array(hs, np.int64)
    assert band_values(arr, d).tolist() == want
    assert band_values(arr.view(np.uint64), d).tolist() == want


# ---- Spark: band keys and candidate pairs ----

@pytest.mark.spark
def test_band_key_rows_match_python(spark) -> None:
    rng = random.Random(1)
    hs = [0, -1, 1, -(1 << 63), (1 << 63) - 1] + [signed(rng.getrandbits(64)) for _ in range(40)]
    df = spark.createDataFrame([(h,) for h in hs], "phash long")
    for d in (0, 1, 3, 16):
        got = {(r["phash"], r["band"], r["value"]) for r in band_key_rows(df, d).collect()}
        assert got == {(h, b, v) for h in hs for b, v in band_keys(h, d)}, d


@pytest.mark.spark
@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**32), d=st.integers(0, 6))
def test_candidate_pairs_keep_near_and_drop_far(spark, seed: int, d: int) -> None:
    rng = random.Random(seed)
    rows: list[tuple[str, int | None]] = []
    for k in range(12):
        h = signed(rng.getrandbits(64))
        near = flip(h, rng.sample(range(64), rng.randint(0, d)))
        width0 = band_layout(d)[0][1]
        far_bits = rng.sample(range(width0, 64) if width0 < 64 else range(64), min(d + rng.randint(1, 3), 64 - width0 or 64))
        rows += [(f"h{k}", h), (f"n{k}", near), (f"f{k}", flip(h, far_bits))]
    rows.append(("z", None))
    got = {(r["a"], r["b"]) for r in candidate_pairs(spark.createDataFrame(rows, "image_id string, phash long"), d).collect()}
    assert got == expected_edges(rows, d)
    hashes = dict(rows)
    assert all(popcount(hashes[a], hashes[b]) <= d for a, b in got)  # type: ignore[arg-type]


@pytest.mark.spark
@pytest.mark.parametrize("d", [0, 3])
def test_candidate_pairs_equal_brute_force(spark, d: int) -> None:
    rng = random.Random(7 + d)
    hs = random_hashes(rng, 300, d)
    ids = [f"{rng.getrandbits(40):010x}" for _ in hs]
    rows: list[tuple[str, int | None]] = list(zip(ids, hs)) + [("nohash-a", None), ("nohash-b", None)]
    assert sum(h == COMMON for h in hs) > 20 and 0 in hs and any(h < 0 for h in hs)
    got_rows = candidate_pairs(spark.createDataFrame(rows, "image_id string, phash long"), d).collect()
    got = [(r["a"], r["b"]) for r in got_rows]
    assert len(got) == len(set(got)), "each pair once"
    assert all(a < b for a, b in got)
    want = expected_edges(rows, d)
    assert set(got) == want
    # The equal-hash stars: n - 1 edges per hash, not n² pairs.
    kept = [h for h in hs if searched(h)]
    assert sum(1 for a, b in got if dict(rows)[a] == dict(rows)[b]) == len(kept) - len(set(kept))
    # Same groups as all O(n²) row pairs within d.
    all_pairs = [(ids[x], ids[y]) for x in range(len(hs)) for y in range(x + 1, len(hs))
                 if searched(hs[x]) and searched(hs[y]) and popcount(hs[x], hs[y]) <= d]
    assert uf_components(got) == uf_components(all_pairs)


@pytest.mark.spark
def test_candidate_pairs_guard_raises_before_a_huge_join(spark) -> None:
    # 64 distinct hashes, COMMON with one bit flipped: those whose bit is in another band share its value.
    rows = [(f"i{k}", flip(COMMON, [k])) for k in range(64)]
    df = spark.createDataFrame(rows, "image_id string, phash long")
    with pytest.raises(ValueError, match="max_candidates=100"):
        candidate_pairs(df, 1, max_candidates=100)
    candidate_pairs(df, 2, max_candidates=10_000)  # 2,667 candidates: under the limit, no error


# ---- Spark: connected components ----

def graph_cases(rng: random.Random) -> tuple[list[tuple[str | None, str | None]], list[str]]:
    """Edges of several graphs with disjoint ids, and isolated ids that are in no edge."""
    edges: list[tuple[str | None, str | None]] = []
    chain = [f"c{rng.getrandbits(32):08x}" for _ in range(50)]  # a chain in random id order
    edges += list(zip(chain, chain[1:]))
    sorted_chain = [f"s{i:03d}" for i in range(50)]  # a chain in id order, given backwards
    edges += [(b, a) for a, b in zip(sorted_chain, sorted_chain[1:])]
    edges += [("t5", f"t{k}") for k in range(10) if k != 5]  # a star whose center is not the smallest
    for k in range(40):  # many small components: pairs and triangles
        if k % 3:
            edges.append((f"p{k}a", f"p{k}b"))
        else:
            edges += [(f"p{k}a", f"p{k}b"), (f"p{k}b", f"p{k}c"), (f"p{k}c", f"p{k}a")]
    nodes = [f"g{rng.getrandbits(24):06x}" for _ in range(80)]  # a random graph: trees, cycles, a bigger component
    edges += [(rng.choice(nodes), rng.choice(nodes)) for _ in range(70)]
    edges += [edges[0], edges[0][::-1], ("loop", "loop"), ("n1", None), (None, None)]  # repeats, a self-loop, nulls
    rng.shuffle(edges)
    return edges, ["loop", "n1", "lonely"]


@pytest.mark.spark
def test_connected_components_equal_union_find(spark, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    edges, isolated = graph_cases(random.Random(3))
    df = spark.createDataFrame(edges, "a string, b string")
    got_rows = connected_components(spark, df, one_task_edges=0).collect()
    got = {r["id"]: r["component"] for r in got_rows}
    assert len(got) == len(got_rows), "one row per node"
    assert got == uf_components(edges)
    one_task = connected_components(spark, df).collect()  # the small-input path: a union-find in one task
    assert len(one_task) == len(got_rows) and {r["id"]: r["component"] for r in one_task} == got
    assert not set(isolated) & set(got), "isolated nodes, self-loops and null ends have no row"
    (rounds,) = rounds_logged(caplog)
    assert 1 <= rounds <= 10, rounds  # chains of 50: about log2(50)


@pytest.mark.spark
def test_connected_components_already_stars_and_empty(spark, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    star = [("a", f"x{k}") for k in range(20)] + [("b", "c")]
    frame = spark.createDataFrame(star, "a string, b string")
    got = {r["id"]: r["component"] for r in connected_components(spark, frame, one_task_edges=0).collect()}
    assert got == uf_components(star)
    assert connected_components(spark, spark.createDataFrame([], "a string, b string"), one_task_edges=-1).count() == 0
    assert rounds_logged(caplog) == [0, 0]


@pytest.mark.spark
def test_connected_components_raises_naming_max_iterations(spark) -> None:
    chain = [(f"k{i:02d}", f"k{i + 1:02d}") for i in range(20)]
    with pytest.raises(RuntimeError, match="max_iterations=1"):
        connected_components(spark, spark.createDataFrame(chain, "a string, b string"), max_iterations=1,
                             one_task_edges=0)


# ---- Spark: groups ----

@pytest.mark.spark
def test_near_duplicate_groups_representative_and_nulls(spark, tmp_path: Path) -> None:
    base = 0x0F0F_0F0F_0F0F_0F0F
    rows = [
        ("id-a", "/z/last.jpg", base),
        ("id-z", "/a/first.jpg", flip(base, [0, 1])),  # smallest path: the representative, though not the smallest id
        ("id-m", "/m/mid.jpg", flip(base, [0, 1, 2, 3])),  # 4 bits from base, 2 from id-z: joined through it
        ("id-b", "/b/same1.png", 0x3333_3333_3333_3332),  # equal hashes: one group at any distance
        ("id-c", "/b/same0.png", 0x3333_3333_3333_3332),
        ("id-e", "/b/blank1.png", 0),  # a flat image's hash (no bit set): never searched, even when equal
        ("id-f", "/b/blank0.png", 0),
        ("id-g", "/b/gradient.png", 0x54),  # a few bits from the blank ones: no group either
        ("id-y", "/y/alone.jpg", -1),  # far from everything: no group
        ("id-0", "/0/nohash.jpg", None),  # never in a group, even with a path that sorts first
        ("id-1", "/0/nohash2.jpg", None),
        ("id-s", "/s/sign.jpg", flip(-0x0123_4567_89AB_CDEF, [63])),  # the sign bit flipped: one bit from id-t
        ("id-t", "/t/sign.jpg", -0x0123_4567_89AB_CDEF),
    ]
    df = spark.createDataFrame(rows, "image_id string, path string, phash long")
    for one_task, parts in ((nd.ONE_TASK_HASHES, ["hashes", "tagged"]), (0, ["cc", "hashes", "tagged"])):
        scratch = tmp_path / f"scratch-{one_task}"
        groups = near_duplicate_groups(spark, df, 2, str(scratch), one_task_hashes=one_task)  # parts as Parquet
        got = {r["image_id"]: r["near_duplicate_of"] for r in groups.collect()}
        assert got == {"id-a": "id-z", "id-m": "id-z", "id-b": "id-c", "id-t": "id-s"}, one_task
        assert got == expected_groups(rows, 2)
        assert near_duplicate_counts(groups) == {"groups": 3, "duplicates": 4, "members": 7}
        kept = sorted(p.name.split("-")[0] for p in scratch.iterdir())
        assert kept == parts, "of the components' rounds only the last one's edges stay"
        exact = {r["image_id"]: r["near_duplicate_of"]
                 for r in near_duplicate_groups(spark, df, 0, one_task_hashes=one_task).collect()}
        assert exact == {"id-b": "id-c"}


@pytest.mark.spark
def test_near_duplicate_groups_match_brute_force_for_any_partitioning(spark) -> None:
    rng = random.Random(11)
    d = 3
    hs: list[int | None] = list(random_hashes(rng, 160, d)) + [None] * 5
    rows = [(f"{rng.getrandbits(40):010x}", f"/img/{rng.getrandbits(24):06x}-{k}.jpg", h) for k, h in enumerate(hs)]
    want = expected_groups(rows, d)
    assert len(set(want.values())) >= 5
    df = spark.createDataFrame(rows, "image_id string, path string, phash long")
    for n_part in (1, 7):
        for one_task in (nd.ONE_TASK_HASHES, 0):  # the one-task search and the Spark one
            got_rows = near_duplicate_groups(spark, df.repartition(n_part), d, one_task_hashes=one_task).collect()
            got = {r["image_id"]: r["near_duplicate_of"] for r in got_rows}
            assert len(got) == len(got_rows)
            assert got == want, (n_part, one_task)


# ---- the one-task search: numpy, no Spark ----

def brute_pairs(hs: list[int], d: int) -> set[tuple[int, int]]:
    return {(i, j) for i in range(len(hs)) for j in range(i + 1, len(hs)) if popcount(hs[i], hs[j]) <= d}


@pytest.mark.parametrize("d", [0, 1, 2, 4, 7, 16])
def test_near_pairs_equal_brute_force(d: int) -> None:
    rng = random.Random(20 + d)
    hs = sorted(set(random_hashes(rng, 400, d)), key=lambda _: rng.random())  # distinct, in random order
    a, b = near_pairs(np.array(hs, np.int64), d)
    got = [(min(x, y), max(x, y)) for x, y in zip(a.tolist(), b.tolist())]
    assert len(got) == len(set(got)), "each pair once"
    assert set(got) == brute_pairs(hs, d)
    a2, b2 = near_pairs(np.array(hs, np.int64).view(np.uint64), d)  # the same bits as uint64
    assert sorted(zip(a2.tolist(), b2.tolist())) == sorted(zip(a.tolist(), b.tolist()))


def test_near_pairs_big_buckets_and_edge_cases() -> None:
    # 64 hashes that share every band but one bit each: one bucket per band holds all of them.
    hs = [flip(0, [k]) for k in range(64)] + [0]
    for d in (1, 2, 3):
        a, b = near_pairs(np.array(hs, np.int64), d)
        assert {(min(x, y), max(x, y)) for x, y in zip(a.tolist(), b.tolist())} == brute_pairs(hs, d)
    for arr in (np.zeros(0, np.int64), np.array([5], np.int64)):
        a, b = near_pairs(arr, 3)
        assert a.size == b.size == 0


def test_popcount_fallback_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    x = rng.integers(0, 2**63, 1000, dtype=np.int64).view(np.uint64) * np.uint64(3)
    want = [bin(int(v)).count("1") for v in x]
    assert nd._popcount(x).tolist() == want
    monkeypatch.delattr(np, "bitwise_count", raising=False)  # numpy < 2 has none
    assert nd._popcount(x).tolist() == want


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), data=st.data())
def test_components_of_equal_union_find(n: int, data: st.DataObject) -> None:
    edges = data.draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)), max_size=3 * n))
    a = np.array([e[0] for e in edges], np.int64)
    b = np.array([e[1] for e in edges], np.int64)
    got = components_of(n, a, b)
    uf = UnionFind()
    for x in range(n):
        uf.find(f"{x:03d}")
    for x, y in edges:
        uf.union(f"{x:03d}", f"{y:03d}")
    want = uf.components()
    assert got.tolist() == [int(want[f"{x:03d}"]) for x in range(n)]


def test_components_of_long_chains() -> None:
    rng = random.Random(5)
    for ids in (list(range(3000)), list(range(3000))[::-1], rng.sample(range(3000), 3000)):
        a, b = np.array(ids[:-1]), np.array(ids[1:])
        assert (components_of(3000, a, b) == 0).all()


@pytest.mark.spark
def test_near_duplicate_groups_carry_columns(spark) -> None:
    rng = random.Random(12)
    d = 3
    hs: list[int | None] = list(random_hashes(rng, 120, d)) + [None] * 3
    rows = [(f"{rng.getrandbits(40):010x}", f"/img/{rng.getrandbits(24):06x}-{k}.jpg", h, f"c{k:04d}", k)
            for k, h in enumerate(hs)]
    by_id = {r[0]: r for r in rows}
    want = expected_groups([r[:3] for r in rows], d)
    df = spark.createDataFrame(rows, "image_id string, path string, phash long, content_hash string, k long")
    for one_task in (nd.ONE_TASK_HASHES, 0):
        got = near_duplicate_groups(spark, df, d, one_task_hashes=one_task, carry=("path", "content_hash", "k"))
        assert got.columns == ["image_id", "near_duplicate_of", "path", "content_hash", "k", "rep_path",
                               "rep_content_hash", "rep_k"]
        out = got.collect()
        assert {r["image_id"]: r["near_duplicate_of"] for r in out} == want, one_task
        for r in out:
            member, rep = by_id[r["image_id"]], by_id[r["near_duplicate_of"]]
            assert (r["path"], r["content_hash"], r["k"]) == (member[1], member[3], member[4])
            assert (r["rep_path"], r["rep_content_hash"], r["rep_k"]) == (rep[1], rep[3], rep[4])


@pytest.mark.spark
def test_near_duplicate_groups_without_the_broadcast(spark, monkeypatch: pytest.MonkeyPatch) -> None:
    """A per-hash map over ``BROADCAST_ROWS`` is joined with a shuffle: the same groups."""
    rng = random.Random(13)
    rows: list[tuple[str, str, int | None]] = [
        (f"{rng.getrandbits(40):010x}", f"/img/{k:04d}.jpg", h) for k, h in enumerate(random_hashes(rng, 80, 2))]
    df = spark.createDataFrame(rows, "image_id string, path string, phash long")
    monkeypatch.setattr(nd, "BROADCAST_ROWS", 0)
    got = {r["image_id"]: r["near_duplicate_of"] for r in near_duplicate_groups(spark, df, 2).collect()}
    assert got == expected_groups(rows, 2) and got


@pytest.mark.spark
def test_near_duplicate_search_fits_the_distance_and_counts_its_materialized_groups(spark, tmp_path: Path) -> None:
    """``near_duplicate_search``: the groups of ``near_duplicate_groups`` at the largest distance whose band
    join fits ``max_pairs`` (counted in the one task or by Spark), with ``near_duplicate_counts``' numbers."""
    rng = random.Random(14)
    hs: list[int | None] = list(random_hashes(rng, 150, 4)) + [None] * 4
    rows = [(f"{rng.getrandbits(40):010x}", f"/img/{rng.getrandbits(24):06x}-{k}.jpg", h, f"c{k:04d}")
            for k, h in enumerate(hs)]
    by_id = {r[0]: r for r in rows}
    df = spark.createDataFrame(rows, "image_id string, path string, phash long, content_hash string")
    distinct = np.array(sorted({h for h in hs if searched(h)}), np.int64)
    pairs = {d: band_join_size(distinct, d) for d in range(5)}
    assert pairs[4] > pairs[3] > pairs[2]
    for one_task in (nd.ONE_TASK_HASHES, 0):
        for max_pairs, want_d in ((None, 4), (pairs[4], 4), (pairs[4] - 1, 3), (pairs[2], 2)):
            scratch = tmp_path / f"s-{one_task}-{max_pairs}"
            found = near_duplicate_search(spark, df, 4, str(scratch), max_pairs=max_pairs, one_task_hashes=one_task,
                                          carry=("path", "content_hash"))
            assert found.distance == want_d, (one_task, max_pairs)
            assert found.candidate_pairs == (None if max_pairs is None else pairs[want_d])
            out = found.groups.collect()
            assert {r["image_id"]: r["near_duplicate_of"] for r in out} == expected_groups([r[:3] for r in rows], want_d)
            for r in out:
                assert (r["path"], r["content_hash"]) == by_id[r["image_id"]][1::2]
                assert (r["rep_path"], r["rep_content_hash"]) == by_id[r["near_duplicate_of"]][1::2]
            assert found.counts == near_duplicate_counts(found.groups) and found.counts["groups"] >= 3
            assert any(p.name.startswith("groups-") for p in scratch.iterdir())
    for one_task in (nd.ONE_TASK_HASHES, 0):  # nothing to group, and the guard of max_candidates
        empty = near_duplicate_search(spark, df.limit(1), 4, max_pairs=0, one_task_hashes=one_task)
        assert (empty.distance, empty.candidate_pairs, empty.counts, empty.groups.count()) == (
            4, 0, {"groups": 0, "duplicates": 0, "members": 0}, 0)
        with pytest.raises(ValueError, match=f"max_candidates={pairs[3] - 1}"):
            near_duplicate_groups(spark, df, 3, max_candidates=pairs[3] - 1, one_task_hashes=one_task)


# ---- the Arrow search, for a task that holds the rows (the manifest's one-task organize) ----

def test_near_duplicate_search_table_equals_brute_force_and_fits_the_distance() -> None:
    """``near_duplicate_search_table``: no Spark, the same groups, carried columns, fitted distance and counts
    as ``near_duplicate_search`` promises (brute force), nulls never grouped."""
    rng = random.Random(15)
    hs: list[int | None] = list(random_hashes(rng, 150, 4)) + [None] * 4
    rows = [(f"{rng.getrandbits(40):010x}", f"/img/{rng.getrandbits(24):06x}-{k}.jpg", h, f"c{k:04d}")
            for k, h in enumerate(hs)]
    by_id = {r[0]: r for r in rows}
    table = pa.table({"image_id": [r[0] for r in rows], "path": [r[1] for r in rows],
                      "phash": pa.array([r[2] for r in rows], pa.int64()), "content_hash": [r[3] for r in rows]})
    distinct = np.array(sorted({h for h in hs if searched(h)}), np.int64)
    pairs = {d: band_join_size(distinct, d) for d in range(5)}
    for max_pairs, want_d in ((None, 4), (pairs[4], 4), (pairs[4] - 1, 3), (pairs[2], 2)):
        found = nd.near_duplicate_search_table(table.take(np.random.default_rng(want_d).permutation(len(rows))), 4,
                                               max_pairs=max_pairs, carry=("path", "content_hash"))
        assert (found.distance, found.candidate_pairs) == (want_d, None if max_pairs is None else pairs[want_d])
        out = found.groups.to_pylist()
        want = expected_groups([r[:3] for r in rows], want_d)
        assert {r["image_id"]: r["near_duplicate_of"] for r in out} == want and len(out) == len(want)
        for r in out:
            assert (r["path"], r["content_hash"]) == by_id[r["image_id"]][1::2]
            assert (r["rep_path"], r["rep_content_hash"]) == by_id[r["near_duplicate_of"]][1::2]
        reps = set(want.values())
        assert found.counts == {"groups": len(reps), "duplicates": len(want), "members": len(want) + len(reps)}
    empty = nd.near_duplicate_search_table(table.slice(0, 1), 4, max_pairs=0, carry=("path",))
    assert (empty.distance, empty.candidate_pairs, empty.counts, empty.groups.num_rows) == (
        4, 0, {"groups": 0, "duplicates": 0, "members": 0}, 0)
    assert empty.groups.column_names == ["image_id", "near_duplicate_of", "path", "rep_path"]


@pytest.mark.spark
def test_near_duplicate_search_table_equals_the_spark_search(spark, tmp_path: Path) -> None:
    rng = random.Random(16)
    hs: list[int | None] = list(random_hashes(rng, 200, 3)) + [None] * 3
    rows = [(f"{rng.getrandbits(40):010x}", f"/img/{rng.getrandbits(8):02x}/{k}.jpg", h, f"c{k:04d}")
            for k, h in enumerate(hs)]
    schema = "image_id string, path string, phash long, content_hash string"
    df = spark.createDataFrame(rows, schema)
    table = pa.Table.from_pylist([dict(zip(("image_id", "path", "phash", "content_hash"), r)) for r in rows],
                                 schema=pa.schema([("image_id", pa.string()), ("path", pa.string()),
                                                   ("phash", pa.int64()), ("content_hash", pa.string())]))
    for one_task in (nd.ONE_TASK_HASHES, 0):
        spark_found = near_duplicate_search(spark, df, 3, str(tmp_path / f"s{one_task}"), max_pairs=10**6,
                                            one_task_hashes=one_task, carry=("path", "content_hash"))
        found = nd.near_duplicate_search_table(table, 3, max_pairs=10**6, carry=("path", "content_hash"))
        key = lambda r: r["image_id"]  # noqa: E731
        assert sorted(found.groups.to_pylist(), key=key) == sorted((r.asDict() for r in spark_found.groups.collect()),
                                                                   key=key)
        assert (found.distance, found.candidate_pairs, found.counts) == (
            spark_found.distance, spark_found.candidate_pairs, spark_found.counts)
