"""The tile engine's Java functions (streaming/java/sluice), run in Flink's SQL runtime.

sluice_json_fields decides which records the SQL side reads and which go to Python's parser
(a null row), and what text each field's cast sees; sluice_event_id decides which records
are one event deduplicated. Both are checked here on records chosen for the edge cases.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.flink]

RECORDS = [
    b'{"a": 1, "b": "x\\u00e9", "c": {"z": [1]}, "d": null, "a": 2.50}',  # repeated a: last
    b'{"b": true, "c": [1, {"y": 2}], "a": "7"}',
    b"[1, 2]",  # JSON, not an object
    b'{"a": 1} trailing',
    b'{"a": 1',
    b"not json",
    b"",
    b'{"a": 1e400, "b": -0.0}',
]


@pytest.fixture(scope="module")
def t_env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from pyflink.table import EnvironmentSettings, TableEnvironment

    from streaming.udf import FUNCTIONS, udf_jar

    env = TableEnvironment.create(EnvironmentSettings.in_batch_mode())
    jar = udf_jar(Path(tmp_path_factory.mktemp("udf")))
    env.get_config().set("pipeline.jars", jar.resolve().as_uri())
    for function, java_class in FUNCTIONS.items():
        env.create_java_temporary_system_function(function, java_class)
    return env


def query(t_env: Any, records: list[bytes], select: str) -> list[tuple[Any, ...]]:
    from pyflink.table import DataTypes

    rows = [(i, bytearray(r)) for i, r in enumerate(records)]
    schema = DataTypes.ROW(
        [DataTypes.FIELD("i", DataTypes.INT()), DataTypes.FIELD("v", DataTypes.BYTES())]
    )
    t_env.create_temporary_view("records", t_env.from_elements(rows, schema))
    try:
        with t_env.execute_sql(f"SELECT i, {select} FROM records").collect() as result:
            found = sorted(tuple(row) for row in result)
    finally:
        t_env.drop_temporary_view("records")
    return [row[1:] for row in found]


def test_json_fields_reads_top_level_text_and_nulls_what_sql_cannot_read(t_env: Any) -> None:
    f = "sluice_json_fields(v, 'a,b,c,d,e')"
    got = query(
        t_env,
        RECORDS,
        f"{f}.a, {f}.b, {f}.c, {f}.d, {f}.e, {f} IS NULL, TRY_CAST({f}.a AS DOUBLE)",
    )
    assert got[0] == ("2.50", "xé", None, None, None, False, 2.5)
    assert got[1] == ("7", "true", None, None, None, False, 7.0)
    for row in got[2:7]:  # not an object, trailing text, cut short, not JSON, empty
        assert row == (None, None, None, None, None, True, None)
    assert got[7][:2] == ("1e400", "-0.0")


_M = (1 << 64) - 1


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M


def _fmix(k: int) -> int:
    k ^= k >> 33
    k = (k * 0xFF51AFD7ED558CCD) & _M
    k ^= k >> 33
    k = (k * 0xC4CEB53CA87EC2B9) & _M
    return k ^ (k >> 33)


def murmur3_x64_128(data: bytes) -> bytes:
    """MurmurHash3_x64_128 with seed 0 (Austin Appleby's reference), h1 then h2 little-endian."""
    c1, c2 = 0x87C37B91114253D5, 0x4CF5AD432745937F
    h1 = h2 = 0
    blocks = len(data) // 16
    for i in range(blocks):
        k1 = int.from_bytes(data[i * 16 : i * 16 + 8], "little")
        k2 = int.from_bytes(data[i * 16 + 8 : i * 16 + 16], "little")
        h1 ^= (_rotl((k1 * c1) & _M, 31) * c2) & _M
        h1 = (((_rotl(h1, 27) + h2) & _M) * 5 + 0x52DCE729) & _M
        h2 ^= (_rotl((k2 * c2) & _M, 33) * c1) & _M
        h2 = (((_rotl(h2, 31) + h1) & _M) * 5 + 0x38495AB5) & _M
    tail = data[blocks * 16 :]
    if len(tail) > 8:
        h2 ^= (_rotl((int.from_bytes(tail[8:], "little") * c2) & _M, 33) * c1) & _M
    if tail:
        h1 ^= (_rotl((int.from_bytes(tail[:8], "little") * c1) & _M, 31) * c2) & _M
    h1 ^= len(data)
    h2 ^= len(data)
    h1 = (h1 + h2) & _M
    h2 = (h2 + h1) & _M
    h1, h2 = _fmix(h1), _fmix(h2)
    h1 = (h1 + h2) & _M
    h2 = (h2 + h1) & _M
    return h1.to_bytes(8, "little") + h2.to_bytes(8, "little")


def test_event_id_is_murmur3_of_the_bytes(t_env: Any) -> None:
    # Every tail length (0..15) over one, two and three blocks, and non-ASCII bytes.
    records = [bytes((7 * i + 200) % 256 for i in range(n)) for n in range(48)]
    ids = [bytes(row[0]) for row in query(t_env, records, "sluice_event_id(v)")]
    assert ids == [murmur3_x64_128(r) for r in records]


def test_event_id_is_equal_for_equal_bytes_only(t_env: Any) -> None:
    records = [f'{{"n": {i}, "pad": "{"x" * (i % 40)}"}}'.encode() for i in range(2000)]
    records += records[:10]  # copies
    records += [records[0][:-1] + b" }"]  # one byte apart
    ids = [row[0] for row in query(t_env, records, "sluice_event_id(v)")]
    assert all(len(i) == 16 for i in ids)
    assert ids[2000:2010] == ids[:10]
    assert len({bytes(i) for i in ids}) == 2001


def test_shard_in_sql_is_the_shard_python_computes(t_env: Any) -> None:
    """sluice_shard keys the tile rows in Java (job._keyed_by_shard); tile_state.shard_of is
    its Python twin (tests use it to place entities). Same CRC-32, same shard, for ASCII,
    accented, CJK and emoji entities; -1 (the side key) for rows without an entity."""
    from streaming import tile_state

    entities = [f"r{i:03d}" for i in range(200)] + ["zoné", "東京", "🚲", "", "a|b"]
    records = [e.encode() for e in entities]
    got = query(
        t_env,
        records,
        f"sluice_shard(CAST(v AS STRING), {tile_state.SHARDS}), "
        f"sluice_shard(CAST(NULL AS STRING), {tile_state.SHARDS})",
    )
    assert [row[0] for row in got] == [tile_state.shard_of(e) for e in entities]
    assert {row[1] for row in got} == {tile_state.SIDE_KEY} == {tile_state.shard_of(None)}
    assert {row[0] for row in got} >= set(range(tile_state.SHARDS))  # every shard is used


def test_distinct_sums_count_each_event_once(t_env: Any) -> None:
    """sluice_distinct_sums (DistinctSums.java) deduplicates in the tile's one aggregation: per
    group, its distinct events and the sums and moments of their values must equal ExactSum's
    and Moments' over the records made distinct by SQL's DISTINCT, whatever the repeats. Ids of
    16 bytes (sluice_event_id), the all-zero id, and short ids (the query's stand-in for
    filtered events) are all kept apart; 3,000 ids in a group make its set grow."""
    import math
    import random

    from pyflink.table import DataTypes

    draw = random.Random(11)
    distinct: list[tuple[int, bytes, float | None]] = []  # (group, record, value)
    for g in range(4):
        for i in range(3000 if g == 0 else 40):
            x = None if i % 17 == 0 else draw.uniform(-1e3, 1e3) * 10 ** draw.randint(-8, 8)
            distinct.append((g, f'{{"g": {g}, "i": {i}}}'.encode(), x))
    distinct += [(1, b"", 1.0), (1, b"7", 2.0), (1, b"\x00" * 15, 4.0), (2, b"\x00" * 16, 8.0)]
    records = distinct + [draw.choice(distinct) for _ in range(2000)]
    draw.shuffle(records)
    schema = DataTypes.ROW(
        [
            DataTypes.FIELD("g", DataTypes.INT()),
            DataTypes.FIELD("v", DataTypes.BYTES()),
            DataTypes.FIELD("x", DataTypes.DOUBLE()),
            DataTypes.FIELD("h", DataTypes.BOOLEAN()),
        ]
    )
    rows = [(g, bytearray(v), x, v.startswith(b"{")) for g, v, x in records]
    t_env.create_temporary_view("repeated", t_env.from_elements(rows, schema))
    # Records by their event id, as the tile query does; the others are ids themselves.
    eid = "CASE WHEN h THEN sluice_event_id(v) ELSE v END"
    try:
        got = t_env.execute_sql(
            f"SELECT g, sluice_distinct_sums('ms', {eid}, x, x) FROM repeated GROUP BY g"
        )
        want = t_env.execute_sql(
            "SELECT g, COUNT(*), sluice_moments(x), COUNT(x), sluice_sum(x) "
            "FROM (SELECT DISTINCT g, v, x FROM repeated) GROUP BY g"
        )
        with got.collect() as a, want.collect() as b:
            found = {row[0]: row[1] for row in a}
            expected = {row[0]: row[1:] for row in b}
    finally:
        t_env.drop_temporary_view("repeated")
    assert sorted(found) == sorted(expected) == [0, 1, 2, 3]
    for g, text in found.items():
        events, moments, n, total = text.split(";")
        count, want_moments, want_n, want_total = expected[g]
        assert (int(events), moments, int(n), total) == (
            count,
            want_moments,
            want_n,
            want_total,
        ), g
        values = [x for h, _, x in distinct if h == g and x is not None]
        assert float(total.split(" ")[0]) == math.fsum(values)
    assert int(found[0].split(";")[0]) == 3000
