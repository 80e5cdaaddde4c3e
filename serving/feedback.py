"""Rewards from delayed labels: a background thread of each predictor replica.

It reads two things from Kafka:
- the prediction log (settings.prediction_topic), every partition, by every replica: a label
  may judge a prediction any replica made. On start it re-reads the last
  ``feedback_horizon_s`` (offsets by time; a broker without time lookup, like Tansu, starts
  at the beginning and older records are skipped), so a restart still learns from labels of
  predictions made before it.
- labels: the feedback topic and the label-event topics the domain's Labels declare (e.g.
  events.deliveries), in the consumer group ``feedback_group`` shared by the replicas, so each
  label is applied once. Offsets are stored after the label's update is applied (at least
  once: a crash between the two applies a label twice at most).

serving/feedback_join.py joins them; each match becomes a loss (serving/selection.loss_of:
|label - prediction| / bandit_loss_scale, clipped to 1; an Exp4 answer gives each arm that
answered its own loss) and a StateUpdate of the model's policy, applied to the shared state
(serving/policy_state.py) in one transaction per (model, context) and batch. Only versions the
replica serves now are updated (a label for a version since retired is counted ``stale``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from core.errors import RecordError
from core.records import FeedbackRecord, PredictionRecord, is_heartbeat
from core.settings import Settings
from serving.feedback_join import FeedbackJoin, LabelSource, Match
from serving.policy_state import CachedPolicyState, state_key
from serving.selection import ModelSlot, StateUpdate, loss_of

log = logging.getLogger("sluice.serving.feedback")
_POLL_S = 0.05
_BATCH = 500
_RETRY_S = 1.0


class PolicyUpdater:
    """Losses -> policy state updates, per (model, context), in one transaction each."""

    def __init__(
        self, slots: Callable[[], Mapping[str, ModelSlot]], state: CachedPolicyState, scale: float
    ) -> None:
        self.slots = slots
        self.state = state
        self.scale = scale
        self.applied = 0  # matches that changed a policy's state
        self.stale = 0  # matches for a model or version not served now

    def losses(self, match: Match) -> dict[int, float]:
        pending = match.pending
        if pending.ensemble is not None:
            return {v: loss_of(match.label, p, self.scale) for v, p in pending.ensemble.items()}
        return {pending.version: loss_of(match.label, pending.prediction, self.scale)}

    def apply(self, matches: list[Match]) -> None:
        groups: dict[tuple[str, str], list[Match]] = {}
        for match in matches:
            groups.setdefault((match.pending.model, match.pending.context), []).append(match)
        slots = self.slots()
        for (model, context), group in groups.items():
            slot = slots.get(model)
            if slot is None:
                self.stale += len(group)
                continue
            versions = sorted(slot.state.arms)
            policy = slot.policy
            key = state_key(model, policy.kind, context)
            (fields,) = self.state.store.read_many([key])
            original = set(fields)
            init: dict[str, float] = {}
            add: dict[str, float] = {}
            for match in group:
                losses = {v: x for v, x in self.losses(match).items() if v in versions}
                if not losses:
                    self.stale += 1
                    continue
                update = policy.update(fields, versions, losses)
                fields = update.applied_to(fields)
                init |= {k: v for k, v in update.init.items() if k not in original}
                for name, value in update.add.items():
                    add[name] = add.get(name, 0.0) + value
                self.applied += 1
            if init or add:
                combined = StateUpdate(init, add)
                self.state.store.apply(key, combined.init, combined.add)
                self.state.refresh([key])  # this replica sees its own update at once


class FeedbackConsumer:
    def __init__(
        self,
        settings: Settings,
        join: FeedbackJoin,
        updater: PolicyUpdater,
        on_counts: Callable[[Mapping[str, int]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.join = join
        self.updater = updater
        self.on_counts = on_counts
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sources = {source.topic: source for source in join.sources}
        self.errors = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sluice-feedback", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _predictions_consumer(self) -> Any:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

        s = self.settings
        consumer = Consumer(
            s.kafka_client_config(
                **{
                    "group.id": f"{s.feedback_group}.log",  # assigned, never committed
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                }
            )
        )
        topic = s.prediction_topic
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        since_ms = int(time.time() * 1000 - s.feedback_horizon_s * 1000)
        wanted = [TopicPartition(topic, p, since_ms) for p in partitions]
        try:
            found = consumer.offsets_for_times(wanted, timeout=10)
            start = [
                tp if tp.offset >= 0 else TopicPartition(topic, tp.partition, OFFSET_BEGINNING)
                for tp in found
            ]
        except Exception:  # no time lookup: from the beginning; old records are skipped
            start = [TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions]
        consumer.assign(start)
        return consumer

    def _labels_consumer(self) -> Any:
        from confluent_kafka import Consumer

        s = self.settings
        consumer = Consumer(
            s.kafka_client_config(
                **{
                    "group.id": s.feedback_group,
                    "auto.offset.reset": "earliest",
                    "enable.auto.offset.store": False,
                    "session.timeout.ms": 6000,
                }
            )
        )
        consumer.subscribe([s.feedback_topic, *self._sources])
        return consumer

    def _topics_ready(self) -> bool:
        """Create the topics this consumer reads, retried until the broker answers (the
        predictor starts without one) or close() is called."""
        from core.kafka import ensure_topics

        s = self.settings
        topics = [s.prediction_topic, s.feedback_topic, *self._sources]
        while not self._stop.is_set():
            try:
                ensure_topics(s, topics, timeout_s=5)
                return True
            except Exception as exc:  # the broker away: wait, try again
                log.warning("feedback topics not ready", extra={"error": str(exc)})
                self._stop.wait(_RETRY_S)
        return False

    def _run(self) -> None:
        predictions = labels = None
        if not self._topics_ready():
            return
        try:
            predictions = self._predictions_consumer()
            labels = self._labels_consumer()
            while not self._stop.is_set():
                try:
                    self.step(predictions, labels)
                except Exception:  # Redis or the broker away: log, wait, go on
                    self.errors += 1
                    log.exception("feedback step failed")
                    self._stop.wait(_RETRY_S)
        except Exception:
            self.errors += 1
            log.exception("feedback consumer stopped")
        finally:
            for consumer in (predictions, labels):
                if consumer is not None:
                    consumer.close()

    def step(self, predictions: Any, labels: Any) -> None:
        """One round: buffer predictions, join labels, apply updates, store label offsets."""
        now = int(time.time() * 1000)
        for message in predictions.consume(_BATCH, timeout=_POLL_S):
            if message.error() is None:
                try:
                    self.join.add_prediction(PredictionRecord.decode(message.value()), now)
                except RecordError as exc:
                    log.warning("unreadable prediction record", extra={"error": str(exc)})
        matches = self.join.retry()
        read = [m for m in labels.consume(_BATCH, timeout=_POLL_S) if m.error() is None]
        for message in read:
            matches += self._label(message, now)
        self.join.expire(now)
        if matches:
            self.updater.apply(matches)
        for message in read:
            labels.store_offsets(message)
        if self.on_counts is not None:
            self.on_counts(self.counts())

    def _label(self, message: Any, now: int) -> list[Match]:
        topic = message.topic()
        if is_heartbeat(message.headers()):  # events topics carry them; they are no labels
            return []
        try:
            if topic == self.settings.feedback_topic:
                record = FeedbackRecord.decode(message.value())
                return self.join.label_by_id(record.prediction_id, record.label, now)
            event = orjson.loads(message.value())
        except (RecordError, orjson.JSONDecodeError) as exc:
            self.join.counts.invalid += 1
            log.warning("unreadable label", extra={"topic": topic, "error": str(exc)})
            return []
        if not isinstance(event, dict):  # heartbeats (empty values) and other non-events
            return []
        return self.join.label_event(self._sources[topic], event, now)

    def counts(self) -> dict[str, int]:
        return self.join.counts.as_dict() | {
            "applied": self.updater.applied,
            "stale": self.updater.stale,
            "shadows": self.join.shadows,
            "buffered": self.join.buffered,
            "waiting": self.join.waiting,
        }


def label_sources(settings: Settings, labels: Any = None) -> list[LabelSource]:
    """The label events of the domain (settings.definitions_module), or those given."""
    from features.registry import load_registry

    registry = load_registry(settings.definitions_module)
    declared = list(registry.labels.values()) if labels is None else list(labels)
    return [LabelSource.of(item, registry.entities) for item in declared]
