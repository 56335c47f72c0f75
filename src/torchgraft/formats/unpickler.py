"""A restricted unpickler that rebuilds tensors and plain data and never runs the file's code.

Only a fixed allowlist of globals is resolved: torch's tensor-rebuild functions (replaced by our
own, which build lazy :class:`~torchgraft.tensors.TensorRef` objects), dtypes and storage types,
``OrderedDict`` and other plain builtins, and the numpy array/dtype/scalar reconstructors. Every
other global is **never imported and never called**: it becomes a :class:`Placeholder` subclass
that records its qualified name and whatever arguments and state the pickle gave it.

Example:
    >>> import io, pickle, argparse
    >>> data = pickle.dumps({"args": argparse.Namespace(lr=0.1), "epoch": 3})
    >>> obj, names = restricted_loads(data)
    >>> names, obj["epoch"], obj["args"].state
    (['argparse.Namespace'], 3, {'lr': 0.1})
"""

from __future__ import annotations

import collections
import io
import itertools
import pickle
import re
import threading
from collections.abc import Callable
from typing import Any

import torch

from ..errors import CorruptCheckpointError, ResourceLimitError, TorchgraftError
from ..limits import LIMITS
from ..tensors import TensorRef
from .pickle_scan import check_opcodes
from .tensor_kinds import LAYOUTS, tensor_kind_globals, unknown_subclass, with_metadata
from .tensor_kinds import REBUILDERS as KIND_REBUILDERS


def _refuse_build(*args: Any) -> None:
    """``__setstate__`` of every shared object the allowlist hands out: a pickle's BUILD on it
    would change it for the whole process."""
    raise CorruptCheckpointError(
        "pickle tries to set the state of a shared object (BUILD on a type, function or "
        "storage type); the file is corrupt or hostile")


# --- placeholders ----------------------------------------------------------------------------


