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
import pickle
from collections.abc import Callable
from typing import Any

import torch

from ..errors import CorruptCheckpointError
from ..tensors import TensorRef
from .tensor_kinds import LAYOUTS, tensor_kind_globals, unknown_subclass, with_metadata
from .tensor_kinds import REBUILDERS as KIND_REBUILDERS

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
        return make_placeholder(f"{self.qualname}(...)")(*args, **kwargs)

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
        return f"<not executed: {self.qualname}>"


_PLACEHOLDER_TYPES: dict[str, type[Placeholder]] = {}


def make_placeholder(qualname: str) -> type[Placeholder]:
    """The (cached) inert class standing for ``qualname``."""
    cls = _PLACEHOLDER_TYPES.get(qualname)
    if cls is None:
        name = "Placeholder_" + "".join(c if c.isalnum() else "_" for c in qualname)[:80]
        cls = type(name, (Placeholder,), {"qualname": qualname, "__module__": __name__})
        _PLACEHOLDER_TYPES[qualname] = cls
    return cls


# --- storages and tensors --------------------------------------------------------------------


class StorageType:
    """What ``torch.FloatStorage`` & co. resolve to: just a dtype."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class StorageRef:
    """A storage the pickle refers to by persistent id; ``make_tensor`` builds views of it."""

    __slots__ = ("dtype", "numel", "make_tensor")

    def __init__(self, dtype: torch.dtype, numel: int, make_tensor: Callable[..., TensorRef]):
        self.dtype = dtype
        self.numel = numel
        self.make_tensor = make_tensor


_INT_ONLY = {int}


def _as_int_tuple(value: Any, what: str) -> tuple[int, ...]:
    """``value`` as a tuple of non-negative ints, or a CorruptCheckpointError."""
    kind = type(value)
    if (kind is tuple or kind is list) and (
            not value or (set(map(type, value)) <= _INT_ONLY and min(value) >= 0)):
        return value if kind is tuple else tuple(value)
    if kind is torch.Size:
        return tuple(value)
    raise CorruptCheckpointError(f"bad tensor {what}: {value!r:.80}")


# (size, stride) pairs already validated -> the canonical pair of int tuples. A hit may return
# ints for equal bools/floats/numpy ints, which denote the same layout.
_CHECKED: dict[tuple, tuple[tuple[int, ...], tuple[int, ...]]] = {}


def _checked_layout(size: Any, stride: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    try:
        pair = _CHECKED.get((size, stride))
    except TypeError:  # lists, or unhashable junk: validated below
        pair = None
    if pair is None:
        shape = _as_int_tuple(size, "shape")
        strides = _as_int_tuple(stride, "stride")
        if len(shape) != len(strides):
            raise CorruptCheckpointError(f"shape {shape} and stride {strides} differ in length")
        pair = (shape, strides)
        if len(_CHECKED) >= 4096:
            _CHECKED.clear()
        _CHECKED[pair] = pair
    return pair


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any,
                    dtype: torch.dtype | None = None) -> TensorRef:
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise CorruptCheckpointError(f"bad storage offset {storage_offset!r}")
    pair = _checked_layout(size, stride)
    if not isinstance(storage, StorageRef):
        raise CorruptCheckpointError(f"tensor data is not a storage: {storage!r}")
    dt = storage.dtype if dtype is None or not isinstance(dtype, torch.dtype) else dtype
    return storage.make_tensor(storage, dt, storage_offset, pair[0], pair[1])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    # what modern torch files call once per tensor: a layout seen before skips validation
    try:
        pair = _CHECKED.get((size, stride))
    except TypeError:
        pair = None
    if pair is None or type(storage_offset) is not int or storage_offset < 0 or not isinstance(
            storage, StorageRef):
        ref = _rebuild_tensor(storage, storage_offset, size, stride)
    else:
        ref = storage.make_tensor(storage, storage.dtype, storage_offset, pair[0], pair[1])
    if metadata:  # conj/neg bits (tensor_kinds)
        return with_metadata(ref, metadata)
    return ref


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    if not isinstance(dtype, torch.dtype):
        raise CorruptCheckpointError(f"bad tensor dtype {dtype!r}")
    ref = _rebuild_tensor(storage, storage_offset, size, stride, dtype)
    return with_metadata(ref, metadata) if metadata else ref


def _rebuild_legacy(storage, storage_offset, size, stride):
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if (func in _REBUILDERS or func in KIND_REBUILDERS) and isinstance(args, tuple):
        return func(*args)
    unsupported = unknown_subclass(func, new_type)  # a torch rebuilder torchgraft lacks
    if unsupported is not None:
        return unsupported
    return make_placeholder("torch._tensor._rebuild_from_type_v2")(func, new_type, args, state)


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
    if name in LAYOUTS:
        return LAYOUTS[name]
    return make_placeholder(f"torch.serialization._get_layout({name!r})")()


def _device(*args: Any) -> Any:
    if len(args) >= 1 and isinstance(args[0], str) and len(args[0]) < 32:
        try:
            return torch.device(*args)
        except Exception:
            pass
    return make_placeholder("torch.device")(*args)


# --- numpy ------------------------------------------------------------------------------------


class _NdarrayType:
    """What ``numpy.ndarray`` resolves to: a marker, not callable (no unchecked allocation)."""


_NDARRAY = _NdarrayType()


def _numpy_globals() -> dict[str, Any]:
    import numpy as np

    def reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
        if subtype is not _NDARRAY:
            return make_placeholder("numpy.core.multiarray._reconstruct")(subtype, shape, dtype)
        return np.ndarray.__new__(np.ndarray, (0,), dtype="b")

    def dtype(spec: Any, align: Any = False, copy: Any = False) -> Any:
        if not isinstance(spec, str) or len(spec) > 16:
            raise CorruptCheckpointError(f"bad numpy dtype {spec!r}")
        return np.dtype(spec, bool(align), bool(copy))

    def scalar(dt: Any, data: Any = None) -> Any:
        if not isinstance(dt, np.dtype):
            raise CorruptCheckpointError(f"bad numpy scalar dtype {dt!r}")
        if dt.hasobject:
            return data
        if not isinstance(data, bytes) or len(data) != dt.itemsize:
            raise CorruptCheckpointError("bad numpy scalar data")
        return np.frombuffer(data, dtype=dt)[0]

    def frombuffer(buf: Any, dt: Any, shape: Any, order: Any) -> Any:
        if not isinstance(dt, np.dtype) or dt.hasobject or not isinstance(buf, (bytes, bytearray)):
            raise CorruptCheckpointError("bad numpy buffer")
        arr = np.frombuffer(bytes(buf), dtype=dt)
        shape = _as_int_tuple(shape, "numpy shape")
        return arr.reshape(shape, order="F" if order == "F" else "C")

    allowed: dict[str, Any] = {"numpy.ndarray": _NDARRAY, "numpy.dtype": dtype}
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
    return make_placeholder("copyreg._reconstructor")(cls, base, state)


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
        _ALLOWED = table
    return _ALLOWED


def _no_external_data(pid: Any) -> Any:
    raise CorruptCheckpointError("pickle refers to external data (persistent id)")


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` never imports: allowlist or placeholder."""

    def __init__(self, file: io.BufferedIOBase, persistent_load: Callable[[Any], Any] | None = None):
        super().__init__(file, encoding="utf-8")
        self.placeholders: list[str] = []
        # stored in the C unpickler's own slot (no Python method in between)
        self.persistent_load = persistent_load or _no_external_data

    def find_class(self, module: str, name: str) -> Any:
        qualname = f"{module}.{name}"
        table = allowed_globals()
        if qualname in table:
            return table[qualname]
        if qualname not in self.placeholders:
            self.placeholders.append(qualname)
        return make_placeholder(qualname)


