"""Resource limits that bound what reading a (possibly hostile) file may cost.

Every reader and every walk of a checkpoint's object tree checks these limits and raises
:class:`~torchgraft.errors.ResourceLimitError` past them, before anything is written to a model.
The defaults are far above what real checkpoints need; raise one for a legitimate huge file
with :func:`raised` (a context manager) or by setting the attribute on :data:`LIMITS`.

Example:
    >>> import torchgraft as tg
    >>> tg.LIMITS.max_depth
    1000
    >>> with tg.limits_raised(max_nodes=10**9):
    ...     tg.LIMITS.max_nodes
    1000000000
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields


@dataclass
class Limits:
    """The limits in force. Environment variables ``TORCHGRAFT_<NAME>`` (upper case) override the
    defaults at import time.

    Where the container readers check them: ``max_pickle_bytes`` bounds a ``data.pkl`` (stored,
    or the size a deflated one declares, checked before inflating) and an npz object member;
    ``max_decompressed_bytes`` bounds what all compressed npz members declare together;
    ``max_compression_ratio`` refuses a compressed member declaring more than that many bytes
    per stored byte once past 16 MiB (deflate cannot exceed ~1032; real pickles and arrays stay
    far below 200); ``max_header_bytes`` bounds a safetensors header and an ``index.json``;
    ``max_files`` bounds the entries of a folder and the shards an index names. A member is never
    inflated past the size it declares, and must inflate to exactly that size with its CRC.
    """

    max_depth: int = 1000  # nesting depth of containers (dicts, lists, tuples, placeholders)
    max_nodes: int = 20_000_000  # objects visited by one walk of a checkpoint's object tree
    max_pickle_bytes: int = 2 << 30  # a pickle (data.pkl, legacy pickle) after decompression
    max_decompressed_bytes: int = 64 << 30  # all compressed members of one file, decompressed
    max_header_bytes: int = 100 << 20  # a safetensors header, an index.json, an npy header
    max_files: int = 100_000  # files in a checkpoint folder, shards named by an index.json
    # a compressed member (zip data.pkl, npz member) may declare at most this many bytes per
    # stored byte once past 16 MiB; deflate cannot exceed ~1032, real pickles/arrays stay < 50
    max_compression_ratio: int = 200

    def check(self, name: str, value: int, what: str) -> None:
        """Raise :class:`ResourceLimitError` when ``value`` exceeds limit ``name``."""
        limit = getattr(self, name)
        if value > limit:
            from .errors import ResourceLimitError

            raise ResourceLimitError(
                f"{what}: {value} exceeds the limit {name}={limit}. If the file is trusted and "
                f"really this large, raise it: `with torchgraft.limits_raised({name}=...)` or "
                f"TORCHGRAFT_{name.upper()}=... in the environment")


def _from_env() -> Limits:
    import os

    lim = Limits()
    for f in fields(Limits):
        raw = os.environ.get(f"TORCHGRAFT_{f.name.upper()}")
        if raw:
            try:
                setattr(lim, f.name, int(raw))
            except ValueError:
                pass
    return lim


LIMITS = _from_env()


@contextlib.contextmanager
def limits_raised(**values: int) -> Iterator[Limits]:
    """Temporarily set limits (any field of :class:`Limits`) for the current process."""
    unknown = set(values) - {f.name for f in fields(Limits)}
    if unknown:
        from .errors import OptionError

        raise OptionError(f"unknown limit(s) {sorted(unknown)}; known: "
                          f"{[f.name for f in fields(Limits)]}")
    old = {k: getattr(LIMITS, k) for k in values}
    for k, v in values.items():
        setattr(LIMITS, k, int(v))
    try:
        yield LIMITS
    finally:
        for k, v in old.items():
            setattr(LIMITS, k, v)
