"""Models as torch modules, without running any of the uploader's Python.

- TorchScript uploads are loaded with `torch.jit.load` (its unpickler only rebuilds tensors; the code is TorchScript,
  not Python), after a check that the file is a TorchScript archive with one root folder whose code names no denied
  operator; once loaded, the compiled graph of every method of every submodule (functions and methods they call
  inlined, nested blocks and subgraphs included) must call only allowed operators (`check_torchscript_code`):
  TorchScript code is a program, and `torch.from_file` / `torch.save` would read and write files.
- A TorchScript module becomes trainable by way of ONNX: exported (`dynamo=False`), then converted by
  onnx_to_fx.onnx_to_torch (`torchscript_to_torch`).
- `export_onnx` / `export_torchscript` write a module back; `TorchRunner` runs a TorchScript model with the same
  interface as `OnnxRunner`, so measure.py measures both alike; `count_macs` counts multiply-accumulates and
  `count_weights` / `count_quant_params` count a module's weight and bias elements as onnx_io counts a graph's.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import re
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import fx, nn

from app.models.torchscript_source import (
    ALLOWED_CLASS_NAMESPACES,
    ALLOWED_OP_NAMESPACES,
    CodeTooLarge,
    unsafe_call_in_archive,
)

from .core import EngineError, first_line
from .data import Feeds, TensorSpec, synthetic_feeds
from .measure import rss_peak_growth
from .onnx_io import OnnxModel, cpu_threads, load_onnx_model
from .onnx_to_fx import onnx_to_torch

#: The opset every export writes (the example model's, and one that ONNX Runtime and our converter both handle).
EXPORT_OPSET = 17
BATCH_DIM = "batch"


# --- TorchScript files -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorchScriptModel:
    """A loaded TorchScript file: the module (eval mode, on CPU) and what is known of its inputs and outputs.

    TorchScript does not declare shapes: `inputs` come from the forward signature's names, with the shapes and dtypes
    of the job's dataset when the caller gives them; `outputs` are filled in once the model has run."""

    path: Path
    module: torch.jit.ScriptModule
    inputs: tuple[TensorSpec, ...]
    size_bytes: int
    outputs: tuple[TensorSpec, ...] = ()

    @property
    def params(self) -> int:
        return count_weights(self.module)

    @property
    def quant_params(self) -> int:
        return count_quant_params(self.module)


