"""Findings of a security attack run, refused again by the engine itself (defence in depth: a file that reached the
worker without the API's checks). One test per finding; the upload / submission side is
tests/app/test_attack_inspect.py, whose builders make the same files here.

- 11: ONNX external data in a function's attribute default or a nested subgraph: `load_onnx_model` refuses it.
- 12: TorchScript code that calls file operators: `load_torchscript` refuses it (a textual check before
  torch.jit.load, then the compiled graph of every method), and `check_torchscript_code` alone refuses the loaded or
  scripted module, naming the operator and the method; archives with two root folders are refused before loading;
  ordinary models load.
- 13: labels past the model's outputs are invalid_dataset when the dataset is loaded with the model's output
  count, and running out of memory while loading the dataset is a MemoryError (the job runner reports
  out_of_memory), not invalid_dataset.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch
from numpy.lib import format as npformat

from tests.app.test_attack_inspect import (
    EXTERNAL_ONNX,
    FromFile,
    Save,
    SaveInLoop,
    ordinary_models,
    scripted,
    torchscript_bytes,
    two_roots,
)
from worker.engine import EngineError
from worker.engine.data import TensorSpec, check_labels_fit, load_dataset, load_job_dataset, output_classes
from worker.engine.onnx_io import load_onnx_model
from worker.engine.torch_io import check_torchscript_code, denied_operators, load_torchscript

from .conftest import make_mlp

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def refused(load, *args, **kwargs) -> EngineError:
    with pytest.raises(EngineError) as excinfo:
        load(*args, **kwargs)
    return excinfo.value


# --------------------------------------------------------------------------- 11


@pytest.mark.parametrize("name", list(EXTERNAL_ONNX))
def test_onnx_loader_refuses_external_data_anywhere(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # a relative location would resolve here
    path = tmp_path / "model.onnx"
    path.write_bytes(EXTERNAL_ONNX[name]())
    error = refused(load_onnx_model, path)
    assert error.code == "invalid_model" and "external data" in error.message
    assert load_onnx_model(make_mlp(tmp_path / "fine.onnx")).inputs  # a self-contained model still loads


# --------------------------------------------------------------------------- 12


class Hooked(torch.nn.Module):
    """The call is in a forward hook of a submodule."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)
        self.fc.register_forward_hook(_save_hook)

    def forward(self, x):
        return self.fc(x)


