"""Shared CLI plumbing: the usage error, colour, sizes, tables and the mapping options.

Example:
    >>> fmt_bytes(14_800_000), fmt_count(3_708_040), fmt_shape((40, 3, 4, 4))
    ('14.8 MB', '3.71M', '[40, 3, 4, 4]')
    >>> parse_rename([r"^module\\.=>", "fc=>head"])
    [('^module\\\\.', ''), ('fc', 'head')]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, TextIO

from ..plan import DEFAULT_MISMATCH


class CliError(Exception):
    """A usage or input problem: printed as one ``torchgraft: error:`` line; exit status 2."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def one_line(message: object) -> str:
    """Collapse a (possibly multi-line) message into one line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def message_lines(message: object, indent: str = "  ") -> list[str]:
    """A (possibly multi-line) message as lines: the first as is, the others indented, blank
    lines dropped (for text output that keeps a message's own line structure)."""
    parts = [part.rstrip() for part in str(message).splitlines() if part.strip()]
    return parts[:1] + [indent + part for part in parts[1:]]


# --- colour -----------------------------------------------------------------------------------


def use_colour(stream: TextIO) -> bool:
    """Colour only on a terminal, never with ``NO_COLOR`` set (https://no-color.org)."""
    if os.environ.get("NO_COLOR") or os.environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Style:
    """``Style(stream).red("x")``: ANSI colour when the stream is a colour terminal."""

    CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "cyan": "36"}

    def __init__(self, stream: TextIO | None = None) -> None:
        self.on = use_colour(stream or sys.stdout)

    def __getattr__(self, name: str):
        code = self.CODES.get(name)
        if code is None:
            raise AttributeError(name)
        return lambda text: f"\033[{code}m{text}\033[0m" if self.on else str(text)


# --- terminal safety --------------------------------------------------------------------------

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\e"}


def _escape_char(ch: str) -> str:
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 \
        else f"\\U{code:08x}"


def escape_text(text: str) -> str:
    """``text`` safe to print on a terminal: every non-printable character (ESC, BEL, newlines,
    other C0/C1 controls, bidi overrides, unassigned code points) becomes a visible escape such
    as ``\\e``, ``\\x07``, ``\\n`` or ``\\u202e``. Printable text, including non-ASCII letters,
    is unchanged. Used for TEXT output of names and values taken from files; ``--json`` output
    stays exact.

    >>> escape_text("blocks.0\\x1b[2J\\n.weight")
    'blocks.0\\\\e[2J\\\\n.weight'
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)


_OWN_SGR = re.compile("\x1b\\[(?:" + "|".join(sorted(Style.CODES.values())) + "|0)m")


def terminal_lines(lines: list[str], st: Style) -> str:
    """The text to write for ``lines``: each line escaped with :func:`escape_text` (a newline
    inside a name cannot start a new line), keeping only the plain colour codes :class:`Style`
    itself adds when colour is on."""
    if not st.on:
        return "\n".join(escape_text(line) for line in lines) + "\n"
    out = []
    for line in lines:
        parts = _OWN_SGR.split(line)
        codes = _OWN_SGR.findall(line)
        out.append("".join(escape_text(p) + (codes[i] if i < len(codes) else "")
                           for i, p in enumerate(parts)))
    return "\n".join(out) + "\n"


def escape_tree(obj: Any, depth: int = 0) -> Any:
    """A copy of a JSON-like tree (dicts, lists, tuples) with every string, keys included,
    passed through :func:`escape_text`; other values are returned as they are."""
    if isinstance(obj, str):
        return escape_text(obj)
    if depth > 100:
        return obj
    if isinstance(obj, dict):
        return {escape_tree(k, depth + 1): escape_tree(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [escape_tree(v, depth + 1) for v in obj]
    if isinstance(obj, tuple):
        return tuple(escape_tree(v, depth + 1) for v in obj)
    return obj


# --- formatting -------------------------------------------------------------------------------


def fmt_bytes(n: int) -> str:
    """Decimal units, three significant digits."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}" if n < 100 * size else f"{n / size:.0f} {unit}"
    return f"{n} B"


