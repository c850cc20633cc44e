"""Hostile and broken uploads through the HTTP API: one case per attack, on SQLite and on PostgreSQL.

Every payload that could run code does so by writing a canary file when it is unpickled. For each case the test
asserts: a 4xx error JSON whose code and message name the problem; the canary never appears; nothing is left
behind (no new file under the storage folder, its tmp/ included, no new row in models/datasets); and the service
keeps serving (GET /healthz and a good upload still work). The same payloads then go through the worker's loaders
(worker/engine/torch_io.py, onnx_io.py, data.py, in process), which must refuse them as well without running
anything. An upload cut off mid-stream is sent on a raw socket to a real uvicorn server.

The rule for ONNX external data: an upload is one file, so any tensor that keeps its data outside the file is
refused, wherever the location points (``../../etc/passwd``, ``/etc/passwd``, a name that is a symlink in the
storage folder) and wherever the tensor sits (initializer, Constant node, subgraph, function).

Each database gets one app for the module (a fresh SQLite file / a freshly truncated PostgreSQL database); every
case measures the storage folder and the tables before and after its own request, so the cases stay independent.
"""
from __future__ import annotations

import builtins
import functools
import io
import os
import pickle
import random
import shlex
import socket
import struct
import threading
import time
import tracemalloc
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine, text

from tests.conftest import make_settings
from tests.helpers import digits_npz_bytes, mlp_onnx_bytes

# --------------------------------------------------------------------------- payloads that write a canary


class _System:
    """Unpickled, runs ``os.system("touch CANARY")`` (pickled as posix.system)."""

    def __init__(self, canary: Path):
        self.canary = str(canary)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.canary)}",)


class _Open(_System):
    """Unpickled, runs ``builtins.open(CANARY, "w")``."""

    def __reduce__(self):
        return builtins.open, (self.canary, "w")


class _Exec(_System):
    """Unpickled, runs ``builtins.exec("open(CANARY, 'w').close()")``."""

    def __reduce__(self):
        return builtins.exec, (f"open({self.canary!r}, 'w').close()",)


def system_pickle(canary: Path, protocol: int = 2) -> bytes:
    return pickle.dumps(_System(canary), protocol=protocol)


