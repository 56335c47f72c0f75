"""The read stage's data types and the format registry.

A *format* turns a path into a :class:`Checkpoint`: the container tree of the file with every
tensor replaced by a lazy :class:`~torchgraft.tensors.TensorRef`. Formats are tried in
registration order; the first whose ``sniff`` accepts the file opens it. Users add their own
with :func:`register_format`.

Example:
    >>> from torchgraft.formats.base import register_format, Format
    >>> class MyFormat(Format):
    ...     name = "my-format"
    ...     def sniff(self, path, head): return head.startswith(b"MYFMT")
    ...     def open(self, path, trust=False): ...
    >>> register_format(MyFormat())   # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Checkpoint:
    """What a reader found in a file or folder.

    ``root`` is the object tree (dicts, lists, scalars, placeholders) with ``TensorRef`` leaves;
    ``placeholders`` names the globals that were referenced and not executed; ``metadata`` holds
    format-level string metadata (safetensors ``__metadata__``, provenance written by convert).
    """

    root: Any
    format: str
    path: Path | None = None
    placeholders: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else "<in-memory>"


class Format:
    """A checkpoint format: ``sniff`` decides from the path and first bytes, ``open`` reads."""

    name = "format"

    def sniff(self, path: Path, head: bytes) -> bool:
        raise NotImplementedError

    def open(self, path: Path, trust: bool = False) -> Checkpoint:
        raise NotImplementedError


_FORMATS: list[Format] = []


def register_format(fmt: Format, first: bool = True) -> None:
    """Add a format; ``first=True`` tries it before the built-in ones."""
    if first:
        _FORMATS.insert(0, fmt)
    else:
        _FORMATS.append(fmt)


def registered_formats() -> list[Format]:
    return list(_FORMATS)
