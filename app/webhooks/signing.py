"""Webhook signatures: HMAC-SHA256 over "<timestamp>.<body>", sent as X-Distillery-Signature: sha256=<hex>."""
from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Distillery-Signature"
TIMESTAMP_HEADER = "X-Distillery-Timestamp"


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str, body: bytes, signature: str, *, tolerance_s: float = 300.0,
           now: float | None = None) -> bool:
    """What a receiver does: recompute, compare in constant time, and refuse stale timestamps (replays)."""
    try:
        ts = int(timestamp)
    except (TypeError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - ts) > tolerance_s:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)
