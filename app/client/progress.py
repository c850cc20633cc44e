"""A one-line progress bar on a terminal (carriage return, no dependency), for upload bytes and job progress."""
from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

from app.client import fmt

WIDTH = 24


def human_bytes(n: float | None) -> str:
    """Bytes in binary units ('807.0 KiB'): app.client.fmt.size, kept under this name for old imports."""
    return fmt.size(n)


class ProgressBar:
    """`update(fraction, text)` redraws one line; `done()` ends it with a newline. Disabled, it does nothing:
    `enabled=None` means "when `stream` is a terminal"."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None, min_interval_s: float = 0.1):
        self.stream = stream or sys.stderr
        self.enabled = _isatty(self.stream) if enabled is None else enabled
        self.min_interval_s = min_interval_s
        self._last_draw = 0.0
        self._last_len = 0
        self._active = False

    def update(self, fraction: float, text: str = "", force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < self.min_interval_s and fraction < 1.0:
            return
        self._last_draw = now
        fraction = min(1.0, max(0.0, fraction))
        filled = int(round(fraction * WIDTH))
        line = f"[{'#' * filled}{'.' * (WIDTH - filled)}] {fmt.percent(fraction):>6}  {text}"
        cols = shutil.get_terminal_size((100, 20)).columns
        line = line[: max(20, cols - 1)]
        pad = " " * max(0, self._last_len - len(line))
        self.stream.write("\r" + line + pad)
        self.stream.flush()
        self._last_len = len(line)
        self._active = True

    def upload(self, label: str):
        """A `progress(done, total)` callback for an upload."""

        def callback(done: int, total: int) -> None:
            self.update(done / total if total else 1.0, f"{label}  {fmt.size(done)} / {fmt.size(total)}",
                        force=done in (0, total))
            if done >= total:
                self.done()

        return callback

    def job(self, event) -> None:
        """A callback for job events (JobEventOut)."""
        self.update(event.progress, f"{event.status:<9} {event.stage}", force=event.status != "running")

    def done(self) -> None:
        if self.enabled and self._active:
            self.stream.write("\n")
            self.stream.flush()
        self._active = False
        self._last_len = 0


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
