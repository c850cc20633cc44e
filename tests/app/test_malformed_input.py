"""Malformed requests, one case per fault, on SQLite and on PostgreSQL: broken JSON, wrong types, unknown fields,
NaN / infinite / negative / huge numbers in every job kind's config, ids of the wrong shape in paths, queries and
bodies, unknown ids, and jobs a method cannot run for the model's format.

Each case asserts a 4xx error JSON whose code and message name the problem (the field, the id, the method), that no
job row was written and no message reached the broker (so NaN never reaches the database or a worker), and that the
service keeps serving. Control cases show that the same bodies, without the fault, are accepted.

Each database gets one app for the module; every case measures the jobs table and the broker queue before and after
its own request, so the cases stay independent.
"""
from __future__ import annotations

import copy
import io
import json
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from sqlalchemy import create_engine, text

from tests.conftest import make_settings
from tests.helpers import digits_npz_bytes, mlp_onnx_bytes

ID_0 = "0" * 32  # well-formed, never issued
NAN, INF = float("nan"), float("inf")

BASE_CONFIG = {
    "quantize": {"method": "dynamic_int8"},
    "prune": {"method": "magnitude"},
    "distill": {"student": {"arch": "mlp", "hidden": [16]}},
}


def npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def torchscript_archive() -> bytes:
    """A minimal archive in torch.jit.save's layout that the inspector accepts as TorchScript (no torch needed)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for name, data in (("net/data.pkl", pickle.dumps({}, protocol=2)), ("net/constants.pkl", pickle.dumps(())),
                           ("net/code/__torch__.py", b""), ("net/version", b"3\n")):
            archive.writestr(name, data)
    return buf.getvalue()


def job(kind: str, config_path: str | None = None, value=None, /, *, model: str = "model", **top) -> Callable:
    """A body builder: the kind's valid base job with `value` set at `config_path` (dotted, under config) and the
    top-level keys in `top` set (a value of ... removes the key)."""

    def build(ids: dict) -> dict:
        body = {"kind": kind, "model_id": ids[model], "dataset_id": ids["dataset"],
                "config": copy.deepcopy(BASE_CONFIG[kind])}
        if config_path:
            node = body["config"]
            *parents, leaf = config_path.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        for key, val in top.items():
            if val is ...:
                body.pop(key, None)
            else:
                body[key] = val(ids) if callable(val) else val
        return body

    return build


@dataclass(frozen=True)
class Case:
    body: Callable[[dict], dict | bytes] | None  # None: no body
    status: int
    code: str
    needles: tuple[str, ...]  # words of the message that name the problem
    method: str = "POST"
    path: str = "/v1/jobs"
    headers: dict = field(default_factory=lambda: {"content-type": "application/json"})


def bad(kind: str, config_path: str, value, *needles: str) -> Case:
    """A config value the schema must refuse: 422 validation_error naming the field."""
    return Case(job(kind, config_path, value), 422, "validation_error", (f"config.{config_path}", *needles))


def raw(data: bytes, *needles: str) -> Case:
    return Case(lambda ids: data, 422, "validation_error", needles)


def unreadable(data: bytes, *needles: str) -> Case:
    """A body json.loads gives up on past its syntax: 400 bad_request (as the OpenAPI spec declares), naming why."""
    return Case(lambda ids: data, 400, "bad_request", ("cannot be read as json", *needles))


CASES: dict[str, Case] = {
    # ---- malformed JSON
    "json_syntax_error": raw(b'{"kind": "quantize", "model_id": ', "not valid json"),
    "json_empty_body": raw(b"", "body"),
    "json_array_body": raw(b"[]", "body"),
    "json_string_body": raw(b'"quantize"', "body"),
    "json_nested_too_deeply": unreadable(b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "json_number_with_5000_digits": unreadable(b'{"kind": "quantize", "config": {"benchmark": {"repeats": '
                                               + b"9" * 5000 + b"}}}", "too many digits"),
    "json_not_utf8": unreadable(b'{"kind": "\xff\xfe"}', "utf-8"),
    "json_bare_nan_body": raw(b"NaN", "body"),
    # ---- wrong types
    "kind_is_a_number": Case(job("quantize", kind=5), 422, "validation_error", ("kind",)),
    "kind_unknown": Case(job("quantize", kind="compile"), 422, "validation_error", ("kind", "compile")),
    "kind_missing": Case(job("quantize", kind=...), 422, "validation_error", ("kind",)),
    "model_id_is_a_number": Case(job("quantize", model_id=12345), 422, "validation_error", ("model_id",)),
    "dataset_id_is_a_list": Case(job("quantize", dataset_id=[ID_0]), 422, "validation_error", ("dataset_id",)),
    "device_unknown": Case(job("quantize", device="tpu"), 422, "validation_error", ("device",)),
    "config_is_a_string": Case(job("quantize", config="dynamic_int8"), 422, "validation_error", ("config",)),
    "config_missing": Case(job("quantize", config=...), 422, "validation_error", ("config",)),
    "quantize_method_is_a_number": bad("quantize", "method", 8, "method"),
    "quantize_method_unknown": bad("quantize", "method", "int4", "method"),
    "quantize_per_channel_is_a_string": bad("quantize", "per_channel", "yes", "bool"),
    "quantize_repeats_is_a_string": bad("quantize", "benchmark.repeats", "10", "integer"),
    "quantize_repeats_is_a_bool": bad("quantize", "benchmark.repeats", True, "integer"),
    "quantize_repeats_is_a_fraction": bad("quantize", "benchmark.repeats", 2.5, "integer"),
    "quantize_batch_sizes_is_a_string": bad("quantize", "benchmark.batch_sizes", "1,64", "list"),
    "quantize_calibration_is_a_list": bad("quantize", "calibration", [512], "calibration"),
    "quantize_max_accuracy_drop_is_a_string_nan": bad("quantize", "max_accuracy_drop", "NaN", "number"),
    "prune_fine_tune_is_a_number": bad("prune", "fine_tune", 3, "fine_tune"),
    "distill_epochs_is_a_fraction": bad("distill", "epochs", 2.5, "integer"),
    "distill_student_is_a_list": Case(job("distill", "student", [16]), 422, "validation_error",
                                      ("config.student", "student must be")),
    "distill_student_arch_unknown": Case(job("distill", "student", {"arch": "transformer"}), 422, "validation_error",
                                         ("config.student", "student must be")),
    # ---- unknown fields, top level and inside config
    "unknown_top_level_field": Case(job("quantize", priority=10), 422, "validation_error", ("priority", "extra")),
    "unknown_quantize_config_field": bad("quantize", "bits", 4, "extra"),
    "unknown_calibration_field": bad("quantize", "calibration.percentile", 99.9, "extra"),
    "unknown_benchmark_field": bad("quantize", "benchmark.threads", 4, "extra"),
    "unknown_prune_config_field": bad("prune", "importance", "taylor", "extra"),
    "unknown_fine_tune_field": bad("prune", "fine_tune.momentum", 0.9, "extra"),
    "unknown_distill_config_field": bad("distill", "teacher_id", ID_0, "extra"),
    "unknown_student_field": bad("distill", "student.dropout", 0.1, "extra"),
    "unknown_early_stopping_field": bad("distill", "early_stopping.metric", "loss", "extra"),
    # ---- numbers: quantize
    "quantize_max_accuracy_drop_nan": bad("quantize", "max_accuracy_drop", NAN, "finite"),
    "quantize_max_accuracy_drop_infinity": bad("quantize", "max_accuracy_drop", INF, "finite"),
    "quantize_max_accuracy_drop_minus_infinity": bad("quantize", "max_accuracy_drop", -INF, "finite"),
    "quantize_max_accuracy_drop_negative": bad("quantize", "max_accuracy_drop", -0.1, "greater than"),
    "quantize_max_accuracy_drop_huge": bad("quantize", "max_accuracy_drop", 1e308, "less than"),
    "quantize_max_accuracy_drop_overflows_to_infinity": Case(
        lambda ids: json.dumps(job("quantize")(ids)).replace('"dynamic_int8"}', '"dynamic_int8", '
                                                             '"max_accuracy_drop": 1e999}').encode(),
        422, "validation_error", ("config.max_accuracy_drop", "finite")),
    "quantize_calibration_samples_negative": bad("quantize", "calibration.samples", -1, "greater than"),
    "quantize_calibration_samples_zero": bad("quantize", "calibration.samples", 0, "greater than"),
    "quantize_calibration_samples_huge": bad("quantize", "calibration.samples", 10**9, "less than"),
    "quantize_repeats_zero": bad("quantize", "benchmark.repeats", 0, "greater than"),
    "quantize_repeats_huge": bad("quantize", "benchmark.repeats", 10**9, "less than"),
    "quantize_repeats_beyond_int64": bad("quantize", "benchmark.repeats", 2**70, "less than"),
    "quantize_warmup_negative": bad("quantize", "benchmark.warmup", -1, "greater than"),
    "quantize_batch_size_zero": bad("quantize", "benchmark.batch_sizes", [0], "greater than"),
    "quantize_batch_size_huge": bad("quantize", "benchmark.batch_sizes", [10**9], "less than"),
    "quantize_batch_sizes_repeated": bad("quantize", "benchmark.batch_sizes", [8, 8], "distinct"),
    "quantize_batch_sizes_too_many": bad("quantize", "benchmark.batch_sizes", list(range(1, 100)), "at most"),
    # ---- numbers: prune
    "prune_sparsity_above_one": bad("prune", "sparsity", 1.5, "less than"),
    "prune_sparsity_negative": bad("prune", "sparsity", -0.1, "greater than"),
    "prune_sparsity_nan": bad("prune", "sparsity", NAN, "finite"),
    "prune_ratio_zero": Case(job("prune", "ratio", 0.0), 422, "validation_error", ("config.ratio", "greater than")),
    "prune_ratio_one": Case(job("prune", "ratio", 1.0), 422, "validation_error", ("config.ratio", "less than")),
    "prune_ratio_infinity": bad("prune", "ratio", INF, "finite"),
    "prune_round_to_zero": bad("prune", "round_to", 0, "greater than"),
    "prune_fine_tune_epochs_huge": bad("prune", "fine_tune.epochs", 10**9, "less than"),
    "prune_fine_tune_epochs_zero": bad("prune", "fine_tune.epochs", 0, "greater than"),
    "prune_fine_tune_lr_nan": bad("prune", "fine_tune.lr", NAN, "finite"),
    "prune_fine_tune_lr_negative": bad("prune", "fine_tune.lr", -1e-3, "greater than"),
    # ---- numbers: distill
    "distill_temperature_nan": bad("distill", "temperature", NAN, "finite"),
    "distill_temperature_zero": bad("distill", "temperature", 0.0, "greater than"),
    "distill_temperature_negative": bad("distill", "temperature", -4.0, "greater than"),
    "distill_temperature_huge": bad("distill", "temperature", 1e300, "less than"),
    "distill_alpha_above_one": bad("distill", "alpha", 1.5, "less than"),
    "distill_epochs_huge": bad("distill", "epochs", 10**9, "less than"),
    "distill_batch_size_zero": bad("distill", "batch_size", 0, "greater than"),
    "distill_lr_infinity": bad("distill", "lr", INF, "finite"),
    "distill_seed_negative": bad("distill", "seed", -1, "greater than"),
    "distill_seed_beyond_int64": bad("distill", "seed", 2**64, "less than"),
    "distill_train_samples_negative": bad("distill", "train_samples", -1, "greater than"),
    "distill_student_shrink_one": Case(job("distill", "student", {"shrink": 1.0}), 422, "validation_error",
                                       ("config.student.shrink", "less than")),
    "distill_student_shrink_nan": Case(job("distill", "student", {"shrink": NAN}), 422, "validation_error",
                                       ("config.student.shrink", "finite")),
    "distill_student_width_zero": bad("distill", "student.hidden", [0], "greater than"),
    "distill_early_stopping_patience_zero": bad("distill", "early_stopping.patience", 0, "greater than"),
    "distill_feature_loss_beta_nan": bad("distill", "feature_loss.beta", NAN, "finite"),
    # ---- ids of the wrong shape: bodies, paths, queries
    "model_id_path_traversal": Case(job("quantize", model_id="../../etc/passwd"), 422, "validation_error",
                                    ("model_id", "pattern")),
    "model_id_uppercase": Case(job("quantize", model_id="A" * 32), 422, "validation_error", ("model_id", "pattern")),
    "model_id_too_short": Case(job("quantize", model_id="0" * 31), 422, "validation_error", ("model_id", "pattern")),
    "model_id_sql": Case(job("quantize", model_id="' OR 1=1 --"), 422, "validation_error", ("model_id", "pattern")),
    "dataset_id_unknown_builtin": Case(job("quantize", dataset_id="builtin:imagenet"), 422, "validation_error",
                                       ("dataset_id", "pattern")),
    "dataset_id_wrong_shape": Case(job("quantize", dataset_id="digits.npz"), 422, "validation_error",
                                   ("dataset_id", "pattern")),
    "student_model_id_wrong_shape": bad("distill", "student", {"model_id": "../student"}, "pattern"),
    "path_model_id_wrong_shape": Case(None, 422, "validation_error", ("model_id", "pattern"), "GET",
                                      "/v1/models/not-an-id"),
    "path_model_id_too_long": Case(None, 422, "validation_error", ("model_id", "pattern"), "DELETE",
                                   "/v1/models/" + "0" * 33),
    "path_dataset_id_wrong_shape": Case(None, 422, "validation_error", ("dataset_id", "pattern"), "GET",
                                        "/v1/datasets/digits.npz"),
    "path_dataset_id_traversal": Case(None, 404, "not_found", ("not found",), "GET", "/v1/datasets/%2E%2E%2Fetc"),
    "path_job_id_wrong_shape": Case(None, 422, "validation_error", ("job_id", "pattern"), "GET", "/v1/jobs/xyz"),
    "path_job_id_wrong_shape_cancel": Case(None, 422, "validation_error", ("job_id", "pattern"), "POST",
                                           "/v1/jobs/G" + "0" * 31 + "/cancel"),
    "path_job_id_wrong_shape_events": Case(None, 422, "validation_error", ("job_id", "pattern"), "GET",
                                           "/v1/jobs/1/events"),
    "path_artifact_id_wrong_shape": Case(None, 422, "validation_error", ("artifact_id", "pattern"), "GET",
                                         "/v1/artifacts/" + "z" * 32),
    "path_artifact_id_wrong_shape_content": Case(None, 422, "validation_error", ("artifact_id", "pattern"), "GET",
                                                 "/v1/artifacts/abc/content"),
    "query_model_id_wrong_shape": Case(None, 422, "validation_error", ("model_id", "pattern"), "GET",
                                       "/v1/jobs?model_id=abc"),
    "query_cursor_wrong_shape": Case(None, 422, "validation_error", ("cursor",), "GET",
                                     "/v1/jobs?cursor=%27%3B%20drop%20table%20jobs"),
    "query_limit_nan": Case(None, 422, "validation_error", ("limit",), "GET", "/v1/models?limit=NaN"),
    "query_limit_huge": Case(None, 422, "validation_error", ("limit",), "GET", "/v1/datasets?limit=" + "9" * 30),
    # ---- unknown ids
    "unknown_model_id": Case(job("quantize", model_id=ID_0), 404, "model_not_found", (ID_0,)),
    "unknown_dataset_id": Case(job("quantize", dataset_id=ID_0), 404, "dataset_not_found", (ID_0,)),
    "unknown_student_model_id": Case(job("distill", "student", {"model_id": ID_0}), 404, "model_not_found", (ID_0,)),
    "unknown_model_get": Case(None, 404, "model_not_found", (ID_0,), "GET", f"/v1/models/{ID_0}"),
    "unknown_model_delete": Case(None, 404, "model_not_found", (ID_0,), "DELETE", f"/v1/models/{ID_0}"),
    "unknown_dataset_get": Case(None, 404, "dataset_not_found", (ID_0,), "GET", f"/v1/datasets/{ID_0}"),
    "unknown_job_get": Case(None, 404, "job_not_found", (ID_0,), "GET", f"/v1/jobs/{ID_0}"),
    "unknown_job_cancel": Case(None, 404, "job_not_found", (ID_0,), "POST", f"/v1/jobs/{ID_0}/cancel"),
    "unknown_job_events": Case(None, 404, "job_not_found", (ID_0,), "GET", f"/v1/jobs/{ID_0}/events"),
    "unknown_artifact_get": Case(None, 404, "artifact_not_found", (ID_0,), "GET", f"/v1/artifacts/{ID_0}"),
    "unknown_artifact_content": Case(None, 404, "artifact_not_found", (ID_0,), "GET",
                                     f"/v1/artifacts/{ID_0}/content"),
    # ---- what a method cannot do with the model's format (app/methods: every method reads both formats;
    #      the refusals are output formats and the data a TorchScript model needs for its input shapes)
    "static_int8_cannot_write_torchscript": Case(
        job("quantize", config={"method": "static_int8", "output_format": "torchscript"}), 422,
        "unsupported_output_format", ("static_int8", "torchscript")),
    "bf16_cannot_write_onnx": Case(job("quantize", config={"method": "bf16", "output_format": "onnx"}), 422,
                                   "unsupported_output_format", ("bf16", "onnx")),
    "bf16_of_torchscript_model_cannot_write_onnx": Case(
        job("quantize", model="torchscript", config={"method": "bf16", "output_format": "onnx"}), 422,
        "unsupported_output_format", ("bf16", "onnx")),
    "torchscript_model_without_dataset": Case(job("quantize", model="torchscript", dataset_id=None), 422,
                                              "dataset_required", ("torchscript", "dataset_id")),
    "static_int8_without_dataset": Case(job("quantize", config={"method": "static_int8"}, dataset_id=None), 422,
                                        "dataset_required", ("static_int8", "dataset_id")),
    "distill_without_dataset": Case(job("distill", dataset_id=...), 422, "dataset_required", ("distill",)),
    "fine_tune_without_dataset": Case(job("prune", "fine_tune", {"epochs": 1}, dataset_id=None), 422,
                                      "dataset_required", ("fine_tune",)),
    "dataset_does_not_fit_the_model": Case(job("quantize", dataset_id=lambda ids: ids["other_dataset"]), 422,
                                           "dataset_mismatch", ("x",)),
    # ---- the wrong content type for a JSON body, and a body where none is read
    "json_sent_as_text_plain": Case(lambda ids: json.dumps(job("quantize")(ids)).encode(), 422, "validation_error",
                                    ("body",), headers={"content-type": "text/plain"}),
    "json_sent_to_the_upload_endpoint": Case(lambda ids: b'{"file": "x"}', 415, "unsupported_media_type",
                                             ("multipart/form-data",), path="/v1/models"),
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def api(request, tmp_path_factory):
    """(settings, client, ids) of one app per database for the module, holding an ONNX model, a TorchScript
    model, a dataset that fits the ONNX model and one that does not."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    tmp = tmp_path_factory.mktemp(f"malformed-{request.param}")
    db = request.getfixturevalue("pg_url") if request.param == "postgres" else "sqlite"
    settings = make_settings(tmp, db, "filesystem")
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        uploads = {
            "model": ("models", "mlp.onnx", mlp_onnx_bytes(hidden=8)),
            "torchscript": ("models", "net.pt", torchscript_archive()),
            "dataset": ("datasets", "digits.npz", digits_npz_bytes()),
            "other_dataset": ("datasets", "other.npz", npz(features=np.zeros((4, 64), np.float32))),
        }
        ids = {}
        for key, (endpoint, name, data) in uploads.items():
            resp = client.post(f"/v1/{endpoint}", files={"file": (name, data)})
            assert resp.status_code == 201, resp.text
            ids[key] = resp.json()["id"]
        assert client.get(f"/v1/models/{ids['torchscript']}").json()["format"] == "torchscript"
        yield settings, client, ids


