"""Every error torchgraft raises derives from :class:`TorchgraftError`.

Messages say what was found, what was expected and which option fixes it.

Example:
    >>> import torchgraft as tg
    >>> try:
    ...     tg.read("missing.pth")
    ... except tg.TorchgraftError as err:
    ...     print(type(err).__name__)
    CheckpointNotFoundError
"""

from __future__ import annotations

from collections.abc import Sequence


class TorchgraftError(Exception):
    """Base class of all torchgraft errors."""


# --- reading -----------------------------------------------------------------------------------


class ReadError(TorchgraftError):
    """The checkpoint could not be read."""


class CheckpointNotFoundError(ReadError, FileNotFoundError):
    """The path does not exist."""


class UnsupportedFormatError(ReadError):
    """The file is not a checkpoint format torchgraft knows (says what it looks like instead)."""


class CorruptCheckpointError(ReadError):
    """The file claims to be a known format but is truncated or internally inconsistent."""


class UnsafeCheckpointError(ReadError):
    """The file needs something torchgraft will not do without ``trust=True``."""


# --- selecting and mapping ---------------------------------------------------------------------


class SelectError(TorchgraftError):
    """``select=`` names no state dict inside the container."""


class PrefixNotFoundError(TorchgraftError):
    """``prefix=`` matches no checkpoint name."""


class RenameError(TorchgraftError):
    """``rename=`` is malformed or maps two tensors onto one name."""


# --- planning ----------------------------------------------------------------------------------


class PlanError(TorchgraftError):
    """The load plan cannot be carried out; raised before the model is touched."""

    def __init__(self, message: str, report: object | None = None) -> None:
        super().__init__(message)
        self.report = report


class ShapeMismatchError(PlanError):
    """A checkpoint tensor matched a model tensor by name but its shape differs."""


class IncompatibleKeysError(PlanError):
    """``strict=True`` and some tensors are missing or unexpected."""


class NothingToLoadError(PlanError):
    """Not a single tensor of a non-empty checkpoint would be copied."""


# --- applying ----------------------------------------------------------------------------------


class PartialLoadError(TorchgraftError):
    """Copying failed part-way: the model holds a mix of old and new values.

    ``written`` lists the model tensors that already hold checkpoint values.
    """

    def __init__(self, message: str, written: Sequence[str]) -> None:
        super().__init__(message)
        self.written = list(written)


__all__ = [
    "TorchgraftError",
    "ReadError",
    "CheckpointNotFoundError",
    "UnsupportedFormatError",
    "CorruptCheckpointError",
    "UnsafeCheckpointError",
    "SelectError",
    "PrefixNotFoundError",
    "RenameError",
    "PlanError",
    "ShapeMismatchError",
    "IncompatibleKeysError",
    "NothingToLoadError",
    "PartialLoadError",
]


class OptionError(TorchgraftError, ValueError):
    """An option has a value torchgraft does not understand."""


__all__.append("OptionError")


# --- wave 2: resource limits, tensor kinds, ambiguity, targets, hooks ---------------------------


class ResourceLimitError(CorruptCheckpointError):
    """The file asks for more than a resource limit allows (nesting depth, objects, decompressed
    bytes, header bytes); see :mod:`torchgraft.limits` for how to raise a limit for a
    legitimate huge file."""


class UnsupportedTensorError(ReadError):
    """The file holds a tensor of a kind torchgraft cannot rebuild (named, with its kind)."""


class AmbiguousRenameError(RenameError, PlanError):
    """``auto`` found several renaming rules that fit equally well (or none clearly best); the
    message lists each candidate with the ``prefix=``/``rename=`` that picks it."""

    def __init__(self, message: str, report: object | None = None) -> None:
        PlanError.__init__(self, message, report)


class UnsupportedTargetError(PlanError):
    """A model tensor is of a kind torchgraft cannot write (e.g. a DTensor / FSDP2 shard)."""


class AmbiguousAdapterError(UnsupportedTargetError):
    """An adapter recognised a tensor but cannot decide how to adapt it (two candidate grids,
    ambiguous prefix tokens), or two adapters propose different results; the message names the
    tensor and the ``adapt=`` option that decides it."""


class LoadHookError(PlanError):
    """A model's own loading code (load_state_dict pre/post hook, ``_load_from_state_dict``
    override, ``set_extra_state``) failed while planning; names the module and the hook."""


class TooLittleLoadedError(PlanError):
    """Less than ``min_loaded`` of the model would be loaded."""


__all__ += ["ResourceLimitError", "UnsupportedTensorError", "AmbiguousRenameError",
            "UnsupportedTargetError", "LoadHookError", "TooLittleLoadedError",
            "AmbiguousAdapterError"]


# --- sources: hf:// ids and URLs ---------------------------------------------------------------


class ChecksumError(ReadError):
    """A downloaded (or cached) file's SHA-256 is not the one pinned by ``sha256=``, a URL's
    ``#sha256=`` fragment or the torch.hub file-name hash prefix; a bad download is deleted."""


__all__ += ["ChecksumError"]
