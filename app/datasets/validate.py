"""Validate an uploaded .npz from its array headers, without unpickling or loading the bulk of it.

Arrays feed the model: `x` for a single-input model, or one array per model input named after it; optional `y`
(integer labels); optional held-out arrays with a `_test` suffix (`x_test`, `y_test`), else the worker makes a
seeded split.
"""
from __future__ import annotations

import math
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.lib import format as npformat

from app.core.zipdir import ZipDirectory, zip_directory

NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:/-]{0,127}$")
ALLOWED_KINDS = "biuf"  # bool, signed, unsigned, float
MAX_ARRAYS = 256
# Bytes of zip directory per array: a central directory entry is 46 bytes, the name (at most 132 here) and extra
# fields (zip64 sizes, timestamps: tens of bytes); numpy.savez writes about 100 bytes per array.
DIRECTORY_BYTES_PER_ARRAY = 1024
MAX_DIRECTORY_BYTES = MAX_ARRAYS * DIRECTORY_BYTES_PER_ARRAY
MAX_RANK = 32  # numpy 1.x allows 32 dimensions, 2.x 64
MAX_SAMPLES = 50_000_000
LABEL_BLOCK_BYTES = 1024 * 1024  # labels are checked a block at a time: memory stays bounded whatever their size
# What a damaged or hostile archive raises while its members are read (bad CRC, bad deflate data, unknown
# compression method, truncated member, ...).
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError, ValueError, RuntimeError)


class DatasetRejected(Exception):
    def __init__(self, code: str, message: str, detail: dict | None = None):
        super().__init__(message)
        self.code, self.message, self.detail = code, message, detail or {}


