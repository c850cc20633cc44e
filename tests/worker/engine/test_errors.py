"""Terminal errors: each bad input fails with its code, before any work is wasted."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest

from worker.engine import EngineError

from .conftest import FAST_BENCHMARK


def _code(excinfo) -> str:
    return excinfo.value.code


def test_engine_error_carries_code_and_message_and_pickles():
    err = EngineError("invalid_model", "bad bytes")
    assert (err.code, err.message) == ("invalid_model", "bad bytes")
    assert str(err) == "invalid_model: bad bytes"
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.code, copy.message) == ("invalid_model", "bad bytes")
    with pytest.raises(ValueError):
        EngineError("no_such_code", "x")


@pytest.mark.parametrize("content", [b"", b"not an onnx model at all \x00\x01\x02" * 50, bytes(range(256)) * 10])
def test_garbage_file_is_invalid_model(run, tmp_path, content):
    path = tmp_path / "garbage.onnx"
    path.write_bytes(content)
    with pytest.raises(EngineError) as excinfo:
        run(path, {"method": "dynamic_int8"})
    assert _code(excinfo) == "invalid_model"


def test_missing_file_is_invalid_model(run, tmp_path):
    with pytest.raises(EngineError) as excinfo:
        run(tmp_path / "nope.onnx", {"method": "dynamic_int8"})
    assert _code(excinfo) == "invalid_model"


def test_external_data_is_refused(run, example, tmp_path):
    proto = onnx.load(example["onnx"])
    path = tmp_path / "external.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").is_file()
    with pytest.raises(EngineError) as excinfo:
        run(path, {"method": "dynamic_int8"})
    assert _code(excinfo) == "invalid_model"
    assert "external data" in excinfo.value.message


def test_model_failing_the_checker_is_invalid_model(run, tmp_path):
    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    graph = onnx.helper.make_graph(
        [node, node],  # "y" produced twice: not SSA
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])],
    )
    path = tmp_path / "bad.onnx"
    path.write_bytes(onnx.helper.make_model(graph).SerializeToString())
    with pytest.raises(EngineError) as excinfo:
        run(path, {"method": "dynamic_int8"})
    assert _code(excinfo) == "invalid_model"


@pytest.mark.parametrize(
    ("kind", "config", "model_format"),
    [
        ("quantize", {"method": "int4_magic"}, "onnx"),
        ("quantize", {"method": 3}, "onnx"),
        ("teleport", {"method": "dynamic_int8"}, "onnx"),
        ("quantize", {"method": "dynamic_int8"}, "keras"),
        ("quantize", {"method": "static_int8", "output_format": "torchscript"}, "onnx"),
        ("quantize", {"method": "bf16", "output_format": "onnx"}, "onnx"),
        ("prune", {"method": "magnitude", "sparsity": 0.995}, "onnx"),
        ("prune", {"method": "channels", "ratio": 0.0}, "onnx"),
        ("prune", {}, "onnx"),
        ("quantize", {"method": "static_int8", "calibration": {"method": "magic"}}, "onnx"),
        ("quantize", {"method": "static_int8", "calibration": {"samples": "many"}}, "onnx"),
        ("quantize", {"method": "dynamic_int8", "benchmark": {"batch_sizes": []}}, "onnx"),
    ],
)
def test_unsupported_requests(run, example, kind, config, model_format):
    with pytest.raises(EngineError) as excinfo:
        run(example["onnx"], config, kind=kind, model_format=model_format)
    assert _code(excinfo) == "unsupported"
    assert excinfo.value.message


def test_torchscript_without_a_dataset_is_invalid_dataset(run, example):
    """TorchScript declares no input shapes: the dataset gives them."""
    with pytest.raises(EngineError) as excinfo:
        run(example["torchscript"], {"method": "dynamic_int8"}, model_format="torchscript")
    assert _code(excinfo) == "invalid_dataset"
    assert "input shapes" in excinfo.value.message


@pytest.mark.parametrize("suffix", [".onnx", ".pickle"])
def test_non_torchscript_file_is_invalid_model(run, example, tmp_path, suffix):
    import pickle
    import zipfile

    path = tmp_path / f"model{suffix}"
    if suffix == ".onnx":
        path.write_bytes(Path(example["onnx"]).read_bytes())
    else:  # a zip with data.pkl but no code/: a pickled nn.Module, which would run arbitrary Python on load
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("model/data.pkl", pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(EngineError) as excinfo:
        run(path, {"method": "dynamic_int8"}, Path(example["dataset"]), model_format="torchscript")
    assert _code(excinfo) == "invalid_model"


def test_fine_tune_without_a_dataset_is_invalid_dataset(run, example):
    config = {"method": "channels", "ratio": 0.5, "fine_tune": {"epochs": 1}, "benchmark": FAST_BENCHMARK}
    with pytest.raises(EngineError) as excinfo:
        run(example["onnx"], config, kind="prune")
    assert _code(excinfo) == "invalid_dataset"
    assert excinfo.value.message == "fine_tune needs a dataset"


def test_static_without_dataset_is_invalid_dataset(run, example):
    with pytest.raises(EngineError) as excinfo:
        run(example["onnx"], {"method": "static_int8"})
    assert _code(excinfo) == "invalid_dataset"
    assert excinfo.value.message == "static_int8 needs a calibration dataset"


def _npz(tmp_path: Path, **arrays) -> Path:
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize(
    "arrays",
    [
        {"x": np.zeros((10, 1, 8, 9), np.float32)},  # wrong shape
        {"x": np.zeros((10, 64), np.float32)},  # wrong rank
        {"features": np.zeros((10, 1, 8, 8), np.float32)},  # wrong key
        {"x": np.zeros((10, 1, 8, 8), np.float32), "y": np.zeros(9, np.int64)},  # label count
        {"x": np.zeros((10, 1, 8, 8), np.float32), "y": np.zeros(10, np.float32)},  # float labels
        {"x": np.full((10, 1, 8, 8), np.nan, np.float32)},  # NaN
        {"x": np.zeros((10, 1, 8, 8), np.float32), "x_test": np.zeros((0, 1, 8, 8), np.float32)},  # empty test
        {"x": np.array([{"a": 1}] * 10, dtype=object)},  # needs pickle
    ],
)
def test_bad_datasets_are_invalid_dataset(run, example, tmp_path, arrays):
    with pytest.raises(EngineError) as excinfo:
        run(example["onnx"], {"method": "static_int8"}, _npz(tmp_path, **arrays))
    assert _code(excinfo) == "invalid_dataset"


def test_non_npz_dataset_is_invalid_dataset(run, example, tmp_path):
    path = tmp_path / "data.npz"
    np.save(path.with_suffix(".npy"), np.zeros((4, 1, 8, 8), np.float32))
    path.with_suffix(".npy").rename(path)
    with pytest.raises(EngineError) as excinfo:
        run(example["onnx"], {"method": "static_int8"}, path)
    assert _code(excinfo) == "invalid_dataset"


def test_cancelled_before_start(run, example):
    with pytest.raises(EngineError) as excinfo:
        run(example["onnx"], {"method": "dynamic_int8"}, is_cancelled=lambda: True)
    assert _code(excinfo) == "cancelled"
    assert run.progress == []


@pytest.mark.parametrize("stage", ["calibrating", "measuring"])
def test_cancelled_mid_run(run, example, stage):
    def is_cancelled() -> bool:
        return any(s.startswith(stage) for _, s in run.progress)

    config = {"method": "static_int8", "benchmark": FAST_BENCHMARK, "calibration": {"samples": 128}}
    with pytest.raises(EngineError) as excinfo:
        run(example["onnx"], config, Path(example["dataset"]), is_cancelled=is_cancelled)
    assert _code(excinfo) == "cancelled"
    assert run.progress[-1][0] < 1.0
    # Nothing left behind but what was written before the cancel; no scratch folder.
    assert not any(p.name.startswith(".engine") for p in run.tmp_path.rglob("*"))


def _mlp_variant(path: Path, *, extra_output: bool = False, nan: bool = False) -> Path:
    """make_mlp's graph, changed the way a broken method could change it."""
    from onnx import TensorProto, helper, numpy_helper

    from .conftest import make_mlp

    model = onnx.load(make_mlp(path))
    graph = model.graph
    if nan:  # every output becomes NaN
        graph.initializer.append(numpy_helper.from_array(np.array([np.nan], np.float32), "nan"))
        graph.node[-1].output[0] = "pre"
        graph.node.append(onnx.helper.make_node("Mul", ["pre", "nan"], ["out"]))
    if extra_output:
        graph.output.append(helper.make_tensor_value_info("hr", TensorProto.FLOAT, ["n", 64]))
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("breakage, says", [("truncated", "not an ONNX model"), ("extra_output", "outputs"),
                                            ("nan_outputs", "finite"), ("outside_work_dir", "work folder"),
                                            ("bad_format", "format")])
