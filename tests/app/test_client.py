"""The Python SDK (app.client): against a real `distillery serve` (API keys required, a real worker), and against a
tiny local HTTP server for what a healthy service never does (503s, connections cut mid-stream)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import numpy as np
import pytest

from app.client import (Client, Conflict, ConnectionFailed, DistilleryError, JobFailed, NotFound, ServerError,
                        ServiceUnavailable, Unauthorized, ValidationError, format_report)
from app.client.client import ENDPOINTS
from tests.e2e.conftest import HELD_JOB_PLUGIN, free_port, wait_http
from tests.e2e.held_job import HOLD, held_model_bytes
from tests.helpers import digits_npz_bytes, mlp_onnx_bytes, write_mlp_onnx

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
QUICK = {"batch_sizes": [1, 8], "repeats": 3, "warmup": 1}
HEAVY = ("torch", "sqlalchemy", "fastapi", "starlette", "worker", "celery", "psycopg", "numpy", "onnx", "onnxruntime")


# -- a real service ----------------------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    api_key: str
    root: Path
    env: dict[str, str] = field(default_factory=dict)

    def client(self, **kw) -> Client:
        return Client(self.url, self.api_key, **kw)


def start_server(root: Path):
    """`distillery serve` on a free port with API keys required, and one key; yields a Server, stops it after."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env.update(DISTILLERY_DATA_DIR=str(root / "data"), DISTILLERY_AUTH="required", PYTHONUNBUFFERED="1",
               DISTILLERY_JOB_PLUGINS=str(HELD_JOB_PLUGIN))  # held jobs, for the tests that cancel one
    cli = [sys.executable, "-m", "app.cli"]
    subprocess.run([*cli, "migrate"], env=env, cwd=root, check=True, capture_output=True)
    key = subprocess.run([*cli, "keys", "create", "--owner", "sdk-tests"], env=env, cwd=root, check=True,
                         capture_output=True, text=True).stdout.strip()
    port = free_port()
    log = open(root / "serve.log", "wb")
    proc = subprocess.Popen([*cli, "serve", "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=root,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/readyz", proc=proc)
        yield Server(url, key, root, env)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from start_server(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("files")
    bad = root / "bad.npz"
    np.savez(bad, x=np.zeros((20, 7), np.float32))  # 7 features: the open model admits it, then cannot run it
    (root / "digits.npz").write_bytes(digits_npz_bytes())
    (root / "held.onnx").write_bytes(held_model_bytes(HOLD))  # runs until cancelled (tests/e2e/held_job.py)
    return {"model": write_mlp_onnx(root / "mlp.onnx"), "data": root / "digits.npz", "bad": bad,
            "open": write_open_mlp_onnx(root / "open.onnx"), "held": root / "held.onnx"}


def write_open_mlp_onnx(path: Path) -> Path:
    """The test MLP with its input declared (N, F): no fixed feature count, so the API admits any dataset of rank 2
    and only the worker finds that 7 features cannot feed its 64-row weights: a job that fails on the worker."""
    import onnx

    model = onnx.load_from_string(mlp_onnx_bytes(seed=2))
    dim = model.graph.input[0].type.tensor_type.shape.dim[1]
    dim.ClearField("dim_value")
    dim.dim_param = "F"
    path.write_bytes(model.SerializeToString())
    return path


def test_importing_the_sdk_loads_nothing_heavy():
    code = ("import sys, app.client, app.client.commands; "
            f"print([m for m in sys.modules if m.split('.')[0] in {HEAVY!r}])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_every_endpoint_of_the_spec_has_a_method(tmp_path):
    from app.main import create_app
    from tests.conftest import make_settings

    spec = create_app(make_settings(tmp_path, "sqlite", "filesystem")).openapi()
    ops = {(m.upper(), p) for p, item in spec["paths"].items() for m in item
           if m in ("get", "post", "put", "patch", "delete")}
    missing = sorted(ops - set(ENDPOINTS))
    assert not missing, f"add a Client method for each and list it in app.client.client.ENDPOINTS: {missing}"
    assert not set(ENDPOINTS) - ops, "ENDPOINTS names operations the API no longer has"
    assert all(callable(getattr(Client, name, None)) for name in ENDPOINTS.values())


def test_quantize_end_to_end(server, files, tmp_path):
    uploads: list[tuple[int, int]] = []
    events = []
    with server.client() as client:
        assert client.health() == {"status": "ok"}
        assert client.ready()["status"] == "ready"
        job = client.quantize(files["model"], method="static_int8", dataset=files["data"], benchmark=QUICK,
                              labels={"suite": "sdk"}, upload_progress=lambda d, t: uploads.append((d, t)))
        assert job.status in ("queued", "running") and job.kind == "quantize" and job.labels == {"suite": "sdk"}
        # upload progress: both files, monotonic, ending at each file's size
        sizes = {files["model"].stat().st_size, files["data"].stat().st_size}
        assert {t for _, t in uploads} == sizes and all(d <= t for d, t in uploads)
        assert {d for d, t in uploads if d == t} == sizes

        assert job.wait(progress=events.append, timeout=240) is job
        assert job.status == "succeeded", job.error
        seqs = [e.seq for e in events]
        assert seqs == sorted(set(seqs)) and events[-1].status == "succeeded" and events[-1].progress == 1.0
        assert any(e.status == "running" and 0 < e.progress < 1 for e in events)

        m = job.metrics
        assert m["result"]["size_bytes"] < m["baseline"]["size_bytes"] and m["result"]["accuracy"] > 0.9
        report = job.report()
        assert report.splitlines()[0].split() == ["metric", "baseline", "result", "change"]
        assert "latency p50 @ batch 8" in report and "accuracy" in report

        # the artifact: downloaded, checked against its sha256
        art = job.artifact()
        path = job.download(tmp_path / "out.onnx")
        data = path.read_bytes()
        assert len(data) == art.size_bytes == m["result"]["size_bytes"]
        assert hashlib.sha256(data).hexdigest() == art.sha256 and not (tmp_path / "out.onnx.part").exists()
        assert client.download_artifact(art.id, tmp_path).name == art.filename  # a folder: its filename there

        # events replay from after a given id
        tail = list(job.events(last_event_id=seqs[-3]))
        assert [e.seq for e in tail] == seqs[-2:]

        # listings and reads are typed
        assert client.get_model(job.model_id).format == "onnx"
        assert job.id in [j.id for j in client.list_jobs(labels={"suite": "sdk"}).items]
        assert job.id in [j.id for j in client.list_model_jobs(job.model_id).items]
        assert job.dataset_id in [d.id for d in client.iter_datasets()]
        assert client.get_dataset(job.dataset_id).n_samples > 1000
        assert client.list_models(limit=1).items[0].id == job.model_id
        lineage = client.artifact_lineage(art.id)
        assert lineage.steps[0].job.id == job.id and lineage.teacher.id == job.model_id
        assert "distillery_jobs" in client.prometheus_metrics()
    with Client(server.url, server.api_key, event_hooks={"request": [lambda r: seen.append(r)],
                                                         "response": [lambda r: answers.append(r.status_code)]}) as c:
        # a resumed download: half the file is already in the .part file; the rest comes with a Range request
        seen: list = []
        answers: list[int] = []
        (tmp_path / "resumed.onnx.part").write_bytes(data[: len(data) // 2])
        resumed = c.download_artifact(art.id, tmp_path / "resumed.onnx")
        assert resumed.read_bytes() == data
        assert [r.headers.get("range") for r in seen] == [None, f"bytes={len(data) // 2}-"] and answers[-1] == 206
        # a .part that is not this artifact's: detected by the sha256 and downloaded again from the start
        (tmp_path / "stale.onnx.part").write_bytes(b"\0" * 100)
        assert c.download_artifact(art.id, tmp_path / "stale.onnx").read_bytes() == data


def test_prune_then_quantize_from_the_artifact(server, files):
    with server.client() as client:
        pruned = client.prune(files["model"], method="channels", dataset=files["data"], ratio=0.5,
                              fine_tune={"epochs": 1, "lr": 0.003}, benchmark=QUICK).wait(timeout=240)
        assert pruned.metrics["result"]["params"] < pruned.metrics["baseline"]["params"]
        quantized = client.quantize(pruned, method="dynamic_int8", dataset=pruned.dataset_id, benchmark=QUICK)
        assert quantized.model_id != pruned.model_id
        assert client.get_model(quantized.model_id).source_artifact_id == pruned.artifact_id
        quantized.wait(timeout=240)
        lineage = client.artifact_lineage(quantized.artifact_id)
        assert [s.job.id for s in lineage.steps] == [quantized.id, pruned.id] and lineage.complete
        # the same link made explicitly, and labels changed after the fact (a merge patch: None removes a key)
        named = client.model_from_artifact(pruned.artifact_id, name="pruned", labels={"stage": "pruned"})
        assert named.source_artifact_id == pruned.artifact_id and named.labels == {"stage": "pruned"}
        assert client.set_model_labels(named.id, {"stage": None, "team": "a"}).labels == {"team": "a"}
        assert [m.id for m in client.list_models(labels={"team": "a"}).items] == [named.id]
        assert pruned.set_labels({"recipe": "prune-quantize"}).labels == {"recipe": "prune-quantize"}
        assert [j.id for j in client.iter_jobs(labels=["recipe:prune-quantize"])] == [pruned.id]


def test_errors_carry_the_api_code(server, files):
    with server.client() as client:
        with pytest.raises(NotFound) as e:
            client.get_model("0" * 32)
        assert e.value.code == "model_not_found" and e.value.status_code == 404 and "not found" in e.value.message
        with pytest.raises(ValidationError) as e:
            client.quantize("0" * 32, method="int3")
        assert e.value.status_code == 422 and e.value.detail["errors"][0]["field"] == "config.method"
        with pytest.raises(DistilleryError) as e:
            client.get_job("not-an-id")
        assert e.value.code == "invalid_id"
        with pytest.raises(FileNotFoundError):
            client.upload_model(files["model"].with_name("missing.onnx"))

        # a job that fails: JobFailed carries its error code; raise_on_failure=False returns it
        job = client.quantize(files["open"], method="static_int8", dataset=files["bad"], benchmark=QUICK)
        with pytest.raises(JobFailed) as e:
            job.wait(timeout=240)
        assert e.value.job.status == "failed" and e.value.code in ("invalid_dataset", "invalid_model")
        assert job.wait(raise_on_failure=False).status == "failed"
        with pytest.raises(DistilleryError) as e:
            job.download()
        assert e.value.code == "no_artifact"
        with pytest.raises(Conflict) as e:
            job.cancel()
        assert e.value.code == "invalid_transition" and e.value.status_code == 409

        # the same Idempotency-Key gives the same job; with another body it is a 409
        model = client.upload_model(files["model"], name="idem")
        held = client.upload_model(files["held"])  # its job runs until it is cancelled
        first = client.quantize(held, method="dynamic_int8", benchmark=QUICK, idempotency_key="k-1")
        again = client.quantize(held.id, method="dynamic_int8", benchmark=QUICK, idempotency_key="k-1")
        assert again.id == first.id
        with pytest.raises(Conflict) as e:
            client.quantize(model, method="fp16", idempotency_key="k-1")
        assert e.value.code == "idempotency_key_reused"

        # cancel: a queued job at once (the one worker is busy with `first`), a running one within seconds
        next(e for e in first.events(timeout=120) if e.status == "running" and e.progress > 0)
        queued = client.quantize(model, method="fp16", benchmark=QUICK)
        assert queued.cancel().status == "cancelled" and queued.error.code == "cancelled"
        assert queued.cancel().status == "cancelled"  # idempotent
        assert first.cancel().status in ("running", "cancelled")
        with pytest.raises(JobFailed) as e:
            first.wait(timeout=120)
        assert e.value.job.status == "cancelled" and e.value.code == "cancelled"

    with pytest.raises(Unauthorized) as e:
        Client(server.url, "dk_0000000000000000_wrong").list_models()
    assert e.value.status_code == 401


# -- a tiny HTTP server for failures a healthy service does not show -----------------------------------------------


class FakeApi:
    """Answers each request with the next scripted reply for "METHOD path" (else for its path; the last reply
    repeats); records what it received."""

    def __init__(self):
        self.requests: list[dict] = []
        self.routes: dict[str, list] = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                path, _, query = self.path.partition("?")
                fake.requests.append({"method": self.command, "path": path, "headers": dict(self.headers),
                                      "body": body, "query": parse_qs(query)})
                replies = (fake.routes.get(f"{self.command} {path}") or fake.routes.get(path)
                           or [(404, {"error": {"code": "not_found", "message": path}})])
                reply = replies.pop(0) if len(replies) > 1 else replies[0]
                if callable(reply):
                    reply(self)
                    return
                status, payload = reply
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PATCH = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def count(self, path: str) -> int:
        return sum(r["path"] == path for r in self.requests)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake():
    f = FakeApi()
    yield f
    f.close()


UNAVAILABLE = (503, {"error": {"code": "database_unavailable", "message": "the database is unavailable"}})
JOB_ID = "a" * 32
JOB = {"id": JOB_ID, "kind": "quantize", "status": "queued", "model_id": "b" * 32, "dataset_id": None, "config": {},
       "device_requested": "auto", "progress": 0.0, "stage": "queued", "attempts": 0, "max_attempts": 3,
       "error": None, "metrics": None, "artifact_id": None, "worker": None, "device": None, "owner": "o",
       "created_at": "2026-01-01T00:00:00Z", "started_at": None, "finished_at": None,
       "updated_at": "2026-01-01T00:00:00Z"}
MODEL = {"id": "b" * 32, "name": "m", "format": "onnx", "size_bytes": 3, "sha256": "0" * 64, "owner": "o",
         "created_at": "2026-01-01T00:00:00Z", "inspection": {}}


def fast_client(url: str, retries: int = 4) -> Client:
    return Client(url, "dk_test", retries=retries, backoff_s=0.01, max_backoff_s=0.05)


def test_retries_a_503_then_succeeds(fake):
    fake.routes["/v1/models/" + "b" * 32] = [UNAVAILABLE, UNAVAILABLE, (200, MODEL)]
    with fast_client(fake.url) as client:
        assert client.get_model("b" * 32).name == "m"
    assert fake.count("/v1/models/" + "b" * 32) == 3
    assert fake.requests[0]["headers"]["Authorization"] == "Bearer dk_test"


def test_retries_are_bounded_and_end_in_service_unavailable(fake):
    fake.routes["/v1/models/" + "b" * 32] = [UNAVAILABLE]
    with fast_client(fake.url, retries=2) as client, pytest.raises(ServiceUnavailable) as e:
        client.get_model("b" * 32)
    assert e.value.code == "database_unavailable" and e.value.status_code == 503
    assert fake.count("/v1/models/" + "b" * 32) == 3  # the first try and 2 retries


def test_other_errors_are_not_retried(fake):
    fake.routes["/v1/models/" + "b" * 32] = [(500, {"error": {"code": "internal_error", "message": "boom"}})]
    fake.routes["/v1/models/" + "c" * 32] = [(404, {"error": {"code": "model_not_found", "message": "no"}})]
    with fast_client(fake.url) as client:
        with pytest.raises(ServerError):
            client.get_model("b" * 32)
        with pytest.raises(NotFound):
            client.get_model("c" * 32)
    assert fake.count("/v1/models/" + "b" * 32) == 1 and fake.count("/v1/models/" + "c" * 32) == 1


def test_job_submission_is_retried_with_one_idempotency_key(fake):
    fake.routes["/v1/jobs"] = [UNAVAILABLE, UNAVAILABLE, (202, JOB)]
    with fast_client(fake.url) as client:
        job = client.submit_job("quantize", "b" * 32, {"method": "dynamic_int8"}, callback_url="https://x/hook")
    assert job.id == JOB_ID
    posts = [r for r in fake.requests if r["path"] == "/v1/jobs"]
    keys = {r["headers"]["Idempotency-Key"] for r in posts}
    assert len(posts) == 3 and len(keys) == 1 and keys.pop().startswith("sdk-")
    body = json.loads(posts[0]["body"])
    assert body == {"kind": "quantize", "model_id": "b" * 32, "config": {"method": "dynamic_int8"},
                    "callback_url": "https://x/hook"}  # labels, device, dataset: only sent when given


def test_upload_streams_the_file_again_on_a_503(fake, tmp_path):
    payload = os.urandom(3 * 1024 * 1024 + 17)  # several chunks
    (tmp_path / "m.onnx").write_bytes(payload)
    fake.routes["/v1/models"] = [UNAVAILABLE, (201, MODEL)]
    seen: list[tuple[int, int]] = []
    with fast_client(fake.url) as client:
        client.upload_model(tmp_path / "m.onnx", name="m", labels={"a": "b"}, progress=lambda d, t: seen.append((d, t)))
    posts = [r for r in fake.requests if r["path"] == "/v1/models"]
    assert len(posts) == 2 and posts[0]["body"] == posts[1]["body"]
    body, ctype = posts[1]["body"], posts[1]["headers"]["Content-Type"]
    boundary = re.search(r"boundary=(\S+)", ctype).group(1).encode()
    parts = body.split(b"--" + boundary)
    assert b'name="name"\r\n\r\nm\r\n' in parts[1] and b'{"a": "b"}' in parts[2]
    assert b'filename="m.onnx"' in parts[3] and parts[3].split(b"\r\n\r\n", 1)[1] == payload + b"\r\n"
    assert seen[-1] == (len(payload), len(payload)) and len(seen) >= 2 * 4


def test_connection_errors_are_retried_then_reported(tmp_path):
    port = free_port()  # nothing listens there
    with fast_client(f"http://127.0.0.1:{port}", retries=2) as client, pytest.raises(ConnectionFailed) as e:
        client.health()
    assert isinstance(e.value, ServiceUnavailable) and e.value.code == "connection_error"


def _events_cut_after(events: list[dict], cut: bool):
    """An SSE reply (chunked) with these events; with `cut` the connection is dropped before the stream ends."""

    def reply(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for ev in events:
            block = f"id: {ev['seq']}\nevent: status\ndata: {json.dumps(ev)}\n\n: keep-alive\n\n".encode()
            handler.wfile.write(f"{len(block):x}\r\n".encode() + block + b"\r\n")
        handler.wfile.flush()
        if cut:
            handler.close_connection = True
            handler.connection.shutdown(2)
        else:
            handler.wfile.write(b"0\r\n\r\n")

    return reply


def test_event_stream_resumes_with_last_event_id_after_a_cut(fake):
    def ev(seq, status="running"):
        return {"seq": seq, "status": status, "progress": seq / 4, "stage": f"s{seq}", "at": "2026-01-01T00:00:00Z"}

    path = f"/v1/jobs/{JOB_ID}/events"
    fake.routes[path] = [_events_cut_after([ev(1), ev(2)], cut=True),
                         _events_cut_after([ev(3), ev(4, "succeeded")], cut=False)]
    with fast_client(fake.url) as client:
        got = list(client.job_events(JOB_ID))
    assert [e.seq for e in got] == [1, 2, 3, 4] and got[-1].status == "succeeded"
    asks = [r["headers"].get("Last-Event-ID") for r in fake.requests if r["path"] == path]
    assert asks == ["0", "2"]


def test_download_resumes_after_a_cut_with_range(fake, tmp_path):
    content = os.urandom(2 * 1024 * 1024 + 5)
    art_id = "d" * 32
    art = {"id": art_id, "job_id": JOB_ID, "format": "onnx", "size_bytes": len(content),
           "sha256": hashlib.sha256(content).hexdigest(), "filename": "m.int8.onnx", "owner": "o",
           "created_at": "2026-01-01T00:00:00Z"}
    half = len(content) // 2

    def cut(handler):  # promises the whole file, sends half, drops the connection
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        handler.wfile.write(content[:half])
        handler.wfile.flush()
        handler.close_connection = True
        handler.connection.shutdown(2)

    def ranged(handler):
        start = int(re.match(r"bytes=(\d+)-", handler.headers["Range"]).group(1))
        handler.send_response(206)
        handler.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
        handler.send_header("Content-Length", str(len(content) - start))
        handler.end_headers()
        handler.wfile.write(content[start:])

    fake.routes[f"/v1/artifacts/{art_id}"] = [(200, art)]
    fake.routes[f"/v1/artifacts/{art_id}/content"] = [cut, ranged]
    progress: list[int] = []
    with fast_client(fake.url) as client:
        path = client.download_artifact(art_id, tmp_path, progress=lambda d, t: progress.append(d))
    assert path == tmp_path / "m.int8.onnx" and path.read_bytes() == content
    ranges = [r["headers"].get("Range") for r in fake.requests if r["path"].endswith("/content")]
    assert len(ranges) == 2 and ranges[0] is None
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", ranges[1]).group(1))
    assert 0 < resumed_at <= half  # from what had reached the disk before the cut
    assert progress[-1] == len(content)


def test_report_table_reads_the_metrics_shape():
    metrics = {"baseline": {"size_bytes": 4_000_000, "params": 1_000_000, "macs": 2_000_000, "accuracy": 0.98,
                            "latency_ms": {"1": {"p50": 2.0}, "64": {"p50": 40.0}}},
               "result": {"size_bytes": 1_000_000, "params": 1_000_000, "macs": None, "accuracy": 0.975,
                          "agreement": 0.99, "cosine": 0.999, "latency_ms": {"1": {"p50": 1.0}, "64": {"p50": 50.0}}},
               "ratios": {"size": 0.25, "params": 1.0, "speedup": {"1": 2.0, "64": 0.8}},
               "accuracy_drop": 0.005, "slower_than_baseline": True}
    text = format_report(metrics)
    rows = {line.split("  ")[0].strip(): line for line in text.splitlines()}
    assert "3.8 MiB" in rows["size"] and "976.6 KiB" in rows["size"] and rows["size"].endswith("0.25x")
    assert "1,000,000" in rows["params"] and "2,000,000" in rows["MACs"]
    assert rows["latency p50 @ batch 1"].endswith("2.00x faster")
    assert rows["latency p50 @ batch 64"].endswith("0.80x SLOWER")
    assert rows["accuracy"].endswith("-0.5 pt") and "99.0%" in rows["agreement (top-1)"]
    assert "2.00 ms" in rows["latency p50 @ batch 1"] and "50.0 ms" in rows["latency p50 @ batch 64"]
    assert "SLOWER than the baseline" in text
    assert format_report(None) == "(no metrics)"
