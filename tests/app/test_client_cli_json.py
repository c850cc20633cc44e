"""`distillery ... --json`: whatever happens, stdout is exactly one JSON document, and the exit code says what
happened (0 ok, 1 job failed, 2 usage, 3 API 4xx, 4 unavailable, 5 --timeout). Usage errors that argparse finds
before any command runs included. In-process (app.cli.main), against a scripted local HTTP server."""
from __future__ import annotations

import json

import pytest

from app.cli import main
from app.client.commands import json_requested
from tests.app.test_client import JOB, JOB_ID, MODEL, UNAVAILABLE, FakeApi
from tests.e2e.conftest import free_port

ID = "a" * 32


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for name in ("DISTILLERY_URL", "DISTILLERY_API_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake():
    f = FakeApi()
    yield f
    f.close()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr), whether it returned or argparse exited."""
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def one_document(stdout: str) -> dict:
    doc = json.loads(stdout)  # raises if stdout is not exactly one JSON document
    assert isinstance(doc, dict)
    return doc


def assert_error(stdout: str, code: str, exit_code: int) -> dict:
    doc = one_document(stdout)
    assert set(doc) == {"error", "exit_code"} and doc["exit_code"] == exit_code
    assert set(doc["error"]) == {"code", "message", "status_code", "detail"}
    assert doc["error"]["code"] == code and doc["error"]["message"]
    return doc["error"]


@pytest.mark.parametrize("argv, says", [
    (["quantize", "m.onnx", "--json"], "--method"),                                   # a missing option
    (["--json", "quantize", "m.onnx", "--method", "int3"], "invalid choice: 'int3'"),  # --json before the command
    (["jobs", "show", "not-an-id", "--json"], "is not an id"),                       # a type check
    (["jobs", "submit", "--kind", "quantize", "--model", ID, "--config", "{not json", "--json"], "not JSON"),
    (["jobs", "list", "--status", "done", "--json"], "invalid choice: 'done'"),
    (["models", "list", "--json", "--bogus"], "unrecognized arguments: --bogus"),
    (["--json"], "required: command"),                                                # no command at all
    (["--json", "nope"], "invalid choice: 'nope'"),
    (["--json", "models"], "required"),                                               # no subcommand
    (["jobs", "show", "x", "--js"], "is not an id"),                                  # an abbreviation of --json
])
def test_usage_errors_found_by_argparse_are_one_json_document(capsys, argv, says):
    code, out, err = run(capsys, *argv)
    assert code == 2
    error = assert_error(out, "usage_error", 2)
    assert says in error["message"] and error["status_code"] is None
    assert error["detail"]["usage"].startswith("usage: distillery")
    assert "usage:" in err and "error:" in err  # the person at the terminal still reads it on stderr


def test_usage_errors_found_by_the_command_are_one_json_document(capsys, tmp_path):
    missing = tmp_path / "missing.onnx"
    code, out, err = run(capsys, "quantize", str(missing), "--method", "fp16", "--json",
                         "--url", f"http://127.0.0.1:{free_port()}")
    assert code == 2
    assert str(missing) in assert_error(out, "usage_error", 2)["message"]
    assert "no such file" in err


def test_without_json_errors_stay_text_on_stderr(capsys):
    for argv in (["quantize", "m.onnx"], ["jobs", "show", "not-an-id"], ["jobs", "show", "--", "--json"]):
        code, out, err = run(capsys, *argv)
        assert code == 2 and out == "" and "error:" in err, argv


def test_json_is_looked_for_before_a_double_dash_only():
    assert json_requested(["jobs", "show", "x", "--json"]) and json_requested(["--json", "jobs"])
    assert json_requested(["--jso"]) and not json_requested(["--j"]) and not json_requested(["--jsonx"])
    assert not json_requested(["jobs", "show", "--", "--json"]) and not json_requested(None)


def test_help_is_text_even_with_json(capsys):
    code, out, _ = run(capsys, "jobs", "show", "--help", "--json")
    assert code == 0 and out.startswith("usage: distillery jobs show")


def test_api_errors_exit_3(capsys, fake):
    fake.routes[f"/v1/jobs/{ID}"] = [(404, {"error": {"code": "job_not_found", "message": "job not found",
                                                      "detail": {"id": ID}}})]
    code, out, err = run(capsys, "jobs", "show", ID, "--json", "--url", fake.url)
    assert code == 3
    error = assert_error(out, "job_not_found", 3)
    assert error["status_code"] == 404 and error["detail"] == {"id": ID} and "job_not_found" in err


def test_service_unavailable_exits_4(capsys, fake):
    fake.routes[f"/v1/jobs/{ID}"] = [UNAVAILABLE]
    code, out, _ = run(capsys, "jobs", "show", ID, "--json", "--retries", "0", "--url", fake.url)
    assert code == 4 and assert_error(out, "database_unavailable", 4)["status_code"] == 503
    fake.routes[f"/v1/jobs/{ID}"] = [(500, {"error": {"code": "internal_error", "message": "boom"}})]
    code, out, _ = run(capsys, "--json", "jobs", "show", ID, "--url", fake.url)
    assert code == 4 and assert_error(out, "internal_error", 4)["status_code"] == 500
    code, out, _ = run(capsys, "models", "list", "--json", "--retries", "0", "--url",
                       f"http://127.0.0.1:{free_port()}")
    assert code == 4 and assert_error(out, "connection_error", 4)["status_code"] is None


def test_a_timeout_exits_5_and_names_the_job(capsys, fake):
    fake.routes[f"/v1/jobs/{JOB_ID}"] = [(200, {**JOB, "status": "running", "progress": 0.5, "stage": "timing"})]
    fake.routes[f"/v1/jobs/{JOB_ID}/events"] = [(200, {})]  # a stream that ends with no event; the job runs on
    code, out, err = run(capsys, "jobs", "wait", JOB_ID, "--timeout", "0.2", "--json", "--url", fake.url)
    assert code == 5
    assert assert_error(out, "wait_timeout", 5)["detail"] == {"job_id": JOB_ID}
    assert "wait_timeout" in err


FAILED = {**JOB, "status": "failed", "progress": 1.0, "stage": "failed",
          "error": {"code": "invalid_dataset", "message": "x has the wrong shape"}}


def test_a_failed_job_exits_1_with_its_document(capsys, fake):
    fake.routes[f"/v1/jobs/{JOB_ID}"] = [(200, FAILED)]
    code, out, err = run(capsys, "jobs", "wait", JOB_ID, "--json", "--url", fake.url)
    assert code == 1
    job = one_document(out)
    assert job["id"] == JOB_ID and job["error"]["code"] == "invalid_dataset"
    assert "failed" in err


def test_a_failed_shortcut_has_the_error_block_too(capsys, fake, tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not really a model, the fake does not care")
    fake.routes["GET /v1/models"] = [(200, {"items": [], "next_cursor": None})]
    fake.routes["POST /v1/models"] = [(201, MODEL)]
    fake.routes["POST /v1/jobs"] = [(202, FAILED)]
    code, out, _ = run(capsys, "quantize", str(model), "--method", "fp16", "--json", "--url", fake.url)
    assert code == 1
    doc = one_document(out)
    assert doc["job"]["status"] == "failed" and doc["exit_code"] == 1 and doc["artifact"] is None
    assert doc["error"]["code"] == "invalid_dataset" and doc["error"]["detail"]["job_id"] == JOB_ID
    assert doc["model"]["id"] == MODEL["id"] and doc["model"]["existing"] is False


def test_events_json_lines_end_with_a_one_line_error(capsys, fake):
    fake.routes[f"/v1/jobs/{ID}/events"] = [(404, {"error": {"code": "job_not_found", "message": "no such job"}})]
    code, out, _ = run(capsys, "jobs", "events", ID, "--json", "--url", fake.url)
    assert code == 3
    lines = out.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["error"]["code"] == "job_not_found"
