"""The ``torchgraft`` command line: inspect, diff, convert, check and demo.

Every command prints readable tables on a terminal (colour only on a TTY, never with
``NO_COLOR``) and takes ``--json`` for a stable machine-readable schema (documented at the top
of each command's module). Errors go to stderr as ``torchgraft: error: ...`` (a message of
several lines keeps them, indented), exit status 2; ``--debug`` adds the traceback. Every
command takes ``--progress/--no-progress`` (default: a bar on a terminal for big or slow work)
and expands ``~`` in its path arguments.

Exit status: 0 success, 1 a negative answer (plan would fail, checkpoints differ, check
failed, verification failed), 2 usage, input or read errors.

Example:
    >>> main(["--version"])  # doctest: +SKIP
    torchgraft 0.1.0
    0
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from .. import __version__
from ..errors import TorchgraftError
from . import check, convert, demo, diff, inspect
from .common import (
    CliError,
    add_progress_options,
    escape_text,
    message_lines,
    one_line,
    plain,
    prepare_paths,
)

COMMANDS = (inspect, diff, convert, check, demo)
EPILOG = """\
exit status: 0 success, 1 a negative answer (the plan would fail, the checkpoints differ, the
check failed, verification failed), 2 usage, input or read errors.

'torchgraft COMMAND --help' explains each command with examples; diff, convert and check
also explain the model-spec syntax (timm:NAME?num_classes=10, transformers:CLASS?config=PATH,
package.module:callable)."""


class _Parser(argparse.ArgumentParser):
    """Usage errors become CliError (one line, exit 2) instead of usage + exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (one sub-command per module in COMMANDS)."""
    parser = _Parser(prog="torchgraft", description=plain(__doc__.split("\n\n")[0]),
                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version",
                        version=f"torchgraft {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parent = _Parser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks on errors")
    add_progress_options(parser)
    add_progress_options(parent)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub, parent)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (never raises, except with ``--debug``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        prepare_paths(args)  # ~ expanded; hf:// ids and URLs in FILE/SRC/A/B become local paths
        if getattr(args, "run", None) is None:
            raise CliError("choose a command: inspect, diff, convert, check or demo "
                           "(see 'torchgraft --help')")
        return int(args.run(args))
    except SystemExit as err:  # --help, --version
        return err.code if isinstance(err.code, int) else 0
    except (CliError, TorchgraftError) as err:
        if debug:
            traceback.print_exc()
        lines = message_lines(err, indent="  ") or [""]
        print("\n".join(escape_text(line) for line in
                        [f"torchgraft: error: {lines[0]}", *lines[1:]]), file=sys.stderr)
        return getattr(err, "code", 2) if isinstance(err, CliError) else 2
    except KeyboardInterrupt:
        print("torchgraft: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `torchgraft inspect x | head`: stop quietly
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 1
    except Exception as err:
        if debug:
            traceback.print_exc()
        print(f"torchgraft: error: {type(err).__name__}: {escape_text(one_line(err))} "
              "(unexpected; rerun with --debug for the traceback)", file=sys.stderr)
        return 2
