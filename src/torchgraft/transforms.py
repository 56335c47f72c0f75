"""The transform step of a plan: tensors computed from checkpoint tensors, and the adapters
that propose them.

A planned copy normally moves one checkpoint tensor's bytes into one model tensor. When an
*adapter* recognises that a checkpoint tensor has the right role but the wrong shape (the first
conv of a model built for 1-channel input, ...), the plan copies a :class:`TransformRef`
instead: the source reference plus a chain of :class:`Op` (reshape, transpose, slice, resample,
channel adapt, row gather...). Nothing is computed while planning except shapes (on the meta
device); the ops run at apply time on the source's values, and the report lists the tensor as
``adapted`` with the adapter, both shapes and the ops' parameters.

Adapters are a registry (:func:`register_adapter`). An adapter sees the model tensor's name, its
role (from the framework's own metadata, see :mod:`torchgraft.rules`), the checkpoint and model
shapes, and returns ops, :class:`Keep` or None; the built-in adapters live in
:mod:`torchgraft.adapters`. Two adapters proposing different ops for one tensor is an
error, never a silent choice.

Example:
    >>> import torch
    >>> from torchgraft.tensors import MemoryRef
    >>> from torchgraft.adapters.channels import adapt_channels
    >>> ref = TransformRef(MemoryRef(torch.ones(8, 3, 3, 3)), [adapt_channels(3, 1)])
    >>> ref.shape, float(ref.materialize()[0, 0, 0, 0])
    ((8, 1, 3, 3), 3.0)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .tensors import TensorRef


@dataclass(frozen=True)
class Op:
    """One tensor operation of a transform chain; ``params`` are shown in the report."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    params: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}({args})"


class TransformRef(TensorRef):
    """A tensor computed from ``source`` by ``ops``, lazily (shape and dtype from a meta run)."""

    def __init__(self, source: TensorRef, ops: list[Op], adapter: str = "") -> None:
        self.source = source
        self.ops = list(ops)
        self.adapter = adapter
        probe = torch.empty(source.shape, dtype=source.dtype, device="meta")
        for op in self.ops:
            probe = op.fn(probe)
        self.shape = tuple(probe.shape)
        self.dtype = probe.dtype

    def alias_key(self) -> Any:
        return ("transform", self.source.alias_key(), tuple(op.describe() for op in self.ops))

    def materialize(self) -> torch.Tensor:
        value = self.source.materialize()
        for op in self.ops:
            value = op.fn(value)
        return value

    def describe(self) -> str:
        return " -> ".join(op.describe() for op in self.ops)


class Keep:
    """An adapter's answer "the model's own value is right" (an index buffer the model built for
    its own window size, ...): the tensor is reported ``kept`` with ``reason``, nothing is
    written, and the shape difference is not an error."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def describe(self) -> str:
        return self.reason


@dataclass(frozen=True)
class Role:
    """A tensor's role with what the framework says about it (``params``)."""

    kind: str
    params: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)


def int_pair(value: Any) -> tuple[int, int] | None:
    """``(h, w)`` from an int or a pair of positive ints (a grid, window or patch size), else
    None."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        return (int(value[0]), int(value[1]))
    return None


def kind_of(role: Any) -> str | None:
    return getattr(role, "kind", role)


@dataclass(frozen=True)
class Proposal:
    """An adapter's answer for one tensor: ops to run, or :class:`Keep`."""

    adapter: str
    ops: list[Op] | Keep

    def key(self) -> Any:
        return self.ops.reason if isinstance(self.ops, Keep) else tuple(
            op.describe() for op in self.ops)


class Adapter(Protocol):
    """Proposes ops that turn a checkpoint tensor into a model tensor of another shape.

    ``propose`` returns ops, :class:`Keep` (the model's own value is right), or None (not this
    adapter's case); it raises a :class:`~torchgraft.errors.PlanError` when the case is its own
    but ambiguous. An adapter that takes parameters (``adapt={"name": {...}}``) also has
    ``configured(**params) -> Adapter``.
    """

    name: str
    roles: tuple[str, ...]  # roles it handles ("first_conv", "classifier", ...)
    default: bool  # applied under adapt="auto" (else only when asked for by name)

    def propose(self, name: str, role: Any, src_shape: tuple[int, ...],
                dst_shape: tuple[int, ...]) -> list[Op] | Keep | None: ...


_ADAPTERS: list[Adapter] = []
_BUILTINS: list[bool] = []  # non-empty once torchgraft.adapters registered the built-in ones


def _load_builtins() -> None:
    if not _BUILTINS:
        _BUILTINS.append(True)
        from . import adapters  # noqa: F401  (registers the built-in adapters)


def register_adapter(adapter: Adapter, first: bool = True) -> None:
    """Add an adapter (``first=True``: asked before the built-in ones)."""
    _load_builtins()
    if first:
        _ADAPTERS.insert(0, adapter)
    else:
        _ADAPTERS.append(adapter)


def registered_adapters() -> list[Adapter]:
    """Every registered adapter, in the order they are asked."""
    _load_builtins()
    return list(_ADAPTERS)


def propose(name: str, role: Any, src_shape: tuple[int, ...],
            dst_shape: tuple[int, ...], adapters: list[Adapter]) -> list[Proposal]:
    """Every proposal of ``adapters`` for one tensor (more than one that differ: the caller
    refuses)."""
    out = []
    for adapter in adapters:
        ops = adapter.propose(name, role, src_shape, dst_shape)
        if ops:
            out.append(Proposal(adapter.name, ops))
    return out


def role_of(name: str, roles: dict[str, Any]) -> Any:
    """The role of model tensor ``name`` from ``{prefix or exact name: role}`` (an exact name,
    else the longest prefix ending in ``.``)."""
    if name in roles:
        return roles[name]
    best = None
    for prefix, role in roles.items():
        if (prefix.endswith(".") and name.startswith(prefix)
                and (best is None or len(prefix) > len(best[0]))):
            best = (prefix, role)
    return best[1] if best else None


_MOVED = {"InputChannels": "channels", "adapt_channels": "channels",
          "PositionEmbedding": "position", "resample_grid": "position",
          "ClassifierRows": "rows", "gather_rows": "rows", "TokenRows": "rows",
          "resize_rows": "rows"}


def __getattr__(name: str) -> Any:
    """The built-in adapters live in :mod:`torchgraft.adapters`; old imports keep working."""
    where = _MOVED.get(name)
    if where is None:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"torchgraft.adapters.{where}"), name)
