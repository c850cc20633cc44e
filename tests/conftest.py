"""Fixtures on real services: PostgreSQL and Redis when they run (required in CI), SQLite and the
file-system broker always. A missing service is a skip locally and a failure when DISTILLERY_TEST_REQUIRE_SERVICES=1.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from app.core.config import Settings
from app.core.migrate import upgrade

PG_ADMIN_URL = os.environ.get("DISTILLERY_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("DISTILLERY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REQUIRE_SERVICES = os.environ.get("DISTILLERY_TEST_REQUIRE_SERVICES") == "1"
_missing: dict[str, str] = {}
_status: dict[str, bool] = {}


def _postgres_up() -> bool:
    if "postgres" not in _status:
        try:
            eng = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 2})
            with eng.connect() as c:
                c.execute(text("SELECT 1"))
            eng.dispose()
            _status["postgres"] = True
        except Exception as exc:  # noqa: BLE001
            _missing["postgres"] = f"PostgreSQL not reachable at {PG_ADMIN_URL}: {type(exc).__name__}"
            _status["postgres"] = False
    return _status["postgres"]


def _redis_up() -> bool:
    if "redis" not in _status:
        try:
            import redis

            redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
            _status["redis"] = True
        except Exception as exc:  # noqa: BLE001
            _missing["redis"] = f"Redis not reachable at {REDIS_URL}: {type(exc).__name__}"
            _status["redis"] = False
    return _status["redis"]


def need(service: str) -> None:
    up = _postgres_up() if service == "postgres" else _redis_up()
    if not up:
        if REQUIRE_SERVICES:
            pytest.fail(f"{_missing[service]} (required: DISTILLERY_TEST_REQUIRE_SERVICES=1)")
        pytest.skip(_missing[service])


def pytest_terminal_summary(terminalreporter):
    if _missing:
        terminalreporter.write_sep("=", "service-backed tests skipped")
        for reason in _missing.values():
            terminalreporter.write_line(f"  {reason}: tests that need it were skipped (embedded default covered)")


@pytest.fixture(scope="session")
def pg_url():
    """A fresh PostgreSQL database for this test session, migrated to head."""
    need("postgres")
    name = f"distillery_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_url():
    need("redis")
    return REDIS_URL


TABLES = ["job_events", "artifacts", "jobs", "datasets", "models", "workers", "api_keys"]


def _clean(url: str) -> None:
    eng = create_engine(url)
    with eng.begin() as c:
        if url.startswith("postgresql"):
            c.execute(text("TRUNCATE " + ", ".join(TABLES) + " CASCADE"))
        else:
            for t in TABLES:
                c.execute(text(f"DELETE FROM {t}"))
    eng.dispose()


_migrated: set[str] = set()


def make_settings(tmp_path: Path, db: str, broker: str, **overrides) -> Settings:
    data_dir = tmp_path / "data"
    database_url = None if db == "sqlite" else db
    broker_url = None if broker == "filesystem" else broker
    overrides.setdefault("auth", "open")  # as `distillery serve` on loopback; tests/app/test_auth.py covers keys
    settings = Settings(data_dir=data_dir, database_url=database_url, broker_url=broker_url, **overrides)
    if settings.database_url not in _migrated:
        upgrade(settings)
        if not settings.is_sqlite:
            _migrated.add(settings.database_url)
    if not settings.is_sqlite:
        _clean(settings.database_url)
    return settings


@pytest.fixture(params=["sqlite", "postgres"])
def settings(request, tmp_path) -> Settings:
    """API settings on each database (no worker consumes the broker in API tests)."""
    if request.param == "postgres":
        url = request.getfixturevalue("pg_url")
        return make_settings(tmp_path, url, "filesystem")
    return make_settings(tmp_path, "sqlite", "filesystem")


@pytest.fixture
def client(settings):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c
