"""The textual check of TorchScript source (``<root>/code/**.py`` in the archive), shared by the upload's inspection
(app/models/inspect.py) and the worker's loader (worker/engine/torch_io.py), which runs it again before
``torch.jit.load``: calls of operators that read or write files, start processes or use the network, and operator
namespaces and C++ classes outside those that ordinary (float, quantized, mobile-optimized) models use. Standard
library only. The worker's check of the compiled graphs (after loading) is the authoritative one.
"""
from __future__ import annotations

import re
import zipfile

#: Operator namespaces ordinary models call (torch.ops.<namespace>.*).
ALLOWED_OP_NAMESPACES = frozenset({"aten", "prim", "quantized", "_quantized", "prepacked", "mkldnn_prepacked"})
#: Namespaces of the C++ classes (torch.classes.<namespace>.*) whose methods quantized and optimized models call.
ALLOWED_CLASS_NAMESPACES = frozenset({"quantized", "rnn", "sparse", "xnnpack", "mkldnn"})
#: TorchScript source larger than this in all is refused (the largest real models' code is a few MB).
MAX_CODE_BYTES = 32 * 1024 * 1024

DENIED_OPS = {  # an operator's name as TorchScript source writes it -> the operator
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
# names no ordinary model uses for anything else: refused wherever they appear; the others only as an attribute
# (``torch.save``, ``ops.aten.save``, ``t.save`` after ``t = torch``) or a string (``getattr(torch, "save")``)
_DISTINCTIVE_OPS = frozenset({"from_file", "rpc_async", "rpc_sync", "rpc_remote", "to_here", "confirmed_by_owner"})
_CONTINUATION = re.compile(r"\\\r?\n")
# adjacent string literals ("sa" "ve" is "save" to TorchScript's parser): the quotes between them are dropped
_ADJACENT_LITERALS = re.compile(r"""["'](?:\s|#[^\n]*)*["']""")
_OP_NAME = re.compile(r"""(?P<prefix>[.'"]?)\s*\b(?P<name>""" + "|".join(DENIED_OPS) + r""")\b""")
_OP_NAMESPACE = re.compile(r"(?<![\w.])(?:torch\s*\.\s*)?ops\s*\.\s*(?P<ns>[A-Za-z_]\w*)")
_CLASS_NAMESPACE = re.compile(r"\btorch\s*\.\s*classes\s*\.\s*(?P<ns>[A-Za-z_]\w*)")


class CodeTooLarge(ValueError):
    """The archive's TorchScript source is over MAX_CODE_BYTES."""


def unsafe_torchscript_call(source: str) -> str | None:
    """The first operator, operator namespace or C++ class namespace in TorchScript source that is not allowed."""
    text = _ADJACENT_LITERALS.sub("", _CONTINUATION.sub(" ", source))
    for match in _OP_NAME.finditer(text):
        if match["prefix"] or match["name"] in _DISTINCTIVE_OPS:
            return DENIED_OPS[match["name"]]
    for match in _OP_NAMESPACE.finditer(text):
        if match["ns"] not in ALLOWED_OP_NAMESPACES:
            return f"ops.{match['ns']} (operators of the {match['ns']} namespace)"
    for match in _CLASS_NAMESPACE.finditer(text):
        if match["ns"] not in ALLOWED_CLASS_NAMESPACES:
            return f"torch.classes.{match['ns']} (C++ classes of the {match['ns']} namespace)"
    return None


def unsafe_call_in_archive(archive: zipfile.ZipFile, root: str) -> tuple[str, str] | None:
    """(member, what it calls) for the first source file under ``<root>/code/`` with a call that is not allowed,
    else None. Reads at most MAX_CODE_BYTES in all, whatever the members' headers claim (CodeTooLarge past it)."""
    left = MAX_CODE_BYTES
    for info in archive.infolist():
        name = info.filename
        if not name.startswith(f"{root}/code/") or info.is_dir() or name.endswith(".debug_pkl"):
            continue
        with archive.open(info) as member:
            data = member.read(left + 1)  # bounded even if file_size lies
        left -= len(data)
        if left < 0:
            raise CodeTooLarge(f"the TorchScript code is too large (over {MAX_CODE_BYTES} bytes)")
        found = unsafe_torchscript_call(data.decode("utf-8", "replace"))
        if found is not None:
            return name[:200], found
    return None