def load_torchscript(path: Path, error_code: str = "invalid_model") -> torch.jit.ScriptModule:
    """Load a TorchScript archive on the CPU in eval mode. Anything else (a plain pickle, a torch.export archive, a
    damaged file, an archive with more than one root folder) is EngineError(error_code), and so is code that calls
    an operator that is not allowed (`check_torchscript_code`)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            roots = {name.split("/", 1)[0] for name in names if name.count("/") == 1 and name.endswith("/data.pkl")}
            if not any(any(name.startswith(f"{root}/code/") for name in names) for root in roots):
                raise EngineError(
                    error_code,
                    "not a TorchScript archive (no <name>/data.pkl with <name>/code/): save the model with "
                    "torch.jit.script(...).save() or torch.jit.trace(...).save(), or export it to ONNX",
                )
            _scan_code(archive, _archive_root(names, error_code), error_code)
    except (OSError, zipfile.BadZipFile, ValueError, RuntimeError, NotImplementedError, EOFError) as exc:
        raise EngineError(error_code, f"not a TorchScript archive: {exc}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript is deprecated; it is still the format uploaded
            module = torch.jit.load(str(path), map_location="cpu")
    except MemoryError:
        raise
    except Exception as exc:
        raise EngineError(error_code, f"torch.jit.load cannot load the model: {first_line(exc)}") from None
    check_torchscript_code(module, error_code)
    return module.eval()


def _archive_root(names: list[str], error_code: str) -> str:
    """The one root folder every member of the archive is in (torch.jit.load reads the first member's), each member
    named once."""
    if len(set(names)) != len(names):
        raise EngineError(error_code, "the archive holds a member name more than once")
    for name in names:
        parts = name.split("/")
        if "\\" in name or "\x00" in name or name.startswith("/") or ".." in parts or "." in parts:
            raise EngineError(error_code, f"the archive member {name[:200]!r} is not a plain relative path")
    roots = sorted({name.split("/", 1)[0] for name in names})
    if len(roots) != 1 or any("/" not in name for name in names):
        raise EngineError(
            error_code,
            f"the archive has {len(roots)} root folders or files ({', '.join(repr(r[:100]) for r in roots[:10])}); "
            "a TorchScript archive has exactly one",
        )
    return roots[0]


# --- what TorchScript code may call ----------------------------------------------------------------------------

#: Operators of the allowed namespaces that are denied whatever their schema says: the remote-call primitives
#: (network), Python calls, and aten::load should it ever be registered. `denied_operators` adds those derived from
#: the registered schemas.
_ALWAYS_DENIED = frozenset({
    "aten::from_file", "aten::save", "aten::load", "prim::rpc_async", "prim::rpc_sync", "prim::rpc_remote",
    "prim::PythonOp", "prim::IgnoredPythonOp",
})
_FILE_ARGUMENT = re.compile(
    r"^(f|fp|fd|file|files|filename|filenames|file_name|filepath|file_path|fname|path|paths|dir|dirname|directory"
    r"|url|uri)$"
)
_STR_TYPE = re.compile(r"\bstr\b")
_CLASS_NAMESPACE_IN_TYPE = re.compile(r"__torch__\.torch\.classes\.(\w+)\.")


@functools.cache
def denied_operators() -> frozenset[str]:
    """Operators of the allowed namespaces that touch files, processes or the network: `_ALWAYS_DENIED`, every
    registered operator with a `str` argument named like a file or path (filename, path, file, f, ...), and every one
    that takes or returns a remote reference (RRef) or a C++ class of a namespace that is not allowed."""
    denied = set(_ALWAYS_DENIED)
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.split("::", 1)[0] not in ALLOWED_OP_NAMESPACES:
            continue  # refused by namespace anyway
        if any(_FILE_ARGUMENT.match(arg.name) and _STR_TYPE.search(str(arg.type)) for arg in schema.arguments):
            denied.add(schema.name)
        types = [str(arg.type) for arg in schema.arguments] + [str(ret.type) for ret in schema.returns]
        if any("RRef" in t or _foreign_class(t) for t in types):
            denied.add(schema.name)
    return frozenset(denied)


def _foreign_class(type_str: str) -> bool:
    return any(ns not in ALLOWED_CLASS_NAMESPACES for ns in _CLASS_NAMESPACE_IN_TYPE.findall(type_str))


def check_torchscript_code(module: torch.jit.ScriptModule, error_code: str = "invalid_model") -> None:
    """Refuse (EngineError(error_code)) TorchScript code that calls an operator outside `ALLOWED_OP_NAMESPACES`, one
    of `denied_operators()`, or a method of a C++ class outside `ALLOWED_CLASS_NAMESPACES`.

    Checked: the compiled graph of every method (properties included) and forward (pre-)hook of every submodule,
    with the functions and methods they call inlined, the blocks of prim::If / prim::Loop and subgraph attributes
    (prim::fork) at any depth. A call through an interface must lead to a submodule (checked in its turn); one that
    cannot be followed there (a TorchScript object behind an interface) is refused."""
    denied = denied_operators()
    checked_types: set[str] = set()
    for name, sub in module.named_modules():
        type_name = sub._c._type().qualified_name()
        if type_name not in checked_types:  # modules of one type share their code
            checked_types.add(type_name)
            _check_module(sub._c, name or "the model", type_name, denied, error_code)


def _check_module(obj: torch._C.ScriptModule, where: str, type_name: str, denied: frozenset[str],
                  error_code: str) -> None:
    functions = [(name, obj._get_method(name)) for name in obj._method_names()]
    functions += [(f"forward hook {hook.name}", hook) for hook in obj._get_forward_hooks()]
    functions += [(f"forward pre-hook {hook.name}", hook) for hook in obj._get_forward_pre_hooks()]
    for method, function in functions:
        label = f"{where} ({type_name}), method {method}"
        graph = function.inlined_graph
        self_value = next(iter(graph.inputs()), None)
        stack: list[Any] = [graph]
        while stack:
            for node in stack.pop().nodes():
                kind = node.kind()
                if kind in denied:
                    raise EngineError(
                        error_code,
                        f"the TorchScript code calls {kind}, which is not allowed (it can read or write files, start "
                        f"processes or use the network); in {label}",
                    )
                namespace = kind.split("::", 1)[0]
                if namespace not in ALLOWED_OP_NAMESPACES:
                    raise EngineError(
                        error_code,
                        f"the TorchScript code calls {kind}, which is not allowed: operators of the {namespace} "
                        f"namespace are not (allowed: {', '.join(sorted(ALLOWED_OP_NAMESPACES))}); in {label}",
                    )
                if kind == "prim::CallFunction":
                    raise EngineError(
                        error_code, f"the TorchScript code calls a function that cannot be checked; in {label}"
                    )
                if kind == "prim::CallMethod":
                    _check_method_call(node, obj, self_value, label, error_code)
                stack.extend(node.blocks())
                for attribute in node.attributeNames():
                    kind_of = node.kindOf(attribute)
                    subgraphs = (
                        [node.g(attribute)] if kind_of == "g" else list(node.gs(attribute)) if kind_of == "gs" else []
                    )
                    for subgraph in subgraphs:
                        subgraph = subgraph.copy()
                        torch._C._jit_pass_inline(subgraph)
                        stack.append(subgraph)


def _check_method_call(node, obj: torch._C.ScriptModule, self_value, label: str, error_code: str) -> None:
    """Check a prim::CallMethod that inlining left: a method of a C++ class, or a call through an interface, which
    must lead to a submodule (every submodule is checked in its turn)."""
    receiver = node.inputsAt(0)
    receiver_type = receiver.type()
    method = node.s("name")
    if not isinstance(receiver_type, torch._C.InterfaceType):
        match = _CLASS_NAMESPACE_IN_TYPE.match(str(receiver_type))
        if match and match.group(1) in ALLOWED_CLASS_NAMESPACES:
            return
        raise EngineError(
            error_code, f"the TorchScript code calls {receiver_type}.{method}, which is not allowed; in {label}"
        )
    path: list[str] = []
    value = receiver
    while value.node().kind() == "prim::GetAttr":
        path.append(value.node().s("name"))
        value = value.node().inputsAt(0)
    target = obj if self_value is not None and value.unique() == self_value.unique() else None
    for attribute in reversed(path):
        if target is None:
            break
        try:
            target = target.getattr(attribute)
        except Exception:  # e.g. a TorchScript object of a class Python does not know
            target = None
    if isinstance(target, torch._C.ScriptModule):
        return
    raise EngineError(
        error_code,
        f"the TorchScript code calls {method} through the interface {receiver_type}, whose implementation cannot be "
        f"checked; in {label}",
    )


def _scan_code(archive: zipfile.ZipFile, root: str, error_code: str) -> None:
    """Before torch.jit.load: the archive's TorchScript source must name no denied operator, operator namespace or
    C++ class namespace (the upload's textual check, app/models/torchscript_source.py, run again). torch.jit.load
    itself runs code (a class's __setstate__), so this comes first; the graph check after loading is the
    authoritative one."""
    try:
        unsafe = unsafe_call_in_archive(archive, root)
    except CodeTooLarge as exc:
        raise EngineError(error_code, str(exc)) from None
    if unsafe is not None:
        name, found = unsafe
        raise EngineError(
            error_code,
            f"the TorchScript code calls {found}, which is not allowed (it can read or write files, start "
            f"processes or use the network); in {name}",
        )


def load_torchscript_model(
    path: Path, inputs: tuple[TensorSpec, ...] | None = None, error_code: str = "invalid_model"
) -> TorchScriptModel:
    """The TorchScript file as a `TorchScriptModel`. `inputs` (names, shapes, dtypes) default to the forward
    signature's argument names with unknown shapes (float32)."""
    module = load_torchscript(path, error_code)
    names = torchscript_input_names(module)
    if inputs is None:
        inputs = tuple(TensorSpec(name, None, np.dtype("float32")) for name in names)
    elif len(inputs) != len(names):
        raise EngineError(
            error_code, f"the model's forward takes {len(names)} inputs ({', '.join(names)}); {len(inputs)} given"
        )
    return TorchScriptModel(Path(path), module, tuple(inputs), Path(path).stat().st_size)


def torchscript_input_names(module: torch.jit.ScriptModule) -> list[str]:
    """The forward signature's tensor argument names (without self)."""
    return [arg.name for arg in module.forward.schema.arguments[1:]]


def count_weights(module: nn.Module) -> int:
    """Weight and bias elements, as onnx_io.count_weights counts a graph's: the module's parameters plus the int8
    weights (and biases) that torch's dynamic quantization packs into script objects (Linear, Embedding), which are
    not parameters. Buffers (BatchNorm running statistics, constants) are not counted,
    nor are quantization scales and zero points (`count_quant_params`). What a report's `params`, pruning's
    params_before/after and a distilled student's size are measured in."""
    return int(sum(p.numel() for p in module.parameters()) + sum(t.numel() for t in _packed_tensors(module)))


def count_quant_params(module: nn.Module) -> int:
    """Scales and zero points of the quantized weights packed in the module (one pair per tensor, or one per
    channel); 0 for a float module."""
    total = 0
    for t in _packed_tensors(module):
        if not t.is_quantized:
            continue
        if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric,
                           torch.per_channel_affine_float_qparams):
            total += t.q_per_channel_scales().numel() + t.q_per_channel_zero_points().numel()
        else:
            total += 2
    return int(total)


def _packed_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The weights (and biases) that torch's quantized Linear / Embedding modules keep in packed script objects."""
    out: list[torch.Tensor] = []
    for sub in module.modules():
        packed = getattr(sub, "_packed_params", None)
        if isinstance(packed, nn.Module):  # a quantized Linear's / Embedding's LinearPackedParams module
            linear = getattr(packed, "_packed_params", None)
            embedding = getattr(packed, "_packed_weight", None)
            if isinstance(linear, torch.ScriptObject):
                out += [t for t in torch.ops.quantized.linear_unpack(linear) if t is not None]
            elif isinstance(embedding, torch.ScriptObject):
                out.append(torch.ops.quantized.embedding_bag_unpack(embedding))
    return out


# --- running ---------------------------------------------------------------------------------------------------


def torch_device(device: str) -> torch.device:
    """cuda when asked for and available, else the CPU."""
    return torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")


class TorchRunner:
    """Runs a TorchScript model with the interface of OnnxRunner: `run(feeds)` returns every output as numpy."""

    format = "torchscript"

    def __init__(self, model: TorchScriptModel, device: str):
        self.device = torch_device(device)
        self.threads = cpu_threads()
        torch.set_num_threads(self.threads)
        self.model = model
        # On cuda, a copy of its own: moving the shared module would move it under every other user.
        self.module = model.module if self.device.type == "cpu" else load_torchscript(model.path).to(self.device)
        self.inputs = model.inputs
        self.provider = f"torch ({self.device.type})"

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
        with torch.inference_mode():
            args = [torch.from_numpy(np.ascontiguousarray(feeds[spec.name])).to(self.device) for spec in self.inputs]
            outputs = list(_flatten_outputs(self.module(*args)))
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            return [_to_numpy(out) for out in outputs]

    def peak_memory_bytes(self, feeds: Feeds) -> int:
        """Memory one inference needs beyond what is already allocated: on cuda torch's allocator peak, on the CPU
        the resident-memory growth of the process (measure.rss_peak_growth)."""
        if self.device.type != "cuda":
            return rss_peak_growth(lambda: self.run(feeds))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.run(feeds)
        return int(torch.cuda.max_memory_allocated(self.device) - before)


def _flatten_outputs(out: Any) -> Iterator[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, (tuple, list)):
        for item in out:
            yield from _flatten_outputs(item)
    elif isinstance(out, dict):
        for item in out.values():
            yield from _flatten_outputs(item)
    else:
        raise TypeError(f"the model returns a {type(out).__name__}, not tensors")


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    return tensor.cpu().numpy()


def to_tensors(feeds: Feeds, names: list[str], device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[name])).to(device) for name in names)


