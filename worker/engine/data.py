"""Model inputs and datasets: the .npz contract, the train/test split and batching.

The .npz holds `x` for a single-input model, or one array per model input named after the input; optionally `y`
(1-D integer labels), and optionally a held-out split `x_test`/`y_test` (or `<input>_test`). Without a held-out
split the rows are split 80/20 with a fixed seed. Arrays are cast to the model's input dtypes. It is loaded with
allow_pickle=False: an object array is refused, never unpickled.

A job may name a built-in dataset instead (`builtin.py`: mnist, fashion-mnist, digits): `load_builtin_dataset`
shapes its images for the model's single input and returns the same `Dataset`, with the built-in's own test split.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .core import EngineError

SPLIT_SEED = 0
TEST_FRACTION = 0.2
_NUMERIC_KINDS = "biuf"

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: dims are ints (fixed), strings (symbolic) or None (unknown)."""

    name: str
    shape: tuple[int | str | None, ...] | None  # None: rank unknown
    dtype: np.dtype

    @property
    def fixed_batch(self) -> int | None:
        """The first dim when it is fixed, else None (symbolic: any batch size)."""
        if self.shape and isinstance(self.shape[0], int):
            return self.shape[0]
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "shape": list(self.shape) if self.shape is not None else None,
            "dtype": str(self.dtype),
        }


def fixed_batch_size(inputs: tuple[TensorSpec, ...]) -> int | None:
    """The batch size every call must use when an input fixes its first dim (e.g. 1), else None."""
    fixed = [spec.fixed_batch for spec in inputs if spec.fixed_batch is not None]
    return min(fixed) if fixed else None


@dataclass(frozen=True)
class Split:
    x: Feeds  # one array per model input, all with the same first dim
    y: np.ndarray | None  # int64 labels, or None

    def __len__(self) -> int:
        return len(next(iter(self.x.values())))

    def take(self, index: np.ndarray) -> Split:
        return Split({k: v[index] for k, v in self.x.items()}, None if self.y is None else self.y[index])


@dataclass(frozen=True)
class Dataset:
    train: Split
    test: Split
    test_source: str  # "held-out" (arrays in the file) or "seeded 80/20 split"


def load_dataset(path: Path, inputs: tuple[TensorSpec, ...], classes: int | None = None) -> Dataset:
    """Load and check the .npz against the model's inputs (EngineError("invalid_dataset") on any mismatch) and, when
    `classes` (the model's output count) is given, its labels against it. Running out of memory is not a problem of
    the dataset: the MemoryError goes through (the job fails with out_of_memory)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise EngineError("invalid_dataset", "the dataset must be an .npz archive")
            arrays = {key: npz[key] for key in npz.files}
            raw = sorted(key for key, value in arrays.items() if not isinstance(value, np.ndarray))
            if raw:  # NpzFile hands back the bytes of a member that is not an .npy array (e.g. a bare pickle)
                raise EngineError("invalid_dataset", f"the .npz members {raw} are not .npy arrays")
    except (EngineError, MemoryError):
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise EngineError("invalid_dataset", f"cannot read the dataset: {exc}") from None
    except Exception as exc:
        raise EngineError("invalid_dataset", f"cannot read the dataset: {type(exc).__name__}: {exc}") from None
    dataset = dataset_from_arrays(arrays, inputs)
    check_labels_fit(dataset, classes)
    return dataset


def load_job_dataset(
    dataset_path: Path | None, builtin_dataset: str | None, inputs: tuple[TensorSpec, ...], classes: int | None = None
) -> Dataset | None:
    """The job's dataset: its .npz, or the built-in it names, or None when it has neither. With `classes` (the
    model's output count, `output_classes`), labels must be below it."""
    if dataset_path is not None and builtin_dataset:
        raise EngineError("invalid_dataset", "give either a dataset file or a built-in dataset, not both")
    if builtin_dataset:
        dataset = load_builtin_dataset(builtin_dataset, inputs)
        check_labels_fit(dataset, classes)
        return dataset
    if dataset_path is not None:
        return load_dataset(Path(dataset_path), inputs, classes)
    return None


def output_classes(outputs: tuple[TensorSpec, ...]) -> int | None:
    """The number of classes a model's labels index: the fixed last dim of its first output when that is
    (batch, classes); None when it is not known."""
    if not outputs or outputs[0].shape is None or len(outputs[0].shape) != 2:
        return None
    classes = outputs[0].shape[1]
    return classes if isinstance(classes, int) and classes > 0 else None


