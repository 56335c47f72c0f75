"""The read stage: turn a path or an in-memory mapping into a :class:`Checkpoint`.

Example:
    >>> import torch
    >>> ckpt = open_checkpoint({"state_dict": {"w": torch.ones(2)}, "epoch": 3})
    >>> ckpt.format, type(ckpt.root["state_dict"]["w"]).__name__
    ('memory', 'MemoryRef')
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointNotFoundError, ReadError, UnsupportedFormatError
from ..tensors import MemoryRef
from . import tensor_kinds
from .archives import describe_pt2, open_pt2, torchscript_declarations, torchscript_state
from .base import Checkpoint, Format, register_format, registered_formats
from .folder import open_folder
from .numpy_files import NpzFormat, PickleFormat, arrays_to_refs
from .safetensors_file import SafetensorsFormat
from .torch_legacy import TorchLegacyFormat
from .torch_zip import TorchZipFormat
from .unpickler import Placeholder, module_state

__all__ = ["Checkpoint", "Format", "register_format", "registered_formats", "open_checkpoint"]

for _fmt in (TorchZipFormat(), NpzFormat(), SafetensorsFormat(), TorchLegacyFormat(),
             PickleFormat()):
    register_format(_fmt, first=False)

Source = str | os.PathLike | Mapping


def open_checkpoint(source: Source, trust: bool = False) -> Checkpoint:
    """Read ``source`` (a file, a folder or a mapping) into a :class:`Checkpoint`."""
    refs = getattr(source, "refs", None)
    inner = getattr(source, "checkpoint", None)
    if isinstance(refs, dict) and isinstance(inner, Checkpoint):  # a tg.read() result
        return Checkpoint(root=dict(refs), format=inner.format, path=inner.path,
                          placeholders=list(inner.placeholders), metadata=dict(inner.metadata))
    if isinstance(source, Mapping):
        return Checkpoint(root=_wrap_memory(dict(source)), format="memory")
    if isinstance(source, torch.nn.Module):
        return Checkpoint(root=_wrap_memory(source.state_dict()), format="memory")
    if not isinstance(source, (str, os.PathLike)):
        raise UnsupportedFormatError(
            f"cannot read a {type(source).__name__}: pass a path, a folder or a state dict"
        )
    path = Path(source)
    if stat.S_ISDIR(checked_stat(path).st_mode):
        ckpt = open_folder(path, lambda p: _open_file(p, trust))
    else:
        ckpt = _open_file(path, trust)
    ckpt.root = _modules_to_state_dicts(ckpt.root, ckpt.notes)
    return ckpt


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def checked_stat(path: Path, regular_only: bool = False) -> os.stat_result:
    """``os.stat`` of a checkpoint path (links followed) that accepts only a regular file or a
    folder, with plain-words errors; special files are refused without being opened."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such file or folder") from None
    except (OSError, ValueError) as err:  # ELOOP, ENAMETOOLONG, EACCES, embedded NUL byte
        reason = getattr(err, "strerror", None) or str(err)
        raise ReadError(f"{str(path)[:300]!r}: cannot be read ({reason}); expected a checkpoint "
                        "file or folder") from None
    mode = st.st_mode
    if stat.S_ISREG(mode) or (stat.S_ISDIR(mode) and not regular_only):
        return st
    kind = next((what for test, what in _KINDS if test(mode)),
                "a folder" if stat.S_ISDIR(mode) else "not a regular file")
    raise UnsupportedFormatError(
        f"{path}: is {kind}, not a checkpoint file; torchgraft reads only regular files and "
        "folders (copy the data to a file first)")


