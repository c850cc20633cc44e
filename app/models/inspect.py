"""Detect and inspect uploaded model files from their content, with bounded memory.

Uploaded files are hostile. This module is stdlib-only (the API process never imports
torch, onnx or onnxruntime) and executes nothing from the file: ONNX is decoded from the
protobuf wire format while seeking past tensor payloads, and TorchScript pickles are only
disassembled with ``pickletools``, never unpickled: an archive whose pickles name any Python global
outside the few that TorchScript's own unpickler understands is refused (``unsafe_pickle``), and so is one whose
members expand far beyond their compressed size (a zip bomb).
"""

from __future__ import annotations

import dataclasses
import os
import pickletools
import re
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.core.zipdir import zip_directory
from app.models.torchscript_source import CodeTooLarge, unsafe_call_in_archive

_WINDOW = 256 * 1024  # bytes read at a time when decoding ONNX
_MAX_STRING = 4096  # longer names are truncated
_MAX_RANK = 64
_MAX_GRAPH_IO = 10_000  # graph inputs, and graph outputs
_MAX_OPSETS = 1_000
_MAX_OP_TYPES = 200
_MAX_FIELDS = 20_000_000  # protobuf fields visited; bounds the parse time of hostile files
_MAX_PICKLE_BYTES = 64 * 1024 * 1024
_MAX_ZIP_DIRECTORY = 4 * 1024 * 1024
_MAX_EXPANSION = 100  # uncompressed / compressed size of an archive member; torch.jit.save stores (ratio 1)
_EXPANSION_FLOOR = 1024 * 1024  # members smaller than this, uncompressed, are not checked
_MAX_PLAUSIBLE_IR_VERSION = 100
_MAX_SUBGRAPH_DEPTH = 32  # If/Loop/Scan bodies within bodies

_PICKLE_MESSAGE = (
    "Plain pickled PyTorch checkpoints (torch.save) are not accepted because loading them "
    "can execute arbitrary code; export the model with torch.jit.save (TorchScript) or to "
    "ONNX instead."
)
_NOT_A_MODEL_MESSAGE = (
    "The file is not a recognised model; upload an ONNX model or a TorchScript archive "
    "(torch.jit.save)."
)

_ELEM_TYPES = {
    1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
    8: "string", 9: "bool", 10: "float16", 11: "float64", 12: "uint32", 13: "uint64",
    14: "complex64", 15: "complex128", 16: "bfloat16",
}
_OTHER_VALUE_TYPES = {4: "sequence", 5: "map", 7: "opaque", 9: "optional"}  # TypeProto fields

# Expected wire types of the fields this module reads, per message (0 varint, 2 bytes).
_VARINT, _BYTES, _INTS = (0,), (2,), (0, 2)
_MODEL = {1: _VARINT, 2: _BYTES, 7: _BYTES, 8: _BYTES, 20: _BYTES, 25: _BYTES}
_OPSET = {1: _BYTES, 2: _VARINT}
_GRAPH = {1: _BYTES, 5: _BYTES, 11: _BYTES, 12: _BYTES, 15: _BYTES}
_NODE = {4: _BYTES, 5: _BYTES}
_ATTRIBUTE = {5: _BYTES, 6: _BYTES, 10: _BYTES, 11: _BYTES, 22: _BYTES, 23: _BYTES}
_FUNCTION = {7: _BYTES, 11: _BYTES}
_TRAINING_INFO = {1: _BYTES, 2: _BYTES}
_TENSOR = {1: _INTS, 8: _BYTES, 13: _BYTES, 14: _VARINT}
_SPARSE_TENSOR = {1: _BYTES, 2: _BYTES, 3: _INTS}
_VALUE_INFO = {1: _BYTES, 2: _BYTES}
_TYPE = {1: _BYTES, 4: _BYTES, 5: _BYTES, 7: _BYTES, 8: _BYTES, 9: _BYTES}
_TENSOR_TYPE = {1: _VARINT, 2: _BYTES}
_SHAPE = {1: _BYTES}
_DIMENSION = {1: _VARINT, 2: _BYTES}


