"""Lazy tensor references: a tensor's shape and dtype, and how to fetch its bytes later.

Readers return :class:`TensorRef` objects instead of tensors, so nothing is read until the
apply stage copies it, straight from the file into the parameter's own memory when it can.

Example:
    >>> import torch
    >>> ref = MemoryRef(torch.ones(2, 3))
    >>> ref.shape, ref.dtype
    ((2, 3), torch.float32)
    >>> out = torch.empty(2, 3, dtype=torch.float64)
    >>> ref.read_into(out); float(out.sum())
    6.0
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import threading
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import torch

from .errors import CorruptCheckpointError, ReadError, ResourceLimitError


def contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major strides for ``shape``."""
    strides = []
    acc = 1
    for dim in reversed(shape):
        strides.append(acc)
        acc *= max(dim, 1)
    return tuple(reversed(strides))


@functools.lru_cache(maxsize=4096)
def is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    """True when ``stride`` lays ``shape`` out row-major (size-1 dims may have any stride)."""
    expected = 1
    for dim, st in zip(reversed(shape), reversed(stride)):
        if dim == 0:
            return True
        if dim != 1 and st != expected:
            return False
        expected *= dim
    return True


_LAYOUTS: dict[tuple, tuple[tuple[int, ...], int, bool, int]] = {}


def _plain_dims(dims: tuple, what: str) -> tuple[int, ...]:
    """``dims`` as a tuple of non-negative plain ints, or a CorruptCheckpointError."""
    if type(dims) is not tuple or any(type(d) is not int or d < 0 for d in dims):
        raise CorruptCheckpointError(
            f"bad tensor {what} of {len(dims)} dims: expected non-negative ints")
    return dims


