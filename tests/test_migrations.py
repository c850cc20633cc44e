"""Migrations run from empty on SQLite and PostgreSQL, and the models have no drift from them."""
from __future__ import annotations

import uuid

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text

from app.core.config import Settings
from app.core.migrate import alembic_config
from tests.conftest import PG_ADMIN_URL, need


@pytest.fixture(params=["sqlite", "postgres"])
def empty_db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
        return
    need("postgres")
    name = f"distillery_mig_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as c:
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def test_upgrade_from_empty_check_and_downgrade(empty_db_url, tmp_path):
    cfg = alembic_config(Settings(data_dir=tmp_path, database_url=empty_db_url))
    command.upgrade(cfg, "head")
    eng = create_engine(empty_db_url)
    tables = set(inspect(eng).get_table_names())
    assert {"models", "datasets", "jobs", "job_events", "artifacts", "workers", "alembic_version"} <= tables
    command.check(cfg)  # raises when the models and the migrations disagree
    command.downgrade(cfg, "base")
    assert set(inspect(eng).get_table_names()) <= {"alembic_version"}
    command.upgrade(cfg, "head")
    eng.dispose()


def test_cli_migrate_is_idempotent(tmp_path, monkeypatch):
    from app.cli import main
    from app.core.config import get_settings

    monkeypatch.setenv("DISTILLERY_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("DISTILLERY_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        assert main(["migrate"]) == 0
        assert main(["migrate"]) == 0
    finally:
        get_settings.cache_clear()
    assert (tmp_path / "data" / "distillery.db").exists()
