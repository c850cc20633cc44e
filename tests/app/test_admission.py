"""Memory-aware admission: a job whose model (and data) cannot fit the job memory limit is refused at submit time
with the numbers, on SQLite and PostgreSQL, against the API's setting or the limits live workers publish."""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.core.db import Database, utcnow
from app.core.tables import WorkerRow
from app.main import create_app
from tests.app.test_api_uploads import upload_dataset, upload_model
from tests.conftest import make_settings
from tests.helpers import digits_npz_bytes, mlp_onnx_bytes

LIMIT = 512 * 1024


def weights_of(hidden: int) -> int:
    """max(file size, 4 bytes x parameters), as the estimate counts fp32 weights."""
    return max(len(mlp_onnx_bytes(hidden=hidden)), 4 * (64 * hidden + hidden + hidden * 10 + 10))


@pytest.fixture(params=["sqlite", "postgres"])
def small(request, tmp_path):
    """(client, settings) with a job memory limit of 512 KiB."""
    db = request.getfixturevalue("pg_url") if request.param == "postgres" else "sqlite"
    settings = make_settings(tmp_path, db, "filesystem", job_memory_limit_bytes=LIMIT)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, settings


def submit(client, model_id, config, **extra):
    return client.post("/v1/jobs", json={"kind": extra.pop("kind", "quantize"), "model_id": model_id,
                                         "config": config, **extra})


def test_model_too_big_for_the_limit_is_refused_with_the_numbers(small):
    client, _ = small
    big = upload_model(client, mlp_onnx_bytes(hidden=1024)).json()
    resp = submit(client, big["id"], {"method": "dynamic_int8"})
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    weights = weights_of(1024)
    assert err["code"] == "insufficient_memory"
    assert err["detail"]["weights_bytes"] == weights and err["detail"]["factor"] == 3
    assert err["detail"]["estimate_bytes"] == 3 * weights and err["detail"]["limit_bytes"] == LIMIT
    assert err["detail"]["limit_source"] == "job_memory_limit_bytes" and err["detail"]["queue"] == "cpu"
    assert str(3 * weights) in err["message"] and str(LIMIT) in err["message"]
    assert client.get("/v1/jobs").json()["items"] == []  # nothing was queued

    small_model = upload_model(client, mlp_onnx_bytes(hidden=32)).json()
    ok = submit(client, small_model["id"], {"method": "dynamic_int8"})
    assert ok.status_code == 202, ok.text


def test_dataset_arrays_count_and_fine_tune_raises_the_factor(small):
    client, _ = small
    model = upload_model(client, mlp_onnx_bytes(hidden=128)).json()
    weights = weights_of(128)
    data = digits_npz_bytes()
    ds = upload_dataset(client, data).json()
    arrays = np.load(io.BytesIO(data))
    array_bytes = sum(arrays[k].nbytes for k in arrays.files)
    assert 3 * weights < LIMIT < 3 * weights + array_bytes
    assert submit(client, model["id"], {"method": "dynamic_int8"}).status_code == 202
    resp = submit(client, model["id"], {"method": "static_int8"}, dataset_id=ds["id"])
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "insufficient_memory"
    assert resp.json()["error"]["detail"]["dataset_bytes"] == array_bytes
    assert resp.json()["error"]["detail"]["estimate_bytes"] == 3 * weights + array_bytes

    # prune: x3 without a fine-tune, x4 with one (gradients and optimizer state)
    mid = upload_model(client, mlp_onnx_bytes(hidden=512)).json()
    w = weights_of(512)
    buf = io.BytesIO()
    np.savez(buf, x=np.zeros((10, 64), np.float32), y=np.zeros(10, np.int64))
    tiny = upload_dataset(client, buf.getvalue(), name="tiny.npz").json()
    assert 3 * w + 10 * 64 * 4 + 80 < LIMIT < 4 * w
    prune = {"method": "magnitude", "sparsity": 0.5}
    assert submit(client, mid["id"], prune, kind="prune", dataset_id=tiny["id"]).status_code == 202
    tuned = submit(client, mid["id"], {**prune, "fine_tune": {"epochs": 1}}, kind="prune", dataset_id=tiny["id"])
    assert tuned.status_code == 422, tuned.text
    assert tuned.json()["error"]["detail"]["factor"] == 4
    assert tuned.json()["error"]["detail"]["estimate_bytes"] == 4 * w + 10 * 64 * 4 + 80

    # a built-in dataset counts at the float32 size the worker loads
    mnist = submit(client, model["id"], {"student": {"arch": "mlp", "hidden": [16]}}, kind="distill",
                   dataset_id="builtin:mnist")
    assert mnist.status_code == 422 and mnist.json()["error"]["detail"]["dataset_bytes"] == 70_000 * (784 * 4 + 8)


