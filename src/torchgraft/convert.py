"""Write a checkpoint's state dict to ``.safetensors`` or ``.pth``, with provenance.

Only the selected state dict is written, under its final names (prefix, rename, drop/keep; or
with ``model=`` the target names of the full load plan, so the file loads into that model with
no options). ``.safetensors`` is written tensor by tensor (memory: one tensor at a time);
``.pth`` goes through ``torch.save`` and holds all tensors in memory while writing.

Layout: safetensors gets ``__metadata__ = {"format": "pt", "torchgraft": <provenance JSON>,
"torchgraft.aliases": <JSON alias -> kept name>}`` and stores shared tensors once. ``.pth``
is ``{"state_dict": {name: tensor}, "__torchgraft__": {"torchgraft": <provenance JSON>,
"torchgraft.aliases": <JSON>}}`` (plain strings, ``weights_only``-safe); shared tensors are one
tensor object, so torch keeps them shared. ``tg.read``/``tg.load`` select ``state_dict``.

The source is never modified. DST is written to a temporary file in its folder, fsync-ed and
moved into place; an existing DST is refused unless ``force=True``.

Example:
    >>> import os, tempfile, torch, torchgraft as tg
    >>> d = tempfile.mkdtemp(); src = os.path.join(d, "a.pth")
    >>> torch.save({"state_dict": {"module.w": torch.ones(2)}, "epoch": 1}, src)
    >>> r = convert(src, os.path.join(d, "b.safetensors"), rename=[(r"^module\\.", "")],
    ...             verify=True)
    >>> r.names, r.verified, tg.read(r.dst)["w"].tolist()
    (['w'], True, [1.0, 1.0])
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, BinaryIO

import torch

from .api import read
from .errors import TorchgraftError
from .formats.safetensors_file import DTYPE_NAMES
from .names import Rename, map_names
from .progress import ProgressBar
from .report import LoadReport
from .tensors import MemoryRef, TensorRef

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "half": torch.float16, "fp32": torch.float32,
          "float32": torch.float32, "float": torch.float32}
PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
PROGRESS_MIN_BYTES = 100_000_000


class ConvertError(TorchgraftError):
    """The conversion cannot be done as asked (DST exists, bad extension, nothing to write)."""


@dataclass
class Item:
    """One tensor to store: DST ``name``, SRC name ``source``, its reference and DST dtype."""

    name: str
    source: str
    ref: TensorRef
    dtype: torch.dtype

    def tensor(self) -> torch.Tensor:
        """The exact tensor meant to be written (read, cast, contiguous CPU)."""
        t = self.ref.materialize().detach()
        if t.dtype != self.dtype:
            t = t.to(self.dtype)
        return t.cpu().contiguous()


@dataclass
class ConvertResult:
    """What ``convert`` wrote (``to_dict()`` is the ``--json`` payload's core)."""

    src: str
    dst: str
    format: str
    selected: str
    names: list[str]
    stored: list[Item]
    aliases: dict[str, str]
    dropped: dict[str, str]
    rules: list[str]
    provenance: dict[str, Any]
    report: LoadReport | None = None
    verified: bool | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(it.ref.numel * it.dtype.itemsize for it in self.stored)

    @property
    def casts(self) -> dict[str, int]:
        return dict(Counter(f"{_dt(it.ref.dtype)} -> {_dt(it.dtype)}" for it in self.stored
                            if it.ref.dtype != it.dtype))

    def to_dict(self) -> dict[str, Any]:
        return {"src": self.src, "dst": self.dst, "format": self.format,
                "selected": self.selected, "tensors": len(self.names),
                "stored": len(self.stored), "bytes": self.nbytes, "names": list(self.names),
                "aliases": dict(self.aliases), "dropped": dict(self.dropped),
                "rules": list(self.rules), "casts": self.casts, "verified": self.verified,
                "problems": list(self.problems), "provenance": self.provenance,
                "plan": self.report.to_dict() if self.report is not None else None}


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def out_format(dst: str | os.PathLike) -> str:
    """'safetensors' or 'pth' from DST's extension."""
    suffix = Path(dst).suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in PTH_SUFFIXES:
        return "pth"
    raise ConvertError(f"{Path(dst).name}: unknown extension {suffix or '(none)'!r}; name the "
                       f"output *.safetensors (preferred) or *.pth")


def select_items(src: Any, *, select: str | None = None, prefix: str | None = None,
                 rename: Rename = None, drop: Sequence[str] = (), keep: Sequence[str] = (),
                 dtype: torch.dtype | None = None, model: torch.nn.Module | None = None,
                 trust: bool = False, adapt: Any = "auto", labels: Any = None
                 ) -> tuple[list[Item], dict[str, str], list[str], str, str, LoadReport | None]:
    """Decide what to write: (items, dropped name -> why, rules, selected, format, report)."""
    report = None
    dropped: dict[str, str] = {}
    computed: dict[str, TensorRef] = {}
    if model is not None:
        from .api import LoadOptions, _plan

        planned = _plan(model, src, LoadOptions(select=select, prefix=prefix, rename=rename,
                                                mismatch="skip", trust=trust, adapt=adapt,
                                                labels=labels))
        report = planned.report
        if planned.error is not None:
            raise ConvertError(f"the checkpoint does not load into the model: {report.error}")
        refs, fmt = planned.refs, report.format  # the file is read once, by the plan
        for copy in planned.copies:  # the plan's own references: adapted ones are computed
            for slot in copy.slots:
                computed[slot.name] = copy.ref
        for group in planned.groups:  # values the model's own loading code computed
            for name, value in group.computed.items():
                computed[name] = MemoryRef(value.detach())
        pairs = [(e.target, e.source) for e in report.entries
                 if e.action in ("copied", "cast", "adapted") and e.target and e.source
                 and (e.action != "adapted" or e.target in computed)]
        used = {s for _, s in pairs}
        dropped = {e.source: f"{e.action}: {e.reason}" for e in report.entries
                   if e.source and e.source not in used}
        rules, selected = list(report.rules), report.selected
    else:
        sd = read(src, select, trust=trust)
        refs, selected, fmt = sd.refs, sd.selected, sd.format
        names = map_names({n: r.shape for n, r in refs.items()}, None, prefix=prefix,
                          rename=rename, auto=False)
        pairs = [(names.target[s], s) for s in refs if s in names.target]
        dropped, rules = dict(names.dropped), list(names.rules)
    items = []
    for name, source in pairs:
        why = _filtered(name, drop, keep)
        if why:
            dropped[source] = why
            continue
        ref = computed.get(name) or refs[source]
        cast = dtype is not None and ref.dtype.is_floating_point
        items.append(Item(name, source, ref, dtype if cast else ref.dtype))
    for flag, globs in (("--keep", keep), ("--drop", drop)):
        if globs:
            rules.append(f"{flag} {' '.join(globs)}")
    return items, dropped, rules, selected, fmt, report


def _filtered(name: str, drop: Sequence[str], keep: Sequence[str]) -> str | None:
    if keep and not any(fnmatchcase(name, g) for g in keep):
        return "not matched by --keep"
    hit = next((g for g in drop if fnmatchcase(name, g)), None)
    return f"--drop {hit}" if hit else None


def dedupe(items: list[Item]) -> tuple[list[Item], dict[str, str]]:
    """Tensors that are one storage view (tied) are stored once: (stored, alias -> kept)."""
    seen: dict[Any, str] = {}
    stored, aliases = [], {}
    for it in items:
        key = (it.ref.alias_key(), it.dtype)
        if key in seen:
            aliases[it.name] = seen[key]
        else:
            seen[key] = it.name
            stored.append(it)
    return stored, aliases


def sha256_file(path: str | os.PathLike, chunk: int = 4 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _source_info(src: Any) -> dict[str, Any]:
    if not isinstance(src, (str, os.PathLike)):
        return {"file": "<in-memory>", "sha256": None, "size": None}
    p = Path(src)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file())
        return {"file": p.name + "/", "sha256": {f.name: sha256_file(f) for f in files},
                "size": sum(f.stat().st_size for f in files)}
    return {"file": p.name, "sha256": sha256_file(p), "size": p.stat().st_size}


# --- writers ------------------------------------------------------------------------------------


def write_safetensors(f: BinaryIO, items: list[Item], metadata: dict[str, str],
                      on_tensor: Callable[[int], None] | None = None) -> None:
    """Stream a safetensors file: header, then each tensor's bytes (largest itemsize first)."""
    for it in items:
        if it.dtype not in DTYPE_NAMES:
            raise ConvertError(f"{it.name}: dtype {_dt(it.dtype)} cannot be stored in "
                               "safetensors; write a .pth instead")
    layout = sorted(range(len(items)), key=lambda i: -items[i].dtype.itemsize)
    offsets, pos = {}, 0
    for i in layout:
        size = items[i].ref.numel * items[i].dtype.itemsize
        offsets[i], pos = [pos, pos + size], pos + size
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **metadata}}
    for i, it in enumerate(items):
        header[it.name] = {"dtype": DTYPE_NAMES[it.dtype], "shape": list(it.ref.shape),
                           "data_offsets": offsets[i]}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    f.write(struct.pack("<Q", len(blob)) + blob)
    for i in layout:
        t = items[i].tensor()
        if tuple(t.shape) != items[i].ref.shape:
            raise ConvertError(f"{items[i].source}: read shape {list(t.shape)}, header says "
                               f"{list(items[i].ref.shape)}")
        if t.numel():
            f.write(memoryview(_u8(t).numpy()))
        if on_tensor:
            on_tensor(t.numel() * t.element_size())


