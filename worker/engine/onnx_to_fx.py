"""ONNX -> torch.fx: `onnx_to_torch` turns an ONNX graph into a trainable `torch.fx.GraphModule`.

Real nn.Conv1d/2d/3d, nn.Linear, nn.BatchNorm1d/2d/3d and nn.Embedding modules hold the initializers (so
torch-pruning's dependency graph and an optimizer see them), other constants are buffers, and functional torch ops do
the rest; nodes whose inputs are all constants are folded once with onnx's reference evaluator. Ops it cannot convert
raise EngineError("unsupported"). Nothing here reads files: the graph comes in parsed (onnx_io.load_onnx_model
loads and checks an upload). A TorchScript model reaches this converter through its ONNX export
(torch_io.torchscript_to_torch).
"""

from __future__ import annotations

import keyword
import math
import re
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import fx, nn

from .core import EngineError, first_line

#: The opset read for a graph that imports none of the default domain: the one torch_io's exports write.
DEFAULT_OPSET = 17


def onnx_to_torch(model: onnx.ModelProto) -> fx.GraphModule:
    """A trainable torch.fx GraphModule computing the ONNX graph. Conv, Gemm/MatMul with a constant weight,
    BatchNormalization and Gather from a constant table become nn.Conv1d/2d/3d, nn.Linear, nn.BatchNorm1d/2d/3d and
    nn.Embedding holding the initializers as parameters; other constants are buffers; the rest are functional ops.

    The module (in eval mode) takes the graph inputs positionally (`module.input_names`, the ONNX names) and returns
    one tensor, or a tuple for several outputs (`module.output_names`). EngineError("unsupported") names the first op
    it cannot convert."""
    return _Converter(model).convert()


def _unsupported(message: str) -> EngineError:
    return EngineError("unsupported", message)