@dataclass
class ArrayHeader:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of an .npy stream, which is left at the start of the data."""
    version = npformat.read_magic(f)
    if version == (1, 0):
        return npformat.read_array_header_1_0(f)
    if version in ((2, 0), (3, 0)):
        return npformat.read_array_header_2_0(f)
    raise ValueError(f"unknown .npy version {version}")


def _check_directory(directory: ZipDirectory) -> None:
    """Refuse an archive whose zip directory is larger than MAX_ARRAYS arrays need, from what its end record
    declares, before zipfile reads the directory (one object per entry: a million-entry directory costs hundreds of
    MiB). zipfile reads `size` bytes whatever the entry count says, so both are bounded."""
    if directory.entries > MAX_ARRAYS or directory.size > MAX_DIRECTORY_BYTES:
        raise DatasetRejected(
            "invalid_dataset", f"the .npz's zip directory lists {directory.entries} entries in {directory.size} "
            f"bytes; a dataset holds at most {MAX_ARRAYS} arrays (a directory of at most {MAX_DIRECTORY_BYTES} "
            "bytes)", {"entries": directory.entries, "directory_bytes": directory.size, "limit_entries": MAX_ARRAYS,
                       "limit_directory_bytes": MAX_DIRECTORY_BYTES})


def _array_bytes(name: str, shape: tuple, dtype: np.dtype, max_total_bytes: int) -> int:
    """The bytes an array's header declares, in Python ints (numpy's int64 product wraps: (10, 2**62, 4) gives 0);
    refuses non-integer or negative dimensions and sizes past `max_total_bytes`."""
    if len(shape) > MAX_RANK:
        raise DatasetRejected("invalid_dataset", f"array {name!r} has {len(shape)} dimensions (at most {MAX_RANK})")
    if any(type(d) is not int or d < 0 for d in shape):
        raise DatasetRejected("invalid_dataset", f"array {name!r} declares shape {list(shape)}: dimensions must be "
                              "non-negative integers")
    too_large = {"limit_bytes": max_total_bytes, "array": name}  # (the shape may not fit a JSON number)
    if any(d > max_total_bytes for d in shape):  # bounds the product below, even when another dimension is 0
        raise DatasetRejected("dataset_too_large", f"array {name!r} declares shape {list(shape)}, a dimension "
                              f"over the limit of {max_total_bytes} bytes of array data", too_large)
    nbytes = math.prod(shape) * dtype.itemsize  # at most MAX_RANK factors of at most max_total_bytes each
    if nbytes > max_total_bytes:
        raise DatasetRejected("dataset_too_large", f"array {name!r} declares shape {list(shape)} of {dtype}: "
                              f"{nbytes} bytes, over the limit of {max_total_bytes}", too_large)
    return nbytes


def _read_headers(zf: zipfile.ZipFile, max_total_bytes: int) -> dict[str, ArrayHeader]:
    infos = zf.infolist()
    if not infos:
        raise DatasetRejected("invalid_dataset", "the .npz holds no arrays")
    if len(infos) > MAX_ARRAYS:
        raise DatasetRejected("invalid_dataset", f"the .npz holds more than {MAX_ARRAYS} arrays")
    total = sum(i.file_size for i in infos)
    if total > max_total_bytes:
        raise DatasetRejected("dataset_too_large", f"the arrays total {total} bytes uncompressed, over the limit "
                              f"of {max_total_bytes}", {"limit_bytes": max_total_bytes, "total_bytes": total})
    headers: dict[str, ArrayHeader] = {}
    for info in infos:
        if not info.filename.endswith(".npy"):
            raise DatasetRejected("invalid_dataset", f"member {info.filename!r} is not a .npy array")
        name = info.filename[:-4]
        if not NAME_RE.match(name):
            raise DatasetRejected("invalid_dataset", f"array name {name!r} is not allowed")
        with zf.open(info) as f:
            try:
                shape, fortran, dtype = _read_header(f)
            except ValueError as exc:
                raise DatasetRejected("invalid_dataset", f"array {name!r} has a corrupt header: {exc}") from None
        if dtype.hasobject or dtype.fields is not None or dtype.kind not in ALLOWED_KINDS:
            raise DatasetRejected("invalid_dataset", f"array {name!r} has dtype {dtype}; only numeric arrays are "
                                  "accepted (no object, string or structured arrays: object arrays are stored "
                                  "as pickles, which are never loaded)")
        if len(shape) == 0:
            raise DatasetRejected("invalid_dataset", f"array {name!r} is a scalar; arrays need a sample axis")
        expected = _array_bytes(name, shape, dtype, max_total_bytes)
        if not expected <= info.file_size <= expected + 1024 * 1024:
            raise DatasetRejected("invalid_dataset", f"array {name!r} declares shape {shape} that does not match "
                                  "its stored size")
        headers[name] = ArrayHeader(name, tuple(int(d) for d in shape), dtype)
    return headers


def _check_group(headers: dict[str, ArrayHeader], names: list[str], label: str, what: str) -> int:
    lengths = {n: headers[n].shape[0] for n in names}
    if label in headers:
        y = headers[label]
        if y.dtype.kind not in "iu" or len(y.shape) != 1:
            raise DatasetRejected("invalid_dataset", f"{label!r} must be a 1-D integer array of class labels, "
                                  f"got dtype {y.dtype} shape {list(y.shape)}")
        lengths[label] = y.shape[0]
    if len(set(lengths.values())) > 1:
        raise DatasetRejected("invalid_dataset", f"the {what} arrays have different lengths: {lengths}",
                              {"lengths": lengths})
    n = next(iter(lengths.values()))
    if n < 1 or n > MAX_SAMPLES:
        raise DatasetRejected("invalid_dataset", f"the {what} arrays hold {n} samples (1..{MAX_SAMPLES} allowed)")
    return n


def validate_npz(path: Path, max_total_bytes: int) -> dict:
    """Returns the dataset's info (arrays, inputs, sample counts, labels); raises DatasetRejected."""
    with open(path, "rb") as f:
        try:
            _check_directory(zip_directory(f))  # first: zipfile reads the whole directory it declares
            zf = zipfile.ZipFile(f)
        except _ZIP_ERRORS:
            raise DatasetRejected("not_an_npz", "the file is not an .npz archive (save one with numpy.savez)") from None
        with zf:
            try:
                headers = _read_headers(zf, max_total_bytes)
                labels_ok = _load_labels(zf, headers)
            except _ZIP_ERRORS as exc:
                raise DatasetRejected("corrupt_dataset", f"the .npz archive is truncated or corrupt: {exc}",
                                      {"reason": str(exc)[:500]}) from None
    train = sorted(n for n in headers if not n.endswith("_test") and n != "y")
    test = sorted(n for n in headers if n.endswith("_test") and n != "y_test")
    if not train:
        raise DatasetRejected("invalid_dataset", "the .npz has no input arrays: name it 'x' or after the model's inputs")
    n_train = _check_group(headers, train, "y", "training")
    n_test = 0
    if test or "y_test" in headers:
        if sorted(n[:-5] for n in test) != train:
            raise DatasetRejected("invalid_dataset", f"held-out arrays {test} must match the inputs {train} "
                                  "with a '_test' suffix")
        if ("y" in headers) != ("y_test" in headers):
            raise DatasetRejected("invalid_dataset", "give both 'y' and 'y_test', or neither")
        n_test = _check_group(headers, test, "y_test", "held-out")
        for name in train:
            if headers[name].shape[1:] != headers[name + "_test"].shape[1:]:
                raise DatasetRejected("invalid_dataset", f"{name!r} and {name + '_test'!r} differ in sample shape")
    return {
        "arrays": {h.name: {"shape": list(h.shape), "dtype": str(h.dtype)} for h in headers.values()},
        "inputs": train,
        "n_samples": n_train,
        "n_test": n_test,
        "split": "provided" if n_test else "seeded_80_20",
        "has_labels": "y" in headers,
        "num_classes": labels_ok,
    }


def _load_labels(zf: zipfile.ZipFile, headers: dict[str, ArrayHeader]) -> int | None:
    """Read the labels (a block at a time, never unpickling) to check they are non-negative class indices."""
    top = None
    for name in ("y", "y_test"):
        if name not in headers or headers[name].dtype.kind not in "iu":
            continue
        header = headers[name]
        left = math.prod(header.shape)  # bounded by _array_bytes
        block = max(1, LABEL_BLOCK_BYTES // header.dtype.itemsize)
        with zf.open(name + ".npy") as f:
            _read_header(f)  # checked by _read_headers; read again to reach the data
            while left:
                count = min(left, block)
                raw = f.read(count * header.dtype.itemsize)
                if len(raw) != count * header.dtype.itemsize:
                    raise DatasetRejected("corrupt_dataset", f"array {name!r} is truncated")
                y = np.frombuffer(raw, dtype=header.dtype)
                if int(y.min()) < 0:
                    raise DatasetRejected("invalid_dataset", f"{name!r} has negative labels; use class indices 0..C-1")
                top = max(top or 0, int(y.max()) + 1)
                left -= count
    return top
