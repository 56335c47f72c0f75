"""``torchgraft diff A B``: compare a checkpoint with a model, or two checkpoints.

A and B are each a checkpoint path or a model spec (``timm:NAME``, ``transformers:CLASS...``,
``package.module:callable``, see 'model specs' below; an existing path always counts as a
checkpoint). Options: ``--json``,
``--values``, ``--min-loaded F``, ``--kwargs JSON`` and ``--select --prefix --rename --no-auto
--mismatch --strict --trust``.

* Checkpoint vs model (either order): the load plan exactly as ``tg.plan`` makes it: copied,
  renamed (and by which rule), cast, shape mismatches with both shapes, missing and unexpected,
  grouped, with "did you mean" for every unmatched name (closest names on the other side by
  similarity, equal shapes first). Exit 0 when the plan would load, 1 when it would fail, when
  less than ``--min-loaded`` of the model's elements would be loaded (as ``check``), or when
  ``auto`` refuses to guess between several renamings (AmbiguousRenameError). A load below
  half of the model (``report.LOW_LOAD_WARNING``) is called partial, with a warning line, never
  "would succeed".
* Checkpoint vs checkpoint: tensors only in A (removed), only in B (added), with another shape
  or dtype (changed); with ``--values`` also tensors whose values differ (max abs difference,
  compared one tensor at a time). Mapping options apply to both sides; auto-reconciliation maps
  A's names onto B's. Exit 0 when there is no difference, 1 otherwise.

JSON schema (``--json``), ``"schema": "torchgraft.diff/1"``, ``kind`` tells which::

    # kind "plan"
    {"schema": "torchgraft.diff/1", "kind": "plan", "ok": bool, "exit_code": 0 | 1,
     "checkpoint": str, "model": str,
     "loaded_fraction": float, "min_loaded": float | null,
     "warnings": [str],                     # e.g. a partial load below LOW_LOAD_WARNING
     "error": str | null,                   # why tg.load would fail (also an ambiguous auto)
     "renamed": [{"source": str, "target": str, "reason": str}],
     "suggestions": {"missing": {model_name: [{"name": str, "shape": [int] | null,
                                               "similarity": float}]},
                     "unexpected": {checkpoint_name: [...same...]}},
     "report": <LoadReport.to_dict()> | null}   # null when auto refused to guess
    # kind "checkpoints"
    {"schema": "torchgraft.diff/1", "kind": "checkpoints", "identical": bool,
     "exit_code": 0 | 1,
     "a": {"source": str, "format": str, "selected": str, "tensors": int}, "b": {...},
     "rules": [str], "notes": [str],
     "removed": [{"name", "shape", "dtype"}], "added": [{"name", "shape", "dtype"}],
     "changed": [{"name", "a_shape", "b_shape", "a_dtype", "b_dtype",
                  # with --values and equal shapes:
                  "max_abs_diff": float | null, "differing": int, "numel": int}],
     "values": [{"name", "max_abs_diff": float | null, "differing": int, "numel": int}] | null,
     "same": int, "values_compared": bool}

``max_abs_diff`` is null when the difference is not finite (Inf or NaN on one side only).

Example:
    $ torchgraft diff epoch_100.pth timm:convnext_tiny --prefix backbone
    $ torchgraft diff a.safetensors b.safetensors --values
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..api import plan
from ..compare import checkpoint_diff, fold, plan_suggestions, renamed
from ..errors import AmbiguousRenameError
from ..report import LOW_LOAD_WARNING, fmt_fraction, group_names
from .check import _fraction
from .common import (
    CliError,
    Style,
    add_mapping_options,
    add_model_kwargs,
    command_help,
    fmt_shape,
    mapping_kwargs,
    parse_kwargs,
    print_json,
    progress_of,
    table,
    terminal_lines,
)
from .specs import build_model, looks_like_spec

MAX_LINES = 12


def add_parser(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("diff", parents=[parent], help="compare a checkpoint with a model or "
                       "another checkpoint", **command_help(sys.modules[__name__], spec=True))
    p.add_argument("a", metavar="A", help="checkpoint path (or hf:// id, URL) or model spec "
                   "(see 'model specs' below)")
    p.add_argument("b", metavar="B", help="checkpoint path or model spec, as A")
    p.add_argument("--values", action="store_true",
                   help="checkpoint vs checkpoint: also compare values")
    p.add_argument("--min-loaded", metavar="F", type=_fraction, default=None,
                   help="checkpoint vs model: exit 1 when less than this fraction of the "
                   "model's elements would be loaded (as check)")
    add_model_kwargs(p)
    add_mapping_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    options = mapping_kwargs(args)
    kwargs = parse_kwargs(args.kwargs)
    a_spec, b_spec = looks_like_spec(args.a), looks_like_spec(args.b)
    st = Style(sys.stdout)
    if a_spec != b_spec:
        spec, ckpt = (args.a, args.b) if a_spec else (args.b, args.a)
        model = build_model(spec, kwargs)
        try:
            report = plan(model, ckpt, **options)
        except AmbiguousRenameError as err:
            out, lines = _ambiguous(ckpt, spec, args.min_loaded, err, st)
        else:
            out = _plan_out(report, ckpt, spec, args.min_loaded)
            lines = _plan_text(out, report, st)
    else:
        if args.values and a_spec:
            raise CliError("--values compares two checkpoints; A and B are model specs")
        if args.min_loaded is not None:
            raise CliError("--min-loaded applies to a checkpoint vs a model; A and B are both "
                           + ("model specs" if a_spec else "checkpoints"))
        a = build_model(args.a, kwargs) if a_spec else args.a
        b = build_model(args.b, kwargs) if b_spec else args.b
        d = checkpoint_diff(a, b, select=options["select"], prefix=options["prefix"],
                            rename=options["rename"], auto=options["auto"],
                            trust=options["trust"], values=args.values,
                            progress=progress_of(args))
        d["a"]["source"], d["b"]["source"] = args.a, args.b
        out = {"schema": "torchgraft.diff/1", **d, "exit_code": 0 if d["identical"] else 1}
        lines = _ckpt_text(d, st)
    if args.json:
        print_json(out)
    else:
        sys.stdout.write(terminal_lines(lines, st))  # names from files: no terminal control
    return out["exit_code"]


def _plan_out(report: Any, ckpt: str, spec: str, min_loaded: float | None) -> dict[str, Any]:
    frac = report.loaded_fraction
    below = min_loaded is not None and frac < min_loaded
    warnings = []
    if report.ok and frac < LOW_LOAD_WARNING:
        warnings.append(f"only {fmt_fraction(frac)} of the model's elements would be loaded "
                        f"(below {LOW_LOAD_WARNING:.0%}): a partial load; tg.load warns, and "
                        "min_loaded= / --min-loaded make it an error")
    error = report.error
    if report.ok and below:
        error = (f"only {fmt_fraction(frac)} of the model's elements would be loaded; "
                 f"--min-loaded is {fmt_fraction(min_loaded)}")
    ok = report.ok and not below
    return {"schema": "torchgraft.diff/1", "kind": "plan", "ok": ok, "exit_code": 0 if ok else 1,
            "checkpoint": ckpt, "model": spec, "loaded_fraction": frac,
            "min_loaded": min_loaded, "warnings": warnings, "error": error,
            "renamed": renamed(report), "suggestions": plan_suggestions(report),
            "report": report.to_dict()}


def _ambiguous(ckpt: str, spec: str, min_loaded: float | None, err: AmbiguousRenameError,
               st: Style) -> tuple[dict[str, Any], list[str]]:
    out = {"schema": "torchgraft.diff/1", "kind": "plan", "ok": False, "exit_code": 1,
           "checkpoint": ckpt, "model": spec, "loaded_fraction": 0.0, "min_loaded": min_loaded,
           "warnings": [], "error": str(err), "renamed": [],
           "suggestions": {"missing": {}, "unexpected": {}}, "report": None}
    lines = [st.bold(f"plan: {ckpt} -> {spec}")]
    text = str(err).splitlines()
    lines.append(st.red(f"=> tg.load would FAIL: {text[0]}"))
    lines += [f"   {line.strip()}" for line in text[1:] if line.strip()]
    return out, lines


def _grouped(names: list[str], suffix: str = "") -> list[str]:
    groups = group_names(names)
    lines = [f"    {g}{suffix}" for g in groups[:MAX_LINES]]
    if len(groups) > MAX_LINES:
        lines.append(f"    ... and {len(groups) - MAX_LINES} more groups (--json lists all)")
    return lines


def _unmatched(title: str, entries: list, shape_of: Any, name_of: Any,
               sugg: dict[str, list[dict]], st: Style) -> list[str]:
    """One line per group of names that differ only in layer index, with a did-you-mean."""
    if not entries:
        return []
    shapes = {name_of(e): shape_of(e) for e in entries}
    rows = []
    groups = fold(list(shapes))
    for pattern, members in groups[:MAX_LINES]:
        first = members[0]
        hints = sugg.get(first, [])
        close = [h for h in hints[1:2] if h["similarity"] >= hints[0]["similarity"] - 0.05
                 and h["shape"] == hints[0]["shape"]]
        hint = ("did you mean " + " or ".join(f"{h['name']} {fmt_shape(h['shape'])}"
                                               for h in hints[:1] + close) + "?") if hints else ""
        count = f"x{len(members)}" if len(members) > 1 else ""
        rows.append([pattern, count, fmt_shape(shapes[first]), hint])
    lines = [st.yellow(f"  {title} ({len(entries)}):")] + table(rows, indent=4)
    if len(groups) > MAX_LINES:
        lines.append(f"    ... and {len(groups) - MAX_LINES} more groups (--json lists all)")
    return lines


def _plan_text(out: dict[str, Any], r: Any, st: Style) -> list[str]:
    c = r.counts
    n_model = sum(1 for e in r.entries if e.target is not None)
    if not r.entries and r.error:  # refused while planning, before any tensor was paired
        return [st.bold(f"plan: {out['checkpoint']} -> {out['model']}")] + [
            st.red(("=> tg.load would FAIL: " if i == 0 else "   ") + line)
            for i, line in enumerate(str(r.error).splitlines())]
    lines = [st.bold(f"plan: {out['checkpoint']} [{r.format}, '{r.selected or '<top>'}'] "
                     f"-> {out['model']}"),
             f"  would load {fmt_fraction(r.loaded_fraction)} of model elements "
             f"({c['copied'] + c['cast'] + c['adapted']}/{n_model} tensors"
             + (f"; {fmt_fraction(r.adapted_fraction)} of elements adapted" if c["adapted"]
                else "") + ")"]
    lines += [f"  rule: {rule}" for rule in r.rules]
    lines += [f"  note: {note}" for note in r.notes]
    plain = [e.target for e in r.entries if e.action == "copied" and e.source == e.target]
    if plain:
        lines.append(st.green(f"  copied as is ({len(plain)}):"))
        lines += _grouped(plain)
    by_rule: dict[str, list[dict]] = {}
    for item in out["renamed"]:
        by_rule.setdefault(item["reason"], []).append(item)
    for reason, items in by_rule.items():
        lines.append(st.green(f"  renamed ({len(items)}) by {reason or 'rule'}:"))
        lines += [f"    {i['source']} -> {i['target']}" for i in items[:3]]
        if len(items) > 3:
            lines.append(f"    ... and {len(items) - 3} more")
    tied = [e for e in r.by_action("copied") if e.reason.startswith("tied to")]
    if tied:
        lines.append(st.green(f"  tied ({len(tied)}), filled through the tensor they share:"))
        lines += [f"    {e.target}: {e.reason}" for e in tied[:MAX_LINES]]
    casts = r.by_action("cast")
    if casts:
        lines.append(f"  cast ({len(casts)}):")
        by_cast: dict[str, list[str]] = {}
        for e in casts:
            by_cast.setdefault(e.reason.split(";")[0], []).append(e.target)
        for kind, names in by_cast.items():
            lines += _grouped(names, f"  ({kind})")
    adapted = r.by_action("adapted")
    if adapted:
        lines.append(st.green(f"  adapted ({len(adapted)}), computed from the checkpoint's "
                              "tensor:"))
        lines += table([[e.target, f"{fmt_shape(e.source_shape)} -> {fmt_shape(e.target_shape)}",
                         e.reason] for e in adapted[:MAX_LINES]], indent=4)
    kept = r.by_action("kept")
    if kept:
        lines.append(f"  kept, the model's own value ({len(kept)}):")
        by_why: dict[str, list[str]] = {}
        for e in kept:
            by_why.setdefault(e.reason, []).append(e.target or "?")
        for reason, names in list(by_why.items())[:4]:
            lines += _grouped(names, f"  ({reason})")[:4]
    mism = r.mismatched
    if mism:
        lines.append(st.red(f"  shape mismatch ({len(mism)}):"))
        lines += table([[e.target, f"checkpoint {fmt_shape(e.source_shape)}",
                         f"model {fmt_shape(e.target_shape)}"] for e in mism[:MAX_LINES * 2]],
                       indent=4)
    other = [e for e in r.by_action("skipped") if e not in mism]
    if other:
        lines.append(f"  skipped ({len(other)}):")
        by_reason: dict[str, list[str]] = {}
        for e in other:
            by_reason.setdefault(e.reason, []).append(e.source or e.target or "?")
        for reason, names in list(by_reason.items())[:4]:
            lines += _grouped(names, f"  ({reason})")[:4]
    sugg = out["suggestions"]
    lines += _unmatched("missing in checkpoint, the model keeps its own values",
                        r.by_action("missing"), lambda e: e.target_shape, lambda e: e.target,
                        sugg["missing"], st)
    lines += _unmatched("unexpected, not in the model", r.by_action("unexpected"),
                        lambda e: e.source_shape, lambda e: e.source, sugg["unexpected"], st)
    if r.placeholders:
        lines.append(f"  not executed: the file references {', '.join(r.placeholders[:6])}")
    frac = fmt_fraction(r.loaded_fraction)
    lines += [st.yellow(f"  warning: {w}") for w in out["warnings"]]
    if not out["ok"]:
        error = (out["error"] or "").splitlines() or [""]
        lines.append(st.red(f"=> tg.load would FAIL: {error[0]}"))
        lines += [f"   {line.strip()}" for line in error[1:8] if line.strip()]
    elif r.loaded_fraction >= 1.0:
        lines.append(st.green("=> tg.load would succeed with these options"))
    elif out["warnings"]:
        lines.append(st.yellow(f"=> tg.load would load only {frac} of the model: a partial "
                               f"load ({c['missing']} missing tensors keep their values)"))
    else:
        lines.append(st.yellow(f"=> tg.load would succeed, loading {frac} of the model "
                               f"({c['missing']} missing tensors keep their values)"))
    return lines


def _ckpt_text(d: dict[str, Any], st: Style) -> list[str]:
    lines = []
    for side in ("a", "b"):
        s = d[side]
        lines.append(f"{side.upper()}: {s['source']} [{s['format']}, "
                     f"'{s['selected'] or '<top>'}'] {s['tensors']} tensors")
    lines += [f"  rule: {rule}" for rule in d["rules"]]
    lines += [f"  note: {note}" for note in d["notes"]]
    for key, title in (("removed", "only in A"), ("added", "only in B")):
        if d[key]:
            lines.append(st.yellow(f"  {title} ({len(d[key])}):"))
            rows = [[t["name"], fmt_shape(t["shape"]), t["dtype"]] for t in d[key][:MAX_LINES]]
            lines += table(rows, indent=4) + _more(d[key])
    if d["changed"]:
        lines.append(st.yellow(f"  changed shape or dtype ({len(d['changed'])}):"))
        rows = [[c["name"], f"{fmt_shape(c['a_shape'])} {c['a_dtype']}",
                 f"-> {fmt_shape(c['b_shape'])} {c['b_dtype']}", _maxdiff(c)]
                for c in d["changed"][:MAX_LINES]]
        lines += table(rows, indent=4) + _more(d["changed"])
    if d["values"]:
        lines.append(st.yellow(f"  values differ ({len(d['values'])}):"))
        rows = [[v["name"], _maxdiff(v), f"{v['differing']}/{v['numel']} elements differ"]
                for v in d["values"][:MAX_LINES]]
        lines += table(rows, indent=4) + _more(d["values"])
    what = "names, shapes, dtypes" + (" and values" if d["values_compared"] else "")
    lines.append(f"  same {what}: {d['same']} tensors")
    if d["identical"]:
        lines.append(st.green(f"=> identical ({what})"))
    else:
        lines.append(st.red("=> the checkpoints differ"))
    return lines


def _more(items: list) -> list[str]:
    extra = len(items) - MAX_LINES
    return [f"    ... and {extra} more (--json lists all)"] if extra > 0 else []


def _maxdiff(c: dict[str, Any]) -> str:
    if "max_abs_diff" not in c:
        return ""
    v = c["max_abs_diff"]
    return "max |a-b| not finite" if v is None else f"max |a-b| {v:.3g}"
