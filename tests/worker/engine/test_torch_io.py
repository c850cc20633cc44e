"""onnx_to_fx and torch_io: ONNX -> trainable torch.fx module (equal to onnxruntime, trainable, prunable),
TorchScript loading, export and running, MAC and weight counts."""

from __future__ import annotations

import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from worker.engine import EngineError
from worker.engine.data import TensorSpec
from worker.engine.onnx_to_fx import onnx_to_torch
from worker.engine.torch_io import (
    TorchRunner,
    count_macs,
    count_weights,
    export_onnx,
    export_torchscript,
    load_torchscript,
    load_torchscript_model,
    torchscript_to_torch,
)

from .conftest import make_mlp

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

RNG = np.random.default_rng(0)


def _ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _torch(module: nn.Module, feeds: dict) -> list[np.ndarray]:
    with torch.no_grad():
        out = module(*[torch.from_numpy(feeds[name]) for name in module.input_names])
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def assert_same_as_ort(model: onnx.ModelProto, feeds: dict, atol: float = 1e-4) -> nn.Module:
    module = onnx_to_torch(model)
    expected, actual = _ort(model, feeds), _torch(module, feeds)
    assert len(actual) == len(expected)
    for e, a in zip(expected, actual):
        assert a.shape == e.shape and a.dtype == e.dtype
        np.testing.assert_allclose(a, e, atol=atol, rtol=1e-4)
    return module


def _model(nodes, inputs, outputs, initializers=(), opset: int = 17, check: bool = True) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    if check:
        onnx.checker.check_model(model)
    return model


def _f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def bn_cnn() -> onnx.ModelProto:
    """Conv(stride 2, asymmetric pads) -> BatchNorm -> LeakyRelu -> grouped dilated Conv -> AveragePool ->
    GlobalAveragePool -> Flatten -> Gemm(transB=0, alpha, beta) -> Softmax."""
    w1 = RNG.normal(size=(8, 3, 3, 3)).astype(np.float32) / 3
    w2 = RNG.normal(size=(8, 2, 3, 3)).astype(np.float32) / 3
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], strides=[2, 2], pads=[0, 1, 1, 2]),
        helper.make_node("BatchNormalization", ["c1", "s", "bb", "m", "v"], ["bn"], epsilon=1e-3),
        helper.make_node("LeakyRelu", ["bn"], ["a1"], alpha=0.2),
        helper.make_node("Conv", ["a1", "w2"], ["c2"], group=4, dilations=[2, 2], pads=[2, 2, 2, 2]),
        helper.make_node("AveragePool", ["c2"], ["p"], kernel_shape=[2, 2], strides=[1, 1]),
        helper.make_node("GlobalAveragePool", ["p"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "wg", "bg"], ["logits"], alpha=0.5, beta=2.0),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    inits = [
        _const("w1", w1), _const("b1", RNG.normal(size=8).astype(np.float32)), _const("w2", w2),
        _const("s", RNG.uniform(0.5, 1.5, 8).astype(np.float32)), _const("bb", RNG.normal(size=8).astype(np.float32)),
        _const("m", RNG.normal(size=8).astype(np.float32)), _const("v", RNG.uniform(0.5, 2, 8).astype(np.float32)),
        _const("wg", RNG.normal(size=(8, 4)).astype(np.float32)), _const("bg", RNG.normal(size=4).astype(np.float32)),
    ]
    return _model(nodes, [_f32("x", ["n", 3, 12, 12])], [_f32("probs", ["n", 4])], inits)


def test_example_cnn_converts_to_real_layers_equal_to_onnxruntime(example):
    model = onnx.load(example["onnx"])
    x = np.load(example["dataset"])["x_test"][:50]
    module = assert_same_as_ort(model, {"input": x})
    kinds = [type(m).__name__ for m in module.modules() if m is not module]
    assert kinds == ["Conv2d", "Conv2d", "Linear", "Linear"]
    assert dict(module.named_children()).keys() == {"0", "2", "6", "8"}  # the uploader's layer names
    assert module.input_names == ["input"] and module.output_names == ["logits"]
    assert all(p.requires_grad for p in module.parameters())


