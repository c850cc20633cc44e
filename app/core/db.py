"""Engine and session factory, built lazily from Settings (never at import time), and the helpers every repository
shares (owner scoping, time cut-offs, the per-owner limit lock)."""
from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

from sqlalchemy import DateTime, Engine, MetaData, create_engine, event, text
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

from app.core.config import Settings

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on PostgreSQL and SQLite alike (SQLite hands back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def cutoff(seconds: float) -> datetime:
    """The moment `seconds` ago (e.g. "seen after this" is live)."""
    return utcnow() - timedelta(seconds=seconds)


def owned(stmt, column, owner: str | None):
    """Restrict a query to one owner's rows; an admin (owner None) sees every owner's."""
    return stmt if owner is None else stmt.where(column == owner)


_sqlite_owner_locks: dict[str, threading.Lock] = {}
_sqlite_owner_locks_guard = threading.Lock()


@contextmanager
def owner_limit_lock(session: Session, owner: str, limit: str) -> Iterator[None]:
    """Hold one owner's `limit` (count what exists, then insert, then commit) against the same owner's concurrent
    requests, so a burst cannot pass a per-owner limit between the count and the commit. PostgreSQL: a
    transaction-scoped advisory lock, shared by every API process and released by the commit or rollback. SQLite
    (the embedded default, one API process): a lock in this process, held until the block ends."""
    if session.get_bind().dialect.name == "postgresql":
        key = int.from_bytes(hashlib.sha256(f"{limit}:{owner}".encode()).digest()[:8], "big", signed=True)
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})
        yield
        return
    with _sqlite_owner_locks_guard:
        lock = _sqlite_owner_locks.setdefault(f"{limit}:{owner}", threading.Lock())
    with lock:
        yield


def make_engine(settings: Settings) -> Engine:
    url = settings.database_url
    if url.startswith("sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    wait = settings.database_wait_s
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, pool_timeout=wait,
                         connect_args={"connect_timeout": max(1, round(wait))})


class Database:
    """Holds one engine and its session factory."""

    def __init__(self, settings: Settings):
        self.engine = make_engine(settings)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessionmaker() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