def layout(shape: tuple[int, ...],
           stride: tuple[int, ...] | None) -> tuple[tuple[int, ...], int, bool, int]:
    """``(shape, numel, contiguous, span)`` of a view; ``span`` counts the storage elements it
    touches, and the returned shape is an equal tuple shared by every view of that layout.

    Checkpoints repeat a few shapes many times, so results are memoised (bounded). Only layouts
    made of plain non-negative ints are computed and cached; the cached value holds the
    canonical int tuples, so an equal key (``(True,)`` for ``(1,)``) gets those ints back.
    """
    key = (shape, stride)
    got = _LAYOUTS.get(key)
    if got is None:
        shape = _plain_dims(shape, "shape")
        if stride is not None:
            stride = _plain_dims(stride, "stride")
            if len(stride) != len(shape):
                raise CorruptCheckpointError(f"shape {shape} and stride {stride} differ in length")
        numel = math.prod(shape)
        contiguous = stride is None or is_contiguous(shape, stride)
        if numel == 0:
            span = 0
        elif contiguous:
            span = numel
        else:
            span = 1 + sum((d - 1) * s for d, s in zip(shape, stride))
        got = (shape, numel, contiguous, span)
        if len(_LAYOUTS) >= 4096:
            _LAYOUTS.clear()
        _LAYOUTS[(shape, stride)] = got
    return got


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU tensor's bytes (no copy).

    The view borrows the tensor's memory: keep the tensor alive while using it.
    """
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


ByteSpan = tuple[Any, int, int]
"""A tensor's values as raw bytes in a file, ``(file, start, end)``: ``end - start`` bytes at
``start``, row-major and contiguous, in the tensor's dtype (read with ``file.pread_into``); a
plain tuple because the apply stage asks for one per tensor."""


class TensorRef:
    """A tensor that has not been read yet.

    Subclasses implement :meth:`materialize`; :meth:`read_into` copies into an existing tensor
    (casting dtype and moving device as needed). :meth:`byte_span` says where its bytes lie when
    they can be read straight into memory (the apply stage's fast paths), else None.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype

    def __setstate__(self, state: object) -> None:
        # a pickle's BUILD on a rebuilt tensor would bypass every layout check
        raise CorruptCheckpointError("pickle tries to set the state of a tensor (BUILD on a "
                                     "rebuilt tensor); the file is corrupt or hostile")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def alias_key(self) -> Hashable:
        """Equal keys mean the two refs are the same view of the same storage (tied)."""
        return id(self)

    def materialize(self) -> torch.Tensor:
        """Return a CPU tensor with the data (a new tensor unless the data is already in memory)."""
        raise NotImplementedError

    def read_into(self, out: torch.Tensor) -> None:
        """Copy the data into ``out`` (same shape; dtype and device may differ)."""
        out.copy_(self.materialize())

    def byte_span(self) -> ByteSpan | None:
        """Where the values lie as contiguous raw bytes in a file; None: call ``read_into``."""
        return None

    def __repr__(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"{type(self).__name__}(shape={list(self.shape)}, dtype={dt})"


class MemoryRef(TensorRef):
    """A tensor that is already in memory (in-memory sources, numpy arrays)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.shape = tuple(tensor.shape)
        self.dtype = tensor.dtype

    def alias_key(self) -> Hashable:
        t = self.tensor
        if t.device.type == "meta":
            return id(t)
        try:
            ptr = t.untyped_storage().data_ptr()
        except Exception:  # sparse or exotic tensors
            return id(t)
        return ("mem", t.device.type, ptr, t.storage_offset(), self.shape, tuple(t.stride()))

    def materialize(self) -> torch.Tensor:
        return self.tensor

    def read_into(self, out: torch.Tensor) -> None:
        out.copy_(self.tensor)


class FileHandle:
    """A read-only file opened once and read with ``os.preadv`` (thread-safe, no seeking)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.size = self.path.stat().st_size
        self._fd: int | None = None
        self._lock = threading.Lock()

    def fileno(self) -> int:
        if self._fd is None:
            with self._lock:
                if self._fd is None:
                    self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def pread_into(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from ``offset``; a short read means the file was truncated."""
        n = len(buf)
        if offset < 0 or offset + n > self.size:
            raise CorruptCheckpointError(
                f"{self.path.name}: wants bytes {offset}..{offset + n} but the file has "
                f"{self.size} bytes (truncated or corrupt)"
            )
        fd = self.fileno()
        done = 0
        while done < n:
            try:
                got = os.preadv(fd, [buf[done:]], offset + done)
            except OSError as err:
                raise ReadError(f"{self.path.name}: read failed at byte {offset + done}: {err}") from err
            if got <= 0:
                raise CorruptCheckpointError(
                    f"{self.path.name}: file ended at byte {offset + done}, expected {offset + n}"
                )
            done += got

    def pread(self, offset: int, n: int) -> bytes:
        buf = bytearray(n)
        self.pread_into(memoryview(buf), offset)
        return bytes(buf)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class FileRef(TensorRef):
    """A tensor stored raw (little-endian, row-major storage) at a byte offset in a file.

    ``offset`` is where its storage starts; ``elem_offset`` and ``stride`` describe the view into
    that storage, as torch does.
    """

    __slots__ = ("file", "offset", "dtype", "shape", "_stride", "elem_offset", "storage_key",
                 "_numel", "contiguous", "_span")

    def __init__(
        self,
        file: FileHandle,
        offset: int,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        stride: tuple[int, ...] | None = None,
        elem_offset: int = 0,
        storage_key: Hashable | None = None,
    ) -> None:
        self.file = file
        self.offset = offset
        self.dtype = dtype
        shape = shape if type(shape) is tuple else tuple(shape)
        self._stride = stride = stride if stride is None or type(stride) is tuple else tuple(stride)
        self.elem_offset = elem_offset
        self.storage_key = storage_key  # None: the storage starts at ``offset`` of ``file``
        self.shape, self._numel, self.contiguous, self._span = layout(shape, stride)

    @property
    def numel(self) -> int:
        return self._numel

    @property
    def stride(self) -> tuple[int, ...]:
        if self._stride is None:
            self._stride = contiguous_strides(self.shape)
        return self._stride

    def alias_key(self) -> Hashable:
        key = self.storage_key if self.storage_key is not None else (id(self.file), self.offset)
        return ("file", key, self.elem_offset, self.shape, self.stride, self.dtype)

    def span_elems(self) -> int:
        """Elements of storage this view touches, from ``elem_offset`` on."""
        return self._span

    def byte_range(self) -> tuple[int, int]:
        item = self.dtype.itemsize
        start = self.offset + self.elem_offset * item
        return start, start + self.span_elems() * item

    def byte_span(self) -> ByteSpan | None:
        if not self.contiguous:
            return None
        item = self.dtype.itemsize
        start = self.offset + self.elem_offset * item
        return (self.file, start, start + self._span * item)

    def materialize(self) -> torch.Tensor:
        if self.contiguous:
            out = _empty(self.shape, self.dtype, self.file)
            self._pread_contiguous(out)
            return out
        return _clone(self._strided_view(), self.file)

    def _strided_view(self) -> torch.Tensor:
        """The view over its storage span, read from the file (the span's memory only)."""
        flat = _empty((self.span_elems(),), self.dtype, self.file)
        self._pread_span(flat)
        return torch.as_strided(flat, self.shape, self.stride)

    def _pread_contiguous(self, out: torch.Tensor) -> None:
        if self.numel:
            start, _ = self.byte_range()
            self.file.pread_into(byte_view(out), start)

    def _pread_span(self, flat: torch.Tensor) -> None:
        if flat.numel():
            start, _ = self.byte_range()
            self.file.pread_into(byte_view(flat), start)

    def read_into(self, out: torch.Tensor) -> None:
        if (
            self.contiguous
            and out.device.type == "cpu"
            and out.dtype == self.dtype
            and out.is_contiguous()
            and tuple(out.shape) == self.shape
        ):
            self._pread_contiguous(out)
            return
        out.copy_(self._strided_view() if not self.contiguous else self.materialize())


def _empty(shape: tuple[int, ...], dtype: torch.dtype, file: FileHandle) -> torch.Tensor:
    try:
        return torch.empty(shape, dtype=dtype)
    except (RuntimeError, MemoryError) as err:
        raise _too_big(shape, dtype, file, err) from None


def _clone(view: torch.Tensor, file: FileHandle) -> torch.Tensor:
    try:
        return view.clone()
    except (RuntimeError, MemoryError) as err:
        raise _too_big(tuple(view.shape), view.dtype, file, err) from None


def _too_big(shape: tuple[int, ...], dtype: torch.dtype, file: FileHandle,
             err: BaseException) -> ReadError:
    nbytes = math.prod(shape) * dtype.itemsize
    return ResourceLimitError(
        f"{file.path.name}: a tensor of shape {list(shape)} ({nbytes} bytes as {dtype}) cannot be "
        f"allocated ({str(err).splitlines()[0][:120]}); a view that repeats a small storage "
        "(stride 0) can ask for far more memory than the file holds")
