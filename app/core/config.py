"""One Settings object for the API, the workers and the CLI. Nothing else reads os.environ."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core.storage import parse_s3_url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DISTILLERY_", extra="ignore")

    data_dir: Path = Field(Path("distillery-data"), description="Where the embedded default keeps its SQLite file, artifacts and broker folders.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite file under data_dir. Production: postgresql+psycopg://...")
    database_wait_s: float = Field(5.0, gt=0, le=60, description="PostgreSQL: how long a request waits to connect (or for a free connection) before it is a 503 database_unavailable.")
    broker_url: str | None = Field(None, description="Celery broker URL; default: kombu's filesystem transport under data_dir (no server). Production: redis://...")
    storage_dir: Path | None = Field(None, description="Folder of the content-addressed file store; default: data_dir/storage.")
    storage_url: str | None = Field(None, description="Object storage for workers on several machines: "
                                    "s3://bucket/prefix (any S3-compatible store; credentials from the standard AWS "
                                    "variables / boto3 chain). Unset: the local storage_dir.")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint for S3-compatible stores (MinIO: "
                                        "http://minio:9000); unset: AWS S3.")
    s3_region: str | None = Field(None, description="S3 region; unset: AWS_REGION / the boto3 chain, else us-east-1.")
    storage_cache_max_bytes: int = Field(20 * 1024**3, ge=0, description="With storage_url: bytes of downloaded "
                                         "inputs a worker keeps in data_dir/cache (least recently used evicted "
                                         "first; inputs of jobs that may still run are kept).")
    max_upload_bytes: int = Field(2 * 1024**3, gt=0, description="Largest accepted upload (413 past it).")
    max_dataset_array_bytes: int = Field(4 * 1024**3, gt=0, description="Largest total uncompressed size of a dataset's arrays.")
    max_attempts: int = Field(3, ge=1, le=20, description="Attempts per job before it fails with attempts_exhausted / worker_lost.")
    job_time_limit_s: float = Field(3600.0, gt=0, description="Hard wall-time limit of one job attempt (failed with timeout past it).")
    job_memory_limit_bytes: int = Field(8 * 1024**3, gt=0, description="Hard RSS limit of a job's child process (failed with out_of_memory past it).")
    heartbeat_interval_s: float = Field(2.0, gt=0, description="How often a worker records that its running job is alive.")
    worker_lost_after_s: float = Field(30.0, gt=0, description="A running job whose heartbeat is older than this is re-queued by the reaper.")
    reaper_interval_s: float = Field(5.0, gt=0, description="How often each worker looks for lost or undispatched jobs.")
    redispatch_after_s: float = Field(120.0, gt=0, description="A queued job not claimed for this long is sent to the broker again.")
    broker_poll_interval_s: float = Field(0.1, gt=0, description="Polling interval of the embedded (filesystem) broker.")
    worker_queues: str = Field("auto", description="Queues a worker consumes: 'auto' (gpu when CUDA is present, else cpu) or a comma list.")
    worker_concurrency: int = Field(1, ge=1, description="Jobs one worker runs at once.")
    job_prestart: bool = Field(True, description="Keep one job process started ahead with the engine imported, so "
                               "a job does not wait 1-2 s for torch to import (costs that idle process's memory, "
                               "about 0.3 GB).")
    job_nice: int = Field(10, ge=0, le=19, description="CPU niceness of job processes (0-19): a job's work yields to "
                          "the API and the worker when they share a machine.")
    job_sandbox: Literal["strict", "permissive"] = Field("strict", description="What a worker does where a layer "
                                                         "of the job sandbox is missing (docs/security.md). strict: "
                                                         "refuse TorchScript jobs (loading one runs the uploader's "
                                                         "code) unless file confinement and the system-call filter "
                                                         "both hold. permissive: run them with the layers there are. "
                                                         "Either way the worker logs its layers at start-up and "
                                                         "/v1/capabilities shows them.")
    job_disk_limit_bytes: int = Field(20 * 1024**3, gt=0, description="Largest file a job's process may write, and "
                                      "most bytes its work folder may hold (failed with disk_limit past it); also "
                                      "bounds the artifact.")
    job_plugins: str = Field("", description="Python files (comma-separated paths) a job's process imports after "
                             "the engine and before its job, e.g. to register custom methods; the operator's own "
                             "code, shown read-only to the sandbox.")
    api_workers: int = Field(2, ge=1, description="uvicorn processes of `distillery api`.")
    api_submit_concurrency: int = Field(4, ge=1, le=64, description="Job submissions one API process works on at "
                                        "once; more wait their turn. Each holds the process's interpreter lock "
                                        "for a few ms, so a burst of them would otherwise make status polls wait.")
    auth: Literal["required", "open"] = Field("required", description="required: every /v1 request needs "
                                              "`Authorization: Bearer <key>`. open: requests without a key act as "
                                              "the default owner (only `distillery serve` on loopback allows it).")
    default_owner: str = Field("default", description="Owner of keyless requests in open mode.")
    auth_cache_s: float = Field(10.0, ge=0, description="How long an API process trusts a verified key (a revoked "
                                "key stops working within this time).")
    max_concurrent_jobs_per_owner: int = Field(20, ge=1, description="Queued + running jobs one owner may have "
                                               "(429 past it).")
    max_storage_bytes_per_owner: int = Field(50 * 1024**3, ge=1, description="Bytes of models, datasets and "
                                             "artifacts one owner may store (413 past it).")
    rate_limit_per_minute: int = Field(1200, ge=1, description="Requests per minute per owner and API process "
                                       "(429 past it).")
    auth_failures_per_minute: int = Field(20, ge=1, description="Failed API key attempts per minute per client "
                                          "address (IPv6: per /64) and API process, bursts up to the same number; "
                                          "past it a key that is not already verified gets 429 before any database "
                                          "query. The address is the socket peer (uvicorn substitutes "
                                          "X-Forwarded-For only from its trusted proxies).")
    auth_failure_max_addresses: int = Field(10_000, ge=1, description="Client addresses with recent failed key "
                                            "attempts one API process remembers; when all are still counting, "
                                            "further addresses share one bucket (nothing is forgotten early).")
    max_event_streams_per_owner: int = Field(8, ge=1, description="Event streams (GET /v1/jobs/{id}/events) "
                                             "one owner may hold open per API process (429 past it).")
    max_event_streams: int = Field(64, ge=1, description="Event streams one API process serves at once, all "
                                   "owners together (429 past it).")
    webhook_allowed_hosts: str = Field("", description="Hosts a job's callback_url may name, comma-separated: "
                                       "host names (`hooks.example.com`, `*.example.com` for subdomains), IP "
                                       "addresses or CIDR blocks. A host name may only reach public addresses; "
                                       "internal ones must be listed themselves. Empty: webhooks are disabled.")
    webhook_secret: str = Field("", description="HMAC-SHA256 key of the X-Distillery-Signature header (at least 16 "
                                "characters; required when webhook_allowed_hosts is set).")
    webhook_max_attempts: int = Field(6, ge=1, le=20, description="Delivery attempts per webhook before it is "
                                      "marked failed.")
    webhook_timeout_s: float = Field(5.0, gt=0, le=60, description="Connect/read timeout of one delivery attempt.")
    webhook_backoff_s: float = Field(10.0, gt=0, description="Delay before the first retry of a webhook; doubled "
                                     "after each failed attempt (capped at one hour).")
    log_level: str = Field("INFO", description="Log level of the API and the workers.")
    log_format: Literal["json", "text"] = Field("json", description="json: one JSON object per log line (ts, "
                                                "level, logger, message, job_id on lines about a job, worker, "
                                                "request_id). text: one plain line. `distillery serve` uses text "
                                                "unless this is set.")

    @model_validator(mode="after")
    def _webhooks_need_a_secret(self) -> "Settings":
        if self.webhook_allowed_hosts.strip() and len(self.webhook_secret) < 16:
            raise ValueError("DISTILLERY_WEBHOOK_ALLOWED_HOSTS is set but DISTILLERY_WEBHOOK_SECRET is missing or "
                             "shorter than 16 characters: webhooks would go out unsigned")
        return self

    @model_validator(mode="after")
    def _fill_defaults(self) -> "Settings":
        self.data_dir = self.data_dir.expanduser().resolve()
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'distillery.db'}"
        if self.broker_url is None:
            self.broker_url = "filesystem://"
        if self.storage_dir is None:
            self.storage_dir = self.data_dir / "storage"
        self.storage_dir = self.storage_dir.expanduser().resolve()
        if self.storage_url:
            parse_s3_url(self.storage_url)  # refuse a malformed URL at start-up, not at the first upload
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def is_embedded_broker(self) -> bool:
        return self.broker_url.startswith("filesystem")

    @property
    def job_plugin_paths(self) -> list[str]:
        return [p.strip() for p in self.job_plugins.split(",") if p.strip()]

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def visibility_timeout_s(self) -> int:
        """Longer than the longest job, so Redis never redelivers a running job to a second worker."""
        return int(self.job_time_limit_s * 2 + 600)


@lru_cache
def get_settings() -> Settings:
    return Settings()