class ModelRejected(Exception):
    """The upload is not an acceptable model; ``code`` is machine-readable.

    Codes: not_a_model, unsupported_model, unsafe_pickle, unsafe_torchscript, model_too_complex,
    external_data_not_allowed, corrupt_model.
    """

    def __init__(self, code: str, message: str, detail: dict | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail or {}


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[int | str | None]  # str: symbolic dim, None: unknown dim; [] also if rank unknown


@dataclass
class ModelInfo:
    format: str  # "onnx" | "torchscript"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    params: int | None
    details: dict
    # TorchScript saved by torch.jit.trace: the example inputs it was traced with (forward's argument names, the
    # examples' dtypes and shapes; the first dim is the example's batch). TorchScript declares no input shapes, but
    # a traced graph is specialised to these. Empty for ONNX, scripted models and archives without them.
    traced_inputs: list[TensorSpec] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def inspect_model(
    path: str | os.PathLike,
    *,
    max_nodes: int = 1_000_000,
    max_tensor_elements: int = 2**34,
) -> ModelInfo:
    """Detect the format of the file at ``path`` and describe it, or raise ModelRejected."""
    with open(path, "rb", buffering=0) as f:
        head = f.read(4)
        if not head:
            raise ModelRejected("not_a_model", "The file is empty.")
        if head == b"PK\x03\x04":
            return _inspect_zip(f, max_tensor_elements)
        if head[0] == 0x80 and len(head) > 1 and 2 <= head[1] <= 5:  # pickle PROTO 2..5
            raise ModelRejected("unsupported_model", _PICKLE_MESSAGE)
        size = os.fstat(f.fileno()).st_size
        return _inspect_onnx(f, size, head[0] == 0x08, max_nodes, max_tensor_elements)


# --------------------------------------------------------------------------- ONNX


class _WireError(Exception):
    """Malformed protobuf wire data."""

    def __init__(self, reason: str, offset: int):
        super().__init__(reason)
        self.reason = reason
        self.offset = offset


def _int64(value: int) -> int:
    value &= 0xFFFF_FFFF_FFFF_FFFF
    return value - (1 << 64) if value >= 1 << 63 else value


def _too_complex(message: str, **detail) -> ModelRejected:
    return ModelRejected("model_too_complex", message, detail)


class _Wire:
    """Streaming protobuf wire-format reader.

    Decodes from a window of the file that is refilled on demand; payloads that are
    skipped are never read, so memory stays bounded whatever the file size.
    """

    def __init__(self, f):
        self._f = f
        self._window = b""
        self._window_start = 0  # file offset of _window[0]
        self.pos = 0
        self._fields_left = _MAX_FIELDS

    def error(self, reason: str) -> _WireError:
        return _WireError(reason, self.pos)

    def _view(self, size: int) -> tuple[bytes, int]:
        """The window and the index of ``pos`` in it, with ``size`` bytes from there
        unless the file ends sooner."""
        index = self.pos - self._window_start
        if index < 0 or index + size > len(self._window):
            self._f.seek(self.pos)
            self._window = self._f.read(max(size, _WINDOW))
            self._window_start = self.pos
            index = 0
        return self._window, index

    def varint(self) -> int:
        window, index = self._view(10)
        result = 0
        for shift in range(0, 70, 7):
            if index >= len(window):
                raise self.error("unexpected end of file")
            byte = window[index]
            index += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                self.pos = self._window_start + index
                return result
        raise self.error("varint longer than 10 bytes")

    def fields(self, end: int, schema: dict):
        """Yield ``(number, wire_type, value)`` for each field before offset ``end``.

        ``value`` is the integer of a varint field, or the end offset of a length-delimited
        payload (which starts at ``pos``). Whatever the consumer reads, the reader moves
        to the next field when resumed. Fields in ``schema`` must have one of the wire
        types listed there.
        """
        while self.pos < end:
            self._fields_left -= 1
            if self._fields_left < 0:
                raise _too_complex(f"The model has more than {_MAX_FIELDS} protobuf fields.")
            key = self.varint()
            number, wire_type = key >> 3, key & 7
            if number == 0:
                raise self.error("invalid field number 0")
            if wire_type == 0:
                value = self.varint()
                after = self.pos
            elif wire_type == 2:
                length = self.varint()
                value = after = self.pos + length
            elif wire_type in (1, 5):
                value = None
                after = self.pos + (8 if wire_type == 1 else 4)
            else:
                raise self.error(f"invalid wire type {wire_type}")
            if after > end:
                raise self.error(f"field {number} runs past the end of its message")
            if wire_type not in schema.get(number, (wire_type,)):
                raise self.error(f"field {number} has unexpected wire type {wire_type}")
            yield number, wire_type, value
            self.pos = after

    def string(self, end: int, limit: int = _MAX_STRING) -> str:
        size = min(end - self.pos, limit)
        window, index = self._view(size)
        return window[index : index + size].decode("utf-8", "replace")

    def int64s(self, wire_type: int, value: int):
        """The values of one occurrence of a repeated int64 field, packed or not."""
        if wire_type == 0:
            yield _int64(value)
            return
        while self.pos < value:
            yield _int64(self.varint())
        if self.pos > value:
            raise self.error("packed varint runs past the end of its field")


class _OnnxScan:
    """Collects what ``inspect_model`` reports while walking a ModelProto."""

    def __init__(self, f, max_nodes: int, max_tensor_elements: int):
        self.wire = _Wire(f)
        self.max_nodes = max_nodes
        self.max_tensor_elements = max_tensor_elements
        self.ir_version = 0
        self.producer_name = ""
        self.opsets: dict[str, int] = {}
        self.has_graph = False
        self.node_count = 0
        self.op_types: set[str] = set()
        self.initializer_count = 0
        self.initializer_names: set[str] = set()
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self.params = 0

    def model(self, end: int) -> None:
        wire = self.wire
        for number, _, value in wire.fields(end, _MODEL):
            if number == 1:
                self.ir_version = _int64(value)
            elif number == 2:
                self.producer_name = wire.string(value)
            elif number == 7:
                self.has_graph = True
                self.graph(value)
            elif number == 8:
                self.opset(value)
            elif number == 20:  # training_info: initialization and algorithm graphs (3, 4: name bindings)
                for inner, _, inner_value in wire.fields(value, _TRAINING_INFO):
                    if inner in (1, 2):
                        self.subgraph(inner_value, 1)
            elif number == 25:  # functions: their nodes' attributes, and their attributes' default values
                for inner, _, inner_value in wire.fields(value, _FUNCTION):
                    if inner == 7:
                        self.node(inner_value, 1)
                    elif inner == 11:  # attribute_proto: a default value may be a tensor or a graph
                        self.attribute(inner_value, 1)

    def opset(self, end: int) -> None:
        domain, version = "", 0
        for number, _, value in self.wire.fields(end, _OPSET):
            if number == 1:
                domain = self.wire.string(value)
            elif number == 2:
                version = _int64(value)
        self.opsets[domain] = version
        if len(self.opsets) > _MAX_OPSETS:
            raise _too_complex(f"The model imports more than {_MAX_OPSETS} opsets.")

    def graph(self, end: int) -> None:
        for number, _, value in self.wire.fields(end, _GRAPH):
            if number == 1:
                self.node(value)
            elif number == 5:
                self.initializer(value)
            elif number == 11:
                self.inputs.append(self.value_info(value))
                if len(self.inputs) > _MAX_GRAPH_IO:
                    raise _too_complex(f"The graph has more than {_MAX_GRAPH_IO} inputs.")
            elif number == 12:
                self.outputs.append(self.value_info(value))
                if len(self.outputs) > _MAX_GRAPH_IO:
                    raise _too_complex(f"The graph has more than {_MAX_GRAPH_IO} outputs.")
            elif number == 15:
                self.sparse_initializer(value)

    def node(self, end: int, depth: int = 0) -> None:
        """A node of the main graph (depth 0: counted and reported), or of a subgraph or function (only its
        attributes' tensors are checked)."""
        if depth == 0:
            self.node_count += 1
            if self.node_count > self.max_nodes:
                raise _too_complex(
                    f"The model has more than {self.max_nodes} nodes.", max_nodes=self.max_nodes
                )
        for number, _, value in self.wire.fields(end, _NODE):
            if number == 4 and depth == 0 and len(self.op_types) < _MAX_OP_TYPES:
                self.op_types.add(self.wire.string(value))
            elif number == 5:
                self.attribute(value, depth)

    def attribute(self, end: int, depth: int) -> None:
        """Tensors in a node attribute (a Constant's value, a subgraph's initializers) are checked like
        initializers: no external data, bounded sizes."""
        for number, _, value in self.wire.fields(end, _ATTRIBUTE):
            if number in (5, 10):  # t, tensors
                self.tensor(value)
            elif number in (22, 23):  # sparse_tensor, sparse_tensors
                self.sparse_tensor(value)
            elif number in (6, 11):  # g, graphs
                self.subgraph(value, depth + 1)

    def subgraph(self, end: int, depth: int) -> None:
        if depth > _MAX_SUBGRAPH_DEPTH:
            raise _too_complex(f"The model nests subgraphs more than {_MAX_SUBGRAPH_DEPTH} deep.")
        for number, _, value in self.wire.fields(end, _GRAPH):
            if number == 1:
                self.node(value, depth)
            elif number == 5:
                self.tensor(value)
            elif number == 15:
                self.sparse_tensor(value)

    def initializer(self, end: int) -> None:
        name, numel = self.tensor(end)
        self.add_initializer(name, numel)

    def sparse_initializer(self, end: int) -> None:
        name, stored = self.sparse_tensor(end)
        self.add_initializer(name, stored)

    def sparse_tensor(self, end: int) -> tuple[str, int]:
        """Name and stored element count of a SparseTensorProto, checked like a tensor."""
        name, stored, dims = "", 0, []
        for number, wire_type, value in self.wire.fields(end, _SPARSE_TENSOR):
            if number == 1:
                name, stored = self.tensor(value)
            elif number == 2:
                self.tensor(value)  # indices: checked for external data and size only
            elif number == 3:
                self.read_dims(wire_type, value, dims)
        self.numel(name, dims)
        return name, stored

    def add_initializer(self, name: str, numel: int) -> None:
        self.initializer_count += 1
        if self.initializer_count > self.max_nodes:
            raise _too_complex(f"The model has more than {self.max_nodes} initializers.")
        self.initializer_names.add(name)
        self.params += numel

    def tensor(self, end: int) -> tuple[str, int]:
        """Name and element count of a TensorProto; its data is skipped."""
        name, dims, external = "", [], False
        for number, wire_type, value in self.wire.fields(end, _TENSOR):
            if number == 1:
                self.read_dims(wire_type, value, dims)
            elif number == 8:
                name = self.wire.string(value)
            elif number == 13 or (number == 14 and value == 1):
                external = True
        if external:
            raise ModelRejected(
                "external_data_not_allowed",
                f"Tensor {name!r} keeps its data in an external file. Upload a single "
                "self-contained .onnx file (e.g. torch.onnx.export(..., external_data=False)).",
                {"tensor": name},
            )
        return name, self.numel(name, dims)

    def read_dims(self, wire_type: int, value: int, dims: list[int]) -> None:
        for dim in self.wire.int64s(wire_type, value):
            dims.append(dim)
            if len(dims) > _MAX_RANK:
                raise _too_complex(f"A tensor has more than {_MAX_RANK} dimensions.")

    def numel(self, name: str, dims: list[int]) -> int:
        if any(dim < 0 for dim in dims):
            raise _too_complex(f"Tensor {name!r} has a negative dimension.", tensor=name)
        if 0 in dims:
            return 0
        numel = 1
        for dim in dims:
            numel *= dim
            if numel > self.max_tensor_elements:
                raise _too_complex(
                    f"Tensor {name!r} is too large: more than {self.max_tensor_elements} elements.",
                    tensor=name,
                )
        return numel

    def value_info(self, end: int) -> TensorSpec:
        name, dtype, shape = "", "unknown", []
        for number, _, value in self.wire.fields(end, _VALUE_INFO):
            if number == 1:
                name = self.wire.string(value)
            elif number == 2:
                dtype, shape = self.value_type(value)
        return TensorSpec(name, dtype, shape)

    def value_type(self, end: int) -> tuple[str, list]:
        dtype, shape = "unknown", []
        for number, _, value in self.wire.fields(end, _TYPE):
            if number in (1, 8):  # tensor_type, sparse_tensor_type
                for inner, _, inner_value in self.wire.fields(value, _TENSOR_TYPE):
                    if inner == 1:
                        dtype = _ELEM_TYPES.get(inner_value, f"type{inner_value}")
                    elif inner == 2:
                        shape = self.shape(inner_value)
            elif number in _OTHER_VALUE_TYPES:
                dtype = _OTHER_VALUE_TYPES[number]
        return dtype, shape

    def shape(self, end: int) -> list[int | str | None]:
        dims = []
        for number, _, value in self.wire.fields(end, _SHAPE):
            if number == 1:
                dims.append(self.dimension(value))
                if len(dims) > _MAX_RANK:
                    raise _too_complex(
                        f"A graph input or output has more than {_MAX_RANK} dimensions."
                    )
        return dims

    def dimension(self, end: int) -> int | str | None:
        dim = None
        for number, _, value in self.wire.fields(end, _DIMENSION):
            if number == 1:
                dim = _int64(value)
            elif number == 2:
                dim = self.wire.string(value)
        return dim

    def is_model(self) -> bool:
        return self.ir_version > 0 and bool(self.opsets) and self.has_graph and self.node_count > 0

    def info(self) -> ModelInfo:
        return ModelInfo(
            format="onnx",
            inputs=[spec for spec in self.inputs if spec.name not in self.initializer_names],
            outputs=self.outputs,
            params=self.params,
            details={
                "ir_version": self.ir_version,
                "opset": self.opsets,
                "producer_name": self.producer_name,
                "node_count": self.node_count,
                "op_types": sorted(self.op_types),
            },
        )


def _inspect_onnx(
    f, size: int, starts_with_ir_version: bool, max_nodes: int, max_tensor_elements: int
) -> ModelInfo:
    scan = _OnnxScan(f, max_nodes, max_tensor_elements)
    try:
        scan.model(size)
    except _WireError as exc:
        # A file that starts with a plausible ir_version field is taken to be a damaged ONNX.
        if starts_with_ir_version and 0 < scan.ir_version <= _MAX_PLAUSIBLE_IR_VERSION:
            raise ModelRejected(
                "corrupt_model",
                f"The ONNX model is truncated or corrupt ({exc.reason} at byte {exc.offset}).",
                {"reason": exc.reason, "offset": exc.offset},
            ) from None
        raise ModelRejected("not_a_model", _NOT_A_MODEL_MESSAGE) from None
    if not scan.is_model():
        raise ModelRejected("not_a_model", _NOT_A_MODEL_MESSAGE)
    return scan.info()


# --------------------------------------------------------------------------- TorchScript

_ZIP_ERRORS = (
    zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError, NotImplementedError,
)


def _inspect_zip(f, max_tensor_elements: int) -> ModelInfo:
    try:
        # zipfile reads the whole central directory into memory: check its declared size first.
        if zip_directory(f).size > _MAX_ZIP_DIRECTORY:
            raise _too_complex("The ZIP archive has too many entries.")
        with zipfile.ZipFile(f) as archive:
            return _inspect_archive(archive, max_tensor_elements)
    except _ZIP_ERRORS as exc:
        raise ModelRejected(
            "corrupt_model", f"The ZIP archive cannot be read: {exc}", {"reason": str(exc)}
        ) from None


def _is_torch_export_entry(name: str) -> bool:
    parts = name.split("/")
    return parts[-1] == "archive_format" or (
        len(parts) >= 3 and parts[-2] == "models" and parts[-1].endswith(".json")
    )


def _inspect_archive(archive: zipfile.ZipFile, max_tensor_elements: int) -> ModelInfo:
    members = {info.filename: info for info in archive.infolist()}
    if any(_is_torch_export_entry(name) for name in members):
        raise ModelRejected(
            "unsupported_model",
            "torch.export (.pt2) archives are not supported yet; upload TorchScript "
            "(torch.jit.save) or ONNX instead.",
        )
    roots = sorted(
        name.removesuffix("/data.pkl")
        for name in members
        if name.endswith("/data.pkl") and name.count("/") == 1
    )
    if not roots:
        raise ModelRejected("not_a_model", _NOT_A_MODEL_MESSAGE)
    _check_expansion(members)
    root = _single_root(archive.namelist())
    has_code = any(name.startswith(f"{root}/code/") for name in members)
    if not has_code and f"{root}/constants.pkl" not in members:
        raise ModelRejected("unsupported_model", _PICKLE_MESSAGE)

    params = 0
    for pickle_name in ("data.pkl", "constants.pkl"):
        info = members.get(f"{root}/{pickle_name}")
        numels = _read_storage_numels(archive, info) if info else {}
        for key, numel in numels.items():
            if numel > max_tensor_elements:
                raise _too_complex(
                    f"Stored tensor {key!r} is too large: more than {max_tensor_elements} elements.",
                    tensor=key,
                )
        params += sum(numels.values())

    _check_torchscript_code(archive, root)

    storage_dirs = (f"{root}/data/", f"{root}/constants/")
    tensor_count = sum(
        1 for name, info in members.items() if name.startswith(storage_dirs) and not info.is_dir()
    )
    return ModelInfo(
        format="torchscript",
        inputs=[],
        outputs=[],
        params=params,
        details={"archive_name": root, "tensor_count": tensor_count, "has_code": has_code},
        traced_inputs=_traced_inputs(archive, members, root),
    )


# --------------------------------------------------------------------------- TorchScript: traced example inputs

# torch.jit.trace keeps the example inputs in the archive (``<root>/traced_inputs.pkl``, a pickle of
# ``{"forward": [tensor, ...]}``, tensors as ``_rebuild_tensor_v2(storage, offset, size, stride, ...)``); their
# shapes are read from the pickle's opcodes like the storages above (nothing is unpickled or loaded), their names
# from forward's signature in the root class's code. Anything unexpected means "not known": an empty list, never
# a refusal (the worker's loader does not read this member).
_MAX_TRACED_PICKLE_BYTES = 1024 * 1024
_MAX_TRACED_INPUTS = 64
_MAX_SIGNATURE_CODE_BYTES = 4 * 1024 * 1024
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool",
}
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class _Global:
    module: str
    name: str


