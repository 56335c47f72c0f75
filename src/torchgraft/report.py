"""The report stage: what happened to every tensor, readable at a glance and as JSON.

Example:
    >>> group_names(["blocks.0.attn.weight", "blocks.1.attn.weight", "head.weight", "head.bias"])
    ['blocks.{0..1}.attn.weight', 'head.{bias,weight}']
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

ACTIONS = ("copied", "cast", "adapted", "skipped", "missing", "unexpected")


@dataclass(slots=True)
class Entry:
    """One model tensor or one unused checkpoint tensor."""

    target: str | None
    source: str | None
    action: str
    source_shape: tuple[int, ...] | None = None
    target_shape: tuple[int, ...] | None = None
    source_dtype: str | None = None
    target_dtype: str | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("source_shape", "target_shape"):
            if d[key] is not None:
                d[key] = list(d[key])
        return d


@dataclass
class LoadReport:
    """The full account of a load (or of a dry-run plan).

    ``missing_keys`` / ``unexpected_keys`` mean what they mean in torch's ``_IncompatibleKeys``;
    ``entries`` has one :class:`Entry` per model tensor and per unused checkpoint tensor.
    """

    entries: list[Entry] = field(default_factory=list)
    selected: str = ""
    source: str = ""
    format: str = ""
    rules: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    alternatives: list[dict[str, Any]] = field(default_factory=list)
    placeholders: list[str] = field(default_factory=list)
    loaded_fraction: float = 0.0  # of the model's elements: copied, cast or adapted
    adapted_fraction: float = 0.0  # of the model's elements: computed by an adapter or hook
    ok: bool = True
    applied: bool = False
    error: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] | None = None  # hub id/revision/commit or URL, sha256 (sources)

    # torch-compatible views ------------------------------------------------------------------
    @property
    def missing_keys(self) -> list[str]:
        return [e.target for e in self.entries if e.action == "missing" and e.target]

    @property
    def unexpected_keys(self) -> list[str]:
        return [e.source for e in self.entries if e.action == "unexpected" and e.source]

    @property
    def mismatched(self) -> list[Entry]:
        return [e for e in self.entries if e.action == "skipped" and e.target is not None
                and e.source_shape != e.target_shape]

    def by_action(self, action: str) -> list[Entry]:
        return [e for e in self.entries if e.action == action]

    @property
    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(ACTIONS, 0)
        for e in self.entries:
            out[e.action] = out.get(e.action, 0) + 1
        return out

    def __iter__(self):  # ``missing, unexpected = report`` works as with torch
        return iter((self.missing_keys, self.unexpected_keys))

    # machine-readable ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "applied": self.applied,
            "error": self.error,
            "source": self.source,
            "format": self.format,
            "selected": self.selected,
            "loaded_fraction": self.loaded_fraction,
            "adapted_fraction": self.adapted_fraction,
            "counts": self.counts,
            "rules": list(self.rules),
            "notes": list(self.notes),
            "alternatives": list(self.alternatives),
            "placeholders": list(self.placeholders),
            "missing_keys": self.missing_keys,
            "unexpected_keys": self.unexpected_keys,
            "mismatched": [e.to_dict() for e in self.mismatched],
            "entries": [e.to_dict() for e in self.entries],
            "options": self.options,
            "provenance": self.provenance,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    # human-readable --------------------------------------------------------------------------
    def __str__(self) -> str:
        return format_report(self)

    def __repr__(self) -> str:
        c = self.counts
        return (f"<LoadReport ok={self.ok} loaded={self.loaded_fraction:.1%} copied={c['copied']} "
                f"cast={c['cast']} skipped={c['skipped']} missing={c['missing']} "
                f"unexpected={c['unexpected']}>")


# --- name grouping -------------------------------------------------------------------------


def _render_numbers(values: list[int]) -> str:
    vals = sorted(set(values))
    if len(vals) == 1:
        return str(vals[0])
    if vals == list(range(vals[0], vals[-1] + 1)):
        return f"{{{vals[0]}..{vals[-1]}}}"
    return "{" + ",".join(map(str, vals)) + "}"


def fold_indices(names: list[str]) -> list[tuple[str, list[str]]]:
    """Group names that differ only in layer indices: ``[(pattern, members)]``, in order.

    Example:
        >>> fold_indices(["a.0.w", "a.1.w", "b"])
        [('a.{0..1}.w', ['a.0.w', 'a.1.w']), ('b', ['b'])]
    """
    by_shape: OrderedDict[tuple, list[str]] = OrderedDict()
    for name in names:
        key = tuple("#" if p.isdigit() else p for p in name.split("."))
        by_shape.setdefault(key, []).append(name)
    out = []
    for key, members in by_shape.items():
        parts = [m.split(".") for m in members]
        rendered = [_render_numbers([int(m[i]) for m in parts]) if part == "#" else part
                    for i, part in enumerate(key)]
        out.append((".".join(rendered), members))
    return out


def group_names(names: list[str]) -> list[str]:
    """Fold layer indices (``blocks.{0..11}.x``) and sibling leaves (``mod.{bias,weight}``)."""
    folded = [pattern for pattern, _ in fold_indices(names)]
    by_parent: OrderedDict[str, list[str]] = OrderedDict()
    for pattern in folded:
        parent, _, leaf = pattern.rpartition(".")
        by_parent.setdefault(parent, []).append(leaf)
    result = []
    for parent, leaves in by_parent.items():
        if len(leaves) == 1:
            result.append(f"{parent}.{leaves[0]}" if parent else leaves[0])
        else:
            joined = "{" + ",".join(sorted(leaves)) + "}"
            result.append(f"{parent}.{joined}" if parent else joined)
    return result


# --- the summary ----------------------------------------------------------------------------

MAX_GROUP_LINES = 6

#: Below this fraction of the model's elements a load is called partial: ``tg.load`` warns and
#: ``torchgraft diff`` prints a warning line (``min_loaded=`` / ``--min-loaded`` make it an error).
LOW_LOAD_WARNING = 0.9


def _shape(s: tuple[int, ...] | None) -> str:
    return "-" if s is None else "[" + ", ".join(map(str, s)) + "]"


def _section(title: str, entries: list[Entry], lines: list[str], detail: bool = False) -> None:
    if not entries:
        return
    lines.append(f"  {title} ({len(entries)}):")
    if detail:
        for e in entries[:MAX_GROUP_LINES]:
            name = e.target or e.source
            lines.append(f"    {name}: checkpoint {_shape(e.source_shape)} vs model "
                         f"{_shape(e.target_shape)}" if e.target and e.source
                         else f"    {name}: {e.reason}")
        if len(entries) > MAX_GROUP_LINES:
            lines.append(f"    ... and {len(entries) - MAX_GROUP_LINES} more")
        return
    by_reason: OrderedDict[str, list[str]] = OrderedDict()
    for e in entries:
        by_reason.setdefault(e.reason, []).append(e.target or e.source or "?")
    shown = 0
    for reason, names in by_reason.items():
        groups = group_names(names)
        suffix = f"  ({reason})" if reason else ""
        for g in groups:
            if shown >= MAX_GROUP_LINES:
                break
            lines.append(f"    {g}{suffix}")
            shown += 1
    total = sum(len(group_names(n)) for n in by_reason.values())
    if total > shown:
        lines.append(f"    ... and {total - shown} more groups (report.to_dict() lists all)")


def _adapted_part(r: LoadReport) -> str:
    if not r.adapted_fraction:
        return ""
    return f"; {_pct(r.adapted_fraction)} of elements adapted, not copied"


def format_report(r: LoadReport) -> str:
    """The summary ``str(report)`` prints: counts first, then every non-copied group."""
    c = r.counts
    n_model = sum(1 for e in r.entries if e.target is not None)
    loaded = c["copied"] + c["cast"] + c["adapted"]
    verb = "loaded" if r.applied else "would load"
    where = f" from {r.source}" if r.source else ""
    fmt = f" [{r.format}]" if r.format else ""
    sel = f", selected '{r.selected}'" if r.selected else ""
    lines = [
        f"torchgraft: {verb} {_pct(r.loaded_fraction)} of model elements "
        f"({loaded}/{n_model} tensors{_adapted_part(r)}){where}{fmt}{sel}",
        f"  copied {c['copied']} · cast {c['cast']} · "
        + (f"adapted {c['adapted']} · " if c["adapted"] else "")
        + f"skipped {c['skipped']} · "
        f"missing {c['missing']} · unexpected {c['unexpected']}"
        + (f" · kept {c['kept']}" if c.get("kept") else ""),
    ]
    for rule in r.rules:
        lines.append(f"  rule: {rule}")
    for alt in r.alternatives[:3]:
        tag = " (EMA copy)" if alt.get("ema") else ""
        fit = alt.get("matched")
        fit_s = f", fits {fit} tensors" if fit is not None else ""
        lines.append(f"  also in file: '{alt['path']}'{tag}: {alt['tensors']} tensors{fit_s}")
    for note in r.notes:
        lines.append(f"  note: {note}")
    casts = r.by_action("cast")
    if casts:
        kinds = OrderedDict.fromkeys(e.reason for e in casts)
        lines.append(f"  cast ({len(casts)}): " + "; ".join(kinds))
    adapted = r.by_action("adapted")
    if adapted:
        lines.append(f"  adapted ({len(adapted)}):")
        for e in adapted[:MAX_GROUP_LINES]:
            lines.append(f"    {e.target}: {_shape(e.source_shape)} -> {_shape(e.target_shape)}"
                         f"  ({e.reason})")
        if len(adapted) > MAX_GROUP_LINES:
            lines.append(f"    ... and {len(adapted) - MAX_GROUP_LINES} more")
    mism = r.mismatched
    _section("skipped, shape mismatch", mism, lines, detail=True)
    other_skips = [e for e in r.by_action("skipped") if e not in mism]
    _section("skipped", other_skips, lines)
    _section("missing, model keeps its own values", r.by_action("missing"), lines)
    _section("kept, the model's own value (its loading code or an adapter says so)",
             r.by_action("kept"), lines)
    _section("unexpected, not used", r.by_action("unexpected"), lines)
    if r.placeholders:
        names = ", ".join(r.placeholders[:6]) + (" ..." if len(r.placeholders) > 6 else "")
        verb = "it was" if len(r.placeholders) == 1 else "they were"
        lines.append(f"  not executed: the file references {names}; {verb} not run")
    if r.error:
        lines.append(f"  FAILED: {error_summary(r.error)}")
    return "\n".join(lines)


def error_summary(error: str, limit: int = 3) -> str:
    """An error message on one line: its first line and, when that ends in a colon (a list
    follows), the first ``limit`` items of the list, so the line never ends in ``:``."""
    raw = [ln for ln in str(error).splitlines() if ln.strip()]
    if not raw:
        return "the load would fail"
    head = raw[0].strip()
    if not head.endswith(":"):
        return head
    items = []
    for ln in raw[1:]:
        if not ln[:1].isspace():
            break
        items.append(ln.strip())
    if not items:
        return head[:-1]
    more = len(items) - limit
    return f"{head} {'; '.join(items[:limit])}" + (f"; ... ({more} more)" if more > 0 else "")


def fmt_fraction(frac: float) -> str:
    """``100%`` only when everything loaded, ``0%`` only when nothing did: never rounds up to
    100 nor down to 0 (``<0.01%``)."""
    if frac >= 1.0:
        return "100%"
    if frac <= 0.0:
        return "0%"
    if frac < 0.0001:
        return "<0.01%"
    return f"{min(frac * 100, 99.99):.2f}%"


_pct = fmt_fraction
