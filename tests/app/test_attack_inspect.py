"""Findings of a security attack run, refused where they enter: at upload (app/models/inspect.py) and at job
submission (app/jobs/admission.py, app/jobs/service.py). One test per finding; the worker's side of the same
findings is in tests/worker/engine/test_attack_engine.py, which builds its files with the builders here.

- 9: a distill student of ~30 G parameters was accepted and died with out_of_memory in the worker: admission now
  counts the student's training memory and refuses the job with its size and the limit.
- 11: ONNX external data named where the inspector did not look (a local function's attribute default value,
  subgraphs within subgraphs, training-info graphs, sparse tensor attributes) is refused.
- 12: a TorchScript zip with two root folders (one inspected, the other loaded) is refused, and so is TorchScript
  code that calls file operators (`torch.from_file`, `torch.save`); ordinary models still pass.
- 13: labels past the model's number of outputs are refused at submission (`labels_out_of_range`).
"""
from __future__ import annotations

import io
import zipfile
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.models.inspect import ModelRejected, inspect_model
from tests.app.test_api_uploads import upload_dataset, upload_model
from tests.conftest import make_settings
from tests.helpers import digits_npz_bytes, mlp_onnx_bytes

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def api(request, tmp_path_factory):
    """A client of one app per database (job memory limit: the default 8 GiB)."""
    db = request.getfixturevalue("pg_url") if request.param == "postgres" else "sqlite"
    settings = make_settings(tmp_path_factory.mktemp(f"attack-{request.param}"), db, "filesystem")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def upload(client, data: bytes, filename: str):
    return client.post("/v1/models", files={"file": (filename, data, "application/octet-stream")})


def error_of(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert error["code"] == code, error
    return error


# --------------------------------------------------------------------------- ONNX files with external data

def external(tensor: onnx.TensorProto, location: str = "../../etc/passwd") -> onnx.TensorProto:
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def _vi(name: str, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _model(graph, functions=(), opsets=(("", 17),), training_info=()) -> bytes:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
                              functions=list(functions))
    model.ir_version = 8
    model.training_info.extend(training_info)
    return model.SerializeToString()


def onnx_function_attribute_default() -> bytes:
    """A local function whose attribute `k` defaults to a tensor kept in an external file (FunctionProto field 11);
    its Constant node takes the value from the attribute (ref_attr_name)."""
    default = helper.make_attribute("k", external(numpy_helper.from_array(np.ones(4, np.float32), "k_default")))
    constant = helper.make_node("Constant", [], ["kv"])
    constant.attribute.append(onnx.AttributeProto(name="value", ref_attr_name="k", type=onnx.AttributeProto.TENSOR))
    function = helper.make_function("local", "AddK", ["a"], ["b"],
                                    [constant, helper.make_node("Add", ["a", "kv"], ["b"])],
                                    [helper.make_opsetid("", 17)], attribute_protos=[default])
    graph = helper.make_graph([helper.make_node("AddK", ["x"], ["y"], domain="local")], "g",
                              [_vi("x", [4])], [_vi("y", [4])])
    return _model(graph, [function], (("", 17), ("local", 1)))


def onnx_function_attribute_default_graph() -> bytes:
    """A local function whose attribute default is a graph holding an external initializer."""
    inner = helper.make_graph([helper.make_node("Identity", ["w"], ["o"])], "inner", [], [_vi("o", [4])],
                              [external(numpy_helper.from_array(np.ones(4, np.float32), "w"))])
    function = helper.make_function("local", "F", ["a"], ["b"], [helper.make_node("Identity", ["a"], ["b"])],
                                    [helper.make_opsetid("", 17)], attribute_protos=[helper.make_attribute("g", inner)])
    graph = helper.make_graph([helper.make_node("F", ["x"], ["y"], domain="local")], "g",
                              [_vi("x", [4])], [_vi("y", [4])])
    return _model(graph, [function], (("", 17), ("local", 1)))


def onnx_nested_if() -> bytes:
    """If -> then_branch: If -> then_branch: a Constant whose value is external."""
    value = external(numpy_helper.from_array(np.ones(4, np.float32), "c"))
    deepest = helper.make_graph([helper.make_node("Constant", [], ["t2"], value=value)], "then2", [], [_vi("t2", [4])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e2"])], "else2", [], [_vi("e2", [4])])
    middle = helper.make_graph(
        [helper.make_node("If", ["cond"], ["t1"], then_branch=deepest, else_branch=other)], "then1", [],
        [_vi("t1", [4])])
    outer_else = helper.make_graph([helper.make_node("Identity", ["x"], ["e1"])], "else1", [], [_vi("e1", [4])])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=middle, else_branch=outer_else)], "g",
        [_vi("x", [4]), _vi("cond", [], TensorProto.BOOL)], [_vi("y", [4])])
    return _model(graph)


