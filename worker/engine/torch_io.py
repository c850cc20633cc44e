"""Models as torch modules, without running any of the uploader's Python.

- TorchScript uploads are loaded with `torch.jit.load` (its unpickler only rebuilds tensors; the code is TorchScript,
  not Python), after a check that the file is a TorchScript archive with one root folder whose code names no denied
  operator; once loaded, the compiled graph of every method of every submodule (functions and methods they call
  inlined, nested blocks and subgraphs included) must call only allowed operators (`check_torchscript_code`):
  TorchScript code is a program, and `torch.from_file` / `torch.save` would read and write files.
- `onnx_to_torch` turns an ONNX graph into a trainable `torch.fx.GraphModule`: real nn.Conv*/nn.Linear/
  nn.BatchNorm*/nn.Embedding modules hold the initializers (so torch-pruning's dependency graph and an optimizer see
  them) and functional torch ops do the rest. Ops it cannot convert raise EngineError("unsupported").
- A TorchScript module becomes trainable the same way: exported to ONNX (`dynamo=False`), then converted.
- `export_onnx` / `export_torchscript` write a module back; `TorchRunner` runs a TorchScript model with the same
  interface as `OnnxRunner`, so measure.py measures both alike; `count_macs` counts multiply-accumulates.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import keyword
import math
import re
import tempfile
import warnings
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import fx, nn

from .core import EngineError, first_line
from .data import Feeds, TensorSpec, synthetic_feeds
from .measure import rss_peak_growth
from .onnx_io import OnnxModel, cpu_threads, load_onnx_model

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
        return count_params(self.module)

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

#: Operator namespaces TorchScript emits for ordinary float, quantized and mobile- or inference-optimized models.
ALLOWED_OP_NAMESPACES = frozenset({"aten", "prim", "quantized", "_quantized", "prepacked", "mkldnn_prepacked"})
#: Namespaces of the C++ classes (torch.classes.<namespace>.*) whose methods quantized and optimized models call.
ALLOWED_CLASS_NAMESPACES = frozenset({"quantized", "rnn", "sparse", "xnnpack", "mkldnn"})
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


_DENIED_SOURCE_OPS = {  # an operator's name as TorchScript source writes it -> the operator
    "from_file": "aten::from_file",
    "save": "aten::save",
    "rpc_async": "prim::rpc_async",
    "rpc_sync": "prim::rpc_sync",
    "rpc_remote": "prim::rpc_remote",
    "to_here": "aten::to_here",
    "confirmed_by_owner": "aten::confirmed_by_owner",
    "local_value": "aten::local_value",
    "owner_name": "aten::owner_name",
}
_DISTINCTIVE_SOURCE_OPS = frozenset(
    {"from_file", "rpc_async", "rpc_sync", "rpc_remote", "to_here", "confirmed_by_owner"}
)
_MAX_CODE_BYTES = 32 * 1024 * 1024
_CONTINUATION = re.compile(r"\\\r?\n")
_ADJACENT_LITERALS = re.compile(r"""["'](?:\s|#[^\n]*)*["']""")
_SOURCE_OP = re.compile(r"""(?P<prefix>[.'"]?)\s*\b(?P<name>""" + "|".join(_DENIED_SOURCE_OPS) + r""")\b""")
_SOURCE_OP_NAMESPACE = re.compile(r"(?<![\w.])(?:torch\s*\.\s*)?ops\s*\.\s*(?P<ns>[A-Za-z_]\w*)")
_SOURCE_CLASS_NAMESPACE = re.compile(r"\btorch\s*\.\s*classes\s*\.\s*(?P<ns>[A-Za-z_]\w*)")


def _scan_code(archive: zipfile.ZipFile, root: str, error_code: str) -> None:
    """Before torch.jit.load: the archive's TorchScript source must name no denied operator, operator namespace or
    C++ class namespace (the same textual check as the upload's, app/models/inspect.py). torch.jit.load itself runs
    code (a class's __setstate__), so this comes first; the graph check after loading is the authoritative one."""
    left = _MAX_CODE_BYTES
    for info in archive.infolist():
        name = info.filename
        if not name.startswith(f"{root}/code/") or info.is_dir() or name.endswith(".debug_pkl"):
            continue
        with archive.open(info) as member:
            data = member.read(left + 1)
        left -= len(data)
        if left < 0:
            raise EngineError(error_code, f"the TorchScript code is too large (over {_MAX_CODE_BYTES} bytes)")
        text = _ADJACENT_LITERALS.sub("", _CONTINUATION.sub(" ", data.decode("utf-8", "replace")))
        found = next((_DENIED_SOURCE_OPS[m["name"]] for m in _SOURCE_OP.finditer(text)
                      if m["prefix"] or m["name"] in _DISTINCTIVE_SOURCE_OPS), None)
        if found is None:
            found = next((f"operators of the {m['ns']} namespace" for m in _SOURCE_OP_NAMESPACE.finditer(text)
                          if m["ns"] not in ALLOWED_OP_NAMESPACES), None)
        if found is None:
            found = next((f"C++ classes of the {m['ns']} namespace" for m in _SOURCE_CLASS_NAMESPACE.finditer(text)
                          if m["ns"] not in ALLOWED_CLASS_NAMESPACES), None)
        if found is not None:
            raise EngineError(
                error_code,
                f"the TorchScript code calls {found}, which is not allowed (it can read or write files, start "
                f"processes or use the network); in {name[:200]}",
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


def count_trainable_params(module: nn.Module) -> int:
    """Trainable parameters (weights and biases; BatchNorm running statistics are buffers, not counted): what
    pruning and a student's size are measured in."""
    return int(sum(p.numel() for p in module.parameters()))


def count_params(module: nn.Module) -> int:
    """Elements in the module's parameters and buffers, counting the int8 weights that torch's dynamic quantization
    packs into script objects (Linear, Embedding), which state_dict leaves out."""
    total = sum(v.numel() for v in module.state_dict().values() if isinstance(v, torch.Tensor))
    return int(total + sum(t.numel() for t in _packed_tensors(module)))


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


# --- ONNX -> torch.fx ------------------------------------------------------------------------------------------


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
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), EXPORT_OPSET)
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