def _save_hook(module: torch.nn.Module, inputs: Tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
    torch.save(output, "/tmp/distillery-attack-hook.pt")
    return output


@torch.jit.script
def _read_file(x: torch.Tensor) -> torch.Tensor:
    return x + torch.from_file("/tmp/distillery-attack-fn", shared=True, size=4).sum()


class CallsFunction(torch.nn.Module):
    """The call is in a function a submodule's exported method calls, inside a branch."""

    def __init__(self):
        super().__init__()
        self.inner = _Inner()

    def forward(self, x):
        return self.inner.helper(x)


class _Inner(torch.nn.Module):
    def forward(self, x):
        return x

    @torch.jit.export
    def helper(self, x: torch.Tensor) -> torch.Tensor:
        if bool(x.sum() > 0):
            return _read_file(x)
        return x


class Forked(torch.nn.Module):
    """The call is in a function run by torch.jit.fork (a subgraph attribute, not a block)."""

    def forward(self, x):
        return torch.jit.wait(torch.jit.fork(_read_file, x))


EVIL = {  # module class -> (operator, where the graph check finds it)
    FromFile: ("aten::from_file", "method forward"),
    Save: ("aten::save", "method forward"),
    SaveInLoop: ("aten::save", "method"),
    Hooked: ("aten::save", "method forward"),
    CallsFunction: ("aten::from_file", "method"),
    Forked: ("aten::from_file", "method forward"),
}


def test_torchscript_loader_refuses_file_operators_and_two_roots_and_loads_ordinary_models(tmp_path):
    print("TorchScript deny list:", sorted(denied_operators()))
    assert {"aten::from_file", "aten::save"} <= denied_operators()

    for cls, (operator, where) in EVIL.items():
        module = scripted(cls)
        path = tmp_path / f"{cls.__name__}.pt"
        path.write_bytes(torchscript_bytes(module))
        error = refused(load_torchscript, path)
        assert error.code == "invalid_model" and f"calls {operator}, which is not allowed" in error.message, error

        # the authoritative check, on the compiled graphs: of the scripted module, and of the file loaded directly
        for loaded in (module, torch.jit.load(str(path))):
            error = refused(check_torchscript_code, loaded)
            assert error.code == "invalid_model" and f"calls {operator}, which is not allowed" in error.message
            assert where in error.message, error.message

    # __setstate__ runs inside torch.jit.load (the payload is live): the textual check before loading stops it
    target = tmp_path / "written-at-load.pt"
    setstate = tmp_path / "setstate.pt"
    setstate.write_bytes(torchscript_bytes(torch.jit.script(SetStateWriter(str(target)))))
    assert not target.exists()
    torch.jit.load(str(setstate))
    assert target.exists()
    target.unlink()
    assert "aten::save" in refused(load_torchscript, setstate).message
    assert not target.exists()

    benign = torchscript_bytes(ordinary_models()["mlp_scripted"])
    two = tmp_path / "two.pt"
    two.write_bytes(two_roots(benign, torchscript_bytes(scripted(Save))))
    assert "2 root folders" in refused(load_torchscript, two).message
    reversed_roots = tmp_path / "two_reversed.pt"
    reversed_roots.write_bytes(two_roots(torchscript_bytes(scripted(Save)), benign))
    assert "2 root folders" in refused(load_torchscript, reversed_roots).message
    twice = tmp_path / "twice.pt"
    twice.write_bytes(benign)
    with zipfile.ZipFile(twice, "a") as archive:
        archive.writestr(next(n for n in archive.namelist() if n.endswith("/data.pkl")), b"")
    assert "more than once" in refused(load_torchscript, twice).message

    x = torch.randn(2, 1, 8, 8)
    for name, module in ordinary_models().items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(torchscript_bytes(module))
        loaded = load_torchscript(path)
        check_torchscript_code(module)
        torch.testing.assert_close(loaded(x), module(x))


class SetStateWriter(torch.nn.Module):
    """Its __setstate__, which torch.jit.load runs while unpickling, writes a file."""

    def __init__(self, target: str):
        super().__init__()
        self.w = torch.ones(2)
        self.target = target

    def forward(self, x):
        return x * self.w

    @torch.jit.export
    def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
        return (self.w, self.target, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
        self.w = state[0]
        self.target = state[1]
        self.training = state[2]
        torch.save(self.w, self.target)


# --------------------------------------------------------------------------- 13


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def test_labels_past_the_outputs_are_invalid_and_memory_errors_are_not_dataset_errors(tmp_path, run):
    spec = (TensorSpec("x", ("batch", 4), np.dtype("float32")),)
    x = np.random.default_rng(0).random((10, 4), dtype=np.float32)
    labels = np.array([0, 1, 2, 10**12, 1, 0, 2, 1, 0, 1], np.int64)
    path = _npz(tmp_path / "huge_labels.npz", x=x, y=labels)

    assert output_classes((TensorSpec("logits", ("batch", 3), np.dtype("float32")),)) == 3
    assert output_classes((TensorSpec("logits", ("batch", "classes"), np.dtype("float32")),)) is None
    error = refused(load_dataset, path, spec, classes=3)
    assert error.code == "invalid_dataset"
    assert str(10**12) in error.message and "3 outputs" in error.message
    assert refused(load_job_dataset, path, None, spec, classes=3).code == "invalid_dataset"
    assert load_dataset(path, spec).train.x["x"].shape[1:] == (4,)  # without the output count: not checked here
    fine = load_dataset(_npz(tmp_path / "fine.npz", x=x, y=labels % 3), spec, classes=3)
    check_labels_fit(fine, 3)
    assert "negative label" in refused(check_labels_fit, load_dataset(
        _npz(tmp_path / "negative.npz", x=x, y=-labels), spec), 3).message

    # an array whose header declares 2**46 rows (256 TiB): loading it is a MemoryError, not invalid_dataset
    huge = tmp_path / "huge_rows.npz"
    with zipfile.ZipFile(huge, "w") as archive:
        header = io.BytesIO()
        npformat.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**46, 16)})
        archive.writestr("x.npy", header.getvalue() + bytes(64))
    with pytest.raises(MemoryError):
        load_dataset(huge, (TensorSpec("x", ("batch", 16), np.dtype("float32")),))
    model = make_mlp(tmp_path / "mlp.onnx")
    two_inputs = tmp_path / "huge_two.npz"
    with zipfile.ZipFile(two_inputs, "w") as archive:
        for name, width in (("a", 6), ("b", 10)):
            header = io.BytesIO()
            npformat.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False, "shape": (2**46, width)})
            archive.writestr(f"{name}.npy", header.getvalue() + bytes(64))
    with pytest.raises(MemoryError):  # through run_job: the job runner reports it as out_of_memory
        run(model, {"method": "dynamic_int8"}, two_inputs)