def _open_file(path: Path, trust: bool) -> Checkpoint:
    checked_stat(path, regular_only=True)
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as err:
        raise ReadError(f"{path}: cannot open ({err})") from None
    text = head.lstrip().lower()
    if not head or text.startswith((b"version https://git-lfs", b"<!doctype html", b"<html")):
        raise UnsupportedFormatError(f"{path.name}: {describe_unknown(head, path)}")
    if trust and (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        return _open_trusted(path)
    for fmt in registered_formats():
        if fmt.sniff(path, head):
            return _open_with(fmt, path, trust)
    raise UnsupportedFormatError(f"{path.name}: {describe_unknown(head, path)}")


def _open_with(fmt: Format, path: Path, trust: bool) -> Checkpoint:
    """``fmt.open`` plus what no single format sees: program archives (TorchScript, .pt2) and
    tensors of a kind that cannot be rebuilt (never dropped: an error naming each)."""
    made = tensor_kinds.UNSUPPORTED_MADE
    try:
        ckpt = fmt.open(path, trust)
    except UnsupportedFormatError:
        if not head_is_zip(path):
            raise
        ckpt = open_pt2(path)  # a torch.export archive: its weights
        if ckpt is None:
            pt2 = describe_pt2(path)
            if pt2:
                raise UnsupportedFormatError(pt2) from None
            raise
    if tensor_kinds.UNSUPPORTED_MADE != made:
        tensor_kinds.raise_unsupported(ckpt.root, ckpt.name)
    state = None
    if getattr(ckpt.root, "qualname", "").startswith("__torch__."):
        state = torchscript_state(ckpt.root, torchscript_declarations(path))
    if state is not None:
        ckpt.notes.append(f"TorchScript archive ({ckpt.root.qualname}): read the weights of its "
                          "modules, as torch.jit.load(...).state_dict() gives them; its code was "
                          "not run")
        ckpt.root = state
    return ckpt


def head_is_zip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def describe_unknown(head: bytes, path: Path) -> str:
    """Plain words for what a file that is no known checkpoint looks like."""
    text = head.lstrip().lower()
    if not head:
        return "the file is empty (0 bytes); the download or copy failed"
    if text.startswith(b"version https://git-lfs"):
        return ("this is a Git LFS pointer file, not the weights; run `git lfs pull` or download "
                "the real file")
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return ("this is an HTML page (an error or login page saved instead of the weights); "
                "download the file again")
    if text.startswith((b"{", b"[")):
        return "this is a JSON/text file, not weights"
    if head.startswith(b"\x1f\x8b"):
        return "this is a gzip archive; unpack it first"
    if head.startswith(b"GGUF"):
        return "this is a GGUF file (llama.cpp), which torchgraft does not read"
    return (f"unknown format (first bytes {head[:8]!r}); expected a torch .pth/.pt/.bin/.ckpt, "
            ".safetensors, .npz or .pkl file, or a folder of them")


def _open_trusted(path: Path) -> Checkpoint:
    """``trust=True``: plain ``torch.load`` with pickle; only ever chosen by the user."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:
        raise ReadError(f"{path.name}: torch.load failed even with trust=True: {err}") from None
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    return Checkpoint(root=_wrap_memory(arrays_to_refs(obj)), format="torch (trusted pickle)",
                      path=path, notes=["loaded with trust=True: pickled code was allowed to run"])


def _wrap_memory(obj: Any, depth: int = 0) -> Any:
    if isinstance(obj, torch.Tensor):
        return MemoryRef(obj)
    if depth > 50:
        return obj
    if isinstance(obj, torch.nn.Module):
        return _wrap_memory(obj.state_dict(), depth + 1)
    if isinstance(obj, Mapping):
        return {k: _wrap_memory(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_wrap_memory(v, depth + 1) for v in obj]
    return obj


def _modules_to_state_dicts(obj: Any, notes: list[str], depth: int = 0,
                            seen: dict[int, Any] | None = None) -> Any:
    """Replace placeholders of pickled ``nn.Module`` objects by the state dict they would give.
    Each object is visited once (``seen``: id -> result), so shared references cost nothing."""
    seen = {} if seen is None else seen
    if id(obj) in seen:
        return seen[id(obj)]
    if isinstance(obj, Placeholder):
        state = module_state(obj)
        if state is not None:
            notes.append(f"whole pickled module {obj.qualname} turned into its state dict "
                         "(its code was not run)")
            seen[id(obj)] = state
            return state
        return obj
    if depth > 50:
        return obj
    seen[id(obj)] = obj
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(value, _CONTAINERS):
                obj[key] = _modules_to_state_dicts(value, notes, depth + 1, seen)
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            if isinstance(value, _CONTAINERS):
                obj[i] = _modules_to_state_dicts(value, notes, depth + 1, seen)
    return obj


_CONTAINERS = (dict, list, Placeholder)
