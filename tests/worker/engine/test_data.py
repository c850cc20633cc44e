"""The dataset contract: keys, held-out vs seeded split, dtype casts, multi-input and fixed-batch models."""

from __future__ import annotations

import json

import numpy as np
import onnx

from worker.engine.data import TensorSpec, dataset_from_arrays, iter_batches, synthetic_feeds

from .conftest import FAST_BENCHMARK, make_mlp

SPEC = (TensorSpec("input", ("batch", 4), np.dtype("float32")),)


def test_seeded_80_20_split_when_there_is_no_test_set():
    x = np.arange(200, dtype=np.float64).reshape(50, 4)
    y = np.arange(50) % 3
    a = dataset_from_arrays({"x": x, "y": y}, SPEC)
    b = dataset_from_arrays({"x": x, "y": y}, SPEC)
    assert a.test_source == "seeded 80/20 split"
    assert len(a.train) == 40 and len(a.test) == 10
    np.testing.assert_array_equal(a.test.x["input"], b.test.x["input"])
    assert a.train.x["input"].dtype == np.float32  # cast to the model's dtype
    rows = {tuple(r) for r in a.train.x["input"]} | {tuple(r) for r in a.test.x["input"]}
    assert len(rows) == 50  # a partition
    # labels follow their rows
    np.testing.assert_array_equal(a.test.y, (a.test.x["input"][:, 0] / 4).astype(int) % 3)


def test_held_out_split_and_input_named_keys():
    arrays = {"input": np.zeros((8, 4)), "input_test": np.ones((3, 4)), "y_test": np.array([0, 1, 2])}
    d = dataset_from_arrays(arrays, SPEC)
    assert d.test_source == "held-out" and len(d.train) == 8 and len(d.test) == 3
    assert d.train.y is None and d.test.y.tolist() == [0, 1, 2]


def test_fixed_batch_iteration_pads_the_last_batch():
    feeds = {"input": np.arange(5, dtype=np.float32)[:, None]}
    batches = list(iter_batches(feeds, 256, fixed_batch=2))
    assert [real for _, real in batches] == [2, 2, 1]
    assert all(len(b["input"]) == 2 for b, _ in batches)
    assert [len(b["input"]) for b, _ in iter_batches(feeds, 3)] == [3, 2]


def test_synthetic_feeds_follow_the_input_specs():
    specs = (
        TensorSpec("ids", ("batch", "seq"), np.dtype("int64")),
        TensorSpec("img", (None, 3, 4), np.dtype("float32")),
    )
    feeds = synthetic_feeds(specs, 6, seed=0)
    assert feeds["ids"].shape == (6, 1) and feeds["ids"].dtype == np.int64 and feeds["ids"].max() <= 1
    assert feeds["img"].shape == (6, 3, 4) and feeds["img"].dtype == np.float32
    np.testing.assert_array_equal(feeds["img"], synthetic_feeds(specs, 6, seed=0)["img"])


def test_multi_input_model_with_a_seeded_split(run, tmp_path):
    make_mlp(tmp_path / "mlp.onnx")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(100, 6)), rng.normal(size=(100, 10))  # float64: cast to float32
    np.savez(tmp_path / "d.npz", a=a, b=b, y=rng.integers(0, 5, 100))
    for method in ("dynamic_int8", "static_int8"):
        m = run(tmp_path / "mlp.onnx", {"method": method, "benchmark": FAST_BENCHMARK}, tmp_path / "d.npz").metrics
        json.dumps(m, allow_nan=False)
        assert m["evaluation"] == {"data": "seeded 80/20 split", "rows": 20, "labels": True}
        assert [i["name"] for i in m["inputs"]] == ["a", "b"]
        assert set(m["baseline"]["latency_ms"]) == {"1", "20"}  # 32 clipped to the 20 test rows
        assert m["result"]["sqnr_db"] > 15.0
        assert "accuracy" in m["result"]


def test_fixed_batch_of_one_is_fed_one_row_at_a_time(run, example, tmp_path):
    proto = onnx.load(example["onnx"])
    for value in (proto.graph.input[0], proto.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    path = tmp_path / "fixed.onnx"
    onnx.save(proto, str(path))
    config = {"method": "static_int8", "benchmark": FAST_BENCHMARK, "calibration": {"samples": 40}}
    result = run(path, config, example["dataset"])
    m = result.metrics
    assert m["inputs"][0]["shape"] == [1, 1, 8, 8]
    assert set(m["baseline"]["latency_ms"]) == {"1"}
    assert any("fixed batch" in note for note in m["notes"])
    assert m["evaluation"]["rows"] == 360 and m["result"]["agreement"] > 0.95
    assert m["method"]["calibration"]["samples"] == 40
