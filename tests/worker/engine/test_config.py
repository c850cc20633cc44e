from __future__ import annotations

from pathlib import Path

import pytest

from app.methods import (
    ChannelsConfig,
    DynamicInt8Config,
    FineTuneConfig,
    MagnitudeConfig,
    MethodConfig,
    StaticInt8Config,
    registered_configs,
)
from worker.engine import EngineError, registered_methods
from worker.engine.api import resolve_method
from worker.engine.core import JobSpec
from worker.engine.registry import all_methods


def parse(cls: type[MethodConfig], data: dict) -> MethodConfig:
    """What the engine makes of a job config for `cls`'s method (EngineError("unsupported") when it is bad)."""
    spec = JobSpec(cls.kind, "m.onnx", "onnx", None, {**data, "method": cls.method_name})
    method, config, _ = resolve_method(spec)
    assert method.config_cls is cls and isinstance(config, cls)
    return config


def test_every_method_has_one_config_and_one_handler():
    """Adding a method is one config class (app/methods) and one handler registered for it: neither alone."""
    handlers = {(m.kind, m.name): m.config_cls for m in all_methods()}
    assert handlers == registered_configs()


def test_defaults_fill_missing_keys():
    config = parse(StaticInt8Config, {})
    assert config.model_dump(mode="json") == {
        "method": "static_int8",
        "benchmark": {"batch_sizes": [1, 64], "repeats": 50, "warmup": 5},
        "max_accuracy_drop": 0.01,
        "output_format": None,
        "per_channel": True,
        "calibration": {"samples": 512, "method": "minmax"},
    }


def test_overrides_are_applied_and_nested_defaults_kept():
    config = parse(StaticInt8Config, 
        {
            "per_channel": False,
            "calibration": {"method": "entropy"},
            "benchmark": {"repeats": 7},
            "max_accuracy_drop": 0,
        }
    )
    assert config.per_channel is False
    assert config.calibration.method == "entropy" and config.calibration.samples == 512
    assert config.benchmark.repeats == 7 and config.benchmark.batch_sizes == [1, 64]
    assert config.max_accuracy_drop == 0.0 and isinstance(config.max_accuracy_drop, float)


def test_unknown_keys_are_refused_and_shared_keys_accepted():
    """The engine reads the API's schema: a key the API would refuse is refused here too, naming it."""
    assert parse(DynamicInt8Config, {"calibration": {"samples": 3}}).calibration.samples == 3
    with pytest.raises(EngineError, match="extra") as excinfo:
        parse(DynamicInt8Config, {"extra": 1})
    assert excinfo.value.code == "unsupported"


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
        parse(StaticInt8Config, data)
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
    config = parse(ChannelsConfig, {"fine_tune": None, "output_format": None})
    assert config.fine_tune is None and config.output_format is None
    config = parse(ChannelsConfig, {"fine_tune": {"epochs": 3}, "output_format": "torchscript"})
    assert config.fine_tune == FineTuneConfig(epochs=3, lr=0.001, distill=True)
    assert config.model_dump()["fine_tune"] == {"epochs": 3, "lr": 0.001, "distill": True}


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
        parse(cls, data)
    assert excinfo.value.code == "unsupported"


def test_engine_is_a_plain_library():
    """Importing the engine pulls in no web, queue or database code (it runs in a bare child process); of the
    service's package it reads only the method configs (app/methods), which are plain pydantic."""
    import subprocess
    import sys

    code = (
        "import sys, worker.engine\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('fastapi', 'sqlalchemy', 'celery', 'redis')\n"
        "             or m.startswith('app.') and not m.startswith('app.methods') and m not in\n"
        "             ('app.core', 'app.core.ids', 'app.models', 'app.models.torchscript_source'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[3])