@dataclass(frozen=True)
class _Tensor:
    dtype: str
    shape: tuple


def _traced_inputs(archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], root: str) -> list[TensorSpec]:
    info = members.get(f"{root}/traced_inputs.pkl")
    if info is None or info.file_size > _MAX_TRACED_PICKLE_BYTES:
        return []
    try:
        with archive.open(info) as member:
            data = member.read(_MAX_TRACED_PICKLE_BYTES + 1)
        if len(data) > _MAX_TRACED_PICKLE_BYTES:
            return []
        traced = _pickled_value(data, info.filename)
        examples = traced.get("forward") if isinstance(traced, dict) else None
        if not isinstance(examples, list) or not 0 < len(examples) <= _MAX_TRACED_INPUTS:
            return []
        if not all(isinstance(t, _Tensor) and t.dtype != "unknown" and t.shape for t in examples):
            return []  # a scalar or a non-tensor argument (tuples, ints): no plain tensor inputs to describe
        names = _forward_argument_names(archive, members, root)
    except (*_ZIP_ERRORS, ModelRejected, IndexError, KeyError, TypeError):
        return []
    if names is None or len(names) != len(examples):
        return []
    return [TensorSpec(name, t.dtype, list(t.shape)) for name, t in zip(names, examples)]


def _pickled_value(data: bytes, where: str, persistent: Callable[[Any], None] | None = None):
    """What a TorchScript pickle holds, rebuilt from the opcodes ``pickletools.genops`` decodes, without importing
    or calling anything: strings, numbers, tuples, lists and dicts as themselves, a tensor as
    ``_Tensor(dtype, shape)``, a type tag as the value it tags; any other object is None. Globals outside
    TorchScript's own are refused (_check_global); `persistent` is shown each persistent id (BINPERSID)."""
    stack: list = []
    marks: list[int] = []
    memo: dict = {}
    for opcode, arg, _ in pickletools.genops(data):
        name = opcode.name
        if name == "STOP":
            break
        if name == "MARK":
            marks.append(len(stack))
            continue
        if name in _MEMO_PUT:
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            continue
        if name in _MEMO_GET:
            stack.append(memo.get(arg))
            continue
        before = opcode.stack_before
        popped: list = []
        below_mark = len(before)
        if pickletools.markobject in before:
            start = marks.pop()
            popped = stack[start:]
            del stack[start:]
            below_mark = before.index(pickletools.markobject)
        if below_mark:
            if len(stack) < below_mark:
                raise ValueError("pickle stack underflow")
            popped = stack[-below_mark:] + popped
            del stack[-below_mark:]

        result = None
        if name in ("GLOBAL", "INST", "STACK_GLOBAL") or name.startswith("EXT"):
            if name == "STACK_GLOBAL":
                module, attr = popped
            elif isinstance(arg, str) and " " in arg:
                module, attr = arg.split(" ", 1)
            else:  # EXT*: a global by number, from the copyreg extension registry
                module, attr = None, None
            _check_global(module, attr, where)
            result = _Global(module, attr)
        elif name in _TUPLES:
            result = tuple(popped)
        elif name == "EMPTY_LIST":
            result = []
        elif name == "EMPTY_DICT":
            result = {}
        elif name in ("APPEND", "APPENDS") and isinstance(popped[0], list):
            result = popped[0]
            result.extend(popped[1:])
        elif name in ("SETITEM", "SETITEMS") and isinstance(popped[0], dict):
            result = popped[0]
            items = popped[1:]
            for key, value in zip(items[::2], items[1::2]):
                if isinstance(key, (str, int)):
                    result[key] = value
        elif name == "BINPERSID":
            result = popped[0]
            if persistent is not None:
                persistent(result)
        elif name == "REDUCE":
            result = _reduce(*popped)
        elif not before and opcode.arg is not None:
            result = arg  # a literal: int, str, bytes, float
        stack.extend([result] * len(opcode.stack_after))
    return stack[-1] if stack else None