def output_specs(outputs: list[np.ndarray], names: list[str] | None = None) -> tuple[TensorSpec, ...]:
    """TensorSpecs for outputs seen on one run: the first dim is the batch."""
    names = names or [f"output_{i}" for i in range(len(outputs))]
    return tuple(
        TensorSpec(name, (BATCH_DIM, *out.shape[1:]) if out.ndim else (), out.dtype)
        for name, out in zip(names, outputs)
    )


# --- MACs ------------------------------------------------------------------------------------------------------


def count_model_macs(model: OnnxModel | TorchScriptModel, example_feeds: Feeds) -> int | None:
    """MACs of one row through an ONNX or TorchScript model, counted on its trainable conversion; None when it has
    none (e.g. a quantized graph) or cannot be counted."""
    if isinstance(model, TorchScriptModel) and _is_quantized(model.module):
        return None  # its packed int8 weights export to no float layers (and the exporter prints its whole graph)
    try:
        if isinstance(model, OnnxModel):
            module = onnx_to_torch(model.proto)
        else:
            module = torchscript_to_torch(model, example_feeds)
    except EngineError:
        return None
    return count_macs(module, example_feeds)


def _is_quantized(module: torch.jit.ScriptModule) -> bool:
    return any(node.kind().startswith("quantized::") for node in module.inlined_graph.nodes())