class _Converter:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), DEFAULT_OPSET)
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.values: dict[str, fx.Node] = {}
        self.buffers: dict[str, fx.Node] = {}
        self.module_names: set[str] = set()
        self.fused: dict[int, fx.Node] = {}  # index of an ONNX node folded into an earlier module -> its value
        nodes = list(model.graph.node)
        self.nodes = nodes
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(nodes):
            for name in node.input:
                if name:
                    self.consumers[name].append(i)
        self.graph_outputs = {o.name for o in model.graph.output}
        self.ranks = self._ranks()

    def _ranks(self) -> dict[str, int]:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model)
        except Exception:
            return {}
        ranks = {}
        for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
            tensor_type = value.type.tensor_type
            if tensor_type.HasField("shape"):
                ranks[value.name] = len(tensor_type.shape.dim)
        return ranks

    def convert(self) -> fx.GraphModule:
        input_names = [v.name for v in self.model.graph.input if v.name not in self.consts]
        used_identifiers: set[str] = set()
        for name in input_names:
            self.values[name] = self.graph.placeholder(_identifier(name, used_identifiers))
        for index, node in enumerate(self.nodes):
            if index in self.fused:
                self.values[node.output[0]] = self.fused[index]
                continue
            if node.domain not in ("", "ai.onnx"):
                raise _unsupported(
                    f"ONNX op {node.domain}.{node.op_type} cannot be converted to a trainable module yet"
                )
            inputs = [name for name in node.input if name]
            if node.op_type == "Constant" or (inputs and all(name in self.consts for name in inputs)):
                self._fold(node)
                continue
            handler = _OPS.get(node.op_type)
            if handler is None:
                raise _unsupported(f"ONNX op {node.op_type} cannot be converted to a trainable module yet")
            outputs = handler(self, node, {a.name: _attribute(a) for a in node.attribute})
            for name, value in zip(node.output, outputs):
                if name:
                    self.values[name] = value
        outputs = [self.operand(o.name) for o in self.model.graph.output]
        self.graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
        module = fx.GraphModule(self.root, self.graph)
        module.input_names = input_names
        module.output_names = [o.name for o in self.model.graph.output]
        return module.eval()

    # -- operands --

    def operand(self, name: str) -> fx.Node:
        """The fx value of an ONNX tensor: an activation, or a constant held as a buffer."""
        if name in self.values:
            return self.values[name]
        if name not in self.consts:
            raise _unsupported(f"ONNX tensor {name!r} is used before it is computed")
        if name not in self.buffers:
            buffer_name = f"const_{len(self.buffers)}"
            self.root.register_buffer(buffer_name, torch.from_numpy(np.array(self.consts[name])))
            self.buffers[name] = self.graph.get_attr(buffer_name)
        return self.buffers[name]

    def const(self, node: onnx.NodeProto, index: int, what: str) -> np.ndarray | None:
        """The constant value of the node's input `index` (None when the input is absent)."""
        if index >= len(node.input) or not node.input[index]:
            return None
        name = node.input[index]
        if name not in self.consts:
            raise _unsupported(f"ONNX op {node.op_type} with a computed {what} cannot be converted yet")
        return self.consts[name]

    def _fold(self, node: onnx.NodeProto) -> None:
        """Compute a node whose inputs are all constants once, with onnx's reference evaluator."""
        from onnx.reference import ReferenceEvaluator

        inputs = [name for name in node.input if name]
        graph = onnx.helper.make_graph(
            [node], "fold", [onnx.helper.make_empty_tensor_value_info(n) for n in inputs],
            [onnx.helper.make_empty_tensor_value_info(n) for n in node.output if n],
        )
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", self.opset)])
        try:
            results = ReferenceEvaluator(model).run(None, {n: self.consts[n] for n in inputs})
        except Exception as exc:
            raise _unsupported(f"ONNX op {node.op_type} on constants cannot be evaluated: {first_line(exc)}") from None
        for name, value in zip([n for n in node.output if n], results):
            self.consts[name] = np.asarray(value)

    # -- building --

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(fn, args, kwargs)

    def add_module(self, module: nn.Module, weight_name: str, fallback: str) -> str:
        """Register `module` on the root under a name taken from its weight's ONNX name ("layer1.0.conv1.weight"
        -> "layer1_0_conv1"), so reports name layers as the uploader's model did."""
        base = re.sub(r"\W", "_", weight_name.removesuffix(".weight")).strip("_") or fallback
        name, n = base, 1
        while name in self.module_names or hasattr(self.root, name):
            name, n = f"{base}_{n}", n + 1
        self.module_names.add(name)
        self.root.add_module(name, module)
        return name

    def call_module(self, module: nn.Module, weight_name: str, fallback: str, x: fx.Node) -> fx.Node:
        return self.graph.call_module(self.add_module(module, weight_name, fallback), (x,))

    def single_consumer(self, name: str) -> int | None:
        """The index of the only node reading tensor `name`, when it is not also a graph output."""
        users = self.consumers.get(name, [])
        if len(users) == 1 and name not in self.graph_outputs:
            return users[0]
        return None


def _attribute(attr: onnx.AttributeProto) -> Any:
    value = onnx.helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    return value


def _identifier(name: str, used: set[str]) -> str:
    base = re.sub(r"\W", "_", name) or "input"
    if base[0].isdigit() or keyword.iskeyword(base):
        base = f"input_{base}"
    candidate, n = base, 1
    while candidate in used:
        candidate, n = f"{base}_{n}", n + 1
    used.add(candidate)
    return candidate


def _param(array: np.ndarray) -> nn.Parameter:
    """A trainable copy of a float initializer, in its own dtype (an fp16 graph stays fp16)."""
    if array.dtype.kind != "f":
        raise _unsupported(f"a layer with {array.dtype} weights cannot be converted to a trainable module yet")
    return nn.Parameter(torch.from_numpy(np.array(array)))


# -- helpers the generated forward calls (module-level so that fx code and deepcopy can reference them) --


def _reshape(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """ONNX Reshape with allowzero=0: a 0 keeps that input dim."""
    return x.reshape(tuple(x.shape[i] if d == 0 else d for i, d in enumerate(shape)))


def _flatten(x: torch.Tensor, axis: int) -> torch.Tensor:
    """ONNX Flatten for an axis other than 1: (prod(dims[:axis]), prod(dims[axis:]))."""
    axis = axis % x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), -1)