def test_mlp_with_two_inputs_and_matmul_add_as_linear(tmp_path):
    model = onnx.load(str(make_mlp(tmp_path / "mlp.onnx")))
    feeds = {"a": RNG.normal(size=(7, 6)).astype(np.float32), "b": RNG.normal(size=(7, 10)).astype(np.float32)}
    module = assert_same_as_ort(model, feeds)
    assert [type(m).__name__ for m in module.modules() if m is not module] == ["Linear", "Linear"]

    # MatMul + Add(constant bias) on a 3-D input folds into one nn.Linear with a bias.
    w = RNG.normal(size=(6, 5)).astype(np.float32)
    model = _model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        [_f32("x", ["n", 3, 6])],
        [_f32("y", ["n", 3, 5])],
        [_const("w", w), _const("b", np.arange(5, dtype=np.float32))],
    )
    module = assert_same_as_ort(model, {"x": RNG.normal(size=(2, 3, 6)).astype(np.float32)})
    (linear,) = [m for m in module.modules() if isinstance(m, nn.Linear)]
    assert linear.bias is not None and linear.in_features == 6 and linear.out_features == 5


def test_cnn_with_batchnorm_pools_and_gemm_matches_and_trains():
    model = bn_cnn()
    x = RNG.random((16, 3, 12, 12), dtype=np.float32)
    module = assert_same_as_ort(model, {"x": x})
    assert {type(m).__name__ for m in module.modules() if m is not module} == {"Conv2d", "BatchNorm2d", "Linear"}

    torch.manual_seed(0)
    y = torch.randint(0, 4, (16,))
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    module.train()
    losses = []
    for _ in range(15):
        loss = nn.functional.nll_loss(torch.log(module(torch.from_numpy(x)) + 1e-9), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def _single(op, inputs, attrs, initializers, opset, out_dtype):
    names = [name for name, _ in inputs]
    node = helper.make_node(op, names + [i.name for i in initializers], ["y"], **attrs)
    value_infos = [helper.make_tensor_value_info(name, _onnx_type(a), ["n", *a.shape[1:]]) for name, a in inputs]
    # The output's shape is left to onnxruntime (the checker wants one declared, so it is not run).
    output = helper.make_tensor_value_info("y", out_dtype, None)
    return _model([node], value_infos, [output], initializers, opset, check=False)


def _onnx_type(array: np.ndarray) -> int:
    return helper.np_dtype_to_tensor_dtype(array.dtype)


X4 = RNG.normal(size=(2, 4, 6, 6)).astype(np.float32)
X2 = RNG.normal(size=(3, 5)).astype(np.float32)


@pytest.mark.parametrize(
    ("op", "inputs", "attrs", "initializers", "opset"),
    [
        *[(op, [("x", X2)], {}, [], 17) for op in ("Relu", "Sigmoid", "Tanh", "Erf", "Exp", "Neg", "Abs", "Identity")],
        ("Sqrt", [("x", np.abs(X2))], {}, [], 17),
        ("Log", [("x", np.abs(X2) + 0.1)], {}, [], 17),
        ("Reciprocal", [("x", np.abs(X2) + 0.1)], {}, [], 17),
        ("LeakyRelu", [("x", X2)], {"alpha": 0.3}, [], 17),
        ("Gelu", [("x", X2)], {"approximate": "tanh"}, [], 20),
        ("Softmax", [("x", X4)], {"axis": 2}, [], 17),
        ("LogSoftmax", [("x", X4)], {"axis": -1}, [], 17),
        ("Softmax", [("x", X4)], {"axis": 1}, [], 11),  # before opset 13: over the input flattened at axis
        ("Add", [("x", X2)], {}, [_const("c", np.arange(5, dtype=np.float32))], 17),
        ("Sub", [("x", X2), ("z", X2 * 2)], {}, [], 17),
        ("Mul", [("x", X4)], {}, [_const("c", np.ones((4, 1, 1), np.float32) * 3)], 17),
        ("Div", [("x", X2)], {}, [_const("c", np.float32(2.0))], 17),
        ("Div", [("x", np.array([[7, -7, 9]], np.int64))], {}, [_const("c", np.int64(2))], 17),  # truncates
        ("Pow", [("x", np.abs(X2))], {}, [_const("c", np.float32(1.5))], 17),
        ("MatMul", [("x", X2), ("z", RNG.normal(size=(3, 5, 2)).astype(np.float32))], {}, [], 17),
        ("Transpose", [("x", X4)], {"perm": [0, 2, 3, 1]}, [], 17),
        ("Concat", [("x", X2), ("z", X2)], {"axis": 1}, [], 17),
        ("Reshape", [("x", X4)], {}, [_const("s", np.array([0, -1], np.int64))], 17),
        ("Reshape", [("x", X4)], {}, [_const("s", np.array([0, 4, 36], np.int64))], 17),
        ("Reshape", [("x", X4)], {}, [_const("s", np.array([-1, 6, 6], np.int64))], 17),
        ("Flatten", [("x", X4)], {"axis": 2}, [], 17),
        ("Unsqueeze", [("x", X2)], {}, [_const("a", np.array([1, -1], np.int64))], 17),
        ("Unsqueeze", [("x", X2)], {"axes": [0]}, [], 11),
        ("Squeeze", [("x", X4[:, :1])], {}, [_const("a", np.array([1], np.int64))], 17),
        ("ReduceMean", [("x", X4)], {"keepdims": 0}, [_const("a", np.array([2, 3], np.int64))], 18),
        ("ReduceMean", [("x", X4)], {"axes": [1]}, [], 13),
        ("Clip", [("x", X2)], {}, [_const("lo", np.float32(-0.5)), _const("hi", np.float32(0.5))], 17),
        ("Cast", [("x", X2)], {"to": TensorProto.INT64}, [], 17),
        ("Dropout", [("x", X2)], {}, [], 17),
        ("MaxPool", [("x", X4)], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [0, 0, 1, 1]}, [], 17),
        ("MaxPool", [("x", X4)], {"kernel_shape": [2, 2], "ceil_mode": 1, "strides": [2, 2]}, [], 17),
        ("AveragePool", [("x", X4)], {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}, [], 17),
        ("GlobalMaxPool", [("x", X4)], {}, [], 17),
        ("Conv", [("x", X4)], {"auto_pad": "SAME_UPPER"}, [_const("w", RNG.normal(size=(3, 4, 2, 2)).astype(
            np.float32))], 17),
        ("Conv", [("x", X4[:, :, :, 0])], {"strides": [2]}, [_const("w", RNG.normal(size=(3, 4, 3)).astype(
            np.float32))], 17),  # Conv1d
        ("Gemm", [("x", X2)], {"transB": 1}, [_const("w", RNG.normal(size=(3, 5)).astype(np.float32)),
                                             _const("c", np.float32([[1.0, 2.0, 3.0]]))], 17),
        ("Gemm", [("x", X2.T.copy()), ("z", RNG.normal(size=(5, 4)).astype(np.float32))], {"transA": 1}, [], 17),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_single_ops_match_onnxruntime(op, inputs, attrs, initializers, opset):
    out_dtype = TensorProto.INT64 if op == "Cast" or inputs[0][1].dtype == np.int64 else TensorProto.FLOAT
    model = _single(op, inputs, attrs, initializers, opset, out_dtype)
    assert_same_as_ort(model, dict(inputs))


def test_gather_from_a_constant_table_becomes_an_embedding():
    table = RNG.normal(size=(50, 8)).astype(np.float32)
    model = _model(
        [helper.make_node("Gather", ["table", "ids"], ["e"], axis=0)],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 3])], [_f32("e", ["n", 3, 8])],
        [_const("table", table)],
    )
    module = assert_same_as_ort(model, {"ids": RNG.integers(0, 50, (4, 3))})
    assert [type(m).__name__ for m in module.modules() if m is not module] == ["Embedding"]