def test_the_limit_live_workers_publish_is_the_one_that_counts(small):
    client, settings = small
    big = upload_model(client, mlp_onnx_bytes(hidden=1024)).json()
    need = 3 * weights_of(1024)
    db = Database(settings)
    try:
        with db.session() as session:  # what a worker writes at start (worker/maintenance.register_worker)
            session.add(WorkerRow(name="big@test", queues="cpu", device="cpu",
                                  info={"job_memory_limit_bytes": 2 * need}, last_seen_at=utcnow()))
            session.add(WorkerRow(name="gpu@test", queues="gpu", device="cuda",
                                  info={"job_memory_limit_bytes": need // 2}, last_seen_at=utcnow()))
            session.commit()
        # the cpu workers allow twice what it needs, although this API process's own setting is smaller
        assert submit(client, big["id"], {"method": "dynamic_int8"}, device="cpu").status_code == 202
        # the only gpu worker allows half of it
        resp = submit(client, big["id"], {"method": "dynamic_int8"}, device="cuda")
        assert resp.status_code == 422, resp.text
        detail = resp.json()["error"]["detail"]
        assert detail["limit_bytes"] == need // 2 and detail["queue"] == "gpu"
        assert detail["limit_source"] == "the live gpu workers"
        with db.session() as session:  # a worker that stopped heartbeating no longer counts
            session.get(WorkerRow, "big@test").last_seen_at = utcnow().replace(year=2000)
            session.commit()
        late = submit(client, big["id"], {"method": "dynamic_int8"}, device="cpu")
        assert late.status_code == 422 and late.json()["error"]["detail"]["limit_source"] == "job_memory_limit_bytes"
    finally:
        db.dispose()


# --- input shapes ---------------------------------------------------------------------------------------------------


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _features(n: int, *row: int) -> bytes:
    return _npz(x=np.zeros((n, *row), np.float32), y=np.arange(n, dtype=np.int64) % 10)


def _onnx_relu(shape: list, name: str = "x") -> bytes:
    """A one-node model whose input has exactly `shape` (ints fixed, strings symbolic, None unknown)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", [name], ["y"])], "relu",
                              [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def _torchscript(row: tuple[int, ...], trace: bool = True) -> bytes:
    """A TorchScript classifier of rows of shape `row`: traced (the archive keeps the example input) or scripted."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(row), 10)).eval()
    module = torch.jit.trace(net, torch.zeros(2, *row)) if trace else torch.jit.script(net)
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    return buf.getvalue()


def _shape_error(resp) -> dict:
    assert resp.status_code == 422, resp.text
    err = resp.json()["error"]
    assert err["code"] == "input_shape_mismatch", err
    return err


def test_an_onnx_input_of_another_shape_is_refused_at_submit(client):
    model = upload_model(client, mlp_onnx_bytes()).json()  # input x: ["N", 64]
    narrow = upload_dataset(client, _features(20, 32), name="narrow.npz").json()
    err = _shape_error(submit(client, model["id"], {"method": "static_int8"}, dataset_id=narrow["id"]))
    assert err["detail"] == {"input": "x", "model_shape": ["N", 64], "dataset_shape": [20, 32], "array": "x",
                             "dataset": f"dataset {narrow['id']}", "model_id": model["id"],
                             "shape_source": "declared"}
    for needle in ("'x'", "['N', 64]", "[20, 32]", "dim 1 is 32, not 64", "invalid_dataset"):
        assert needle in err["message"], err["message"]
    assert client.get("/v1/jobs").json()["items"] == []  # nothing was queued

    images = upload_dataset(client, _features(20, 8, 8), name="images.npz").json()
    err = _shape_error(submit(client, model["id"], {"method": "static_int8"}, dataset_id=images["id"]))
    assert err["detail"]["dataset_shape"] == [20, 8, 8] and "rank 3, not 2" in err["message"]

    fits = upload_dataset(client, _features(20, 64), name="fits.npz").json()
    assert submit(client, model["id"], {"method": "static_int8"}, dataset_id=fits["id"]).status_code == 202
    # prune and distill are checked alike
    err = _shape_error(submit(client, model["id"], {"student": {"arch": "mlp", "hidden": [8]}}, kind="distill",
                              dataset_id=narrow["id"]))
    assert err["detail"]["input"] == "x"


def test_dynamic_dims_match_anything(client):
    data = upload_dataset(client, _features(20, 3, 5), name="any.npz").json()
    for shape in (["N", "C", "W"], [None, None, None], ["batch", 3, "W"], [1, 3, 5]):
        model = upload_model(client, _onnx_relu(shape)).json()
        assert model["inspection"]["inputs"][0]["shape"] == shape
        resp = submit(client, model["id"], {"method": "static_int8"}, dataset_id=data["id"])
        assert resp.status_code == 202, (shape, resp.text)  # a fixed first dim (1) is the batch: rows may differ
    model = upload_model(client, _onnx_relu(["N", 3, 4])).json()
    err = _shape_error(submit(client, model["id"], {"method": "static_int8"}, dataset_id=data["id"]))
    assert "dim 2 is 5, not 4" in err["message"]


def test_shape_rules():
    from app.jobs.admission import _builtin_problem, _shape_problem

    assert _shape_problem(["N", 64], [10, 64]) is None
    assert _shape_problem([-1, -1], [10, 7]) is None  # -1: any size
    assert _shape_problem([None, "F", 0], [10, 7, 3]) is None
    assert _shape_problem(["N", 64], [10, 63]) == "dim 1 is 63, not 64"
    assert _shape_problem(["N", 64], [10, 8, 8]) == "rank 3, not 2"
    # built-ins, as the worker lays their (1, H, W) images out for an ONNX input
    for shape in (["N", 1, 28, 28], ["N", 784], ["N", 28, 28], ["N", "C", "H", "W"], [1, 28, 28, 1], ["N", 4, 196]):
        assert _builtin_problem("mnist", shape, "declared") is None, shape
    for shape in (["N", 64], ["N", 3, 28, 28], ["N", "F", 783], ["N"]):
        assert _builtin_problem("mnist", shape, "declared") is not None, shape
    # a TorchScript model is fed the images as they are
    assert _builtin_problem("digits", [2, 1, 8, 8], "traced") is None
    assert _builtin_problem("digits", [2, 64], "traced") == "rank 4, not 2"


def test_builtin_datasets_are_checked(client):
    model = upload_model(client, mlp_onnx_bytes()).json()  # ["N", 64]: digits' 8x8 images fit, mnist's 28x28 not
    assert submit(client, model["id"], {"method": "static_int8"}, dataset_id="builtin:digits").status_code == 202
    err = _shape_error(submit(client, model["id"], {"method": "static_int8"}, dataset_id="builtin:mnist"))
    assert err["detail"]["dataset"] == "builtin:mnist" and err["detail"]["dataset_shape"] == [60000, 1, 28, 28]
    assert err["detail"]["model_shape"] == ["N", 64]
    assert "builtin:mnist has shape [60000, 1, 28, 28]" in err["message"] and "784 values per row" in err["message"]
    flat = upload_model(client, _onnx_relu(["N", 784])).json()
    assert submit(client, flat["id"], {"method": "static_int8"}, dataset_id="builtin:fashion-mnist").status_code == 202


def test_torchscript_traced_inputs_are_checked(client):
    traced = upload_model(client, _torchscript((64,)), name="mlp.pt").json()
    assert traced["format"] == "torchscript" and traced["inspection"]["inputs"] == []
    assert traced["inspection"]["traced_inputs"] == [{"name": "input", "dtype": "float32", "shape": [2, 64]}]
    narrow = upload_dataset(client, _features(20, 32), name="narrow.npz").json()
    fits = upload_dataset(client, _features(20, 64), name="fits.npz").json()
    err = _shape_error(submit(client, traced["id"], {"method": "dynamic_int8"}, dataset_id=narrow["id"]))
    assert err["detail"]["shape_source"] == "traced" and err["detail"]["model_shape"] == [2, 64]
    assert err["detail"]["input"] == "input" and err["detail"]["dataset_shape"] == [20, 32]
    assert "traced with an example of shape [2, 64]" in err["message"]
    assert submit(client, traced["id"], {"method": "dynamic_int8"}, dataset_id=fits["id"]).status_code == 202
    # a TorchScript model gets a built-in's images as (N, 1, H, W): a model traced on flat rows cannot take them
    _shape_error(submit(client, traced["id"], {"method": "dynamic_int8"}, dataset_id="builtin:digits"))
    images = upload_model(client, _torchscript((1, 8, 8)), name="cnn.pt").json()
    assert submit(client, images["id"], {"method": "dynamic_int8"}, dataset_id="builtin:digits").status_code == 202

    # a scripted model keeps no example: nothing to check before the worker runs it
    scripted = upload_model(client, _torchscript((64,), trace=False), name="scripted.pt").json()
    assert scripted["inspection"]["traced_inputs"] == []
    assert submit(client, scripted["id"], {"method": "dynamic_int8"}, dataset_id=narrow["id"]).status_code == 202


def test_a_student_model_is_checked_too(client):
    teacher = upload_model(client, _onnx_relu(["N", 32])).json()
    student = upload_model(client, mlp_onnx_bytes(hidden=16)).json()  # ["N", 64]
    data = upload_dataset(client, _features(20, 32)).json()
    err = _shape_error(submit(client, teacher["id"], {"student": {"model_id": student["id"]}}, kind="distill",
                              dataset_id=data["id"]))
    assert err["detail"]["model_id"] == student["id"] and "the student model's input 'x'" in err["message"]