def _reduce(func, args):
    if not isinstance(func, _Global) or not isinstance(args, tuple):
        return None
    if (func.module, func.name) == ("torch.jit._pickle", "restore_type_tag") and args:
        return args[0]
    if (func.module, func.name) == ("torch._utils", "_rebuild_tensor_v2") and len(args) >= 3:
        storage, size = args[0], args[2]
        if not (isinstance(size, tuple) and len(size) <= _MAX_RANK and all(type(d) is int and d >= 0 for d in size)):
            return None
        kind = storage[1] if isinstance(storage, tuple) and len(storage) == 5 and storage[0] == "storage" else None
        dtype = _STORAGE_DTYPES.get(kind.name, "unknown") if isinstance(kind, _Global) else "unknown"
        return _Tensor(dtype, size)
    return None


def _forward_argument_names(
    archive: zipfile.ZipFile, members: dict[str, zipfile.ZipInfo], root: str
) -> list[str] | None:
    """The names of the root module's forward arguments (after self), all annotated ``Tensor``; None when unknown.
    The root module's class is the first global of ``data.pkl`` (``__torch__.<path> <Class>``), its code is in
    ``code/__torch__/<path>.py``."""
    data_info = members.get(f"{root}/data.pkl")
    if data_info is None:
        return None
    with archive.open(data_info) as member:
        head = member.read(4096)
    cls = None
    try:
        for opcode, arg, _ in pickletools.genops(head):
            if opcode.name == "GLOBAL":
                cls = arg.split(" ", 1) if " " in arg else None
                break
    except ValueError:  # the 4 KiB cut the pickle short before a global
        return None
    if cls is None or not (cls[0] == "__torch__" or cls[0].startswith("__torch__.")):
        return None
    path = f"{root}/code/" + cls[0].replace(".", "/") + ".py"
    info = members.get(path)
    if info is None or info.file_size > _MAX_SIGNATURE_CODE_BYTES:
        return None
    with archive.open(info) as member:
        source = member.read(_MAX_SIGNATURE_CODE_BYTES + 1).decode("utf-8", "replace")
    return _signature_names(source, cls[1])