def _softmax_2d(x: torch.Tensor, axis: int, log: bool) -> torch.Tensor:
    """Softmax before opset 13: over the input flattened to 2-D at `axis`."""
    shape = x.shape
    flat = x.reshape(math.prod(shape[:axis]), -1)
    out = F.log_softmax(flat, dim=1) if log else F.softmax(flat, dim=1)
    return out.reshape(shape)


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ONNX Div: integer division truncates."""
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _global_pool(x: torch.Tensor, reduce: str) -> torch.Tensor:
    dims = tuple(range(2, x.dim()))
    return x.mean(dim=dims, keepdim=True) if reduce == "mean" else x.amax(dim=dims, keepdim=True)


def _unsqueeze(x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def _matmul_gemm(a, b, c, alpha: float, beta: float, trans_a: bool, trans_b: bool) -> torch.Tensor:
    out = torch.matmul(a.t() if trans_a else a, b.t() if trans_b else b)
    if alpha != 1.0:
        out = out * alpha
    if c is not None:
        out = out + (c * beta if beta != 1.0 else c)
    return out


# -- op handlers: (converter, node, attrs) -> [fx value per output] --


def _pads(node: onnx.NodeProto, attrs: dict, kernel: list[int], dilations: list[int]) -> list[int]:
    """ONNX pads [x1_begin, x2_begin, ..., x1_end, x2_end, ...] from `pads` or `auto_pad`."""
    auto_pad = attrs.get("auto_pad", "NOTSET")
    rank = len(kernel)
    if auto_pad in ("NOTSET", ""):
        return list(attrs.get("pads", [0] * 2 * rank))
    if auto_pad == "VALID":
        return [0] * 2 * rank
    if any(s != 1 for s in attrs.get("strides", [1] * rank)):
        raise _unsupported(f"ONNX op {node.op_type} with auto_pad={auto_pad} and strides > 1 cannot be converted yet")
    totals = [d * (k - 1) for k, d in zip(kernel, dilations)]
    begins = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
    return begins + [t - b for t, b in zip(totals, begins)]


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX pads -> F.pad's (last dim begin, last dim end, previous dim begin, ...)."""
    rank = len(pads) // 2
    out: list[int] = []
    for axis in reversed(range(rank)):
        out += [pads[axis], pads[axis + rank]]
    return out


def _split_pads(pads: list[int]) -> tuple[list[int], list[int] | None]:
    """(symmetric padding for the op, explicit F.pad spec or None)."""
    rank = len(pads) // 2
    if pads[:rank] == pads[rank:]:
        return pads[:rank], None
    return [0] * rank, _torch_pad(pads)


def _conv(c: _Converter, node, attrs):
    weight = c.const(node, 1, "weight")
    bias = c.const(node, 2, "bias")
    kernel = list(weight.shape[2:])
    rank = len(kernel)
    if rank not in (1, 2, 3):
        raise _unsupported(f"ONNX Conv with a {rank}-D kernel cannot be converted yet")
    dilations = list(attrs.get("dilations", [1] * rank))
    padding, explicit = _split_pads(_pads(node, attrs, kernel, dilations))
    groups = int(attrs.get("group", 1))
    conv_cls = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[rank - 1]
    conv = conv_cls(
        int(weight.shape[1]) * groups, int(weight.shape[0]), kernel, stride=list(attrs.get("strides", [1] * rank)),
        padding=padding, dilation=dilations, groups=groups, bias=bias is not None,
    )
    conv.weight = _param(weight)
    if bias is not None:
        conv.bias = _param(bias)
    x = c.operand(node.input[0])
    if explicit is not None:
        x = c.call(F.pad, x, explicit)
    return [c.call_module(conv, node.input[1], "conv", x)]


