"""Knowledge distillation: a small student learns from an ONNX teacher on digits, with and without labels, with
early stopping, a feature (hint) loss, a labels-only comparison, and the teacher's own architecture shrunk."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from worker.engine import EngineError, JobSpec, RunContext, run_job
from worker.engine import distill as _distill  # noqa: F401  (registers the distill method)
from worker.engine.builtin import load_builtin_arrays
from app.methods import DistillConfig
from worker.engine.api import parse_method_config
from worker.engine.registry import find_method
from worker.engine.students import build_cnn, build_mlp
from worker.engine.torch_io import count_weights
from worker.engine.train import TrainData, TrainSettings, evaluate, kd_loss, train_student

from .conftest import FAST_BENCHMARK

CPU = ["CPUExecutionProvider"]
#: Settings under which a 2,410-parameter MLP learns digits in a few epochs (min_steps 0: exactly `epochs`).
QUICK = {"epochs": 5, "lr": 0.01, "batch_size": 32, "min_steps": 0, "benchmark": FAST_BENCHMARK}
SMALL_MLP = {"arch": "mlp", "hidden": [32]}


def parse(config: dict) -> DistillConfig:
    """The engine's reading of a distill config (EngineError("unsupported") when it is bad)."""
    return parse_method_config(find_method("distill", None), config)


@pytest.fixture(scope="module")
def digits():
    return load_builtin_arrays("digits")


@pytest.fixture(scope="module")
def teacher(digits, tmp_path_factory) -> dict:
    """A flat-input MLP teacher (64-256-128-10, 50,826 params) trained on digits, exported to ONNX, and the data
    as .npz files: labelled (x, y, x_test, y_test, flat) and unlabelled (x only)."""
    import torch

    from worker.examples import export_onnx

    out = tmp_path_factory.mktemp("teacher")
    x_train = digits.x_train.reshape(-1, 64)
    x_test = digits.x_test.reshape(-1, 64)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10)
    )
    train_student(model, TrainData([x_train], digits.y_train), TrainSettings(epochs=15, lr=3e-3, batch_size=64),
                  RunContext("cpu", out))
    accuracy = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == digits.y_test).mean())
    path = export_onnx(model.eval(), out / "teacher.onnx", x_test[:2])
    np.savez(out / "digits.npz", x=x_train, y=digits.y_train, x_test=x_test, y_test=digits.y_test)
    np.savez(out / "unlabelled.npz", x=x_train, x_test=x_test)
    return {"onnx": path, "npz": out / "digits.npz", "unlabelled": out / "unlabelled.npz", "accuracy": accuracy,
            "params": count_weights(model), "x_test": x_test}


class Jobs:
    def __init__(self, tmp_path: Path):
        self.tmp_path, self.count, self.progress = tmp_path, 0, []

    def __call__(self, model, config, dataset=None, *, builtin=None, model_format="onnx", student_path=None,
                 student_format=None, is_cancelled=lambda: False):
        self.count += 1
        work = self.tmp_path / f"work{self.count}"
        work.mkdir()
        self.progress = []
        ctx = RunContext("cpu", work, progress=lambda p, s: self.progress.append((p, s)), is_cancelled=is_cancelled)
        spec = JobSpec("distill", Path(model), model_format, dataset, config, builtin_dataset=builtin,
                       student_model_path=student_path, student_model_format=student_format)
        return run_job(spec, ctx)


@pytest.fixture
def jobs(tmp_path) -> Jobs:
    return Jobs(tmp_path)


def test_teacher_is_accurate(teacher):
    assert teacher["accuracy"] > 0.95 and teacher["params"] == 50826


