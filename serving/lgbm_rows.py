"""LightGBM's single-row C API for the small batches the predictor runs most.

``Booster.predict`` costs about 30 us of Python and C set-up per call whatever the rows (it
builds an _InnerPredictor, copies its parameters, and the C side parses them into a Config and
builds a Predictor), measured with 100 trees and 12 features: 35 us for 2 rows, 130 us for 16.
LightGBM's ``FastConfig`` does that set-up once: ``LGBM_BoosterPredictForMatSingleRowFast``
then scores one row in about 5 us (2 rows: 9 us, 4 rows: 16 us, 16 rows: 106 us). The
predictor's batches at 8 clients hold one to four rows, so this path takes the rows one by one
up to ``MAX_ROWS`` and leaves larger batches to Booster.predict, whose per-row cost is lower.

The results are the same numbers: the same trees evaluated by the same C code, the same
iterations (the booster's best, else all) and the objective's transform (C_API_PREDICT_NORMAL,
as Booster.predict's default). tests/unit/test_lgbm_rows.py compares them bit for bit.

Threads: since LightGBM 4.1 a FastConfig holds its own buffers (LightGBM PR #6024), so one
config must not serve two threads at once. Each thread that predicts gets its own, made on its
first call; all are freed, before the booster they point into can be, when this object goes.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from typing import Any

import numpy as np
import numpy.typing as npt

MAX_ROWS = 8  # above this, Booster.predict's per-call set-up is paid back (module docstring)


class SingleRowPredictor:
    """Scores a float64 matrix of at most MAX_ROWS rows with one booster (module docstring)."""

    def __init__(self, booster: Any) -> None:
        from lightgbm import basic

        lib: Any = basic._LIB  # type: ignore[attr-defined]  # the library Booster.predict calls
        self._lib = lib
        self._booster = booster  # kept alive while any config points into it
        self._columns = int(booster.num_feature())
        # Values per row: 1, or one per class (multiclass); the C call writes all of them.
        self._outputs = int(booster.num_model_per_iteration())
        best = int(getattr(booster, "best_iteration", 0) or 0)
        self._init_args = (
            ctypes.c_int(basic._C_API_PREDICT_NORMAL),
            ctypes.c_int(0),  # start iteration
            ctypes.c_int(best if best > 0 else -1),  # as Booster.predict: the best, else all
            ctypes.c_int(basic._C_API_DTYPE_FLOAT64),
            ctypes.c_int32(self._columns),
            ctypes.c_char_p(b"num_threads=1"),
        )
        self._local = threading.local()
        self._configs: list[ctypes.c_void_p] = []
        self._lock = threading.Lock()
        self._predict_row = lib.LGBM_BoosterPredictForMatSingleRowFast
        self._finalizer = weakref.finalize(self, _free, lib, self._configs, booster)

    def _config(self) -> ctypes.c_void_p:
        config: ctypes.c_void_p | None = getattr(self._local, "config", None)
        if config is None:
            config = ctypes.c_void_p()
            _check(
                self._lib,
                self._lib.LGBM_BoosterPredictForMatSingleRowFastInit(
                    self._booster._handle, *self._init_args, ctypes.byref(config)
                ),
            )
            with self._lock:
                self._configs.append(config)
            self._local.config = config
        return config

    def predict(self, matrix: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        rows = np.ascontiguousarray(matrix, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] != self._columns:
            raise ValueError(f"expected a matrix of {self._columns} columns, got {rows.shape}")
        outputs = self._outputs
        # Shaped as Booster.predict's: one value per row, or a row of one per class.
        out = np.empty((rows.shape[0], outputs) if outputs > 1 else rows.shape[0])
        config, written = self._config(), ctypes.c_int64(0)
        base, stride, target = rows.ctypes.data, rows.strides[0], out.ctypes.data
        step = 8 * outputs
        for i in range(rows.shape[0]):
            _check(
                self._lib,
                self._predict_row(
                    config,
                    ctypes.c_void_p(base + i * stride),
                    ctypes.byref(written),
                    ctypes.c_void_p(target + step * i),
                ),
            )
        return out


def _check(lib: Any, code: int) -> None:
    if code != 0:
        from lightgbm.basic import LightGBMError

        raise LightGBMError(lib.LGBM_GetLastError().decode("utf-8"))


def _free(lib: Any, configs: list[ctypes.c_void_p], _booster: Any) -> None:
    """Frees the configs; holds the booster until then (a config points into it)."""
    for config in configs:
        lib.LGBM_FastConfigFree(config)
    configs.clear()
