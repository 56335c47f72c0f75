"""``torchgraft convert SRC DST``: write the selected state dict as .safetensors or .pth.

Options: ``--select PATH --prefix P --rename 'REGEX=>REPL'... --drop GLOB... --keep GLOB...
--dtype bf16|fp16|fp32 --model SPEC [--kwargs JSON] --verify --force --trust --json``.

Without ``--model``: ``--prefix`` keeps the names under it and strips it, then ``--rename``
rules apply in order, then ``--keep``/``--drop`` (fnmatch globs on the final names; a tensor is
written when it matches some ``--keep`` (or none is given) and no ``--drop``). With ``--model``
the full load plan for that model decides the names (auto prefixes, renames, tied weights) and
only tensors it would copy are written (shape mismatches are left out and listed), so DST then
loads into that model with no options. ``--dtype`` casts floating-point tensors only.

DST's extension picks the format (``.safetensors``; ``.pth``/``.pt``/``.bin``/``.ckpt``).
SRC is never modified; DST is written to a temporary file and moved into place; an existing DST
is refused (exit 2) unless ``--force``. ``--verify`` re-reads DST and compares every tensor bit
for bit (exit 1 on any difference).

JSON schema (``--json``), ``"schema": "torchgraft.convert/1"``::

    {"schema": "torchgraft.convert/1", "ok": bool,
     "src": str, "dst": str, "format": "safetensors" | "pth", "selected": str,
     "tensors": int,                 # names in DST (aliases included)
     "stored": int,                  # tensors stored (aliases stored once)
     "bytes": int, "names": [str],
     "aliases": {alias: kept_name}, "dropped": {source_name: reason},
     "rules": [str], "casts": {"float32 -> bfloat16": count},
     "verified": bool | null, "problems": [str],
     "provenance": {...},            # also stored in DST (see torchgraft.convert)
     "plan": <LoadReport.to_dict()> | null,   # with --model: the plan that chose the tensors
     "dst_plan": {"ok": bool, "loaded_fraction": float,
                  "counts": {action: int}} | null}   # with --model: DST into it, no options

Example:
    $ torchgraft convert epoch_100.pth backbone.safetensors --prefix backbone --verify
    $ torchgraft convert ckpt.pth model.safetensors --model timm:convnext_tiny --dtype bf16
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..api import plan
from ..convert import convert
from ..report import LoadReport
from .common import (
    Style,
    add_mapping_options,
    add_model_kwargs,
    command_help,
    fmt_bytes,
    fmt_pct,
    parse_adapt,
    parse_kwargs,
    parse_labels,
    parse_rename,
    print_json,
    progress_of,
    terminal_lines,
)
from .specs import build_model


def add_parser(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("convert", parents=[parent], help="write a state dict to a new file",
                       **command_help(sys.modules[__name__], spec=True))
    p.add_argument("src", metavar="SRC", help="checkpoint file or folder (never modified)")
    p.add_argument("dst", metavar="DST", help="output: *.safetensors (preferred) or *.pth")
    add_mapping_options(p, "select", "prefix", "rename", "trust", "adapt", "labels")
    p.add_argument("--drop", metavar="GLOB", action="append", default=[],
                   help="leave out tensors whose final name matches (repeatable)")
    p.add_argument("--keep", metavar="GLOB", action="append", default=[],
                   help="write only tensors whose final name matches (repeatable)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                   help="cast floating-point tensors")
    p.add_argument("--model", metavar="SPEC",
                   help="write what loading into this model would use, under its names "
                   "(a model spec, see 'model specs' below)")
    add_model_kwargs(p)
    p.add_argument("--verify", action="store_true", help="re-read DST and compare bit for bit")
    p.add_argument("--force", action="store_true", help="overwrite DST if it exists")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    rename = parse_rename(args.rename)
    kwargs = parse_kwargs(args.kwargs)
    model = build_model(args.model, kwargs) if args.model else None
    result = convert(args.src, args.dst, select=args.select, prefix=args.prefix,
                     rename=rename, drop=args.drop, keep=args.keep, dtype=args.dtype,
                     model=model, model_spec=args.model, verify=args.verify, force=args.force,
                     trust=args.trust, progress=progress_of(args),
                     adapt=parse_adapt(args.adapt), labels=parse_labels(args.labels))
    after = plan(model, args.dst) if model is not None else None  # DST, with no options
    ok = result.verified is not False and (after is None or after.ok)
    if args.json:
        print_json({"schema": "torchgraft.convert/1", "ok": ok, **result.to_dict(),
                    "dst_plan": None if after is None else {
                        "ok": after.ok, "loaded_fraction": after.loaded_fraction,
                        "counts": after.counts}})
    else:
        st = Style(sys.stdout)
        sys.stdout.write(terminal_lines(render_text(result, after, st), st))
    return 0 if ok else 1


def render_text(r: Any, after: LoadReport | None, st: Style) -> list[str]:
    src_fmt = r.provenance["source"]["format"]
    sel = r.selected or "<top>"
    lines = [st.bold(f"converted {r.src} [{src_fmt}, '{sel}'] -> {r.dst}"),
             f"  wrote {len(r.names)} tensors, {fmt_bytes(r.nbytes)} ({r.format})"
             + (f"; {len(r.stored)} stored, {len(r.aliases)} shared" if r.aliases else "")]
    if r.aliases:
        shown = ", ".join(f"{a} = {k}" for a, k in list(r.aliases.items())[:4])
        more = " ..." if len(r.aliases) > 4 else ""
        lines.append(f"  shared, stored once: {shown}{more}")
    for rule in r.rules:
        lines.append(f"  rule: {rule}")
    for kinds, n in r.casts.items():
        lines.append(f"  cast {n} tensors {kinds}")
    adapted = r.report.by_action("adapted") if r.report is not None else []
    written = set(r.names)
    for e in [e for e in adapted if e.target in written][:8]:
        lines.append(f"  adapted {e.target}: {list(e.source_shape or ())} -> "
                     f"{list(e.target_shape or ())} ({e.reason})")
    if r.dropped:
        reasons: dict[str, int] = {}
        for why in r.dropped.values():
            reasons[why] = reasons.get(why, 0) + 1
        lines.append(f"  left out {len(r.dropped)}: " + "; ".join(
            f"{n} {why}" for why, n in list(reasons.items())[:4]))
    if after is not None:
        c = after.counts
        n = sum(1 for e in after.entries if e.target is not None)
        text = (f"  {r.dst} loads into {r.provenance['options']['model']} with no options: "
                f"{fmt_pct(after.loaded_fraction)} of its elements "
                f"({c['copied'] + c['cast'] + c['adapted']}/{n} tensors)")
        lines.append(st.green(text) if after.ok else st.red(text + f"; {after.error}"))
    if r.verified:
        lines.append(st.green(f"  verified: all {len(r.stored)} stored tensors are bit-exact"))
    elif r.verified is False:
        lines.append(st.red(f"  VERIFY FAILED: {len(r.problems)} problem(s)"))
        lines += [f"    {p}" for p in r.problems]
    return lines
