"""Child-process helpers shared by the CLI and the workers (Linux: children die with their parent)."""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL):
    """A preexec_fn: the child gets `sig` when the thread that started it dies."""

    def _preexec() -> None:
        if sys.platform.startswith("linux"):
            try:
                ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)
            except OSError:
                pass
        os.setsid()

    return _preexec