def _signature_names(source: str, class_name: str) -> list[str] | None:
    match = re.search(rf"^class {re.escape(class_name)}\(", source, re.MULTILINE)
    if match is None:
        return None
    body = source[match.end():]
    next_class = re.search(r"^class ", body, re.MULTILINE)
    body = body[: next_class.start()] if next_class else body
    forward = re.search(r"^\s+def forward\(", body, re.MULTILINE)
    if forward is None:
        return None
    params, depth, current = [], 0, []
    for ch in body[forward.end():]:
        if ch in "([" :
            depth += 1
        elif ch in ")]":
            if depth == 0:
                break
            depth -= 1
        if ch == "," and depth == 0:
            params.append("".join(current))
            current = []
        else:
            current.append(ch)
    else:
        return None
    params.append("".join(current))
    params = [p.strip() for p in params if p.strip()]
    names = []
    for param in params[1:]:  # after self
        name, _, annotation = param.partition(":")
        if not _IDENTIFIER.match(name.strip()) or annotation.split("=", 1)[0].strip() != "Tensor":
            return None
        names.append(name.strip())
    return names


def _member_name_problem(name: str) -> str | None:
    if "\\" in name:
        return "contains a backslash"
    if "\x00" in name:
        return "contains a NUL character"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    if any(part in (".", "..") for part in name.split("/")):
        return "contains a '..' or '.' path component"
    return None


