"""Versions of the libraries the engine runs on, as installed: read from the distributions' metadata
(importlib.metadata), never from a module's `__version__`, which can lag the release (torch_pruning 1.6.1 says
"1.6.0").

An import name is mapped to the distribution that provides it (`onnxruntime` may come from `onnxruntime-gpu`,
`torch_pruning` from `torch-pruning`), so a report names what pip installed.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import metadata

#: The libraries a job's report lists under `versions`, by import name.
ENGINE_PACKAGES = ("onnx", "onnxruntime", "numpy", "torch", "torch_pruning")


@lru_cache(maxsize=1)
def _providers() -> dict[str, list[str]]:
    return metadata.packages_distributions()


@lru_cache(maxsize=None)
def installed_version(import_name: str) -> str | None:
    """The installed version of the distribution that provides top-level package `import_name`; None if none."""
    candidates = [*_providers().get(import_name, []), import_name]
    for name in dict.fromkeys(candidates):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def engine_versions() -> dict[str, str | None]:
    """{import name: installed version} for ENGINE_PACKAGES."""
    return {name: installed_version(name) for name in ENGINE_PACKAGES}