def test_kd_into_a_quarter_size_mlp_is_accurate(jobs, teacher):
    result = jobs(teacher["onnx"], {"student": SMALL_MLP, **QUICK}, teacher["npz"])
    m = result.metrics
    json.dumps(m, allow_nan=False)
    method = m["method"]
    assert method["name"] == "kd" and method["labels_used"] is True
    assert method["params"]["student"] == 2410 and method["params"]["student"] <= teacher["params"] / 4
    assert method["params"]["ratio"] < 0.05 and m["ratios"]["params"] < 0.05
    assert m["result"]["accuracy"] >= 0.85 and m["result"]["agreement"] >= 0.85
    assert m["baseline"]["accuracy"] == pytest.approx(teacher["accuracy"], abs=1e-6)
    assert method["epochs_run"] == 5 and [p["epoch"] for p in method["curve"]] == [1, 2, 3, 4, 5]
    assert method["curve"][-1]["train_loss"] < method["curve"][0]["train_loss"]
    assert method["loss"] == "0.7 * KD(T=4) + 0.3 * CE" and method["best_epoch"] == 5
    assert m["config"]["student"] == SMALL_MLP and m["config"]["temperature"] == 4.0
    # progress: monotonic, with one stage per epoch
    values = [p for p, _ in jobs.progress]
    assert values == sorted(values) and values[-1] == 1.0
    assert {f"distilling: epoch {e}/5" for e in range(1, 6)} <= {s for _, s in jobs.progress}
    # the artifact loads back and runs on its own
    assert result.artifact_format == "onnx" and result.artifact_path.suffix == ".onnx"
    session = ort.InferenceSession(str(result.artifact_path), providers=CPU)
    out = session.run(None, {session.get_inputs()[0].name: teacher["x_test"][:7]})[0]
    assert out.shape == (7, 10)


def test_kd_is_seeded(jobs, teacher):
    a = jobs(teacher["onnx"], {"student": SMALL_MLP, **QUICK, "epochs": 2}, teacher["npz"])
    b = jobs(teacher["onnx"], {"student": SMALL_MLP, **QUICK, "epochs": 2}, teacher["npz"])
    assert a.metrics["method"]["curve"] == b.metrics["method"]["curve"]
    assert a.metrics["result"]["accuracy"] == b.metrics["result"]["accuracy"]


def test_an_unlabelled_transfer_set_uses_soft_targets_only(jobs, teacher):
    m = jobs(teacher["onnx"], {"student": SMALL_MLP, **QUICK}, teacher["unlabelled"]).metrics
    assert m["method"]["labels_used"] is False and "soft targets only" in m["method"]["loss"]
    assert "train_accuracy" not in m["method"]["curve"][0]
    assert m["evaluation"]["labels"] is False and "accuracy" not in m["result"]
    assert m["result"]["agreement"] >= 0.85


def test_compare_baseline_reports_both_students(jobs, teacher):
    m = jobs(teacher["onnx"], {"student": SMALL_MLP, **QUICK, "compare_baseline": True}, teacher["npz"]).metrics
    method = m["method"]
    comparison = method["comparison"]
    assert 0.8 <= comparison["kd"] <= 1.0 and 0.8 <= comparison["labels_only"] <= 1.0
    assert comparison["delta"] == pytest.approx(comparison["kd"] - comparison["labels_only"], abs=1e-6)
    assert comparison["labels_only_epochs_run"] == 5 and len(comparison["labels_only_curve"]) == 5
    assert comparison["split"] == "test" and comparison["chosen_on"] == "validation"
    # both students trained on the same 90%; the held-out 10% chose the artifact
    assert method["validation_rows"] == comparison["validation"]["rows"] == 144 and method["train_rows"] == 1293
    validation = comparison["validation"]
    expected = "labels_only" if validation["labels_only"] > validation["kd"] else "kd"
    assert comparison["kept"] == method["kept_student"] == expected
    assert "validation rows" in comparison["kept_reason"]
    # the artifact is the kept student: the report's own measurement of it gives that student's test accuracy
    assert m["result"]["accuracy"] == pytest.approx(comparison[comparison["kept"]], abs=1e-6)


@pytest.fixture(scope="module")
def random_teacher(digits, tmp_path_factory) -> Path:
    """A confident teacher that knows nothing: the teacher MLP's shape with random weights, logits scaled up."""
    import torch

    from worker.examples import export_onnx

    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    with torch.no_grad():
        model[2].weight.mul_(20.0)
    out = tmp_path_factory.mktemp("random_teacher")
    return export_onnx(model.eval(), out / "random.onnx", digits.x_test.reshape(-1, 64)[:2])


def test_compare_baseline_keeps_the_labels_only_student_when_the_teacher_is_useless(jobs, teacher, random_teacher):
    config = {"student": SMALL_MLP, **QUICK, "alpha": 0.9, "compare_baseline": True}
    result = jobs(random_teacher, config, teacher["npz"])
    m = result.metrics
    comparison = m["method"]["comparison"]
    assert m["baseline"]["accuracy"] < 0.3  # the teacher is no better than a guess
    assert comparison["validation"]["labels_only"] > comparison["validation"]["kd"]
    assert comparison["kept"] == "labels_only" and m["method"]["kept_student"] == "labels_only"
    assert comparison["kept_reason"].startswith("the labels-only student was right on more validation rows")
    assert comparison["labels_only"] > comparison["kd"] and comparison["delta"] < 0
    assert m["result"]["accuracy"] == pytest.approx(comparison["labels_only"], abs=1e-6)
    assert m["result"]["accuracy"] > 0.85
    assert any("trained on labels alone" in note for note in m["notes"])
    session = ort.InferenceSession(str(result.artifact_path), providers=CPU)
    assert session.run(None, {session.get_inputs()[0].name: teacher["x_test"][:3]})[0].shape == (3, 10)


