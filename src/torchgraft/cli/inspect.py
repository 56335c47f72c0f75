"""``torchgraft inspect FILE [--stats] [--json]``: what is in a checkpoint, without loading it.

Without ``--stats`` no tensor data is read (only the container structure and headers).

JSON schema (``--json``), ``"schema": "torchgraft.inspect/1"``::

    {"schema": "torchgraft.inspect/1",
     "file": str, "size_bytes": int | null, "format": str,        # e.g. "torch-zip"
     "container": [{"key": str, "type": str, "summary": str,      # one row per top-level key
                    "value": <JSON value when it holds no tensors and is small> | null,
                    "tensors": int}],
     "candidates": [{"path": str, "tensors": int, "elements": int, "bytes": int,
                     "parameters": int | null, "buffers": int | null,  # elements in each;
                     # null when the file cannot tell (a plain state dict): a whole pickled
                     # module can
                     "dtypes": {dtype: count}, "ema": bool, "selected": bool}],
     "selected": str | null,                                      # what tg.read picks
     "tensors": [{"name": str, "shape": [int], "dtype": str, "nbytes": int,
                  # with --stats only:
                  "min": float|null, "max": float|null, "mean": float|null, "std": float|null,
                  "nan": int, "inf": int, "flags": ["nan" | "inf" | "all_zero"]}],
     "groups": [{"pattern": str, "count": int, "shape": [int], "dtype": str,
                 "shapes": int,              # distinct shapes in the group; shape is the first
                 "nbytes": int}],
     "shared": [[name, ...]],                 # names stored once (same storage and view)
     "provenance": {...} | null,              # written by `torchgraft convert`
     "aliases": {alias: kept_name},           # convert's record of tensors stored once
     "metadata": {str: str},                  # other format metadata (safetensors)
     "placeholders": [str],                   # globals named by the pickle, never executed
     "notes": [str], "stats": bool}

Placeholders render as ``argparse.Namespace(lr=0.1)`` (from their recorded state).

Example:
    $ torchgraft inspect epoch_100.pth
    $ torchgraft inspect model.safetensors --stats --json | jq '.tensors[] | select(.flags != [])'
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..inspect_ import inspect_checkpoint
from .common import (
    Style,
    command_help,
    escape_tree,
    fmt_bytes,
    fmt_count,
    fmt_shape,
    print_json,
    progress_of,
    table,
)

MAX_ROWS = 200
MAX_STATS_ROWS = 400


def add_parser(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("inspect", parents=[parent], help="show what a checkpoint holds",
                       **command_help(sys.modules[__name__]))
    p.add_argument("file", metavar="FILE", help="checkpoint file or folder")
    p.add_argument("--stats", action="store_true",
                   help="read the data: min/max/mean/std, NaN/Inf counts, all-zero tensors")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--trust", action="store_true", help="allow pickled code to run")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    info = inspect_checkpoint(args.file, stats=args.stats, trust=args.trust,
                              progress=progress_of(args))
    if args.json:
        print_json(info)
    else:
        sys.stdout.write("\n".join(render_text(info, Style(sys.stdout))) + "\n")
    return 0


def render_text(info: dict[str, Any], st: Style) -> list[str]:
    info = escape_tree(info)  # names, keys and values come from the file: no terminal control
    size = f", {fmt_bytes(info['size_bytes'])}" if info["size_bytes"] is not None else ""
    lines = [st.bold(f"{info['file']}") + f"  ({info['format']}{size})", ""]
    lines.append(st.bold("container:"))
    lines += table([[r["key"], r["summary"]] for r in info["container"]])
    lines.append("")
    cands = info["candidates"]
    if cands:
        lines.append(st.bold(f"state dicts ({len(cands)}; * = what tg.read selects):"))
        rows = [["*" if c["selected"] else " ", c["path"] or "<top>", f"{c['tensors']} tensors",
                 _elements(c), fmt_bytes(c["bytes"]),
                 ", ".join(f"{d} ({n})" if len(c["dtypes"]) > 1 else d
                           for d, n in c["dtypes"].items()) + ("  EMA" if c["ema"] else "")]
                for c in cands]
        lines += table(rows)
    else:
        lines.append(st.yellow("no state dict found: the file holds no tensors"))
    if info["selected"] is not None:
        lines.append("")
        lines += _tensors(info, st)
    lines += _footer(info, st)
    return lines


def _elements(c: dict[str, Any]) -> str:
    """Parameters and buffers apart when the file tells them apart, else just elements."""
    if c.get("parameters") is None:
        return f"{fmt_count(c['elements'])} elements"
    return f"{fmt_count(c['parameters'])} params + {fmt_count(c['buffers'])} buffers"


def _tensors(info: dict[str, Any], st: Style) -> list[str]:
    sel = info["selected"] or "<top>"
    n = len(info["tensors"])
    if not info["stats"]:
        groups = info["groups"]
        lines = [st.bold(f"tensors in '{sel}' ({n} tensors, {len(groups)} groups):")]
        rows = [[g["pattern"], f"x{g['count']}" if g["count"] > 1 else "",
                 fmt_shape(g["shape"]) + ("*" if g["shapes"] > 1 else ""), g["dtype"]]
                for g in groups[:MAX_ROWS]]
        lines += table(rows)
        if len(groups) > MAX_ROWS:
            lines.append(f"  ... and {len(groups) - MAX_ROWS} more groups (--json lists all)")
        if any(g["shapes"] > 1 for g in groups):
            lines.append(st.dim("  * shape of the first tensor; the group has several shapes"))
        return lines
    lines = [st.bold(f"tensors in '{sel}' ({n} tensors) with statistics:")]
    rows = [["name", "shape", "dtype", "min", "max", "mean", "std", "flags"]]
    for t in info["tensors"][:MAX_STATS_ROWS]:
        rows.append([t["name"], fmt_shape(t["shape"]), t["dtype"]]
                    + [_num(t[k]) for k in ("min", "max", "mean", "std")]
                    + [",".join(f"{f}={t[f]}" if f in ("nan", "inf") else f
                                for f in t["flags"])])
    lines += table(rows)
    if n > MAX_STATS_ROWS:
        lines.append(f"  ... and {n - MAX_STATS_ROWS} more (--json lists all)")
    flagged = {f: [t["name"] for t in info["tensors"] if f in t["flags"]]
               for f in ("nan", "inf", "all_zero")}
    for flag, names in flagged.items():
        if names:
            shown = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
            colour = st.red if flag != "all_zero" else st.yellow
            lines.append(colour(f"  {len(names)} tensor(s) with {flag.replace('_', ' ')}: {shown}"))
    return lines


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _footer(info: dict[str, Any], st: Style) -> list[str]:
    lines: list[str] = []
    for names in info["shared"][:6]:
        lines.append(f"  shared: {' = '.join(names)} (one storage)")
    prov = info["provenance"]
    if prov:
        lines += ["", st.bold("provenance (written by torchgraft convert):")]
        src = prov.get("source", {})
        opts = {k: v for k, v in prov.get("options", {}).items() if v not in (None, [], False)}
        digest = src.get("sha256")
        digest = (f"sha256 {digest[:16]}..." if isinstance(digest, str)
                  else f"sha256 of {len(digest or {})} files")
        rows = [["source", f"{src.get('file')}  {digest}  "
                           f"selected '{src.get('selected') or '<top>'}'"],
                ["created", f"{prov.get('created')} by torchgraft {prov.get('version')}"],
                ["options", ", ".join(f"{k}={v}" for k, v in opts.items()) or "none"]]
        rows += [["rule", r] for r in prov.get("rules", [])]
        lines += table(rows)
    for alias, kept in list(info["aliases"].items())[:6]:
        lines.append(f"  alias: {alias} is stored once as {kept}")
    meta = info["metadata"]
    if meta:
        lines.append("  metadata: " + ", ".join(f"{k}={v}" for k, v in list(meta.items())[:8]))
    if info["placeholders"]:
        names = info["placeholders"]
        lines += ["", st.yellow("this file references " + ", ".join(names)
                                + ("; it was" if len(names) == 1 else "; they were")
                                + " not executed (inert placeholders)")]
    for note in info["notes"]:
        lines.append(f"  note: {note}")
    return lines
