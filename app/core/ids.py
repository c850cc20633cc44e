"""Time-ordered ids: 12 hex digits of milliseconds then 20 random hex digits (sorting by id = by creation)."""
import os
import time

ID_PATTERN = r"^[0-9a-f]{32}$"


def new_id() -> str:
    return f"{int(time.time() * 1000):012x}{os.urandom(10).hex()}"