def test_choose_student_prefers_validation_accuracy_and_the_distilled_student_on_a_tie():
    from worker.engine.distill import choose_student

    assert choose_student(0.9, 0.95, 100) == (
        "labels_only", "the labels-only student was right on more validation rows than the distilled one: "
                       "95/100 (95.0%) vs 90/100 (90.0%)")
    kept, reason = choose_student(0.97, 0.96, 100)
    assert kept == "kd" and "97/100 (97.0%) vs 96/100 (96.0%)" in reason
    kept, reason = choose_student(0.5, 0.5, 10)
    assert kept == "kd" and reason == ("both students were right on 5/10 (50.0%) validation rows; on a tie the "
                                       "distilled student is kept")


def test_min_steps_adds_epochs_to_a_short_run(digits):
    import torch

    x = digits.x_train.reshape(-1, 64)[:100]
    train = TrainData([x], digits.y_train[:100])
    torch.manual_seed(0)
    # 100 rows at batch 32: 4 steps an epoch (the last of 4 rows); 2 epochs are 8 steps, min_steps 22 needs 6 epochs
    settings = TrainSettings(epochs=2, batch_size=32, min_steps=22)
    report = train_student(build_mlp(64, (8,), 10), train, settings, RunContext("cpu", Path(".")))
    assert (report.steps_per_epoch, report.epochs_planned, report.epochs_run, report.steps) == (4, 6, 6, 24)
    assert [p["epoch"] for p in report.curve] == list(range(1, 7))
    # enough epochs already: min_steps changes nothing; 0 turns it off
    for min_steps in (8, 0, 1):
        torch.manual_seed(0)
        settings = TrainSettings(epochs=2, batch_size=32, min_steps=min_steps)
        report = train_student(build_mlp(64, (8,), 10), train, settings, RunContext("cpu", Path(".")))
        assert (report.epochs_planned, report.steps) == (2, 8)


def test_a_long_run_over_a_tiny_set_keeps_a_short_curve(digits):
    import torch

    from worker.engine.train import MAX_CURVE_POINTS

    x = digits.x_train.reshape(-1, 64)[:20]
    train = TrainData([x], digits.y_train[:20])
    torch.manual_seed(0)
    # 20 rows at batch 32: one step an epoch, so min_steps 450 means 450 epochs; the curve keeps every 3rd
    report = train_student(build_mlp(64, (4,), 10), train, TrainSettings(epochs=1, batch_size=32, min_steps=450),
                           RunContext("cpu", Path(".")))
    assert report.epochs_run == report.best_epoch == report.steps == 450
    epochs = [p["epoch"] for p in report.curve]
    assert len(epochs) <= MAX_CURVE_POINTS and epochs[:2] == [3, 6] and epochs[-1] == 450


def test_min_steps_in_a_job_is_reported(jobs, teacher):
    config = {"student": SMALL_MLP, **QUICK, "epochs": 1, "batch_size": 64, "train_samples": 200, "min_steps": 10}
    m = jobs(teacher["onnx"], config, teacher["npz"]).metrics
    method = m["method"]
    # 200 rows at batch 64: 4 steps an epoch (the last of 8 rows), so 3 epochs reach 10 steps
    assert method["epochs"] == 1 and method["min_steps"] == 10 and method["steps_per_epoch"] == 4
    assert method["epochs_planned"] == method["epochs_run"] == 3 and method["steps"] == 12
    assert any("fewer than min_steps 10" in note for note in m["notes"])
    assert "distilling: epoch 3/3" in {stage for _, stage in jobs.progress}
    assert all(p == round(p, 3) for p, _ in jobs.progress)


def test_default_min_steps_trains_the_guide_example_long_enough():
    config = parse({"student": {"arch": "cnn", "channels": [8, 16]}})
    assert config.min_steps == 1000 and config.epochs == 10
    # 10 epochs of the 1,437-row example at batch 128 are 120 steps: the default raises that to 1,008
    from worker.engine.train import _steps_per_epoch, planned_epochs

    steps = _steps_per_epoch(1437, config.batch_size)
    assert steps == 12 and planned_epochs(config.epochs, steps, config.min_steps) * steps == 1008