def _linear(c: _Converter, node, weight_kn: np.ndarray, bias: np.ndarray | None, x: fx.Node) -> fx.Node:
    """nn.Linear computing x @ weight_kn (+ bias). Without a bias, an Add of a constant (N,) that alone reads the
    product is folded in as the bias (MatMul + Add is how exporters write a Linear on 3-D inputs)."""
    fused_add = None
    if bias is None:
        fused_add, bias = _fusable_bias(c, node, int(weight_kn.shape[1]))
    linear = nn.Linear(int(weight_kn.shape[0]), int(weight_kn.shape[1]), bias=bias is not None)
    linear.weight = _param(weight_kn.T)
    if bias is not None:
        linear.bias = _param(bias)
    value = c.call_module(linear, node.input[1], "linear", x)
    if fused_add is not None:
        c.fused[fused_add] = value
    return value


def _fusable_bias(c: _Converter, node, n: int) -> tuple[int | None, np.ndarray | None]:
    """(index of the Add to fold, its constant as a (n,) bias), or (None, None)."""
    out = node.output[0]
    user = c.single_consumer(out)
    if user is None or c.nodes[user].op_type != "Add":
        return None, None
    add = c.nodes[user]
    value = c.consts.get(add.input[1] if add.input[0] == out else add.input[0])
    if value is None or value.dtype.kind != "f" or value.size != n or value.shape[-1:] != (n,):
        return None, None
    return user, value.reshape(-1)


def _matmul(c: _Converter, node, attrs):
    weight = c.consts.get(node.input[1])
    if weight is None or weight.ndim != 2 or node.input[0] in c.consts:
        return [c.call(torch.matmul, c.operand(node.input[0]), c.operand(node.input[1]))]
    return [_linear(c, node, weight, None, c.operand(node.input[0]))]


def _gemm(c: _Converter, node, attrs):
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    trans_a, trans_b = bool(attrs.get("transA", 0)), bool(attrs.get("transB", 0))
    a = c.operand(node.input[0])
    b = c.consts.get(node.input[1])
    bias = c.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    has_c = len(node.input) > 2 and bool(node.input[2])
    if b is None or (has_c and bias is None):
        cc = c.operand(node.input[2]) if has_c else None
        return [c.call(_matmul_gemm, a, c.operand(node.input[1]), cc, alpha, beta, trans_a, trans_b)]
    weight_kn = alpha * (b.T if trans_b else b)
    n = int(weight_kn.shape[1])
    if bias is not None:
        if bias.size not in (1, n) or (bias.ndim == 2 and bias.shape[0] != 1):
            raise _unsupported("ONNX Gemm with a full (M, N) C matrix cannot be converted yet")
        bias = np.broadcast_to(beta * bias.reshape(-1), (n,)).astype(bias.dtype)
    if trans_a:
        a = c.call(torch.transpose, a, 0, 1)
    return [_linear(c, node, weight_kn.astype(b.dtype), bias, a)]


def _batch_norm(c: _Converter, node, attrs):
    if attrs.get("training_mode", 0) or len([o for o in node.output if o]) > 1:
        raise _unsupported("ONNX BatchNormalization in training mode cannot be converted yet")
    scale, bias, mean, var = (c.const(node, i, "statistic") for i in (1, 2, 3, 4))
    rank = c.ranks.get(node.input[0], 4)
    bn_cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank)
    if bn_cls is None:
        raise _unsupported(f"ONNX BatchNormalization on a rank-{rank} input cannot be converted yet")
    momentum = 1.0 - float(attrs.get("momentum", 0.9))  # ONNX weighs the running value, torch the new one
    bn = bn_cls(int(scale.size), eps=float(attrs.get("epsilon", 1e-5)), momentum=momentum)
    bn.weight = _param(scale)
    bn.bias = _param(bias)
    bn.running_mean = torch.from_numpy(np.array(mean))
    bn.running_var = torch.from_numpy(np.array(var))
    return [c.call_module(bn, node.input[1], "batchnorm", c.operand(node.input[0]))]


def _gather(c: _Converter, node, attrs):
    table = c.consts.get(node.input[0])
    if table is None or table.ndim != 2 or attrs.get("axis", 0) != 0 or node.input[1] in c.consts:
        raise _unsupported("ONNX Gather other than a lookup in a constant 2-D table cannot be converted yet")
    embedding = nn.Embedding(int(table.shape[0]), int(table.shape[1]))
    embedding.weight = _param(table)
    return [c.call_module(embedding, node.input[0], "embedding", c.operand(node.input[1]))]


