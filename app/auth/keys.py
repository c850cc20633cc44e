"""API keys: `dk_<id>.<secret>`; the database keeps the id, the owner and sha256(secret), never the secret.

The auth domain's service: `create_key` and `revoke_key` (the CLI's `distillery keys`) commit their own work; the
queries are app/auth/repository.py's.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy.orm import Session

from app.auth import repository as repo
from app.core.db import utcnow
from app.core.tables import ApiKeyRow

KEY_RE = re.compile(r"^dk_([0-9a-f]{16})\.([A-Za-z0-9_-]{20,100})$")
OWNER_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Principal:
    owner: str
    admin: bool = False
    key_id: str | None = None

    @property
    def scope(self) -> str | None:
        """The owner to filter reads by; None for an admin, who sees everything."""
        return None if self.admin else self.owner


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, owner: str, *, admin: bool = False, label: str = "") -> tuple[ApiKeyRow, str]:
    if not OWNER_RE.match(owner):
        raise ValueError("owner: 1-64 characters of letters, digits, '_', '.', '-'")
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    row = repo.add(session, ApiKeyRow(id=key_id, owner=owner, label=label[:255], secret_sha256=_digest(secret),
                                      admin=admin))
    session.commit()
    return row, f"dk_{key_id}.{secret}"


def revoke_key(session: Session, key_id: str) -> bool:
    row = repo.get(session, key_id)
    if row is None or row.revoked_at is not None:
        return False
    row.revoked_at = utcnow()
    session.commit()
    return True


def list_keys(session: Session) -> list[ApiKeyRow]:
    return repo.list_all(session)


class KeyVerifier:
    """Checks a presented key; remembers verified keys, and only those, for `ttl_s` so the polling path costs no
    query. The memory is a least-recently-used table of at most `max_entries` keys: a key that fails to verify never
    enters it, so junk keys can neither fill it nor push a verified key out of it."""

    def __init__(self, ttl_s: float, max_entries: int = 10_000):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._cache: OrderedDict[str, tuple[float, Principal]] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._cache)

    def cached(self, token: str) -> Principal | None:
        """The principal of a key verified within `ttl_s`; None otherwise (never a query)."""
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(token)
            if hit is None:
                return None
            if now - hit[0] >= self.ttl_s:
                del self._cache[token]
                return None
            self._cache.move_to_end(token)
            return hit[1]

    def verify(self, session_factory, token: str) -> Principal | None:
        """The key's principal, or None; `session_factory` is used only when the key is not cached."""
        m = KEY_RE.match(token)
        if not m:
            return None
        principal = self.cached(token)
        if principal is not None:
            return principal
        key_id, secret = m.groups()
        now = time.monotonic()
        with session_factory() as session:
            row = repo.get(session, key_id)
        ok = row is not None and row.revoked_at is None and hmac.compare_digest(row.secret_sha256, _digest(secret))
        if not ok:
            return None
        principal = Principal(row.owner, row.admin, row.id)
        if self.ttl_s > 0:
            with self._lock:
                self._cache[token] = (now, principal)
                self._cache.move_to_end(token)
                while len(self._cache) > self.max_entries:
                    self._cache.popitem(last=False)
        return principal
