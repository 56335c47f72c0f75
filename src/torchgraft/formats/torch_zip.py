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
import zlib
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptCheckpointError, TorchgraftError, UnsupportedFormatError
from ..limits import LIMITS
from ..tensors import FileHandle, FileRef, TensorRef, layout
from .base import Checkpoint, Format
from .tensor_kinds import ComputedRef
from .unpickler import StorageRef, StorageType, brief, restricted_loads
from .zip_index import Members, check_stored_size, inflate_member, read_central_directory

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")


_WINDOW = 16 * 1024


def first_member_name(head: bytes) -> str | None:
    """Name of a zip's first member from the file's first bytes, or None if not a zip."""
    if not head.startswith(b"PK\x03\x04") or len(head) < 30:
        return None
    name_len = struct.unpack_from("<H", head, 26)[0]
    return head[30:30 + name_len].decode("utf-8", "replace")


def _data_offsets(fh: FileHandle, headers: list[tuple[int, str]]) -> dict[str, int]:
    """Byte offset of each member's data (after its local header), reading headers in windows.

    ``headers`` holds ``(local header offset, name)`` pairs from the central directory.

    Small records sit close together, so one 16 KiB read usually covers many local headers.
    """
    offsets: dict[str, int] = {}
    win_start, win_end, window = -1, -1, b""
    unpack, size = _LOCAL_HEADER.unpack_from, fh.size
    for start, name in sorted(headers):
        if start + 30 > size:
            raise CorruptCheckpointError(f"{fh.path.name}: zip member {name} lies past the end")
        if not (win_start <= start and start + 30 + 4 * len(name) + 64 <= win_end):
            win_start = start
            window = fh.pread(start, min(max(_WINDOW, 30 + 4 * len(name) + 64), size - start))
            win_end = start + len(window)
        rel = start - win_start
        fields = unpack(window, rel) if rel + 30 <= len(window) else None
        if fields is None or fields[0] != b"PK\x03\x04":
            raise CorruptCheckpointError(f"{fh.path.name}: bad zip local header for {name}")
        offsets[name] = start + 30 + fields[9] + fields[10]
    return offsets


def _zipfile_members(path: Path) -> Members:
    """The member table through ``zipfile``, for archives ``read_central_directory`` declines."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            members = {i.filename: (i.header_offset, i.compress_size, i.compress_type, i.CRC)
                       for i in infos}
    except Exception as err:  # zipfile raises many types on garbage
        raise CorruptCheckpointError(
            f"{path.name}: not a readable zip archive ({err}); the file is probably truncated "
            "or corrupt - download it again"
        ) from None
    if len(members) != len(infos):
        seen: set[str] = set()
        dup = next(i.filename for i in infos if i.filename in seen or seen.add(i.filename))
        raise CorruptCheckpointError(
            f"{path.name}: zip member {dup!r} is in the archive twice (corrupt or crafted: tools "
            "would disagree on which copy to read)")
    return members


def _read_member(fh: FileHandle, members: Members, name: str) -> bytes:
    """A small member's bytes, CRC-checked; compressed ones go through ``zipfile``."""
    offset, size, method, crc = members[name]
    try:
        if method != zipfile.ZIP_STORED:
            with zipfile.ZipFile(fh.path) as zf:
                return inflate_member(zf, name)
        check_stored_size(fh.path, name, size, "max_pickle_bytes")
        data = fh.pread(_data_offsets(fh, [(offset, name)])[name], size)
    except TorchgraftError:
        raise
    except Exception as err:  # zipfile raises many types on garbage
        raise CorruptCheckpointError(f"{fh.path.name}: cannot read {name}: {err}") from None
    if crc and zlib.crc32(data) != crc:  # 0: not recorded (torch's compute_crc32=False)
        raise CorruptCheckpointError(
            f"{fh.path.name}: {name} fails its CRC check; the file is corrupt - download it again")
    return data


