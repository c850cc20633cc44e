"""Readiness (database, broker, object storage) and the Prometheus metrics, read at scrape time."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily

from app.core.broker import QUEUES, check_broker, queue_depth
from app.core.services import Services
from app.jobs import repository as jobs_repo
from app.system import repository as repo

DURATION_BUCKETS = [1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600]


def readiness(services: Services) -> dict[str, str]:
    checks: dict[str, str] = {}
    try:
        with services.db.session() as session:
            repo.ping(session)
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["database"] = f"unavailable: {type(exc).__name__}"
    try:
        check_broker(services.celery)
        checks["broker"] = "ok"
    except Exception as exc:  # noqa: BLE001
        checks["broker"] = f"unavailable: {type(exc).__name__}"
    if services.settings.storage_url:  # object storage: the bucket answers HeadBucket
        try:
            services.storage.check()
            checks["storage"] = "ok"
        except Exception as exc:  # noqa: BLE001
            checks["storage"] = f"unavailable: {getattr(exc, 'message', type(exc).__name__)}"
    return checks


class _DbCollector:
    """Reads the database at scrape time, so every API process reports the same figures."""

    def __init__(self, services: Services):
        self.services = services

    def collect(self):
        with self.services.db.session() as session:
            jobs = GaugeMetricFamily("distillery_jobs", "Jobs by kind and status.", labels=["kind", "status"])
            for kind, status, n in jobs_repo.counts_by_kind_status(session):
                jobs.add_metric([kind, status], n)
            yield jobs
            hist = HistogramMetricFamily("distillery_job_duration_seconds", "Wall time of finished jobs.",
                                         labels=["kind"])
            for kind, cumulative, total, count in jobs_repo.duration_histogram(session, DURATION_BUCKETS):
                buckets = [(str(b), c) for b, c in zip(DURATION_BUCKETS, cumulative, strict=True)] + [("+Inf", count)]
                hist.add_metric([kind], buckets, total)
            yield hist
            upload = GaugeMetricFamily("distillery_upload_bytes", "Bytes of stored uploads.", labels=["type"])
            upload.add_metric(["model"], repo.model_bytes(session))
            upload.add_metric(["dataset"], repo.dataset_bytes(session))
            yield upload
        depth = GaugeMetricFamily("distillery_queue_depth", "Messages waiting in the broker queue (Redis only).",
                                  labels=["queue"])
        for q in QUEUES:
            n = queue_depth(self.services.celery, q)
            if n is not None:
                depth.add_metric([q], n)
        yield depth


def render_metrics(services: Services) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_DbCollector(services))
    return generate_latest(registry)
