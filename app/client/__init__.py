"""Distillery's Python SDK (and, in app.client.commands, the client commands of the `distillery` CLI).

    from app.client import Client
    with Client("http://127.0.0.1:8000", api_key=None) as client:
        job = client.quantize("model.onnx", method="static_int8", dataset="calib.npz")  # files: reused if stored
        job.wait(progress=True)
        print(job.report())
        job.download("model.int8.onnx")

Imports only httpx, pydantic and the API's schema modules: no torch, SQLAlchemy, FastAPI or worker code.
"""
from app.client import fmt
from app.client.client import DEFAULT_URL, TERMINAL, Client, Job, file_sha256
from app.client.errors import (ApiError, BadRequest, Conflict, ConnectionFailed, DistilleryError, DownloadError,
                               JobFailed, NotFound, PayloadTooLarge, RateLimited, ServerError, ServiceUnavailable,
                               Unauthorized, ValidationError, WaitTimeout)
from app.client.progress import ProgressBar
from app.client.report import format_report, report_rows

__all__ = ["Client", "Job", "DEFAULT_URL", "TERMINAL", "DistilleryError", "ApiError", "BadRequest", "Unauthorized",
           "NotFound", "Conflict", "PayloadTooLarge", "ValidationError", "RateLimited", "ServiceUnavailable",
           "ConnectionFailed", "ServerError", "JobFailed", "WaitTimeout", "DownloadError", "ProgressBar",
           "format_report", "report_rows", "file_sha256", "fmt"]
