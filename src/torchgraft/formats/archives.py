"""Torch archives that hold a program, not a state dict: TorchScript and ``torch.export`` files.

A TorchScript archive (``torch.jit.save``) is a torch zip whose ``data.pkl`` pickles the module
objects themselves (``__torch__.<class>``), each with its tensors as attributes. The restricted
unpickler turns them into placeholders; :func:`torchscript_state` walks them into the state dict
``torch.jit.load(path).state_dict()`` gives, without running the archive's code.

A ``torch.export`` archive (``.pt2``, ``torch.export.save``) has no ``data.pkl``: its weights
are raw records described by ``data/weights/<model>_weights_config.json``. :func:`open_pt2`
reads them lazily, as ``torch.export.load(path).state_dict()`` gives them; :func:`describe_pt2`
explains an archive it cannot read.

Example:
    >>> from torchgraft.formats.unpickler import make_placeholder
    >>> torchscript_state(make_placeholder("builtins.int")()) is None
    True
"""

from __future__ import annotations

import ast
import json
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptCheckpointError
from ..limits import LIMITS
from ..tensors import FileHandle, FileRef, TensorRef
from .base import Checkpoint
from .tensor_kinds import UnsupportedRef
from .unpickler import Placeholder

_TS_PREFIX = "__torch__."


Declared = Callable[[str], "set[str] | None"]


def torchscript_state(root: Any, declared: Declared | None = None) -> dict[str, TensorRef] | None:
    """The state dict of a TorchScript module placeholder tree, or None if ``root`` is not one.

    ``declared(qualname)`` gives a class's ``__parameters__`` + ``__buffers__`` (from the
    archive's ``code/`` files): other tensor attributes are not in ``state_dict()``.
    """
    if not isinstance(root, Placeholder) or not root.qualname.startswith(_TS_PREFIX):
        return None
    out: dict[str, TensorRef] = {}
    _collect(root, "", out, 0, declared or (lambda q: None))
    return out


def _collect(obj: Placeholder, prefix: str, out: dict[str, TensorRef], depth: int,
             declared: Declared) -> None:
    state = obj.state
    if depth > 200 or not isinstance(state, dict):
        return
    keep = declared(obj.qualname)
    for name, value in state.items():
        if not isinstance(name, str):
            continue
        if isinstance(value, TensorRef):
            if keep is None or name in keep:
                out[prefix + name] = value
        elif isinstance(value, Placeholder) and value.qualname.startswith(_TS_PREFIX):
            _collect(value, f"{prefix}{name}.", out, depth + 1, declared)


_DECL = re.compile(r"^  (__parameters__|__buffers__) = (\[.*\])\s*$", re.MULTILINE)


def torchscript_declarations(path: Path) -> Declared:
    """``qualname -> set of parameter and buffer names`` read from a TorchScript archive's
    ``code/`` files (parsed as data, never run); None when a class cannot be found."""
    cache: dict[str, set[str] | None] = {}
    try:
        zf = zipfile.ZipFile(path)
        names = {n.split("/code/", 1)[1]: n for n in zf.namelist() if "/code/" in n}
    except Exception:  # not readable through zipfile: keep every tensor attribute
        return lambda q: None

    def declared(qualname: str) -> set[str] | None:
        if qualname in cache:
            return cache[qualname]
        module, _, cls = qualname.rpartition(".")
        member = names.get(module.replace(".", "/") + ".py")
        found: set[str] | None = None
        if member is not None:
            info = zf.getinfo(member)
            if info.file_size <= LIMITS.max_header_bytes:
                text = zf.read(member).decode("utf-8", "replace")
                start = re.search(rf"^class {re.escape(cls)}\(", text, re.MULTILINE)
                if start:
                    nxt = re.search(r"^class ", text[start.end():], re.MULTILINE)
                    body = text[start.end(): start.end() + nxt.start() if nxt else len(text)]
                    found = set()
                    for _, listing in _DECL.findall(body):
                        try:
                            items = ast.literal_eval(listing)
                        except (ValueError, SyntaxError):
                            return None
                        found |= {i for i in items if isinstance(i, str)}
        cache[qualname] = found
        return found

    return declared


def _pt2_members(path: Path) -> dict[str, zipfile.ZipInfo] | None:
    try:
        with zipfile.ZipFile(path) as zf:
            return {i.filename: i for i in zf.infolist()}
    except Exception:
        return None