def test_compare_baseline_needs_labels(jobs, teacher):
    with pytest.raises(EngineError) as excinfo:
        jobs(teacher["onnx"], {"student": SMALL_MLP, **QUICK, "compare_baseline": True}, teacher["unlabelled"])
    assert excinfo.value.code == "invalid_dataset"


def test_early_stopping_stops_and_restores_the_best_weights(digits):
    import torch

    rng = np.random.default_rng(0)
    x = digits.x_train.reshape(-1, 64)
    train = TrainData([x[:1000]], digits.y_train[:1000])
    # Validation labels that are mostly noise: the score wanders, so training stops after `patience` flat epochs.
    noisy = np.where(rng.random(437) < 0.5, rng.integers(0, 10, 437), digits.y_train[1000:])
    val = TrainData([x[1000:]], noisy)
    torch.manual_seed(0)
    student = build_mlp(64, (16,), 10)
    settings = TrainSettings(epochs=40, lr=0.02, batch_size=64, lr_schedule="constant", patience=2)
    report = train_student(student, train, settings, RunContext("cpu", Path(".")), val=val)
    assert report.stopped_early and report.epochs_run < 40
    assert report.epochs_run == report.best_epoch + 2
    best = report.curve[report.best_epoch - 1]["val_accuracy"]
    assert best == max(p["val_accuracy"] for p in report.curve)
    assert evaluate(student, val)["val_accuracy"] == best  # the best epoch's weights, not the last one's


def test_early_stopping_in_a_job_holds_out_a_validation_split(jobs, teacher):
    config = {"student": SMALL_MLP, **QUICK, "epochs": 30, "lr": 1e-6, "lr_schedule": "constant",
              "early_stopping": {"patience": 2}}
    method = jobs(teacher["onnx"], config, teacher["npz"]).metrics["method"]
    assert method["validation_rows"] == 144 and method["train_rows"] == 1293
    assert method["stopped_early"] is True and method["restored_best"] is True
    assert method["epochs_run"] == method["best_epoch"] + 2 < 30
    assert {"val_accuracy", "val_agreement", "train_loss"} <= set(method["curve"][0])
    assert method["teacher"]["val_accuracy"] > 0.9


def test_feature_loss_trains_a_projection(jobs, teacher):
    config = {"student": SMALL_MLP, **QUICK, "feature_loss": {"beta": 0.1}}
    m = jobs(teacher["onnx"], config, teacher["npz"]).metrics
    feature = m["method"]["feature_loss"]
    # the default layer: the input of the teacher's last Gemm (its 128 penultimate features)
    assert feature["teacher_dim"] == 128 and feature["student_dim"] == 32 and feature["learned"] is True
    assert feature["teacher_layer"] and feature["beta"] == 0.1
    assert "feature MSE" in m["method"]["loss"]
    assert m["result"]["accuracy"] >= 0.8
    assert m["result"]["params"] < 3000  # the projection is not part of the student


def test_feature_loss_with_an_unknown_layer_is_unsupported(jobs, teacher):
    with pytest.raises(EngineError) as excinfo:
        jobs(teacher["onnx"], {"student": SMALL_MLP, **QUICK, "feature_loss": {"teacher_layer": "nope"}},
             teacher["npz"])
    assert excinfo.value.code == "unsupported" and "'nope'" in excinfo.value.message


def test_cnn_student_of_the_example_cnn(jobs, example):
    config = {"student": {"arch": "cnn", "channels": [8, 16], "hidden": [32]}, **QUICK}
    m = jobs(example["onnx"], config, Path(example["dataset"])).metrics
    student = m["method"]["student"]
    assert student["kind"] == "cnn" and student["input"] == [1, 8, 8]
    assert m["method"]["params"]["ratio"] < 0.1
    assert m["result"]["accuracy"] >= 0.85


def test_distill_needs_a_dataset(jobs, teacher):
    with pytest.raises(EngineError) as excinfo:
        jobs(teacher["onnx"], {"student": SMALL_MLP, **QUICK})
    assert (excinfo.value.code, excinfo.value.message) == ("invalid_dataset", "distill needs a transfer dataset")