def fmt_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}" if n < 100 * size else f"{n / size:.0f}{unit}"
    return str(n)


def fmt_pct(frac: float) -> str:
    """``100%`` only when everything is there; never rounds up to it."""
    return "100%" if frac >= 1.0 else f"{min(frac * 100, 99.99):.2f}%"


def fmt_shape(shape: Any) -> str:
    return "-" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def table(rows: list[list[str]], indent: int = 2, gap: int = 2) -> list[str]:
    """Left-aligned columns; the last column is never padded."""
    if not rows:
        return []
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(map(len, rows)))]
    out = []
    for r in rows:
        cells = [c.ljust(widths[i]) if i < len(r) - 1 else c for i, c in enumerate(r)]
        out.append(" " * indent + (" " * gap).join(cells).rstrip())
    return out


def print_json(obj: Any, stream: TextIO | None = None) -> None:
    """The ``--json`` output: one indented JSON document on stdout."""
    (stream or sys.stdout).write(json.dumps(obj, indent=2, default=str, allow_nan=False) + "\n")


# --- help text ----------------------------------------------------------------------------------

_ROLE = re.compile(r":(?:func|class|meth|data|attr|mod|exc|obj):`~?([^`]+)`")


def plain(text: str) -> str:
    """RST markup out of docstring text for ``--help``: ``x`` and :func:`x` become x, a
    literal-block ``::`` becomes ``:``."""
    text = _ROLE.sub(r"\1", text)
    text = text.replace("``", "")
    return re.sub(r"::$", ":", text, flags=re.M)


def command_help(module: Any, *, spec: bool = False) -> dict[str, Any]:
    """``description``/``epilog``/``formatter_class`` for a sub-command's parser, made from its
    module docstring: the text without the JSON schema, then the model-spec syntax (when the
    command takes a model spec) and the examples."""
    description, examples, skip = [], [], False
    for para in (module.__doc__ or "").strip().split("\n\n"):
        if para.startswith("JSON schema"):
            schema = re.search(r"torchgraft\.\w+/\d+", para)
            description.append(f"--json prints schema {schema.group(0) if schema else ''} "
                               f"(fields: python -m pydoc {module.__name__})")
            skip = True
            continue
        if skip and para.startswith("    "):
            continue  # the schema's indented block
        skip = False
        if para.startswith("Example:"):
            examples += [line.strip() for line in para.splitlines()[1:] if line.strip()]
        else:
            description.append(para)
    epilog = [SPEC_HELP] if spec else []
    if examples:
        epilog.append("examples:\n" + "\n".join("  " + line for line in examples))
    return {"description": plain("\n\n".join(description)), "epilog": "\n\n".join(epilog),
            "formatter_class": argparse.RawDescriptionHelpFormatter}


SPEC_HELP = """\
model specs (--model SPEC, and A or B of diff):
  timm:NAME[?KEY=VALUE&...]
      timm.create_model(NAME, pretrained=False, KEY=VALUE, ...)
      e.g. timm:resnet18   'timm:convnext_tiny?num_classes=10&in_chans=1'
  transformers:CLASS?config=PATH[&KEY=VALUE...]
      a transformers model class built from PATH, a config.json or a model folder
      (read locally, never downloaded); KEY=VALUE override config fields
      e.g. 'transformers:BertModel?config=~/models/bert-base/config.json'
  transformers:CLASS?config=CONFIGCLASS[&KEY=VALUE...]
      that config class's defaults, with KEY=VALUE overrides
      e.g. 'transformers:ViTModel?config=ViTConfig&image_size=224'
  transformers:CLASS?KEY=VALUE[&...]
      the model's own config class with these fields
      e.g. 'transformers:ViTModel?hidden_size=192&num_hidden_layers=12'
      (transformers:CLASS with neither config= nor fields is an error that asks which size;
      Auto classes such as AutoModel need config=)
  package.module:CALLABLE[?KEY=VALUE&...]
      imports package.module (modules in the current folder count, as with python -m) and
      calls CALLABLE(KEY=VALUE, ...); CALLABLE may be dotted (Class.factory)
      e.g. 'torch.nn:Linear?in_features=4&out_features=2'   'mypkg.models:build?depth=2'
  --kwargs JSON adds keyword arguments: --kwargs '{"num_classes": 10}'
  VALUEs are read as int, float, true/false, none, a JSON list or object, else a string;
  write & = ? inside a value as %26 %3D %3F. Quote specs with ? or & in the shell.
  Models get random weights (pretrained=False). An existing file or folder is always a
  checkpoint, never a spec."""


