"""Tiny real models and datasets the tests build themselves (no downloads, no torch needed)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def digits(seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    idx = np.random.default_rng(seed).permutation(len(x))
    cut = int(len(x) * 0.8)
    return x[idx[:cut]], y[idx[:cut]], x[idx[cut:]], y[idx[cut:]]


def fit_mlp(x: np.ndarray, y: np.ndarray, hidden: int = 256, seed: int = 0):
    """A 64-hidden-10 MLP: random ReLU features, output layer by ridge regression. ~95% on digits."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(0, 1 / np.sqrt(x.shape[1]), (x.shape[1], hidden)).astype(np.float32) * 3
    b1 = rng.normal(0, 0.5, hidden).astype(np.float32)
    h = np.maximum(x @ w1 + b1, 0)
    onehot = np.eye(10, dtype=np.float32)[y]
    hb = np.hstack([h, np.ones((len(h), 1), np.float32)])
    sol = np.linalg.solve(hb.T @ hb + 1e-1 * np.eye(hb.shape[1]), hb.T @ onehot).astype(np.float32)
    return w1, b1, sol[:-1], sol[-1]


def mlp_onnx_bytes(hidden: int = 256, seed: int = 0, input_name: str = "x") -> bytes:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x, y, _, _ = digits(seed)
    w1, b1, w2, b2 = fit_mlp(x, y, hidden, seed)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]
    nodes = [
        helper.make_node("MatMul", [input_name, "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["o0"]),
        helper.make_node("Add", ["o0", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(nodes, "digits_mlp", [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["N", 64])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="distillery-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def write_mlp_onnx(path: Path, **kw) -> Path:
    path.write_bytes(mlp_onnx_bytes(**kw))
    return path


def digits_npz_bytes(seed: int = 0, with_test: bool = True, input_name: str = "x") -> bytes:
    x, y, xt, yt = digits(seed)
    arrays = {input_name: x, "y": y}
    if with_test:
        arrays.update({f"{input_name}_test": xt, "y_test": yt})
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()
