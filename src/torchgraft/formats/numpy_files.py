"""NumPy archives (``.npz``) and plain pickles of numpy arrays (``.pkl``, detectron2 style).

``.npz`` members stored uncompressed are read lazily straight from the file. Compressed ones
are inflated once while reading (bounded by their declared size and :mod:`torchgraft.limits`)
to check their size and CRC, so a corrupt member fails before anything is written, and again
when copied. Every member's header shape must fit the member's own bytes. Object arrays and
``.pkl`` files go through the restricted unpickler, so nothing in them runs.

Example:
    >>> import numpy as np, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "w.npz")
    >>> np.savez(path, w=np.ones(3, dtype=np.float32))
    >>> NpzFormat().open(Path(path)).root["w"].materialize().tolist()
    [1.0, 1.0, 1.0]
"""

from __future__ import annotations

import io
import math
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CorruptCheckpointError, TorchgraftError
from ..limits import LIMITS
from ..tensors import FileHandle, FileRef, MemoryRef, TensorRef, contiguous_strides
from .base import Checkpoint, Format
from .torch_zip import _data_offsets, first_member_name
from .unpickler import restricted_loads
from .zip_index import check_declared_size, inflate_member


def torch_dtype(dtype: np.dtype) -> torch.dtype | None:
    """The torch dtype for a numpy dtype, or None when torch has none (records, sub-arrays)."""
    if dtype.names is not None or dtype.subdtype is not None:
        return None
    try:
        return torch.from_numpy(np.empty(0, dtype=dtype.newbyteorder("="))).dtype
    except (TypeError, ValueError):
        return None


def arrays_to_refs(obj: Any, depth: int = 0, seen: dict[int, Any] | None = None) -> Any:
    """Replace numeric numpy arrays in a container tree by tensor references (each object is
    converted once, however often the tree refers to it)."""
    seen = {} if seen is None else seen
    if depth > 100:
        return obj
    if id(obj) in seen:
        return seen[id(obj)]
    seen[id(obj)] = obj  # a container inside itself stays as it is
    if isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            out = arrays_to_refs(obj.item(), depth + 1, seen) if obj.ndim == 0 else obj
        elif torch_dtype(obj.dtype) is None:
            out = obj
        else:
            arr = obj if obj.dtype.isnative else obj.astype(obj.dtype.newbyteorder("="))
            out = MemoryRef(torch.from_numpy(np.require(arr, requirements="C")))
        seen[id(obj)] = out
        return out
    if isinstance(obj, dict):
        for key in list(obj):
            obj[key] = arrays_to_refs(obj[key], depth + 1, seen)
    elif isinstance(obj, list):
        obj[:] = [arrays_to_refs(v, depth + 1, seen) for v in obj]
    return obj


class _NpyMemberRef(TensorRef):
    """A compressed or byte-swapped ``.npz`` member, decoded when needed."""

    def __init__(self, path: Path, member: str, dtype: torch.dtype, shape: tuple[int, ...]):
        self.path, self.member, self.dtype, self.shape = path, member, dtype, shape

    def materialize(self) -> torch.Tensor:
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.member) as f:
                arr = np.lib.format.read_array(f, allow_pickle=False)
        except Exception as err:  # the file changed since it was read and checked
            raise CorruptCheckpointError(
                f"{self.path.name}: member {self.member} cannot be read ({err}); the file "
                "changed or is corrupt") from None
        if tuple(arr.shape) != self.shape:
            raise CorruptCheckpointError(
                f"{self.path.name}: member {self.member} changed since it was read")
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        return torch.from_numpy(np.require(arr, requirements="C"))


def _read_header(stream: io.BufferedIOBase) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(stream)
    return np.lib.format.read_array_header_2_0(stream)


