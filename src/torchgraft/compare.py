"""Checkpoint-vs-checkpoint comparison (``tg.checkpoint_diff``, what ``torchgraft diff A B``
prints) and did-you-mean suggestions for names that do not match (``suggest``).

Example:
    >>> import torch
    >>> d = checkpoint_diff({"a": torch.ones(2), "b": torch.ones(3)},
    ...                     {"a": torch.zeros(2), "c": torch.ones(3)}, values=True)
    >>> d["removed"][0]["name"], d["added"][0]["name"], d["values"][0]["max_abs_diff"]
    ('b', 'c', 1.0)
    >>> suggest("head.weight", (10, 8), [("head.fc.weight", (10, 8)), ("stem.bias", (8,))])
    [{'name': 'head.fc.weight', 'shape': [10, 8], 'similarity': 0.88}]
"""

from __future__ import annotations

import difflib
import math
from typing import Any

import torch

from .api import read
from .errors import PrefixNotFoundError, SelectError
from .names import Rename, map_names, strip_wrappers
from .report import LoadReport, fold_indices
from .tensors import TensorRef

CUTOFF = 0.5
SHAPE_BONUS = 0.25
NUMEL_BONUS = 0.15
INDEX_PENALTY = 0.3
MAX_POOL = 2000
CHUNK = 1 << 22


def _digits(name: str) -> list[str]:
    return [p for p in name.split(".") if p.isdigit()]


def suggest(name: str, shape: Any, pool: list[tuple[str, Any]], n: int = 3,
            alias: dict[str, str] | None = None) -> list[dict]:
    """Closest names in ``pool`` by difflib similarity; equal shapes and layer indices first.

    Equal shapes add 0.25 to the similarity, equal element counts 0.15, and a different layer
    index (``blocks.0`` vs ``blocks.1``) subtracts 0.3.

    ``alias`` maps a pool name to the name it had after prefix/rename/auto; both are compared.
    """
    sm = difflib.SequenceMatcher(None, autojunk=False)
    sm.set_seq2(name)
    digits = _digits(name)
    scored = []
    for other, other_shape in pool[:MAX_POOL]:
        best = 0.0
        for candidate in {other, strip_wrappers(other), (alias or {}).get(other, other)}:
            sm.set_seq1(candidate)
            if sm.real_quick_ratio() >= CUTOFF and sm.quick_ratio() >= CUTOFF:
                best = max(best, sm.ratio())
        if best >= CUTOFF:
            score = best + _shape_bonus(shape, other_shape)
            score -= INDEX_PENALTY if _digits(other) != digits and \
                _digits((alias or {}).get(other, other)) != digits else 0.0
            scored.append((score, other, other_shape, best))
    scored.sort(key=lambda s: (-s[0], s[1]))
    return [{"name": o, "shape": list(s) if s is not None else None, "similarity": round(r, 2)}
            for _, o, s, r in scored[:n]]


def _shape_bonus(a: Any, b: Any) -> float:
    """Equal shapes count most; equal element counts (a reshape away) count some."""
    if a is None or b is None:
        return 0.0
    if tuple(a) == tuple(b):
        return SHAPE_BONUS
    return NUMEL_BONUS if math.prod(a) == math.prod(b) else 0.0


def mapped_names(report: LoadReport) -> dict[str, str]:
    """Checkpoint name -> the name it had after prefix/rename/auto, as the plan mapped it."""
    opts = report.options
    src = {e.source: e.source_shape for e in report.entries
           if e.source and e.source_shape is not None and not e.reason.startswith("tied to")}
    model = {e.target: e.target_shape for e in report.entries if e.target and e.target_shape}
    try:
        return map_names(src, model, prefix=opts.get("prefix"), rename=opts.get("rename"),
                         auto=opts.get("auto", True)).target
    except Exception:  # e.g. a rename given as a function: fall back to raw names
        return {}


def plan_suggestions(report: LoadReport) -> dict[str, dict[str, list[dict]]]:
    """Did-you-mean for every missing model name and every unexpected checkpoint name."""
    missing = [(e.target, e.target_shape) for e in report.entries if e.action == "missing"]
    unexpected = [(e.source, e.source_shape) for e in report.entries if e.action == "unexpected"]
    mapped = mapped_names(report)
    return {
        "missing": {n: suggest(n, s, unexpected, alias=mapped)
                    for n, s in missing[:MAX_POOL] if unexpected},
        "unexpected": {n: suggest(mapped.get(n, n), s, missing)
                       for n, s in unexpected[:MAX_POOL] if missing},
    }


def fold(names: list[str]) -> list[tuple[str, list[str]]]:
    """Group names that differ only in layer indices: ``[(pattern, members)]``, in order."""
    return fold_indices(names)


def renamed(report: LoadReport) -> list[dict[str, str]]:
    """Entries loaded under another name, with the rule that renamed them."""
    return [{"source": e.source, "target": e.target, "reason": e.reason} for e in report.entries
            if e.action in ("copied", "cast") and e.source and e.target and e.source != e.target
            and not e.reason.startswith("tied to")]


# --- checkpoint vs checkpoint -------------------------------------------------------------------


def _read(source: Any, select: str | None, trust: bool, notes: list[str], label: str):
    try:
        return read(source, select, trust=trust)
    except SelectError:
        if select is None:
            raise
        notes.append(f"{label}: has no {select!r}; compared what tg.read selects")
        return read(source, None, trust=trust)


