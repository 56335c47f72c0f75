"""``torchgraft demo``: run the seed scenarios on small real models (needs only torch).

Writes a wrapped classifier checkpoint, a 1000-class checkpoint for a 10-class model and a DDP
checkpoint to a temporary folder (or ``--dir``), loads each with ``tg.load``, prints the
reports and checks every loaded tensor. Exit 0 when every check passes, 1 otherwise.

JSON schema (``--json``): ``{"schema": "torchgraft.demo/1", "ok": bool, "output": str}``.

Example:
    $ torchgraft demo
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Any

from ..demo import run_demo
from .common import CliError, command_help, print_json


def add_parser(sub: Any, parent: argparse.ArgumentParser) -> None:
    p = sub.add_parser("demo", parents=[parent], help="run the built-in demo scenarios",
                       **command_help(sys.modules[__name__]))
    p.add_argument("--dir", metavar="DIR", help="write the demo checkpoints here and keep them")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.dir and not os.path.isdir(args.dir):
        raise CliError(f"--dir {args.dir}: no such folder")
    if args.json:
        buf = io.StringIO()
        ok = run_demo(args.dir, buf)
        print_json({"schema": "torchgraft.demo/1", "ok": ok, "output": buf.getvalue()})
    else:
        ok = run_demo(args.dir, sys.stdout)
    return 0 if ok else 1
