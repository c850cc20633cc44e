from __future__ import annotations

from pathlib import Path

import pytest

from worker.engine import EngineError, registered_methods
from worker.engine.api import resolve_method
from worker.engine.core import JobSpec
from worker.engine.quantize import DynamicInt8Config, StaticInt8Config


def test_defaults_fill_missing_keys():
    config = StaticInt8Config.from_dict({})
    assert config.to_dict() == {
        "benchmark": {"batch_sizes": [1, 64], "repeats": 50, "warmup": 5},
        "max_accuracy_drop": 0.01,
        "output_format": "onnx",
        "per_channel": True,
        "calibration": {"samples": 512, "method": "minmax"},
    }


def test_overrides_are_applied_and_nested_defaults_kept():
    config = StaticInt8Config.from_dict(
        {
            "per_channel": False,
            "calibration": {"method": "entropy"},
            "benchmark": {"repeats": 7},
            "max_accuracy_drop": 0,
        }
    )
    assert config.per_channel is False
    assert config.calibration.method == "entropy" and config.calibration.samples == 512
    assert config.benchmark.repeats == 7 and config.benchmark.batch_sizes == (1, 64)
    assert config.max_accuracy_drop == 0.0 and isinstance(config.max_accuracy_drop, float)


def test_unknown_keys_are_ignored():
    assert DynamicInt8Config.from_dict({"calibration": {"samples": 3}, "extra": 1}) == DynamicInt8Config()


@pytest.mark.parametrize(
    "data",
    [
        {"per_channel": "yes"},
        {"calibration": {"samples": 0}},
        {"calibration": {"samples": 1.5}},
        {"calibration": {"method": "kl"}},
        {"calibration": []},
        {"benchmark": {"batch_sizes": [0]}},
        {"benchmark": {"batch_sizes": 64}},
        {"benchmark": {"repeats": True}},
        {"max_accuracy_drop": -0.1},
        {"max_accuracy_drop": float("nan")},
    ],
)
def test_bad_values_are_unsupported(data):
    with pytest.raises(EngineError) as excinfo:
        StaticInt8Config.from_dict(data)
    assert excinfo.value.code == "unsupported"


def test_registry_lists_the_quantize_methods_and_defaults_to_dynamic():
    assert registered_methods()["quantize"] == ["dynamic_int8", "static_int8"]
    method, config = resolve_method(JobSpec("quantize", "m.onnx", "onnx", None, {}))
    assert method.name == "dynamic_int8" and isinstance(config, DynamicInt8Config)
    method, config = resolve_method(JobSpec("quantize", "m.onnx", "onnx", None, {"method": "static_int8"}))
    assert method.name == "static_int8" and isinstance(config, StaticInt8Config)


def test_engine_is_a_plain_library():
    """Importing the engine pulls in no web, queue or database code (it runs in a bare child process)."""
    import subprocess
    import sys

    code = (
        "import sys, worker.engine\n"
        "bad = sorted(m for m in ('fastapi', 'sqlalchemy', 'celery', 'app') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[3])
