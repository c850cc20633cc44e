"""Tests for app.models.inspect: content-based detection and bounded inspection of uploads."""

import json
import os
import pickle
import random
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from app.models.inspect import ModelInfo, ModelRejected, TensorSpec, inspect_model

REPO_ROOT = Path(__file__).resolve().parents[2]


def rejected(path, **kwargs) -> ModelRejected:
    with pytest.raises(ModelRejected) as excinfo:
        inspect_model(path, **kwargs)
    return excinfo.value


# --------------------------------------------------------------------------- fixtures


def make_net():
    """A small Conv + BatchNorm + Linear network (BatchNorm adds buffers)."""
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))

    return Net().eval()


def element_count(module) -> int:
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


@pytest.fixture
def torch_onnx(tmp_path) -> Path:
    """A Conv + Linear model exported by torch with a dynamic batch dimension."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnx")
    path = tmp_path / "net.onnx"
    torch.onnx.export(
        make_net(),
        (torch.randn(1, 3, 8, 8),),
        str(path),
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        dynamo=False,
    )
    return path


def helper_model():
    """An onnx.helper model: mixed dtypes, symbolic/unknown dims, an old-style initializer input."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "weight")
    bias = numpy_helper.from_array(np.zeros(3, np.float32), "bias")
    table = numpy_helper.from_array(np.arange(10, dtype=np.int64), "table")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "weight"], ["xw"]),
            helper.make_node("Add", ["xw", "bias"], ["y"]),
            helper.make_node("Gather", ["table", "ids"], ["picked"]),
            helper.make_node("Cast", ["mask"], ["mask_f"], to=TensorProto.FLOAT16),
        ],
        "helper_graph",
        inputs=[
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, [None, 7]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, []),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, [3]),  # also an initializer
        ],
        outputs=[
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("picked", TensorProto.INT64, [None, 7]),
            helper.make_tensor_value_info("mask_f", TensorProto.FLOAT16, []),
        ],
        initializer=[weight, bias, table],
    )
    model = helper.make_model(
        graph,
        producer_name="distillery-tests",
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 2)],
    )
    onnx.checker.check_model(model)
    return model


def onnx_spec(value_info) -> TensorSpec:
    """What onnx itself reports for a graph input or output."""
    from onnx import helper

    tensor_type = value_info.type.tensor_type
    shape = [
        dim.dim_value if dim.HasField("dim_value") else dim.dim_param or None
        for dim in tensor_type.shape.dim
    ]
    dtype = helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    return TensorSpec(value_info.name, dtype, shape)