def _names(refs: dict[str, TensorRef], other: dict[str, tuple] | None, prefix: str | None,
           rename: Rename, auto: bool, notes: list[str], label: str) -> tuple[dict, list[str]]:
    shapes = {n: r.shape for n, r in refs.items()}
    try:
        nm = map_names(shapes, other, prefix=prefix, rename=rename, auto=auto)
    except PrefixNotFoundError:
        notes.append(f"{label}: no name under prefix {prefix!r}; compared as is")
        nm = map_names(shapes, other, prefix=None, rename=rename, auto=auto)
    return {nm.target[s]: s for s in refs if s in nm.target}, [f"{label}: {r}" for r in nm.rules]


def value_diff(a: torch.Tensor, b: torch.Tensor, chunk: int = CHUNK) -> dict[str, Any]:
    """Max |a-b| over elements (float64, chunked) and how many elements differ."""
    if a.is_complex():
        a = torch.view_as_real(a)
    if b.is_complex():
        b = torch.view_as_real(b)
    fa, fb = a.reshape(-1), b.reshape(-1)
    worst, differing, finite = 0.0, 0, True
    for i in range(0, fa.numel(), chunk):
        x, y = fa[i:i + chunk].to(torch.float64), fb[i:i + chunk].to(torch.float64)
        same = (x == y) | (torch.isnan(x) & torch.isnan(y))
        differing += int((~same).sum())
        d = torch.where(same, torch.zeros_like(x), (x - y).abs())
        if bool((~torch.isfinite(d)).any()):
            finite = False
            d = d[torch.isfinite(d)]
        if d.numel():
            worst = max(worst, float(d.max()))
    return {"max_abs_diff": worst if finite else None, "differing": differing,
            "numel": fa.numel()}


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    u8 = lambda t: t.contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(u8(a), u8(b))


def checkpoint_diff(a: Any, b: Any, *, select: str | None = None, prefix: str | None = None,
                    rename: Rename = None, auto: bool = True, trust: bool = False,
                    values: bool = False, progress: bool | None = False) -> dict[str, Any]:
    """Added/removed/changed tensors between two sources (and, with ``values``, values).
    ``progress``: a bar on stderr while ``values`` reads the data (None: auto, on a terminal)."""
    notes: list[str] = []
    sa = _read(a, select, trust, notes, "A")
    sb = _read(b, select, trust, notes, "B")
    b_map, b_rules = _names(sb.refs, None, prefix, rename, False, notes, "B")
    b_shapes = {n: sb.refs[s].shape for n, s in b_map.items()}
    a_map, a_rules = _names(sa.refs, b_shapes, prefix, rename, auto, notes, "A")
    row = lambda n, ref: {"name": n, "shape": list(ref.shape),  # noqa: E731
                          "dtype": str(ref.dtype).replace("torch.", "")}
    removed = [row(n, sa.refs[s]) for n, s in a_map.items() if n not in b_map]
    added = [row(n, sb.refs[s]) for n, s in b_map.items() if n not in a_map]
    changed, diffs, same = [], [], 0
    pairs = [(name, sa.refs[s], sb.refs[b_map[name]]) for name, s in a_map.items()
             if name in b_map]
    bar = _values_bar(pairs, progress) if values else None
    try:
        for name, ra, rb in pairs:
            same += _compare(name, ra, rb, values, changed, diffs)
            if bar and ra.shape == rb.shape:
                bar.update(ra.nbytes + rb.nbytes)
    finally:
        if bar:
            bar.close()
    identical = not (removed or added or changed or diffs)
    return {"kind": "checkpoints", "identical": identical,
            "a": {"source": _label(a), "format": sa.format, "selected": sa.selected,
                  "tensors": len(sa)},
            "b": {"source": _label(b), "format": sb.format, "selected": sb.selected,
                  "tensors": len(sb)},
            "rules": a_rules + b_rules, "notes": notes, "removed": removed, "added": added,
            "changed": changed, "values": diffs if values else None, "same": same,
            "values_compared": values}


def _dtype(ref: TensorRef) -> str:
    return str(ref.dtype).replace("torch.", "")


def _compare(name: str, ra: TensorRef, rb: TensorRef, values: bool, changed: list[dict],
             diffs: list[dict]) -> int:
    """Append ``name`` to ``changed`` or ``diffs`` when it differs; 1 when it is the same."""
    if ra.shape != rb.shape or ra.dtype != rb.dtype:
        entry: dict[str, Any] = {"name": name, "a_shape": list(ra.shape),
                                 "b_shape": list(rb.shape), "a_dtype": _dtype(ra),
                                 "b_dtype": _dtype(rb)}
        if values and ra.shape == rb.shape:
            entry.update(value_diff(ra.materialize(), rb.materialize()))
        changed.append(entry)
        return 0
    if values:
        ta, tb = ra.materialize(), rb.materialize()
        if not _bits_equal(ta, tb):
            diffs.append({"name": name, **value_diff(ta, tb)})
            return 0
    return 1


def _values_bar(pairs: list[tuple[str, TensorRef, TensorRef]], progress: bool | None) -> Any:
    from .progress import ProgressBar

    if not ProgressBar.wanted(progress):
        return None
    total = sum(ra.nbytes + rb.nbytes for _, ra, rb in pairs if ra.shape == rb.shape)
    return ProgressBar.auto(total, progress, label="diff --values")


def _label(source: Any) -> str:
    return str(source) if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__") \
        else type(source).__name__