# --- paths and progress ---------------------------------------------------------------------------

PATH_ARGS = ("file", "src", "dst", "a", "b", "dir")
SOURCE_ARGS = ("file", "src", "a", "b")


def add_progress_options(p: argparse.ArgumentParser) -> None:
    """``--progress/--no-progress``; unset means auto (a bar on a terminal for big or slow
    work). ``default=SUPPRESS`` so a sub-command's parser does not reset the main one's."""
    p.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   default=argparse.SUPPRESS,
                   help="progress bars on stderr (bytes, rate, ETA) for downloads, inspect "
                   "--stats, diff --values and convert; default: only on a terminal, for work "
                   "over about 1 GB or 2 s")


def progress_of(args: argparse.Namespace) -> bool | None:
    """True, False, or None for auto."""
    return getattr(args, "progress", None)


def prepare_paths(args: argparse.Namespace) -> None:
    """In place: ``~`` expanded in every path argument, then ``hf://`` ids and URLs among the
    checkpoint arguments resolved to local files (downloading with a progress bar if needed;
    ``provenance_of(path)`` still says where each came from)."""
    for name in PATH_ARGS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))
    remote = [name for name in SOURCE_ARGS if _is_remote(getattr(args, name, None))]
    if remote:
        from ..sources import resolve_source

        for name in remote:
            resolved = resolve_source(getattr(args, name), progress=progress_of(args))
            setattr(args, name, resolved.path)


def _is_remote(value: Any) -> bool:
    return isinstance(value, str) and value[:8].lower().startswith(
        ("hf://", "https://", "http://"))


# --- options shared by diff, check and convert ------------------------------------------------

MAPPING_HELP = {
    "select": "container path of the state dict to use, e.g. 'state_dict' or 'model/ema'",
    "prefix": "keep only names under this prefix and strip it (e.g. 'backbone')",
    "rename": "rename rule 'REGEX=>REPLACEMENT' (repeatable; applied in order)",
    "no_auto": "do not reconcile prefixes automatically (module., backbone. ...)",
    "mismatch": ("shape mismatches: 'error' refuses, 'skip' keeps the model's values; default: "
                 "as tg.load (refuses, except a timm classifier, which is left as initialised)"),
    "strict": "fail when any name is missing or unexpected",
    "trust": "allow pickled code to run (only for files you trust)",
    "adapt": ("adapters for tensors of the right role and the wrong shape: 'auto' (default), "
              "'off', adapter names 'a,b' (only those), or a JSON object as tg.load's adapt= "
              "(e.g. '{\"inflate_3d\": true}')"),
    "labels": ("classifier rows to keep: an offset (e.g. 1), indices '3,17,250', or a file of "
               "indices (JSON list or one per line)"),
}


