"""`python -m worker.probe`: print, as JSON, what this machine's job processes can run.

Run as a child process by the worker at start-up, so the worker itself never imports torch or touches CUDA.
"""
from __future__ import annotations

import json
import sys


def probe() -> dict:
    from worker.engine.builtin import builtin_available
    from worker.engine.capabilities import capabilities

    try:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        device = "cpu"
    caps = capabilities(device)
    return {"device": device, "methods": caps["methods"], "builtin_datasets": builtin_available()}


if __name__ == "__main__":
    json.dump(probe(), sys.stdout)