def count_macs(module: nn.Module, example_feeds: Feeds) -> int | None:
    """Multiply-accumulates of one row through the module's Conv/Linear/BatchNorm/pooling modules (torch-pruning's
    counter; functional ops such as a MatMul of two activations are not counted). None when it cannot be counted."""
    import torch_pruning as tp

    names = list(example_feeds)
    args = to_tensors({k: v[:1] for k, v in example_feeds.items()}, names)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            macs, _ = tp.utils.count_ops_and_params(copy.deepcopy(module).cpu().eval(), args)
    except Exception:
        return None
    return int(macs)


# --- export ----------------------------------------------------------------------------------------------------


def export_onnx(
    module: nn.Module, example_feeds: Feeds, path: Path, output_names: list[str] | None = None
) -> Path:
    """Write `module` (moved to the CPU) as one self-contained ONNX file (opset 17, every weight inside) with a
    symbolic batch dim on every input and output. Inputs are named after `example_feeds`' keys; outputs after
    `output_names`, else `module.output_names` (converted models have them), else output_0, output_1, ...

    The TorchScript-based exporter (dynamo=False) is tried first; the dynamo exporter when it fails."""
    module = module.cpu().eval()
    names = list(example_feeds)
    args = to_tensors(example_feeds, names)
    if output_names is None:
        output_names = getattr(module, "output_names", None)
    if output_names is None:
        with torch.no_grad():
            output_names = [f"output_{i}" for i in range(len(list(_flatten_outputs(module(*args)))))]
    path = Path(path)
    try:
        with _quiet_export():
            torch.onnx.export(
                module, args, str(path), input_names=names, output_names=list(output_names),
                dynamic_axes={name: {0: BATCH_DIM} for name in [*names, *output_names]},
                opset_version=EXPORT_OPSET, dynamo=False, external_data=False,
            )
    except Exception as legacy_error:
        if isinstance(module, torch.jit.ScriptModule):
            raise EngineError("unsupported", f"cannot export the model to ONNX: {first_line(legacy_error)}") from None
        try:
            batch = torch.export.Dim(BATCH_DIM)
            with _quiet_export():
                torch.onnx.export(
                    module, args, str(path), input_names=names, output_names=list(output_names),
                    dynamic_shapes=tuple({0: batch} for _ in args), opset_version=EXPORT_OPSET, dynamo=True,
                    external_data=False,
                )
        except Exception as exc:
            raise EngineError(
                "unsupported",
                f"cannot export the model to ONNX: {first_line(legacy_error)} (dynamo exporter: {first_line(exc)})",
            ) from None
    proto = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise EngineError("unsupported", "the ONNX export stored weights outside the file")
    return path


