"""serving/lgbm_rows.py: LightGBM's single-row API gives Booster.predict's numbers, bit for bit."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from serving.lgbm_rows import MAX_ROWS, SingleRowPredictor

COLUMNS = 7


def _data(seed: int, n: int = 600) -> tuple[Any, Any]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, COLUMNS))
    x[rng.random(x.shape) < 0.05] = np.nan  # missing values take the trees' default branches
    y = np.nan_to_num(x) @ rng.normal(size=COLUMNS) + rng.normal(scale=0.1, size=n)
    return x, y


def _booster(objective: str, early_stopping: bool = False) -> Any:
    import lightgbm as lgb

    x, y = _data(1)
    params: dict[str, Any] = {
        "objective": objective,
        "verbose": -1,
        "num_threads": 1,
        "num_leaves": 15,
    }
    if objective == "binary":
        y = (y > 0).astype(float)
    elif objective == "multiclass":  # three values per row: the C call writes them all
        y = np.digitize(y, [-1.0, 1.0]).astype(float)
        params["num_class"] = 3
    train = lgb.Dataset(x[:500], y[:500])
    if not early_stopping:
        trained = lgb.train(params, train, 40)
    else:  # a best iteration below the trees' count: both must stop there
        valid = lgb.Dataset(x[500:], y[500:], reference=train)
        params["learning_rate"] = 0.5
        callbacks: list[Any] = [lgb.early_stopping(3, verbose=False)]
        trained = lgb.train(
            params, train, 200, valid_sets=[valid], callbacks=callbacks, keep_training_booster=True
        )
    # Served models are loaded from their text, as serving/model.py does; all the trees kept,
    # so that the best iteration is below their count.
    loaded = lgb.Booster(model_str=trained.model_to_string(num_iteration=-1))
    loaded.best_iteration = trained.best_iteration
    return loaded


@pytest.mark.parametrize(
    ("objective", "early_stopping"),
    [("regression", False), ("binary", False), ("multiclass", False), ("regression", True)],
)
def test_same_numbers_as_booster_predict(objective: str, early_stopping: bool) -> None:
    booster = _booster(objective, early_stopping)
    if early_stopping:
        assert 0 < booster.best_iteration < booster.current_iteration()
    fast = SingleRowPredictor(booster)
    x, _ = _data(2, 200)
    for rows in range(1, MAX_ROWS + 1):
        matrix = x[:rows]
        expected = booster.predict(matrix, num_threads=1)
        assert np.array_equal(fast.predict(matrix), expected)
    # A view with strides (a column slice) and Fortran order give the same numbers too.
    wide = np.hstack([x[:5], x[:5]])[:, :COLUMNS]
    assert np.array_equal(fast.predict(wide), booster.predict(x[:5], num_threads=1))
    assert np.array_equal(
        fast.predict(np.asfortranarray(x[:5])), booster.predict(x[:5], num_threads=1)
    )


def test_threads_each_get_their_own_config() -> None:
    booster = _booster("regression")
    fast = SingleRowPredictor(booster)
    x, _ = _data(3, 4000)
    expected = booster.predict(x, num_threads=1)

    def score(start: int) -> bool:
        return all(
            np.array_equal(fast.predict(x[i : i + 3]), expected[i : i + 3])
            for i in range(start, len(x) - 3, 4)
        )

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(score, range(4)))
    assert len(fast._configs) >= 2  # several threads did predict, each on its own config


def test_a_matrix_of_the_wrong_width_is_refused() -> None:
    fast = SingleRowPredictor(_booster("regression"))
    with pytest.raises(ValueError, match=f"{COLUMNS} columns"):
        fast.predict(np.zeros((2, COLUMNS + 1)))


def test_configs_freed_with_the_predictor() -> None:
    fast = SingleRowPredictor(_booster("regression"))
    fast.predict(np.zeros((1, COLUMNS)))
    configs = fast._configs
    assert len(configs) == 1
    del fast
    assert configs == []  # LGBM_FastConfigFree ran (weakref.finalize on collection)