def check_labels_fit(dataset: Dataset | None, classes: int | None) -> None:
    """EngineError("invalid_dataset") when a label (y or y_test) is negative or not below `classes`, the model's
    output count: training would index past its outputs, and accuracy against it would mean nothing."""
    if dataset is None or classes is None:
        return
    test_key = "y_test" if dataset.test_source != "seeded 80/20 split" else "y"
    for key, labels in (("y", dataset.train.y), (test_key, dataset.test.y)):
        if labels is None or labels.size == 0:
            continue
        low, high = int(labels.min()), int(labels.max())
        if low < 0:
            raise EngineError("invalid_dataset", f"{key!r} holds the negative label {low}; labels are class indices "
                                                 f"0..{classes - 1}")
        if high >= classes:
            raise EngineError(
                "invalid_dataset",
                f"{key!r} holds the label {high} but the model has {classes} outputs: labels must be class indices "
                f"0..{classes - 1}",
            )


def load_builtin_dataset(name: str, inputs: tuple[TensorSpec, ...]) -> Dataset:
    """A built-in dataset (builtin.BUILTIN_DATASETS) shaped for the model's single float input: (N, 1, H, W) as
    shipped, or reshaped to the input's shape when the per-row element counts match (e.g. (N, 784) for an MLP).
    EngineError("dataset_unavailable") when it is unknown or not installed here, "invalid_dataset" when it does not
    fit the model."""
    from .builtin import load_builtin_arrays

    arrays = load_builtin_arrays(name)
    if len(inputs) != 1:
        raise EngineError(
            "invalid_dataset",
            f"builtin:{name} feeds one image input; the model has {len(inputs)} inputs "
            f"({', '.join(spec.name for spec in inputs)})",
        )
    spec = inputs[0]
    if spec.dtype.kind != "f":
        raise EngineError(
            "invalid_dataset",
            f"builtin:{name} holds float images in 0..1; model input {spec.name!r} expects {spec.dtype}",
        )
    row_shape = _builtin_row_shape(name, arrays.x_train.shape[1:], spec)
    dataset = dataset_from_arrays(
        {
            "x": arrays.x_train.reshape(len(arrays.x_train), *row_shape),
            "y": arrays.y_train,
            "x_test": arrays.x_test.reshape(len(arrays.x_test), *row_shape),
            "y_test": arrays.y_test,
        },
        inputs,
    )
    return replace(dataset, test_source=arrays.test_source)


def _builtin_row_shape(name: str, image: tuple[int, ...], spec: TensorSpec) -> tuple[int, ...]:
    """The per-row shape to give the images (1, H, W) for `spec`: the same elements, laid out as the input wants."""
    if spec.shape is None:
        return image
    wanted = spec.shape[1:]
    size = int(np.prod(image))
    # The natural layout for the input's rank: (1, H, W), (H, W) or flat.
    natural = {3: image, 2: image[1:], 1: (size,)}.get(len(wanted))
    if natural is not None and all(not isinstance(d, int) or d == n for d, n in zip(wanted, natural)):
        return natural
    if wanted and all(isinstance(d, int) for d in wanted) and int(np.prod(wanted)) == size:
        return tuple(int(d) for d in wanted)  # type: ignore[arg-type]
    raise EngineError(
        "invalid_dataset",
        f"builtin:{name} has images of shape {list(image)} ({size} values per row); model input {spec.name!r} "
        f"expects {list(spec.shape)} (first dim = rows)",
    )


def dataset_from_arrays(arrays: dict[str, np.ndarray], inputs: tuple[TensorSpec, ...]) -> Dataset:
    keys = _input_keys(arrays, inputs)
    x = {spec.name: _check_input(arrays[keys[spec.name]], spec, keys[spec.name]) for spec in inputs}
    n = _common_length(x, "")
    y = _check_labels(arrays["y"], n, "y") if "y" in arrays else None

    test_keys = {spec.name: _test_key(keys[spec.name]) for spec in inputs}
    present = [k for k in test_keys.values() if k in arrays]
    if present and len(present) != len(test_keys):
        missing = sorted(set(test_keys.values()) - set(present))
        raise EngineError("invalid_dataset", f"the held-out split is incomplete: missing {', '.join(missing)}")
    if "y_test" in arrays and not present:
        raise EngineError("invalid_dataset", "y_test is given without the held-out inputs (x_test)")
    if present:
        x_test = {spec.name: _check_input(arrays[test_keys[spec.name]], spec, test_keys[spec.name]) for spec in inputs}
        n_test = _common_length(x_test, " test")
        y_test = _check_labels(arrays["y_test"], n_test, "y_test") if "y_test" in arrays else None
        return Dataset(Split(x, y), Split(x_test, y_test), "held-out")

    if n < 2:
        raise EngineError("invalid_dataset", "the dataset needs at least 2 rows to split off a test set")
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    n_test = min(n - 1, max(1, int(round(TEST_FRACTION * n))))
    full = Split(x, y)
    return Dataset(full.take(np.sort(order[n_test:])), full.take(np.sort(order[:n_test])), "seeded 80/20 split")


