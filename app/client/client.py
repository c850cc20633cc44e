"""`Client`: one typed method per API endpoint, and `Job`, a handle on a submitted job.

    from app.client import Client
    client = Client("http://127.0.0.1:8000", api_key=None)
    job = client.quantize("model.onnx", method="static_int8", dataset="calib.npz")
    job.wait(progress=True)
    print(job.metrics["ratios"])
    job.download("model.int8.onnx")

Results are the API's own pydantic schemas (ModelOut, DatasetOut, JobOut, JobEventOut, ArtifactOut, CapabilitiesOut,
Page[...]). Only httpx and pydantic are imported: no torch, SQLAlchemy, FastAPI or worker code.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from pydantic import BaseModel

from app.artifacts.schemas import ArtifactOut
from app.client import fmt
from app.client._http import (CHUNK, ProgressFn, Retry, RetryPolicy, Transport, multipart_upload,
                              new_idempotency_key, part_path, raise_for_error)
from app.client.errors import (BadRequest, Conflict, ConnectionFailed, DistilleryError, DownloadError, JobFailed,
                               ServiceUnavailable, ValidationError, WaitTimeout)
from app.client.progress import ProgressBar
from app.client.report import format_report
from app.core.schemas import Page
from app.datasets.schemas import DatasetOut
from app.jobs.schemas import JobEventOut, JobOut
from app.models.schemas import ModelOut
from app.fleet.schemas import CapabilitiesOut

if TYPE_CHECKING:
    from app.lineage.schemas import LineageOut

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
_ID = re.compile(r"^[0-9a-f]{32}$")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_BUILTIN = re.compile(r"^builtin:[a-z0-9-]+$")
T = TypeVar("T", bound=BaseModel)

ModelRef = "str | os.PathLike | ModelOut | ArtifactOut | Job"
DatasetRef = str | os.PathLike | DatasetOut


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True)
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _label_params(labels: Mapping[str, str] | Iterable[str] | None) -> list[str] | None:
    """`?label=key:value` filters from {"key": "value"} or ["key:value", ...]."""
    if labels is None:
        return None
    if isinstance(labels, Mapping):
        return [f"{k}:{v}" for k, v in labels.items()]
    return list(labels)


# Every operation of the API's OpenAPI spec and the Client method that calls it (tests check the spec against this).
ENDPOINTS: dict[tuple[str, str], str] = {
    ("GET", "/healthz"): "health",
    ("GET", "/readyz"): "ready",
    ("GET", "/metrics"): "prometheus_metrics",
    ("GET", "/v1/capabilities"): "capabilities",
    ("POST", "/v1/models"): "upload_model",
    ("GET", "/v1/models"): "list_models",
    ("GET", "/v1/models/{model_id}"): "get_model",
    ("PATCH", "/v1/models/{model_id}"): "set_model_labels",
    ("DELETE", "/v1/models/{model_id}"): "delete_model",
    ("POST", "/v1/models/from-artifact"): "model_from_artifact",
    ("GET", "/v1/models/{model_id}/jobs"): "list_model_jobs",
    ("POST", "/v1/datasets"): "upload_dataset",
    ("GET", "/v1/datasets"): "list_datasets",
    ("GET", "/v1/datasets/{dataset_id}"): "get_dataset",
    ("POST", "/v1/jobs"): "submit_job",
    ("GET", "/v1/jobs"): "list_jobs",
    ("GET", "/v1/jobs/{job_id}"): "get_job",
    ("PATCH", "/v1/jobs/{job_id}"): "set_job_labels",
    ("POST", "/v1/jobs/{job_id}/cancel"): "cancel_job",
    ("GET", "/v1/jobs/{job_id}/events"): "job_events",
    ("GET", "/v1/artifacts/{artifact_id}"): "get_artifact",
    ("GET", "/v1/artifacts/{artifact_id}/content"): "download_artifact",
    ("GET", "/v1/artifacts/{artifact_id}/lineage"): "artifact_lineage",
}


class Client:
    """A Distillery API client.

    `url` defaults to $DISTILLERY_URL (else http://127.0.0.1:8000), `api_key` to $DISTILLERY_API_KEY (sent as
    `Authorization: Bearer`). Requests that fail with 503 or a connection error are retried up to `retries` times
    with exponential back-off (`backoff_s` doubling up to `max_backoff_s`); nothing else is retried, and a job
    submission is retried only because it always carries an Idempotency-Key. `event_hooks` are passed to httpx
    (e.g. `{"request": [log]}`)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 60.0,
                 retries: int = 4, backoff_s: float = 0.5, max_backoff_s: float = 8.0,
                 event_hooks: dict[str, list[Callable]] | None = None, verify: bool | str = True):
        self.url = (url or os.environ.get("DISTILLERY_URL") or DEFAULT_URL).rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get("DISTILLERY_API_KEY") or None
        self.retry = RetryPolicy(retries=retries, base_delay_s=backoff_s, max_delay_s=max_backoff_s)
        self._t = Transport(self.url, api_key, timeout=timeout, retry=self.retry, event_hooks=event_hooks,
                            verify=verify)

    def close(self) -> None:
        self._t.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    # -- system ---------------------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """GET /healthz: the API process is up."""
        return self._t.json("GET", "/healthz")

    def ready(self) -> dict[str, Any]:
        """GET /readyz: {"status": "ready", "checks": {...}} or {"status": "not_ready", "checks": {...}} (no retry)."""
        try:
            return self._t.json("GET", "/readyz", retry=Retry.NEVER)
        except ServiceUnavailable as exc:
            if isinstance(exc, ConnectionFailed):
                raise
            return {"status": "not_ready", "checks": (exc.detail or {}).get("checks", {}), "code": exc.code}

    def prometheus_metrics(self) -> str:
        """GET /metrics: the Prometheus text exposition."""
        return self._t.send("GET", "/metrics", retry=Retry.SAFE).text

    def capabilities(self) -> CapabilitiesOut:
        """GET /v1/capabilities: the method x format x device combinations and built-in datasets live workers have."""
        return CapabilitiesOut.model_validate(self._t.json("GET", "/v1/capabilities"))

    # -- models ---------------------------------------------------------------------------------------------------

    def upload_model(self, path: str | os.PathLike, name: str | None = None, *,
                     labels: Mapping[str, str] | None = None, progress: ProgressFn | None = None,
                     **fields: str) -> ModelOut:
        """POST /v1/models: stream a model file (ONNX or TorchScript) from disk; `progress(done, total)` follows the
        bytes sent. `labels` and extra form `fields` are sent only when given. Always sends the file (a service that
        already stores the same content for this owner answers with that record); `ensure_model` looks first."""
        return self._upload_model(path, name, labels, progress, fields)[0]

    def find_model(self, file_or_sha256: str | os.PathLike) -> ModelOut | None:
        """The model of this owner whose content is this file's (or has this sha256), or None: GET
        /v1/models?sha256=HEX, the file hashed locally (streamed). A service without the filter answers its plain
        list, whose records are checked too: None unless one of them really has the content."""
        return self._find("/v1/models", ModelOut, file_or_sha256)

    def ensure_model(self, path: str | os.PathLike, name: str | None = None, *,
                     labels: Mapping[str, str] | None = None, progress: ProgressFn | None = None,
                     **fields: str) -> tuple[ModelOut, bool]:
        """The model of this file: the one already stored with the same content (`find_model`, nothing uploaded;
        `labels` are merged into its labels, `name` is not changed), else the file uploaded. Returns (model,
        already_stored): True when the file was not sent, or the service said it already had the content."""
        found = self.find_model(_check_file(path))
        if found is not None:
            if labels:
                found = self.set_model_labels(found.id, labels)
            return found, True
        return self._upload_model(path, name, labels, progress, fields)

    def _upload_model(self, path: str | os.PathLike, name: str | None, labels: Mapping[str, str] | None,
                      progress: ProgressFn | None, fields: Mapping[str, str]) -> tuple[ModelOut, bool]:
        if labels is not None:
            fields = {**fields, "labels": json.dumps(dict(labels))}
        data, existing = self._upload("/v1/models", path, name, progress, fields)
        return ModelOut.model_validate(data), existing

    def model_from_artifact(self, artifact_id: str, name: str | None = None, *,
                            labels: Mapping[str, str] | None = None) -> ModelOut:
        """POST /v1/models/from-artifact: a model of an earlier job's artifact (no copy, no download), e.g. to
        prune, then quantize. Retried only on 503 and connections that never opened."""
        body: dict[str, Any] = {"artifact_id": _check_id(artifact_id)}
        if name is not None:
            body["name"] = name
        if labels is not None:
            body["labels"] = dict(labels)
        return ModelOut.model_validate(self._t.json("POST", "/v1/models/from-artifact", json_body=body,
                                                    retry=Retry.CONNECT))

    def set_model_labels(self, model_id: str, labels: Mapping[str, str | None]) -> ModelOut:
        """PATCH /v1/models/{id}: merge `labels` into the model's (a None value removes that key)."""
        return ModelOut.model_validate(self._t.json("PATCH", f"/v1/models/{_check_id(model_id)}",
                                                    json_body={"labels": dict(labels)}))

    def list_models(self, *, cursor: str | None = None, limit: int | None = None,
                    labels: Mapping[str, str] | Iterable[str] | None = None, **filters: Any) -> Page[ModelOut]:
        """GET /v1/models: one page, newest first (`next_cursor` for the next)."""
        return self._page("/v1/models", ModelOut, cursor=cursor, limit=limit, label=_label_params(labels), **filters)

    def iter_models(self, **filters: Any) -> Iterator[ModelOut]:
        """Every model, page after page."""
        return self._iter(self.list_models, **filters)

    def get_model(self, model_id: str) -> ModelOut:
        """GET /v1/models/{id}."""
        return ModelOut.model_validate(self._t.json("GET", f"/v1/models/{_check_id(model_id)}"))

    def delete_model(self, model_id: str) -> None:
        """DELETE /v1/models/{id} (409 model_in_use while a queued or running job uses it)."""
        self._t.send("DELETE", f"/v1/models/{_check_id(model_id)}", retry=Retry.SAFE)

    def list_model_jobs(self, model_id: str, *, cursor: str | None = None, limit: int | None = None,
                        labels: Mapping[str, str] | Iterable[str] | None = None, **filters: Any) -> Page[JobOut]:
        """GET /v1/models/{id}/jobs: the jobs that took this model as input, newest first."""
        return self._page(f"/v1/models/{_check_id(model_id)}/jobs", JobOut, cursor=cursor, limit=limit,
                          label=_label_params(labels), **filters)

    # -- datasets -------------------------------------------------------------------------------------------------

    def upload_dataset(self, path: str | os.PathLike, name: str | None = None, *,
                       progress: ProgressFn | None = None, **fields: str) -> DatasetOut:
        """POST /v1/datasets: stream an .npz from disk (validated on the server without unpickling). Always sends
        the file; `ensure_dataset` looks for the same content first."""
        data, _ = self._upload("/v1/datasets", path, name, progress, fields)
        return DatasetOut.model_validate(data)

    def find_dataset(self, file_or_sha256: str | os.PathLike) -> DatasetOut | None:
        """The dataset of this owner whose content is this file's (or has this sha256), or None: GET
        /v1/datasets?sha256=HEX (see find_model)."""
        return self._find("/v1/datasets", DatasetOut, file_or_sha256)

    def ensure_dataset(self, path: str | os.PathLike, name: str | None = None, *,
                       progress: ProgressFn | None = None, **fields: str) -> tuple[DatasetOut, bool]:
        """The dataset of this file: the one already stored with the same content, else the file uploaded.
        Returns (dataset, already_stored)."""
        found = self.find_dataset(_check_file(path))
        if found is not None:
            return found, True
        data, existing = self._upload("/v1/datasets", path, name, progress, fields)
        return DatasetOut.model_validate(data), existing

    def list_datasets(self, *, cursor: str | None = None, limit: int | None = None,
                      **filters: Any) -> Page[DatasetOut]:
        """GET /v1/datasets: one page, newest first."""
        return self._page("/v1/datasets", DatasetOut, cursor=cursor, limit=limit, **filters)

    def iter_datasets(self, **filters: Any) -> Iterator[DatasetOut]:
        return self._iter(self.list_datasets, **filters)

    def get_dataset(self, dataset_id: str) -> DatasetOut:
        """GET /v1/datasets/{id}."""
        return DatasetOut.model_validate(self._t.json("GET", f"/v1/datasets/{_check_id(dataset_id)}"))

    # -- jobs -----------------------------------------------------------------------------------------------------

    def submit_job(self, kind: str, model: ModelRef | None, config: Mapping[str, Any] | BaseModel, *,
                   dataset: DatasetRef | None = None, device: str | None = None,
                   labels: Mapping[str, str] | None = None, callback_url: str | None = None,
                   idempotency_key: str | None = None, upload_progress: ProgressFn | None = None,
                   **options: Any) -> Job:
        """POST /v1/jobs. `model` is a model id, a ModelOut, a file path or an ArtifactOut (an earlier job's
        artifact: sent as `artifact_id`; or pass `artifact_id=` with model=None); `dataset` a dataset id,
        `builtin:NAME`, a DatasetOut or an .npz path. A file path is hashed locally and the model (dataset) already
        stored with that content is used; only a file the service does not have yet is uploaded (`ensure_model`).
        `labels`, `callback_url` and any other job field in `options` (e.g. `artifact_id=`) are sent only when
        given. An Idempotency-Key is always sent (a fresh one unless given), so a retried submission never makes a
        second job."""
        body: dict[str, Any] = {"kind": kind, "config": _jsonable(config)}
        if isinstance(model, ArtifactOut):  # an earlier job's artifact as the input model
            body["artifact_id"] = model.id
        elif isinstance(model, Job):
            body["artifact_id"] = model._artifact_id()
        elif model is not None:
            body["model_id"] = self._model_id(model, upload_progress)
        if dataset is not None:
            body["dataset_id"] = self._dataset_id(dataset, upload_progress)
        if device is not None:
            body["device"] = device
        if labels is not None:
            body["labels"] = dict(labels)
        if callback_url is not None:
            body["callback_url"] = callback_url
        body.update({k: _jsonable(v) for k, v in options.items() if v is not None})
        key = idempotency_key or new_idempotency_key()
        data = self._t.json("POST", "/v1/jobs", json_body=body, headers={"Idempotency-Key": key}, retry=Retry.SAFE)
        return Job(self, JobOut.model_validate(data))

    def quantize(self, model: ModelRef | None, method: str, dataset: DatasetRef | None = None, *,
                 device: str | None = None, labels: Mapping[str, str] | None = None, callback_url: str | None = None,
                 idempotency_key: str | None = None, upload_progress: ProgressFn | None = None,
                 job_options: Mapping[str, Any] | None = None, **config: Any) -> Job:
        """Submit a quantize job: `method` is dynamic_int8 | static_int8 | fp16 | bf16 | auto; other keywords
        (`calibration`, `per_channel`, `max_accuracy_drop`, `output_format`, `benchmark`) go into the config;
        `job_options` are further top-level job fields."""
        return self.submit_job("quantize", model, {"method": method, **config}, dataset=dataset, device=device,
                               labels=labels, callback_url=callback_url, idempotency_key=idempotency_key,
                               upload_progress=upload_progress, **dict(job_options or {}))

    def prune(self, model: ModelRef | None, method: str, dataset: DatasetRef | None = None, *,
              device: str | None = None, labels: Mapping[str, str] | None = None, callback_url: str | None = None,
              idempotency_key: str | None = None, upload_progress: ProgressFn | None = None,
              job_options: Mapping[str, Any] | None = None, **config: Any) -> Job:
        """Submit a prune job: `method` is magnitude | channels; keywords `sparsity`, `ratio`, `scope`, `round_to`,
        `fine_tune` ({"epochs": 2}), `output_format`, `benchmark` go into the config."""
        return self.submit_job("prune", model, {"method": method, **config}, dataset=dataset, device=device,
                               labels=labels, callback_url=callback_url, idempotency_key=idempotency_key,
                               upload_progress=upload_progress, **dict(job_options or {}))

    def distill(self, model: ModelRef | None, student: Mapping[str, Any] | BaseModel, dataset: DatasetRef | None = None,
                *, device: str | None = None, labels: Mapping[str, str] | None = None,
                callback_url: str | None = None, idempotency_key: str | None = None,
                upload_progress: ProgressFn | None = None, job_options: Mapping[str, Any] | None = None,
                **config: Any) -> Job:
        """Submit a distill job: `student` is {"arch": "mlp", "hidden": [...]}, {"arch": "cnn", ...},
        {"shrink": 0.5} or {"model_id": ...}; keywords `epochs`, `temperature`, `alpha`, `lr`, ... go into the
        config. A dataset is required (an .npz, an id or builtin:mnist)."""
        return self.submit_job("distill", model, {"student": _jsonable(student), **config}, dataset=dataset,
                               device=device, labels=labels, callback_url=callback_url,
                               idempotency_key=idempotency_key, upload_progress=upload_progress,
                               **dict(job_options or {}))

    def list_jobs(self, *, status: str | None = None, kind: str | None = None, model_id: str | None = None,
                  labels: Mapping[str, str] | Iterable[str] | None = None, cursor: str | None = None,
                  limit: int | None = None, **filters: Any) -> Page[JobOut]:
        """GET /v1/jobs: one page, newest first, filtered by status, kind, model, labels (`{"team": "x"}`)."""
        return self._page("/v1/jobs", JobOut, cursor=cursor, limit=limit, status=status, kind=kind,
                          model_id=model_id, label=_label_params(labels), **filters)

    def iter_jobs(self, **filters: Any) -> Iterator[JobOut]:
        return self._iter(self.list_jobs, **filters)

    def get_job(self, job_id: str) -> Job:
        """GET /v1/jobs/{id}."""
        return Job(self, self._job_out(job_id))

    def set_job_labels(self, job_id: str, labels: Mapping[str, str | None]) -> Job:
        """PATCH /v1/jobs/{id}: merge `labels` into the job's (a None value removes that key)."""
        data = self._t.json("PATCH", f"/v1/jobs/{_check_id(job_id)}", json_body={"labels": dict(labels)})
        return Job(self, JobOut.model_validate(data))

    def cancel_job(self, job_id: str) -> Job:
        """POST /v1/jobs/{id}/cancel: a queued job at once, a running one within seconds (a running job comes back
        `running` with stage `cancelling`). Idempotent: a job already cancelled is returned as it is now; a job that
        succeeded or failed is a Conflict (`invalid_transition`)."""
        for attempt in range(4):
            try:
                data = self._t.json("POST", f"/v1/jobs/{_check_id(job_id)}/cancel", retry=Retry.SAFE)
                return Job(self, JobOut.model_validate(data))
            except Conflict as exc:
                if exc.code == "retry" and attempt < 3:  # it changed state while the API cancelled it
                    continue
                if exc.code == "invalid_transition" and (exc.detail or {}).get("status") == "cancelled":
                    return self.get_job(job_id)
                raise
        raise AssertionError("unreachable")

    def job_events(self, job_id: str, last_event_id: int | None = None, *,
                   timeout: float | None = None) -> Iterator[JobEventOut]:
        """GET /v1/jobs/{id}/events: the job's status events (Server-Sent Events) as they happen, from after
        `last_event_id`, until the job has ended. A dropped connection is resumed with Last-Event-ID (no gap, no
        repeat). `timeout` bounds the whole wait (WaitTimeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._events(_check_id(job_id), last_event_id or 0, deadline)

    def wait_job(self, job_id: str, *, progress: bool | Callable[[JobEventOut], None] = False,
                 timeout: float | None = None, raise_on_failure: bool = True) -> Job:
        return self.get_job(job_id).wait(progress=progress, timeout=timeout, raise_on_failure=raise_on_failure)

    # -- artifacts ------------------------------------------------------------------------------------------------

    def get_artifact(self, artifact_id: str) -> ArtifactOut:
        """GET /v1/artifacts/{id}."""
        return ArtifactOut.model_validate(self._t.json("GET", f"/v1/artifacts/{_check_id(artifact_id)}"))

    def artifact_lineage(self, artifact_id: str) -> LineageOut:
        """GET /v1/artifacts/{id}/lineage: artifact <- job <- input model <- ... back to the uploaded model."""
        from app.lineage.schemas import LineageOut

        return LineageOut.model_validate(self._t.json("GET", f"/v1/artifacts/{_check_id(artifact_id)}/lineage"))

    def download_artifact(self, artifact_id: str, path: str | os.PathLike | None = None, *,
                          progress: ProgressFn | None = None) -> Path:
        """GET /v1/artifacts/{id}/content into `path` (default: the artifact's filename in the current folder; a
        folder: its filename there). Written to `path.part` first, in constant memory; an existing .part is resumed
        with a Range request, a dropped connection too; the file is checked against the artifact's size and sha256
        before it is renamed to `path`. Returns the absolute path."""
        info = self.get_artifact(artifact_id)
        target = (Path(path) if path is not None else Path(info.filename)).absolute()
        if target.is_dir():
            target = target / info.filename
        part = part_path(target)
        for _ in range(2):  # a .part that turns out not to be this artifact's is discarded once
            if self._fetch_into(info, part, progress):
                os.replace(part, target)
                return target
            part.unlink(missing_ok=True)
        raise DownloadError(f"artifact {info.id}: the downloaded bytes do not match its sha256",
                            detail={"sha256": info.sha256, "size_bytes": info.size_bytes})

    # -- internals ------------------------------------------------------------------------------------------------

    def _job_out(self, job_id: str) -> JobOut:
        return JobOut.model_validate(self._t.json("GET", f"/v1/jobs/{_check_id(job_id)}"))

    def _upload(self, path_: str, file: str | os.PathLike, name: str | None, progress: ProgressFn | None,
                fields: Mapping[str, str]) -> tuple[Any, bool]:
        """POST a multipart upload; (the record, whether the service already stored this content: a 200 with
        `X-Distillery-Existing: true` rather than a 201)."""
        file = _check_file(file)
        form = {k: str(v) for k, v in {"name": name, **fields}.items() if v is not None}
        headers, body = multipart_upload(file, form, progress)
        # 503 and a connection that never opened are retried (nothing was stored); a cut mid-upload is not.
        resp = self._t.send("POST", path_, headers=headers, content=body, retry=Retry.CONNECT,
                            timeout=httpx.Timeout(600.0, connect=10.0))
        try:
            data = resp.json()
        except ValueError as exc:
            raise DistilleryError(f"POST {path_}: the answer is not JSON", code="bad_response",
                                  status_code=resp.status_code) from exc
        existing = resp.headers.get("x-distillery-existing", "").lower() == "true" or resp.status_code == 200
        return data, existing

    def _find(self, path_: str, item: type[T], file_or_sha256: str | os.PathLike) -> T | None:
        digest = _digest_of(file_or_sha256)
        try:
            page = self._page(path_, item, sha256=digest)
        except (BadRequest, ValidationError):  # a service that refuses the filter: upload as before
            return None
        # Only records that really have the content count: a service without the filter lists everything. Of
        # several (stored before uploads were deduplicated), the oldest, so that results gather on one record.
        same = [r for r in page.items if str(getattr(r, "sha256", "")).lower() == digest]
        return min(same, key=lambda r: (r.created_at, r.id)) if same else None

    def _model_id(self, model: ModelRef, progress: ProgressFn | None) -> str:
        if isinstance(model, ModelOut):
            return model.id
        if isinstance(model, str) and _ID.match(model) and not Path(model).is_file():
            return model
        return self.ensure_model(model, progress=progress)[0].id

    def _dataset_id(self, dataset: DatasetRef, progress: ProgressFn | None) -> str:
        if isinstance(dataset, DatasetOut):
            return dataset.id
        if isinstance(dataset, str) and (_BUILTIN.match(dataset) or _ID.match(dataset)) and not Path(dataset).is_file():
            return dataset
        return self.ensure_dataset(dataset, progress=progress)[0].id

    def _page(self, path: str, item: type[T], **params: Any) -> Page[T]:
        return Page[item].model_validate(self._t.json("GET", path, params=params))  # type: ignore[valid-type]

    @staticmethod
    def _iter(list_page: Callable[..., Page], **filters: Any) -> Iterator[Any]:
        cursor = None
        while True:
            page = list_page(cursor=cursor, **filters)
            yield from page.items
            if not page.next_cursor:
                return
            cursor = page.next_cursor

    def _events(self, job_id: str, after: int, deadline: float | None) -> Iterator[JobEventOut]:
        failures = 0
        while True:
            headers = {"Accept": "text/event-stream", "Last-Event-ID": str(after)}
            read_s = 60.0 if deadline is None else max(0.5, min(60.0, deadline - time.monotonic()))
            try:
                resp = self._t.send("GET", f"/v1/jobs/{job_id}/events", retry=Retry.SAFE, headers=headers,
                                    stream=True, timeout=httpx.Timeout(read_s, connect=10.0))
            except ConnectionFailed:
                _check_deadline(deadline, job_id)
                raise
            try:
                for event in parse_sse(resp.iter_lines(), deadline, job_id):
                    after, failures = event.seq, 0
                    yield event
                return  # the server ends the stream once the job has ended
            except httpx.TransportError as exc:
                _check_deadline(deadline, job_id)
                if failures >= self.retry.retries:
                    raise ConnectionFailed(f"event stream of job {job_id}: {type(exc).__name__}: {exc}") from exc
                time.sleep(self.retry.delay(failures))
                failures += 1
            finally:
                resp.close()

    def _fetch_into(self, info: ArtifactOut, part: Path, progress: ProgressFn | None) -> bool:
        """Fill `part` up to the artifact's size (resuming what is there); True when its sha256 matches."""
        size = info.size_bytes
        hasher = hashlib.sha256()
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        if have:
            hasher = _rehash(part)
        failures = 0
        if progress:
            progress(have, size)
        while have < size:
            headers = {"Range": f"bytes={have}-"} if have else None
            try:
                resp = self._t.send("GET", f"/v1/artifacts/{info.id}/content", retry=Retry.SAFE, headers=headers,
                                    stream=True)
                try:
                    with open(part, "ab") as f:
                        resumed = resp.status_code == 206 and resp.headers.get("content-range", "").startswith(
                            f"bytes {have}-")
                        if have and not resumed:  # the server sent the whole file: start over from it
                            f.truncate(0)
                            hasher, have = hashlib.sha256(), 0
                        for block in resp.iter_bytes(CHUNK):
                            f.write(block)
                            hasher.update(block)
                            have += len(block)
                            if progress:
                                progress(min(have, size), size)
                finally:
                    resp.close()
                if have >= size:
                    break
                cut: Exception | None = None  # the answer ended early without an error
            except httpx.TransportError as exc:  # cut mid-body: resume from what reached the disk
                cut = exc
                have, hasher = part.stat().st_size if part.exists() else 0, _rehash(part)
            if failures >= self.retry.retries:
                raise ConnectionFailed(f"download of artifact {info.id} stopped at byte {have} of {size}: "
                                       f"{cut or 'the answer ended early'}") from cut
            time.sleep(self.retry.delay(failures))
            failures += 1
        return have == size and hasher.hexdigest() == info.sha256


