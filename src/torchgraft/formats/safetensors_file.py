"""``.safetensors`` files: the JSON header is parsed and checked; tensor bytes stay on disk.

Every entry is validated before anything is read: known dtype, non-negative shape, byte range
equal to the shape's size, inside the file, no two ranges overlapping, no duplicate names. The
header length itself is bounded by the file size, so a corrupt length never allocates.

Example:
    >>> import torch, tempfile, os
    >>> from safetensors.torch import save_file
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> save_file({"w": torch.ones(2)}, path)
    >>> SafetensorsFormat().open(Path(path)).root["w"].shape
    (2,)
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from ..errors import CorruptCheckpointError
from ..limits import LIMITS
from ..tensors import FileHandle, FileRef
from .base import Checkpoint, Format

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
for _name, _attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
for _name, _attr in (("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
                     ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# F4: 4-bit floats, two per byte. The header counts 4-bit elements; torch (and safetensors'
# loader) use float4_e2m1fn_x2, one element per byte, so the last dimension is halved. Not in
# DTYPE_NAMES: a writer must double the last dimension itself.
_F4 = getattr(torch, "float4_e2m1fn_x2", None)
if _F4 is not None:
    DTYPES["F4"] = _F4


def _packed_f4_shape(name: str, shape: list[int]) -> tuple[int, ...]:
    """The torch shape of an F4 entry: the last dimension (in 4-bit elements) halved."""
    if not shape or shape[-1] % 2:
        raise CorruptCheckpointError(
            f"{name!r}: F4 shape {shape} has an odd or missing last dimension; two 4-bit "
            "values share a byte, so it must be even")
    return (*shape[:-1], shape[-1] // 2)

MAX_HEADER = 100 * 1024 * 1024  # the default of LIMITS.max_header_bytes (kept for importers)


def _no_duplicates(pairs: list) -> dict:
    """``object_pairs_hook``: a key given twice (however it is spelled, e.g. with ``\\u``
    escapes) in any JSON object of the header is an error, as safetensors itself says."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise CorruptCheckpointError(f"duplicate key {dup!r} in header (the file is corrupt or "
                                     "crafted; safetensors refuses it too)")
    return out


def _parse_header(raw: bytes) -> object:
    """The header JSON, with duplicate keys refused (see :func:`_no_duplicates`).

    The plain parse is fast; the checking one (a Python call per object) runs only when the
    header could hide a duplicate: it holds an escape, or the literal counts of the entry keys
    and metadata keys do not match the parsed objects.
    """
    header = json.loads(raw)
    if b"\\" in raw or not isinstance(header, dict) or _counts_differ(raw, header):
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    return header


def _counts_differ(raw: bytes, header: dict) -> bool:
    n = len(header) - ("__metadata__" in header)
    if any(raw.count(key) != n for key in (b'"dtype"', b'"shape"', b'"data_offsets"')):
        return True
    meta = header.get("__metadata__")
    if raw.count(b'"__metadata__"') > 1 or (meta is not None and not isinstance(meta, dict)):
        return True
    return bool(meta) and any(raw.count(json.dumps(k).encode()) != 1 for k in meta)


def _numel(dims: object) -> int | None:
    """Product of a JSON list of non-negative ints (bools refused), or None otherwise."""
    if type(dims) is not list or any(type(d) is not int or d < 0 for d in dims):
        return None
    return math.prod(dims)


def _first_overlap(spans: list[tuple[int, int, str]]) -> tuple[str, str] | None:
    """Two names whose byte ranges ``[begin, end)`` share a byte; empty ranges share none.

    Sorted by start, each range is compared with the furthest-reaching range before it, so an
    overlap is found even when ranges between them (empty or short) are not neighbours of it.
    """
    reach, reach_name = -1, ""
    for begin, end, name in sorted(s for s in spans if s[1] > s[0]):
        if begin < reach:
            return reach_name, name
        if end > reach:
            reach, reach_name = end, name
    return None


