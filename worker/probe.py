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
    methods = [{"kind": m["kind"], "method": m["method"], "input_formats": list(m["input_formats"]),
                "output_formats": list(m["output_formats"]),
                # a method that cannot use this device runs on the CPU of the same worker
                "devices": [device] if m["runs_on_device"] else ["cpu"]}
               for m in capabilities(device)["methods"]]
    return {"device": device, "methods": methods, "builtin_datasets": builtin_available()}


if __name__ == "__main__":
    json.dump(probe(), sys.stdout)
