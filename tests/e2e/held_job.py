"""A job plugin (DISTILLERY_JOB_PLUGINS) loaded by every test worker: jobs that run exactly as long as a test wants.

Tests that act while a job runs (cancel it, kill its worker, let it hit a limit, cut the database under it) used to
make a real job slow by raising its benchmark repeats, which took minutes and still depended on the machine's
speed. A model whose bytes carry one of these markers runs instead as:

- HOLD: a job that reports progress 0.5 and then waits until its worker stops it (a cancel, a time or memory
  limit, the worker's death). It never finishes by itself.
- GATE: a job that reports progress 0.5 and waits until the test releases it (`release(settings)` writes the file
  `release` into the work folder of every job process held at a gate), then runs the real job with its real
  config.

Both report the stage `held by the test` while they wait. Models without a marker run normally.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import worker.engine as engine

HOLD = b"distillery-test-hold-until-stopped"
GATE = b"distillery-test-hold-until-released"
STAGE = "held by the test"
RELEASE = "release"
HELD = "held"

_real_run_job = engine.run_job


def run_job(spec, ctx):
    data = Path(spec.model_path).read_bytes()
    if HOLD in data:
        ctx.progress(0.5, STAGE)
        threading.Event().wait()
    if GATE in data:
        (Path(ctx.work_dir) / HELD).touch()
        ctx.progress(0.5, STAGE)
        released = Path(ctx.work_dir) / RELEASE
        while not released.exists():  # the test writes it from outside the sandbox
            time.sleep(0.05)
    return _real_run_job(spec, ctx)


if __name__.startswith("distillery_plugin_"):  # imported as a plugin, not by the tests for its constants
    engine.run_job = run_job


def held_model_bytes(marker: bytes, **kw) -> bytes:
    """The tests' MLP (tests/helpers.py) as ONNX, marked to run as a held job."""
    import onnx

    from tests.helpers import mlp_onnx_bytes

    model = onnx.load_from_string(mlp_onnx_bytes(**kw))
    model.doc_string = marker.decode()
    return model.SerializeToString()


def release(settings) -> int:
    """Release every gated job waiting in the job processes of the workers using `settings`' data folder (only
    those: a process started ahead for the next job is left alone); how many were released."""
    n = 0
    for held in Path(settings.data_dir).glob(f"jobs/*/*/work/{HELD}"):
        (held.parent / RELEASE).touch()
        n += 1
    return n