def _add_aliases(root: dict, aliases: str | None) -> None:
    """Shared tensors written once by ``torchgraft convert``: alias names point at the kept one.
    Anything else in that metadata field (a list, nested objects) is ignored."""
    if not aliases:
        return
    try:
        table = json.loads(aliases)
    except (ValueError, RecursionError):
        return
    if isinstance(table, dict):
        for alias, kept in table.items():
            if isinstance(kept, str) and kept in root and alias not in root:
                root[alias] = root[kept]


class SafetensorsFormat(Format):
    """Reads safetensors headers; tensors are read later straight from the file."""

    name = "safetensors"

    def sniff(self, path: Path, head: bytes) -> bool:
        if len(head) < 9:
            return path.suffix == ".safetensors" and len(head) > 0
        (n,) = struct.unpack("<Q", head[:8])
        return head[8:9] == b"{" or (path.suffix == ".safetensors" and n > 0)

    def open(self, path: Path, trust: bool = False) -> Checkpoint:
        fh = FileHandle(path)
        try:
            return self._open(fh)
        except CorruptCheckpointError as err:
            msg = str(err)
            raise CorruptCheckpointError(
                msg if msg.startswith(path.name) else f"{path.name}: {msg}"
            ) from None

    def _open(self, fh: FileHandle) -> Checkpoint:
        if fh.size < 8:
            raise CorruptCheckpointError(f"only {fh.size} bytes; a safetensors file has 8+")
        (n,) = struct.unpack("<Q", fh.pread(0, 8))
        if 8 + n > fh.size:
            raise CorruptCheckpointError(
                f"header claims {n} bytes but the file has {fh.size} (header too large: "
                "truncated or not a safetensors file)"
            )
        LIMITS.check("max_header_bytes", n, "safetensors header size in bytes")
        raw = fh.pread(8, n)
        try:
            header = _parse_header(raw)
        except CorruptCheckpointError:
            raise
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise CorruptCheckpointError(f"header is not valid JSON ({err})") from None
        if not isinstance(header, dict):
            raise CorruptCheckpointError("header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise CorruptCheckpointError("__metadata__ is not an object")
        base = 8 + n
        data_len = fh.size - base
        root: dict[str, FileRef] = {}
        spans = []
        for name, entry in header.items():
            if not isinstance(entry, dict):
                raise CorruptCheckpointError(f"entry {name!r} is not an object")
            name_of_dtype = entry.get("dtype")
            dtype = DTYPES.get(name_of_dtype) if type(name_of_dtype) is str else None
            if dtype is None:
                raise CorruptCheckpointError(f"{name!r}: unknown dtype {entry.get('dtype')!r}")
            shape, offs = entry.get("shape"), entry.get("data_offsets")
            numel = _numel(shape)
            if numel is None:
                raise CorruptCheckpointError(f"{name!r}: bad shape {shape!r}")
            if dtype is _F4:
                shape = _packed_f4_shape(name, shape)
                numel //= 2
            if (type(offs) is not list or len(offs) != 2 or type(offs[0]) is not int
                    or type(offs[1]) is not int):
                raise CorruptCheckpointError(f"{name!r}: bad data_offsets {offs!r}")
            begin, end = offs
            if not 0 <= begin <= end <= data_len:
                raise CorruptCheckpointError(
                    f"{name!r}: bytes {begin}..{end} lie outside the {data_len} data bytes "
                    "(truncated file or corrupt header)"
                )
            if end - begin != numel * dtype.itemsize:
                raise CorruptCheckpointError(
                    f"{name!r}: {end - begin} bytes do not fit shape {shape} of {dtype}"
                )
            spans.append((begin, end, name))
            root[name] = FileRef(fh, base + begin, dtype, tuple(shape))
        overlap = _first_overlap(spans)
        if overlap is not None:
            raise CorruptCheckpointError(
                f"tensors {overlap[0]!r} and {overlap[1]!r} overlap in the file (corrupt or "
                "crafted header)")
        meta = {str(k): str(v) for k, v in metadata.items()}
        _add_aliases(root, meta.get("torchgraft.aliases"))
        return Checkpoint(root=root, format=self.name, path=fh.path, metadata=meta)
