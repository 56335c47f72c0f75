"""Turn a checkpoint tree read by torchgraft into the plain objects a framework expects.

torchgraft's reader never runs a file's code: every global other than tensors and plain data is
an inert :class:`~torchgraft.formats.unpickler.Placeholder` that records its arguments and state.
Frameworks that resume training (mmengine's ``Runner``, Lightning) need some of those objects
back as real ones. :func:`rebuild` walks the tree and

* materialises tensors (``TensorRef`` → ``torch.Tensor``, optionally on a device);
* keeps dicts (``OrderedDict`` and a state dict's ``_metadata`` too), lists, tuples and sets;
* rebuilds a placeholder only through a *rebuilder* registered for its exact qualified name,
  which constructs the real class from the recorded plain data (never calling the file's
  globals); a placeholder with no rebuilder stays inert, and the caller decides whether that is
  an error (:func:`placeholders_in`).

Example:
    >>> import pickle, argparse
    >>> from torchgraft.formats.unpickler import restricted_loads
    >>> tree, _ = restricted_loads(pickle.dumps({"args": argparse.Namespace(lr=0.1)}))
    >>> rebuild(tree)
    {'args': Namespace(lr=0.1)}
"""

from __future__ import annotations

import argparse
import collections
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import CorruptCheckpointError
from ..formats.unpickler import Placeholder
from ..limits import LIMITS
from ..tensors import TensorRef

Rebuilder = Callable[[Placeholder, Callable[[Any], Any]], Any]
"""``fn(placeholder, plain)``: the real object; ``plain`` rebuilds nested recorded data."""


def _namespace(ph: Placeholder, plain: Callable[[Any], Any]) -> Any:
    state = plain(ph.state) if ph.state is not None else {}
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise CorruptCheckpointError(f"argparse.Namespace with state {state!r:.80}: expected a "
                                     "dict of attribute names")
    return argparse.Namespace(**state)


def _counter(ph: Placeholder, plain: Callable[[Any], Any]) -> Any:
    data = plain(ph.args[0]) if ph.args else plain(ph.items)
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"collections.Counter of {data!r:.80}: expected a dict")
    return collections.Counter(data)


def _plain_dict(ph: Placeholder, plain: Callable[[Any], Any]) -> Any:
    """A dict subclass (``AttributeDict``...): its items as a plain dict."""
    return plain(dict(ph.items))


#: qualified name → rebuilder used by every :func:`rebuild` call (callers may pass more).
REBUILDERS: dict[str, Rebuilder] = {
    "argparse.Namespace": _namespace,
    "collections.Counter": _counter,
    "pytorch_lightning.utilities.parsing.AttributeDict": _plain_dict,
    "lightning_fabric.utilities.data.AttributeDict": _plain_dict,
    "lightning.fabric.utilities.data.AttributeDict": _plain_dict,
}


class _Walker:
    def __init__(self, rebuilders: dict[str, Rebuilder], device: torch.device | None) -> None:
        self.rebuilders = rebuilders
        self.device = device
        self.memo: dict[int, Any] = {}
        self.nodes = 0
        self.depth = 0

    def __call__(self, obj: Any) -> Any:
        if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.dtype)):
            return obj
        key = id(obj)
        if key in self.memo:
            return self.memo[key]
        self.nodes += 1
        LIMITS.check("max_nodes", self.nodes, "objects in the checkpoint")
        self.depth += 1
        try:
            LIMITS.check("max_depth", self.depth, "nesting depth of the checkpoint")
            return self._convert(obj, key)
        finally:
            self.depth -= 1

    def _convert(self, obj: Any, key: int) -> Any:
        if isinstance(obj, TensorRef):
            tensor = obj.materialize()
            out: Any = tensor.to(self.device) if self.device is not None else tensor
        elif isinstance(obj, dict):
            out = type(obj)() if type(obj) in (dict, collections.OrderedDict) else {}
            self.memo[key] = out  # before the children: a cycle comes back to this object
            for k, v in obj.items():
                out[self(k)] = self(v)
            meta = getattr(obj, "_metadata", None)
            if meta is not None:
                out._metadata = self(meta)
        elif isinstance(obj, list):
            out = []
            self.memo[key] = out
            out.extend(self(v) for v in obj)
        elif isinstance(obj, tuple):
            out = tuple(self(v) for v in obj)
        elif isinstance(obj, (set, frozenset)):
            out = type(obj)(self(v) for v in obj)
        elif isinstance(obj, Placeholder) and obj.qualname in self.rebuilders:
            out = self.rebuilders[obj.qualname](obj, self)
        else:
            out = obj  # numpy values, devices, inert placeholders
        self.memo[key] = out
        return out


def rebuild(tree: Any, rebuilders: dict[str, Rebuilder] | None = None,
            device: str | torch.device | None = None) -> Any:
    """``tree`` with tensors materialised and known placeholders rebuilt (see the module doc).

    ``rebuilders`` extends :data:`REBUILDERS`; ``device`` moves every tensor there.
    """
    table = dict(REBUILDERS)
    table.update(rebuilders or {})
    walker = _Walker(table, torch.device(device) if device is not None else None)
    try:
        return walker(tree)
    except RecursionError:
        raise CorruptCheckpointError("the checkpoint nests too deeply to rebuild") from None


def _is_placeholder(value: Any) -> bool:
    return isinstance(value, Placeholder) or (
        isinstance(value, type) and issubclass(value, Placeholder))


def placeholders_in(tree: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """``(path, qualified name)`` of every inert placeholder left in a rebuilt tree.

    Example:
        >>> from torchgraft.formats.unpickler import make_placeholder
        >>> list(placeholders_in({"a": [1, make_placeholder("x.Y")()]}))
        [("['a'][1]", 'x.Y')]
    """
    seen: set[int] = set()
    stack: list[tuple[str, Any]] = [(path, tree)]
    while stack:
        where, value = stack.pop()
        if _is_placeholder(value):
            yield where, value.qualname
            continue
        if id(value) in seen:
            continue
        if isinstance(value, dict):
            seen.add(id(value))
            stack.extend((f"{where}[{k!r}]", v) for k, v in reversed(list(value.items())))
        elif isinstance(value, (list, tuple)):
            seen.add(id(value))
            stack.extend((f"{where}[{i}]", v) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, argparse.Namespace):
            seen.add(id(value))
            stack.extend((f"{where}.{k}", v) for k, v in reversed(list(vars(value).items())))