def add_mapping_options(p: argparse.ArgumentParser, *names: str) -> None:
    """Add the named mapping options (default: all) with one spelling across commands."""
    names = names or tuple(MAPPING_HELP)
    if "select" in names:
        p.add_argument("--select", metavar="PATH", help=MAPPING_HELP["select"])
    if "prefix" in names:
        p.add_argument("--prefix", metavar="P", help=MAPPING_HELP["prefix"])
    if "rename" in names:
        p.add_argument("--rename", metavar="'REGEX=>REPL'", action="append",
                       help=MAPPING_HELP["rename"])
    if "no_auto" in names:
        p.add_argument("--no-auto", action="store_true", help=MAPPING_HELP["no_auto"])
    if "mismatch" in names:
        p.add_argument("--mismatch", choices=("error", "skip"), default=None,
                       help=MAPPING_HELP["mismatch"])
    if "strict" in names:
        p.add_argument("--strict", action="store_true", help=MAPPING_HELP["strict"])
    if "trust" in names:
        p.add_argument("--trust", action="store_true", help=MAPPING_HELP["trust"])
    if "adapt" in names:
        p.add_argument("--adapt", metavar="SPEC", default=None, help=MAPPING_HELP["adapt"])
    if "labels" in names:
        p.add_argument("--labels", metavar="SPEC", default=None, help=MAPPING_HELP["labels"])


def parse_adapt(text: str | None) -> Any:
    """``--adapt``: 'auto', 'off', 'name,name' or a JSON object, as ``tg.load``'s ``adapt=``."""
    if text is None or text == "auto":
        return "auto"
    if text in ("off", "none", "false"):
        return False
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as err:
            raise CliError(f"--adapt is not valid JSON ({err})") from None
        if not isinstance(value, dict):
            raise CliError("--adapt JSON must be an object, e.g. '{\"inflate_3d\": true}'")
        return value
    return [n.strip() for n in text.split(",") if n.strip()]


def parse_labels(text: str | None) -> Any:
    """``--labels``: an int offset, comma-separated indices, or a file of indices."""
    if text is None:
        return None
    path = Path(os.path.expanduser(text))
    if path.is_file():
        body = path.read_text()
        try:
            value = json.loads(body)
        except ValueError:
            value = body.replace(",", " ").split()
        items = value if isinstance(value, list) else [value]
    elif re.fullmatch(r"\s*-?\d+\s*", text):
        return int(text)
    else:
        items = text.split(",")
    try:
        return [int(str(i).strip()) for i in items if str(i).strip()]
    except ValueError:
        raise CliError(f"--labels {text!r}: expected an offset (e.g. 1), indices '3,17,250' or a "
                       "file of indices") from None


def add_model_kwargs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kwargs", metavar="JSON", default=None,
                   help='keyword arguments for the model spec, e.g. \'{"num_classes": 10}\'')


def parse_rename(values: list[str] | None) -> list[tuple[str, str]] | None:
    """``['REGEX=>REPL', ...]`` → ``[(regex, repl), ...]``; a bad rule is a usage error."""
    if not values:
        return None
    rules = []
    for value in values:
        pattern, sep, repl = value.partition("=>")
        if not sep:
            raise CliError(f"--rename {value!r}: expected 'REGEX=>REPLACEMENT', "
                           r"e.g. --rename '^module\.=>'")
        try:
            re.compile(pattern)
        except re.error as err:
            raise CliError(f"--rename {value!r}: bad regular expression ({err})") from None
        rules.append((pattern, repl))
    return rules


def parse_kwargs(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as err:
        raise CliError(f"--kwargs is not valid JSON ({err}); e.g. --kwargs "
                       "'{\"num_classes\": 10}'") from None
    if not isinstance(value, dict):
        raise CliError("--kwargs must be a JSON object, e.g. '{\"num_classes\": 10}'")
    return value


def mapping_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The ``tg.plan`` keyword arguments the parsed mapping options stand for."""
    return {
        "select": getattr(args, "select", None),
        "prefix": getattr(args, "prefix", None),
        "rename": parse_rename(getattr(args, "rename", None)),
        "auto": not getattr(args, "no_auto", False),
        # not given: tg.plan's own default (framework rules such as timm's classifier apply)
        "mismatch": getattr(args, "mismatch", None) or DEFAULT_MISMATCH,
        "strict": getattr(args, "strict", False),
        "trust": getattr(args, "trust", False),
        "adapt": parse_adapt(getattr(args, "adapt", None)),
        "labels": parse_labels(getattr(args, "labels", None)),
    }