def onnx_training_info() -> bytes:
    """A training-info algorithm graph (with an update binding) whose initializer is external."""
    algorithm = helper.make_graph([helper.make_node("Identity", ["w"], ["w_new"])], "algo", [], [_vi("w_new", [4])],
                                  [external(numpy_helper.from_array(np.ones(4, np.float32), "w"))])
    info = helper.make_training_info(algorithm, [("w0", "w_new")], None, None)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [_vi("x", [4])], [_vi("y", [4])],
                              [numpy_helper.from_array(np.zeros(4, np.float32), "w0")])
    return _model(graph, training_info=[info])


def onnx_sparse_tensor_attribute() -> bytes:
    """A Constant whose sparse_value keeps its values in an external file."""
    values = external(numpy_helper.from_array(np.ones(2, np.float32), "sv"))
    indices = numpy_helper.from_array(np.array([0, 3], np.int64), "si")
    sparse = helper.make_sparse_tensor(values, indices, [4])
    graph = helper.make_graph([helper.make_node("Constant", [], ["y"], sparse_value=sparse)], "g", [], [_vi("y", [4])])
    return _model(graph)


EXTERNAL_ONNX = {
    "function_attribute_default_tensor": onnx_function_attribute_default,
    "function_attribute_default_graph": onnx_function_attribute_default_graph,
    "if_within_if": onnx_nested_if,
    "training_info_graph": onnx_training_info,
    "sparse_tensor_attribute": onnx_sparse_tensor_attribute,
}


# --------------------------------------------------------------------------- TorchScript files

class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)


class FromFile(_Net):
    def forward(self, x):
        data = torch.from_file("/tmp/distillery-attack-from-file", shared=True, size=4)
        return self.fc(x + data.sum())


class Save(_Net):
    def forward(self, x):
        torch.save(x, "/tmp/distillery-attack-save.pt")
        return self.fc(x)


class SaveInLoop(_Net):
    """The call sits in a loop within a branch within a helper method."""

    def forward(self, x):
        if x.sum() > 0:
            for _ in range(2):
                self.dump(x)
        return self.fc(x)

    def dump(self, x: torch.Tensor) -> None:
        torch.save(x, "/tmp/distillery-attack-loop.pt")


def scripted(cls) -> torch.jit.ScriptModule:
    return torch.jit.script(cls().eval())


def torchscript_bytes(module) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    return buf.getvalue()


def ordinary_models() -> dict[str, torch.jit.ScriptModule]:
    """Small CNN and MLP, scripted and traced, and a dynamically quantized MLP."""
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.MaxPool2d(2), torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 10)).eval()
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(),
                              torch.nn.Linear(32, 10)).eval()
    x = torch.randn(2, 1, 8, 8)
    quantized = torch.ao.quantization.quantize_dynamic(mlp, {torch.nn.Linear}, dtype=torch.qint8)
    return {
        "cnn_scripted": torch.jit.script(cnn), "cnn_traced": torch.jit.trace(cnn, x),
        "mlp_scripted": torch.jit.script(mlp), "mlp_traced": torch.jit.trace(mlp, x),
        "quantized_mlp_scripted": torch.jit.script(quantized),
    }