def test_cancellation_stops_training(jobs, teacher):
    calls = []

    def cancelled() -> bool:
        calls.append(1)
        return any("epoch 2/" in stage for _, stage in jobs.progress)

    with pytest.raises(EngineError) as excinfo:
        jobs(teacher["onnx"], {"student": SMALL_MLP, **QUICK}, teacher["npz"], is_cancelled=cancelled)
    assert excinfo.value.code == "cancelled"


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"student": {}},
        {"student": {"arch": "transformer"}},
        {"student": {"arch": "mlp", "hidden": []}},
        {"student": {"shrink": 1.5}},
        {"student": SMALL_MLP, "temperature": 0},
        {"student": SMALL_MLP, "alpha": 2},
        {"student": SMALL_MLP, "optimizer": "lbfgs"},
        {"student": SMALL_MLP, "early_stopping": {"patience": 0}},
        {"student": SMALL_MLP, "min_steps": -1},
        {"student": SMALL_MLP, "min_steps": 10**7},
    ],
)
def test_bad_configs_are_unsupported(config):
    with pytest.raises(EngineError) as excinfo:
        parse(config)
    assert excinfo.value.code == "unsupported"


def test_config_defaults_and_nullable_sections():
    config = parse({"student": {"arch": "cnn"}, "early_stopping": None, "feature_loss": None, "output_format": None})
    d = config.model_dump(mode="json")
    assert d["student"] == {"arch": "cnn", "channels": [16, 32], "hidden": [64]}
    assert {k: d[k] for k in ("temperature", "alpha", "epochs", "batch_size", "lr", "optimizer", "lr_schedule",
                              "seed", "early_stopping", "compare_baseline", "feature_loss")} == {
        "temperature": 4.0, "alpha": 0.7, "epochs": 10, "batch_size": 128, "lr": 0.003, "optimizer": "adam",
        "lr_schedule": "cosine", "seed": 0, "early_stopping": None, "compare_baseline": False, "feature_loss": None}
    assert d["min_steps"] == 1000 and d["train_samples"] == 0
    assert parse({"student": {"arch": "mlp"}}).student.hidden == [256, 128]
    full = parse({"student": {"shrink": 0.5}, "early_stopping": {}, "feature_loss": {"teacher_layer": None}})
    assert full.early_stopping.patience == 3 and full.feature_loss.beta == 0.5
    assert full.feature_loss.teacher_layer is None and full.model_dump()["student"] == {"shrink": 0.5}
    json.dumps(full.model_dump(mode="json"))


def test_kd_loss_is_zero_when_the_student_matches_and_scales_with_t_squared():
    import torch

    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    assert float(kd_loss(logits, logits, 4.0)) == pytest.approx(0.0, abs=1e-6)
    other = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    p = torch.softmax(logits / 2.0, dim=1)
    expected = float((p * (p.log() - torch.log_softmax(other / 2.0, dim=1))).sum(1).mean()) * 4.0
    assert float(kd_loss(other, logits, 2.0)) == pytest.approx(expected, rel=1e-5)


