from __future__ import annotations

import json
import math

import numpy as np

from worker.engine.measure import (
    SQNR_CAP_DB,
    classification_metrics,
    fidelity_metrics,
    json_safe,
    measure_latency,
    plan_batch_sizes,
)


def test_fidelity_of_identical_and_noisy_outputs():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(100, 10)).astype(np.float32)
    same = fidelity_metrics(ref, ref.copy())
    assert same == {"agreement": 1.0, "cosine": same["cosine"], "sqnr_db": SQNR_CAP_DB}
    assert math.isclose(same["cosine"], 1.0, rel_tol=1e-9)

    noisy = ref + 0.01 * rng.normal(size=ref.shape).astype(np.float32)
    m = fidelity_metrics(ref, noisy)
    assert 35 < m["sqnr_db"] < 45  # signal variance 1, noise variance 1e-4: 40 dB
    assert m["agreement"] > 0.95 and m["cosine"] > 0.999


def test_fidelity_handles_zero_rows_and_single_outputs():
    ref = np.zeros((3, 4), np.float32)
    m = fidelity_metrics(ref, ref)
    assert m["cosine"] == 1.0 and m["sqnr_db"] == SQNR_CAP_DB
    m = fidelity_metrics(ref, np.ones((3, 4), np.float32))
    assert m["cosine"] == 0.0 and m["sqnr_db"] == -SQNR_CAP_DB
    m = fidelity_metrics(np.arange(5.0)[:, None], np.arange(5.0)[:, None])
    assert "agreement" not in m  # one value per row: no class axis


def test_classification_metrics():
    logits = np.eye(3)[[0, 1, 2, 0]]
    m = classification_metrics(logits, np.array([0, 1, 2, 1]))
    assert m["accuracy"] == 0.75
    assert math.isclose(m["f1_macro"], (2 / 3 + 2 / 3 + 1) / 3)


def test_plan_batch_sizes():
    assert plan_batch_sizes([1, 64], 360, None) == ([1, 64], [])
    used, notes = plan_batch_sizes([1, 64, 128], 50, None)
    assert used == [1, 50] and len(notes) == 2
    used, notes = plan_batch_sizes([1, 64], 360, 1)
    assert used == [1] and "fixed batch" in notes[0]


def test_latency_is_measured_for_every_runner():
    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def run(self, feeds):
            calls.append(self.name)
            return [np.zeros(1)]

    stats = measure_latency([Fake("a"), Fake("b")], {"x": np.zeros(1)}, repeats=12, warmup=1)
    assert len(stats) == 2 and all(set(s) == {"p50", "p95", "mean"} for s in stats)
    # warm-up, then turns: 2 untimed + 10 timed calls each, then the order reversed for the last 2 timed calls
    assert calls == ["a", "b"] + ["a"] * 12 + ["b"] * 12 + ["b"] * 4 + ["a"] * 4


def test_json_safe():
    value = {"a": np.float32(1.5), "b": (np.int64(2), float("nan")), "c": np.array([1, 2]), 3: float("inf")}
    safe = json_safe(value)
    assert safe == {"a": 1.5, "b": [2, None], "c": [1, 2], "3": None}
    json.dumps(safe, allow_nan=False)