def two_roots(benign: bytes, evil: bytes) -> bytes:
    """The members of a benign archive under root `a`, and those of an evil one under root `b`."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for root, data in (("a", benign), ("b", evil)):
            with zipfile.ZipFile(io.BytesIO(data)) as src:
                for name in src.namelist():
                    dst.writestr(f"{root}/{name.split('/', 1)[1]}", src.read(name))
    return out.getvalue()


def renamed_member(data: bytes, old_suffix: str, new_name: str) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for name in src.namelist():
            dst.writestr(new_name if name.endswith(old_suffix) else name, src.read(name))
    return out.getvalue()


# --------------------------------------------------------------------------- 9: the student's size


def test_distill_with_a_student_too_big_for_memory_is_refused_with_its_size(api):
    from app.core.tables import ModelRow
    from app.jobs.admission import student_need
    from app.methods import DistillConfig
    from worker.engine.students import build_cnn, build_mlp
    from worker.engine.torch_io import count_weights

    client = api
    model = upload_model(client, mlp_onnx_bytes(hidden=32)).json()  # (N, 64) -> (N, 10)
    dataset = upload_dataset(client, digits_npz_bytes()).json()

    hidden = [65536] * 8
    resp = client.post("/v1/jobs", json={"kind": "distill", "model_id": model["id"], "dataset_id": dataset["id"],
                                         "config": {"student": {"arch": "mlp", "hidden": hidden}}})
    error = error_of(resp, 422, "insufficient_memory")
    widths = [64, *hidden, 10]
    params = sum(a * b + b for a, b in zip(widths, widths[1:]))  # ~30 G
    student = error["detail"]["student"]
    assert student["arch"] == "mlp" and student["params"] == params > 30 * 10**9
    assert student["bytes"] >= 16 * params and error["detail"]["estimate_bytes"] > student["bytes"]
    assert str(params) in error["message"] and str(error["detail"]["limit_bytes"]) in error["message"]
    assert error["detail"]["limit_bytes"] == 8 * 1024**3
    assert client.get("/v1/jobs").json()["items"] == []  # nothing was queued

    cnn = client.post("/v1/jobs", json={"kind": "distill", "model_id": model["id"], "dataset_id": "builtin:mnist",
                                        "config": {"student": {"arch": "cnn", "channels": [65536] * 8}}})
    assert error_of(cnn, 422, "insufficient_memory")["detail"]["student"]["arch"] == "cnn"

    ok = client.post("/v1/jobs", json={"kind": "distill", "model_id": model["id"], "dataset_id": dataset["id"],
                                       "config": {"student": {"arch": "mlp", "hidden": [32]}}})
    assert ok.status_code == 202, ok.text

    # the count is the worker's own: the students distill.py builds, for the model's declared input and outputs (mlp)
    # or builtin:mnist's images (cnn)
    teacher = ModelRow(format="onnx", size_bytes=1, info={
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 64]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["N", 10]}], "params": 1})
    for student, builtin, built in [
        ({"arch": "mlp", "hidden": [32, 16]}, None, build_mlp(64, (32, 16), 10)),
        ({"arch": "cnn", "channels": [8, 16], "hidden": [24]}, "mnist", build_cnn((1, 28, 28), (8, 16), (24,), 10)),
        ({"arch": "cnn", "channels": [4] * 6, "hidden": []}, "mnist", build_cnn((1, 28, 28), (4,) * 6, (), 10)),
    ]:
        need = student_need(DistillConfig(student=student), teacher, None, builtin)
        assert need["params"] == count_weights(built), student


# --------------------------------------------------------------------------- 11: external data anywhere


@pytest.mark.parametrize("name", list(EXTERNAL_ONNX))
def test_onnx_external_data_anywhere_in_the_model_is_refused(api, tmp_path, name):
    data = EXTERNAL_ONNX[name]()
    onnx.load_from_string(data)  # a well-formed model, only its tensor points outside the file
    error = error_of(upload(api, data, "model.onnx"), 422, "external_data_not_allowed")
    assert "external file" in error["message"]
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    with pytest.raises(ModelRejected) as excinfo:
        inspect_model(path)
    assert excinfo.value.code == "external_data_not_allowed"


# --------------------------------------------------------------------------- 12: TorchScript archives and code


def test_torchscript_layout_and_file_operators_are_refused_and_ordinary_models_pass(api, tmp_path):
    client = api
    for name, module in ordinary_models().items():
        resp = upload(client, torchscript_bytes(module), f"{name}.pt")
        assert resp.status_code == 201, (name, resp.text)
        assert resp.json()["format"] == "torchscript"

    for cls, operator in ((FromFile, "aten::from_file"), (Save, "aten::save"), (SaveInLoop, "aten::save")):
        error = error_of(upload(client, torchscript_bytes(scripted(cls)), "evil.pt"), 422, "unsafe_torchscript")
        assert operator in error["message"] and error["detail"]["operator"] == operator
        assert error["detail"]["member"].startswith("evil/code/") or "/code/" in error["detail"]["member"]

    benign = torchscript_bytes(ordinary_models()["mlp_scripted"])
    evil = torchscript_bytes(scripted(Save))
    error = error_of(upload(client, two_roots(benign, evil), "two.pt"), 422, "unsupported_model")
    assert error["detail"]["roots"] == ["a", "b"] and "2 root folders" in error["message"]
    # a benign archive with one extra file beside its root folder
    loose = io.BytesIO(benign + b"")
    with zipfile.ZipFile(loose, "a") as archive:
        archive.writestr("stray.txt", b"x")
    assert error_of(upload(client, loose.getvalue(), "loose.pt"), 422, "unsupported_model")["detail"]["roots"]

    # a member twice: zipfile (here) reads the last one, the loader may read the first
    twice = io.BytesIO(benign)
    with zipfile.ZipFile(twice, "a") as archive:
        code = next(name for name in archive.namelist() if "/code/" in name and name.endswith(".py"))
        archive.writestr(code, b"")
    assert error_of(upload(client, twice.getvalue(), "twice.pt"), 422, "unsupported_model")["detail"]["member"] == code

    for bad in ("../escape/version", "/abs/version", "root\\version", "root/../version"):
        root = zipfile.ZipFile(io.BytesIO(benign)).namelist()[0].split("/", 1)[0]
        data = renamed_member(benign, "/version", bad.replace("root", root))
        error = error_of(upload(client, data, "names.pt"), 422, "unsupported_model")
        assert error["detail"]["member"] == bad.replace("root", root), bad


# --------------------------------------------------------------------------- 13: labels past the outputs


def test_labels_past_the_models_outputs_are_refused_at_submission(api):
    client = api
    model = upload_model(client, mlp_onnx_bytes(hidden=16)).json()  # 10 outputs
    x = np.random.default_rng(0).random((20, 64), dtype=np.float32)
    buf = io.BytesIO()
    np.savez(buf, x=x, y=np.array([0, 1, 10**12] + [2] * 17, np.int64))
    huge = upload_dataset(client, buf.getvalue(), name="huge_labels.npz").json()
    assert huge["num_classes"] == 10**12 + 1

    for kind, config in (("distill", {"student": {"arch": "mlp", "hidden": [8]}}),
                         ("quantize", {"method": "static_int8"})):
        resp = client.post("/v1/jobs", json={"kind": kind, "model_id": model["id"], "dataset_id": huge["id"],
                                             "config": config})
        error = error_of(resp, 422, "labels_out_of_range")
        assert error["detail"] == {"max_label": 10**12, "num_outputs": 10, "output": "logits"}
        assert str(10**12) in error["message"] and "10 classes" in error["message"]

    # a model with 5 outputs and a built-in dataset of 10 classes
    five = helper.make_model(helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"]), helper.make_node("MatMul", ["f", "w"], ["logits"])], "five",
        [_vi("x", ["N", 1, 8, 8])], [_vi("logits", ["N", 5])],
        [numpy_helper.from_array(np.ones((64, 5), np.float32), "w")]), opset_imports=[helper.make_opsetid("", 17)])
    five.ir_version = 8
    five_id = upload(client, five.SerializeToString(), "five.onnx").json()["id"]
    resp = client.post("/v1/jobs", json={"kind": "quantize", "model_id": five_id, "dataset_id": "builtin:digits",
                                         "config": {"method": "static_int8"}})
    assert error_of(resp, 422, "labels_out_of_range")["detail"]["max_label"] == 9

    fine = upload_dataset(client, digits_npz_bytes()).json()  # labels 0..9
    ok = client.post("/v1/jobs", json={"kind": "quantize", "model_id": model["id"], "dataset_id": fine["id"],
                                       "config": {"method": "static_int8"}})
    assert ok.status_code == 202, ok.text
