"""The client commands of `distillery` as a pipeline runs them: subprocesses against a real `distillery serve`
(API keys required), reading --json output and exit codes."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from app.cli import build_parser, main
from tests.app.test_client import start_server, write_open_mlp_onnx
from tests.e2e.conftest import free_port
from tests.helpers import digits_npz_bytes, write_mlp_onnx

pytestmark = pytest.mark.slow
QUICK = ["--batch-sizes", "1,8", "--repeats", "3", "--warmup", "1"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from start_server(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("files")
    (root / "digits.npz").write_bytes(digits_npz_bytes())
    np.savez(root / "bad.npz", x=np.zeros((20, 7), np.float32))  # admitted by the open model, which cannot run it
    return {"model": write_mlp_onnx(root / "mlp.onnx"), "data": root / "digits.npz", "bad": root / "bad.npz",
            "other": write_mlp_onnx(root / "mlp2.onnx", seed=1), "open": write_open_mlp_onnx(root / "open.onnx")}


def distillery(server, *args: str, cwd: Path, env: dict | None = None, timeout: float = 300):
    """Run `distillery ARGS` with DISTILLERY_URL / DISTILLERY_API_KEY pointing at the server."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    if server is not None:
        base.update(DISTILLERY_URL=server.url, DISTILLERY_API_KEY=server.api_key)
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=cwd, env={**base, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def as_json(proc) -> dict:
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise AssertionError(f"not JSON (exit {proc.returncode}): {proc.stdout!r} {proc.stderr[-2000:]}") from None


def test_quantize_shortcut_json(server, files, tmp_path):
    proc = distillery(server, "quantize", str(files["model"]), "--method", "static_int8", "--dataset",
                      str(files["data"]), *QUICK, "--label", "suite=cli", "-o", "q.onnx", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = as_json(proc)
    job, art = out["job"], out["artifact"]
    assert job["status"] == "succeeded" and job["labels"] == {"suite": "cli"}
    assert out["model"]["format"] == "onnx" and out["dataset"]["has_labels"]
    assert out["model"]["existing"] is False and out["dataset"]["existing"] is False  # the first run uploads
    assert Path(out["output"]) == tmp_path / "q.onnx"
    assert (tmp_path / "q.onnx").stat().st_size == art["size_bytes"] == job["metrics"]["result"]["size_bytes"]
    assert "\r" not in proc.stderr  # no progress bar when stderr is not a terminal

    # the human report of the same job: the before/after table
    shown = distillery(server, "jobs", "show", job["id"], cwd=tmp_path)
    assert shown.returncode == 0
    assert "metric" in shown.stdout and "latency p50 @ batch 8" in shown.stdout and "accuracy" in shown.stdout


def test_quantize_shortcut_text_prints_the_table_and_downloads(server, files, tmp_path):
    proc = distillery(server, "quantize", str(files["model"]), "--method", "fp16", *QUICK, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["metric", "baseline", "result", "change"]
    assert any(line.startswith("size") and line.endswith("x") for line in lines)
    saved = [p for p in tmp_path.iterdir() if p.suffix == ".onnx"]
    assert len(saved) == 1 and f"saved to {saved[0]}" in proc.stdout
    # the same file as the previous test's: used as stored, not uploaded again
    assert "(already uploaded)" in proc.stderr and "submitted" in proc.stderr


def test_a_failed_job_exits_1(server, files, tmp_path):
    proc = distillery(server, "quantize", str(files["open"]), "--method", "static_int8", "--dataset",
                      str(files["bad"]), *QUICK, "--json", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    out = as_json(proc)
    job = out["job"]
    assert job["status"] == "failed" and job["error"]["code"] in ("invalid_dataset", "invalid_model")
    assert out["error"]["code"] == job["error"]["code"] and out["exit_code"] == 1  # the shape every failure has
    assert "failed" in proc.stderr and not list(tmp_path.iterdir())


def test_usage_errors_exit_2(server, files, tmp_path):
    for args in (["quantize", str(files["model"])],                          # --method missing
                 ["quantize", str(files["model"]), "--method", "int3"],       # not a method
                 ["jobs", "show", "not-an-id"],
                 ["quantize", str(tmp_path / "missing.onnx"), "--method", "fp16"],
                 ["jobs", "submit", "--kind", "quantize", "--model", "a" * 32, "--config", "{not json"],
                 ["models"]):
        proc = distillery(server, *args, cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "error" in proc.stderr and proc.stdout == ""
        # --json: the same, and one error document on stdout, whether argparse or the command found it
        proc = distillery(server, *args, "--json", cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert as_json(proc) == {"error": {"code": "usage_error", "message": as_json(proc)["error"]["message"],
                                           "status_code": None, "detail": as_json(proc)["error"]["detail"]},
                                 "exit_code": 2}, args


def test_api_errors_exit_3(server, files, tmp_path):
    proc = distillery(server, "jobs", "show", "0" * 32, "--json", cwd=tmp_path)
    assert proc.returncode == 3
    err = as_json(proc)["error"]
    assert err["code"] == "job_not_found" and err["status_code"] == 404
    assert distillery(server, "artifacts", "download", "0" * 32, cwd=tmp_path).returncode == 3
    bad_key = distillery(server, "models", "list", cwd=tmp_path, env={"DISTILLERY_API_KEY": "dk_nope"})
    assert bad_key.returncode == 3 and "unauthorized" in bad_key.stderr
    invalid = distillery(server, "jobs", "submit", "--kind", "quantize", "--model", str(files["model"]),
                         "--config", '{"method": "dynamic_int8", "nope": 1}', "--json", cwd=tmp_path)
    assert invalid.returncode == 3 and as_json(invalid)["error"]["code"] == "validation_error"


def test_service_down_exits_4(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    proc = distillery(None, "--url", url, "models", "list", "--retries", "1", cwd=tmp_path)
    assert proc.returncode == 4 and "connection_error" in proc.stderr
    proc = distillery(None, "jobs", "wait", "a" * 32, "--json", "--retries", "0", cwd=tmp_path,
                      env={"DISTILLERY_URL": url})
    assert proc.returncode == 4 and as_json(proc)["error"]["code"] == "connection_error"


def test_resource_commands(server, files, tmp_path):
    def ok(*args: str) -> subprocess.CompletedProcess:
        proc = distillery(server, *args, cwd=tmp_path)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc

    model = as_json(ok("models", "upload", str(files["other"]), "--name", "cli-mlp", "--json"))
    assert model["name"] == "cli-mlp" and model["inspection"]["inputs"][0]["name"] == "x"
    again = ok("models", "upload", str(files["other"]), "--json")  # the same content: the stored model
    assert as_json(again)["id"] == model["id"] and as_json(again)["existing"] is True
    assert model["id"] in [m["id"] for m in as_json(ok("models", "list", "--all", "--json"))["items"]]
    assert "cli-mlp" in ok("models", "show", model["id"]).stdout
    data = as_json(ok("datasets", "upload", str(files["data"]), "--json"))
    assert data["id"] in ok("datasets", "list").stdout
    assert as_json(ok("datasets", "show", data["id"], "--json"))["n_test"] > 0

    config = json.dumps({"method": "dynamic_int8", "benchmark": {"batch_sizes": [1], "repeats": 2, "warmup": 1}})
    job = as_json(ok("jobs", "submit", "--kind", "quantize", "--model", model["id"], "--dataset", data["id"],
                     "--config", config, "--json"))
    assert job["status"] in ("queued", "running")
    # the global options also go before the command
    done = as_json(ok("--json", "--url", server.url, "jobs", "wait", job["id"], "--timeout", "240"))
    assert done["status"] == "succeeded"
    events = [json.loads(line) for line in ok("jobs", "events", job["id"], "--json").stdout.splitlines()]
    assert events[-1]["status"] == "succeeded" and [e["seq"] for e in events] == sorted(e["seq"] for e in events)
    later = ok("jobs", "events", job["id"], "--last-event-id", str(events[-2]["seq"])).stdout.splitlines()
    assert len(later) == 1 and "succeeded" in later[0]
    listed = as_json(ok("jobs", "list", "--status", "succeeded", "--model", model["id"], "--json"))["items"]
    assert [j["id"] for j in listed] == [job["id"]]
    art = as_json(ok("artifacts", "show", done["artifact_id"], "--json"))
    got = as_json(ok("artifacts", "download", art["id"], "-o", "a.onnx", "--json"))
    assert got["size_bytes"] == art["size_bytes"] == (tmp_path / "a.onnx").stat().st_size
    # an artifact as the next job's input: artifact:ID
    chained = as_json(ok("jobs", "submit", "--kind", "quantize", "--model", f"artifact:{art['id']}", "--config",
                         config, "--label", "step=2", "--json"))
    assert chained["model_id"] != model["id"] and chained["labels"] == {"step": "2"}
    assert as_json(ok("models", "show", chained["model_id"], "--json"))["source_artifact_id"] == art["id"]
    assert as_json(ok("jobs", "wait", chained["id"], "--json", "--timeout", "240"))["status"] == "succeeded"
    caps = as_json(ok("capabilities", "--json"))
    assert any(c["kind"] == "quantize" and c["method"] == "dynamic_int8" for c in caps["methods"])

    assert distillery(server, "jobs", "cancel", job["id"], cwd=tmp_path).returncode == 3  # it already ended
    assert distillery(server, "models", "delete", model["id"], cwd=tmp_path).returncode == 0
    assert distillery(server, "models", "show", model["id"], cwd=tmp_path).returncode == 3


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _command_paths(sub, (*prefix, name))


def test_help_everywhere(capsys, tmp_path):
    paths = list(_command_paths(build_parser()))
    client_paths = {p for p in paths if p[0] in ("models", "datasets", "jobs", "artifacts", "capabilities",
                                                  "quantize", "prune", "distill")}
    assert {("models", "upload"), ("jobs", "events"), ("artifacts", "download"), ("distill",)} <= client_paths
    for path in paths:
        with pytest.raises(SystemExit) as e:
            main([*path, "--help"])
        assert e.value.code == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: distillery {' '.join(path)}"), path
        if path in client_paths:
            assert "DISTILLERY_URL" in text and "exit codes" in text and len(text) > 500, path
            if len(path) > 1 or path[0] in ("capabilities", "quantize", "prune", "distill"):
                assert "--json" in text and "--api-key" in text, path
    top = distillery(None, "--help", cwd=tmp_path)
    assert top.returncode == 0
    for name in ("serve", "api", "worker", "migrate", "keys", "example", "models", "jobs", "quantize"):
        assert name in top.stdout