def _pool(c: _Converter, node, attrs):
    if len([o for o in node.output if o]) > 1:
        raise _unsupported(f"ONNX {node.op_type} with an indices output cannot be converted yet")
    kernel = list(attrs["kernel_shape"])
    rank = len(kernel)
    if rank not in (1, 2, 3):
        raise _unsupported(f"ONNX {node.op_type} with a {rank}-D kernel cannot be converted yet")
    dilations = list(attrs.get("dilations", [1] * rank))
    padding, explicit = _split_pads(_pads(node, attrs, kernel, dilations))
    strides = list(attrs.get("strides", [1] * rank))
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    x = c.operand(node.input[0])
    if node.op_type == "MaxPool":
        if explicit is not None:
            x = c.call(F.pad, x, explicit, "constant", -math.inf)
        fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[rank - 1]
        return [c.call(fn, x, kernel, strides, padding, dilations, ceil_mode=ceil_mode)]
    count_include_pad = bool(attrs.get("count_include_pad", 0))
    if any(d != 1 for d in dilations):
        raise _unsupported("ONNX AveragePool with dilations cannot be converted yet")
    if explicit is not None:
        if not count_include_pad:
            raise _unsupported("ONNX AveragePool with uneven pads that exclude padding cannot be converted yet")
        x = c.call(F.pad, x, explicit)
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[rank - 1]
    return [c.call(fn, x, kernel, strides, padding, ceil_mode=ceil_mode, count_include_pad=count_include_pad)]


def _reshape_op(c: _Converter, node, attrs):
    shape = [int(d) for d in c.const(node, 1, "shape")]
    x = c.operand(node.input[0])
    if attrs.get("allowzero", 0) and 0 in shape:
        raise _unsupported("ONNX Reshape with allowzero=1 and a 0 dim cannot be converted yet")
    if 0 not in shape:
        return [c.call(torch.reshape, x, tuple(shape))]
    if shape == [0, -1]:
        return [c.call(torch.flatten, x, 1)]
    if shape[0] == 0 and 0 not in shape[1:] and -1 not in shape[1:]:
        return [c.call(torch.reshape, x, (-1, *shape[1:]))]  # keeps the batch dim symbolic in an export
    return [c.call(_reshape, x, tuple(shape))]


def _flatten_op(c: _Converter, node, attrs):
    axis = int(attrs.get("axis", 1))
    x = c.operand(node.input[0])
    return [c.call(torch.flatten, x, 1) if axis == 1 else c.call(_flatten, x, axis)]


def _softmax(c: _Converter, node, attrs):
    log = node.op_type == "LogSoftmax"
    x = c.operand(node.input[0])
    if c.opset >= 13:
        return [c.call(F.log_softmax if log else F.softmax, x, dim=int(attrs.get("axis", -1)))]
    return [c.call(_softmax_2d, x, int(attrs.get("axis", 1)), log)]


def _axes(c: _Converter, node, attrs, index: int) -> list[int] | None:
    """Axes from the `axes` attribute (older opsets) or the constant input `index` (newer)."""
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    value = c.const(node, index, "axes")
    return None if value is None else [int(a) for a in value.reshape(-1)]


def _squeeze(c: _Converter, node, attrs):
    axes = _axes(c, node, attrs, 1)
    x = c.operand(node.input[0])
    return [c.call(torch.squeeze, x) if axes is None else c.call(torch.squeeze, x, tuple(axes))]


def _unsqueeze_op(c: _Converter, node, attrs):
    return [c.call(_unsqueeze, c.operand(node.input[0]), tuple(_axes(c, node, attrs, 1) or ()))]


def _reduce_mean(c: _Converter, node, attrs):
    axes = _axes(c, node, attrs, 1)
    keepdims = bool(attrs.get("keepdims", 1))
    x = c.operand(node.input[0])
    if axes is None:
        if attrs.get("noop_with_empty_axes", 0):
            return [x]
        return [c.call(_reduce_all_mean, x, keepdims)]
    return [c.call(torch.mean, x, dim=tuple(axes), keepdim=keepdims)]