def job_rows(settings) -> int:
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM jobs")).scalar_one()
    finally:
        engine.dispose()


def broker_messages(settings) -> int:
    return sum(1 for p in (settings.broker_dir / "queue").iterdir() if p.is_file())


def send(client, case: Case, ids: dict):
    body = case.body(ids) if case.body else None
    if isinstance(body, dict):
        content = json.dumps(body, allow_nan=True).encode()  # NaN / Infinity as the JSON literals clients send
    else:
        content = body
    return client.request(case.method, case.path, content=content,
                          headers=case.headers if content is not None else None)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_request_is_a_4xx_naming_the_problem(api, name):
    settings, client, ids = api
    case = CASES[name]
    rows, messages = job_rows(settings), broker_messages(settings)

    resp = send(client, case, ids)

    assert resp.status_code == case.status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "detail"}, body
    assert body["error"]["code"] == case.code, body
    message = body["error"]["message"].lower()
    for needle in case.needles:
        assert needle.lower() in message, (needle, body)
    assert job_rows(settings) == rows, "a refused request left a job row"
    assert broker_messages(settings) == messages, "a refused request reached the broker"
    assert client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize("kind", list(BASE_CONFIG))
def test_the_same_bodies_without_the_fault_are_accepted(api, kind):
    """The control: each kind's base body is a valid job, so the refusals above are the faults' doing."""
    settings, client, ids = api
    rows = job_rows(settings)
    resp = send(client, Case(job(kind), 202, "", ()), ids)
    assert resp.status_code == 202, resp.text
    assert job_rows(settings) == rows + 1
    assert client.post(f"/v1/jobs/{resp.json()['id']}/cancel").json()["status"] == "cancelled"


def test_validation_errors_list_every_field(api):
    """Several faults in one body: each is named in detail.errors, with its dotted field path."""
    settings, client, ids = api
    body = job("distill", "temperature", NAN)(ids)
    body["config"].update({"epochs": 10**9, "batch_size": 0, "bogus": 1})
    resp = send(client, Case(lambda _: body, 422, "", ()), ids)
    assert resp.status_code == 422, resp.text
    fields = {e["field"] for e in resp.json()["error"]["detail"]["errors"]}
    assert fields == {"config.temperature", "config.epochs", "config.batch_size", "config.bogus"}
