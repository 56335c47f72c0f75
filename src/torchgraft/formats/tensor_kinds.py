"""Tensor kinds beyond plain dense storage views, rebuilt by torchgraft's own code.

``torch.save`` writes conjugate/negative views (tensor metadata bits), quantized tensors,
sparse COO/CSR/CSC/BSR/BSC tensors, nested tensors (strided and jagged), meta tensors and
tensors saved from a device without storage. The restricted unpickler resolves torch's rebuild
functions for these to the functions here, which check every argument the file gives (dtypes,
shapes, scales, zero points, axis, index bounds) and return a :class:`ComputedRef`: a lazy tensor
whose ``shape``/``dtype``/``layout`` are known at once and whose :meth:`~ComputedRef.materialize`
builds exactly the tensor ``torch.load`` would give, from the lazily read parts. A kind that
cannot be rebuilt becomes an :class:`UnsupportedRef`; :func:`raise_unsupported` names every one
with its path in the file, so a tensor is never dropped silently.

Example:
    >>> import torch
    >>> from torchgraft.tensors import MemoryRef
    >>> ref = with_metadata(MemoryRef(torch.tensor([1 + 2j])), {"conj": True})
    >>> ref.materialize()
    tensor([1.-2.j])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator
from typing import Any

import torch

from ..errors import CorruptCheckpointError, TorchgraftError, UnsupportedTensorError
from ..tensors import MemoryRef, TensorRef

# --- refs ---------------------------------------------------------------------------------------


class ComputedRef(TensorRef):
    """A tensor rebuilt from other refs by a checked recipe, only when it is needed.

    ``kind`` names the tensor kind (``"quantized per-tensor qint8"``, ``"sparse_csr"``,
    ``"conj view"``); ``parts`` are the refs the recipe reads; ``layout`` is the torch layout of
    the result (``torch.strided`` for dense and quantized tensors).
    """

    has_values = True  # False for kinds with nothing to copy (meta tensors)

    def __init__(self, kind: str, shape: tuple[int, ...], dtype: torch.dtype,
                 build: Callable[[], torch.Tensor], parts: tuple[TensorRef, ...] = (),
                 layout: torch.layout = torch.strided, extra: Hashable = None) -> None:
        self.kind = kind
        self.shape = tuple(shape)
        self.dtype = dtype
        self.layout = layout
        self.parts = parts
        self._build = build
        self._extra = extra

    def alias_key(self) -> Hashable:
        return ("computed", self.kind, tuple(p.alias_key() for p in self.parts), self._extra)

    def materialize(self) -> torch.Tensor:
        try:
            return self._build()
        except TorchgraftError:
            raise
        except Exception as err:  # torch's own validation of the rebuilt tensor
            raise CorruptCheckpointError(
                f"{self.kind} tensor of shape {list(self.shape)}: the file's data is invalid "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); the "
                "file is corrupt or was written by a faulty tool - save it again"
            ) from None

    def read_into(self, out: torch.Tensor) -> None:
        value = self.materialize()
        if value.is_quantized and not out.is_quantized:
            raise UnsupportedTensorError(
                f"a {self.kind} tensor cannot be copied into a non-quantized {out.dtype} tensor "
                "(torch refuses it too); load it into a quantized model, or dequantize the "
                "checkpoint first")
        if value.layout != torch.strided and out.layout == torch.strided:
            value = value.to_dense()
        try:
            out.copy_(value)
        except Exception as err:
            raise UnsupportedTensorError(
                f"cannot copy a {self.kind} tensor of shape {list(self.shape)} into a "
                f"{out.layout} {out.dtype} tensor of shape {list(out.shape)}: {err}") from None

    def __repr__(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return f"ComputedRef({self.kind}, shape={list(self.shape)}, dtype={dt})"


class UnsupportedRef(TensorRef):
    """A tensor of a kind torchgraft cannot rebuild; reading it raises UnsupportedTensorError."""

    def __init__(self, kind: str, reason: str, shape: tuple[int, ...] = (),
                 dtype: torch.dtype = torch.float32) -> None:
        global UNSUPPORTED_MADE
        UNSUPPORTED_MADE += 1
        self.kind, self.reason, self.shape, self.dtype = kind, reason, tuple(shape), dtype
        self.name = "?"

    def message(self) -> str:
        return f"tensor {self.name!r} is a {self.kind}: {self.reason}"

    def materialize(self) -> torch.Tensor:
        raise UnsupportedTensorError(self.message())

    def read_into(self, out: torch.Tensor) -> None:
        raise UnsupportedTensorError(self.message())


# How many UnsupportedRefs were made in this process: a reader compares it before and after
# opening a file, so only files that hold one pay for a walk of their object tree.
UNSUPPORTED_MADE = 0


def find_unsupported(root: Any, path: str = "", depth: int = 0) -> Iterator[UnsupportedRef]:
    """Every :class:`UnsupportedRef` under ``root``, with ``name`` set to its ``/``-path."""
    if isinstance(root, UnsupportedRef):
        root.name = path or "<top>"
        yield root
        return
    if depth > 200:
        return
    if isinstance(root, dict):
        items: Any = root.items()
    elif isinstance(root, (list, tuple)):
        items = enumerate(root)
    else:
        placeholder_state = getattr(root, "_tg", None)
        if not isinstance(placeholder_state, dict):
            return
        items = [("state", placeholder_state.get("state")),
                 ("items", placeholder_state.get("items")),
                 ("args", placeholder_state.get("args"))]
    for key, value in items:
        if isinstance(value, (dict, list, tuple, UnsupportedRef)) or hasattr(value, "_tg"):
            yield from find_unsupported(value, f"{path}/{key}" if path else str(key), depth + 1)


def raise_unsupported(root: Any, file_name: str) -> None:
    """Raise UnsupportedTensorError naming every unsupported tensor under ``root`` (if any)."""
    found = list(find_unsupported(root))
    if found:
        lines = "\n  ".join(ref.message() for ref in found[:10])
        more = f"\n  ... and {len(found) - 10} more" if len(found) > 10 else ""
        raise UnsupportedTensorError(
            f"{file_name}: holds {len(found)} tensor(s) of a kind torchgraft cannot rebuild:\n  "
            f"{lines}{more}\nNothing was loaded. If you trust the file, trust=True uses "
            "torch.load; otherwise re-save those tensors as plain dense tensors.")


# --- checks -------------------------------------------------------------------------------------


def _ref(value: Any, what: str) -> TensorRef:
    if not isinstance(value, TensorRef):
        raise CorruptCheckpointError(f"{what} is not a tensor: {value!r:.80}")
    if isinstance(value, UnsupportedRef):
        raise CorruptCheckpointError(f"{what} is itself an unsupported tensor ({value.kind})")
    return value


def _int(value: Any, what: str, low: int | None = None) -> int:
    if type(value) is not int or (low is not None and value < low):
        raise CorruptCheckpointError(f"bad {what}: {value!r:.80}")
    return value


def _size(value: Any, what: str = "size") -> tuple[int, ...]:
    if not isinstance(value, (tuple, list, torch.Size)) or len(value) > 64 or any(
            type(d) is not int or d < 0 for d in value):
        raise CorruptCheckpointError(f"bad tensor {what}: {value!r:.80}")
    return tuple(value)


def _dtype_in(ref: TensorRef, allowed: tuple[torch.dtype, ...], what: str) -> None:
    if ref.dtype not in allowed:
        raise CorruptCheckpointError(
            f"{what} has dtype {ref.dtype}, expected one of {[str(d) for d in allowed]}")


def _shape_is(ref: TensorRef, shape: tuple[int, ...], what: str) -> None:
    if tuple(ref.shape) != tuple(shape):
        raise CorruptCheckpointError(
            f"{what} has shape {list(ref.shape)}, expected {list(shape)}")


# --- conjugate and negative views ---------------------------------------------------------------

_METADATA_KEYS = {"conj", "neg"}


def with_metadata(ref: TensorRef, metadata: Any) -> TensorRef:
    """``ref`` with torch's tensor metadata bits (``{'conj': True}``, ``{'neg': True}``) applied:
    the file stores the un-conjugated / un-negated values; the result is the resolved ones."""
    if not isinstance(metadata, dict):
        return ref  # not torch's: an inert placeholder at most, listed with the others
    unknown = set(metadata) - _METADATA_KEYS
    if unknown:
        return UnsupportedRef(
            "tensor with metadata torchgraft does not know",
            f"{sorted(map(str, unknown))} (known: conj, neg); the file was written by a newer "
            "torch", ref.shape, ref.dtype)
    if any(type(v) is not bool for v in metadata.values()):
        raise CorruptCheckpointError(f"bad tensor metadata {metadata!r:.80}")
    bits = {k: v for k, v in metadata.items() if v}
    if not bits:
        return ref
    if bits.get("conj") and not ref.dtype.is_complex:
        raise CorruptCheckpointError(f"a conjugate bit on a {ref.dtype} (not complex) tensor")
    if bits.get("neg") and ref.dtype == torch.bool:
        raise CorruptCheckpointError("a negative bit on a bool tensor")
    kind = " ".join(["conj" if bits.get("conj") else "", "neg" if bits.get("neg") else ""]).strip()

    def build() -> torch.Tensor:
        t = ref.materialize()
        if bits.get("conj"):
            t = torch.conj_physical(t)
        if bits.get("neg"):
            t = t._neg_view().resolve_neg()
        return t

    return ComputedRef(f"{kind} view", ref.shape, ref.dtype, build, (ref,), extra=kind)


# --- quantized ----------------------------------------------------------------------------------

_QUANTIZED_REPR = {torch.qint8: torch.int8, torch.quint8: torch.uint8, torch.qint32: torch.int32}


def rebuild_qtensor(storage: Any, storage_offset: Any, size: Any, stride: Any,
                    quantizer_params: Any, requires_grad: Any = False,
                    backward_hooks: Any = None) -> TensorRef:
    """``torch._utils._rebuild_qtensor``: per-tensor or per-channel affine, qint8/quint8/qint32."""
    from .unpickler import StorageRef, _checked_layout

    if not isinstance(storage, StorageRef):
        raise CorruptCheckpointError(f"quantized tensor data is not a storage: {storage!r:.80}")
    qdtype = storage.dtype
    repr_dtype = _QUANTIZED_REPR.get(qdtype)
    if repr_dtype is None:
        return UnsupportedRef(f"quantized {qdtype} tensor",
                              "sub-byte quantized dtypes are not supported", (), torch.uint8)
    _int(storage_offset, "quantized storage offset", 0)
    shape, strides = _checked_layout(size, stride)
    base = storage.make_tensor(storage, repr_dtype, storage_offset, shape, strides)
    if not isinstance(quantizer_params, tuple) or not quantizer_params:
        raise CorruptCheckpointError(f"bad quantizer parameters {quantizer_params!r:.80}")
    qscheme = quantizer_params[0]
    name = str(qdtype).replace("torch.", "")
    if qscheme == torch.per_tensor_affine and len(quantizer_params) == 3:
        return _per_tensor(base, qdtype, name, quantizer_params[1], quantizer_params[2])
    if qscheme in (torch.per_channel_affine, torch.per_channel_affine_float_qparams) and len(
            quantizer_params) == 4:
        return _per_channel(base, qdtype, name, *quantizer_params[1:])
    return UnsupportedRef(f"quantized {name} tensor", f"qscheme {qscheme!r:.60} is not supported",
                          shape, qdtype)


def _per_tensor(base: TensorRef, qdtype: torch.dtype, name: str, scale: Any,
                zero_point: Any) -> ComputedRef:
    if type(scale) not in (float, int) or not math.isfinite(scale):
        raise CorruptCheckpointError(f"bad quantization scale {scale!r:.80}")
    zp = _int(zero_point, "quantization zero point")

    def build() -> torch.Tensor:
        return torch._make_per_tensor_quantized_tensor(base.materialize(), float(scale), zp)

    return ComputedRef(f"quantized per-tensor {name}", base.shape, qdtype, build, (base,),
                       extra=(float(scale), zp))


def _per_channel(base: TensorRef, qdtype: torch.dtype, name: str, scales: Any, zero_points: Any,
                 axis: Any) -> ComputedRef:
    shape = base.shape
    axis = _int(axis, "quantization axis", 0)
    if axis >= len(shape):
        raise CorruptCheckpointError(f"quantization axis {axis} out of range for shape {shape}")
    scales, zero_points = _ref(scales, "quantization scales"), _ref(zero_points, "zero points")
    _shape_is(scales, (shape[axis],), "quantization scales")
    _shape_is(zero_points, (shape[axis],), "quantization zero points")
    _dtype_in(scales, (torch.float64, torch.float32), "quantization scales")
    _dtype_in(zero_points, (torch.int64, torch.float32, torch.float64), "zero points")

    def build() -> torch.Tensor:
        s, z = scales.materialize(), zero_points.materialize()
        if not bool(torch.isfinite(s).all()):
            raise CorruptCheckpointError("quantization scales are not all finite")
        return torch._make_per_channel_quantized_tensor(base.materialize(), s, z, axis)

    return ComputedRef(f"quantized per-channel {name}", shape, qdtype, build,
                       (base, scales, zero_points), extra=axis)


# --- sparse -------------------------------------------------------------------------------------

_COMPRESSED = {torch.sparse_csr: "crow", torch.sparse_csc: "ccol", torch.sparse_bsr: "crow",
               torch.sparse_bsc: "ccol"}
_INDEX_DTYPES = (torch.int32, torch.int64)


def rebuild_sparse_tensor(layout: Any, data: Any) -> TensorRef:
    """``torch._utils._rebuild_sparse_tensor``: COO, CSR, CSC, BSR, BSC, invariants checked."""
    if not isinstance(data, tuple):
        raise CorruptCheckpointError(f"bad sparse tensor data {data!r:.80}")
    if layout == torch.sparse_coo and len(data) in (3, 4):
        return _coo(*data)
    if layout in _COMPRESSED and len(data) == 4:
        return _compressed(layout, *data)
    return UnsupportedRef(f"sparse tensor of layout {layout!r:.40}", "the layout is not supported")


def _coo(indices: Any, values: Any, size: Any, is_coalesced: Any = None) -> ComputedRef:
    indices, values = _ref(indices, "sparse indices"), _ref(values, "sparse values")
    size = _size(size)
    _dtype_in(indices, (torch.int64,), "sparse COO indices")
    if len(indices.shape) != 2 or not values.shape or values.shape[0] != indices.shape[1]:
        raise CorruptCheckpointError(
            f"sparse COO indices {list(indices.shape)} and values {list(values.shape)} disagree")
    sparse_dim = indices.shape[0]
    if sparse_dim + len(values.shape) - 1 != len(size) or tuple(values.shape[1:]) != size[
            sparse_dim:]:
        raise CorruptCheckpointError(
            f"sparse COO size {list(size)} does not fit indices {list(indices.shape)} and "
            f"values {list(values.shape)}")
    if is_coalesced is not None and type(is_coalesced) is not bool:
        raise CorruptCheckpointError(f"bad is_coalesced {is_coalesced!r:.40}")

    def build() -> torch.Tensor:
        return torch.sparse_coo_tensor(indices.materialize(), values.materialize(), size,
                                       check_invariants=True, is_coalesced=is_coalesced)

    return ComputedRef("sparse_coo", size, values.dtype, build, (indices, values),
                       torch.sparse_coo, extra=(size, is_coalesced))


def _compressed(layout: torch.layout, compressed: Any, plain: Any, values: Any,
                size: Any) -> ComputedRef:
    name = str(layout).replace("torch.", "")
    compressed = _ref(compressed, f"{name} compressed indices")
    plain, values = _ref(plain, f"{name} plain indices"), _ref(values, f"{name} values")
    size = _size(size)
    _dtype_in(compressed, _INDEX_DTYPES, f"{name} compressed indices")
    _dtype_in(plain, (compressed.dtype,), f"{name} plain indices")
    if len(size) < 2 or not compressed.shape or not plain.shape or not values.shape:
        raise CorruptCheckpointError(f"{name} tensor of size {list(size)} has bad index shapes")

    def build() -> torch.Tensor:
        return torch.sparse_compressed_tensor(
            compressed.materialize(), plain.materialize(), values.materialize(), size,
            layout=layout, check_invariants=True)

    return ComputedRef(name, size, values.dtype, build, (compressed, plain, values), layout,
                       extra=size)


# --- nested ------------------------------------------------------------------------------------


def rebuild_nested_tensor(buffer: Any, sizes: Any, strides: Any, offsets: Any) -> TensorRef:
    """``torch._utils._rebuild_nested_tensor`` (strided layout): every component's span is
    checked to lie inside the buffer before torch builds the view."""
    buffer = _ref(buffer, "nested buffer")
    sizes, strides = _ref(sizes, "nested sizes"), _ref(strides, "nested strides")
    offsets = _ref(offsets, "nested offsets")
    if len(buffer.shape) != 1 or len(sizes.shape) != 2:
        raise CorruptCheckpointError("nested tensor buffer or sizes have the wrong rank")
    for ref, what in ((sizes, "sizes"), (strides, "strides"), (offsets, "offsets")):
        _dtype_in(ref, (torch.int64,), f"nested {what}")
    _shape_is(strides, sizes.shape, "nested strides")
    _shape_is(offsets, sizes.shape[:1], "nested offsets")

    def build() -> torch.Tensor:
        buf, sz, st, off = (r.materialize() for r in (buffer, sizes, strides, offsets))
        _check_nested_spans(buf.numel(), sz, st, off)
        return torch._nested_view_from_buffer(buf, sz, st, off)

    return ComputedRef("nested (strided)", (sizes.shape[0],), buffer.dtype, build,
                       (buffer, sizes, strides, offsets))


def _check_nested_spans(numel: int, sizes: torch.Tensor, strides: torch.Tensor,
                        offsets: torch.Tensor) -> None:
    """Every component lies inside the buffer (computed in float64: no int64 wrap-around) and
    steps through it (stride >= 1 wherever a dimension has more than one element)."""
    if bool((sizes < 0).any()) or bool((strides < 0).any()) or bool((offsets < 0).any()):
        raise CorruptCheckpointError("nested tensor sizes, strides or offsets are negative")
    if bool(((sizes > 1) & (strides == 0)).any()):
        raise CorruptCheckpointError("nested tensor component with a zero stride")
    sz, st, off = (t.to(torch.float64) for t in (sizes, strides, offsets))
    empty = (sizes == 0).any(dim=1)
    last = off + ((sz - 1).clamp(min=0) * st).sum(dim=1)
    if bool((~empty & (last >= numel)).any()):
        raise CorruptCheckpointError("a nested tensor component lies outside its buffer")


def rebuild_njt(kwargs: Any) -> TensorRef:
    """``torch.nested._internal.nested_tensor._rebuild_njt`` (jagged layout)."""
    if not isinstance(kwargs, dict):
        raise CorruptCheckpointError(f"bad jagged nested tensor {kwargs!r:.80}")
    values, offsets = _ref(kwargs.get("values"), "jagged values"), _ref(
        kwargs.get("offsets"), "jagged offsets")
    lengths = kwargs.get("lengths")
    if lengths is not None:
        return UnsupportedRef("jagged nested tensor with lengths (holes)",
                              "only contiguous jagged tensors are supported", (), values.dtype)
    ragged = _int(kwargs.get("_ragged_idx", 1), "jagged ragged dimension", 1)
    if ragged > len(values.shape) or len(offsets.shape) != 1 or not offsets.shape[0]:
        raise CorruptCheckpointError("jagged nested tensor: offsets or ragged dimension invalid")
    _dtype_in(offsets, (torch.int64, torch.int32), "jagged offsets")
    # the file's cached min/max sequence lengths are hints kernels trust; they are recomputed
    # from the checked offsets instead of taken from the file

    def build() -> torch.Tensor:
        vals, offs = values.materialize(), offsets.materialize()
        if bool((offs[1:] < offs[:-1]).any()) or int(offs[0]) < 0 or int(
                offs[-1]) > vals.shape[ragged - 1]:
            raise CorruptCheckpointError("jagged nested tensor offsets are out of order or bounds")
        lengths = offs[1:] - offs[:-1]
        return torch.nested.nested_tensor_from_jagged(
            vals, offs, jagged_dim=ragged, min_seqlen=int(lengths.min()) if len(lengths) else 0,
            max_seqlen=int(lengths.max()) if len(lengths) else 0)

    return ComputedRef("nested (jagged)", (offsets.shape[0] - 1,), values.dtype, build,
                       (values, offsets), torch.jagged, extra=ragged)


# --- meta, device, wrapper subclasses -----------------------------------------------------------


def rebuild_meta_tensor(dtype: Any, size: Any, stride: Any, requires_grad: Any = False
                        ) -> TensorRef:
    """``torch._utils._rebuild_meta_tensor_no_storage``: a tensor with a shape and no values."""
    from .unpickler import _checked_layout

    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"bad meta tensor dtype {dtype!r:.40}")
    shape, strides = _checked_layout(size, stride)
    return MetaRef(shape, strides, dtype)


class MetaRef(ComputedRef):
    """A meta tensor: ``materialize`` gives it (as ``torch.load`` does); it has no values to
    copy, so :meth:`read_into` raises UnsupportedTensorError."""

    has_values = False

    def __init__(self, shape: tuple[int, ...], stride: tuple[int, ...], dtype: torch.dtype):
        super().__init__("meta", shape, dtype, lambda: torch.empty_strided(
            shape, stride, dtype=dtype, device="meta"), extra=(shape, stride, dtype))

    def read_into(self, out: torch.Tensor) -> None:
        raise UnsupportedTensorError(
            f"the checkpoint stores a meta tensor of shape {list(self.shape)} here: it has a "
            "shape but no values, so there is nothing to load; save the real weights")


def rebuild_device_tensor_from_cpu(data: Any, dtype: Any, device: Any = None,
                                   requires_grad: Any = False) -> TensorRef:
    """``_rebuild_device_tensor_from_cpu_tensor`` (XLA/MAIA/MTIA/privateuse1 tensors): the CPU
    copy the file holds, in ``dtype``; torchgraft reads to CPU like ``map_location='cpu'``."""
    data = _ref(data, "device tensor data")
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"bad device tensor dtype {dtype!r:.40}")
    if dtype == data.dtype:
        return data
    return ComputedRef(f"{data.dtype}->{dtype}", data.shape, dtype,
                       lambda: data.materialize().to(dtype), (data,), extra=dtype)


def rebuild_device_tensor_from_numpy(data: Any, dtype: Any, device: Any = None,
                                     requires_grad: Any = False) -> TensorRef:
    """``_rebuild_device_tensor_from_numpy`` (old XLA files): the numpy array, in ``dtype``."""
    import numpy as np

    if not isinstance(data, np.ndarray) or data.dtype.hasobject or not isinstance(
            dtype, torch.dtype):
        raise CorruptCheckpointError("bad device tensor saved as a numpy array")
    return MemoryRef(torch.from_numpy(np.array(data)).to(dtype))


def rebuild_wrapper_subclass(cls: Any, dtype: Any, size: Any, *rest: Any) -> TensorRef:
    """``_rebuild_wrapper_subclass``: a tensor subclass without data (fake/functional tensors)."""
    name = getattr(cls, "qualname", None) or getattr(cls, "__name__", "?")
    shape = tuple(size) if isinstance(size, (tuple, list, torch.Size)) else ()
    return UnsupportedRef(
        f"tensor subclass {name} without storage",
        "the file holds its shape and dtype and, at most, the subclass's own Python state, which "
        "torchgraft does not run (a fake, functional or distributed tensor was saved); save "
        "plain tensors instead (e.g. DTensor.full_tensor())",
        shape if all(type(d) is int for d in shape) else (),
        dtype if isinstance(dtype, torch.dtype) else torch.float32)


def unsupported_rebuild(qualname: str) -> Callable[..., TensorRef]:
    """A rebuild function for a torch tensor rebuilder torchgraft does not implement."""

    def rebuild(*args: Any, **kwargs: Any) -> TensorRef:
        return UnsupportedRef(f"tensor rebuilt by {qualname}", "torchgraft does not rebuild this "
                              "kind of tensor")

    rebuild.torch_qualname = qualname  # type: ignore[attr-defined]
    return rebuild


def unknown_subclass(func: Any, new_type: Any) -> UnsupportedRef | None:
    """For ``_rebuild_from_type_v2(func, new_type, ...)`` whose ``func`` is a torch rebuilder
    torchgraft does not implement: an UnsupportedRef (a tensor, never dropped). None for any
    other ``func`` (the caller keeps it an inert placeholder)."""
    qualname = getattr(func, "torch_qualname", None) or getattr(func, "qualname", "")
    if not (isinstance(qualname, str) and qualname.startswith("torch.")):
        return None
    cls = getattr(new_type, "qualname", None) or getattr(new_type, "__name__", "?")
    return UnsupportedRef(f"tensor subclass {cls} rebuilt by {qualname}",
                          "torchgraft does not rebuild this kind of tensor")


def tensor_kind_globals() -> dict[str, Any]:
    """The allowlist entries of the rebuilders defined here (and the objects they take)."""
    table: dict[str, Any] = {
        "torch._utils._rebuild_qtensor": rebuild_qtensor,
        "torch._utils._rebuild_sparse_tensor": rebuild_sparse_tensor,
        "torch._utils._rebuild_nested_tensor": rebuild_nested_tensor,
        "torch._utils._rebuild_meta_tensor_no_storage": rebuild_meta_tensor,
        "torch._utils._rebuild_device_tensor_from_cpu_tensor": rebuild_device_tensor_from_cpu,
        "torch._utils._rebuild_device_tensor_from_numpy": rebuild_device_tensor_from_numpy,
        "torch._utils._rebuild_xla_tensor": rebuild_device_tensor_from_numpy,
        "torch._utils._rebuild_wrapper_subclass": rebuild_wrapper_subclass,
        "torch.nested._internal.nested_tensor._rebuild_njt": rebuild_njt,
    }
    for name in ("per_tensor_affine", "per_channel_affine", "per_channel_affine_float_qparams",
                 "per_tensor_symmetric", "per_channel_symmetric"):
        table[f"torch.{name}"] = getattr(torch, name)
    for name in dir(torch._utils):  # any other rebuilder: never dropped, never called
        qualname = f"torch._utils.{name}"
        if name.startswith("_rebuild") and qualname not in table:
            table[qualname] = unsupported_rebuild(qualname)
    return table


# rebuilders whose result a ``_rebuild_from_type_v2`` wrapper (tensor subclasses) passes through
REBUILDERS = {rebuild_qtensor, rebuild_sparse_tensor, rebuild_nested_tensor, rebuild_meta_tensor,
              rebuild_device_tensor_from_cpu, rebuild_wrapper_subclass, rebuild_njt}

LAYOUTS = {str(v): v for v in (torch.strided, torch.sparse_coo, torch.sparse_csr,
                               torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc, torch.jagged)}
