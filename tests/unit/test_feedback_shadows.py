"""The label join leaves shadow predictions out: a shadow version's prediction on a mirrored
row was never answered, so a label must judge the answer it shadows, never the shadow."""

from __future__ import annotations

from core.records import PredictionRecord
from examples.delivery.features import ENTITIES, delivery_times
from serving.feedback_join import FeedbackJoin, LabelSource


def prediction(pid: str, t: int, version: int, shadow_of: str | None = None) -> PredictionRecord:
    record = PredictionRecord(
        prediction_id=pid,
        time_ms=t,
        model="delivery_eta",
        model_version=version,
        prediction=600.0,
        latency_ms=1.0,
        request={"restaurant_id": "r1", "zone_id": "z1"},
        features={},
        feature_ages_ms={},
        missing=[],
        stale=[],
        as_of_ms=t,
        shadow_of=shadow_of,
    )
    return PredictionRecord.decode(record.encode())  # as the consumer reads it


def test_a_label_event_judges_the_answer_not_its_shadow() -> None:
    source = LabelSource.of(delivery_times, {e.name: e for e in ENTITIES})
    join = FeedbackJoin([source], {"delivery_eta": "delivery_eta"}, match_ms=1_000)
    join.add_prediction(prediction("answer", 1_000, 1), now_ms=1_000)
    # The shadow is logged after the answer, nearer in time to the label's placed_at.
    join.add_prediction(prediction("shadow", 1_300, 3, shadow_of="answer"), now_ms=1_300)
    event = {
        "restaurant_id": "r1",
        "zone_id": "z1",
        "delivery_seconds": 700.0,
        "placed_at": 1_300,
    }
    (match,) = join.label_event(source, event, now_ms=2_000)
    assert (match.pending.prediction_id, match.pending.version) == ("answer", 1)
    assert (join.counts.predictions, join.shadows, join.buffered) == (1, 1, 0)


def test_feedback_by_id_never_finds_a_shadow() -> None:
    join = FeedbackJoin([], {"delivery_eta": "delivery_eta"}, label_wait_ms=1_000)
    join.add_prediction(prediction("shadow", 1_000, 3, shadow_of="answer"), now_ms=1_000)
    assert join.label_by_id("shadow", 650.0, now_ms=1_000) == []
    join.expire(now_ms=5_000)
    assert (join.counts.matched, join.counts.unmatched, join.shadows) == (0, 1, 1)
