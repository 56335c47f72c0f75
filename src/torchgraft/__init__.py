"""torchgraft: load any PyTorch checkpoint into any model, safely, fast and all-or-nothing.

``import torchgraft`` is cheap: the errors are imported at once, everything else on first use
(``tg.load``, ``tg.read``... import the pipeline then).

Example:
    >>> import torch, torchgraft as tg
    >>> model = torch.nn.Linear(4, 2)
    >>> report = tg.load(model, {"model": torch.nn.Linear(4, 2).state_dict()})
    >>> report.ok, report.loaded_fraction
    (True, 1.0)
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from .errors import (
    AmbiguousAdapterError,
    AmbiguousRenameError,
    CheckpointNotFoundError,
    ChecksumError,
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

if TYPE_CHECKING:  # what the lazy names below resolve to
    from .api import LoadOptions, LowLoadWarning, StateDict, load, plan, read
    from .compare import checkpoint_diff
    from .formats import Checkpoint, Format, register_format
    from .limits import LIMITS, Limits, limits_raised
    from .report import Entry, LoadReport
    from .sources import ResolvedSource, provenance_of, resolve_source

__version__ = "0.1.0"

_LAZY = {
    "load": "api", "plan": "api", "read": "api", "StateDict": "api", "LoadOptions": "api",
    "LowLoadWarning": "api", "Checkpoint": "formats", "Format": "formats",
    "register_format": "formats", "LIMITS": "limits", "Limits": "limits",
    "limits_raised": "limits", "Entry": "report", "LoadReport": "report",
    "ResolvedSource": "sources", "provenance_of": "sources", "resolve_source": "sources",
    "checkpoint_diff": "compare",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:  # a submodule (tg.formats, tg.transforms...) not imported yet
        if name.startswith("_"):
            raise AttributeError(f"module 'torchgraft' has no attribute {name!r}")
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError:
            raise AttributeError(f"module 'torchgraft' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


class _Package(types.ModuleType):
    """``tg.plan`` is the function even after the submodule ``torchgraft.plan`` is imported
    (the import system binds a submodule on its package; here it is kept aside)."""

    @property
    def plan(self) -> Any:
        from .api import plan

        return plan

    @plan.setter
    def plan(self, value: Any) -> None:
        self.__dict__["_plan_module"] = value


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "load", "plan", "read", "StateDict", "LoadReport", "Entry", "Checkpoint", "Format",
    "register_format", "TorchgraftError", "ReadError", "CheckpointNotFoundError",
    "UnsupportedFormatError", "CorruptCheckpointError", "UnsafeCheckpointError", "SelectError",
    "PrefixNotFoundError", "RenameError", "PlanError", "ShapeMismatchError",
    "IncompatibleKeysError", "NothingToLoadError", "PartialLoadError", "OptionError",
    "ResourceLimitError", "UnsupportedTensorError", "AmbiguousRenameError",
    "AmbiguousAdapterError",
    "UnsupportedTargetError", "LoadHookError", "TooLittleLoadedError", "LIMITS", "Limits",
    "limits_raised", "LowLoadWarning", "LoadOptions", "ChecksumError", "ResolvedSource",
    "provenance_of", "resolve_source", "checkpoint_diff", "__version__",
]
