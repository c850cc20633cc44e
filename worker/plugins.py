"""Plugins: Python files a job process imports after the engine and before its job (`DISTILLERY_JOB_PLUGINS`).

A plugin is the operator's code, trusted like the engine: it may register methods with the engine's registry. It
is imported before the system-call filter is applied and before the job's input is read, and the sandbox shows it
to the job process read-only. Tests use one to stand in for a job process under an attacker's control.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def load_plugins(paths: list[str]) -> None:
    for i, path in enumerate(paths):
        name = f"distillery_plugin_{i}_{Path(path).stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load the job plugin {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