def restricted_loads(
    data: bytes | io.BufferedIOBase,
    persistent_load: Callable[[Any], Any] | None = None,
    what: str = "pickle",
) -> tuple[Any, list[str]]:
    """Unpickle ``data`` safely; returns the object and the placeholder global names."""
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    unpickler = RestrictedUnpickler(stream, persistent_load)
    try:
        obj = unpickler.load()
    except CorruptCheckpointError as err:
        raise CorruptCheckpointError(f"{what}: {err}") from None
    except RecursionError:
        raise CorruptCheckpointError(f"{what}: pickle nests too deeply") from None
    except (Exception, MemoryError) as err:
        raise CorruptCheckpointError(
            f"{what}: cannot unpickle ({type(err).__name__}: {err}); the file is truncated, "
            "corrupt or not a pickle"
        ) from None
    return obj, unpickler.placeholders


# --- whole pickled modules ------------------------------------------------------------------


class ModuleStateDict(dict):
    """The state dict of a pickled ``nn.Module``; ``buffers`` names its buffers (the rest are
    parameters), so ``inspect`` can count them apart."""

    buffers: set[str]

    def __init__(self) -> None:
        super().__init__()
        self.buffers = set()


def module_state(obj: Any) -> dict | None:
    """If ``obj`` is a placeholder for a pickled ``nn.Module``, the state dict it would produce."""
    if not isinstance(obj, Placeholder):
        return None
    state = obj.state
    if not isinstance(state, dict) or "_parameters" not in state or "_modules" not in state:
        return None
    out = ModuleStateDict()
    _collect_module(state, "", out, depth=0)
    return out


def _collect_module(state: dict, prefix: str, out: dict, depth: int) -> None:
    if depth > 200:
        raise CorruptCheckpointError("pickled module nests too deeply")
    params = state.get("_parameters") or {}
    buffers = state.get("_buffers") or {}
    skip = state.get("_non_persistent_buffers_set") or set()
    for name, value in _mapping_items(params):
        if isinstance(value, TensorRef):
            out[prefix + str(name)] = value
    for name, value in _mapping_items(buffers):
        if isinstance(value, TensorRef) and name not in skip:
            out[prefix + str(name)] = value
            if isinstance(out, ModuleStateDict):
                out.buffers.add(prefix + str(name))
    for name, child in _mapping_items(state.get("_modules") or {}):
        if isinstance(child, Placeholder) and isinstance(child.state, dict):
            _collect_module(child.state, f"{prefix}{name}.", out, depth + 1)


def _mapping_items(value: Any) -> list[tuple[Any, Any]]:
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, Placeholder):
        return list(value.items.items())
    return []
