"""TorchScript uploads, fp16/bf16 and auto: every artifact loads back and runs; speedups compare like with like."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from .conftest import FAST_BENCHMARK, Runner

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def torchscript_results(small_example, tmp_path_factory) -> dict:
    run = Runner(tmp_path_factory.mktemp("quantize_ts"))
    out = {}
    for method in ("dynamic_int8", "static_int8", "fp16", "bf16"):
        config = {"method": method, "benchmark": FAST_BENCHMARK, "calibration": {"samples": 128}}
        out[method] = run(small_example["torchscript"], config, Path(small_example["dataset"]),
                          model_format="torchscript")
    return out


def _x(example, rows=6) -> np.ndarray:
    return np.load(example["dataset"])["x_test"][:rows]


@pytest.mark.parametrize(("method", "artifact_format"), [("dynamic_int8", "torchscript"), ("static_int8", "onnx"),
                                                          ("fp16", "torchscript"), ("bf16", "torchscript")])
def test_torchscript_upload_quantizes_and_the_artifact_runs(torchscript_results, small_example, method,
                                                            artifact_format):
    result = torchscript_results[method]
    m = result.metrics
    json.dumps(m, allow_nan=False)
    assert result.artifact_format == artifact_format == m["artifact_format"]
    assert m["model_format"] == "torchscript" and m["execution_provider"] == "torch (cpu)"
    assert m["inputs"] == [{"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]
    assert m["outputs"] == [{"name": "output_0", "shape": ["batch", 10], "dtype": "float32"}]
    x = _x(small_example)
    if artifact_format == "torchscript":
        out = torch.jit.load(str(result.artifact_path))(torch.from_numpy(x)).float().detach().numpy()
    else:
        out = ort.InferenceSession(str(result.artifact_path), providers=["CPUExecutionProvider"]).run(None, {
            "input": x})[0]
    assert out.shape == (6, 10) and out.dtype == np.float32
    assert m["baseline"]["accuracy"] > 0.85
    assert m["accuracy_drop"] <= 0.02
    assert m["result"]["agreement"] >= 0.97 and m["result"]["cosine"] > 0.99
    assert m["baseline"]["macs"] > 1e5


def test_dynamic_int8_in_torch_quantizes_the_linear_layers(torchscript_results):
    m = torchscript_results["dynamic_int8"].metrics
    assert m["method"]["runtime"] == "torch" and m["method"]["quantized_modules"] == {"Linear": 2}
    assert any("convolutions stay fp32" in note for note in m["notes"])
    assert m["result"]["params"] == m["baseline"]["params"]  # int8 weights are counted, not lost
    assert m["ratios"]["size"] < 0.6  # the Linear layers hold most of the weights


def test_half_precision_halves_the_file(torchscript_results):
    for method in ("fp16", "bf16"):
        m = torchscript_results[method].metrics
        assert m["method"]["io"] == "float32"
        assert m["ratios"]["size"] < 0.6
    assert torchscript_results["fp16"].metrics["result"]["sqnr_db"] > 30
    assert torchscript_results["bf16"].metrics["result"]["sqnr_db"] > 20


def test_a_different_runtime_is_compared_like_with_like(torchscript_results):
    """static_int8 writes ONNX for a TorchScript upload: the speedup is against the upload run in onnxruntime."""
    m = torchscript_results["static_int8"].metrics
    same = m["baseline_same_runtime"]
    assert same["format"] == "onnx" and same["cosine"] > 0.9999 and same["accuracy"] == m["baseline"]["accuracy"]
    for batch, ratio in m["ratios"]["speedup"].items():
        expected = same["latency_ms"][batch]["p50"] / m["result"]["latency_ms"][batch]["p50"]
        assert ratio == pytest.approx(expected, rel=1e-3)
    assert any("like with like" in note for note in m["notes"])
    for method in ("dynamic_int8", "fp16", "bf16"):
        assert "baseline_same_runtime" not in torchscript_results[method].metrics


def test_onnx_upload_to_torchscript_output_measures_both_runtimes(small_example, run):
    config = {"method": "fp16", "output_format": "torchscript", "benchmark": FAST_BENCHMARK}
    result = run(small_example["onnx"], config, Path(small_example["dataset"]))
    m = result.metrics
    assert result.artifact_format == "torchscript" and result.artifact_path.suffix == ".pt"
    assert m["baseline_same_runtime"]["format"] == "torchscript"
    assert m["execution_provider"] == "CPUExecutionProvider"
    assert m["result"]["agreement"] >= 0.99


def test_fp16_onnx_keeps_float32_io(small_example, run):
    result = run(small_example["onnx"], {"method": "fp16", "benchmark": FAST_BENCHMARK}, Path(small_example["dataset"]))
    proto = onnx.load(str(result.artifact_path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in proto.graph.initializer)
    m = result.metrics
    assert m["ratios"]["size"] < 0.6 and m["result"]["sqnr_db"] > 30
    assert any("fp16" in note for note in m["notes"])


@pytest.fixture(scope="module")
def auto_result(example, tmp_path_factory):
    run = Runner(tmp_path_factory.mktemp("auto"))
    config = {"method": "auto", "benchmark": {"batch_sizes": [1, 64], "repeats": 5, "warmup": 1},
              "calibration": {"samples": 256}}
    return run(example["onnx"], config, Path(example["dataset"]))


def test_auto_keeps_the_fastest_candidate_within_budget_and_records_every_candidate(auto_result):
    m = auto_result.metrics
    json.dumps(m, allow_nan=False)
    facts = m["method"]
    assert facts["name"] == "auto"
    assert facts["chosen_method"]["name"] == facts["chosen"]
    assert facts["batch_size"] == 64 and facts["reason"]
    candidates = {c["method"]: c for c in facts["candidates"]}
    assert set(candidates) == {"dynamic_int8", "static_int8", "fp16"}
    for c in candidates.values():
        assert {"latency_ms_p50", "baseline_latency_ms_p50", "speedup", "accuracy", "accuracy_drop", "agreement",
                "cosine", "within_budget", "faster", "size_bytes"} <= set(c)
    # Which candidate wins is a timing question (bench/; on this CPU dynamic int8's ConvInteger is several times
    # slower than fp32): the test checks that the choice follows the rule on the figures auto recorded.
    eligible = [c for c in candidates.values() if c["within_budget"] and c["faster"]]
    if eligible:
        assert facts["chosen"] == min(eligible, key=lambda c: c["latency_ms_p50"])["method"] and not facts["flagged"]
    else:
        assert facts["flagged"]
        within = [c for c in candidates.values() if c["within_budget"]]
        if within:  # none clearly faster: the least slow one within the budget
            assert facts["chosen"] == min(within, key=lambda c: c["latency_ms_p50"])["method"]
    assert auto_result.artifact_path.name == f"model.{facts['chosen']}.onnx"
    assert [p.name for p in auto_result.artifact_path.parent.iterdir()] == [auto_result.artifact_path.name]


def test_auto_without_a_dataset_uses_the_fidelity_floor(small_example, run):
    result = run(small_example["onnx"], {"method": "auto", "benchmark": FAST_BENCHMARK})
    facts = result.metrics["method"]
    assert {c["method"] for c in facts["candidates"]} == {"dynamic_int8", "fp16"}  # static needs calibration data
    assert "agreement and cosine >= 0.99" in facts["criterion"]
    chosen = next(c for c in facts["candidates"] if c["method"] == facts["chosen"])
    assert chosen["within_budget"] or facts["flagged"]
    assert all("accuracy" not in c for c in facts["candidates"])


def test_auto_with_a_torchscript_upload_builds_each_candidate_in_its_format(small_example, run):
    result = run(small_example["torchscript"], {"method": "auto", "benchmark": FAST_BENCHMARK,
                                                "calibration": {"samples": 64}},
                 Path(small_example["dataset"]), model_format="torchscript")
    candidates = {c["method"]: c["format"] for c in result.metrics["method"]["candidates"]}
    assert candidates == {"dynamic_int8": "torchscript", "static_int8": "onnx", "fp16": "torchscript"}
    assert result.artifact_format == candidates[result.metrics["method"]["chosen"]]


class _Embedder(torch.nn.Module):
    """ids (N, 6) -> Embedding(3000, 64) -> mean over tokens -> Linear(64, 4)."""

    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(3000, 64)
        self.head = torch.nn.Linear(64, 4)

    def forward(self, ids):
        return self.head(self.embedding(ids).mean(dim=1))


def test_torchscript_with_integer_inputs_quantizes_its_embedding(run, tmp_path):
    torch.manual_seed(0)
    ids = np.random.default_rng(0).integers(0, 3000, size=(120, 6)).astype(np.int32)  # fed to the model as int64
    traced = torch.jit.trace(_Embedder().eval(), (torch.from_numpy(ids[:2].astype(np.int64)),))
    traced.save(str(tmp_path / "embedder.pt"))
    np.savez(tmp_path / "ids.npz", x=ids)
    result = run(tmp_path / "embedder.pt", {"method": "dynamic_int8", "benchmark": FAST_BENCHMARK},
                 tmp_path / "ids.npz", model_format="torchscript")
    m = result.metrics
    assert m["inputs"] == [{"name": "ids", "shape": ["batch", 6], "dtype": "int64"}]
    assert m["method"]["quantized_modules"] == {"Embedding": 1, "Linear": 1}
    assert m["ratios"]["size"] < 0.45 and m["result"]["params"] >= 0.99 * m["baseline"]["params"]
    assert m["result"]["agreement"] >= 0.95 and m["result"]["sqnr_db"] > 20


def _candidate(method: str, p50: float, base_p50: float, drop: float, max_drop: float = 0.01) -> dict:
    """A candidate's figures as quantize_auto records them."""
    from worker.engine.quantize import AUTO_MIN_SPEEDUP

    speedup = round(base_p50 / p50, 4)
    return {"method": method, "runtime": "CPUExecutionProvider", "latency_ms_p50": p50, "speedup": speedup,
            "faster": speedup >= AUTO_MIN_SPEEDUP, "accuracy": 0.98 - drop, "accuracy_drop": drop,
            "agreement": 1.0 - drop, "cosine": 0.999, "within_budget": drop <= max_drop}


