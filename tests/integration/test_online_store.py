"""RedisOnlineStore against a real Redis and Feast's reader: what we write, Feast serves as is."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import pytest

from core.settings import Settings
from examples.delivery.features import restaurant_orders, restaurant_prep, zone_couriers
from feature_repo import codec
from feature_repo.config import feature_store
from feature_repo.errors import OnlineStoreError
from feature_repo.online import (
    OnlineRow,
    RedisOnlineStore,
    end_field,
    previous_end_field,
    previous_field,
)
from feature_repo.online_store import empty_values, open_online_store
from features.definitions import FeatureView
from tests.helpers.feast import feast_settings

pytestmark = pytest.mark.integration
END = 1_795_000_000_000 - 1_795_000_000_000 % 60_000  # a minute boundary


@pytest.fixture(scope="module")
def settings(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return feast_settings(stack_settings, tmp_path_factory.mktemp("online"), "online_test")


@pytest.fixture(scope="module")
def store(settings: Settings) -> Any:
    return feature_store(settings)


@pytest.fixture
def online(settings: Settings) -> Iterator[RedisOnlineStore]:
    with RedisOnlineStore(settings.redis_url, settings.feast_project, batch_rows=7) as online:
        yield online


def random_values(view: FeatureView, rng: random.Random) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for spec in view.features():
        if rng.random() < 0.2 and spec.dtype.value == "float":
            values[spec.name] = None
        elif spec.dtype.value == "int":
            values[spec.name] = rng.choice([0, 1, 7, 130, 2**40])
        else:
            values[spec.name] = rng.uniform(-1e3, 1e3)
    return values


def feast_read(store: Any, view: FeatureView, keys: list[str]) -> list[dict[str, Any]]:
    refs = [f"{view.name}:{spec.name}" for spec in view.features()]
    join_key = view.entity.join_key
    got = store.get_online_features(
        features=refs, entity_rows=[{join_key: k} for k in keys]
    ).to_dict()
    return [{spec.name: got[spec.name][i] for spec in view.features()} for i in range(len(keys))]


@pytest.mark.parametrize("view", [restaurant_orders, zone_couriers, restaurant_prep])
def test_rows_read_back_identically_through_feast_and_read(store, online, view):
    rng = random.Random(view.name)
    keys = [f"{view.name}-{i}" for i in range(25)]
    rows = [OnlineRow(k, END + 60_000 * i, random_values(view, rng)) for i, k in enumerate(keys)]
    rows[0] = OnlineRow(keys[0], END, {spec.name: None for spec in view.features()})  # all null
    report = online.write(view, rows)
    assert (report.rows, report.written, report.skipped_older, report.pipelines) == (25, 25, 0, 4)

    missing = f"{view.name}-never-written"
    through_feast = feast_read(store, view, [*keys, missing])
    ours = online.read(view, [*keys, missing])
    assert ours[-1] is None
    assert through_feast[-1] == {spec.name: None for spec in view.features()}
    for row, feast_values, read_back in zip(rows, through_feast, ours, strict=False):
        assert feast_values == dict(row.values)
        assert read_back == row
        for spec in view.features():  # ints stay ints, floats floats, through both readers
            value = read_back.values[spec.name]
            assert value is None or type(value) is type(row.values[spec.name])
            assert type(feast_values[spec.name]) is type(value)


def test_older_rows_are_refused_and_counted_and_same_end_is_idempotent(store, online):
    view = restaurant_orders
    names = [spec.name for spec in view.features()]

    def row(end: int, count: int) -> OnlineRow:
        return OnlineRow("ordered", end, dict.fromkeys(names, None) | {"count_5m": count})

    first = online.write(view, [row(END + 120_000, 2)])
    assert (first.written, first.rewritten, first.skipped_older) == (1, 0, 0)
    older = online.write(view, [row(END + 60_000, 1), row(END, 0)])
    assert (older.written, older.skipped_older) == (0, 2)
    same = online.write(view, [row(END + 120_000, 2)])
    assert (same.written, same.rewritten, same.skipped_older) == (1, 1, 0)
    assert online.read(view, ["ordered"]) == [row(END + 120_000, 2)]
    # Within one batch, order by window end holds too: newest first, then older ones refused.
    mixed = online.write(view, [row(END + 240_000, 4), row(END + 180_000, 3), row(END, 0)])
    assert (mixed.written, mixed.skipped_older) == (1, 2)
    assert online.read(view, ["ordered"]) == [row(END + 240_000, 4)]
    assert feast_read(store, view, ["ordered"])[0]["count_5m"] == 4
    # Equal end with other values: an overwrite (a corrected backfill), read by Feast too.
    online.write(view, [row(END + 240_000, 5)])
    assert feast_read(store, view, ["ordered"])[0]["count_5m"] == 5


def test_views_of_one_entity_share_a_hash_without_touching_each_other(online, store):
    # restaurant_orders and restaurant_prep both key on restaurant_id: one Redis hash.
    orders = random_values(restaurant_orders, random.Random(1))
    prep = random_values(restaurant_prep, random.Random(2))
    online.write(restaurant_orders, [OnlineRow("shared", END, orders)])
    online.write(restaurant_prep, [OnlineRow("shared", END - 86_400_000, prep)])
    assert online.read(restaurant_orders, ["shared"])[0] == OnlineRow("shared", END, orders)
    assert feast_read(store, restaurant_prep, ["shared"])[0] == prep


def test_feast_does_not_expire_online_values_by_ttl(online, store):
    # Documented in online.py: freshness is the reader's job (window_end_ms), not Feast's.
    old_end = int(datetime(2020, 1, 1, tzinfo=UTC).timestamp() * 1000)
    values = random_values(zone_couriers, random.Random(3))
    online.write(zone_couriers, [OnlineRow("stale-zone", old_end, values)])
    assert feast_read(store, zone_couriers, ["stale-zone"])[0] == values
    assert online.read(zone_couriers, ["stale-zone"])[0] == OnlineRow("stale-zone", old_end, values)


def test_rows_written_by_feast_itself_are_read(online, store):
    # Feast's source timestamp is the servable time (window end + lateness): its _ts too.
    end = datetime.fromtimestamp((END + 600_000) / 1000, tz=UTC)
    servable = end + zone_couriers.lateness
    frame = pd.DataFrame(
        {
            "zone_id": ["feast-written"],
            "event_timestamp": [end],
            "servable_timestamp": [servable],
            "created_timestamp": [servable],
            "mean_speed_kmh_5m": [21.5],
            "stddev_speed_kmh_5m": [2.0],
            "count_distinct_courier_id_10m": [3],
        }
    )
    store.write_to_online_store("zone_couriers", frame)
    got = online.read(zone_couriers, ["feast-written"])[0]
    assert got is not None
    assert got.window_end_ms == END + 600_000
    assert got.values == {
        "mean_speed_kmh_5m": 21.5,
        "stddev_speed_kmh_5m": 2.0,
        "count_distinct_courier_id_10m": 3,
    }


def test_bad_rows_name_the_view_entity_and_feature(online):
    full = random_values(zone_couriers, random.Random(4))
    cases = [
        (full | {"count_distinct_courier_id_10m": "three"}, "count_distinct_courier_id_10m"),
        ({k: v for k, v in full.items() if k != "mean_speed_kmh_5m"}, "mean_speed_kmh_5m"),
        (full | {"speed": 1.0}, "speed"),
    ]
    for values, field in cases:
        with pytest.raises(OnlineStoreError, match=f"zone_couriers.*'bad'.*{field}"):
            online.write(zone_couriers, [OnlineRow("bad", END, values)])
    assert online.read(zone_couriers, ["bad"]) == [None]


def test_offline_only_views_are_refused(online):
    offline_only = zone_couriers.model_copy(update={"online": False, "name": "zones_offline"})
    with pytest.raises(OnlineStoreError, match=r"zones_offline.*online=False"):
        online.write(offline_only, [])


def test_layout_is_feasts(settings, online):
    import redis

    online.write(
        zone_couriers, [OnlineRow("layout", END, random_values(zone_couriers, random.Random(5)))]
    )
    client: Any = redis.Redis.from_url(settings.redis_url)
    key = codec.entity_hash_key(codec.entity_key_prefix("zone_id"), "layout", "online_test")
    fields = set(client.hkeys(key))
    expected = {codec.feature_field("zone_couriers", s.name) for s in zone_couriers.features()}
    assert fields == expected | {b"_ts:zone_couriers", b"_sluice_end_ms:zone_couriers"}
    assert client.ttl(key) == -1  # no Redis expiry, like Feast's default


def orders_row(key: str, end: int, count: int) -> OnlineRow:
    names = [spec.name for spec in restaurant_orders.features()]
    return OnlineRow(
        key, end, dict.fromkeys(names, 1) | {"count_5m": count, "mean_subtotal_1h": 2.5}
    )


def test_a_newer_window_keeps_the_row_it_replaces_as_previous(online, store):
    view = restaurant_orders
    assert online.write(view, [orders_row("prev", END, 1)]).written == 1
    (first,) = online.read(view, ["prev"])
    assert first is not None
    assert first.previous is None  # nothing before the first row
    online.write(view, [orders_row("prev", END + 60_000, 2)])
    (second,) = online.read(view, ["prev"])
    assert second == orders_row("prev", END + 60_000, 2)
    assert second.previous == orders_row("prev", END, 1)
    assert feast_read(store, view, ["prev"])[0]["count_5m"] == 2  # Feast: the newest only
    # A same-end rewrite (a corrected backfill, a replay) leaves the previous row alone.
    same = online.write(view, [orders_row("prev", END + 60_000, 5)])
    assert (same.written, same.rewritten) == (1, 1)
    (third,) = online.read(view, ["prev"])
    assert (third, third.previous) == (
        orders_row("prev", END + 60_000, 5),
        orders_row("prev", END, 1),
    )
    # An older end is refused and changes nothing, previous slot included.
    assert online.write(view, [orders_row("prev", END + 30_000, 9)]).skipped_older == 1
    (fourth,) = online.read(view, ["prev"])
    assert fourth is not None
    assert fourth.previous == orders_row("prev", END, 1)
    # Two newer ends in one batch: the last one's previous is the one before it.
    online.write(view, [orders_row("prev", END + 120_000, 6), orders_row("prev", END + 180_000, 7)])
    (fifth,) = online.read(view, ["prev"])
    assert (fifth, fifth.previous) == (
        orders_row("prev", END + 180_000, 7),
        orders_row("prev", END + 120_000, 6),
    )
    assert feast_read(store, view, ["prev"])[0]["count_5m"] == 7


def test_rows_say_whether_all_their_windows_are_empty(online):
    view = restaurant_orders
    closing = empty_values(view)
    online.write(view, [orders_row("closing", END, 3), OnlineRow("closing", END + 60_000, closing)])
    (row,) = online.read(view, ["closing"])
    assert row is not None
    assert row.values == closing
    assert row.empty is True
    assert row.previous is not None
    assert row.previous.empty is False


def test_the_previous_slot_never_touches_feasts_fields(settings, online, store):
    import redis

    view = zone_couriers
    rng = random.Random(6)
    older, newer = random_values(view, rng), random_values(view, rng)
    online.write(view, [OnlineRow("slots", END, older), OnlineRow("slots", END + 60_000, newer)])
    client: Any = redis.Redis.from_url(settings.redis_url)
    key = codec.entity_hash_key(codec.entity_key_prefix("zone_id"), "slots", "online_test")
    feast_fields = [codec.feature_field(view.name, s.name) for s in view.features()]
    ours = {end_field(view.name), previous_end_field(view.name)}
    ours |= {previous_field(f) for f in feast_fields}
    assert set(client.hkeys(key)) == set(feast_fields) | {b"_ts:zone_couriers"} | ours
    # Feast's fields are 4 bytes (murmur3) or "_ts:<view>"; none of ours can be one of them.
    assert all(len(f) != 4 and not f.startswith(b"_ts:") for f in ours)
    assert feast_read(store, view, ["slots"])[0] == newer
    assert int(client.hget(key, previous_end_field(view.name))) == END


def test_a_views_next_life_after_feast_deleted_it_inherits_no_previous_row(settings, online):
    import redis

    view = zone_couriers
    rng = random.Random(7)
    online.write(
        view,
        [
            OnlineRow("reborn", END, random_values(view, rng)),
            OnlineRow("reborn", END + 60_000, random_values(view, rng)),
        ],
    )
    # What Feast's delete_table removes: the view's feature fields and its _ts field.
    client: Any = redis.Redis.from_url(settings.redis_url)
    key = codec.entity_hash_key(codec.entity_key_prefix("zone_id"), "reborn", "online_test")
    feast_fields = [codec.feature_field(view.name, s.name) for s in view.features()]
    client.hdel(key, *feast_fields, b"_ts:zone_couriers")
    assert online.read(view, ["reborn"]) == [None]
    fresh = random_values(view, rng)
    assert online.write(view, [OnlineRow("reborn", END, fresh)]).written == 1
    (row,) = online.read(view, ["reborn"])
    assert row == OnlineRow("reborn", END, fresh)
    assert row is not None
    assert row.previous is None


def test_a_batched_read_answers_newest_and_previous_of_every_view_in_one_round_trip(online):
    keys = [f"many-{i}" for i in range(100)]
    rng = random.Random(8)
    for view in (restaurant_orders, zone_couriers, restaurant_prep):
        online.write(view, [OnlineRow(k, END, random_values(view, rng)) for k in keys])
        online.write(view, [OnlineRow(k, END + 86_400_000, random_values(view, rng)) for k in keys])
    sent: list[int] = []  # one entry per write to the socket: one round trip each
    real = online._pipelined

    def counting(commands: bytes, count: int) -> Any:
        sent.append(count)
        return real(commands, count)

    online._pipelined = counting
    try:
        answers = online.read_many(
            [(v, keys) for v in (restaurant_orders, zone_couriers, restaurant_prep)]
        )
    finally:
        del online._pipelined
    assert sent == [300]  # 100 entities x 3 views, one HMGET each, in one round trip
    for rows in answers:
        assert all(r is not None and r.previous is not None for r in rows)
        assert {r.window_end_ms for r in rows if r is not None} == {END + 86_400_000}
        assert {r.previous.window_end_ms for r in rows if r is not None and r.previous} == {END}


def test_as_of_leaves_out_only_previous_rows_the_contract_cannot_serve(online):
    from features.contract import lateness_ms

    view = restaurant_orders
    online.write(view, [orders_row("asof", END, 1), orders_row("asof", END + 60_000, 2)])
    servable = END + 60_000 + lateness_ms(view)  # the newest row is due from here on
    (before,) = online.read_many([(view, ["asof"])], as_of_ms=servable - 1)[0]
    (after,) = online.read_many([(view, ["asof"])], as_of_ms=servable)[0]
    (plain,) = online.read(view, ["asof"])
    assert before == after == plain == orders_row("asof", END + 60_000, 2)
    assert before is not None
    assert after is not None
    assert plain is not None
    # Not servable yet at t: the contract may serve the previous row, so it is there.
    assert before.previous == plain.previous == orders_row("asof", END, 1)
    assert after.previous is None  # servable: the previous row is never served at t or later
    assert (before.empty, after.empty) == (False, False)


def test_an_error_reply_in_a_batched_read_names_the_views(settings, online):
    import redis

    client: Any = redis.Redis.from_url(settings.redis_url)
    key = codec.entity_hash_key(codec.entity_key_prefix("zone_id"), "not-a-hash", "online_test")
    client.set(key, b"x")  # HMGET on it: WRONGTYPE
    with pytest.raises(OnlineStoreError, match=r"zone_couriers.*WRONGTYPE"):
        online.read_many([(zone_couriers, ["not-a-hash"])])
    online.write(
        zone_couriers, [OnlineRow("after", END, random_values(zone_couriers, random.Random(3)))]
    )
    assert online.read(zone_couriers, ["after"])[0] is not None  # the connection is usable


def test_a_read_redis_does_not_answer_in_time_is_unavailable_and_the_next_one_works(settings):
    import redis

    from feature_repo.errors import OnlineStoreUnavailableError

    with RedisOnlineStore(settings.redis_url, settings.feast_project, read_timeout_s=0.05) as slow:
        slow.write(
            zone_couriers, [OnlineRow("late", END, random_values(zone_couriers, random.Random(4)))]
        )
        client: Any = redis.Redis.from_url(settings.redis_url)
        client.execute_command("CLIENT", "PAUSE", 300, "ALL")  # every client waits 300 ms
        with pytest.raises(OnlineStoreUnavailableError, match="did not answer"):
            slow.read_many([(zone_couriers, ["late"] * 50)])
        client.execute_command("CLIENT", "UNPAUSE")
        assert slow.read(zone_couriers, ["late"])[0] is not None


def test_the_factory_opens_this_store_and_it_answers_a_ping(settings):
    with open_online_store(settings) as opened:
        assert isinstance(opened, RedisOnlineStore)
        assert 0 <= opened.ping() < 5


def test_the_streams_progress_is_the_minimum_of_its_subtasks_read_in_one_call(online):
    view = zone_couriers  # a view no other test here publishes progress for
    assert online.read_progress([view, restaurant_prep]) == {}  # no stream ever ran
    online.write_progress(view, 0, 2, END)
    # Subtask 1 has not published: the run has proved nothing yet.
    assert online.read_progress([view])[view.name] < 0
    online.write_progress(view, 1, 2, END - 60_000)
    assert online.read_progress([view]) == {view.name: END - 60_000}
    # Cached for max_age_ms: a second reader's update shows only once the answer is older.
    online.write_progress(view, 1, 2, END)
    assert online.read_progress([view], max_age_ms=60_000) == {view.name: END - 60_000}
    assert online.read_progress([view]) == {view.name: END}
    # A newer run at another parallelism takes over from the old run's fields.
    time.sleep(0.01)  # written in a later millisecond (on a tie the lower progress wins)
    online.write_progress(view, 0, 1, END + 120_000)
    assert online.read_progress([view, restaurant_prep]) == {view.name: END + 120_000}
