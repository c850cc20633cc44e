"""prune: magnitude (exact sparsity, global vs layer, honest about dense files) and channels (real MAC and param
reductions, unchanged outputs), for ONNX and TorchScript uploads, with a fine-tune that recovers accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from worker.engine import EngineError
from worker.engine.prune import magnitude_masks, prune_channels

from .conftest import FAST_BENCHMARK, Runner

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _weights(path: Path) -> dict[str, np.ndarray]:
    proto = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if t.name.endswith("weight")}


def test_magnitude_masks_prune_exactly_the_smallest():
    rng = np.random.default_rng(0)
    weights = {"a": rng.normal(size=(40, 30)), "b": 5 * rng.normal(size=(100,)), "c": rng.normal(size=(7,))}
    masks = magnitude_masks(weights, 0.6, "global")
    zeros = sum(int((~m).sum()) for m in masks.values())
    assert zeros == round(0.6 * 1307)
    kept_min = min(np.abs(w[m]).min() for w, m in zip(weights.values(), masks.values()))
    pruned_max = max(np.abs(w[~m]).max() for w, m in zip(weights.values(), masks.values()) if (~m).any())
    assert pruned_max <= kept_min
    masks = magnitude_masks(weights, 0.6, "layer")
    assert [int((~m).sum()) for m in masks.values()] == [720, 60, 4]
    assert all(m.all() for m in magnitude_masks(weights, 0.0, "global").values())


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_magnitude_on_onnx_reaches_the_target_sparsity(small_example, run, scope):
    config = {"method": "magnitude", "sparsity": 0.7, "scope": scope, "benchmark": FAST_BENCHMARK}
    result = run(small_example["onnx"], config, Path(small_example["dataset"]), kind="prune")
    m = result.metrics
    json.dumps(m, allow_nan=False)
    facts = m["method"]
    assert result.artifact_format == "onnx"
    assert abs(facts["sparsity"] - 0.7) <= 0.01 and facts["scope"] == scope
    layer_sparsity = [layer["sparsity"] for layer in facts["layers"]]
    assert len(layer_sparsity) == 4
    if scope == "layer":
        assert all(abs(s - 0.7) <= 0.01 for s in layer_sparsity)
    else:  # ranked across layers: the big, redundant layers give up more
        assert max(layer_sparsity) - min(layer_sparsity) > 0.1
    # The zeros are in the file, which stays dense: same size, same params, same MACs.
    weights = _weights(result.artifact_path)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert abs(zeros / sum(w.size for w in weights.values()) - 0.7) <= 0.01
    assert m["ratios"]["size"] == pytest.approx(1.0, abs=0.01) and m["ratios"]["macs"] == 1.0
    assert any("does not shrink a dense file" in note for note in m["notes"])
    assert facts["compressed_size_bytes"]["result"] < 0.8 * facts["compressed_size_bytes"]["baseline"]
    assert m["result"]["agreement"] > 0.5


def test_magnitude_on_torchscript_keeps_the_format(small_example, run):
    config = {"method": "magnitude", "sparsity": 0.5, "benchmark": FAST_BENCHMARK}
    result = run(small_example["torchscript"], config, Path(small_example["dataset"]), kind="prune",
                 model_format="torchscript")
    assert result.artifact_format == "torchscript"
    module = torch.jit.load(str(result.artifact_path))
    weights = [v for k, v in module.state_dict().items() if k.endswith("weight")]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert abs(zeros / sum(w.numel() for w in weights) - 0.5) <= 0.01
    assert abs(result.metrics["method"]["sparsity"] - 0.5) <= 0.01


@pytest.fixture(scope="module")
def channels_results(small_example, tmp_path_factory) -> dict:
    run = Runner(tmp_path_factory.mktemp("channels"))
    data = Path(small_example["dataset"])
    plain = {"method": "channels", "ratio": 0.5, "benchmark": FAST_BENCHMARK}
    tuned = {**plain, "fine_tune": {"epochs": 3, "lr": 0.003}}
    return {
        "onnx": run(small_example["onnx"], plain, data, kind="prune"),
        "tuned": run(small_example["onnx"], tuned, data, kind="prune"),
        "torchscript": run(small_example["torchscript"], tuned, data, kind="prune", model_format="torchscript"),
    }


@pytest.mark.parametrize("case", ["onnx", "tuned", "torchscript"])
def test_channels_cut_macs_and_params_and_keep_the_output_shape(channels_results, small_example, case):
    result = channels_results[case]
    m = result.metrics
    json.dumps(m, allow_nan=False)
    assert m["ratios"]["macs"] <= 0.35 and m["ratios"]["params"] < 0.5
    assert m["result"]["macs"] < m["baseline"]["macs"]
    facts = m["method"]
    assert facts["macs_after"] / facts["macs_before"] <= 0.35 and facts["params_after"] < facts["params_before"]
    layers = {layer["layer"]: (layer["channels_before"], layer["channels_after"]) for layer in facts["layers"]}
    assert layers == {"0": (16, 8), "2": (32, 16), "6": (64, 32), "8": (10, 10)}  # the classifier is left whole
    assert facts["ignored_layers"] == ["8"]
    x = np.load(small_example["dataset"])["x_test"][:5]
    if result.artifact_format == "onnx":
        out = ort.InferenceSession(str(result.artifact_path), providers=["CPUExecutionProvider"]).run(None, {
            "input": x})[0]
    else:
        assert case == "torchscript" and result.artifact_path.suffix == ".pt"
        out = torch.jit.load(str(result.artifact_path))(torch.from_numpy(x)).detach().numpy()
    assert out.shape == (5, 10)


@pytest.mark.parametrize("case", ["tuned", "torchscript"])
def test_fine_tune_recovers_the_accuracy(channels_results, case):
    m = channels_results[case].metrics
    tune = m["method"]["fine_tune"]
    assert tune["epochs"] == 3 and len(tune["loss_per_epoch"]) == 3 and tune["distill"] is True
    assert tune["loss_per_epoch"][-1] < tune["loss_per_epoch"][0]
    assert tune["accuracy"]["after"] > tune["accuracy"]["before"]
    assert m["result"]["accuracy"] >= 0.9
    assert m["result"]["accuracy"] > channels_results["onnx"].metrics["result"]["accuracy"]


def test_fine_tune_is_seeded(small_example, run):
    config = {"method": "channels", "ratio": 0.5, "fine_tune": {"epochs": 1, "distill": False},
              "benchmark": {"batch_sizes": [1], "repeats": 1, "warmup": 0}}
    data = Path(small_example["dataset"])
    first = run(small_example["onnx"], config, data, kind="prune").metrics["method"]["fine_tune"]
    second = run(small_example["onnx"], config, data, kind="prune").metrics["method"]["fine_tune"]
    assert first["loss_per_epoch"] == second["loss_per_epoch"] and first["labels_used"] is True


def test_fine_tune_without_labels_needs_distill(small_example, run, tmp_path):
    x = np.load(small_example["dataset"])["x"]
    np.savez(tmp_path / "unlabelled.npz", x=x)
    config = {"method": "channels", "fine_tune": {"epochs": 1, "distill": False}, "benchmark": FAST_BENCHMARK}
    with pytest.raises(EngineError) as excinfo:
        run(small_example["onnx"], config, tmp_path / "unlabelled.npz", kind="prune")
    assert excinfo.value.code == "invalid_dataset"


def test_prune_channels_helper_works_on_any_module():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Conv2d(3, 32, 3), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                           nn.Flatten(), nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 5))
    feeds = {"x": np.random.default_rng(0).random((2, 3, 10, 10), dtype=np.float32)}
    facts = prune_channels(module, feeds, ratio=0.5, round_to=8)
    assert module[0].out_channels == 16 and module[1].num_features == 16 and module[5].in_features == 16
    assert module[7].out_features == 5
    assert facts["params_after"] < facts["params_before"] and facts["macs_after"] < facts["macs_before"]
    assert module(torch.from_numpy(feeds["x"])).shape == (2, 5)