def write_pth(f: BinaryIO, items: list[Item], names: list[str], aliases: dict[str, str],
              metadata: dict[str, str], on_tensor: Callable[[int], None] | None = None) -> None:
    """``torch.save({"state_dict": ..., "__torchgraft__": metadata})``; aliases share storage."""
    tensors: dict[str, torch.Tensor] = {}
    for it in items:
        t = it.tensor()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view of a larger storage: save only what it shows
        tensors[it.name] = t
        if on_tensor:
            on_tensor(t.numel() * t.element_size())
    state = {n: tensors[aliases.get(n, n)] for n in names}
    torch.save({"state_dict": state, "__torchgraft__": metadata}, f)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(_u8(a), _u8(b))


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def verify_file(dst: str | os.PathLike, result: ConvertResult) -> list[str]:
    """Re-read DST and compare every tensor bit for bit with what was meant to be written."""
    got = read(dst)
    problems = []
    want = {it.name for it in result.stored} | set(result.aliases)
    missing, extra = want - set(got.refs), set(got.refs) - want
    if missing or extra:
        problems.append(f"names differ: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}")
    for it in result.stored:
        if it.name in got.refs and not same_bits(got.refs[it.name].materialize(), it.tensor()):
            problems.append(f"{it.name}: bytes differ from the source")
    from .inspect_ import provenance

    _, aliases = provenance(got.checkpoint)
    if aliases != result.aliases:
        problems.append(f"aliases recorded {aliases}, expected {result.aliases}")
    for alias, kept in result.aliases.items():
        a, k = got.refs.get(alias), got.refs.get(kept)
        if a is None or k is None or a.alias_key() != k.alias_key():
            problems.append(f"{alias} is not stored shared with {kept}")
    return problems[:20]


