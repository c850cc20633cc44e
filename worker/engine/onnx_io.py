"""Safe loading of ONNX models and onnxruntime sessions over them.

A model is read once into memory, parsed without following external-data references, refused if any tensor lives
outside the file, and checked by onnx's checker; onnxruntime is then given those same bytes, never the path, so it
runs exactly what was checked. Nothing is unpickled.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import reduce
from operator import mul
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .core import EngineError, first_line
from .data import Feeds, TensorSpec
from .measure import rss_peak_growth


@dataclass(frozen=True)
class OnnxModel:
    path: Path
    raw: bytes  # the exact bytes that were checked
    proto: onnx.ModelProto
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def size_bytes(self) -> int:
        return len(self.raw)

    @property
    def params(self) -> int:
        return count_weights(self.proto)

    @property
    def quant_params(self) -> int:
        return count_quant_params(self.proto)

    @property
    def opset(self) -> int | None:
        return next((o.version for o in self.proto.opset_import if o.domain in ("", "ai.onnx")), None)


def load_onnx_model(path: Path, error_code: str = "invalid_model") -> OnnxModel:
    """Read, parse and check an ONNX file; any problem is EngineError(error_code)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise EngineError(error_code, f"cannot read the model file: {exc.strerror or exc}") from None
    try:
        proto = onnx.load(io.BytesIO(raw), load_external_data=False)
    except MemoryError:
        raise
    except Exception as exc:
        raise EngineError(error_code, f"not an ONNX model: {type(exc).__name__}: {exc}") from None
    external = next((t.name for t in _all_tensors(proto) if _uses_external_data(t)), None)
    if external is not None:
        raise EngineError(
            error_code, f"tensor {external!r} is stored as external data; upload a single self-contained .onnx file"
        )
    try:
        onnx.checker.check_model(proto)
    except MemoryError:
        raise
    except Exception as exc:
        raise EngineError(error_code, f"the ONNX model is invalid: {first_line(exc)}") from None
    initializer_names = {t.name for t in proto.graph.initializer}
    graph_inputs = [v for v in proto.graph.input if v.name not in initializer_names]
    if not graph_inputs:
        raise EngineError(error_code, "the ONNX model has no inputs")
    inputs = tuple(_tensor_spec(v, error_code, strict=True) for v in graph_inputs)
    outputs = tuple(_tensor_spec(v, error_code, strict=False) for v in proto.graph.output)
    return OnnxModel(Path(path), raw, proto, inputs, outputs)


def count_weights(proto: onnx.ModelProto) -> int:
    """Weight and bias elements: the main graph's initializers (dense and sparse), less the scales and zero points
    of quantization (`count_quant_params`) and int64 initializers (shapes, axes and indices, never weights). A
    quantized model thus counts the tensors of the model it was made from: its int8 weights and int32 biases.
    torch_io.count_weights counts a torch module the same way; a report's `params` is this count."""
    return param_counts(proto)[0]


def count_quant_params(proto: onnx.ModelProto) -> int:
    """Elements of the initializers a quantized model adds: the scales and zero points of its weights, biases and
    activations (0 for a float model)."""
    return param_counts(proto)[1]


#: Input positions that hold a scale or a zero point, by op type (ONNX and com.microsoft quantized ops).
_QUANT_PARAM_INPUTS: dict[str, tuple[int, ...]] = {
    "QuantizeLinear": (1, 2),
    "DequantizeLinear": (1, 2),
    "DynamicQuantizeLinear": (),
    "ConvInteger": (2, 3),
    "MatMulInteger": (2, 3),
    "QLinearConv": (1, 2, 4, 5, 6, 7),
    "QLinearMatMul": (1, 2, 4, 5, 6, 7),
    "QLinearAdd": (1, 2, 4, 5, 6, 7),
    "QLinearMul": (1, 2, 4, 5, 6, 7),
    "QGemm": (1, 2, 4, 5, 7, 8),
    "DynamicQuantizeMatMul": (2, 3),
    "MatMulIntegerToFloat": (2, 3, 4, 5),
}