def _single_root(members: list[str]) -> str:
    """The archive's one root folder. torch.jit.save writes every member once, as ``<root>/...``; an archive with
    names that are not plain relative paths, with a name twice, or with members in more than one root folder (or
    beside it), could be read by ``torch.jit.load`` from other members than those inspected here, so it is refused."""
    seen: set[str] = set()
    twice = next((name for name in members if name in seen or seen.add(name)), None)
    if twice is not None:
        raise ModelRejected(
            "unsupported_model",
            f"Archive member {twice[:200]!r} appears more than once; a TorchScript archive (torch.jit.save) holds "
            "each member once, and with two the loader could read another one than was inspected.",
            {"member": twice[:200]},
        )
    for name in members:
        problem = _member_name_problem(name)
        if problem:
            raise ModelRejected(
                "unsupported_model",
                f"Archive member {name[:200]!r} {problem}; a TorchScript archive (torch.jit.save) holds only "
                "relative paths inside one folder.",
                {"member": name[:200]},
            )
    tops = sorted({name.split("/", 1)[0] for name in members})
    loose = sorted(name for name in members if "/" not in name)
    if len(tops) != 1 or loose:
        shown = ", ".join(repr(t[:100]) for t in tops[:10]) + (", ..." if len(tops) > 10 else "")
        raise ModelRejected(
            "unsupported_model",
            f"The archive has {len(tops)} root folders or files ({shown}); a TorchScript archive "
            "(torch.jit.save) has exactly one root folder, and with more the loader could read another one than "
            "was inspected.",
            {"roots": [t[:200] for t in tops[:20]]},
        )
    return tops[0]