class Placeholder:
    """An inert stand-in for a global the file referenced; nothing of the original runs.

    ``qualname`` is the global's name, ``args``/``kwargs`` what the pickle passed to construct it,
    ``state`` what it passed to ``__setstate__``, and ``items``/``list_items`` what it stored as a
    mapping or list.
    """

    qualname = "?"
    is_class_placeholder = True

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        self = object.__new__(cls)
        object.__setattr__(self, "_tg", {"args": args, "kwargs": kwargs, "state": None})
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    # pickle's BUILD, SETITEM(S), APPEND(S) land here
    def __setstate__(self, state: Any) -> None:
        self._tg["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self._tg.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:
        self._tg.setdefault("list", []).append(value)

    def extend(self, values: Any) -> None:
        self._tg.setdefault("list", []).extend(values)

    def __call__(self, *args: Any, **kwargs: Any) -> Placeholder:
        name = self.qualname if self.qualname.endswith("(...)") else f"{self.qualname}(...)"
        return make_placeholder(name)(*args, **kwargs)

    @property
    def args(self) -> tuple:
        return self._tg["args"]

    @property
    def state(self) -> Any:
        return self._tg["state"]

    @property
    def items(self) -> dict:
        return self._tg.get("items", {})

    @property
    def list_items(self) -> list:
        return self._tg.get("list", [])

    def __repr__(self) -> str:
        """``<not executed: argparse.Namespace(num_classes=10, lr=0.1)>``: the recorded
        arguments and state, bounded (never the file's own ``__repr__``)."""
        tg = object.__getattribute__(self, "_tg")
        state, parts = tg.get("state"), [brief(a, 1) for a in tg.get("args", ())[:8]]
        if isinstance(state, dict) and all(isinstance(k, str) for k in
                                           itertools.islice(state, 64)):
            parts += [f"{k}={brief(v, 1)}" for k, v in itertools.islice(state.items(), 12)]
            if len(state) > 12:
                parts.append("...")
        elif state is not None:
            parts.append(f"state={brief(state, 1)}")
        text = f"{self.qualname}({', '.join(parts)})" if parts else self.qualname
        return f"<not executed: {text if len(text) <= 300 else text[:297] + '...'}>"


class _LoadContext:
    """What one :func:`restricted_loads` call owns: its placeholder classes and names, and its
    layout-validation cache. Nothing learnt from one file is trusted in another."""

    __slots__ = ("classes", "placeholders", "named", "checked", "overrides")

    def __init__(self) -> None:
        self.classes: dict[str, type[Placeholder]] = {}
        self.placeholders: list[str] = []  # globals the report lists, in first-seen order
        self.named: set[str] = set()
        self.checked: dict[tuple, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        # allowlist entries that are made per load (they close over the per-load cache)
        self.overrides = {"torch._utils._rebuild_tensor_v2": _make_rebuild_tensor_v2(self.checked)}

    def note(self, qualname: str) -> None:
        if qualname not in self.named:
            self.named.add(qualname)
            self.placeholders.append(qualname)


_CURRENT = threading.local()  # .ctx: the _LoadContext of the load running in this thread
_SHARED_TYPES: dict[str, type[Placeholder]] = {}  # outside any load (bounded)


def _new_placeholder_type(qualname: str) -> type[Placeholder]:
    name = "Placeholder_" + "".join(c if c.isalnum() else "_" for c in qualname[:80])
    return type(name, (Placeholder,), {"qualname": qualname, "__module__": __name__})


def make_placeholder(qualname: str) -> type[Placeholder]:
    """The inert class standing for ``qualname``: one per name within a load, never kept
    across loads (outside a load, from a small bounded cache)."""
    ctx = getattr(_CURRENT, "ctx", None)
    table = ctx.classes if ctx is not None else _SHARED_TYPES
    cls = table.get(qualname)
    if cls is None:
        if ctx is None and len(table) >= 256:
            table.clear()
        cls = table[qualname] = _new_placeholder_type(qualname)
    return cls


def _reported_placeholder(qualname: str) -> type[Placeholder]:
    """A placeholder class a rebuild helper falls back to; listed in the report."""
    ctx = getattr(_CURRENT, "ctx", None)
    if ctx is not None:
        ctx.note(qualname)
    return make_placeholder(qualname)


# --- storages and tensors --------------------------------------------------------------------


class StorageType:
    """What ``torch.FloatStorage`` & co. resolve to: just a dtype (shared, so immutable)."""

    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype) -> None:
        object.__setattr__(self, "dtype", dtype)

    def __setattr__(self, name: str, value: Any) -> None:
        _refuse_build()

    __setstate__ = _refuse_build

    def __repr__(self) -> str:
        return f"StorageType({self.dtype})"


class StorageRef:
    """A storage the pickle refers to by persistent id; ``make_tensor`` builds views of it."""

    __slots__ = ("dtype", "numel", "make_tensor")

    def __init__(self, dtype: torch.dtype, numel: int, make_tensor: Callable[..., TensorRef]):
        self.dtype = dtype
        self.numel = numel
        self.make_tensor = make_tensor

    __setstate__ = _refuse_build  # BUILD must not move a storage's offset or size


def brief(value: Any, depth: int = 0) -> str:
    """A short repr for error messages: at most 4 items a level, 2 levels, 60 characters a leaf.
    ``repr()`` of a pickled value can take exponential time (a list holding the same list twice,
    45 levels deep, is 2**45 items long as text)."""
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        if depth >= 2:
            return "..."
        if isinstance(value, dict):
            parts = [f"{brief(k, depth + 1)}: {brief(v, depth + 1)}"
                     for k, v in itertools.islice(value.items(), 4)]
        else:
            parts = [brief(v, depth + 1) for v in itertools.islice(value, 4)]
        more = ", ..." if len(value) > 4 else ""
        return f"{type(value).__name__}[{', '.join(parts)}{more}]"
    if type(value) is int and value.bit_length() > 64:
        return f"<int of {value.bit_length()} bits>"
    if isinstance(value, (str, bytes, int, float, complex, bool, type(None), torch.dtype)):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    if isinstance(value, Placeholder):
        return f"<not executed: {value.qualname}>"[:80] if depth else repr(value)[:80]
    if isinstance(value, StorageType) or isinstance(value, type):
        return repr(value)[:80]
    return f"<{type(value).__name__}>"


_INT_ONLY = {int}


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    """``value`` as a tuple of non-negative ints, or a CorruptCheckpointError. A ``torch.Size``
    gets exactly the same checks as a tuple."""
    kind = type(value)
    if (kind is tuple or kind is list or kind is torch.Size) and (
            not value or (set(map(type, value)) <= _INT_ONLY and min(value) >= 0)):
        return value if kind is tuple else tuple(value)
    raise CorruptCheckpointError(f"bad tensor {what}: {brief(value)}")


def _checked_layout(size: Any, stride: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The validated ``(shape, stride)`` pair of plain int tuples. Valid pairs are remembered
    for the rest of the current load only (keyed by the canonical pair)."""
    ctx = getattr(_CURRENT, "ctx", None)
    checked = ctx.checked if ctx is not None else {}
    try:
        sum(size), sum(stride)  # flat numbers only: hashing nested tuples can take 2**depth
        pair = checked.get((size, stride))
    except TypeError:  # nested, lists, or unhashable junk: validated below
        pair = None
    if pair is None:
        shape = _as_int_tuple(size, "shape")
        strides = _as_int_tuple(stride, "stride")
        if len(shape) != len(strides):
            raise CorruptCheckpointError(f"shape {shape} and stride {strides} differ in length")
        pair = (shape, strides)
        if len(checked) < 4096:
            checked[pair] = pair
    return pair


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any,
                    dtype: torch.dtype | None = None) -> TensorRef:
    if type(storage_offset) is not int or storage_offset < 0:
        raise CorruptCheckpointError(f"bad storage offset {brief(storage_offset)}")
    pair = _checked_layout(size, stride)
    if not isinstance(storage, StorageRef):
        raise CorruptCheckpointError(f"tensor data is not a storage: {brief(storage)}")
    dt = storage.dtype if dtype is None or not isinstance(dtype, torch.dtype) else dtype
    return storage.make_tensor(storage, dt, storage_offset, pair[0], pair[1])


def _make_rebuild_tensor_v2(checked: dict) -> Callable[..., TensorRef]:
    """``torch._utils._rebuild_tensor_v2`` for one load: what modern torch files call once per
    tensor, so a layout this file already had validated skips validation."""

    def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                           backward_hooks=None, metadata=None):
        try:
            sum(size), sum(stride)  # flat numbers only: hashing nested tuples can take 2**depth
            pair = checked.get((size, stride))
        except TypeError:
            pair = None
        if pair is None or type(storage_offset) is not int or storage_offset < 0 or not \
                isinstance(storage, StorageRef):
            ref = _rebuild_tensor(storage, storage_offset, size, stride)
        else:
            ref = storage.make_tensor(storage, storage.dtype, storage_offset, pair[0], pair[1])
        if metadata:  # conj/neg bits (tensor_kinds)
            return with_metadata(ref, metadata)
        return ref

    _rebuild_tensor_v2.__setstate__ = _refuse_build  # type: ignore[attr-defined]
    return _rebuild_tensor_v2


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    ref = _rebuild_tensor(storage, storage_offset, size, stride)
    if metadata:  # conj/neg bits (tensor_kinds)
        return with_metadata(ref, metadata)
    return ref


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"bad tensor dtype {brief(dtype)}")
    ref = _rebuild_tensor(storage, storage_offset, size, stride, dtype)
    return with_metadata(ref, metadata) if metadata else ref


def _rebuild_legacy(storage, storage_offset, size, stride):
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    ctx = getattr(_CURRENT, "ctx", None)
    # callable() first: hashing a pickled (nested, shared) tuple can take 2**depth steps
    if isinstance(args, tuple) and callable(func) and (func in _REBUILDERS or func in KIND_REBUILDERS or (
            ctx is not None and func is ctx.overrides["torch._utils._rebuild_tensor_v2"])):
        return func(*args)
    unsupported = unknown_subclass(func, new_type)  # a torch rebuilder torchgraft lacks
    if unsupported is not None:
        return unsupported
    return _reported_placeholder("torch._tensor._rebuild_from_type_v2")(func, new_type, args,
                                                                        state)


_REBUILDERS = {_rebuild_tensor_v2, _rebuild_tensor_v3, _rebuild_legacy, _rebuild_parameter}


def _torch_globals() -> dict[str, Any]:
    allowed: dict[str, Any] = {
        **tensor_kind_globals(),  # quantized, sparse, nested, meta, ... (tensor_kinds)
        "torch._utils._rebuild_tensor": _rebuild_legacy,
        "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
        "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
        "torch._utils._rebuild_parameter": _rebuild_parameter,
        "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
        "torch.Size": torch.Size,
        "torch.serialization._get_layout": _get_layout,
        "torch.device": _device,
        "torch.storage.UntypedStorage": StorageType(torch.uint8),
    }
    for dtype in _all_dtypes():
        allowed[str(dtype)] = dtype  # "torch.float32"
    for dtype, storage_name in torch.storage._dtype_to_storage_type_map().items():
        allowed[f"torch.{storage_name}"] = StorageType(dtype)
    return allowed


def _all_dtypes() -> list[torch.dtype]:
    return [v for v in vars(torch).values() if isinstance(v, torch.dtype)]


def _get_layout(name: Any) -> Any:
    if type(name) is str and name in LAYOUTS:  # str only: hashing a pickled tuple can take 2**depth
        return LAYOUTS[name]
    return _reported_placeholder(f"torch.serialization._get_layout({brief(name)})")()


def _device(*args: Any) -> Any:
    if len(args) >= 1 and isinstance(args[0], str) and len(args[0]) < 32:
        try:
            return torch.device(*args)
        except Exception:
            pass
    return _reported_placeholder("torch.device")(*args)


# --- numpy ------------------------------------------------------------------------------------


class _NdarrayType:
    """What ``numpy.ndarray`` resolves to: a marker, not callable (no unchecked allocation)."""

    __slots__ = ()
    __setstate__ = _refuse_build


_NDARRAY = _NdarrayType()

# numpy dtype strings a pickle may name: kind letter and an item size, nothing else
_NP_SPEC = re.compile(r"[?bBhHiIlLqQefdgFDGSUVOMm][0-9]{0,4}")
_NP_ORDERS = ("<", ">", "|", "=")
_NP_UNITS = {"Y", "M", "W", "D", "h", "m", "s", "ms", "us", "ns", "ps", "fs", "as", "generic"}


class NumpyDtype:
    """What ``numpy.dtype(...)`` gives inside a pickle: an inert, validated description.

    BUILD hands numpy's dtype state to :meth:`__setstate__`, which only records it after checking
    that it is plain (byte order, sizes, and for records: named fields of plain dtypes whose
    offsets lie inside the item). A real ``numpy.dtype`` is only ever made by :meth:`build` from
    those checked values, so no pickle can give numpy a dtype with object fields it does not
    declare, or fields outside the item.
    """

    __slots__ = ("spec", "order", "itemsize", "fields", "unit", "built", "has_state")

    def __init__(self, spec: str) -> None:
        self.spec, self.order, self.itemsize, self.fields, self.unit = spec, "=", -1, None, None
        self.built: Any = None
        self.has_state = False

    def __setstate__(self, state: Any) -> None:
        if self.has_state or self.built is not None:  # numpy's own pickles BUILD once, first
            raise CorruptCheckpointError("numpy dtype state set twice or after use")
        self.has_state = True
        if type(state) is not tuple or len(state) not in (8, 9) or state[0] not in (3, 4):
            raise CorruptCheckpointError(f"bad numpy dtype state {brief(state)}")
        order, subarray, names, fields, itemsize = state[1], state[2], state[3], state[4], state[5]
        if order not in _NP_ORDERS or subarray is not None or type(itemsize) is not int:
            raise CorruptCheckpointError(f"unsupported numpy dtype state {brief(state)}")
        if (names is None) != (fields is None):
            raise CorruptCheckpointError("bad numpy dtype state: names without fields")
        self.order, self.itemsize = order, itemsize
        if names is not None:
            self.fields = _np_fields(names, fields, itemsize)
        if len(state) == 9 and self.spec[0] in "Mm":
            self.unit = _np_unit(state[8])

    def build(self) -> Any:
        """The real ``numpy.dtype``, made once from the checked values (numpy may hand out its
        shared descriptor for plain types: nothing from the file ever reaches it)."""
        if self.built is None:
            self.built = self._build()
        return self.built

    def _build(self) -> Any:
        import numpy as np

        try:
            if self.fields is not None:
                names = [n for n, _, _ in self.fields]
                return np.dtype({"names": names, "formats": [d.build() for _, d, _ in self.fields],
                                 "offsets": [o for _, _, o in self.fields],
                                 "itemsize": self.itemsize})
            spec = self.spec if self.unit is None else f"{self.spec[0]}8[{self.unit}]"
            dt = np.dtype(spec)
            if self.itemsize not in (-1, dt.itemsize) or (dt.kind == "O" and self.itemsize != -1):
                raise CorruptCheckpointError(
                    f"numpy dtype {self.spec!r} says its items have {self.itemsize} bytes")
            if self.order in "<>" and dt.kind in "biufcmMU":
                dt = dt.newbyteorder(self.order)
            return dt
        except (TypeError, ValueError) as err:
            raise CorruptCheckpointError(f"bad numpy dtype {self.spec!r}: {err}") from None

    def __repr__(self) -> str:
        return f"dtype({self.spec!r})"


def _np_fields(names: Any, fields: Any, itemsize: int) -> list[tuple[str, NumpyDtype, int]]:
    """Checked record fields: (name, plain dtype, offset) with every field inside the item."""
    if type(names) is not tuple or type(fields) is not dict or len(names) != len(fields) or \
            itemsize < 0:
        raise CorruptCheckpointError("bad numpy record dtype")
    out = []
    for name in names:
        spec = fields.get(name) if type(name) is str else None
        if type(spec) is not tuple or len(spec) not in (2, 3) or not isinstance(
                spec[0], NumpyDtype) or type(spec[1]) is not int:
            raise CorruptCheckpointError(f"bad numpy record field {brief(name)}")
        sub, offset = spec[0], spec[1]
        size = sub.build().itemsize
        if sub.built.hasobject or offset < 0 or offset + size > itemsize:
            raise CorruptCheckpointError(
                f"numpy record field {brief(name)} (offset {offset}, {size} bytes) holds objects "
                f"or lies outside its {itemsize}-byte item")
        out.append((name, sub, offset))
    return out


def _np_unit(meta: Any) -> str:
    inner = meta[1] if type(meta) is tuple and len(meta) == 2 else meta
    if type(inner) is tuple and len(inner) == 4 and isinstance(inner[0], bytes) and \
            inner[0].decode("latin-1") in _NP_UNITS and type(inner[1]) is int and \
            0 < inner[1] < 1_000_000:
        unit = inner[0].decode("latin-1")
        return unit if inner[1] == 1 else f"{inner[1]}{unit}"
    raise CorruptCheckpointError(f"bad numpy datetime unit {brief(meta)}")


def _np_dtype(spec: Any, align: Any = False, copy: Any = False) -> NumpyDtype:
    if type(spec) is not str or not _NP_SPEC.fullmatch(spec):
        raise CorruptCheckpointError(f"bad numpy dtype {brief(spec)}")
    return NumpyDtype(spec)


def _real_dtype(dt: Any, what: str) -> Any:
    if not isinstance(dt, NumpyDtype):
        raise CorruptCheckpointError(f"bad numpy {what} dtype {brief(dt)}")
    return dt.build()


def _np_array_type() -> type:
    import numpy as np

    class ndarray(np.ndarray):  # noqa: N801 - shows as the numpy array it is
        """A numpy array rebuilt from a pickle: its BUILD state is validated first."""

        __slots__ = ()

        def __setstate__(self, state: Any) -> None:
            np.ndarray.__setstate__(self, _np_array_state(state))

        def __reduce__(self) -> Any:  # pickles (and copies) as a plain ndarray
            return np.asarray(self).copy().__reduce__()

    return ndarray


def _np_array_state(state: Any) -> tuple:
    """numpy's ``(version, shape, dtype, fortran, data)`` array state, checked."""
    if type(state) is not tuple or len(state) != 5 or state[0] != 1:
        raise CorruptCheckpointError(f"bad numpy array state {brief(state)}")
    _, shape, dt, fortran, data = state
    shape = _as_int_tuple(shape, "numpy shape")
    dtype = _real_dtype(dt, "array")
    numel = 1
    for dim in shape:
        numel *= dim
    if dtype.hasobject:
        ok = type(data) is list and len(data) == numel
    else:
        ok = isinstance(data, (bytes, bytearray)) and len(data) == numel * dtype.itemsize
    if not ok:
        raise CorruptCheckpointError(
            f"numpy array of shape {list(shape)} and dtype {dtype} has data of the wrong size")
    return (1, shape, dtype, bool(fortran), data)


def _numpy_globals() -> dict[str, Any]:
    import numpy as np

    array_type = _np_array_type()

    def reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
        if subtype is not _NDARRAY:
            return _reported_placeholder("numpy.core.multiarray._reconstruct")(subtype, shape,
                                                                               dtype)
        return np.ndarray.__new__(array_type, (0,), dtype="b")

    def scalar(dt: Any, data: Any = None) -> Any:
        dtype = _real_dtype(dt, "scalar")
        if dtype.hasobject:
            return data
        if not isinstance(data, bytes) or len(data) != dtype.itemsize:
            raise CorruptCheckpointError("bad numpy scalar data")
        return np.frombuffer(data, dtype=dtype)[0]

    def frombuffer(buf: Any, dt: Any, shape: Any, order: Any) -> Any:
        dtype = _real_dtype(dt, "buffer")
        if dtype.hasobject or not isinstance(buf, (bytes, bytearray)):
            raise CorruptCheckpointError("bad numpy buffer")
        shape = _as_int_tuple(shape, "numpy shape")
        arr = np.frombuffer(bytes(buf), dtype=dtype)
        try:
            return arr.reshape(shape, order="F" if order == "F" else "C")
        except ValueError as err:
            raise CorruptCheckpointError(f"bad numpy buffer: {err}") from None

    allowed: dict[str, Any] = {"numpy.ndarray": _NDARRAY, "numpy.dtype": _np_dtype}
    for core in ("numpy.core", "numpy._core"):
        allowed[f"{core}.multiarray._reconstruct"] = reconstruct
        allowed[f"{core}.multiarray.scalar"] = scalar
        allowed[f"{core}.numeric._frombuffer"] = frombuffer
    return allowed


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
        raise CorruptCheckpointError("bad bytes encoding in pickle")
    return text.encode(encoding)


def _bytearray(data: Any = b"", *args: Any) -> bytearray:
    if isinstance(data, str):
        return bytearray(data.encode("latin-1"))
    if not isinstance(data, (bytes, bytearray)):
        raise CorruptCheckpointError("bad bytearray in pickle")
    return bytearray(data)


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    """``copyreg._reconstructor``: instantiate our inert class, never the real one."""
    if isinstance(cls, type) and issubclass(cls, Placeholder):
        return cls()
    if cls in (collections.OrderedDict, dict, list, set):
        return cls()
    return _reported_placeholder("copyreg._reconstructor")(cls, base, state)


_BASE_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "collections.defaultdict": make_placeholder("collections.defaultdict"),
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.bytearray": _bytearray,
    "builtins.complex": complex,
    "builtins.slice": slice,
    "__builtin__.set": set,
    "__builtin__.frozenset": frozenset,  # protocol-2 pickles name builtins __builtin__.*
    "__builtin__.bytearray": _bytearray,
    "__builtin__.complex": complex,
    "__builtin__.slice": slice,
    "_codecs.encode": _codecs_encode,
    "copyreg._reconstructor": _reconstructor,
    "copy_reg._reconstructor": _reconstructor,
}

_ALLOWED: dict[str, Any] | None = None


def allowed_globals() -> dict[str, Any]:
    """The allowlist: qualified name → the safe object it resolves to."""
    global _ALLOWED
    if _ALLOWED is None:
        table = dict(_BASE_GLOBALS)
        table.update(_torch_globals())
        table.update(_numpy_globals())
        for value in table.values():
            if type(value) is type(_refuse_build):  # plain functions take attributes: lock them
                value.__setstate__ = _refuse_build
        _ALLOWED = table
    return _ALLOWED


def _no_external_data(pid: Any) -> Any:
    raise CorruptCheckpointError("pickle refers to external data (persistent id)")


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` never imports: allowlist or placeholder.

    Use it through :func:`restricted_loads`, which first checks the opcodes (memo indices,
    extension opcodes) and gives the load its own placeholder classes and caches.
    """

    def __init__(self, file: io.BufferedIOBase, persistent_load: Callable[[Any], Any] | None = None,
                 context: _LoadContext | None = None):
        super().__init__(file, encoding="utf-8")
        self._ctx = context or _LoadContext()
        self.placeholders = self._ctx.placeholders
        # stored in the C unpickler's own slot (no Python method in between)
        self.persistent_load = persistent_load or _no_external_data

    def find_class(self, module: str, name: str) -> Any:
        qualname = f"{module}.{name}"
        ctx = self._ctx
        found = ctx.overrides.get(qualname)
        if found is not None:
            return found
        table = allowed_globals()
        if qualname in table:
            return table[qualname]
        ctx.note(qualname)
        cls = ctx.classes.get(qualname)
        if cls is None:
            cls = ctx.classes[qualname] = _new_placeholder_type(qualname)
        return cls


def restricted_loads(
    data: bytes | io.BufferedIOBase,
    persistent_load: Callable[[Any], Any] | None = None,
    what: str = "pickle",
) -> tuple[Any, list[str]]:
    """Unpickle ``data`` safely; returns the object and the placeholder global names.

    ``data`` is the pickle's bytes or a stream positioned at it (left just after it).
    """
    ctx = _LoadContext()
    previous = getattr(_CURRENT, "ctx", None)
    _CURRENT.ctx = ctx
    try:
        stream, after = _checked_stream(data)
        obj = RestrictedUnpickler(stream, persistent_load, ctx).load()
        if after is not None:
            after(stream.tell())
    except TorchgraftError as err:
        try:
            prefixed = type(err)(f"{what}: {err}")
        except TypeError:
            prefixed = CorruptCheckpointError(f"{what}: {err}")
        raise prefixed from None
    except RecursionError:
        raise ResourceLimitError(f"{what}: pickle nests too deeply") from None
    except (Exception, MemoryError) as err:
        raise CorruptCheckpointError(
            f"{what}: cannot unpickle ({type(err).__name__}: {err}); the file is truncated, "
            "corrupt or not a pickle"
        ) from None
    finally:
        _CURRENT.ctx = previous
    return obj, ctx.placeholders


def _checked_stream(data: Any) -> tuple[io.BytesIO, Callable[[int], Any] | None]:
    """A stream over the pickle in ``data`` after :func:`check_opcodes` passed on it, and what to
    call with that stream's final position (to leave an outer stream just after the pickle)."""
    if isinstance(data, (bytes, bytearray)):
        LIMITS.check("max_pickle_bytes", len(data), "pickle size")
        check_opcodes(data)
        return io.BytesIO(data), None
    start = data.tell() if _seekable(data) else None
    buf = _read_pickle(data)
    if start is None:
        return io.BytesIO(buf), None
    return io.BytesIO(buf), lambda used: data.seek(start + used)


def _read_pickle(stream: Any) -> bytearray:
    """The bytes of the pickle at ``stream``'s position, up to its STOP opcode (read in growing
    chunks and scanned again each time: at most twice the pickle's length in all)."""
    buf = bytearray()
    chunk = 1 << 20
    while True:
        more = stream.read(chunk)
        buf += more
        stop = check_opcodes(buf, 0, complete=not more)
        if stop < len(buf) or not more:
            return buf[:stop + 1] if stop < len(buf) else buf
        LIMITS.check("max_pickle_bytes", len(buf), "pickle size")
        chunk = min(chunk * 2, 1 << 30)


def _seekable(stream: Any) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False


# --- whole pickled modules ------------------------------------------------------------------


class ModuleStateDict(dict):
    """The state dict of a pickled ``nn.Module``; ``buffers`` names its buffers (the rest are
    parameters), so ``inspect`` can count them apart."""

    buffers: set[str]

    def __init__(self) -> None:
        super().__init__()
        self.buffers = set()


def module_state(obj: Any) -> dict | None:
    """If ``obj`` is a placeholder for a pickled ``nn.Module``, the state dict it would produce.

    Each module object is visited once: a submodule registered under several names (or inside
    itself) gives its tensors under the first name only, as ``named_parameters()`` does; the
    depth and the number of modules are bounded by :data:`~torchgraft.limits.LIMITS`.
    """
    if not isinstance(obj, Placeholder):
        return None
    state = obj.state
    if not isinstance(state, dict) or "_parameters" not in state or "_modules" not in state:
        return None
    out = ModuleStateDict()
    seen: set[int] = set()
    stack: list[tuple[dict, str, int]] = [(state, "", 0)]
    while stack:
        state, prefix, depth = stack.pop()
        if id(state) in seen:
            continue
        seen.add(id(state))
        LIMITS.check("max_nodes", len(seen) + len(out), "modules and tensors in a pickled module")
        LIMITS.check("max_depth", depth, "nesting of a pickled module's submodules")
        _collect_tensors(state, prefix, out)
        children = [(child.state, f"{prefix}{name}.", depth + 1)
                    for name, child in _mapping_items(state.get("_modules") or {})
                    if isinstance(child, Placeholder) and isinstance(child.state, dict)]
        stack.extend(reversed(children))
    return out


def _collect_tensors(state: dict, prefix: str, out: dict[str, Any]) -> None:
    """One module's own parameters and persistent buffers, named under ``prefix``."""
    skip = state.get("_non_persistent_buffers_set") or ()
    if not isinstance(skip, (set, frozenset, list, tuple, dict)):
        skip = ()
    for name, value in _mapping_items(state.get("_parameters") or {}):
        if isinstance(value, TensorRef):
            out[prefix + str(name)] = value
    for name, value in _mapping_items(state.get("_buffers") or {}):
        if isinstance(value, TensorRef) and _not_in(name, skip):
            out[prefix + str(name)] = value
            if isinstance(out, ModuleStateDict):
                out.buffers.add(prefix + str(name))


def _not_in(name: Any, collection: Any) -> bool:
    try:
        return name not in collection
    except TypeError:  # unhashable name
        return True


def _mapping_items(value: Any) -> list[tuple[Any, Any]]:
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, Placeholder):
        return list(value.items.items())
    return []