def param_counts(proto: onnx.ModelProto) -> tuple[int, int]:
    """(weight and bias elements, quantization scale and zero-point elements) of the main graph's initializers.

    An initializer is a scale or zero point when a node reads it at such an input (QuantizeLinear and
    DequantizeLinear inputs 1 and 2, ConvInteger/MatMulInteger zero points, QLinear* scales and zero points), or when
    it is multiplied with the activation scale that a DynamicQuantizeLinear computes (onnxruntime's dynamic int8
    rescales ConvInteger/MatMulInteger outputs by that product with the weight's scale)."""
    graph = proto.graph
    dynamic_scales = {node.output[1] for node in graph.node if node.op_type == "DynamicQuantizeLinear"
                      and len(node.output) > 1}
    quant_names: set[str] = set()
    for node in graph.node:
        positions = _QUANT_PARAM_INPUTS.get(node.op_type, ())
        quant_names.update(node.input[i] for i in positions if i < len(node.input) and node.input[i])
        if node.op_type == "Mul" and any(name in dynamic_scales for name in node.input):
            quant_names.update(name for name in node.input if name not in dynamic_scales)
    params = quant = 0
    for tensor in graph.initializer:
        n = _numel(tensor.dims)
        if tensor.name in quant_names:
            quant += n
        elif tensor.data_type != onnx.TensorProto.INT64:
            params += n
    params += sum(_numel(t.values.dims) for t in graph.sparse_initializer)
    return int(params), int(quant)


def _numel(dims) -> int:
    return reduce(mul, dims, 1)


def _uses_external_data(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL or len(tensor.external_data) > 0


def _all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto reachable from the model, wherever it sits: initializers (dense and sparse), node attributes
    (t, tensors, sparse tensors) in the main graph and in subgraphs at any depth, local functions' nodes and their
    attributes' default values (FunctionProto.attribute_proto), training-info graphs. Found by walking every message
    field of the parsed model, so that no place a tensor can be put is missed."""
    stack: list = [proto]
    while stack:
        message = stack.pop()
        if isinstance(message, onnx.TensorProto):
            yield message
            continue
        for field, value in message.ListFields():
            if field.type != field.TYPE_MESSAGE:
                continue
            if _is_repeated(field):
                stack.extend(value)
            else:
                stack.append(value)


def _is_repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)  # protobuf >= 5; `label` before
    return bool(repeated) if repeated is not None else field.label == field.LABEL_REPEATED


def _tensor_spec(value: onnx.ValueInfoProto, error_code: str, strict: bool) -> TensorSpec:
    """strict (inputs): the value must be a tensor of a numpy-representable type with a known rank."""
    if not value.type.HasField("tensor_type"):
        if strict:
            raise EngineError("unsupported", f"input {value.name!r} is not a tensor (sequences/maps are not supported)")
        return TensorSpec(value.name, None, np.dtype("float32"))
    tensor_type = value.type.tensor_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
    except Exception:
        if strict:
            name = onnx.TensorProto.DataType.Name(tensor_type.elem_type) if tensor_type.elem_type else "undefined"
            raise EngineError("unsupported", f"input {value.name!r} has element type {name}, not supported") from None
        dtype = np.dtype("float32")
    if dtype.kind not in "biuf" and strict:
        raise EngineError("unsupported", f"input {value.name!r} has dtype {dtype}, not supported")
    if not tensor_type.HasField("shape"):
        if strict:
            raise EngineError("unsupported", f"input {value.name!r} has no declared shape")
        return TensorSpec(value.name, None, dtype)
    dims: list[int | str | None] = []
    for dim in tensor_type.shape.dim:
        if dim.HasField("dim_value") and dim.dim_value > 0:
            dims.append(int(dim.dim_value))
        elif dim.HasField("dim_param") and dim.dim_param:
            dims.append(dim.dim_param)
        else:
            dims.append(None)
    if strict and not dims:
        raise EngineError("unsupported", f"input {value.name!r} is a scalar: inputs need a batch dimension")
    return TensorSpec(value.name, tuple(dims), dtype)



# --- onnxruntime -----------------------------------------------------------------------------------------------


def cpu_threads() -> int:
    """Cores this process may use (its affinity mask, not the whole machine)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def execution_providers(device: str) -> list[str]:
    """CUDA first when asked for and present in this onnxruntime build, else CPU only."""
    if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRunner:
    """An onnxruntime session over a checked model; `run` returns every output as a numpy array."""

    format = "onnx"

    def __init__(self, model: OnnxModel, device: str, error_code: str = "invalid_model"):
        options = ort.SessionOptions()
        options.intra_op_num_threads = cpu_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # errors only
        try:
            self.session = ort.InferenceSession(model.raw, options, providers=execution_providers(device))
        except Exception as exc:
            raise EngineError(error_code, f"onnxruntime cannot load the model: {first_line(exc)}") from None
        self.model = model
        self.inputs = model.inputs
        self.provider = self.session.get_providers()[0]
        self.threads = options.intra_op_num_threads

    @property
    def size_bytes(self) -> int:
        return self.model.size_bytes

    @property
    def params(self) -> int:
        return self.model.params

    @property
    def quant_params(self) -> int:
        return self.model.quant_params

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        return [np.asarray(out) for out in self.session.run(None, feeds)]

    def peak_memory_bytes(self, feeds: Feeds) -> int:
        """Resident-memory growth of the process during one run (host memory, also under the CUDA provider)."""
        return rss_peak_growth(lambda: self.run(feeds))