class _ZipStorage(StorageRef):
    """A storage record of the archive: tensors built on it are views at its file offset."""

    __slots__ = ("fh", "offset", "nbytes", "key")

    def __init__(self, dtype: torch.dtype, numel: int, fh: FileHandle, offset: int,
                 nbytes: int, key: str) -> None:
        self.dtype, self.numel = dtype, numel
        self.fh, self.offset, self.nbytes, self.key = fh, offset, nbytes, key

    def make_tensor(self, storage: StorageRef, dt: torch.dtype, elem_offset: int,
                    shape: tuple[int, ...], stride: tuple[int, ...]) -> FileRef:
        ref = FileRef(self.fh, self.offset, dt, shape, stride, elem_offset, self)
        if ref._span and (elem_offset + ref._span) * dt.itemsize > self.nbytes:
            raise CorruptCheckpointError(
                f"tensor of shape {list(shape)} needs more bytes than storage {self.key} holds")
        return ref


# --- deflated storage members (a torch zip rewritten with ZIP_DEFLATED; torch.load reads it) ----


def _uncompressed_sizes(path: Path) -> dict[str, int]:
    """Uncompressed sizes of the compressed members, their total checked against the limit."""
    try:
        with zipfile.ZipFile(path) as zf:
            sizes = {i.filename: i.file_size for i in zf.infolist()
                     if i.compress_type != zipfile.ZIP_STORED}
    except Exception as err:  # zipfile raises many types on garbage
        raise CorruptCheckpointError(f"{path.name}: not a readable zip archive ({err})") from None
    LIMITS.check("max_decompressed_bytes", sum(sizes.values()),
                 f"{path.name}: compressed members decompress to")
    return sizes


class _DeflatedStorage(StorageRef):
    """A deflated storage record: decompressed into memory (and CRC-checked) when a tensor on it
    is read, never when the file is opened."""

    __slots__ = ("fh", "offset", "csize", "nbytes", "crc", "key")

    def __init__(self, dtype: torch.dtype, fh: FileHandle, offset: int, csize: int, nbytes: int,
                 crc: int, key: str) -> None:
        self.dtype, self.numel = dtype, nbytes // dtype.itemsize
        self.fh, self.offset, self.csize, self.nbytes, self.crc, self.key = (
            fh, offset, csize, nbytes, crc, key)

    def data(self) -> bytearray:
        if not self.nbytes:  # (max_length 0 would mean "unbounded")
            return bytearray()
        inflater = zlib.decompressobj(-15)
        try:
            out = bytearray(inflater.decompress(self.fh.pread(self.offset, self.csize),
                                                self.nbytes))
        except zlib.error as err:
            raise CorruptCheckpointError(
                f"{self.fh.path.name}: storage data/{self.key} does not inflate ({err})") from None
        if len(out) != self.nbytes or inflater.unconsumed_tail or (
                self.crc and zlib.crc32(out) != self.crc):
            raise CorruptCheckpointError(
                f"{self.fh.path.name}: storage data/{self.key} fails its size or CRC check; the "
                "file is corrupt - download it again")
        return out

    def make_tensor(self, storage: StorageRef, dt: torch.dtype, elem_offset: int,
                    shape: tuple[int, ...], stride: tuple[int, ...]) -> TensorRef:
        shape, numel, _, span = layout(shape, stride)
        if span and (elem_offset + span) * dt.itemsize > self.nbytes:
            raise CorruptCheckpointError(
                f"tensor of shape {list(shape)} needs more bytes than storage {self.key} holds")

        def build() -> torch.Tensor:
            if not numel:
                return torch.empty_strided(shape, stride, dtype=dt)
            raw = self.data()[elem_offset * dt.itemsize:(elem_offset + span) * dt.itemsize]
            flat = torch.frombuffer(raw, dtype=dt)
            return torch.as_strided(flat, shape, stride).clone()

        return ComputedRef("deflated", shape, dt, build,
                           extra=(id(self), elem_offset, shape, stride, dt))


def _deflated_storage(fh: FileHandle, dtype: torch.dtype, name: str, offset: int, csize: int,
                      method: int, crc: int, usizes: dict[str, int]) -> StorageRef:
    key = name.rsplit("/", 1)[-1]
    if method != zipfile.ZIP_DEFLATED:
        raise UnsupportedFormatError(
            f"{fh.path.name}: storage data/{key} is compressed with zip method {method}; only "
            "stored and deflated members are read. Rewrite the archive uncompressed (zip -0)")
    if offset + csize > fh.size:
        raise CorruptCheckpointError(f"storage data/{key} runs past the end of the file")
    if not usizes:
        usizes.update(_uncompressed_sizes(fh.path))
    if name not in usizes:
        raise CorruptCheckpointError(f"storage data/{key}: no uncompressed size in the archive")
    ref = _DeflatedStorage(dtype, fh, offset, csize, usizes[name], crc, key)
    _verify_inflates(ref)
    return ref


