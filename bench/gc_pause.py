"""How long one full cycle collection takes in an API process, before and after freezing its start-up heap.

Builds the app on the embedded default (a temporary SQLite data folder), serves a few requests in process, then
times gc.collect() with the start-up heap tracked and after gc.freeze() (what the API's lifespan does).

    .venv/bin/python bench/gc_pause.py
"""
from __future__ import annotations

import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed_collect() -> float:
    t = time.perf_counter()
    gc.collect()
    return (time.perf_counter() - t) * 1000


def main() -> None:
    from fastapi.testclient import TestClient

    from app.core.config import Settings
    from app.core.migrate import upgrade
    from app.main import create_app

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), auth="open")
        upgrade(settings)
        with TestClient(create_app(settings)) as client:
            for path in ("/healthz", "/v1/jobs", "/v1/models", "/openapi.json"):
                client.get(path)
            gc.unfreeze()  # measure the heap as it would be without the lifespan's freeze
            tracked = len(gc.get_objects())
            before = min(timed_collect() for _ in range(3))
            gc.freeze()
            after = min(timed_collect() for _ in range(3))
            print(f"full collection: {before:.0f} ms with {tracked} tracked objects; {after:.1f} ms after "
                  f"gc.freeze() ({gc.get_freeze_count()} frozen)")


if __name__ == "__main__":
    main()
