"""torchgraft: load any PyTorch checkpoint into any model, safely, fast and all-or-nothing.

Example:
    >>> import torch, torchgraft as tg
    >>> model = torch.nn.Linear(4, 2)
    >>> report = tg.load(model, {"model": torch.nn.Linear(4, 2).state_dict()})
    >>> report.ok, report.loaded_fraction
    (True, 1.0)
"""

from __future__ import annotations

from .api import LoadOptions, LowLoadWarning, StateDict, load, plan, read
from .errors import (
    AmbiguousRenameError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompatibleKeysError,
    LoadHookError,
    NothingToLoadError,
    OptionError,
    PartialLoadError,
    PlanError,
    PrefixNotFoundError,
    ReadError,
    RenameError,
    ResourceLimitError,
    SelectError,
    ShapeMismatchError,
    TooLittleLoadedError,
    TorchgraftError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
    UnsupportedTargetError,
    UnsupportedTensorError,
)
from .formats import Checkpoint, Format, register_format
from .limits import LIMITS, Limits, limits_raised
from .report import Entry, LoadReport

__version__ = "0.1.0"

__all__ = [
    "load", "plan", "read", "StateDict", "LoadReport", "Entry", "Checkpoint", "Format",
    "register_format", "TorchgraftError", "ReadError", "CheckpointNotFoundError",
    "UnsupportedFormatError", "CorruptCheckpointError", "UnsafeCheckpointError", "SelectError",
    "PrefixNotFoundError", "RenameError", "PlanError", "ShapeMismatchError",
    "IncompatibleKeysError", "NothingToLoadError", "PartialLoadError", "OptionError",
    "ResourceLimitError", "UnsupportedTensorError", "AmbiguousRenameError",
    "UnsupportedTargetError", "LoadHookError", "TooLittleLoadedError", "LIMITS", "Limits",
    "limits_raised", "LowLoadWarning", "LoadOptions", "__version__",
]

from .errors import ChecksumError  # noqa: E402
from .sources import ResolvedSource, provenance_of, resolve_source  # noqa: E402

__all__ += ["ChecksumError", "ResolvedSource", "provenance_of", "resolve_source"]