def export_torchscript(module: nn.Module, example_feeds: Feeds, path: Path) -> Path:
    """Trace `module` (moved to the CPU) on `example_feeds` (positional, in key order) and save it as TorchScript."""
    module = module.cpu().eval()
    args = to_tensors(example_feeds, list(example_feeds))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings
            traced = torch.jit.trace(module, args, check_trace=False)
        traced.save(str(path))
    except Exception as exc:
        raise EngineError("unsupported", f"cannot save the model as TorchScript: {first_line(exc)}") from None
    return Path(path)


def torchscript_to_onnx(model: TorchScriptModel, path: Path, example_feeds: Feeds | None = None) -> OnnxModel:
    """Export a TorchScript model to ONNX at `path` and load it back checked. `example_feeds` default to seeded
    random rows of the model's input shapes; outputs keep the model's output names when they are known."""
    feeds = example_feeds if example_feeds is not None else synthetic_feeds(model.inputs, 2)
    export_onnx(model.module, feeds, path, [spec.name for spec in model.outputs] or None)
    return load_onnx_model(path, error_code="unsupported")


def torchscript_to_torch(model: TorchScriptModel, example_feeds: Feeds | None = None) -> fx.GraphModule:
    """A trainable module with the TorchScript model's weights: exported to ONNX, then `onnx_to_torch`."""
    with tempfile.TemporaryDirectory() as tmp:
        return onnx_to_torch(torchscript_to_onnx(model, Path(tmp) / "model.onnx", example_feeds).proto)


@contextlib.contextmanager
def _quiet_export():
    """The exporters warn and print freely (a failing one prints its whole graph): keep the job's output readable."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield
