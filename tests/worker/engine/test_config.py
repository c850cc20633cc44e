from __future__ import annotations

from pathlib import Path

import pytest

from worker.engine import EngineError, registered_methods
from worker.engine.api import resolve_method
from worker.engine.config import FineTuneConfig
from worker.engine.core import JobSpec
from worker.engine.prune import ChannelsConfig, MagnitudeConfig
from worker.engine.quantize import DynamicInt8Config, StaticInt8Config


def test_defaults_fill_missing_keys():
    config = StaticInt8Config.from_dict({})
    assert config.to_dict() == {
        "benchmark": {"batch_sizes": [1, 64], "repeats": 50, "warmup": 5},
        "max_accuracy_drop": 0.01,
        "output_format": None,
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


def test_registry_lists_the_methods_and_quantize_defaults_to_dynamic():
    assert registered_methods()["quantize"] == ["auto", "bf16", "dynamic_int8", "fp16", "static_int8"]
    assert registered_methods()["prune"] == ["channels", "magnitude"]
    method, config, output_format = resolve_method(JobSpec("quantize", "m.onnx", "onnx", None, {}))
    assert method.name == "dynamic_int8" and isinstance(config, DynamicInt8Config) and output_format == "onnx"
    method, config, _ = resolve_method(JobSpec("quantize", "m.onnx", "onnx", None, {"method": "static_int8"}))
    assert method.name == "static_int8" and isinstance(config, StaticInt8Config)


@pytest.mark.parametrize(
    ("method", "model_format", "requested", "expected"),
    [
        ("dynamic_int8", "torchscript", None, "torchscript"),  # the upload's format where the method writes it
        ("static_int8", "torchscript", None, "onnx"),  # else ONNX
        ("bf16", "onnx", None, "torchscript"),  # else the only format it writes
        ("fp16", "onnx", "torchscript", "torchscript"),  # output_format wins
        ("dynamic_int8", "onnx", None, "onnx"),
    ],
)
def test_output_format_rule(method, model_format, requested, expected):
    config = {"method": method, "output_format": requested}
    assert resolve_method(JobSpec("quantize", "m", model_format, None, config))[2] == expected


def test_optional_keys_take_null():
    config = ChannelsConfig.from_dict({"fine_tune": None, "output_format": None})
    assert config.fine_tune is None and config.output_format is None
    config = ChannelsConfig.from_dict({"fine_tune": {"epochs": 3}, "output_format": "torchscript"})
    assert config.fine_tune == FineTuneConfig(epochs=3, lr=0.001, distill=True)
    assert config.to_dict()["fine_tune"] == {"epochs": 3, "lr": 0.001, "distill": True}


@pytest.mark.parametrize(
    ("cls", "data"),
    [
        (MagnitudeConfig, {"sparsity": 1.0}),
        (MagnitudeConfig, {"sparsity": -0.1}),
        (MagnitudeConfig, {"scope": "model"}),
        (ChannelsConfig, {"ratio": 0}),
        (ChannelsConfig, {"ratio": 0.95}),
        (ChannelsConfig, {"round_to": 0}),
        (ChannelsConfig, {"fine_tune": {"epochs": 0}}),
        (ChannelsConfig, {"fine_tune": {"lr": 0}}),
        (ChannelsConfig, {"fine_tune": {"distill": "yes"}}),
        (ChannelsConfig, {"fine_tune": 2}),
        (ChannelsConfig, {"output_format": "keras"}),
    ],
)
def test_bad_prune_values_are_unsupported(cls, data):
    with pytest.raises(EngineError) as excinfo:
        cls.from_dict(data)
    assert excinfo.value.code == "unsupported"


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