def test_constant_subgraphs_are_folded():
    """Constant -> Cast -> Reshape's shape: computed once at conversion."""
    nodes = [
        helper.make_node("Constant", [], ["s"], value=_const("v", np.array([0.0, -1.0], np.float32))),
        helper.make_node("Cast", ["s"], ["si"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["x", "si"], ["y"]),
    ]
    model = _model(nodes, [_f32("x", ["n", 2, 3])], [_f32("y", ["n", 6])])
    assert_same_as_ort(model, {"x": RNG.normal(size=(4, 2, 3)).astype(np.float32)})


@pytest.mark.parametrize(
    ("nodes", "op"),
    [
        ([helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Reshape", ["x", "s"], ["y"])], "Shape"),
        ([helper.make_node("Hardmax", ["x"], ["y"])], "Hardmax"),
        ([helper.make_node("Relu", ["x"], ["y"], domain="com.example")], "com.example.Relu"),
    ],
)
def test_unsupported_ops_are_named(nodes, op):
    graph = helper.make_graph(nodes, "g", [_f32("x", ["n", 4])], [_f32("y", ["n", 4])])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    with pytest.raises(EngineError) as excinfo:
        onnx_to_torch(helper.make_model(graph, opset_imports=opsets))
    assert excinfo.value.code == "unsupported"
    assert excinfo.value.message == f"ONNX op {op} cannot be converted to a trainable module yet"


def test_export_onnx_round_trip_has_a_dynamic_batch_and_one_file(example, tmp_path):
    module = onnx_to_torch(onnx.load(example["onnx"]))
    x = np.load(example["dataset"])["x_test"]
    path = export_onnx(module, {"input": x[:2]}, tmp_path / "out.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    proto = onnx.load(str(path))
    assert proto.graph.input[0].name == "input" and proto.graph.output[0].name == "logits"
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {17}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = _ort(onnx.load(example["onnx"]), {"input": x[:33]})[0]
    np.testing.assert_allclose(session.run(None, {"input": x[:33]})[0], reference, atol=1e-4)
    # ... and converts again: the converter reads what the exporter writes.
    np.testing.assert_allclose(_torch(onnx_to_torch(proto), {"input": x[:5]})[0], reference[:5], atol=1e-4)


def _digits_inputs(example) -> tuple[TensorSpec, ...]:
    return (TensorSpec("input", ("batch", 1, 8, 8), np.dtype("float32")),)


def test_torchscript_loads_runs_and_becomes_trainable(example, tmp_path):
    model = load_torchscript_model(example["torchscript"], _digits_inputs(example))
    assert isinstance(model.module, torch.jit.ScriptModule) and not model.module.training
    assert model.params == example["params"] and model.size_bytes > 0
    x = np.load(example["dataset"])["x_test"][:9]
    runner = TorchRunner(model, "cpu")
    (out,) = runner.run({"input": x})
    reference = _ort(onnx.load(example["onnx"]), {"input": x})[0]
    np.testing.assert_allclose(out, reference, atol=1e-4)
    assert runner.provider == "torch (cpu)" and runner.peak_memory_bytes({"input": x}) >= 0

    module = torchscript_to_torch(model)
    assert [type(m).__name__ for m in module.modules() if m is not module] == ["Conv2d", "Conv2d", "Linear", "Linear"]
    np.testing.assert_allclose(_torch(module, {"input": x})[0], reference, atol=1e-4)

    path = export_torchscript(module, {"input": x[:2]}, tmp_path / "again.pt")
    again = load_torchscript(path)
    np.testing.assert_allclose(again(torch.from_numpy(x)).detach().numpy(), reference, atol=1e-4)


def test_load_torchscript_refuses_what_is_not_a_torchscript_archive(example, tmp_path):
    plain = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(3)}, plain)  # a pickle-based zip without code/
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00" * 100)
    broken = tmp_path / "broken.pt"
    with zipfile.ZipFile(example["torchscript"]) as src, zipfile.ZipFile(broken, "w") as dst:
        for name in src.namelist():
            if name.endswith("data.pkl") or "/code/" in name:
                dst.writestr(name, b"not a pickle" if name.endswith("data.pkl") else src.read(name))
    for path in (plain, garbage, broken, example["onnx"]):
        with pytest.raises(EngineError) as excinfo:
            load_torchscript(path)
        assert excinfo.value.code == "invalid_model", path


def test_count_macs_and_params(example):
    module = onnx_to_torch(onnx.load(example["onnx"]))
    x = np.load(example["dataset"])["x_test"][:4]
    w = 64  # the example's width
    analytic = 64 * 9 * w + 64 * 9 * w * 2 * w + 2 * w * 16 * 64 + 64 * 10  # conv1, conv2, fc1, fc2 per row
    macs = count_macs(module, {"input": x})
    assert analytic <= macs <= 1.01 * analytic  # the counter adds the bias adds
    assert count_weights(module) == example["params"]


def test_export_onnx_falls_back_to_the_dynamo_exporter(example, tmp_path, monkeypatch):
    module = onnx_to_torch(onnx.load(example["onnx"]))
    real_export = torch.onnx.export

    def legacy_fails(*args, **kwargs):
        if not kwargs.get("dynamo"):
            raise RuntimeError("the TorchScript-based exporter cannot trace this")
        return real_export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", legacy_fails)
    x = np.load(example["dataset"])["x_test"]
    path = export_onnx(module, {"input": x[:2]}, tmp_path / "dynamo.onnx")
    assert [p.name for p in tmp_path.iterdir()] == ["dynamo.onnx"]  # no external data file
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x[:7]})[0], _torch(module, {"input": x[:7]})[0], atol=1e-4)