class NpzFormat(Format):
    name = "npz"

    def sniff(self, path: Path, head: bytes) -> bool:
        first = first_member_name(head)
        return first is not None and first.endswith(".npy")

    def open(self, path: Path, trust: bool = False) -> Checkpoint:
        fh = FileHandle(path)
        root: dict[str, Any] = {}
        placeholders: list[str] = []
        try:
            zf = zipfile.ZipFile(path)
        except Exception as err:  # zipfile raises many types on garbage
            raise CorruptCheckpointError(f"{path.name}: not a readable npz archive ({err})") from None
        with zf:
            infos = [i for i in zf.infolist() if i.filename.endswith(".npy")]
            _check_members(path, infos)
            offsets = _data_offsets(fh, [(i.header_offset, i.filename) for i in infos
                                         if i.compress_type == zipfile.ZIP_STORED])
            for info in infos:
                name = info.filename[:-4]
                try:
                    ref = _member(zf, fh, info, offsets, placeholders)
                except TorchgraftError:
                    raise
                except Exception as err:
                    raise CorruptCheckpointError(
                        f"{path.name}: member {name}: {err}") from None
                if ref is not None:
                    root[name] = ref
        return Checkpoint(root=root, format=self.name, path=path, placeholders=placeholders)


def _check_members(path: Path, infos: list[zipfile.ZipInfo]) -> None:
    """No member twice; compressed members declare at most ``LIMITS.max_decompressed_bytes``."""
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
        seen: set[str] = set()
        dup = next(n for n in names if n in seen or seen.add(n))
        raise CorruptCheckpointError(f"{path.name}: member {dup} is in the archive twice")
    LIMITS.check("max_decompressed_bytes",
                 sum(i.file_size for i in infos if i.compress_type != zipfile.ZIP_STORED),
                 f"{path.name}: bytes declared by compressed members")


def _member(zf: zipfile.ZipFile, fh: FileHandle, info: zipfile.ZipInfo,
            offsets: dict[str, int], placeholders: list[str]) -> Any:
    """One ``.npy`` member as a tensor reference (None: a dtype torch has no equivalent for)."""
    path, name = fh.path, info.filename[:-4]
    stored = info.compress_type == zipfile.ZIP_STORED
    if not stored:  # size and CRC verified now, not during the copy
        inflate_member(zf, info.filename, "max_decompressed_bytes", keep=False)
    with zf.open(info) as f:
        shape, fortran, dtype = _read_header(f)
        header_len = f.tell()
        if dtype.hasobject:
            check_declared_size(path, info.filename, info.file_size, info.compress_size,
                                "max_pickle_bytes")
            obj, found = restricted_loads(f.read(), what=f"{path.name}:{name}")
            placeholders += [p for p in found if p not in placeholders]
            return arrays_to_refs(obj)
    if any(type(d) is not int or d < 0 for d in shape):
        raise CorruptCheckpointError(f"{path.name}: member {name} has a bad shape {shape}")
    need = math.prod(shape) * dtype.itemsize
    if header_len + need > info.file_size:
        raise CorruptCheckpointError(
            f"{path.name}: member {name} of shape {list(shape)} {dtype} needs {need} bytes after "
            f"its {header_len}-byte header, but the member holds {info.file_size} bytes in all "
            "(truncated or corrupt)")
    tdtype = torch_dtype(dtype)
    if tdtype is None:
        return None
    if stored and dtype.isnative:
        stride = None
        if fortran:
            stride = tuple(reversed(contiguous_strides(tuple(reversed(shape)))))
        ref = FileRef(fh, offsets[info.filename] + header_len, tdtype, tuple(shape), stride)
        if ref.byte_range()[1] > fh.size:
            raise CorruptCheckpointError(f"{path.name}: member {name} is truncated")
        return ref
    return _NpyMemberRef(path, info.filename, tdtype, tuple(shape))


class PickleFormat(Format):
    """A plain pickle (protocol 2+) of dicts and numpy arrays, e.g. detectron2's ``.pkl``."""

    name = "pickle"

    def sniff(self, path: Path, head: bytes) -> bool:
        return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5

    def open(self, path: Path, trust: bool = False) -> Checkpoint:
        with open(path, "rb") as f:
            root, placeholders = restricted_loads(f, what=path.name)
        return Checkpoint(root=arrays_to_refs(root), format=self.name, path=path,
                          placeholders=placeholders)