def assert_matches_onnx(info: ModelInfo, path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    model = onnx.load(str(path))
    initializers = {t.name for t in model.graph.initializer}
    assert info.format == "onnx"
    assert info.inputs == [onnx_spec(v) for v in model.graph.input if v.name not in initializers]
    assert info.outputs == [onnx_spec(v) for v in model.graph.output]
    assert info.params == sum(numpy_helper.to_array(t).size for t in model.graph.initializer)
    assert info.details == {
        "ir_version": model.ir_version,
        "opset": {o.domain: o.version for o in model.opset_import},
        "producer_name": model.producer_name,
        "node_count": len(model.graph.node),
        "op_types": sorted({n.op_type for n in model.graph.node}),
    }


def write_zip(path: Path, entries: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return path


# --------------------------------------------------------------------------- ONNX


def test_torch_exported_onnx(torch_onnx):
    info = inspect_model(torch_onnx)
    assert_matches_onnx(info, torch_onnx)
    assert info.inputs == [TensorSpec("x", "float32", ["batch", 3, 8, 8])]
    assert info.outputs == [TensorSpec("y", "float32", ["batch", 2])]
    assert info.params == 4 * 3 * 3 * 3 + 4 + 4 * 2 + 2  # BatchNorm is folded into the Conv
    assert {"Conv", "Gemm"} <= set(info.details["op_types"])
    assert json.loads(json.dumps(info.to_dict())) == info.to_dict()


def test_helper_onnx_matches_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "helper.onnx"
    onnx.save_model(helper_model(), str(path))

    info = inspect_model(path)

    assert_matches_onnx(info, path)
    assert info.inputs == [
        TensorSpec("x", "float32", ["batch", 4]),
        TensorSpec("ids", "int64", [None, 7]),
        TensorSpec("mask", "bool", []),
    ]
    assert info.params == 4 * 3 + 3 + 10
    assert info.details["opset"] == {"": 17, "com.example": 2}
    assert info.details["producer_name"] == "distillery-tests"
    assert info.details["op_types"] == ["Add", "Cast", "Gather", "MatMul"]
    assert info.to_dict()["inputs"][0] == {"name": "x", "dtype": "float32", "shape": ["batch", 4]}


def test_detection_ignores_the_file_name(tmp_path):
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "weights.pt"
    onnx.save_model(helper_model(), str(path))
    assert inspect_model(path).format == "onnx"


def test_external_data_is_rejected(tmp_path):
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "external.onnx"
    onnx.save_model(
        helper_model(),
        str(path),
        save_as_external_data=True,
        location="weights.bin",
        size_threshold=0,
    )
    error = rejected(path)
    assert error.code == "external_data_not_allowed"
    assert error.detail["tensor"] in {"weight", "bias", "table"}


def tensor_model(tensor) -> bytes:
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", [tensor.name], ["y"])],
        "g",
        inputs=[],
        outputs=[helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[tensor],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return model.SerializeToString()


@pytest.mark.parametrize("dims", [[2**40, 2**40], [-1, 4], [2**63 - 1, 2]])
def test_absurd_tensor_sizes_are_too_complex(tmp_path, dims):
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "absurd.onnx"
    path.write_bytes(tensor_model(onnx.TensorProto(name="w", data_type=1, dims=dims)))
    error = rejected(path)
    assert error.code == "model_too_complex"
    assert error.detail["tensor"] == "w"


def test_unknown_output_rank_and_zero_sized_tensor(tmp_path):
    onnx = pytest.importorskip("onnx")
    path = tmp_path / "zero.onnx"
    path.write_bytes(tensor_model(onnx.TensorProto(name="w", data_type=1, dims=[0, 2**60])))
    info = inspect_model(path)
    assert info.params == 0
    assert info.outputs == [TensorSpec("y", "float32", [])]


def test_limits_are_configurable(torch_onnx):
    assert rejected(torch_onnx, max_nodes=2).code == "model_too_complex"
    assert rejected(torch_onnx, max_tensor_elements=100).code == "model_too_complex"  # conv: 108
    assert inspect_model(torch_onnx, max_tensor_elements=108).format == "onnx"


def test_big_initializer_is_skipped_not_read(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    rows, cols = 50, 1024 * 1024  # 200 MiB of float32
    zeros = b"\0" * (rows * cols * 4)
    big = helper.make_tensor("big", TensorProto.FLOAT, [rows, cols], zeros, raw=True)
    path = tmp_path / "big.onnx"
    path.write_bytes(tensor_model(big))
    del big, zeros
    assert path.stat().st_size > rows * cols * 4

    tracemalloc.start()
    try:
        info = inspect_model(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert info.params == rows * cols
    assert info.outputs == [TensorSpec("y", "float32", [])]
    assert peak < 20 * 1024 * 1024  # the 200 MiB of weights were skipped, never held


# --------------------------------------------------------------------------- TorchScript


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript(tmp_path, how):
    torch = pytest.importorskip("torch")
    net = make_net()
    if how == "script":
        module = torch.jit.script(net)
    else:
        module = torch.jit.trace(net, torch.randn(1, 3, 8, 8))
    path = tmp_path / "net.pt"
    torch.jit.save(module, str(path))

    info = inspect_model(path)

    assert info.format == "torchscript"
    assert info.params == element_count(net) == 4 * 3 * 3 * 3 + 4 + 4 * 4 + 1 + 4 * 2 + 2
    assert info.inputs == [] and info.outputs == []
    assert info.details == {"archive_name": "net", "tensor_count": 9, "has_code": True}


def test_torchscript_counts_tensor_constants(tmp_path):
    torch = pytest.importorskip("torch")

    class WithConstant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) + torch.tensor([1.0, 2.0])

    module = torch.jit.trace(WithConstant(), torch.randn(1, 4))
    path = tmp_path / "constant.pt"
    torch.jit.save(module, str(path))
    info = inspect_model(path)
    assert info.params == 4 * 2 + 2 + 2  # weight, bias, the traced constant
    assert info.details["tensor_count"] == 3


def test_plain_torch_save_is_unsupported(tmp_path):
    torch = pytest.importorskip("torch")
    net = make_net()
    for name, obj, kwargs in [
        ("state_dict.pt", net.state_dict(), {}),
        ("module.pt", torch.nn.Sequential(torch.nn.Linear(4, 2)), {}),
        ("legacy.pt", net.state_dict(), {"_use_new_zipfile_serialization": False}),
    ]:
        torch.save(obj, str(tmp_path / name), **kwargs)
        error = rejected(tmp_path / name)
        assert error.code == "unsupported_model", name
        assert all(word in error.message for word in ("execute", "TorchScript", "ONNX"))


def test_torch_export_archive_is_unsupported(tmp_path):
    torch = pytest.importorskip("torch")
    net = torch.nn.Linear(4, 2)
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(net, (torch.randn(1, 4),)), str(path))
    error = rejected(path)
    assert error.code == "unsupported_model"
    assert "torch.export" in error.message


class _Canary:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_malicious_pickle_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    canary = tmp_path / "CANARY"
    payload = pickle.dumps(_Canary(canary))
    scripted = write_zip(
        tmp_path / "evil.pt",
        {"evil/data.pkl": payload, "evil/code/__torch__.py": b"", "evil/version": b"3\n"},
    )
    plain = write_zip(
        tmp_path / "evil_plain.pt", {"evil/data.pkl": payload, "evil/version": b"3\n"}
    )

    error = rejected(scripted)  # the pickle names os.system / posix.system: never in a TorchScript archive
    assert error.code == "unsafe_pickle" and "system" in error.detail["global"]
    assert rejected(plain).code == "unsupported_model"
    assert not canary.exists()

    pickle.loads(payload)  # the payload is live: unpickling it does create the canary
    assert canary.exists()


def test_oversized_pickle_is_not_decompressed(tmp_path):
    path = tmp_path / "bomb.pt"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("bomb/code/__torch__.py", b"")
        archive.writestr("bomb/data.pkl", b"\0" * (200 * 1024 * 1024))
    assert path.stat().st_size < 1024 * 1024

    tracemalloc.start()
    try:
        error = rejected(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert error.code == "model_too_complex" and "too large" in error.message
    assert peak < 20 * 1024 * 1024


def test_huge_zip_directory_is_too_complex(tmp_path):
    path = tmp_path / "many.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("m/data.pkl", pickle.dumps({}))
        archive.writestr("m/code/__torch__.py", b"")
        for i in range(40_000):
            archive.writestr(f"m/extra/{i:08d}/" + "x" * 60, b"")
    assert rejected(path).code == "model_too_complex"


# --------------------------------------------------------------------------- not models


def test_not_models(tmp_path):
    samples = {
        "random.bin": random.Random(1234).randbytes(100_000),
        "empty.onnx": b"",
        "notes.txt": b"Just some text.\nNothing to see here.\n" * 100,
        "config.json": json.dumps({"model": "resnet", "layers": [1, 2, 3]}).encode(),
        "zeros.bin": bytes(4096),
    }
    for name, data in samples.items():
        (tmp_path / name).write_bytes(data)
    np.savez(tmp_path / "arrays.npz", a=np.ones((3, 3)), b=np.arange(5))
    write_zip(tmp_path / "archive.zip", {"readme.txt": b"hello", "data.pkl": pickle.dumps([1, 2])})

    for path in sorted(tmp_path.iterdir()):
        error = rejected(path)
        assert error.code == "not_a_model", path.name
        assert error.message


def test_hand_crafted_wire_errors(tmp_path):
    cases = {
        b"\x08\x09" + b"\x3a\xff\xff\xff\xff\x0f": "corrupt_model",  # graph longer than the file
        b"\x08\x09\x3a\x02\x0a": "corrupt_model",  # graph payload cut short
        b"\x08\x09\x10" + b"\xff" * 10 + b"\x01": "corrupt_model",  # varint longer than 10 bytes
        b"\x08\x09\x0b": "corrupt_model",  # wire type 3 (groups)
        b"\x08\x09\x12\x05abc": "corrupt_model",  # producer_name past end of file
        b"\x08" + b"\x80" * 9: "not_a_model",
        b"\x3a\x00": "not_a_model",  # an empty graph
    }
    for index, (data, code) in enumerate(cases.items()):
        path = tmp_path / f"case{index}.onnx"
        path.write_bytes(data)
        assert rejected(path).code == code, data


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def test_deeply_nested_attributes_are_skipped(tmp_path):
    onnx = pytest.importorskip("onnx")
    nested = b""
    for _ in range(5_000):  # far past any recursion limit, if it were parsed
        nested = _field(6, nested)  # AttributeProto.g, GraphProto.node ... as raw bytes
    node = onnx.helper.make_node("Identity", ["w"], ["z"]).SerializeToString() + _field(5, nested)
    # Appending a second graph field merges it into the first: one more node.
    data = tensor_model(onnx.TensorProto(name="w", data_type=1, dims=[2]))
    data += _field(7, _field(1, node))
    path = tmp_path / "nested.onnx"
    path.write_bytes(data)
    info = inspect_model(path)
    assert info.params == 2
    assert (info.details["node_count"], info.details["op_types"]) == (2, ["Identity"])


def test_truncated_onnx_is_rejected(tmp_path, torch_onnx):
    data = torch_onnx.read_bytes()
    path = tmp_path / "half.onnx"
    path.write_bytes(data[: len(data) // 2])
    error = rejected(path)
    assert error.code == "corrupt_model"
    assert "truncated" in error.message

    for size in range(0, len(data), 7):  # every cut yields a ModelRejected, nothing else
        path.write_bytes(data[:size])
        with pytest.raises(ModelRejected):
            inspect_model(path)


def test_mutated_files_only_raise_model_rejected(tmp_path, torch_onnx):
    torch = pytest.importorskip("torch")
    scripted = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(make_net()), str(scripted))
    rng = random.Random(7)
    path = tmp_path / "mutant"
    outcomes = set()
    for source in (torch_onnx.read_bytes(), scripted.read_bytes()):
        for _ in range(300):
            data = bytearray(source)
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            path.write_bytes(data)
            try:
                outcomes.add(inspect_model(path).format)
            except ModelRejected as error:
                outcomes.add(error.code)
    assert "corrupt_model" in outcomes
    assert outcomes <= {
        "onnx", "torchscript", "not_a_model", "unsupported_model", "unsafe_pickle", "model_too_complex",
        "external_data_not_allowed", "corrupt_model",
    }


# --------------------------------------------------------------------------- isolation


def test_inspection_imports_no_ml_framework(tmp_path, torch_onnx):
    torch = pytest.importorskip("torch")
    scripted = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(make_net()), str(scripted))
    script = (
        "import sys\n"
        "from app.models.inspect import inspect_model\n"
        f"print(inspect_model({str(torch_onnx)!r}).format,"
        f" inspect_model({str(scripted)!r}).format)\n"
        "loaded = {'torch', 'onnx', 'onnxruntime'} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["onnx", "torchscript"]