def _check_torchscript_code(archive: zipfile.ZipFile, root: str) -> None:
    """TorchScript code is a program: its source must call no operator that reads or writes files, starts processes
    or uses the network, nor an operator namespace or C++ class outside those ordinary models use. A first, textual
    check that refuses such uploads early (app/models/torchscript_source.py); the worker checks the compiled graphs
    of every method (worker/engine/torch_io.py), which is authoritative."""
    try:
        unsafe = unsafe_call_in_archive(archive, root)
    except CodeTooLarge as exc:
        raise _too_complex(f"{str(exc).capitalize()}.") from None
    if unsafe is not None:
        name, found = unsafe
        raise ModelRejected(
            "unsafe_torchscript",
            f"The TorchScript code in {name!r} calls {found}, which is not allowed: uploaded TorchScript "
            "may call only the operators ordinary models use, none that reads or writes files, starts processes "
            "or uses the network. Export the model without such calls (or to ONNX).",
            {"member": name, "operator": found},
        )


def _check_expansion(members: dict[str, zipfile.ZipInfo]) -> None:
    """Refuse members that expand far beyond their compressed size: the worker's loader would inflate them."""
    for name, info in members.items():
        if info.file_size > _EXPANSION_FLOOR and info.file_size > _MAX_EXPANSION * max(info.compress_size, 1):
            raise _too_complex(
                f"Archive member {name!r} is too large for its compressed size: it expands from "
                f"{info.compress_size} to {info.file_size} bytes (a zip bomb); torch.jit.save writes its "
                "members uncompressed.",
                member=name, compressed_bytes=info.compress_size, uncompressed_bytes=info.file_size,
            )