def _reduce_all_mean(x: torch.Tensor, keepdim: bool) -> torch.Tensor:
    return x.mean(dim=tuple(range(x.dim())), keepdim=keepdim)


def _clip(c: _Converter, node, attrs):
    if c.opset < 11:
        low, high = attrs.get("min"), attrs.get("max")
    else:
        low_value, high_value = c.const(node, 1, "min"), c.const(node, 2, "max")
        low = None if low_value is None else float(low_value)
        high = None if high_value is None else float(high_value)
    return [c.call(torch.clamp, c.operand(node.input[0]), low, high)]


def _dropout(c: _Converter, node, attrs):
    if len([o for o in node.output if o]) > 1:
        raise _unsupported("ONNX Dropout with a mask output cannot be converted yet")
    ratio = attrs.get("ratio")
    if ratio is None:
        value = c.const(node, 1, "ratio")
        ratio = 0.5 if value is None else float(value)
    name = c.add_module(nn.Dropout(float(ratio)), "", "dropout")
    return [c.graph.call_module(name, (c.operand(node.input[0]),))]


_TORCH_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


def _cast(c: _Converter, node, attrs):
    dtype = _TORCH_DTYPES.get(int(attrs["to"]))
    if dtype is None:
        raise _unsupported(f"ONNX Cast to {onnx.TensorProto.DataType.Name(int(attrs['to']))} cannot be converted yet")
    return [c.call(torch.Tensor.to, c.operand(node.input[0]), dtype)]


def _concat(c: _Converter, node, attrs):
    return [c.call(torch.cat, [c.operand(name) for name in node.input], int(attrs["axis"]))]


def _transpose(c: _Converter, node, attrs):
    x = c.operand(node.input[0])
    perm = attrs.get("perm")
    if perm is None:
        rank = c.ranks.get(node.input[0])
        if rank is None:
            raise _unsupported("ONNX Transpose without perm on a tensor of unknown rank cannot be converted yet")
        perm = list(reversed(range(rank)))
    return [c.call(torch.permute, x, tuple(int(p) for p in perm))]


def _gelu(c: _Converter, node, attrs):
    return [c.call(F.gelu, c.operand(node.input[0]), approximate=attrs.get("approximate", "none"))]


def _leaky_relu(c: _Converter, node, attrs):
    return [c.call(F.leaky_relu, c.operand(node.input[0]), float(attrs.get("alpha", 0.01)))]


def _unary(fn: Callable) -> Callable:
    def handler(c: _Converter, node, attrs):
        return [c.call(fn, c.operand(node.input[0]))]

    return handler


def _binary(fn: Callable) -> Callable:
    def handler(c: _Converter, node, attrs):
        return [c.call(fn, c.operand(node.input[0]), c.operand(node.input[1]))]

    return handler


def _identity(c: _Converter, node, attrs):
    return [c.operand(node.input[0])]


def _global_pool_op(reduce: str) -> Callable:
    def handler(c: _Converter, node, attrs):
        return [c.call(_global_pool, c.operand(node.input[0]), reduce)]

    return handler


_OPS: dict[str, Callable] = {
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": _matmul,
    "BatchNormalization": _batch_norm,
    "Gather": _gather,
    "MaxPool": _pool,
    "AveragePool": _pool,
    "GlobalAveragePool": _global_pool_op("mean"),
    "GlobalMaxPool": _global_pool_op("max"),
    "Flatten": _flatten_op,
    "Reshape": _reshape_op,
    "Transpose": _transpose,
    "Concat": _concat,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze_op,
    "ReduceMean": _reduce_mean,
    "Softmax": _softmax,
    "LogSoftmax": _softmax,
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(_div),
    "Pow": _binary(torch.pow),
    "Relu": _unary(torch.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sqrt": _unary(torch.sqrt),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Reciprocal": _unary(torch.reciprocal),
    "LeakyRelu": _leaky_relu,
    "Gelu": _gelu,
    "Clip": _clip,
    "Cast": _cast,
    "Dropout": _dropout,
    "Identity": _identity,
}