def _rehash(path: Path) -> Any:
    h = hashlib.sha256()
    if not path.exists():
        return h
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 (hex) of a file, read CHUNK bytes at a time (constant memory)."""
    return _rehash(_check_file(path)).hexdigest()


def _check_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such file: {p}")
    return p


def _digest_of(file_or_sha256: str | os.PathLike) -> str:
    if isinstance(file_or_sha256, str) and _SHA256.match(file_or_sha256) and not Path(file_or_sha256).is_file():
        return file_or_sha256.lower()
    return file_sha256(file_or_sha256)


def _check_id(value: str) -> str:
    if not isinstance(value, str) or not _ID.match(value):
        raise DistilleryError(f"{value!r} is not an id (32 lowercase hex characters)", code="invalid_id")
    return value


def _check_deadline(deadline: float | None, job_id: str) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise WaitTimeout(f"job {job_id} had not ended when the wait timed out (it goes on)",
                          detail={"job_id": job_id})


def parse_sse(lines: Iterable[str], deadline: float | None = None, job_id: str = "") -> Iterator[JobEventOut]:
    """The `status` events of a Server-Sent Events stream (comments and other event types are skipped)."""
    data: list[str] = []
    event = "message"
    for line in lines:
        _check_deadline(deadline, job_id)
        if not line:
            if data and event in ("status", "message"):
                yield JobEventOut.model_validate_json("\n".join(data))
            data, event = [], "message"
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value
    if data and event in ("status", "message"):
        yield JobEventOut.model_validate_json("\n".join(data))


class Job:
    """A submitted job: its last known state (`info`, a JobOut, whose fields read through: `job.status`,
    `job.metrics`, `job.artifact_id`) and what can be done with it."""

    def __init__(self, client: Client, info: JobOut):
        self._client = client
        self.info = info

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "info":
            raise AttributeError(name)
        return getattr(self.info, name)

    def __repr__(self) -> str:
        return (f"<Job {self.info.id} {self.info.kind} {self.info.status} {fmt.percent(self.info.progress)} "
                f"{self.info.stage!r}>")

    @property
    def done(self) -> bool:
        return self.info.status in TERMINAL

    @property
    def metrics(self) -> dict[str, Any] | None:
        return self.info.metrics

    def refresh(self) -> Job:
        self.info = self._client._job_out(self.info.id)
        return self

    def events(self, last_event_id: int | None = None, *, timeout: float | None = None) -> Iterator[JobEventOut]:
        return self._client.job_events(self.info.id, last_event_id, timeout=timeout)

    def cancel(self) -> Job:
        self.info = self._client.cancel_job(self.info.id).info
        return self

    def set_labels(self, labels: Mapping[str, str | None]) -> Job:
        self.info = self._client.set_job_labels(self.info.id, labels).info
        return self

    def wait(self, progress: bool | Callable[[JobEventOut], None] = False, *, timeout: float | None = None,
             raise_on_failure: bool = True) -> Job:
        """Follow the event stream until the job ends, then read it. `progress=True` draws a bar on stderr; a
        callable gets each JobEventOut. Raises JobFailed when it ended failed or cancelled (unless
        `raise_on_failure=False`) and WaitTimeout after `timeout` seconds (the job goes on)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = ProgressBar(enabled=True) if progress is True else None
        callback = bar.job if bar else (progress if callable(progress) else None)
        last = 0
        try:
            while True:
                if self.done:
                    break
                seen = False
                for event in self._client._events(self.info.id, last, deadline):
                    last, seen = event.seq, True
                    if callback:
                        callback(event)
                self.refresh()
                if self.done:
                    break
                _check_deadline(deadline, self.info.id)
                if not seen:  # the stream ended without news (a proxy cut it): do not spin
                    time.sleep(1.0)
        finally:
            if bar:
                bar.done()
        if raise_on_failure and self.info.status in ("failed", "cancelled"):
            raise JobFailed(self.info)
        return self

    def artifact(self) -> ArtifactOut:
        return self._client.get_artifact(self._artifact_id())

    def download(self, path: str | os.PathLike | None = None, *, progress: ProgressFn | None = None) -> Path:
        """Download the job's artifact (see Client.download_artifact)."""
        return self._client.download_artifact(self._artifact_id(), path, progress=progress)

    def report(self) -> str:
        """The before/after table of the job's metrics."""
        return format_report(self.info.metrics)

    def _artifact_id(self) -> str:
        if self.info.artifact_id is None:
            if not self.done:
                self.refresh()
            if self.info.artifact_id is None:
                raise DistilleryError(f"job {self.info.id} has no artifact (status {self.info.status})",
                                      code="no_artifact")
        return self.info.artifact_id


__all__ = ["Client", "Job", "DEFAULT_URL", "ENDPOINTS", "TERMINAL", "file_sha256", "parse_sse", "raise_for_error"]