def zip_bytes(entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buf.getvalue()


def torchscript_like(data_pkl: bytes, constants_pkl: bytes | None = None, root: str = "evil") -> bytes:
    """The layout of a torch.jit.save archive (data.pkl, constants.pkl, code/, version)."""
    return zip_bytes({
        f"{root}/data.pkl": data_pkl,
        f"{root}/constants.pkl": constants_pkl if constants_pkl is not None else pickle.dumps((), protocol=2),
        f"{root}/code/__torch__.py": b"",
        f"{root}/version": b"3\n",
    })


def torch_save_like(data_pkl: bytes) -> bytes:
    """The layout of a torch.save zip checkpoint: a pickle and its storages, no TorchScript code."""
    return zip_bytes({"archive/data.pkl": data_pkl, "archive/version": b"3\n", "archive/data/0": bytes(16)})


def torch_export_like(canary: Path, marker: bool = True) -> bytes:
    """The layout torch.export.save writes (.pt2), with its pickled parts (sample inputs, weights) replaced."""
    entries = {
        "archive/models/model.json": b"{}",
        "archive/data/weights/weight_0": system_pickle(canary),
        "archive/data/sample_inputs/model.pt": torch_save_like(system_pickle(canary)),
        "archive/.data/version": b"1\n",
    }
    if marker:
        entries.update({"archive/archive_format": b"pt2", "archive/archive_version": b"0"})
    return zip_bytes(entries)


@functools.cache
def zip_bomb(member: str, uncompressed: int = 64 * 1024 * 1024) -> bytes:
    """A TorchScript-like archive with one member of zeros that deflates ~1000x (64 MiB from ~64 KiB)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name in ("bomb/data.pkl", "bomb/constants.pkl", "bomb/code/__torch__.py", "bomb/version"):
            if name != member:
                archive.writestr(name, pickle.dumps((), protocol=2) if name.endswith(".pkl") else b"")
        info = zipfile.ZipInfo(member)
        info.compress_type = zipfile.ZIP_DEFLATED
        block = bytes(1024 * 1024)
        with archive.open(info, "w", force_zip64=True) as out:
            for _ in range(uncompressed // len(block)):
                out.write(block)
    return buf.getvalue()


def unsupported_compression(canary: Path) -> bytes:
    """A TorchScript-like archive whose members claim compression method 99 (which zipfile cannot read)."""
    data = bytearray(torchscript_like(pickle.dumps({}, protocol=2)))
    for signature, offset in ((b"PK\x03\x04", 8), (b"PK\x01\x02", 10)):
        start = 0
        while (at := data.find(signature, start)) >= 0:
            data[at + offset: at + offset + 2] = (99).to_bytes(2, "little")
            start = at + 4
    return bytes(data)


def huge_storage_pickle() -> bytes:
    """A data.pkl (hand-written opcodes) declaring a float storage of 2**40 elements as its persistent id."""
    def unicode(s: str) -> bytes:
        return b"X" + len(s).to_bytes(4, "little") + s.encode()

    numel = 2**40
    long1 = b"\x8a" + bytes([6]) + numel.to_bytes(6, "little")
    return (b"\x80\x02(" + unicode("storage") + b"ctorch\nFloatStorage\n" + unicode("0") + unicode("cpu") + long1
            + b"tQ.")


# ONNX ---------------------------------------------------------------------------------------------------------


def _external(tensor, location: str):
    from onnx import TensorProto

    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def onnx_external_initializer(location: str) -> bytes:
    import onnx

    model = onnx.load_from_string(mlp_onnx_bytes(hidden=8))
    _external(model.graph.initializer[0], location)
    return model.SerializeToString()


def _graph_model(nodes, inputs, outputs, initializers=(), functions=(), opsets=(("", 17),)):
    from onnx import helper

    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets],
                             functions=list(functions)).SerializeToString()


def _vi(name: str, shape):
    from onnx import TensorProto, helper

    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def onnx_external_constant(location: str) -> bytes:
    from onnx import helper, numpy_helper

    value = _external(numpy_helper.from_array(np.ones(4, np.float32), "c"), location)
    return _graph_model([helper.make_node("Constant", [], ["c"], value=value), helper.make_node("Add", ["x", "c"], ["y"])],
                        [_vi("x", [4])], [_vi("y", [4])])


def onnx_external_subgraph(location: str) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    weight = _external(numpy_helper.from_array(np.ones(4, np.float32), "w"), location)
    then_graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["t"])], "then", [], [_vi("t", [4])], [weight])
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [_vi("e", [4])])
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    return _graph_model([helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)],
                        [_vi("x", [4]), cond], [_vi("y", [4])])


def onnx_external_function(location: str) -> bytes:
    from onnx import helper, numpy_helper

    value = _external(numpy_helper.from_array(np.ones(4, np.float32), "k"), location)
    function = helper.make_function("local", "F", ["a"], ["b"], [
        helper.make_node("Constant", [], ["k"], value=value), helper.make_node("Add", ["a", "k"], ["b"])],
        [helper.make_opsetid("", 17)])
    return _graph_model([helper.make_node("F", ["x"], ["y"], domain="local")], [_vi("x", [4])], [_vi("y", [4])],
                        functions=[function], opsets=(("", 17), ("local", 1)))


def onnx_absurd_initializer() -> bytes:
    import onnx
    from onnx import helper

    weight = onnx.TensorProto(name="w", data_type=onnx.TensorProto.FLOAT, dims=[2**40, 2**40])
    return _graph_model([helper.make_node("Identity", ["w"], ["y"])], [], [_vi("y", None)], [weight])


def onnx_absurd_constant() -> bytes:
    import onnx
    from onnx import helper

    value = onnx.TensorProto(name="big", data_type=onnx.TensorProto.FLOAT, dims=[2**31, 2**31, 16])
    return _graph_model([helper.make_node("Constant", [], ["y"], value=value)], [], [_vi("y", None)])


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def onnx_nested_subgraphs(depth: int = 200) -> bytes:
    """Node -> attribute.g -> graph.node -> ... nested 200 deep (hand-written protobuf; onnx refuses to build it)."""
    node = _field(4, b"Identity")
    for _ in range(depth):
        node = _field(4, b"If") + _field(5, _field(1, b"then_branch") + _field(6, _field(1, node)))
    graph = _field(1, node)
    return _varint(1 << 3) + _varint(8) + _field(8, _varint(2 << 3) + _varint(17)) + _field(7, graph)


# Datasets -----------------------------------------------------------------------------------------------------


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def npz_object_array(canary: Path) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, x=np.array([_System(canary), _Open(canary)], dtype=object), y=np.zeros(2, np.int64))
    return buf.getvalue()


def npz_pickle_member(canary: Path) -> bytes:
    """An .npz whose x.npy is a bare pickle instead of an .npy array."""
    return zip_bytes({"x.npy": system_pickle(canary), "y.npy": npz_member(np.zeros(2, np.int64))})


def npz_member(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=False)
    return buf.getvalue()


def npz_corrupt_crc() -> bytes:
    """A flipped byte in the labels (which the API reads in full): the member's CRC no longer matches."""
    data = bytearray(digits_npz_bytes())
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("y.npy")
    data[info.header_offset + info.compress_size] ^= 0x01  # inside y's stored data, past its .npy header
    return bytes(data)


# --------------------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class Case:
    endpoint: str  # "models" | "datasets"
    filename: str
    build: Callable[[Path, Path], bytes]  # (canary, storage dir) -> file content
    status: int
    code: str
    needle: str  # a word of the message that names the problem
    loader: str | None = "model"  # which worker loader must refuse it too ("model", "dataset", None)


def _random(seed: int) -> Callable[[Path, Path], bytes]:
    return lambda canary, storage: random.Random(seed).randbytes(64 * 1024)


def _symlinked_location(canary: Path, storage: Path) -> bytes:
    # a location that is a symlink to /etc/passwd next to the stored objects and the temp files
    for folder in (storage, storage / "objects"):
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / "weights.bin"
        if not link.is_symlink():
            link.symlink_to("/etc/passwd")
    return onnx_external_initializer("weights.bin")


MODEL_CASES = {
    # code execution through pickles
    "pickle_reduce_os_system": Case("models", "model.pt", lambda c, s: system_pickle(c), 422, "unsupported_model",
                                    "pickled"),
    "pickle_reduce_builtins_open": Case("models", "model.pt", lambda c, s: pickle.dumps(_Open(c), protocol=4), 422,
                                        "unsupported_model", "pickled"),
    "pickle_protocol_0": Case("models", "model.pt", lambda c, s: pickle.dumps(_System(c), protocol=0), 422,
                              "not_a_model", "not a recognised model"),
    "torch_save_zip_with_reduce": Case("models", "model.pt", lambda c, s: torch_save_like(system_pickle(c)), 422,
                                       "unsupported_model", "pickled"),
    "torchscript_data_pkl_global_os_system": Case("models", "model.pt",
                                                  lambda c, s: torchscript_like(system_pickle(c)), 422,
                                                  "unsafe_pickle", "pickle"),
    "torchscript_constants_pkl_global_os_system": Case(
        "models", "model.pt", lambda c, s: torchscript_like(pickle.dumps({}, protocol=2), system_pickle(c)), 422,
        "unsafe_pickle", "pickle"),
    "torchscript_stack_global_builtins_exec": Case("models", "model.pt",
                                                   lambda c, s: torchscript_like(pickle.dumps(_Exec(c), protocol=4)),
                                                   422, "unsafe_pickle", "pickle"),
    "torchscript_global_builtins_open": Case("models", "model.pt",
                                             lambda c, s: torchscript_like(pickle.dumps(_Open(c), protocol=2)),
                                             422, "unsafe_pickle", "pickle"),
    "torch_export_pt2_with_pickled_parts": Case("models", "model.pt2", lambda c, s: torch_export_like(c), 422,
                                                "unsupported_model", "torch.export"),
    "torch_export_pt2_without_format_marker": Case("models", "model.pt2",
                                                   lambda c, s: torch_export_like(c, marker=False), 422,
                                                   "unsupported_model", "torch.export"),
    # ONNX external data pointing outside the upload
    "onnx_external_data_relative_path": Case("models", "model.onnx",
                                             lambda c, s: onnx_external_initializer("../../etc/passwd"), 422,
                                             "external_data_not_allowed", "external file"),
    "onnx_external_data_absolute_path": Case("models", "model.onnx",
                                             lambda c, s: onnx_external_initializer("/etc/passwd"), 422,
                                             "external_data_not_allowed", "external file"),
    "onnx_external_data_symlink_in_storage": Case("models", "model.onnx", _symlinked_location, 422,
                                                  "external_data_not_allowed", "external file"),
    "onnx_external_data_in_constant_node": Case("models", "model.onnx",
                                                lambda c, s: onnx_external_constant("../../etc/passwd"), 422,
                                                "external_data_not_allowed", "external file"),
    "onnx_external_data_in_subgraph": Case("models", "model.onnx", lambda c, s: onnx_external_subgraph("/etc/passwd"),
                                           422, "external_data_not_allowed", "external file"),
    "onnx_external_data_in_function": Case("models", "model.onnx",
                                           lambda c, s: onnx_external_function("../../etc/shadow"), 422,
                                           "external_data_not_allowed", "external file"),
    # resource exhaustion and broken files
    "zip_bomb_pickle": Case("models", "model.pt", lambda c, s: zip_bomb("bomb/data.pkl"), 422, "model_too_complex",
                            "too large"),
    "zip_bomb_tensor_storage": Case("models", "model.pt", lambda c, s: zip_bomb("bomb/data/0"), 422,
                                    "model_too_complex", "too large"),
    "zip_unknown_compression_method": Case("models", "model.pt", lambda c, s: unsupported_compression(c), 422,
                                           "corrupt_model", "cannot be read"),
    "truncated_onnx": Case("models", "model.onnx", lambda c, s: mlp_onnx_bytes()[:5000], 422, "corrupt_model",
                           "truncated"),
    "truncated_torchscript": Case("models", "model.pt",
                                  lambda c, s: torchscript_like(pickle.dumps({}, protocol=2))[:300], 422,
                                  "corrupt_model", "cannot be read"),
    "onnx_absurd_initializer_dims": Case("models", "model.onnx", lambda c, s: onnx_absurd_initializer(), 422,
                                         "model_too_complex", "too large"),
    "onnx_absurd_constant_dims": Case("models", "model.onnx", lambda c, s: onnx_absurd_constant(), 422,
                                      "model_too_complex", "too large"),
    "onnx_subgraphs_nested_200_deep": Case("models", "model.onnx", lambda c, s: onnx_nested_subgraphs(), 422,
                                           "model_too_complex", "nests subgraphs"),
    "torchscript_absurd_storage_size": Case("models", "model.pt",
                                            lambda c, s: torchscript_like(huge_storage_pickle()), 422,
                                            "model_too_complex", "too large"),
    "random_bytes_named_onnx": Case("models", "model.onnx", _random(1), 422, "not_a_model", "not a recognised model"),
    "random_bytes_named_pt": Case("models", "model.pt", _random(2), 422, "not_a_model", "not a recognised model"),
    "empty_file": Case("models", "model.onnx", lambda c, s: b"", 422, "not_a_model", "empty"),
}

DATASET_CASES = {
    "npz_object_array_with_reduce": Case("datasets", "data.npz", lambda c, s: npz_object_array(c), 422,
                                         "invalid_dataset", "pickle", loader="dataset"),
    "npz_member_is_a_pickle": Case("datasets", "data.npz", lambda c, s: npz_pickle_member(c), 422,
                                   "invalid_dataset", "corrupt header", loader="dataset"),
    "npz_bad_crc": Case("datasets", "data.npz", lambda c, s: npz_corrupt_crc(), 422, "corrupt_dataset", "corrupt",
                        loader="dataset"),
    "npz_truncated": Case("datasets", "data.npz", lambda c, s: digits_npz_bytes()[:20_000], 422, "not_an_npz",
                          "not an .npz", loader="dataset"),
    "random_bytes_named_npz": Case("datasets", "data.npz", _random(3), 422, "not_an_npz", "not an .npz",
                                   loader="dataset"),
}

ALL_CASES = {**MODEL_CASES, **DATASET_CASES}


# --------------------------------------------------------------------------- fixtures and checks


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def api(request, tmp_path_factory):
    """(settings, client) of one app per database for the whole module."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    tmp = tmp_path_factory.mktemp(f"hostile-{request.param}")
    db = request.getfixturevalue("pg_url") if request.param == "postgres" else "sqlite"
    settings = make_settings(tmp, db, "filesystem")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield settings, client


def storage_files(settings) -> set[str]:
    root = settings.storage_dir
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_symlink() or not p.is_dir()}


def row_counts(settings) -> dict[str, int]:
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in ("models", "datasets")}
    finally:
        engine.dispose()


def assert_error(resp, status: int, code: str, needle: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "detail"}, body
    error = body["error"]
    assert error["code"] == code, error
    assert needle.lower() in error["message"].lower(), error
    return error


def assert_still_serving(client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    good = client.post("/v1/models", files={"file": ("good.onnx", mlp_onnx_bytes(hidden=8))})
    assert good.status_code == 201, good.text
    assert client.delete(f"/v1/models/{good.json()['id']}").status_code == 204


def post_file(client, endpoint: str, filename: str, data: bytes):
    return client.post(f"/v1/{endpoint}", files={"file": (filename, data, "application/octet-stream")},
                       data={"name": filename})


# --------------------------------------------------------------------------- tests


def test_canary_payloads_are_live(tmp_path, monkeypatch):
    """The payloads do run code when a Python unpickler meets them: the canary is a real witness."""
    monkeypatch.chdir(tmp_path)
    for n, payload in enumerate((_System, _Open, _Exec)):
        canary = tmp_path / f"CANARY{n}"
        pickle.loads(pickle.dumps(payload(canary), protocol=2))
        assert canary.exists(), payload.__name__


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_hostile_upload_is_refused_and_leaves_nothing(api, tmp_path, name):
    settings, client = api
    case = ALL_CASES[name]
    canary = tmp_path / "CANARY"
    data = case.build(canary, settings.storage_dir)
    files_before, rows_before = storage_files(settings), row_counts(settings)

    error = assert_error(post_file(client, case.endpoint, case.filename, data), case.status, case.code, case.needle)

    assert not canary.exists(), "the payload was executed"
    assert storage_files(settings) == files_before, "the upload left a file behind"
    assert list((settings.storage_dir / "tmp").iterdir()) == []
    assert row_counts(settings) == rows_before, "the upload left a row behind"
    assert error["detail"] is not None
    assert_still_serving(client)
    assert not canary.exists()


@pytest.mark.parametrize("name", [n for n, c in ALL_CASES.items() if c.loader])
def test_worker_loaders_refuse_the_same_files(tmp_path, monkeypatch, name):
    """Defence in depth: were a hostile file ever stored, the worker's loaders refuse it without running it."""
    pytest.importorskip("torch")
    from worker.engine.core import EngineError
    from worker.engine.data import TensorSpec, load_dataset
    from worker.engine.onnx_io import load_onnx_model
    from worker.engine.torch_io import load_torchscript

    monkeypatch.chdir(tmp_path)  # a relative external-data location would resolve here
    case = ALL_CASES[name]
    canary = tmp_path / "CANARY"
    path = tmp_path / case.filename
    path.write_bytes(case.build(canary, tmp_path))
    if case.loader == "model":
        loaders = [load_onnx_model, load_torchscript]
    else:
        loaders = [lambda p: load_dataset(p, (TensorSpec("x", ("batch", 64), np.dtype("float32")),))]
    for load in loaders:
        with pytest.raises(EngineError):
            load(path)
    assert not canary.exists(), "the payload was executed"


# ---- limits: uploads past DISTILLERY_MAX_UPLOAD_BYTES, datasets past DISTILLERY_MAX_DATASET_ARRAY_BYTES

LIMIT = 64 * 1024


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def limited(request, tmp_path_factory):
    from fastapi.testclient import TestClient

    from app.main import create_app

    tmp = tmp_path_factory.mktemp(f"limited-{request.param}")
    db = request.getfixturevalue("pg_url") if request.param == "postgres" else "sqlite"
    settings = make_settings(tmp, db, "filesystem", max_upload_bytes=LIMIT, max_dataset_array_bytes=1024 * 1024)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield settings, client


def _chunks(total: int):
    block = random.Random(5).randbytes(16 * 1024)
    for _ in range(total // len(block)):
        yield block


@pytest.mark.parametrize("how", ["declared_content_length", "streamed_past_the_limit", "chunked_without_length"])
def test_upload_bigger_than_the_limit_is_413(limited, how):
    settings, client = limited
    files_before, rows_before = storage_files(settings), row_counts(settings)
    if how == "declared_content_length":  # refused from the header, before the body is read
        resp = post_file(client, "models", "big.onnx", bytes(4 * LIMIT))
    elif how == "streamed_past_the_limit":  # Content-Length under the early check, the file part over the limit
        resp = post_file(client, "models", "big.onnx", random.Random(4).randbytes(LIMIT + 8 * 1024))
    else:
        boundary = "hostileboundary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.onnx\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()

        def body():
            yield head
            yield from _chunks(8 * LIMIT)
            yield f"\r\n--{boundary}--\r\n".encode()

        resp = client.post("/v1/models", content=body(),
                           headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    error = assert_error(resp, 413, "payload_too_large", "exceeds the limit")
    assert error["detail"]["limit_bytes"] == LIMIT
    assert storage_files(settings) == files_before
    assert list((settings.storage_dir / "tmp").iterdir()) == []
    assert row_counts(settings) == rows_before
    assert client.get("/healthz").status_code == 200
    # new content for each case (an upload of content the owner already stored answers 200 with the old record)
    fresh = np.full((4, 2), float(sum(how.encode())), np.float32)
    small = client.post("/v1/datasets", files={"file": ("d.npz", npz(x=fresh))})
    assert small.status_code == 201, small.text


def test_npz_bomb_past_the_array_limit_is_422(limited):
    settings, client = limited
    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.zeros((1024, 1024), np.float32), y=np.zeros(1024, np.int64))  # 4 MiB in ~5 KiB
    assert len(buf.getvalue()) < LIMIT
    files_before, rows_before = storage_files(settings), row_counts(settings)
    error = assert_error(post_file(client, "datasets", "bomb.npz", buf.getvalue()), 422, "dataset_too_large",
                         "over the limit")
    assert error["detail"]["limit_bytes"] == 1024 * 1024
    assert storage_files(settings) == files_before and row_counts(settings) == rows_before
    assert client.get("/healthz").status_code == 200


def test_huge_label_array_is_checked_in_bounded_memory(tmp_path):
    """Labels are read a block at a time: a compressed 48 MiB label array costs the API process no 48 MiB."""
    from app.datasets.validate import validate_npz

    n = 6 * 1024 * 1024
    path = tmp_path / "labels.npz"
    np.savez_compressed(path, x=np.zeros((n, 1), np.uint8), y=np.zeros(n, np.int64))
    assert path.stat().st_size < 1024 * 1024
    tracemalloc.start()
    try:
        info = validate_npz(path, 1024**3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (info["n_samples"], info["num_classes"]) == (n, 1)
    assert peak < 16 * 1024 * 1024, peak


# ---- an upload cut off mid-stream, against a real server


@pytest.fixture
def live_server(settings):
    """uvicorn serving the app on a free port, in a thread of this process."""
    import uvicorn

    from app.main import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield settings, f"http://127.0.0.1:{port}", port
    server.should_exit = True
    thread.join(30)


def _wait_until(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.parametrize("close", ["fin", "reset"])
def test_upload_cut_off_mid_stream_leaves_nothing(live_server, close):
    settings, base, port = live_server
    tmp = settings.storage_dir / "tmp"
    files_before, rows_before = storage_files(settings), row_counts(settings)
    boundary = "cutoffboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"m.onnx\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    declared = 10 * 1024 * 1024
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.sendall((f"POST /v1/models HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                      f"Content-Length: {declared}\r\n\r\n").encode() + head)
        sock.sendall(mlp_onnx_bytes()[:60_000] + bytes(256 * 1024))
        _wait_until(lambda: any(tmp.iterdir()), "the server never started writing the upload")
    finally:
        if close == "reset":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST on close
        sock.close()
    _wait_until(lambda: not any(tmp.iterdir()), "the temp file of the aborted upload was left behind")
    assert storage_files(settings) == files_before
    assert row_counts(settings) == rows_before
    with httpx.Client(base_url=base, timeout=30) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        good = http.post("/v1/models", files={"file": ("good.onnx", mlp_onnx_bytes(hidden=8))})
        assert good.status_code == 201, good.text
