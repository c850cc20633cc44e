"""Fixtures for engine tests: the example digits CNN (trained once per session, seeded) and a job runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from worker.engine import JobResult, JobSpec, RunContext, run_job
from worker.examples import write_example

#: A short benchmark: tests check what is measured, never how fast.
FAST_BENCHMARK = {"batch_sizes": [1, 32], "repeats": 3, "warmup": 1}


@pytest.fixture(scope="session")
def example(tmp_path_factory) -> dict:
    """digits_cnn.onnx / .pt and digits.npz as `python -m worker.examples` writes them."""
    out = tmp_path_factory.mktemp("example")
    summary = write_example(out, seed=0)
    return {**summary, "dir": out}


@pytest.fixture(scope="session")
def small_example(tmp_path_factory) -> dict:
    """The example CNN at width 16 (fast to prune, convert and fine-tune), trained briefly; same files and dataset."""
    out = tmp_path_factory.mktemp("small_example")
    summary = write_example(out, seed=0, epochs=6, width=16)
    return {**summary, "dir": out}


class Runner:
    """Runs jobs in fresh work folders under tmp_path and records the progress they report."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.progress: list[tuple[float, str]] = []
        self._count = 0

    def __call__(
        self,
        model: Path,
        config: dict,
        dataset: Path | None = None,
        *,
        kind: str = "quantize",
        model_format: str = "onnx",
        is_cancelled=lambda: False,
        device: str = "cpu",
    ) -> JobResult:
        self._count += 1
        work_dir = self.tmp_path / f"work{self._count}"
        work_dir.mkdir()
        self.progress = []
        ctx = RunContext(
            device=device,
            work_dir=work_dir,
            progress=lambda p, stage: self.progress.append((p, stage)),
            is_cancelled=is_cancelled,
        )
        spec = JobSpec(kind=kind, model_path=Path(model), model_format=model_format, dataset_path=dataset,
                       config=config)
        return run_job(spec, ctx)


@pytest.fixture
def run(tmp_path) -> Runner:
    return Runner(tmp_path)


def make_mlp(path: Path, opset: int = 17, fixed_batch: int | None = None) -> Path:
    """out = relu(concat(a, b) @ W1) @ W2, with inputs a (N, 6) and b (N, 10)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(16, 64)).astype(np.float32) / 4, "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(64, 5)).astype(np.float32) / 8, "w2")
    batch = fixed_batch or "n"
    nodes = [
        helper.make_node("Concat", ["a", "b"], ["ab"], axis=1),
        helper.make_node("MatMul", ["ab", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("MatMul", ["hr", "w2"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [batch, 6]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [batch, 10])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [batch, 5])],
        initializer=[w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path