def _check_destination(dst: Path) -> None:
    """Refuse, before any work, a destination that cannot become a plain file: a missing or
    unwritable folder, or a folder / special file (even with ``force``)."""
    parent = dst.parent
    if not parent.is_dir():
        raise ConvertError(f"{parent}: folder does not exist; create it first or choose "
                           "another output path")
    if dst.is_dir():
        raise ConvertError(f"{dst} is a folder; give a file name inside it, e.g. "
                           f"{dst / ('model' + dst.suffix if dst.suffix else 'model.safetensors')}")
    if dst.exists() and not dst.is_file():
        raise ConvertError(f"{dst} exists and is not a regular file (a FIFO or device?); "
                           "choose another output path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConvertError(f"{parent}: folder is not writable (permission denied); choose a "
                           "folder you can write to")


def _atomic_write(dst: Path, write: Callable[[BinaryIO], None], force: bool) -> None:
    try:
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.", suffix=".tmp")
    except OSError as err:
        raise ConvertError(f"{dst.parent}: cannot create a file there ({err.strerror}); choose "
                           "a folder you can write to") from None
    try:
        _write_and_place(fd, tmp, dst, write, force)
    except OSError as err:  # disk full, the destination became a folder, ...
        raise ConvertError(f"{dst}: writing failed ({err.strerror or err}); nothing was "
                           "written there") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    with contextlib.suppress(OSError):
        dir_fd = os.open(dst.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _write_and_place(fd: int, tmp: str, dst: Path, write: Callable[[BinaryIO], None],
                     force: bool) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    with os.fdopen(fd, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    if force:
        os.replace(tmp, dst)
    else:
        try:
            os.link(tmp, dst)  # atomic create-if-absent
        except FileExistsError:
            raise ConvertError(f"{dst} appeared while converting; not overwritten") from None
        except OSError:
            if dst.exists():
                raise ConvertError(f"{dst} exists; pass --force to overwrite") from None
            os.replace(tmp, dst)


class _Progress(ProgressBar):
    """Bytes, throughput and tensors done."""

    def __init__(self, total: int, tensors: int, label: str) -> None:
        super().__init__(total, label)
        self.tensors, self.count = tensors, 0

    def tensor_done(self, nbytes: int) -> None:
        self.count += 1
        self.update(nbytes)

    def _draw(self, now: float) -> None:
        super()._draw(now)
        self.stream.write(f"  {self.count}/{self.tensors} tensors")
        self.stream.flush()


def convert(src: Any, dst: str | os.PathLike, *, select: str | None = None,
            prefix: str | None = None, rename: Rename = None, drop: Sequence[str] = (),
            keep: Sequence[str] = (), dtype: str | torch.dtype | None = None,
            model: torch.nn.Module | None = None, model_spec: str | None = None,
            verify: bool = False, force: bool = False,
            trust: bool = False, progress: bool | None = None, adapt: Any = "auto",
            labels: Any = None) -> ConvertResult:
    """Write ``src``'s selected state dict to ``dst`` (see the module docstring)."""
    dst = Path(dst)
    fmt = out_format(dst)
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConvertError(f"dtype {dtype!r}: expected one of bf16, fp16, fp32")
        dtype = DTYPES[dtype]
    _check_destination(dst)
    if isinstance(src, (str, os.PathLike)) and Path(src).exists():
        if dst.exists() and os.path.samefile(src, dst):
            raise ConvertError(f"{dst} is the source file; choose another output name")
    if dst.exists() and not force:
        raise ConvertError(f"{dst} exists; pass --force to overwrite")
    items, dropped, rules, selected, src_format, report = select_items(
        src, select=select, prefix=prefix, rename=rename, drop=drop, keep=keep, dtype=dtype,
        model=model, trust=trust, adapt=adapt, labels=labels)
    if not items:
        raise ConvertError(f"nothing left to write: all {len(dropped)} tensors were dropped "
                           "(check --prefix/--keep/--drop)")
    stored, aliases = dedupe(items)
    prov = {"tool": "torchgraft", "version": _version(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": {**_source_info(src), "format": src_format, "selected": selected},
            "options": {"select": select, "prefix": prefix,
                        "rename": [list(r) for r in rename] if isinstance(rename, list)
                        else rename if rename is None else repr(rename),
                        "drop": list(drop), "keep": list(keep),
                        "dtype": _dt(dtype) if dtype else None,
                        "model": model_spec or (type(model).__name__ if model else None),
                        "trust": trust,
                        "adapt": adapt if model is not None and adapt != "auto" else None,
                        "labels": None if labels is None or isinstance(labels, int)
                        else list(labels)},
            "rules": rules, "tensors": len(items), "stored": len(stored),
            "dropped": len(dropped)}
    meta = {"torchgraft": json.dumps(prov, sort_keys=False)}
    if aliases:
        meta["torchgraft.aliases"] = json.dumps(aliases)
    result = ConvertResult(str(src) if isinstance(src, (str, os.PathLike)) else "<in-memory>",
                           str(dst), fmt, selected, [it.name for it in items], stored, aliases,
                           dropped, rules, prov, report)
    bar = None
    if ProgressBar.maybe(result.nbytes, progress, min_bytes=PROGRESS_MIN_BYTES) is not None:
        bar = _Progress(result.nbytes, len(stored), dst.name)
    tick = bar.tensor_done if bar else None
    try:
        if fmt == "safetensors":
            _atomic_write(dst, lambda f: write_safetensors(f, stored, meta, tick), force)
        else:
            _atomic_write(dst, lambda f: write_pth(f, stored, result.names, aliases, meta, tick),
                          force)
    finally:
        if bar:
            bar.close()
    if verify:
        result.problems = verify_file(dst, result)
        result.verified = not result.problems
    return result


def _version() -> str:
    from . import __version__

    return __version__