def test_student_builders_shapes():
    import torch

    cnn = build_cnn((1, 28, 28), (8, 16), (32,), 10)
    assert cnn(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    tiny = build_cnn((1, 3, 3), (4, 4, 4), (), 5)  # stops pooling at 1x1
    assert tiny(torch.zeros(2, 1, 3, 3)).shape == (2, 5)
    assert count_weights(build_mlp(64, (32,), 10)) == 64 * 32 + 32 + 32 * 10 + 10


def test_a_builtin_transfer_set_is_shaped_for_a_flat_teacher(jobs, teacher):
    m = jobs(teacher["onnx"], {"student": SMALL_MLP, **QUICK}, builtin="digits").metrics
    assert m["evaluation"]["data"] == "builtin:digits seeded stratified 80/20 split"
    assert m["evaluation"]["rows"] == 360 and m["inputs"][0]["shape"][1:] == [64]
    assert m["method"]["transfer_set"]["builtin"] == "digits" and m["method"]["transfer_set"]["rows"] == 1437
    assert m["result"]["accuracy"] >= 0.85


def test_train_samples_takes_a_seeded_subset(jobs, teacher):
    method = jobs(teacher["onnx"], {"student": SMALL_MLP, **QUICK, "epochs": 1, "train_samples": 300},
                  teacher["npz"]).metrics["method"]
    assert method["transfer_set"]["rows"] == 300 and method["transfer_set"]["of"] == 1437
    assert method["transfer_set"]["subset_seed"] == 0 and method["train_rows"] == 300


def test_shrink_student_is_the_teacher_narrowed(jobs, example):
    config = {"student": {"shrink": 0.5}, **QUICK, "epochs": 3, "lr": 0.003}
    result = jobs(example["onnx"], config, Path(example["dataset"]))
    m = result.metrics
    student = m["method"]["student"]
    assert student["kind"] == "shrink" and student["pruning"]["ratio"] == 0.5
    assert student["pruning"]["params_after"] < 0.5 * student["pruning"]["params_before"]
    assert m["ratios"]["params"] < 0.5 and m["ratios"]["macs"] < 0.5
    assert m["result"]["accuracy"] >= 0.9
    session = ort.InferenceSession(str(result.artifact_path), providers=CPU)
    x = np.load(example["dataset"])["x_test"][:3]
    assert session.run(None, {"input": x})[0].shape == (3, 10)


def _student_file(tmp_path: Path, fmt: str, classes: int = 10) -> Path:
    """An untrained 64-16-N MLP over (N, 1, 8, 8) images, as ONNX or TorchScript."""
    import torch

    from worker.examples import export_onnx, export_torchscript

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, classes)).eval()
    sample = np.zeros((2, 1, 8, 8), np.float32)
    if fmt == "onnx":
        return export_onnx(model, tmp_path / f"student{classes}.onnx", sample)
    return export_torchscript(model, tmp_path / f"student{classes}.pt", sample)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_an_uploaded_model_is_trained_as_the_student(jobs, example, tmp_path, fmt):
    path = _student_file(tmp_path, fmt)
    m = jobs(example["onnx"], {"student": {"model_id": "f" * 32}, **QUICK}, Path(example["dataset"]),
             student_path=path, student_format=fmt).metrics
    assert m["method"]["student"]["kind"] == "model" and m["method"]["student"]["format"] == fmt
    assert m["method"]["params"]["student"] == 64 * 16 + 16 + 16 * 10 + 10
    assert m["result"]["accuracy"] >= 0.85  # from chance (untrained) to accurate
    assert m["artifact_format"] == "onnx"


def test_an_uploaded_student_with_other_outputs_is_invalid_model(jobs, example, tmp_path):
    path = _student_file(tmp_path, "onnx", classes=5)
    with pytest.raises(EngineError) as excinfo:
        jobs(example["onnx"], {"student": {"model_id": "f" * 32}, **QUICK}, Path(example["dataset"]),
             student_path=path, student_format="onnx")
    assert excinfo.value.code == "invalid_model" and "(rows, 10)" in excinfo.value.message


def test_a_torchscript_teacher_gives_a_torchscript_student(jobs, example):
    import torch

    config = {"student": {"arch": "mlp", "hidden": [32]}, **QUICK}
    result = jobs(example["torchscript"], config, Path(example["dataset"]), model_format="torchscript")
    m = result.metrics
    assert result.artifact_format == "torchscript" and result.artifact_path.suffix == ".pt"
    assert m["method"]["teacher"]["format"] == "torchscript"
    assert m["result"]["accuracy"] >= 0.85 and m["ratios"]["params"] < 0.25
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated; still a format we write
        loaded = torch.jit.load(str(result.artifact_path))
    assert loaded(torch.zeros(4, 1, 8, 8)).shape == (4, 10)
    # ... or ONNX when asked, with the hint loss read from the teacher converted to ONNX
    config = {**config, "output_format": "onnx", "feature_loss": {"beta": 0.1}}
    result = jobs(example["torchscript"], config, Path(example["dataset"]), model_format="torchscript")
    assert result.artifact_format == "onnx" and result.metrics["method"]["feature_loss"]["teacher_dim"] == 64


@pytest.mark.parametrize(
    "config",
    [
        {"student": {"arch": "mlp"}},
        {"student": {"arch": "cnn"}, "early_stopping": {}, "feature_loss": {}},
        {"student": {"arch": "cnn", "channels": [8], "hidden": []}, "feature_loss": {"teacher_layer": "h"}},
        {"student": {"shrink": 0.5}, "optimizer": "sgd", "lr_schedule": "step", "output_format": "torchscript"},
        {"student": {"model_id": "a" * 32}, "compare_baseline": True, "seed": 7},
    ],
)
def test_the_api_contract_reads_the_same_in_the_engine(config):
    """What the API stores (its config with the defaults filled in) reads back to the same config in the engine."""
    from app.jobs.schemas import JOB_CREATE_MODELS

    body = JOB_CREATE_MODELS["distill"].model_validate({"kind": "distill", "model_id": "b" * 32, "config": config})
    stored = body.config.model_dump(mode="json")
    assert parse(stored) == body.config and parse(stored).model_dump(mode="json") == stored