def test_an_artifact_that_does_not_load_or_run_right_is_result_invalid(tmp_path, breakage, says):
    """The check every job passes before it may succeed: the artifact is loaded back and run on sample rows."""
    from worker.engine.api import verify_artifact
    from worker.engine.onnx_io import OnnxRunner, load_onnx_model

    from .conftest import make_mlp

    work = tmp_path / "work"
    work.mkdir()
    original = load_onnx_model(make_mlp(tmp_path / "original.onnx"))
    rng = np.random.default_rng(0)
    sample = {"a": rng.normal(size=(4, 6)).astype(np.float32), "b": rng.normal(size=(4, 10)).astype(np.float32)}
    reference = OnnxRunner(original, "cpu").run(sample)
    artifact, fmt = work / "model.onnx", "onnx"
    if breakage == "truncated":
        artifact.write_bytes(original.raw[: len(original.raw) // 2])
    elif breakage == "extra_output":
        _mlp_variant(artifact, extra_output=True)
    elif breakage == "nan_outputs":
        _mlp_variant(artifact, nan=True)
    elif breakage == "outside_work_dir":
        artifact = tmp_path / "original.onnx"
    else:
        artifact.write_bytes(original.raw)
        fmt = "pickle"
    with pytest.raises(EngineError) as excinfo:
        verify_artifact(artifact, fmt, work, "cpu", sample, reference, original.inputs)
    assert _code(excinfo) == "result_invalid", excinfo.value.message
    assert says in excinfo.value.message, excinfo.value.message
    # the intact artifact passes the same check
    (work / "ok.onnx").write_bytes(original.raw)
    verify_artifact(work / "ok.onnx", "onnx", work, "cpu", sample, reference, original.inputs)
