"""Torch zip checkpoints (``torch.save`` since 1.6): ``.pth``, ``.pt``, ``.bin``, ``.ckpt``, ``.tar``.

The pickle (``archive/data.pkl``) is parsed by the restricted unpickler; each storage
(``archive/data/<key>``) is located from the zip's central directory and local headers, and
tensors become :class:`~torchgraft.tensors.FileRef` objects pointing at the raw bytes. No tensor
data is read here; every record a tensor needs is checked to exist and be large enough.

Example:
    >>> import torch, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "w.pth")
    >>> torch.save({"w": torch.ones(2)}, path)
    >>> ckpt = TorchZipFormat().open(Path(path))
    >>> ckpt.root["w"].materialize().tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptCheckpointError, UnsupportedFormatError
from ..tensors import FileHandle, FileRef
from .base import Checkpoint, Format
from .unpickler import StorageRef, StorageType, restricted_loads

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


_WINDOW = 16 * 1024


def first_member_name(head: bytes) -> str | None:
    """Name of a zip's first member from the file's first bytes, or None if not a zip."""
    if not head.startswith(b"PK\x03\x04") or len(head) < 30:
        return None
    name_len = struct.unpack_from("<H", head, 26)[0]
    return head[30:30 + name_len].decode("utf-8", "replace")


def _data_offsets(fh: FileHandle, infos: list[zipfile.ZipInfo]) -> dict[str, int]:
    """Byte offset of each member's data (after its local header), reading headers in windows.

    Small records sit close together, so one 16 KiB read usually covers many local headers.
    """
    offsets: dict[str, int] = {}
    win_start, window = -1, b""
    for info in sorted(infos, key=lambda i: i.header_offset):
        start = info.header_offset
        if start + _LOCAL_HEADER.size > fh.size:
            raise CorruptCheckpointError(f"{fh.path.name}: zip member {info.filename} lies past the end")
        need = _LOCAL_HEADER.size + len(info.orig_filename.encode()) + 64
        if not (win_start <= start and start + need <= win_start + len(window)):
            win_start = start
            window = fh.pread(start, min(max(_WINDOW, need), fh.size - start))
        rel = start - win_start
        fields = _LOCAL_HEADER.unpack_from(window, rel) if rel + 30 <= len(window) else None
        if fields is None or fields[0] != b"PK\x03\x04":
            raise CorruptCheckpointError(f"{fh.path.name}: bad zip local header for {info.filename}")
        name_len, extra_len = fields[9], fields[10]
        offsets[info.filename] = start + _LOCAL_HEADER.size + name_len + extra_len
    return offsets


class _ZipStorage(StorageRef):
    """A storage record of the archive: tensors built on it are views at its file offset."""

    def __init__(self, dtype: torch.dtype, numel: int, fh: FileHandle, offset: int,
                 nbytes: int, key: tuple[str, str]) -> None:
        self.dtype, self.numel = dtype, numel
        self.fh, self.offset, self.nbytes, self.key = fh, offset, nbytes, key

    def make_tensor(self, storage: StorageRef, dt: torch.dtype, elem_offset: int,
                    shape: tuple[int, ...], stride: tuple[int, ...]) -> FileRef:
        ref = FileRef(self.fh, self.offset, dt, shape, stride, elem_offset, storage_key=self.key)
        if ref.numel and (elem_offset + ref.span_elems()) * dt.itemsize > self.nbytes:
            raise CorruptCheckpointError(
                f"tensor of shape {list(shape)} needs more bytes than storage {self.key[1]} holds")
        return ref


class TorchZipFormat(Format):
    """Reads torch's zip serialization lazily and without running pickled code."""

    name = "torch-zip"

    def sniff(self, path: Path, head: bytes) -> bool:
        first = first_member_name(head)
        if first is None:
            return False
        # torch writes data.pkl first; anything else that is not .npy gets a precise error here
        return first.endswith("data.pkl") or not first.endswith(".npy")

    def open(self, path: Path, trust: bool = False) -> Checkpoint:
        fh = FileHandle(path)
        try:
            zf = zipfile.ZipFile(path)
        except Exception as err:  # zipfile raises many types on garbage
            raise CorruptCheckpointError(
                f"{path.name}: not a readable zip archive ({err}); the file is probably truncated "
                "or corrupt - download it again"
            ) from None
        with zf:
            infos = {}
            for info in zf.infolist():
                if ".." in info.filename.split("/") or info.filename.startswith("/"):
                    raise CorruptCheckpointError(
                        f"{path.name}: zip member name {info.filename!r} escapes the archive"
                    )
                infos[info.filename] = info
            pkl_names = [n for n in infos if n.endswith("/data.pkl") or n == "data.pkl"]
            if not pkl_names:
                raise UnsupportedFormatError(
                    f"{path.name}: a zip archive but not a torch checkpoint (no data.pkl); "
                    f"members: {', '.join(list(infos)[:5])}"
                )
            pkl_name = sorted(pkl_names, key=len)[0]
            prefix = pkl_name[: -len("data.pkl")]
            byteorder = infos.get(prefix + "byteorder")
            try:
                if byteorder is not None and zf.read(byteorder).strip() not in (b"little", b""):
                    raise UnsupportedFormatError(
                        f"{path.name}: big-endian checkpoints are not supported")
                data = zf.read(pkl_name)
            except UnsupportedFormatError:
                raise
            except Exception as err:  # zipfile raises many types on garbage
                raise CorruptCheckpointError(f"{path.name}: cannot read {pkl_name}: {err}") from None

        storages: dict[str, StorageRef] = {}
        path_str = str(path)
        data_infos = [i for n, i in infos.items() if n.startswith(prefix + "data/")]
        offsets = _data_offsets(fh, data_infos)

        def persistent_load(pid: Any) -> StorageRef:
            if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
                raise CorruptCheckpointError(f"unknown persistent id {pid!r:.80}")
            _, storage_type, key, _location, numel = pid[:5]
            if not isinstance(storage_type, StorageType):
                raise CorruptCheckpointError(f"unknown storage type {storage_type!r:.80}")
            key = str(key)
            if key in storages:
                return storages[key]
            info = infos.get(f"{prefix}data/{key}")
            if info is None:
                raise CorruptCheckpointError(f"storage record data/{key} is missing")
            if info.compress_type != zipfile.ZIP_STORED:
                raise UnsupportedFormatError(f"storage data/{key} is compressed")
            offset = offsets[info.filename]
            if offset + info.file_size > fh.size:
                raise CorruptCheckpointError(f"storage data/{key} runs past the end of the file")
            dtype = storage_type.dtype
            numel = info.file_size // dtype.itemsize if dtype != torch.uint8 else info.file_size
            ref = _ZipStorage(dtype, numel, fh, offset, info.file_size, (path_str, key))
            storages[key] = ref
            return ref

        root, placeholders = restricted_loads(data, persistent_load, what=path.name)
        return Checkpoint(root=root, format=self.name, path=path, placeholders=placeholders)
