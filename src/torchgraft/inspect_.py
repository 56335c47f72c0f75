"""Describe a checkpoint without loading it: container, state dicts, tensors, provenance.

Nothing but the container's structure is read unless ``stats=True``, which reads each tensor
once (one at a time, converted in float64 chunks) for min/max/mean/std and NaN/Inf counts.

Example:
    >>> import torch
    >>> info = inspect_checkpoint({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, stats=True)
    >>> info["selected"], info["container"][1]["summary"], info["tensors"][0]["flags"]
    ('state_dict', 'int: 3', ['all_zero'])
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .api import read
from .errors import SelectError
from .formats import Checkpoint, open_checkpoint
from .formats.unpickler import Placeholder
from .limits import LIMITS
from .report import fold_indices
from .selection import find_candidates
from .tensors import TensorRef

CHUNK = 1 << 22  # elements per float64 chunk in stats: 32 MB
INLINE = 110  # longest inline rendering of a container value
JSON_INLINE = 4000  # longest rendering whose JSON value --json includes


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# --- rendering container values -----------------------------------------------------------------
#
# Every walk here is bounded whatever the file: render() by depth and items per level, to_json()
# by a node budget, _count_tensors() visits each object once and counts toward LIMITS.max_nodes.

RENDER_NODES = 200_000  # values one inspect call renders (text and JSON) before "..."


class _Budget:
    """Work left for the renderings of one inspect call, shared by all its rows."""

    __slots__ = ("left",)

    def __init__(self, nodes: int = RENDER_NODES) -> None:
        self.left = nodes

    def take(self) -> bool:
        self.left -= 1
        return self.left >= 0


def _first(items: Any, n: int = 12) -> list:
    return list(itertools.islice(items, n))


def _is_numpy(obj: Any) -> bool:
    return isinstance(obj, (np.ndarray, np.generic))


def _scalar_text(obj: Any) -> str:
    if type(obj) is int and obj.bit_length() > 64:
        return f"<int of {obj.bit_length()} bits>"  # repr() of a huge int may refuse
    return repr(obj)


def render(obj: Any, depth: int = 0, budget: _Budget | None = None) -> str:
    """Python-like text for a container value; placeholders as ``qualname(k=v, ...)``
    (12 items a level, 4 levels, at most ``budget`` values)."""
    budget = budget if budget is not None else _Budget()
    if isinstance(obj, TensorRef):
        return f"tensor{list(obj.shape)} {dtype_name(obj.dtype)}"
    if depth > 3 or not budget.take():
        return "..."
    if isinstance(obj, Placeholder):
        state = obj.state
        if isinstance(state, dict) and all(isinstance(k, str) for k in _first(state, 1000)):
            inner = [f"{k}={render(v, depth + 1, budget)}" for k, v in _first(state.items())]
        else:
            inner = [render(a, depth + 1, budget) for a in obj.args[:12]]
            inner += [f"{render(k, depth + 1, budget)}: {render(v, depth + 1, budget)}"
                      for k, v in _first(obj.items.items())]
        return f"{obj.qualname}({', '.join(inner)})"
    if isinstance(obj, dict):
        items = [f"{render(k, depth + 1, budget)}: {render(v, depth + 1, budget)}" for k, v in
                 _first(obj.items())]
        return "{" + ", ".join(items) + (", ..." if len(obj) > 12 else "") + "}"
    if isinstance(obj, (list, tuple, set, frozenset)):
        body = ", ".join(render(v, depth + 1, budget) for v in _first(obj)) + (", ..." if len(obj) > 12
                                                                      else "")
        return {list: f"[{body}]", tuple: f"({body})"}.get(type(obj), "{" + body + "}")
    if _is_numpy(obj):
        if getattr(obj, "ndim", 0) == 0 or obj.size <= 12:
            return render(obj.tolist(), depth, budget)
        return f"array{list(obj.shape)} {obj.dtype}"
    if isinstance(obj, bytes):
        return f"<{len(obj)} bytes>"
    return _scalar_text(obj)


def to_json(obj: Any, depth: int = 0, budget: _Budget | None = None) -> Any:
    """A JSON-safe copy of a container value (placeholders as ``{"object": name, ...}``);
    six levels deep and at most ``budget`` values, then ``"..."``."""
    budget = budget if budget is not None else _Budget()
    if isinstance(obj, TensorRef):
        return {"tensor": list(obj.shape), "dtype": dtype_name(obj.dtype)}
    if depth > 6 or not budget.take():
        return "..."
    if isinstance(obj, Placeholder):
        out: dict[str, Any] = {"object": obj.qualname, "executed": False}
        if obj.state is not None:
            out["state"] = to_json(obj.state, depth + 1, budget)
        if obj.args:
            out["args"] = to_json(list(obj.args), depth + 1, budget)
        if obj.items:
            out["items"] = to_json(obj.items, depth + 1, budget)
        return out
    if isinstance(obj, dict):
        return {str(k) if type(k) is not int else _scalar_text(k): to_json(v, depth + 1, budget)
                for k, v in itertools.islice(obj.items(), max(budget.left, 0) + 1)}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_json(v, depth + 1, budget)
                for v in itertools.islice(obj, max(budget.left, 0) + 1)]
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else str(obj)
    if type(obj) is int and obj.bit_length() > 64:
        return _scalar_text(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if _is_numpy(obj) and (getattr(obj, "ndim", 0) == 0 or obj.size <= 64):
        return to_json(obj.tolist(), depth + 1, budget)
    return render(obj)


def _count_tensors(obj: Any, memo: dict[int, int] | None = None, depth: int = 0) -> int:
    """Tensor references reachable from ``obj`` through dicts, lists and tuples, 20 levels deep.
    ``memo`` (id -> count) makes each container cost one visit however often it is shared."""
    if isinstance(obj, TensorRef):
        return 1
    if depth > 20 or not isinstance(obj, (dict, list, tuple)):
        return 0
    memo = {} if memo is None else memo
    got = memo.get(id(obj))
    if got is None:
        memo[id(obj)] = 0  # a container inside itself adds nothing
        LIMITS.check("max_nodes", len(memo), "objects visited counting tensors")
        values = obj.values() if isinstance(obj, dict) else obj
        got = memo[id(obj)] = sum(_count_tensors(v, memo, depth + 1) for v in values)
    return got


def describe_value(key: str, value: Any, candidate_paths: set[str], budget: _Budget | None = None,
                   memo: dict[int, int] | None = None) -> dict[str, Any]:
    """One container row: ``key``, ``type``, ``summary`` text, JSON ``value`` when small.
    ``budget`` and ``memo`` are shared by the rows of one container (bounded total work)."""
    budget = budget if budget is not None else _Budget()
    memo = {} if memo is None else memo
    n = _count_tensors(value, memo)
    if isinstance(value, dict) and key in candidate_paths:
        direct = _count_tensors(value, {}, 20)  # 20: only the tensors it holds directly
        extra = f" (+{n - direct} nested)" if n > direct else ""
        return {"key": key, "type": "state_dict", "summary": f"state dict: {direct} tensors{extra}",
                "value": None, "tensors": n}
    text = render(value, 0, budget)
    kind = type(value).__name__ if not isinstance(value, Placeholder) else "object"
    small = n == 0 and len(text) <= INLINE
    if isinstance(value, Placeholder):
        summary = f"{text}  (not executed)" if small else f"{value.qualname}(...)  (not executed)"
    elif small:
        summary = f"{kind}: {text}"
    elif isinstance(value, dict) and n == 0 and _partial(value, budget):
        summary = f"dict: {_partial(value, budget)}"
    elif isinstance(value, dict):
        keys = ", ".join(_short(_scalar_text(k) if type(k) is int else str(k))
                         for k in _first(value, 6)) + (", ..." if len(value) > 6 else "")
        summary = f"dict with {len(value)} key{'s' if len(value) != 1 else ''}: {keys}"
    elif isinstance(value, (list, tuple)):
        summary = f"{kind} of {len(value)} items"
    else:
        summary = f"{kind}: {text[:INLINE]}..."
    if n:
        summary += f" ({n} tensors)"
    return {"key": key, "type": kind, "summary": summary,
            "value": to_json(value, 0, budget) if n == 0 and len(text) <= JSON_INLINE else None,
            "tensors": n}


def _partial(value: dict, budget: _Budget) -> str | None:
    """The first items of a dict that fit in one line, then how many keys it has."""
    parts: list[str] = []
    for k, v in value.items():
        item = f"{render(k, 1, budget)}: {render(v, 1, budget)}"
        if sum(len(p) + 2 for p in parts) + len(item) > INLINE - 16:
            break
        parts.append(item)
    return "{" + ", ".join(parts) + f", ... ({len(value)} keys)}}" if parts else None


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def describe_container(root: Any, candidate_paths: set[str]) -> list[dict[str, Any]]:
    budget, memo = _Budget(), {}
    if not isinstance(root, dict):
        return [describe_value("<root>", root, candidate_paths, budget, memo)]
    rows = []
    top = [k for k, v in root.items() if isinstance(v, TensorRef)]
    if top:
        rows.append({"key": "<top>", "type": "state_dict", "value": None, "tensors": len(top),
                     "summary": f"state dict: {len(top)} tensors at the top level"})
    for key, value in root.items():
        if not isinstance(value, TensorRef):
            name = _scalar_text(key) if type(key) is int else str(key)
            rows.append(describe_value(name, value, candidate_paths, budget, memo))
    return rows


# --- tensors, groups, stats ---------------------------------------------------------------------


def group_tensors(refs: dict[str, TensorRef]) -> list[dict[str, Any]]:
    """Fold names that differ only in layer indices; shape/dtype of the first, and a count."""
    out = []
    for pattern, members in fold_indices(list(refs)):
        first = refs[members[0]]
        out.append({
            "pattern": pattern,
            "count": len(members), "shape": list(first.shape), "dtype": dtype_name(first.dtype),
            "shapes": len({refs[m].shape for m in members}),
            "nbytes": sum(refs[m].nbytes for m in members),
        })
    return out


def _numeric_values(t: torch.Tensor) -> torch.Tensor | str:
    """The values of any tensor kind as a flat tensor that converts to float64, or the reason
    there are none (meta tensors, dtypes without arithmetic: float4 pairs, bits)."""
    if t.is_meta:
        return "n/a: a meta tensor has no values"
    if t.is_nested:
        t = t.values() if t.layout == torch.jagged else torch.cat(
            [c.reshape(-1) for c in t.unbind()])
    elif t.layout == torch.sparse_coo:
        t = t._values()  # the stored values (implicit zeros not counted)
    elif t.layout != torch.strided:
        t = t.values()
    if t.is_quantized:
        t = t.dequantize()
    if t.is_complex():
        t = torch.view_as_real(t.to(torch.complex64) if t.dtype == torch.complex32 else t)
    try:
        t.reshape(-1)[:1].to(torch.float64)
    except (RuntimeError, TypeError, NotImplementedError):
        return f"n/a: {dtype_name(t.dtype)} values have no arithmetic in torch"
    return t.reshape(-1)


def tensor_stats(t: torch.Tensor, chunk: int = CHUNK) -> dict[str, Any]:
    """min/max/mean/std over finite values, NaN/Inf counts and flags, in float64 chunks.

    Tensors without numeric values get ``None`` statistics and the reason in ``"na"``.
    """
    flat = _numeric_values(t)
    if isinstance(flat, str):
        return {"min": None, "max": None, "mean": None, "std": None, "nan": 0, "inf": 0,
                "flags": [], "na": flat}
    nan = inf = count = 0
    mean = m2 = 0.0
    lo, hi = math.inf, -math.inf
    nonzero = False
    for start in range(0, flat.numel(), chunk):
        c = flat[start:start + chunk].to(torch.float64)
        finite = torch.isfinite(c)
        nan += int(torch.isnan(c).sum())
        inf += int(torch.isinf(c).sum())
        nonzero = nonzero or bool((c != 0).any())
        v = c[finite]
        if v.numel():
            n_b, mean_b = v.numel(), float(v.mean())
            m2_b = float(((v - mean_b) ** 2).sum())
            delta, total = mean_b - mean, count + n_b
            mean += delta * n_b / total
            m2 += m2_b + delta * delta * count * n_b / total
            count = total
            lo, hi = min(lo, float(v.min())), max(hi, float(v.max()))
    flags = [f for f, on in (("nan", nan), ("inf", inf), ("all_zero", flat.numel() and not nonzero))
             if on]
    std = math.sqrt(m2 / (count - 1)) if count > 1 else 0.0
    return {"min": _finite(lo, count), "max": _finite(hi, count), "mean": _finite(mean, count),
            "std": _finite(std, count), "nan": nan, "inf": inf, "flags": flags}


def _finite(x: float, count: int) -> float | None:
    """None when there were no finite values or the float64 statistic overflowed."""
    return x if count and math.isfinite(x) else None


def shared_groups(refs: dict[str, TensorRef]) -> list[list[str]]:
    """Names that are the same view of the same storage (stored once in the file)."""
    by_key: dict[Any, list[str]] = {}
    for name, ref in refs.items():
        by_key.setdefault(ref.alias_key(), []).append(name)
    return [names for names in by_key.values() if len(names) > 1]


def provenance(ckpt: Checkpoint) -> tuple[dict[str, Any] | None, dict[str, str]]:
    """What ``torchgraft convert`` recorded: (provenance, aliases) from either file type."""
    meta: dict[str, Any] = dict(ckpt.metadata)
    if isinstance(ckpt.root, dict) and isinstance(ckpt.root.get("__torchgraft__"), dict):
        meta.update({str(k): v for k, v in ckpt.root["__torchgraft__"].items()})
    out: list[Any] = []
    for key in ("torchgraft", "torchgraft.aliases"):
        try:
            out.append(json.loads(meta[key]) if isinstance(meta.get(key), str) else None)
        except ValueError:
            out.append({"unparsable": meta[key]})
    return out[0], out[1] or {}


def inspect_checkpoint(source: Any, *, stats: bool = False, trust: bool = False,
                       progress: bool | None = False) -> dict[str, Any]:
    """Everything ``torchgraft inspect`` shows, as a JSON-safe dict (schema ``inspect/1``).
    ``progress``: a bar on stderr while ``stats`` reads the data (None: on a terminal, for big or
    slow reads; see ``progress.ProgressBar.auto``)."""
    try:
        sd = read(source, trust=trust)
        ckpt, selected = sd.checkpoint, sd.selected
    except SelectError:
        ckpt, selected = open_checkpoint(source, trust=trust), None
    cands = find_candidates(ckpt.root)
    chosen = next((c for c in cands if c.path == selected), None)
    refs = chosen.tensors if chosen else {}
    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    prov, aliases = provenance(ckpt)
    tensors = []
    bar = _stats_bar(refs, path, progress) if stats else None
    try:
        for name, ref in refs.items():
            row: dict[str, Any] = {"name": name, "shape": list(ref.shape),
                                   "dtype": dtype_name(ref.dtype), "nbytes": ref.nbytes}
            if stats:
                row.update(tensor_stats(ref.materialize()))
                if bar:
                    bar.update(ref.nbytes)
            tensors.append(row)
    finally:
        if bar:
            bar.close()
    return {
        "schema": "torchgraft.inspect/1",
        "file": str(path) if path else "<in-memory>",
        "size_bytes": _size(path),
        "format": ckpt.format,
        "container": describe_container(ckpt.root, {c.path for c in cands}),
        "candidates": [{
            "path": c.path, "tensors": len(c.tensors), **element_counts(ckpt.root, c),
            "bytes": sum(r.nbytes for r in c.tensors.values()),
            "dtypes": dict(Counter(dtype_name(r.dtype) for r in c.tensors.values())),
            "ema": c.is_ema, "selected": c.path == selected} for c in cands],
        "selected": selected,
        "tensors": tensors,
        "groups": group_tensors(refs),
        "shared": shared_groups(refs),
        "provenance": prov,
        "aliases": aliases,
        "metadata": {k: v for k, v in ckpt.metadata.items() if not k.startswith("torchgraft")},
        "placeholders": list(ckpt.placeholders),
        "notes": list(ckpt.notes),
        "stats": stats,
    }


def _stats_bar(refs: dict[str, TensorRef], path: Path | None, progress: bool | None) -> Any:
    from .progress import ProgressBar

    if not ProgressBar.wanted(progress):
        return None
    total = sum(r.nbytes for r in refs.values())
    return ProgressBar.auto(total, progress, label=f"stats {path.name if path else ''}".strip())


def element_counts(root: Any, cand: Any) -> dict[str, int | None]:
    """Elements of a state dict, split into parameters and buffers when the file can tell (a
    whole pickled module); otherwise ``parameters`` and ``buffers`` are None: a plain state
    dict does not say which of its tensors are buffers (BatchNorm statistics...)."""
    elements = sum(r.numel for r in cand.tensors.values())
    node = root
    for part in cand.path.split("/") if cand.path else []:
        node = node.get(part) if isinstance(node, dict) else None
    buffers = getattr(node, "buffers", None)
    if not isinstance(buffers, set):
        return {"elements": elements, "parameters": None, "buffers": None}
    in_buffers = sum(r.numel for n, r in cand.tensors.items() if n in buffers)
    return {"elements": elements, "parameters": elements - in_buffers, "buffers": in_buffers}


def _size(path: Path | None) -> int | None:
    if path is None:
        return None
    if path.is_dir():
        return sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    return path.stat().st_size