def describe_pt2(path: Path) -> str | None:
    """A message for a ``torch.export`` ``.pt2`` archive, or None when ``path`` is not one."""
    members = _pt2_members(path)
    if members is None or not any(n.split("/")[-1] == "archive_format" for n in members):
        return None
    return (f"{path.name}: a torch.export program archive (.pt2) whose weights torchgraft cannot "
            "read (several models, a legacy layout, or symbolic shapes). Get them with "
            "`ep = torch.export.load(path); torch.save(ep.state_dict, 'w.pth')` and load "
            "that file")


def open_pt2(path: Path) -> Checkpoint | None:
    """The weights (``ExportedProgram.state_dict()``) of a ``torch.export`` archive, read lazily
    from its raw weight records; None when ``path`` is not such an archive or its layout is not
    the one understood here (one model, raw weights, integer shapes)."""
    members = _pt2_members(path)
    if members is None:
        return None
    roots = [n[: -len("archive_format")] for n in members if n.split("/")[-1] == "archive_format"]
    if len(roots) != 1:
        return None
    configs = [n for n in members
               if n.startswith(roots[0] + "data/weights/") and n.endswith("_weights_config.json")]
    if len(configs) != 1:
        return None
    fh = FileHandle(path)
    info = members[configs[0]]
    LIMITS.check("max_header_bytes", info.file_size, f"{path.name}: {configs[0]}")
    try:
        with zipfile.ZipFile(path) as zf:
            config = json.loads(zf.read(configs[0]))["config"]
    except Exception as err:
        raise CorruptCheckpointError(
            f"{path.name}: unreadable weights config {configs[0]} ({err})") from None
    if not isinstance(config, dict):
        raise CorruptCheckpointError(f"{path.name}: weights config is not a mapping")
    weights_dir = roots[0] + "data/weights/"
    root: dict[str, TensorRef] = {}
    for fqn, meta in config.items():
        root[str(fqn)] = _pt2_weight(fh, members, weights_dir, str(fqn), meta)
    return Checkpoint(root=root, format="torch-export", path=path, notes=[
        "torch.export archive (.pt2): read the weights of its program (its state_dict); the "
        "program itself was not run"])


def _pt2_weight(fh: FileHandle, members: dict[str, zipfile.ZipInfo], weights_dir: str,
                fqn: str, meta: Any) -> TensorRef:
    from .torch_zip import _data_offsets

    try:
        tmeta = meta["tensor_meta"]
        dtype = _pt2_dtype(tmeta["dtype"])
        shape = tuple(_as_int(d) for d in tmeta["sizes"])
        stride = tuple(_as_int(d) for d in tmeta["strides"])
        offset = _as_int(tmeta["storage_offset"])
        record = weights_dir + str(meta["path_name"])
        pickled, layout = meta.get("use_pickle"), tmeta.get("layout")
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptCheckpointError(
            f"{fh.path.name}: weight {fqn!r} has a bad description ({err!r:.80})") from None
    if pickled or layout != _PT2_STRIDED:
        return UnsupportedRef("torch.export weight stored as a pickled tensor subclass or a "
                              "non-strided layout", "torchgraft reads raw dense weights only",
                              shape, dtype)
    info = members.get(record)
    if info is None or info.compress_type != zipfile.ZIP_STORED or len(shape) != len(stride):
        raise CorruptCheckpointError(f"{fh.path.name}: weight {fqn!r}: record {record} is "
                                     "missing, compressed or inconsistent")
    start = _data_offsets(fh, [(info.header_offset, record)])[record]
    ref = FileRef(fh, start, dtype, shape, stride, offset, storage_key=("pt2", record))
    if ref.numel and (offset + ref.span_elems()) * dtype.itemsize > info.file_size:
        raise CorruptCheckpointError(
            f"{fh.path.name}: weight {fqn!r} of shape {list(shape)} needs more bytes than "
            f"record {record} holds")
    return ref


_PT2_STRIDED = 7  # torch._export.serde.schema.Layout.Strided


def _as_int(value: Any) -> int:
    got = value.get("as_int") if isinstance(value, dict) else None
    if type(got) is not int or got < 0:
        raise ValueError(f"not a non-negative integer: {value!r:.60}")
    return got


def _pt2_dtype(code: Any) -> torch.dtype:
    from torch._export.serde import schema
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE

    try:
        return _SERIALIZE_TO_TORCH_DTYPE[schema.ScalarType(code)]
    except (ValueError, KeyError):
        raise ValueError(f"unknown dtype code {code!r:.20}") from None
