"""Rollout state of one model name: canary, shadows and the history of production changes.

Stored by models.registry beside the production pointer (``<name>/rollout.json``, written whole
in one step); every server replica re-reads it (serving/rollout.py), so the registry is the one
source of truth and a replica that missed a change notice repairs itself on its next read.

- canary: a candidate version answers ``share`` (0 < share <= 1) of the requests; at most one.
- shadows: candidate versions that predict on every request too, logged, never answered.
- history: each change of the production pointer (promote, rollback) with the version it
  replaced, newest last. A rollback returns to the version the current production replaced when
  it was promoted; rolling back twice walks further back, like a stack.

The transitions are pure functions of the state (tested without storage): a promote of a version
ends its canary and its shadow; a rollback ends every canary and shadow (an emergency brake:
the previous production answers everything again).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from models.errors import RolloutConflictError

ROLLOUT_FILE = "rollout.json"
KEEP_HISTORY = 100  # production changes kept: rollbacks rarely walk back further


class Canary(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int
    share: float = Field(gt=0, le=1)


class ProductionChange(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    action: Literal["promote", "rollback"]
    version: int  # the new production
    previous: int | None  # the production it replaced
    at: str = Field(default_factory=lambda: datetime.now(UTC).isoformat())


class RolloutState(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    canary: Canary | None = None
    shadows: tuple[int, ...] = ()
    history: tuple[ProductionChange, ...] = ()

    def with_canary(self, version: int, share: float, production: int | None) -> RolloutState:
        """A canary of ``version`` at ``share`` (0 ends any canary); replaces another canary."""
        if share == 0:
            return self.model_copy(update={"canary": None})
        if version == production:
            raise RolloutConflictError(
                f"version {version} is production already: a canary needs another version"
            )
        return self.model_copy(update={"canary": Canary(version=version, share=share)})

    def with_shadow(self, version: int, enabled: bool, production: int | None) -> RolloutState:
        if enabled and version == production:
            raise RolloutConflictError(
                f"version {version} is production already: a shadow needs another version"
            )
        shadows = [v for v in self.shadows if v != version] + ([version] if enabled else [])
        return self.model_copy(update={"shadows": tuple(sorted(shadows))})

    def promoted(self, version: int, previous: int | None) -> RolloutState:
        """After ``version`` became production (no change, no history entry)."""
        if version == previous:
            return self
        canary = None if self.canary is not None and self.canary.version == version else self.canary
        change = ProductionChange(action="promote", version=version, previous=previous)
        return RolloutState(
            canary=canary,
            shadows=tuple(v for v in self.shadows if v != version),
            history=(*self.history, change)[-KEEP_HISTORY:],
        )

    def rollback_target(self, current: int | None) -> int:
        """The version the current production replaced when it was last promoted."""
        for change in reversed(self.history):
            if change.action == "promote" and change.version == current:
                if change.previous is None:
                    break
                return change.previous
        raise RolloutConflictError(
            f"no previous production to roll back to from version {current} "
            "(the history of promotes does not say what it replaced)"
        )

    def rolled_back(self, current: int, target: int) -> RolloutState:
        change = ProductionChange(action="rollback", version=target, previous=current)
        return RolloutState(history=(*self.history, change)[-KEEP_HISTORY:])