def _input_keys(arrays: dict[str, np.ndarray], inputs: tuple[TensorSpec, ...]) -> dict[str, str]:
    """The .npz key holding each model input."""
    if len(inputs) == 1:
        name = inputs[0].name
        for key in ("x", name):
            if key in arrays:
                return {name: key}
        raise EngineError("invalid_dataset", f"the dataset has no 'x' array (model input {name!r})")
    missing = [spec.name for spec in inputs if spec.name not in arrays]
    if missing:
        raise EngineError(
            "invalid_dataset",
            f"the model has {len(inputs)} inputs: the dataset needs one array per input, named after it "
            f"(missing: {', '.join(missing)})",
        )
    return {spec.name: spec.name for spec in inputs}


def _test_key(key: str) -> str:
    return f"{key}_test"


def _check_input(array: np.ndarray, spec: TensorSpec, key: str) -> np.ndarray:
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise EngineError("invalid_dataset", f"array {key!r} has a non-numeric dtype {array.dtype}")
    if spec.shape is not None:
        if array.ndim != len(spec.shape):
            raise EngineError(
                "invalid_dataset",
                f"array {key!r} has shape {list(array.shape)}; model input {spec.name!r} expects rank "
                f"{len(spec.shape)} {list(spec.shape)} (first dim = rows)",
            )
        for axis, dim in enumerate(spec.shape[1:], start=1):
            if isinstance(dim, int) and array.shape[axis] != dim:
                raise EngineError(
                    "invalid_dataset",
                    f"array {key!r} has shape {list(array.shape)}; model input {spec.name!r} expects "
                    f"{list(spec.shape)}",
                )
    if len(array) == 0:
        raise EngineError("invalid_dataset", f"array {key!r} is empty")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise EngineError("invalid_dataset", f"array {key!r} holds NaN or infinite values")
    return np.ascontiguousarray(array.astype(spec.dtype, copy=False))


def _check_labels(array: np.ndarray, n: int, key: str) -> np.ndarray:
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise EngineError(
            "invalid_dataset", f"{key!r} must be a 1-D array of integer labels, got {array.dtype} {list(array.shape)}"
        )
    if len(array) != n:
        raise EngineError("invalid_dataset", f"{key!r} has {len(array)} labels for {n} rows")
    return array.astype(np.int64, copy=False)


def _common_length(x: Feeds, what: str) -> int:
    lengths = {key: len(value) for key, value in x.items()}
    if len(set(lengths.values())) != 1:
        raise EngineError("invalid_dataset", f"the{what} input arrays differ in length: {lengths}")
    return next(iter(lengths.values()))


def synthetic_feeds(inputs: tuple[TensorSpec, ...], n: int, seed: int = 0) -> Feeds:
    """Seeded random inputs of n rows: symbolic dims other than the batch become 1. For fidelity checks only.

    Floats are uniform in [0, 1); integers are 0 or 1 (a safe index into any embedding, and a valid mask).
    """
    rng = np.random.default_rng(seed)
    feeds: Feeds = {}
    for spec in inputs:
        if spec.shape is None:
            raise EngineError("unsupported", f"input {spec.name!r} has no declared shape: cannot make sample inputs")
        dims = tuple(d if isinstance(d, int) else 1 for d in spec.shape[1:])
        shape = (n, *dims)
        if spec.dtype.kind == "f":
            feeds[spec.name] = rng.random(shape, dtype=np.float64).astype(spec.dtype)
        elif spec.dtype.kind == "b":
            feeds[spec.name] = rng.random(shape) < 0.5
        else:
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
    return feeds


def slice_feeds(feeds: Feeds, start: int, stop: int) -> Feeds:
    return {k: v[start:stop] for k, v in feeds.items()}


def feeds_length(feeds: Feeds) -> int:
    return len(next(iter(feeds.values())))


def iter_batches(feeds: Feeds, batch_size: int, fixed_batch: int | None = None) -> Iterator[tuple[Feeds, int]]:
    """Yield (batch, rows that are real) over all rows. A model with a fixed batch dim gets exactly that many rows
    per call: the last batch is padded by repeating its last row (the caller drops the padded outputs)."""
    size = fixed_batch or batch_size
    n = feeds_length(feeds)
    for start in range(0, n, size):
        batch = slice_feeds(feeds, start, start + size)
        real = feeds_length(batch)
        if fixed_batch and real < fixed_batch:
            batch = {k: np.concatenate([v, np.repeat(v[-1:], fixed_batch - real, axis=0)]) for k, v in batch.items()}
        yield batch, real


def batch_of(feeds: Feeds, size: int) -> Feeds:
    """The first `size` rows, repeated cyclically when there are fewer (for a fixed batch dim larger than the data)."""
    n = feeds_length(feeds)
    if n >= size:
        return slice_feeds(feeds, 0, size)
    index = np.arange(size) % n
    return {k: v[index] for k, v in feeds.items()}
