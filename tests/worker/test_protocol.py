"""The worker believes nothing a job process says: its report pipe is bounded and validated, and its artifact is
read only from one fixed name, as a regular file with no other name, within the disk limit."""
from __future__ import annotations

import json
import os
import queue
import threading
from pathlib import Path

import pytest

from worker import protocol, sandbox
from worker.supervisor import open_artifact


def _read(payload: bytes, **limits) -> list:
    """What the supervisor's reader makes of `payload` written to a job's report pipe."""
    read_fd, write_fd = os.pipe()
    out: queue.Queue = queue.Queue()
    reader = threading.Thread(target=protocol.ReportReader(read_fd, out, **limits).run)
    reader.start()
    written = [0]

    def write() -> None:
        try:
            view = memoryview(payload)
            while written[0] < len(view):
                written[0] += os.write(write_fd, view[written[0]:written[0] + 65536])
        except BrokenPipeError:
            pass  # the reader stopped reading: what a runaway child meets
        finally:
            os.close(write_fd)

    writer = threading.Thread(target=write)
    writer.start()
    reader.join(30)
    writer.join(30)
    messages = []
    while (msg := out.get(timeout=5)) is not None:
        messages.append(msg)
    messages.append(written[0])
    return messages


def _line(**msg) -> bytes:
    return (json.dumps(msg) + "\n").encode()


def test_a_well_formed_report_is_read_in_order():
    payload = (_line(type="device", device="cpu") + _line(type="progress", progress=0.5, stage="measuring")
               + _line(type="result", artifact_format="onnx", metrics={"ratios": {"size_bytes": 0.26}}))
    *messages, _ = _read(payload)
    assert [type(m) for m in messages] == [protocol.Device, protocol.Progress, protocol.Result]
    assert messages[2].metrics == {"ratios": {"size_bytes": 0.26}}


def test_a_newline_free_flood_is_cut_off_at_the_line_limit():
    """The attack run's 700 MB line grew the worker by 460 MB; now reading stops at the bound."""
    flood = b"x" * (64 * 1024 * 1024)
    *messages, written = _read(flood)
    assert len(messages) == 1 and isinstance(messages[0], protocol.Violation)
    assert "longer than" in str(messages[0])
    assert written < len(flood)  # the reader stopped reading; the rest was never taken in


def test_too_many_lines_is_a_violation():
    *messages, _ = _read(_line(type="progress", progress=0.1, stage="s") * 50, max_lines=20)
    assert isinstance(messages[-1], protocol.Violation) and "more than 20" in str(messages[-1])
    assert len(messages) == 21


@pytest.mark.parametrize("line, needle", [
    (b"not json\n", "invalid report line"),
    (_line(type="result", artifact_path="/proc/self/environ", artifact_format="onnx", metrics={}), "artifact_path"),
    (_line(type="result", artifact_format="exe", metrics={}), "artifact_format"),
    (_line(type="progress", progress=float("nan"), stage="s"), "progress"),
    (_line(type="progress", progress=3.0, stage="s"), "progress"),
    (_line(type="progress", progress=0.5, stage="s" * 10_000), "stage"),
    (_line(type="device", device="cpu; rm -rf /"), "device"),
    (_line(type="result", artifact_format="onnx", metrics={"a": float("inf")}), "non-finite"),
    (_line(type="result", artifact_format="onnx", metrics={"x": "y" * 50_000}), "longer than"),
    (b'{"type": "result", "artifact_format": "onnx", "metrics": ' + b'{"a": ' * 40 + b"1" + b"}" * 41 + b"\n",
     "nest"),
    (_line(type="shell", command="id"), "invalid report line"),
])
def test_malformed_or_forged_lines_are_violations(line, needle):
    *messages, _ = _read(line)
    assert len(messages) == 1 and isinstance(messages[0], protocol.Violation), messages
    assert needle in str(messages[0])


def test_nothing_may_follow_the_result():
    ok = _line(type="result", artifact_format="onnx", metrics={})
    *messages, _ = _read(ok + _line(type="result", artifact_format="onnx", metrics={"forged": 1}))
    assert isinstance(messages[0], protocol.Result) and isinstance(messages[1], protocol.Violation)


def test_a_child_failure_cannot_choose_its_code_or_a_retry():
    forged = protocol.Failure(type="error", code="cancelled", message="x", transient=True)
    assert forged.recorded_code() == "engine_error" and not forged.recorded_transient()
    broken = protocol.Failure(type="error", code="engine_unavailable", message="x", transient=True)
    assert broken.recorded_code() == "engine_unavailable" and broken.recorded_transient()


@pytest.fixture
def folder(tmp_path) -> sandbox.JobFolder:
    return sandbox.JobFolder.create(tmp_path)


def test_the_artifact_is_read_from_its_fixed_name(folder):
    (folder.work / sandbox.ARTIFACT_NAME).write_bytes(b"onnx bytes")
    with open_artifact(folder, 1024) as f:
        assert f.read() == b"onnx bytes"


@pytest.mark.parametrize("make, needle", [
    (lambda a, tmp: None, "no artifact"),
    (lambda a, tmp: a.symlink_to("/proc/self/environ"), "symbolic link"),
    (lambda a, tmp: os.mkfifo(a), "not a regular file"),
    (lambda a, tmp: a.mkdir(), "not a regular file"),
    (lambda a, tmp: [(tmp / "elsewhere").write_bytes(b"x"), os.link(tmp / "elsewhere", a)], "other names"),
    (lambda a, tmp: os.truncate(os.open(a, os.O_CREAT | os.O_WRONLY), 4096), "larger than"),
    (lambda a, tmp: a.write_bytes(b""), "empty"),
])
def test_an_artifact_that_is_not_a_plain_file_of_its_own_is_refused(folder, tmp_path, make, needle):
    make(folder.work / sandbox.ARTIFACT_NAME, tmp_path)
    with pytest.raises(ValueError, match=needle):
        open_artifact(folder, 1024)


def test_the_job_input_is_bounded_and_typed():
    ok = protocol.JobInput(kind="quantize", model_path="/x/in/model", model_format="onnx")
    assert protocol.JobInput.model_validate_json(ok.model_dump_json()) == ok
    with pytest.raises(ValueError):
        protocol.JobInput.model_validate_json(json.dumps({"kind": "quantize", "model_path": 1,
                                                          "model_format": "onnx"}))
    assert Path(ok.model_path).name == "model"