def _read_storage_numels(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> dict[str, int]:
    """Storage numels of a pickle in the archive; ModelRejected if it is too large, unparseable or unsafe."""
    if info.file_size > _MAX_PICKLE_BYTES:
        raise _too_complex(
            f"The pickle {info.filename!r} is too large: {info.file_size} bytes uncompressed "
            f"(at most {_MAX_PICKLE_BYTES}).",
            member=info.filename,
        )
    with archive.open(info) as member:
        data = member.read(_MAX_PICKLE_BYTES + 1)  # bounded even if file_size lies
    if len(data) > _MAX_PICKLE_BYTES:
        raise _too_complex(
            f"The pickle {info.filename!r} is too large (over {_MAX_PICKLE_BYTES} bytes).", member=info.filename
        )
    try:
        return _storage_numels(data, info.filename)
    except (ValueError, IndexError, KeyError) as exc:
        raise ModelRejected(
            "corrupt_model",
            f"The pickle {info.filename!r} in the archive is truncated or corrupt ({exc}).",
            {"member": info.filename, "reason": str(exc)},
        ) from None


# The globals TorchScript's own (C++) unpickler understands: TorchScript classes (``__torch__.*``, compiled from
# the archive's code/, never Python), storage types, quantization schemes, tensor rebuilders and container tags.
# Anything else (``os system``, ``builtins eval``, ...) is there only to run code in a Python unpickler.
_TORCH_GLOBALS = frozenset({
    ("collections", "OrderedDict"),
    ("builtins", "complex"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_qtensor"),
    ("torch._utils", "_rebuild_sparse_tensor"),
    ("torch.jit._pickle", "build_intlist"),
    ("torch.jit._pickle", "build_tensorlist"),
    ("torch.jit._pickle", "build_doublelist"),
    ("torch.jit._pickle", "build_boollist"),
    ("torch.jit._pickle", "build_tensor_from_id"),
    ("torch.jit._pickle", "restore_type_tag"),
    ("torch", "per_tensor_affine"),
    ("torch", "per_channel_affine"),
    ("torch", "per_tensor_symmetric"),
    ("torch", "per_channel_symmetric"),
    ("torch", "per_channel_affine_float_qparams"),
})
_STORAGE_CLASS = re.compile(r"^[A-Z][A-Za-z0-9]*Storage$")


def _check_global(module: object, name: object, where: str) -> None:
    if isinstance(module, str) and isinstance(name, str):
        if module == "__torch__" or module.startswith("__torch__."):
            return
        if (module, name) in _TORCH_GLOBALS or (module == "torch" and _STORAGE_CLASS.match(name)):
            return
        shown = f"{module}.{name}"
    else:
        shown = "a global computed at load time"
    raise ModelRejected(
        "unsafe_pickle",
        f"The pickle {where!r} references {shown[:200]!r}, which a TorchScript archive never contains; "
        "pickled Python objects are not accepted because loading them can execute arbitrary code.",
        {"member": where, "global": shown[:200]},
    )


_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}
_TUPLES = {"EMPTY_TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "TUPLE"}


def _storage_numels(data: bytes, where: str = "data.pkl") -> dict[str, int]:
    """Map storage key -> element count for the torch storages a pickle references: torch stores a tensor's
    storage as the persistent id ``('storage', <storage class>, key, location, numel)``. The pickle is walked by
    `_pickled_value` (nothing imported or called; a global TorchScript never writes is ModelRejected)."""
    numels: dict[str, int] = {}
    _pickled_value(data, where, persistent=lambda pid: _record_storage(pid, numels))
    return numels


def _record_storage(pid, numels: dict[str, int]) -> None:
    if isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage":
        key, numel = pid[2], pid[4]
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise ValueError("malformed storage record")
        numels[key] = numel
