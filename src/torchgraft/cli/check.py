"""``torchgraft check SRC --model SPEC``: would SRC load into the model? (a CI gate)

Options: ``--min-loaded F`` (fraction of the model's elements that must be loaded, default
0.99), ``--strict`` (also fail on any missing or unexpected name), ``--kwargs JSON``, ``--json``
and the mapping options ``--select --prefix --rename --no-auto --mismatch --trust``.

Exit status: 0 when the plan is ok, at least ``--min-loaded`` of the model is loaded and (with
``--strict``) nothing is missing or unexpected; 1 otherwise; 2 on usage or read errors.

JSON schema (``--json``), ``"schema": "torchgraft.check/1"``::

    {"schema": "torchgraft.check/1", "ok": bool, "exit_code": 0 | 1,
     "model": str, "min_loaded": float, "strict": bool,
     "loaded_fraction": float,
     "reasons": [str],                      # why it failed; empty when ok
     "report": <LoadReport.to_dict()> | null}  # the plan, exactly as tg.plan makes it; null
                                            # when auto refused to guess (AmbiguousRenameError)

An ambiguous checkpoint (``auto`` finds several renamings that fit about equally well, e.g. a
student and a teacher copy) fails the check (exit 1) with the options that pick each copy.

Example:
    $ torchgraft check epoch_100.pth --model timm:convnext_tiny --prefix backbone
    $ torchgraft check ckpt.pth --model 'timm:resnet18?num_classes=10' --strict --json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

from ..api import plan
from ..errors import AmbiguousRenameError
from ..report import LoadReport, fmt_fraction
from .common import (
    Style,
    add_mapping_options,
    add_model_kwargs,
    command_help,
    escape_text,
    mapping_kwargs,
    message_lines,
    one_line,
    parse_kwargs,
    print_json,
    terminal_lines,
)
from .specs import build_model


def add_parser(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("check", parents=[parent], help="check that a checkpoint loads into a "
                       "model", **command_help(sys.modules[__name__], spec=True))
    p.add_argument("src", metavar="SRC", help="checkpoint file or folder")
    p.add_argument("--model", metavar="SPEC", required=True,
                   help="the model: timm:NAME, transformers:CLASS?config=PATH or "
                   "package.module:callable (see 'model specs' below)")
    add_model_kwargs(p)
    p.add_argument("--min-loaded", metavar="F", type=_fraction, default=0.99,
                   help="fraction of model elements that must load (default 0.99)")
    add_mapping_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def _fraction(text: str) -> float:
    try:
        value = float(text.rstrip("%")) / (100 if text.endswith("%") else 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be between 0 and 1 (or 0% and 100%)")
    return value


def run(args: argparse.Namespace) -> int:
    options = mapping_kwargs(args)
    model = build_model(args.model, parse_kwargs(args.kwargs))
    try:
        report = plan(model, args.src, **options)
    except AmbiguousRenameError as err:
        return _ambiguous(args, err)
    reasons = []
    refused = not report.ok and not report.entries  # refused while planning (no entries yet)
    mism, names_differ = report.mismatched, report.missing_keys or report.unexpected_keys
    if refused:
        reasons.append(str(report.error))
    elif not report.ok and mism and options["mismatch"] != "skip":
        reasons.append(f"{len(mism)} tensor(s) match by name but not by shape "
                       "(--mismatch skip loads the rest)")
    elif not report.ok and not (args.strict and names_differ):
        reasons.append(str(report.error or "the load would fail"))  # may hold several lines
    if args.strict and names_differ:
        reasons.append(f"--strict: {len(report.missing_keys)} missing and "
                       f"{len(report.unexpected_keys)} unexpected tensor(s)")
    if report.loaded_fraction < args.min_loaded and not refused:
        reasons.append(f"only {fmt_fraction(report.loaded_fraction)} of the model's elements "
                       f"would be loaded; --min-loaded is {fmt_fraction(args.min_loaded)}")
    code = 1 if reasons else 0
    if args.json:
        print_json({"schema": "torchgraft.check/1", "ok": not reasons, "exit_code": code,
                    "model": args.model, "min_loaded": args.min_loaded, "strict": args.strict,
                    "loaded_fraction": report.loaded_fraction,
                    "reasons": [one_line(r) for r in reasons], "report": report.to_dict()})
        return code
    st = Style(sys.stdout)
    lines = [] if refused else str(_escaped(report)).splitlines()
    if reasons:
        lines += failed_lines(reasons, st)
    else:
        lines.append(st.green(f"check OK: {args.src} loads into {args.model} "
                              f"({fmt_fraction(report.loaded_fraction)} of its elements)"))
    sys.stdout.write(terminal_lines(lines, st))  # names from the file: no terminal control
    return code


def _escaped(report: LoadReport) -> LoadReport:
    """A copy of ``report`` whose names (from the file) print as single escaped lines, so a
    newline inside a name cannot start a line of its own; the error keeps its own lines."""
    def esc(text: str | None) -> str | None:
        return None if text is None else escape_text(text)

    entries = [replace(e, target=esc(e.target), source=esc(e.source), reason=esc(e.reason) or "")
               for e in report.entries]
    error = None if report.error is None else "\n".join(
        escape_text(line) for line in str(report.error).split("\n"))
    return replace(report, entries=entries, selected=esc(report.selected) or "",
                   source=esc(report.source) or "", rules=[escape_text(r) for r in report.rules],
                   notes=[escape_text(n) for n in report.notes],
                   placeholders=[escape_text(p) for p in report.placeholders], error=error)


def failed_lines(reasons: list[str], st: Style) -> list[str]:
    """``check FAILED: ...`` with each reason's own lines kept (indented), never squeezed."""
    if len(reasons) == 1:
        return [st.red(line) for line in message_lines("check FAILED: " + reasons[0])]
    lines = [st.red(f"check FAILED ({len(reasons)} reasons):")]
    for reason in reasons:
        lines += [st.red("  " + line) for line in message_lines("- " + reason)]
    return lines


def _ambiguous(args: argparse.Namespace, err: AmbiguousRenameError) -> int:
    """auto refused to guess: the check fails (exit 1) and says which options pick each copy."""
    reason = "auto=True cannot tell which checkpoint tensors belong in the model (ambiguous)"
    if args.json:
        print_json({"schema": "torchgraft.check/1", "ok": False, "exit_code": 1,
                    "model": args.model, "min_loaded": args.min_loaded, "strict": args.strict,
                    "loaded_fraction": 0.0, "reasons": [reason, one_line(err)],
                    "report": None})
        return 1
    st = Style(sys.stdout)
    lines = str(err).splitlines() + [st.red(f"check FAILED: {reason}; pass one of the options "
                                            "above")]
    sys.stdout.write(terminal_lines(lines, st))
    return 1
