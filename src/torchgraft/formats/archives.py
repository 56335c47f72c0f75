"""Torch archives that hold a program, not a state dict: TorchScript and ``torch.export`` files.

A TorchScript archive (``torch.jit.save``) is a torch zip whose ``data.pkl`` pickles the module
objects themselves (``__torch__.<class>``), each with its tensors as attributes. The restricted
unpickler turns them into placeholders; :func:`torchscript_state` walks them into the state dict
``torch.jit.load(path).state_dict()`` gives, without running the archive's code.

A ``torch.export`` archive (``.pt2``, ``torch.export.save``) has no ``data.pkl``;
:func:`describe_pt2` recognises it so the error says what the file is and how to get weights.

Example:
    >>> from torchgraft.formats.unpickler import make_placeholder
    >>> torchscript_state(make_placeholder("builtins.int")()) is None
    True
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

from ..tensors import TensorRef
from .unpickler import Placeholder

_TS_PREFIX = "__torch__."


def torchscript_state(root: Any) -> dict[str, TensorRef] | None:
    """The state dict of a TorchScript module placeholder tree, or None if ``root`` is not one."""
    if not isinstance(root, Placeholder) or not root.qualname.startswith(_TS_PREFIX):
        return None
    out: dict[str, TensorRef] = {}
    _collect(root, "", out, 0)
    return out


def _collect(obj: Placeholder, prefix: str, out: dict[str, TensorRef], depth: int) -> None:
    state = obj.state
    if depth > 200 or not isinstance(state, dict):
        return
    for name, value in state.items():
        if not isinstance(name, str):
            continue
        if isinstance(value, TensorRef):
            out[prefix + name] = value
        elif isinstance(value, Placeholder) and value.qualname.startswith(_TS_PREFIX):
            _collect(value, f"{prefix}{name}.", out, depth + 1)


def describe_pt2(path: Path) -> str | None:
    """A message for a ``torch.export`` ``.pt2`` archive, or None when ``path`` is not one."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except Exception:
        return None
    if not any(n == "archive_format" or n.endswith("/archive_format") for n in names):
        return None
    return (f"{path.name}: a torch.export program archive (.pt2), not a state dict. Get its "
            "weights with `ep = torch.export.load(path); torch.save(ep.state_dict(), 'w.pth')` "
            "and load that file")
