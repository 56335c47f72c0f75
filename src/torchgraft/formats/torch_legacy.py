"""Legacy (pre-1.6, non-zip) torch files: a run of pickles followed by raw storages.

Layout: pickled magic number, protocol version, system info, the object (storages as persistent
ids), the list of storage keys, then per key an int64 element count and the raw bytes. Only
the 8-byte counts are read here; the bytes stay on disk behind :class:`FileRef` objects.

Example:
    >>> import torch, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "old.pth")
    >>> torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    >>> TorchLegacyFormat().open(Path(path)).root["w"].materialize().tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

from ..errors import CorruptCheckpointError
from ..tensors import FileHandle, FileRef
from .base import Checkpoint, Format
from .unpickler import Placeholder, StorageRef, StorageType, brief, make_placeholder, restricted_loads

MAGIC = 0x1950A86A20F9469CFC6C
# protocol 2, LONG1 of 10 bytes: how the magic number's pickle starts
_HEAD = b"\x80\x02\x8a\x0a" + MAGIC.to_bytes(10, "little")


_MAGIC_LONG1 = b"\x8a\x0a" + MAGIC.to_bytes(10, "little")
_MAGIC_TEXT = b"L" + str(MAGIC).encode() + b"L\n."  # protocols 0 and 1


def _is_legacy_head(head: bytes) -> bool:
    """The pickled magic number under any pickle protocol (``torch.save(pickle_protocol=N)``)."""
    if head.startswith(_MAGIC_TEXT):
        return True
    if len(head) < 2 or head[0] != 0x80 or not 2 <= head[1] <= 5:
        return False
    body = head[2:]
    if head[1] >= 4 and body[:1] == b"\x95":  # FRAME opcode and its 8-byte length
        body = body[9:]
    return body.startswith(_MAGIC_LONG1)


class TorchLegacyFormat(Format):
    """Reads the legacy torch serialization lazily with the restricted unpickler."""

    name = "torch-legacy"

    def sniff(self, path: Path, head: bytes) -> bool:
        return head.startswith(_HEAD) or _is_legacy_head(head)

    def open(self, path: Path, trust: bool = False) -> Checkpoint:
        fh = FileHandle(path)
        pending: dict[str, list[tuple[FileRef, int]]] = {}
        dtypes: dict[str, Any] = {}

        def persistent_load(pid: Any) -> Any:
            if isinstance(pid, tuple) and pid and pid[0] == "module":
                # ('module', <class>, source file, source): the class is already a placeholder
                cls = pid[1] if len(pid) > 1 else None
                if isinstance(cls, type) and issubclass(cls, Placeholder):
                    return cls
                return make_placeholder("torch.legacy.module_source")
            if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
                raise CorruptCheckpointError(f"unknown persistent id {brief(pid)}")
            _, storage_type, key, _location, numel = pid[:5]
            view = pid[5] if len(pid) > 5 else None
            if not isinstance(storage_type, StorageType) or not isinstance(numel, int):
                raise CorruptCheckpointError(f"bad storage reference {brief(pid)}")
            key = str(key) if isinstance(key, (str, int)) else brief(key)  # str(): 2**depth
            dtypes.setdefault(key, storage_type.dtype)
            base_elems = 0
            if isinstance(view, tuple) and len(view) == 3:
                base_elems = _view_offset(view, numel, path)

            def make_tensor(storage, dt, elem_offset, shape, stride, _key=key, _base=base_elems):
                if type(elem_offset) is not int or elem_offset < 0:
                    raise CorruptCheckpointError(
                        f"{path.name}: a tensor starts at element {elem_offset!r:.40} of storage "
                        f"{_key}; expected a non-negative offset")
                ref = FileRef(fh, -1, dt, shape, stride, _base + elem_offset,
                              storage_key=(str(path), _key))
                pending.setdefault(_key, []).append((ref, ref.elem_offset + ref.span_elems()))
                return ref

            return StorageRef(storage_type.dtype, numel, make_tensor)

        with open(path, "rb") as f:
            try:
                magic, _ = restricted_loads(f, what=path.name)
                if magic != MAGIC:
                    raise CorruptCheckpointError("bad magic number")
                restricted_loads(f, what=path.name)  # protocol version
                restricted_loads(f, what=path.name)  # sys info
                root, placeholders = restricted_loads(f, persistent_load, what=path.name)
                keys, _ = restricted_loads(f, what=path.name)
            except CorruptCheckpointError as err:
                msg = str(err)
                raise CorruptCheckpointError(
                    msg if msg.startswith(path.name) else f"{path.name}: {msg}"
                ) from None
            offset = f.tell()
        if not isinstance(keys, list):
            raise CorruptCheckpointError(f"{path.name}: storage key list missing")
        for key in keys:
            key = str(key)
            if offset + 8 > fh.size:
                raise CorruptCheckpointError(f"{path.name}: truncated before storage {key}")
            (numel,) = struct.unpack("<q", fh.pread(offset, 8))
            dtype = dtypes.get(key)
            if dtype is None or numel < 0:
                raise CorruptCheckpointError(f"{path.name}: unexpected storage {key}")
            nbytes = numel * dtype.itemsize
            start = offset + 8
            if start + nbytes > fh.size:
                raise CorruptCheckpointError(
                    f"{path.name}: storage {key} needs {nbytes} bytes past byte {start} but the "
                    f"file has {fh.size} (truncated)"
                )
            for ref, end_elems in pending.pop(key, []):
                if ref.numel and end_elems * ref.dtype.itemsize > nbytes:
                    raise CorruptCheckpointError(f"{path.name}: a tensor overruns storage {key}")
                ref.offset = start
            offset = start + nbytes
        if pending:
            raise CorruptCheckpointError(
                f"{path.name}: storages {sorted(pending)[:3]} are referenced but not stored"
            )
        return Checkpoint(root=root, format=self.name, path=path, placeholders=placeholders)


def _view_offset(view: tuple, numel: int, path: Path) -> int:
    """The element offset of a legacy storage view ``(key, offset, size)``, checked to lie in
    ``[0, numel]`` so no tensor reads bytes before or after its own storage."""
    offset, size = view[1], view[2]
    if type(offset) is not int or offset < 0 or (type(size) is int and offset + size > numel):
        raise CorruptCheckpointError(
            f"{path.name}: a storage view at element {offset!r:.40} (size {size!r:.40}) does not "
            f"lie inside its {numel}-element storage (corrupt or crafted file)")
    return offset
