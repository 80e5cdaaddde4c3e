"""Model registry under concurrent trainers (distinct versions) and its rollout state: canary,
shadows, promote and rollback history."""

from __future__ import annotations

import multiprocessing
import threading

import pytest

from examples.delivery.features import delivery_eta_batch_only
from models.errors import ModelNotFoundError, ModelRegistryError, RolloutConflictError
from models.fit import fit
from models.registry import ModelMetadata, ModelRegistry
from models.rollout import RolloutState
from tests.helpers.serving import synthetic_training_set

NAME = delivery_eta_batch_only.name
SAVES = 5


@pytest.fixture(scope="module")
def trained() -> tuple[str, ModelMetadata]:
    model = fit(
        synthetic_training_set(delivery_eta_batch_only, n=200),
        delivery_eta_batch_only,
        label="delivery_seconds",
        rounds=3,
    )
    return model.model_text, model.metadata


def _trainer(root: str, text: str, metadata_json: str, barrier: object, out: object) -> None:
    metadata = ModelMetadata.model_validate_json(metadata_json)
    registry = ModelRegistry(root)
    barrier.wait()  # type: ignore[attr-defined]
    for _ in range(SAVES):
        out.put(registry.save(text, metadata).version)  # type: ignore[attr-defined]


def test_concurrent_trainer_processes_get_distinct_versions(tmp_path, trained):
    text, metadata = trained
    root = f"file://{tmp_path}/models"
    # Spawned, not forked: by now the test process runs threads (gRPC's, from earlier tests),
    # and a forked child can hang on a lock one of them held (seen in CI: no version in 60 s).
    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(4), context.Queue()
    workers = [
        context.Process(
            target=_trainer, args=(root, text, metadata.model_dump_json(), barrier, out)
        )
        for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    versions = [out.get(timeout=60) for _ in range(4 * SAVES)]
    for worker in workers:
        worker.join(timeout=30)
        assert worker.exitcode == 0
    # Distinct, and every one stored. Numbers may skip (a claim several trainers contested
    # and all gave back while another took the next one): like a database sequence, a version
    # number is unique and increasing, not dense.
    assert len(set(versions)) == 4 * SAVES
    registry = ModelRegistry(root)
    assert registry.versions(NAME) == sorted(versions)
    assert registry.model_text(NAME, versions[0]) == text


@pytest.mark.parametrize("root", ["local", "mock:///models"])
def test_concurrent_trainer_threads_get_distinct_versions(tmp_path, trained, root):
    """Threads on one registry: a local disk, and pyarrow's in-memory filesystem (no rename,
    no exclusive create: the claim protocol needs neither)."""
    text, metadata = trained
    registry = ModelRegistry(str(tmp_path / "models") if root == "local" else root)
    barrier = threading.Barrier(6)
    versions: list[int] = []

    def train() -> None:
        barrier.wait()
        for _ in range(SAVES):
            versions.append(registry.save(text, metadata).version)

    threads = [threading.Thread(target=train) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(set(versions)) == 6 * SAVES  # distinct (not dense: see the test above)
    assert registry.versions(NAME) == sorted(versions)


def test_a_claimed_number_is_skipped_and_a_given_back_one_reused(tmp_path, trained):
    text, metadata = trained
    registry = ModelRegistry(str(tmp_path))
    assert registry.save(text, metadata).version == 1
    (tmp_path / NAME / "2").mkdir()
    (tmp_path / NAME / "2" / ".claim-crashed").touch()  # a trainer that died mid-save
    (tmp_path / NAME / "3").mkdir()  # an empty directory: a claim given back
    assert registry.save(text, metadata).version == 3
    assert registry.versions(NAME) == [1, 3]


def test_promote_and_rollback_walk_the_production_history(tmp_path, trained):
    text, metadata = trained
    registry = ModelRegistry(str(tmp_path))
    for _ in range(3):
        registry.save(text, metadata)
    with pytest.raises(ModelNotFoundError, match="no production version"):
        registry.rollback(NAME)
    assert registry.promote(NAME, 1) is None
    with pytest.raises(RolloutConflictError, match="no previous production"):
        registry.rollback(NAME)
    assert registry.promote(NAME, 2) == 1
    assert registry.promote(NAME, 3) == 2
    assert registry.promote(NAME, 3) == 3  # no change: no history entry
    assert registry.rollback(NAME) == (3, 2)
    assert registry.production(NAME) == 2
    assert registry.rollback(NAME) == (2, 1)  # further back, like a stack
    assert registry.production(NAME) == 1
    history = registry.rollout(NAME).history
    assert [(c.action, c.version, c.previous) for c in history] == [
        ("promote", 1, None),
        ("promote", 2, 1),
        ("promote", 3, 2),
        ("rollback", 2, 3),
        ("rollback", 1, 2),
    ]


def test_canary_and_shadow_state_and_what_promote_and_rollback_end(tmp_path, trained):
    text, metadata = trained
    registry = ModelRegistry(str(tmp_path))
    for _ in range(4):
        registry.save(text, metadata)
    registry.promote(NAME, 1)
    state = registry.rollout(NAME)
    with pytest.raises(RolloutConflictError, match="production already"):
        state.with_canary(1, 0.5, production=1)
    with pytest.raises(RolloutConflictError, match="production already"):
        state.with_shadow(1, True, production=1)
    state = state.with_canary(2, 0.3, 1).with_shadow(3, True, 1).with_shadow(4, True, 1)
    registry.set_rollout(NAME, state)
    stored = registry.rollout(NAME)
    assert stored.canary is not None
    assert (stored.canary.version, stored.canary.share) == (2, 0.3)
    assert stored.shadows == (3, 4)
    assert stored.with_canary(2, 0, 1).canary is None  # share 0 ends it
    assert stored.with_shadow(3, False, 1).shadows == (4,)
    with pytest.raises(ModelNotFoundError, match="no version 9"):
        registry.set_rollout(NAME, stored.with_shadow(9, True, 1))
    registry.promote(NAME, 3)  # ends 3's shadow, keeps the canary of 2
    after = registry.rollout(NAME)
    assert after.shadows == (4,)
    assert after.canary is not None
    assert after.canary.version == 2
    registry.promote(NAME, 2)  # ends the canary of 2
    assert registry.rollout(NAME).canary is None
    registry.rollback(NAME)  # ends everything
    back = registry.rollout(NAME)
    assert (back.canary, back.shadows, registry.production(NAME)) == (None, (), 3)


def test_a_bad_rollout_file_is_a_clear_error(tmp_path, trained):
    with pytest.raises(ValueError, match="share"):
        RolloutState.model_validate({"canary": {"version": 2, "share": 1.5}})
    registry = ModelRegistry(str(tmp_path))
    registry.save(*trained)
    assert registry.rollout(NAME) == RolloutState()  # never set: empty
    (tmp_path / NAME / "rollout.json").write_text('{"canary": {"version": 1, "share": 2}}')
    with pytest.raises(ModelRegistryError, match=r"bad rollout\.json"):
        registry.rollout(NAME)


class _ListingRace:
    """A filesystem whose first listing of a directory fails as pyarrow's local one does when
    another trainer creates that directory between its listing and its existence check."""

    def __init__(self, fs: object) -> None:
        self._fs = fs
        self.raced = 0

    def get_file_info(self, what: object) -> object:
        import pyarrow.fs as pafs

        if isinstance(what, pafs.FileSelector) and not self.raced:
            self.raced += 1
            self._fs.create_dir(what.base_dir, recursive=True)  # type: ignore[attr-defined]
            raise FileNotFoundError(f"[Errno 2] Cannot list directory '{what.base_dir}'")
        return self._fs.get_file_info(what)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._fs, name)


def test_a_directory_created_while_listed_is_an_empty_listing(tmp_path, trained):
    text, metadata = trained
    registry = ModelRegistry(str(tmp_path / "models"))
    race = _ListingRace(registry._fs)
    registry._fs = race
    assert registry.save(text, metadata).version == 1
    assert race.raced == 1
    assert registry.versions(NAME) == [1]


def test_a_listing_that_fails_otherwise_is_a_registry_error(tmp_path, trained, monkeypatch):
    registry = ModelRegistry(str(tmp_path / "models"))

    def refuse(what: object) -> object:
        raise PermissionError("[Errno 13] Permission denied")

    monkeypatch.setattr(
        registry, "_fs", type("Refusing", (), {"get_file_info": staticmethod(refuse)})()
    )
    with pytest.raises(ModelRegistryError, match=r"cannot list .*Permission denied"):
        registry.versions(NAME)
