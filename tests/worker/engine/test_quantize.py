"""dynamic_int8 and static_int8 on the example digits CNN: the artifact runs and is smaller, close and accurate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from .conftest import FAST_BENCHMARK, Runner, make_mlp


@pytest.fixture(scope="module")
def results(example, tmp_path_factory) -> dict:
    run = Runner(tmp_path_factory.mktemp("quantize"))
    out = {}
    for method in ("dynamic_int8", "static_int8"):
        config = {"method": method, "benchmark": FAST_BENCHMARK, "calibration": {"samples": 256}}
        out[method] = (run(example["onnx"], config, Path(example["dataset"])), run.progress)
    return out


@pytest.mark.parametrize("method", ["dynamic_int8", "static_int8"])
def test_quantized_model_is_smaller_close_and_accurate(results, example, method):
    result, _ = results[method]
    assert result.artifact_format == "onnx"
    assert result.artifact_path.is_file() and result.artifact_path.suffix == ".onnx"

    # The artifact runs on its own in onnxruntime and keeps the output shape.
    data = np.load(example["dataset"])
    x = data["x_test"][:5]
    cpu = ["CPUExecutionProvider"]
    base = ort.InferenceSession(example["onnx"], providers=cpu).run(None, {"input": x})[0]
    quant = ort.InferenceSession(str(result.artifact_path), providers=cpu).run(None, {"input": x})[0]
    assert quant.shape == base.shape == (5, 10)

    m = result.metrics
    assert m["method"]["name"] == method
    assert m["ratios"]["size"] < 0.5
    assert m["result"]["size_bytes"] < 0.5 * m["baseline"]["size_bytes"]
    # Static int8 of this small CNN measured 19.9 dB on an AVX2-only Xeon (over 20 in an earlier CI run): 18 dB
    # (noise under 1.6% of the signal power) is the floor; cosine, agreement and accuracy bound it as well.
    assert m["result"]["sqnr_db"] > 18.0
    assert m["result"]["cosine"] > 0.99
    assert m["result"]["agreement"] > 0.95
    assert m["baseline"]["accuracy"] > 0.9
    assert m["accuracy_drop"] < 0.02
    assert m["within_accuracy_budget"] == (m["accuracy_drop"] <= 0.01)
    assert 0.9 < m["result"]["f1_macro"] <= 1.0


@pytest.mark.parametrize("method", ["dynamic_int8", "static_int8"])
def test_metrics_have_the_documented_shape(results, method):
    m = results[method][0].metrics
    json.dumps(m, allow_nan=False)
    for side in ("baseline", "result"):
        assert {"size_bytes", "params", "latency_ms", "accuracy", "f1_macro"} <= set(m[side])
        assert set(m[side]["latency_ms"]) == {"1", "32"}
        for stats in m[side]["latency_ms"].values():
            assert set(stats) == {"p50", "p95", "mean"} and all(v > 0 for v in stats.values())
    assert {"agreement", "cosine", "sqnr_db"} <= set(m["result"])
    assert set(m["ratios"]["speedup"]) == {"1", "32"}
    assert m["slower_than_baseline"] == any(s < 1 for s in m["ratios"]["speedup"].values())
    assert m["device"] == "cpu" and m["execution_provider"] == "CPUExecutionProvider"
    assert set(m["versions"]) == {"onnx", "onnxruntime", "numpy", "torch", "torch_pruning"}
    assert m["model_format"] == m["artifact_format"] == "onnx" and "baseline_same_runtime" not in m
    for side in ("baseline", "result"):
        assert m[side]["peak_memory_bytes"] >= 0
    assert m["peak_memory"]["batch_size"] == 32
    assert m["baseline"]["macs"] > 1e6 and m["result"]["macs"] is None  # a quantized graph has no float layers
    assert m["ratios"]["macs"] is None
    assert m["inputs"] == [{"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]
    assert m["evaluation"] == {"data": "held-out", "rows": 360, "labels": True}
    assert m["max_accuracy_drop"] == 0.01
    assert m["config"]["benchmark"] == {"batch_sizes": [1, 32], "repeats": 3, "warmup": 1}
    assert m["config"]["per_channel"] is True


def test_static_records_its_calibration(results):
    facts = results["static_int8"][0].metrics["method"]
    assert facts["quant_format"] == "QDQ" and facts["per_channel"] is True
    assert facts["calibration"] == {"method": "minmax", "samples": 256, "requested_samples": 256, "split": "train"}
    assert facts["quantized_ops"]["QuantizeLinear"] > 0


def test_dynamic_quantizes_convs_and_matmuls(results):
    ops = results["dynamic_int8"][0].metrics["method"]["quantized_ops"]
    assert ops.get("ConvInteger", 0) == 2 and ops.get("MatMulInteger", 0) == 2


@pytest.mark.parametrize("method", ["dynamic_int8", "static_int8"])
def test_progress_is_monotonic_and_ends_at_one(results, method):
    values = [p for p, _ in results[method][1]]
    assert values and values == sorted(values)
    assert all(0.0 <= p <= 1.0 for p in values)
    assert values[-1] == 1.0
    stages = " ".join(stage for _, stage in results[method][1])
    for word in ("loading", "quantizing", "verifying", "measuring"):
        assert word in stages
    if method == "static_int8":
        assert "calibrating" in stages


def test_artifact_is_the_only_file_left(results):
    for result, _ in results.values():
        assert [p.name for p in result.artifact_path.parent.iterdir()] == [result.artifact_path.name]


def test_overrides_reach_the_quantizer(example, run):
    config = {
        "method": "static_int8",
        "per_channel": False,
        "calibration": {"samples": 64, "method": "percentile"},
        "max_accuracy_drop": 0.05,
        "benchmark": {"batch_sizes": [1, 1000], "repeats": 2, "warmup": 0},
    }
    m = run(example["onnx"], config, Path(example["dataset"])).metrics
    assert m["method"]["per_channel"] is False
    assert m["method"]["calibration"]["method"] == "percentile"
    assert m["method"]["calibration"]["samples"] == 64
    assert m["max_accuracy_drop"] == 0.05
    assert m["within_accuracy_budget"] == (m["accuracy_drop"] <= 0.05)
    # Batch 1000 is clipped to the 360 test rows.
    assert set(m["baseline"]["latency_ms"]) == {"1", "360"}
    assert any("clipped" in note for note in m["notes"])
    assert m["result"]["agreement"] > 0.9


def test_without_a_dataset_fidelity_is_measured_on_random_inputs(example, run):
    m = run(example["onnx"], {"method": "dynamic_int8", "benchmark": FAST_BENCHMARK}).metrics
    json.dumps(m, allow_nan=False)
    assert m["evaluation"]["data"] == "synthetic" and m["evaluation"]["labels"] is False
    assert "accuracy" not in m["baseline"] and "within_accuracy_budget" not in m
    assert m["result"]["sqnr_db"] > 15.0
    assert m["ratios"]["size"] < 0.5


def test_static_per_channel_upgrades_an_old_opset(run, tmp_path):
    model = make_mlp(tmp_path / "mlp11.onnx", opset=11)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", a=rng.normal(size=(60, 6)), b=rng.normal(size=(60, 10)))
    result = run(model, {"method": "static_int8", "benchmark": FAST_BENCHMARK}, tmp_path / "d.npz")
    assert result.metrics["method"]["opset_upgraded"] == {"from": 11, "to": 13}
    proto = onnx.load(str(result.artifact_path))
    assert {o.domain or "ai.onnx": o.version for o in proto.opset_import}["ai.onnx"] == 13
    assert result.metrics["result"]["sqnr_db"] > 15.0


@pytest.mark.parametrize("method", ["dynamic_int8", "static_int8"])
def test_artifact_declares_only_the_domains_it_uses(results, method):
    proto = onnx.load(str(results[method][0].artifact_path))
    used = {n.domain for n in proto.graph.node} | {""}
    assert {o.domain for o in proto.opset_import} <= used | {"ai.onnx"}


def test_dynamic_quantizes_embeddings(run, tmp_path):
    """ids (N, 8) -> Gather(table 2000x64) -> mean over tokens -> MatMul: the embedding table is stored as int8."""
    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.normal(size=(2000, 64)).astype(np.float32), "table")
    head = numpy_helper.from_array(rng.normal(size=(64, 4)).astype(np.float32) / 8, "head")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0),
            helper.make_node("ReduceMean", ["emb"], ["pooled"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["pooled", "head"], ["logits"]),
        ],
        "embedder",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        initializer=[table, head],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "embedder.onnx"
    onnx.save(model, str(path))
    np.savez(tmp_path / "ids.npz", x=rng.integers(0, 2000, size=(200, 8)))
    m = run(path, {"method": "dynamic_int8", "benchmark": FAST_BENCHMARK}, tmp_path / "ids.npz").metrics
    assert m["ratios"]["size"] < 0.35
    assert m["inputs"] == [{"name": "ids", "shape": ["batch", 8], "dtype": "int64"}]
    assert m["result"]["sqnr_db"] > 20.0 and m["result"]["agreement"] > 0.9
    assert "accuracy" not in m["result"]  # no labels
