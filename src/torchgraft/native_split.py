"""Handing a checkpoint's entries to the native sub-trees (see :mod:`torchgraft.native_load`).

The plan stage pairs plain model tensors with checkpoint tensors; the entries that fall under a
native sub-tree (a module with its own loading code) are taken out here, materialised, and
given to that sub-tree's group together with the non-tensor entries (extra state, packed
params) and the file's per-module ``_metadata`` renamed like the tensors were.

Example:
    >>> from torchgraft.names import NameMap
    >>> value_target("module.bn._extra_state", NameMap(target={"module.bn.weight": "bn.weight"}))
    'bn._extra_state'
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .errors import UnsupportedTensorError
from .formats.unpickler import Placeholder
from .names import NameMap
from .native_load import NativeGroup, has_meta
from .plan import Slot
from .report import Entry
from .tensors import TensorRef

Source = Any


def node_at(source: Source, root: Any, path: str) -> Any:
    """The raw container at a candidate path (the user's own mapping for in-memory sources, so
    its ``_metadata`` and extra state are seen)."""
    node: Any = source if isinstance(source, Mapping) else root
    for part in [p for p in path.split("/") if p]:
        if isinstance(node, torch.nn.Module):
            node = node.state_dict()
        if not isinstance(node, Mapping):
            return None
        node = node.get(part, node.get(int(part)) if part.lstrip("-").isdigit() else None)
    if isinstance(node, torch.nn.Module):
        node = node.state_dict()
    return node


class _MappedMetadata(Mapping):
    """The file's per-module ``_metadata`` with module paths renamed like the tensors were;
    built on first look-up (only BatchNorm-like modules and native sub-trees ask)."""

    def __init__(self, metadata: Mapping, names: NameMap) -> None:
        self._source, self._names, self._built = metadata, names, None

    def _table(self) -> dict[str, Any]:
        if self._built is None:
            self._built = _map_metadata(self._source, self._names)
        return self._built

    def __getitem__(self, key: str) -> Any:
        return self._table()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._table())

    def __len__(self) -> int:
        return len(self._table())


def mapped_metadata(metadata: Any, names: NameMap) -> Any:
    """``_MappedMetadata`` of the file's ``_metadata``, or None when it has none."""
    return _MappedMetadata(metadata, names) if isinstance(metadata, Mapping) else None


def _map_metadata(metadata: Mapping, names: NameMap) -> dict[str, Any]:
    paths: dict[str, str] = {}
    for src, tgt in names.target.items():
        s_parent, _, s_leaf = src.rpartition(".")
        t_parent, _, t_leaf = tgt.rpartition(".")
        if s_leaf == t_leaf:
            paths.setdefault(s_parent, t_parent)
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        if isinstance(key, str) and isinstance(value, Mapping):
            out[paths.get(key, key)] = dict(value)
    return out


def split_native(groups: list[NativeGroup], slots: dict[str, Slot],
                  refs: dict[str, TensorRef], names: NameMap, node: Any
                  ) -> tuple[dict[str, Slot], dict[str, TensorRef], NameMap]:
    """Hand the tensors under each native group's prefix to the group (materialised), and
    return what the plain planner keeps."""
    prefixes = tuple(g.prefix for g in groups)

    def owner(name: str) -> NativeGroup | None:
        if not name.startswith(prefixes):
            return None
        return next(g for g in groups if name.startswith(g.prefix))

    kept_refs = dict(refs)
    target = dict(names.target)
    for src, tgt in names.target.items():
        group = owner(tgt)
        if group is None:
            continue
        group.state[tgt] = refs[src].materialize()
        group.sources[tgt] = src
        del kept_refs[src], target[src]
    if isinstance(node, Mapping):  # non-tensor entries: extra state, packed params, dtypes
        for key, value in node.items():
            if isinstance(key, str) and key not in refs:
                tgt = value_target(key, names)
                group = owner(tgt)
                if group is not None:
                    group.state[tgt] = _plain_value(value)
                    group.sources[tgt] = key
    for group in groups:
        group.has_meta = has_meta(group.module)
    rest = NameMap(target=target, dropped=names.dropped, why=names.why, rules=names.rules,
                   notes=names.notes, auto_rule=names.auto_rule)
    kept_slots = {n: s for n, s in slots.items() if owner(n) is None}
    return kept_slots, kept_refs, rest


def value_target(key: str, names: NameMap) -> str:
    """Map a non-tensor entry's name like the tensors of the same module were mapped."""
    parent = key.rpartition(".")[0] + "." if "." in key else ""
    leaf = key[len(parent):]
    for src, tgt in names.target.items():
        if src.startswith(parent) and "." not in src[len(parent):]:
            return tgt[: len(tgt) - len(src) + len(parent)] + leaf
    if names.auto_rule is not None:
        s_pre, a_pre = names.auto_rule
        if key.startswith(s_pre):
            return a_pre + key[len(s_pre):]
    from .names import strip_wrappers

    return strip_wrappers(key)


def _plain_value(value: Any) -> Any:
    """A container value for ``set_extra_state``: tensors materialised, containers rebuilt."""
    if isinstance(value, TensorRef):
        return value.materialize()
    if isinstance(value, Placeholder):
        raise UnsupportedTensorError(
            f"the checkpoint holds a {value.qualname} object where the model's own loading code "
            "expects a value; torchgraft does not run the file's code to rebuild it. Pass "
            "hooks=False to load the tensors without the model's loading code, or trust=True "
            "if you trust the file")
    if isinstance(value, dict):
        return type(value)((k, _plain_value(v)) for k, v in value.items()) \
            if type(value) in (dict, OrderedDict) else {k: _plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain_value(v) for v in value)
    return value


def merge_entries(plain: list[Entry], native: list[Entry], groups: list[NativeGroup]) -> list[Entry]:
    """Model tensors first (the plain ones, then each group's, in the model's order), then the
    unused checkpoint tensors."""
    model_part = [e for e in plain if e.target is not None] + \
        [e for e in native if e.target is not None]
    rest = [e for e in plain if e.target is None] + [e for e in native if e.target is None]
    return model_part + rest
