"""Apply targets: where one planned copy's values go.

The apply stage asks a reference for its bytes (:meth:`TensorRef.byte_span`) and a
:class:`Destination` for the memory they land in; neither the planner nor the copy loop knows
the kinds of model tensor. Built in: a tensor in CPU memory (filled in place), a meta-device
tensor (a fresh CPU tensor, filled, then set on every tied name), an accelerator tensor (staged
through pinned buffers). Another kind of target (a DTensor shard, ...) is one more class,
registered with :func:`register_destination`; until one is registered, such models are refused while planning
(:func:`torchgraft.native_load.check_writable`).

Example:
    >>> import torch
    >>> from torchgraft.plan import Copy, model_slots
    >>> from torchgraft.tensors import MemoryRef
    >>> m = torch.nn.Linear(2, 1, bias=False)
    >>> dest = destination_for(Copy(MemoryRef(torch.ones(1, 2)), [model_slots(m)["weight"]], "w"))
    >>> type(dest).__name__, dest.raw_memory(torch.float32)
    ('InPlace', True)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .plan import Copy


class Destination:
    """The memory one copy is written into, and what to do once it is filled."""

    __slots__ = ("copy", "tensor")
    writes_model = True  # writing the buffer changes the model (False: only ``finish`` does)

    def __init__(self, copy: Copy) -> None:
        self.copy = copy
        self.tensor = copy.slots[0].tensor

    def buffer(self) -> torch.Tensor:
        """The tensor the values are written into."""
        return self.tensor.detach()

    def raw_memory(self, dtype: torch.dtype) -> bool:
        """True when file bytes of ``dtype`` can be read straight into :meth:`buffer`."""
        return False

    def finish(self, model: torch.nn.Module) -> None:
        """Called once the buffer holds every value."""


class InPlace(Destination):
    """A tensor in CPU memory: filled in place (the apply loop inlines this common case while
    only the built-in destinations are registered)."""

    __slots__ = ()

    def raw_memory(self, dtype: torch.dtype) -> bool:
        t = self.tensor
        return t.dtype == dtype and t.is_contiguous()


class Accelerator(Destination):
    """A tensor on an accelerator: staged through pinned host buffers (``staged.py``), or read
    then copied."""

    __slots__ = ()


class FreshForMeta(Destination):
    """A meta-device tensor: a new CPU tensor is filled, then set on every tied name."""

    __slots__ = ("fresh",)
    writes_model = False

    def __init__(self, copy: Copy) -> None:
        self.copy = copy
        self.tensor = t = copy.slots[0].tensor
        self.fresh = torch.empty(copy.slots[0].shape, dtype=t.dtype, device="cpu")

    def buffer(self) -> torch.Tensor:
        return self.fresh

    def raw_memory(self, dtype: torch.dtype) -> bool:
        return self.fresh.dtype == dtype

    def finish(self, model: torch.nn.Module) -> None:
        template, param = self.tensor, None
        for slot in self.copy.slots:
            mod_path, _, attr = slot.name.rpartition(".")
            module = model.get_submodule(mod_path) if mod_path else model
            if attr in module._parameters:
                if param is None:
                    param = torch.nn.Parameter(self.fresh, requires_grad=template.requires_grad)
                module._parameters[attr] = param
            else:
                module._buffers[attr] = self.fresh


def _kind(t: torch.Tensor) -> type[Destination] | None:
    if t.is_meta:
        return FreshForMeta
    return InPlace if t.is_cpu else Accelerator


DESTINATIONS: list[Callable[[torch.Tensor], type[Destination] | None]] = [_kind]


def register_destination(pick: Callable[[torch.Tensor], type[Destination] | None]) -> None:
    """Add a kind of target: ``pick(model_tensor)`` returns a :class:`Destination` subclass for
    the tensors it handles, else None; asked before the ones registered earlier."""
    DESTINATIONS.append(pick)


def destination_for(copy: Copy) -> Destination:
    """The destination of ``copy``: the first entry of :data:`DESTINATIONS` that claims its
    model tensor (later registrations are asked first)."""
    target = copy.slots[0].tensor
    for pick in reversed(DESTINATIONS):
        cls = pick(target)
        if cls is not None:
            return cls(copy)
    raise TypeError(f"no destination for {copy.slots[0].name}")
