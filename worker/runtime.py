"""Per-process services of a worker, built lazily (never at import time)."""
from __future__ import annotations

import threading
from functools import cached_property

from app.core.broker import make_celery
from app.core.config import Settings, get_settings
from app.core.db import Database
from app.core.storage import make_storage


class Runtime:
    def __init__(self, settings: Settings):
        self.settings = settings

    @cached_property
    def db(self) -> Database:
        return Database(self.settings)

    @cached_property
    def storage(self):
        return make_storage(self.settings)

    @cached_property
    def celery(self):
        return make_celery(self.settings)


_lock = threading.Lock()
_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = Runtime(get_settings())
        return _runtime
