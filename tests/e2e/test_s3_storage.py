"""S3-compatible object storage (`DISTILLERY_STORAGE_URL=s3://bucket/prefix`) against a real S3 protocol server:
moto's standalone server, started here as its own process on a free port.

The unit tests drive `S3Storage` directly; the end-to-end test runs the production shape of several machines: a
`distillery api` process and a Celery worker with *different* data folders (so the worker cannot see a file the API
wrote), sharing only PostgreSQL, Redis and the bucket.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from app.core.config import Settings
from app.core.storage import ContentCorrupt, S3Storage, StorageUnavailable, make_storage
from tests.e2e.conftest import FAST, free_port, settings_env, wait_http

boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto.server", reason="moto[server] is in the `test` extra")

KEY_ENV = {"AWS_ACCESS_KEY_ID": "distillery-test", "AWS_SECRET_ACCESS_KEY": "distillery-test-secret"}
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def s3_url(tmp_path_factory):
    """moto's S3 server, in its own process; its URL once it answers S3 requests."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    client = _client(url)
    deadline = time.monotonic() + 60
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited: {log_path.read_text()[-2000:]}")
            try:
                client.list_buckets()
                break
            except Exception:  # noqa: BLE001 - not listening yet
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _client(url: str):
    return boto3.session.Session(region_name="us-east-1", **{k.lower(): v for k, v in KEY_ENV.items()}).client(
        "s3", endpoint_url=url)


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch):
    """Credentials through the standard AWS variables, as in production (moto accepts any)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in KEY_ENV.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def bucket(s3_url):
    name = f"distillery-{uuid.uuid4().hex[:12]}"
    _client(s3_url).create_bucket(Bucket=name)
    return name


def _store(tmp_path, s3_url, bucket, **kw) -> S3Storage:
    return S3Storage(bucket, "some/prefix", tmp_dir=tmp_path / "tmp", cache_dir=tmp_path / "cache",
                     endpoint_url=s3_url, **kw)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _keys(s3_url, bucket) -> list[str]:
    return [o["Key"] for o in _client(s3_url).list_objects_v2(Bucket=bucket).get("Contents", [])]


# ---------------------------------------------------------------------------------------------- unit level

def test_put_exists_size_read_delete(tmp_path, s3_url, bucket):
    store = _store(tmp_path, s3_url, bucket)
    data = os.urandom(300_000)
    sha = hashlib.sha256(data).hexdigest()
    assert not store.exists(sha)
    assert store.put_file(_write(tmp_path / "a.bin", data)) == (sha, len(data))
    assert (tmp_path / "a.bin").exists()  # put_file leaves its source alone
    assert _keys(s3_url, bucket) == [f"some/prefix/objects/{sha[:2]}/{sha[2:]}"]
    assert store.exists(sha) and store.size(sha) == len(data)
    with store.open(sha) as f:
        assert hashlib.sha256(f.read()).hexdigest() == sha
    assert store.put_file(_write(tmp_path / "b.bin", data)) == (sha, len(data))  # same content: one object
    assert len(_keys(s3_url, bucket)) == 1
    store.delete(sha)
    assert not store.exists(sha) and _keys(s3_url, bucket) == []
    with pytest.raises(FileNotFoundError):
        store.open(sha)
    with pytest.raises(FileNotFoundError):
        store.local_path(sha)
    with pytest.raises(ValueError):
        store.exists("../../etc/passwd")


def test_large_upload_goes_up_in_bounded_parts_and_leaves_no_temp(tmp_path, s3_url, bucket):
    store = _store(tmp_path, s3_url, bucket, part_size=5 * MiB)
    data = os.urandom(11 * MiB + 123)
    sha = hashlib.sha256(data).hexdigest()
    f, temp = store.new_temp()
    with f:
        f.write(data)
    assert temp.parent == tmp_path / "tmp"
    store.commit_temp(temp, sha)
    assert not temp.exists() and list((tmp_path / "tmp").iterdir()) == []
    client = _client(s3_url)
    head = client.head_object(Bucket=bucket, Key=store.key(sha))
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # a multipart object of 3 parts (5 + 5 + 1 MiB)
    assert head["Metadata"] == {"sha256": sha}
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert hashlib.sha256(client.get_object(Bucket=bucket, Key=store.key(sha))["Body"].read()).hexdigest() == sha


def test_failed_multipart_upload_is_aborted(tmp_path, s3_url, bucket):
    store = _store(tmp_path, s3_url, bucket, part_size=5 * MiB)
    path = _write(tmp_path / "big.bin", os.urandom(6 * MiB))
    real = store.client.upload_part
    calls = []

    def flaky(**kw):  # the second part fails as if the connection dropped
        calls.append(kw["PartNumber"])
        if kw["PartNumber"] == 2:
            from botocore.exceptions import EndpointConnectionError

            raise EndpointConnectionError(endpoint_url=s3_url)
        return real(**kw)

    store.client.upload_part = flaky
    with pytest.raises(StorageUnavailable):
        store.put_file(path)
    assert calls == [1, 2]
    assert _client(s3_url).list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert _keys(s3_url, bucket) == []


def test_ranged_reads(tmp_path, s3_url, bucket):
    store = _store(tmp_path, s3_url, bucket)
    data = os.urandom(3 * MiB + 17)
    sha, _ = store.put_file(_write(tmp_path / "r.bin", data))
    for start, end in ((0, 0), (5, 1000), (MiB - 1, 2 * MiB + 3), (len(data) - 10, len(data) - 1), (0, len(data) - 1)):
        assert b"".join(store.iter_range(sha, start, end)) == data[start:end + 1]
        with store.open_range(sha, start, end) as f:
            assert f.read() == data[start:end + 1]
    with store.open(sha) as f:  # a seekable file: seek anywhere, read on
        f.seek(2 * MiB)
        assert f.read(100) == data[2 * MiB:2 * MiB + 100]
        f.seek(10)
        assert f.read(5) == data[10:15]
        assert f.tell() == 15
        f.seek(-7, os.SEEK_END)
        assert f.read() == data[-7:]
    with store.open_range(sha, 100, 199) as f:
        f.seek(50)
        assert f.read() == data[150:200]
    # an identity that names this version of the object (a verified-content cache keys on it)
    with store.open(sha) as f1, store.open(sha) as f2:
        assert f1.identity == f2.identity and f1.identity[:3] == (bucket, store.key(sha), len(data))
    _client(s3_url).put_object(Bucket=bucket, Key=store.key(sha), Body=b"rewritten")
    with store.open(sha) as f3:
        assert f3.identity != f1.identity and f3.read() == b"rewritten"
    with pytest.raises(FileNotFoundError):
        store.iter_range("0" * 64, 0, 10)


def test_local_path_downloads_once_verifies_and_renames_atomically(tmp_path, s3_url, bucket):
    store = _store(tmp_path, s3_url, bucket)
    data = os.urandom(2 * MiB + 5)
    sha, _ = store.put_file(_write(tmp_path / "m.bin", data))
    path = store.local_path(sha)
    assert path == tmp_path / "cache" / "objects" / sha[:2] / sha[2:]
    assert path.read_bytes() == data
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    # a second worker call is served from the cache: it works even with the object gone from the bucket
    _client(s3_url).delete_object(Bucket=bucket, Key=store.key(sha))
    assert store.local_path(sha) == path and path.read_bytes() == data


def test_sha_mismatch_on_download_is_detected(tmp_path, s3_url, bucket):
    store = _store(tmp_path, s3_url, bucket)
    claimed = hashlib.sha256(b"the real model").hexdigest()
    _client(s3_url).put_object(Bucket=bucket, Key=store.key(claimed), Body=b"a tampered model")
    with pytest.raises(ContentCorrupt) as info:
        store.local_path(claimed)
    assert info.value.detail["actual_sha256"] == hashlib.sha256(b"a tampered model").hexdigest()
    cache = tmp_path / "cache"
    assert not any(p.is_file() for p in cache.rglob("*")), "a corrupt download must leave nothing in the cache"


def test_cache_is_bounded_least_recently_used_first(tmp_path, s3_url, bucket):
    store = _store(tmp_path, s3_url, bucket, cache_max_bytes=250_000, cache_pin_s=0)
    shas = [store.put_file(_write(tmp_path / f"{i}.bin", os.urandom(100_000)))[0] for i in range(3)]
    a, b = store.local_path(shas[0]), store.local_path(shas[1])
    os.utime(a, (time.time() - 100, time.time() - 100))
    os.utime(b, (time.time() - 200, time.time() - 200))
    store.local_path(shas[0])  # used again: now the most recent of the two
    c = store.local_path(shas[2])  # 300 kB > 250 kB: the least recently used (b) goes
    assert a.exists() and c.exists() and not b.exists()
    # entries a running job may still open (used within cache_pin_s) are never evicted, whatever the bound
    pinned = _store(tmp_path, s3_url, bucket, cache_max_bytes=1, cache_pin_s=3600)
    assert pinned.local_path(shas[1]).exists() and a.exists() and c.exists()


def test_unreachable_store_is_storage_unavailable(tmp_path, bucket):
    store = S3Storage(bucket, "", tmp_dir=tmp_path / "tmp", cache_dir=tmp_path / "cache",
                      endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageUnavailable) as info:
        store.exists("a" * 64)
    assert info.value.status_code == 503 and info.value.code == "storage_unavailable"
    with pytest.raises(StorageUnavailable):
        store.check()


def test_settings_select_the_backend(tmp_path, s3_url, bucket):
    local = make_storage(Settings(data_dir=tmp_path / "d"))
    assert type(local).__name__ == "LocalStorage"
    s3 = make_storage(Settings(data_dir=tmp_path / "d", storage_url=f"s3://{bucket}/p/q", s3_endpoint_url=s3_url))
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == (bucket, "p/q")
    assert s3.cache == tmp_path / "d" / "cache"
    s3.check()
    with pytest.raises(ValueError):
        Settings(storage_url="https://example.invalid/bucket")
    with pytest.raises(ValueError):
        Settings(storage_url="s3:///no-bucket")


# ------------------------------------------------------------------------------------ through the API

@pytest.mark.slow
def test_api_and_worker_on_separate_machines_share_only_the_bucket(tmp_path, s3_url, bucket, pg_url, redis_url,
                                                                   start_worker):
    from app.auth.keys import create_key
    from app.core.db import Database
    from tests.conftest import make_settings
    from tests.helpers import digits_npz_bytes, mlp_onnx_bytes

    import redis

    broker = redis_url.rsplit("/", 1)[0] + f"/{1 + os.getpid() % 14}"
    redis.Redis.from_url(broker).flushdb()
    shared = dict(storage_url=f"s3://{bucket}/distillery", s3_endpoint_url=s3_url, **FAST)
    api_settings = make_settings(tmp_path / "api-machine", pg_url, broker, auth="required", **shared)
    worker_settings = make_settings(tmp_path / "worker-machine", pg_url, broker, **shared)
    assert api_settings.data_dir != worker_settings.data_dir
    db = Database(api_settings)
    with db.session() as session:
        _, token = create_key(session, "s3-team")
        session.commit()
    db.dispose()

    start_worker(worker_settings, "w-s3@test")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env.update(settings_env(api_settings))
    log_path = tmp_path / "api.log"
    log = open(log_path, "wb")
    api = subprocess.Popen([sys.executable, "-m", "app.cli", "api", "--host", "127.0.0.1", "--port", str(port),
                            "--workers", "1"], env=env, stdout=log, stderr=subprocess.STDOUT,
                           cwd=tmp_path, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(base + "/healthz", proc=api)
        with httpx.Client(base_url=base, timeout=60, headers={"Authorization": f"Bearer {token}"}) as c:
            ready = c.get("/readyz")
            assert ready.status_code == 200, (ready.text, log_path.read_text()[-3000:])
            assert ready.json()["checks"] == {"database": "ok", "broker": "ok", "storage": "ok"}

            model_bytes = mlp_onnx_bytes()
            model = c.post("/v1/models", files={"file": ("m.onnx", model_bytes)}, data={"name": "mlp"})
            assert model.status_code == 201, model.text
            model = model.json()
            ds = c.post("/v1/datasets", files={"file": ("d.npz", digits_npz_bytes())}).json()
            # the uploads are objects in the bucket, named by their sha256; nothing is left in the API's temp folder
            keys = set(_keys(s3_url, bucket))
            for sha in (model["sha256"], ds["sha256"]):
                assert f"distillery/objects/{sha[:2]}/{sha[2:]}" in keys
            api_store = api_settings.storage_dir
            assert not any(p.is_file() for p in api_store.rglob("*")), list(api_store.rglob("*"))
            assert model["sha256"] == hashlib.sha256(model_bytes).hexdigest()

            job = c.post("/v1/jobs", json={"kind": "quantize", "model_id": model["id"], "dataset_id": ds["id"],
                                           "config": {"method": "static_int8", "benchmark": {
                                               "batch_sizes": [1], "repeats": 2, "warmup": 1}}})
            assert job.status_code == 202, job.text
            job_id = job.json()["id"]
            deadline = time.monotonic() + 240
            while (job := c.get(f"/v1/jobs/{job_id}").json())["status"] not in ("succeeded", "failed", "cancelled"):
                assert time.monotonic() < deadline, f"job did not finish: {job}"
                time.sleep(0.3)
            assert job["status"] == "succeeded", job

            # the worker read its inputs through its own cache (verified downloads), never the API's folder
            cache = worker_settings.data_dir / "cache" / "objects"
            for sha in (model["sha256"], ds["sha256"]):
                cached = cache / sha[:2] / sha[2:]
                assert cached.is_file() and hashlib.sha256(cached.read_bytes()).hexdigest() == sha
            assert not (worker_settings.storage_dir / "objects").exists() or not any(
                (worker_settings.storage_dir / "objects").iterdir())

            # the artifact was written to the bucket by the worker and is served from it by the API
            art = c.get(f"/v1/artifacts/{job['artifact_id']}").json()
            assert f"distillery/objects/{art['sha256'][:2]}/{art['sha256'][2:]}" in set(_keys(s3_url, bucket))
            whole = c.get(f"/v1/artifacts/{art['id']}/content")
            assert whole.status_code == 200 and whole.headers["etag"] == f'"{art["sha256"]}"'
            assert len(whole.content) == art["size_bytes"]
            assert hashlib.sha256(whole.content).hexdigest() == art["sha256"]
            size = art["size_bytes"]
            part = c.get(f"/v1/artifacts/{art['id']}/content", headers={"Range": "bytes=100-1099"})
            assert part.status_code == 206 and part.headers["content-range"] == f"bytes 100-1099/{size}"
            assert part.content == whole.content[100:1100]
            tail = c.get(f"/v1/artifacts/{art['id']}/content", headers={"Range": "bytes=-64"})
            assert tail.status_code == 206 and tail.content == whole.content[-64:]
            pieces = [c.get(f"/v1/artifacts/{art['id']}/content", headers={"Range": f"bytes={s}-{s + 4095}"}).content
                      for s in range(0, size, 4096)]
            assert hashlib.sha256(b"".join(pieces)).hexdigest() == art["sha256"]
    finally:
        if api.poll() is None:
            os.killpg(api.pid, 15)
            try:
                api.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(api.pid, 9)
                api.wait()
        log.close()
