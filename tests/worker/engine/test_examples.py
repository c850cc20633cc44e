from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from worker.examples import main


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load
def test_example_files_are_complete_and_accurate(example):
    assert example["test_accuracy"] > 0.9
    proto = onnx.load(example["onnx"], load_external_data=False)
    onnx.checker.check_model(proto)
    assert proto.opset_import[0].version >= 17
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch dim

    data = np.load(example["dataset"], allow_pickle=False)
    assert set(data.files) == {"x", "y", "x_test", "y_test"}
    assert data["x"].shape[1:] == (1, 8, 8) and data["x"].dtype == np.float32
    assert data["y"].dtype == np.int64 and data["y_test"].dtype == np.int64
    assert 0.0 <= data["x"].min() and data["x"].max() <= 1.0

    # ONNX (any batch size) and TorchScript give the same logits.
    x = data["x_test"][:7]
    onnx_out = ort.InferenceSession(example["onnx"], providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    ts_out = torch.jit.load(example["torchscript"])(torch.from_numpy(x)).detach().numpy()
    assert onnx_out.shape == (7, 10)
    np.testing.assert_allclose(onnx_out, ts_out, rtol=1e-4, atol=1e-4)


def test_cli_prints_a_json_summary(tmp_path, capsys):
    main(["--out", str(tmp_path), "--seed", "1", "--epochs", "1"])
    summary = json.loads(capsys.readouterr().out)
    assert {"onnx", "torchscript", "dataset", "test_accuracy"} <= set(summary)
    assert (tmp_path / "digits_cnn.onnx").is_file() and (tmp_path / "digits.npz").is_file()
