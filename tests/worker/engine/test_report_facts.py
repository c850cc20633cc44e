"""What every report states about itself: parameter counts that quantization does not inflate (scales and zero
points apart, in quant_params), library versions as installed, and progress rounded to 3 decimals."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from worker.engine.core import RunContext, monotonic_context, scoped_context
from worker.engine.onnx_io import count_quant_params, count_weights, param_counts
from worker.engine.versions import ENGINE_PACKAGES, engine_versions, installed_version

from .conftest import FAST_BENCHMARK

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def quantized(small_example, tmp_path_factory) -> dict:
    from .conftest import Runner

    run = Runner(tmp_path_factory.mktemp("report_facts"))
    out = {}
    for method in ("static_int8", "dynamic_int8", "fp16"):
        config = {"method": method, "benchmark": FAST_BENCHMARK, "calibration": {"samples": 64}}
        result = run(small_example["onnx"], config, Path(small_example["dataset"]))
        out[method] = (result, list(run.progress))
    return out


def _scale_and_zero_point_elements(path: Path) -> int:
    """Independent count: the quantizers name what they add `<tensor>_scale` / `<tensor>_zero_point`."""
    proto = onnx.load(str(path))
    return sum(int(np.prod(t.dims)) for t in proto.graph.initializer
               if t.name.endswith(("_scale", "_zero_point")))


@pytest.mark.parametrize("method", ["static_int8", "dynamic_int8", "fp16"])
def test_quantization_keeps_the_parameter_count(quantized, small_example, method):
    result, _ = quantized[method]
    m = result.metrics
    assert m["baseline"]["params"] == small_example["params"]  # weights and biases of the example CNN
    assert m["result"]["params"] == m["baseline"]["params"]  # int8 weights and int32 biases, the same tensors
    assert m["ratios"]["params"] == 1.0
    assert m["baseline"]["quant_params"] == 0
    expected = 0 if method == "fp16" else _scale_and_zero_point_elements(result.artifact_path)
    assert m["result"]["quant_params"] == expected
    if method == "static_int8":
        # per-channel weight scales and zero points, bias scales and zero points, activation pairs
        assert m["result"]["quant_params"] > 2 * 16


def test_param_counts_split_a_qdq_graph():
    """x -> QuantizeLinear -> DequantizeLinear -> MatMul(DequantizeLinear(int8 W)) -> Reshape(shape)."""
    w = numpy_helper.from_array(np.ones((4, 3), np.int8), "w_quantized")
    tensors = [
        w,
        numpy_helper.from_array(np.full(3, 0.1, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(3, np.int8), "w_zero_point"),
        numpy_helper.from_array(np.array(0.05, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "x_zero_point"),
        numpy_helper.from_array(np.array([-1, 3], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero_point"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero_point"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_quantized", "w_scale", "w_zero_point"], ["wd"], axis=1),
        helper.make_node("MatMul", ["xd", "wd"], ["y0"]),
        helper.make_node("Reshape", ["y0", "shape"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])], initializer=tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    assert param_counts(model) == (12, 3 + 3 + 1 + 1)
    assert count_weights(model) == 12 and count_quant_params(model) == 8


def test_versions_are_the_installed_distributions(quantized):
    result, _ = quantized["fp16"]
    versions = result.metrics["versions"]
    assert set(versions) == set(ENGINE_PACKAGES)
    distributions = {"onnx": "onnx", "numpy": "numpy", "torch": "torch", "torch_pruning": "torch-pruning"}
    for name, dist in distributions.items():
        assert versions[name] == metadata.version(dist), name
    runtime = metadata.packages_distributions()["onnxruntime"][0]  # onnxruntime or onnxruntime-gpu
    assert versions["onnxruntime"] == metadata.version(runtime)
    assert engine_versions() == versions
    assert installed_version("no_such_package_here") is None


def test_progress_is_rounded_to_three_decimals(quantized):
    for result, progress in quantized.values():
        values = [p for p, _ in progress]
        assert values and values == sorted(values) and values[-1] == 1.0
        assert all(p == round(p, 3) for p in values), [p for p in values if p != round(p, 3)]


def test_scoped_progress_is_rounded():
    seen = []
    ctx = monotonic_context(RunContext("cpu", Path("."), progress=lambda p, s: seen.append(p)))
    inner = scoped_context(scoped_context(ctx, 0.12, 0.55), 0.1, 0.3)
    for p in (0.0, 1 / 3, 0.7, 1.0):
        inner.progress(p, "step")
    assert seen == [0.163, 0.192, 0.223, 0.249]
