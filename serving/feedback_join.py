"""Joins delayed labels with the predictions they judge (pure: no Kafka, a clock passed in).

Two kinds of label:
- a FeedbackRecord (the feedback topic, written by POST /feedback): joined by prediction_id;
- a label event declared by the domain's ``Labels`` (e.g. a delivery on events.deliveries,
  holding delivery_seconds): joined by entity and time. The prediction's request carries
  the entity keys (the Labels' ``entities``: entity -> event column, the entity's join key
  naming the request field), and the label's ``time_field`` (e.g. the order's placed_at) is
  the time the prediction was made; the prediction of the same model and entity keys
  nearest in time, within ``match_ms``, is the one labelled. One label event labels one
  prediction of each served model trained on those labels.

Each prediction is labelled at most once (a match removes it). Shadow predictions (never
answered) are left out and counted. Predictions wait for their
label ``horizon_ms`` (by their own time), then expire, counted. A label may be read before its
prediction (the two come from different topics and partitions, and from other replicas): it
waits ``label_wait_ms`` of the clock for the prediction, then counts as unmatched.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from core.records import PredictionRecord
from features.definitions import Entity
from features.labels import Labels

LABEL_WAIT_MS = 30_000


@dataclass(frozen=True)
class LabelSource:
    """What the join needs of one Labels declaration."""

    name: str
    topic: str
    label: str
    time_field: str
    keys: tuple[tuple[str, str], ...]  # (request field, event column), in a fixed order
    services: frozenset[str]

    @classmethod
    def of(cls, labels: Labels, entities: Mapping[str, Entity]) -> LabelSource:
        keys = tuple(
            sorted((entities[name].join_key, column) for name, column in labels.entities.items())
        )
        return cls(
            labels.name,
            labels.source.topic,
            labels.label,
            labels.time_field,
            keys,
            frozenset(labels.services),
        )

    def parse(self, event: Mapping[str, Any]) -> tuple[tuple[str, ...], int, float] | str:
        """(entity key values, time ms, label) of an event, or why it cannot be used."""
        values = []
        for _request_field, column in self.keys:
            value = event.get(column)
            if not isinstance(value, str):
                return f"{column}: missing or not a string"
            values.append(value)
        t = event.get(self.time_field)
        if not isinstance(t, int) or isinstance(t, bool):
            return f"{self.time_field}: missing or not epoch milliseconds"
        label = event.get(self.label)
        if not isinstance(label, int | float) or isinstance(label, bool):
            return f"{self.label}: missing or not a number"
        return tuple(values), t, float(label)


@dataclass
class Pending:
    prediction_id: str
    model: str
    version: int
    prediction: float
    t_ms: int
    context: str
    ensemble: dict[int, float] | None  # Exp4: each arm's prediction that made the answer
    entity: tuple[str, tuple[str, ...]] | None = None  # (label source, key values)


@dataclass(frozen=True)
class Match:
    pending: Pending
    label: float


@dataclass
class JoinCounts:
    predictions: int = 0  # prediction records buffered
    labels: int = 0  # label records read (feedback + label events)
    matched: int = 0
    unmatched: int = 0  # labels whose prediction never came within label_wait_ms
    expired: int = 0  # predictions without a label within the horizon
    evicted: int = 0  # predictions dropped because the buffer was full
    invalid: int = 0  # label events that lack a field the join needs

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass
class _Waiting:
    since_ms: int
    label: float
    prediction_id: str | None = None
    source: LabelSource | None = None
    keys: tuple[str, ...] = ()
    t_ms: int = 0
    models: set[str] = field(default_factory=set)  # still unlabelled (label events)
    matched_any: bool = False


class FeedbackJoin:
    def __init__(
        self,
        sources: list[LabelSource],
        services_of: Mapping[str, str],  # model name -> its feature service
        *,
        context_field: str = "",
        horizon_ms: int = 7_200_000,
        match_ms: int = 60_000,
        capacity: int = 200_000,
        label_wait_ms: int = LABEL_WAIT_MS,
    ) -> None:
        self.sources = sources
        self.services_of = dict(services_of)
        self.context_field = context_field
        self.horizon_ms = horizon_ms
        self.match_ms = match_ms
        self.capacity = capacity
        self.label_wait_ms = label_wait_ms
        self.counts = JoinCounts()
        self._by_id: OrderedDict[str, Pending] = OrderedDict()
        # (model, label source, key values) -> predictions sorted by time, and their times
        self._by_entity: dict[tuple[str, str, tuple[str, ...]], list[Pending]] = {}
        self._waiting: list[_Waiting] = []
        self.shadows = 0  # shadow prediction records read and left out

    def _source_of(self, model: str) -> LabelSource | None:
        service = self.services_of.get(model)
        return next((s for s in self.sources if service in s.services), None)

    def add_prediction(self, record: PredictionRecord, now_ms: int) -> None:
        """Buffer a prediction (``retry`` then answers labels that were waiting for it)."""
        if record.shadow_of is not None:
            # A shadow version's prediction on a mirrored row (serving/rollout.py): nobody got
            # it, so no label judges it; buffered, it could take the answer's label by entity.
            self.shadows += 1
            return
        t = record.as_of_ms if record.as_of_ms is not None else record.time_ms
        if t < now_ms - self.horizon_ms or record.prediction_id in self._by_id:
            return  # too old to be labelled here, or read twice (a restart re-reads)
        context = str(record.request.get(self.context_field, "")) if self.context_field else ""
        arms = None
        if record.ensemble is not None:
            arms = {int(v): float(p) for v, p in record.ensemble["predictions"].items()}
        pending = Pending(
            record.prediction_id,
            record.model,
            record.model_version,
            record.prediction,
            t,
            context,
            arms,
        )
        source = self._source_of(record.model)
        if source is not None and all(key in record.request for key, _ in source.keys):
            keys = tuple(str(record.request[key]) for key, _ in source.keys)
            pending.entity = (source.name, keys)
            entries = self._by_entity.setdefault((record.model, source.name, keys), [])
            bisect.insort(entries, pending, key=lambda p: p.t_ms)
        self._by_id[record.prediction_id] = pending
        self.counts.predictions += 1
        while len(self._by_id) > self.capacity:
            self._forget(next(iter(self._by_id.values())))
            self.counts.evicted += 1

    def _forget(self, pending: Pending) -> None:
        self._by_id.pop(pending.prediction_id, None)
        if pending.entity is not None:
            key = (pending.model, *pending.entity)
            entries = self._by_entity.get(key)
            if entries is not None:
                entries.remove(pending)
                if not entries:
                    del self._by_entity[key]

    def label_by_id(self, prediction_id: str, label: float, now_ms: int) -> list[Match]:
        self.counts.labels += 1
        match = self._match_id(prediction_id, label)
        if match is None:
            self._waiting.append(_Waiting(now_ms, label, prediction_id=prediction_id))
            return []
        return [match]

    def _match_id(self, prediction_id: str, label: float) -> Match | None:
        pending = self._by_id.get(prediction_id)
        if pending is None:
            return None
        self._forget(pending)
        self.counts.matched += 1
        return Match(pending, label)

    def label_event(
        self, source: LabelSource, event: Mapping[str, Any], now_ms: int
    ) -> list[Match]:
        """A label event: one match per served model trained on this source, when found."""
        parsed = source.parse(event)
        self.counts.labels += 1
        if isinstance(parsed, str):
            self.counts.invalid += 1
            return []
        keys, t, label = parsed
        models = {m for m, service in self.services_of.items() if service in source.services}
        matches = self._match_entity(source, keys, t, label, models)
        if models:  # some model's prediction may still come
            waiting = _Waiting(now_ms, label, None, source, keys, t, models, bool(matches))
            self._waiting.append(waiting)
        elif not matches:
            self.counts.unmatched += 1  # no served model learns from this source
        return matches

    def _match_entity(
        self,
        source: LabelSource,
        keys: tuple[str, ...],
        t: int,
        label: float,
        models: set[str],
    ) -> list[Match]:
        """Matches for the models found; they are removed from ``models``."""
        out = []
        for model in sorted(models):
            entries = self._by_entity.get((model, source.name, keys), [])
            near = [p for p in entries if abs(p.t_ms - t) <= self.match_ms]
            if not near:
                continue
            best = min(near, key=lambda p: abs(p.t_ms - t))
            self._forget(best)
            self.counts.matched += 1
            models.discard(model)
            out.append(Match(best, label))
        return out

    def retry(self) -> list[Match]:
        """Labels that were waiting and whose prediction has come since."""
        out: list[Match] = []
        still: list[_Waiting] = []
        for waiting in self._waiting:
            if waiting.prediction_id is not None:
                match = self._match_id(waiting.prediction_id, waiting.label)
                if match is not None:
                    out.append(match)
                    continue
            elif waiting.source is not None:
                found = self._match_entity(
                    waiting.source, waiting.keys, waiting.t_ms, waiting.label, waiting.models
                )
                out.extend(found)
                waiting.matched_any = waiting.matched_any or bool(found)
                if not waiting.models:
                    continue
            still.append(waiting)
        self._waiting = still
        return out

    def expire(self, now_ms: int) -> None:
        """Forget predictions past the horizon and labels that waited too long."""
        oldest = now_ms - self.horizon_ms
        # The buffer is in log order, which is time order up to batching: scan from the front.
        while self._by_id:
            first = next(iter(self._by_id.values()))
            if first.t_ms >= oldest:
                break
            self._forget(first)
            self.counts.expired += 1
        still = []
        for waiting in self._waiting:
            if now_ms - waiting.since_ms <= self.label_wait_ms:
                still.append(waiting)
            elif not waiting.matched_any:
                self.counts.unmatched += 1
        self._waiting = still

    @property
    def buffered(self) -> int:
        return len(self._by_id)

    @property
    def waiting(self) -> int:
        return len(self._waiting)
