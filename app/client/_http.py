"""The SDK's HTTP layer: one httpx.Client, bounded exponential back-off on 503 and connection errors only,
error answers turned into exceptions, and a multipart body streamed from disk in constant memory."""
from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import httpx

from app.client.errors import ConnectionFailed, DistilleryError, ServiceUnavailable, error_for

ProgressFn = Callable[[int, int], None]  # (bytes done, bytes total)
CHUNK = 1024 * 1024


class Retry(Enum):
    """Which failures a request may be repeated after."""

    NEVER = "never"      # a POST that creates something without an Idempotency-Key
    CONNECT = "connect"  # 503, or a connection that never opened (nothing was sent): uploads
    SAFE = "safe"        # 503 and any transport error: reads, deletes, cancel, job POSTs with an Idempotency-Key


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential back-off: attempt n waits min(max_delay_s, base_delay_s * 2**n), with +-25% jitter;
    a 503's Retry-After is honoured up to max_delay_s."""

    retries: int = 4
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0

    def delay(self, attempt: int, retry_after: str | None = None) -> float:
        if retry_after:
            try:
                return min(self.max_delay_s, max(0.0, float(retry_after)))
            except ValueError:
                pass
        d = min(self.max_delay_s, self.base_delay_s * 2 ** attempt)
        return d * random.uniform(0.75, 1.25)


_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)


def _retryable(exc: httpx.TransportError, mode: Retry) -> bool:
    if mode is Retry.NEVER:
        return False
    if mode is Retry.CONNECT:
        return isinstance(exc, _CONNECT_ERRORS)
    return True


def raise_for_error(resp: httpx.Response) -> None:
    """Raise the SDK exception for a non-2xx answer (reads the body of a streamed response first)."""
    if resp.status_code < 400:
        return
    resp.read()
    try:
        body: Any = resp.json()
    except ValueError:
        body = resp.text[:500]
    raise error_for(resp.status_code, body, resp.headers)


def new_idempotency_key() -> str:
    return f"sdk-{uuid.uuid4().hex}"


class Transport:
    def __init__(self, base_url: str, api_key: str | None, *, timeout: float, retry: RetryPolicy,
                 event_hooks: dict[str, list[Callable]] | None = None, verify: bool | str = True):
        headers = {"User-Agent": "distillery-sdk/1", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.base_url = base_url.rstrip("/")
        self.retry = retry
        self.http = httpx.Client(base_url=self.base_url, headers=headers, verify=verify, event_hooks=event_hooks,
                                 timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    def close(self) -> None:
        self.http.close()

    def send(self, method: str, path: str, *, retry: Retry, params: dict | None = None, json_body: Any = None,
             headers: dict[str, str] | None = None, content: Callable[[], Iterator[bytes]] | None = None,
             stream: bool = False, timeout: httpx.Timeout | float | None = None) -> httpx.Response:
        """One request with retries; raises the SDK exception for an error answer. With `stream`, the 2xx response
        is returned unread (the caller closes it). `content` is a factory, so a retry sends the body again."""
        params = {k: v for k, v in (params or {}).items() if v is not None}
        attempt = 0
        while True:
            body = None
            if json_body is not None:
                body = json.dumps(json_body).encode()
                headers = {**(headers or {}), "Content-Type": "application/json"}
            elif content is not None:
                body = content()
            kwargs: dict[str, Any] = {}
            if timeout is not None:
                kwargs["timeout"] = timeout
            req = self.http.build_request(method, path, params=params, headers=headers, content=body, **kwargs)
            try:
                resp = self.http.send(req, stream=True)
            except httpx.TransportError as exc:
                if attempt < self.retry.retries and _retryable(exc, retry):
                    time.sleep(self.retry.delay(attempt))
                    attempt += 1
                    continue
                raise ConnectionFailed(f"{method} {self.base_url}{path}: {type(exc).__name__}: {exc}",
                                       detail={"url": f"{self.base_url}{path}"}) from exc
            if resp.status_code == 503 and retry is not Retry.NEVER and attempt < self.retry.retries:
                resp.close()
                time.sleep(self.retry.delay(attempt, resp.headers.get("retry-after")))
                attempt += 1
                continue
            try:
                raise_for_error(resp)
                if not stream:
                    resp.read()
            except BaseException:
                resp.close()
                raise
            if not stream:
                resp.close()
            return resp

    def json(self, method: str, path: str, *, retry: Retry = Retry.SAFE, **kw) -> Any:
        resp = self.send(method, path, retry=retry, **kw)
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return resp.json()
        except ValueError as exc:
            raise DistilleryError(f"{method} {path}: the answer is not JSON", code="bad_response",
                                  status_code=resp.status_code) from exc


def multipart_upload(path: Path, fields: dict[str, str], progress: ProgressFn | None,
                     file_field: str = "file") -> tuple[dict[str, str], Callable[[], Iterator[bytes]]]:
    """Headers and a body factory for a multipart/form-data upload of `path`, read CHUNK bytes at a time (constant
    memory); `progress(done, total)` follows the file's bytes. The Content-Length is exact, computed up front."""
    boundary = f"distillery-{uuid.uuid4().hex}"
    size = path.stat().st_size
    head = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{_quote(k)}"\r\n\r\n'.encode() + v.encode() + b"\r\n"
        for k, v in fields.items())
    filename = _quote(path.name)
    head += (f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{filename}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}",
               "Content-Length": str(len(head) + size + len(tail))}

    def body() -> Iterator[bytes]:
        yield head
        done = 0
        if progress:
            progress(0, size)
        with open(path, "rb") as f:
            while True:
                block = f.read(CHUNK)
                if not block:
                    break
                done += len(block)
                yield block
                if progress:
                    progress(done, size)
        if done != size:
            raise DistilleryError(f"{path} changed size while uploading ({size} -> {done} bytes)",
                                  code="upload_changed")
        yield tail

    return headers, body


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', "%22").replace("\r", " ").replace("\n", " ")


def part_path(path: Path) -> Path:
    return path.with_name(path.name + ".part")


__all__ = ["Retry", "RetryPolicy", "Transport", "ServiceUnavailable", "multipart_upload", "part_path",
           "new_idempotency_key", "raise_for_error"]