def test_auto_is_not_fooled_by_a_slow_accurate_int8_candidate():
    """The case the issue warns of: ONNX Runtime's dynamic int8 2.6x SLOWER than fp32 on a CNN while static QDQ is
    1.5x faster. The fastest candidate within the budget wins; a slower one never does, however accurate."""
    from worker.engine.quantize import AUTO_MIN_SPEEDUP, _choose

    base = 2.0
    measured = [_candidate("dynamic_int8", base * 2.6, base, 0.0), _candidate("static_int8", base / 1.5, base, 0.004),
                _candidate("fp16", base, base, 0.0)]
    chosen, why, flagged = _choose(measured, labelled=True, max_drop=0.01)
    assert chosen["method"] == "static_int8" and not flagged and "fastest candidate within the budget" in why
    # a faster candidate past the accuracy budget is not kept either
    measured[1] = _candidate("static_int8", base / 1.5, base, 0.02)
    chosen, why, flagged = _choose(measured, labelled=True, max_drop=0.01)
    assert chosen["method"] == "fp16" and flagged and "kept the fastest of them" in why  # nothing faster: flagged
    # nothing within the budget: the most faithful one, flagged
    measured = [_candidate("dynamic_int8", base * 2.6, base, 0.015), _candidate("static_int8", base / 1.5, base, 0.03)]
    chosen, why, flagged = _choose(measured, labelled=True, max_drop=0.01)
    assert chosen["method"] == "dynamic_int8" and flagged and "kept the most faithful" in why
