"""capabilities(device): what the worker publishes, per (kind, method), without touching CUDA at import."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from worker.engine import capabilities as capabilities_module
from worker.engine.capabilities import capabilities
from worker.engine.registry import all_methods


def _by_key(caps: dict) -> dict:
    return {(m["kind"], m["method"]): m for m in caps["methods"]}


def test_cpu_lists_every_registered_method():
    caps = capabilities("cpu")
    json.dumps(caps, allow_nan=False)
    methods = _by_key(caps)
    assert set(methods) == {(m.kind, m.name) for m in all_methods()}
    assert caps["device"] == "cpu" and caps["device_available"] is True
    assert all(m["runs_on_device"] for m in methods.values())
    both = ["onnx", "torchscript"]
    assert methods[("quantize", "dynamic_int8")] == {
        "kind": "quantize", "method": "dynamic_int8", "input_formats": both, "output_formats": both,
        "needs_dataset": False, "runs_on_device": True, "default": True,
    }
    assert methods[("quantize", "static_int8")]["output_formats"] == ["onnx"]
    assert methods[("quantize", "static_int8")]["needs_dataset"] is True
    assert methods[("quantize", "bf16")]["output_formats"] == ["torchscript"]
    assert methods[("prune", "channels")]["input_formats"] == both


def test_cuda_without_a_gpu_runs_nothing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    caps = capabilities("cuda")
    assert caps["device_available"] is False
    assert not any(m["runs_on_device"] for m in caps["methods"])


def test_cuda_with_a_gpu_drops_cpu_only_kernels(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    methods = _by_key(capabilities("cuda"))
    assert methods[("quantize", "dynamic_int8")]["output_formats"] == ["onnx"]  # torch int8 kernels are CPU-only
    assert methods[("quantize", "dynamic_int8")]["runs_on_device"] is True
    assert methods[("quantize", "bf16")]["runs_on_device"] is False
    assert methods[("prune", "channels")]["runs_on_device"] is True


def test_importing_does_not_ask_about_cuda(monkeypatch):
    def boom():
        raise AssertionError("torch.cuda.is_available called at import")

    monkeypatch.setattr(torch.cuda, "is_available", boom)
    importlib.reload(capabilities_module)


def test_unknown_device_is_refused():
    with pytest.raises(ValueError):
        capabilities("tpu")