def _verify_inflates(ref: _DeflatedStorage) -> None:
    """Inflate a deflated storage once while reading, in bounded steps, keeping nothing: its size
    and CRC must hold before any tensor is written (issue #10, item 7); the copy inflates it
    again. Never produces more than the declared size plus one step."""
    if not ref.nbytes:
        return
    inflater = zlib.decompressobj(-15)
    got, crc, pos, end, step = 0, 0, ref.offset, ref.offset + ref.csize, 1 << 20
    try:
        while got <= ref.nbytes and not inflater.eof:
            chunk = inflater.unconsumed_tail
            if not chunk:
                if pos >= end:
                    break
                chunk = ref.fh.pread(pos, min(step, end - pos))
                pos += len(chunk)
            out = inflater.decompress(chunk, step)
            got += len(out)
            crc = zlib.crc32(out, crc)
    except zlib.error as err:
        raise CorruptCheckpointError(
            f"{ref.fh.path.name}: storage data/{ref.key} does not inflate ({err}); the file is "
            "corrupt - download it again") from None
    if got != ref.nbytes or (ref.crc and crc != ref.crc):
        raise CorruptCheckpointError(
            f"{ref.fh.path.name}: storage data/{ref.key} fails its size or CRC check; the file "
            "is corrupt - download it again")


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
        members = read_central_directory(fh.fileno(), fh.size) or _zipfile_members(path)
        for name in members:
            if name.startswith("/") or (".." in name and ".." in name.split("/")):
                raise CorruptCheckpointError(
                    f"{path.name}: zip member name {name!r} escapes the archive")
        pkl_names = [n for n in members if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl_names:
            raise UnsupportedFormatError(
                f"{path.name}: a zip archive but not a torch checkpoint (no data.pkl); "
                f"members: {', '.join(list(members)[:5])}"
            )
        pkl_name = sorted(pkl_names, key=len)[0]
        prefix = pkl_name[: -len("data.pkl")]
        if prefix + "byteorder" in members:
            if _read_member(fh, members, prefix + "byteorder").strip() not in (b"little", b""):
                raise UnsupportedFormatError(f"{path.name}: big-endian checkpoints are not supported")
        data = _read_member(fh, members, pkl_name)

        storages: dict[str, StorageRef] = {}
        usizes: dict[str, int] = {}  # filled on the first compressed storage
        data_prefix = prefix + "data/"
        offsets = _data_offsets(fh, [(m[0], n) for n, m in members.items()
                                     if n.startswith(data_prefix)])

        def persistent_load(pid: Any) -> StorageRef:
            if type(pid) is not tuple or len(pid) < 5 or pid[0] != "storage":
                raise CorruptCheckpointError(f"unknown persistent id {brief(pid)}")
            storage_type, key = pid[1], str(pid[2]) if isinstance(pid[2], (str, int)) else brief(pid[2])
            ref = storages.get(key)
            if ref is not None:
                return ref
            if not isinstance(storage_type, StorageType):
                raise CorruptCheckpointError(f"unknown storage type {brief(storage_type)}")
            name = data_prefix + key
            offset = offsets.get(name)
            if offset is None:
                raise CorruptCheckpointError(f"storage record data/{key} is missing")
            _, nbytes, method, crc = members[name]
            if method != zipfile.ZIP_STORED:
                ref = storages[key] = _deflated_storage(fh, storage_type.dtype, name, offset,
                                                        nbytes, method, crc, usizes)
                return ref
            if offset + nbytes > fh.size:
                raise CorruptCheckpointError(f"storage data/{key} runs past the end of the file")
            dtype = storage_type.dtype
            ref = storages[key] = _ZipStorage(dtype, nbytes // dtype.itemsize, fh, offset, nbytes,
                                              key)
            return ref

        root, placeholders = restricted_loads(data, persistent_load, what=path.name)
        return Checkpoint(root=root, format=self.name, path=path, placeholders=placeholders)
