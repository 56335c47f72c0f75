"""Builders of hostile and broken checkpoint files for the torchgraft test-suite.

Nothing here imports torchgraft: the builders only write files.

Two families:

* :func:`all_malicious` writes checkpoints whose pickles, if loaded with ``pickle.load`` or
  ``torch.load(weights_only=False)``, would run a command (``touch MARKER``) or write the marker
  file through ``eval``/``exec``. Each comes back as a :class:`Case` saying which real tensors sit
  next to the payload (``expected``) and which globals the file names (``dangerous``, spelled as
  the pickle spells them: on Linux ``os.system`` is pickled as ``posix system``).
* :func:`all_bad` writes truncated, corrupted, mislabelled and inconsistent files
  (:class:`BadCase`); only the wrong-extension ones should load.

How the payloads are written: a pure-Python pickler (:class:`_CorpusPickler`, a
``pickle._Pickler`` subclass) is handed to ``torch.save`` as ``pickle_module``. Besides the usual
objects it can write

* :class:`RawGlobal` -- a ``GLOBAL``/``STACK_GLOBAL`` opcode with exactly the given module and name
  (so a file can say ``os system`` although ``os.system.__module__`` is ``posix``);
* :class:`Call` -- ``func(*args)`` as a ``REDUCE`` (nestable: ``Call(Call(getattr, ...), ...)``);
* :class:`RawInst` -- the same call through the ``INST`` or ``OBJ`` opcodes instead of ``REDUCE``;

and it can rewrite how chosen tensors are reduced (payload as ``backward_hooks`` or ``metadata``
of ``torch._utils._rebuild_tensor_v2``) or how persistent ids are written. Torch still writes the
real zip container, storages and records, so everything else in the files is genuine.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import os
import pickle
import pickletools
import shlex
import shutil
import struct
import sys
import tempfile
import types
import uuid
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

# --------------------------------------------------------------------------------------------
# Raw pickle building blocks
# --------------------------------------------------------------------------------------------


class RawGlobal:
    """A global written verbatim into the pickle; never resolved or called while writing."""

    def __init__(self, module: str, name: str) -> None:
        self.module = module
        self.name = name

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    # pickle insists that reduce functions are callable
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"corpus stand-in for {self.qualname} is never called")

    def __repr__(self) -> str:
        return f"RawGlobal({self.module!r}, {self.name!r})"


class Call:
    """Pickles as ``func(*args)`` (a ``REDUCE``). ``func`` may itself be a :class:`Call`."""

    def __init__(self, func: Any, *args: Any) -> None:
        self.func = func
        self.args = args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (self.func, self.args)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("corpus stand-in is never called")


class RawInst:
    """Pickles as ``module.name(*args)`` through the ``INST`` (``i``) or ``OBJ`` (``o``) opcode."""

    def __init__(self, module: str, name: str, args: tuple[Any, ...], opcode: str = "i") -> None:
        assert opcode in ("i", "o")
        self.module = module
        self.name = name
        self.args = args
        self.opcode = opcode


def _save_raw_global(self: _CorpusPickler, obj: RawGlobal) -> None:
    if self.proto >= 4:
        self.save(obj.module)
        self.save(obj.name)
        self.write(pickle.STACK_GLOBAL)
    else:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)


def _save_raw_inst(self: _CorpusPickler, obj: RawInst) -> None:
    self.write(pickle.MARK)
    if obj.opcode == "o":
        self.save(RawGlobal(obj.module, obj.name))
        for arg in obj.args:
            self.save(arg)
        self.write(pickle.OBJ)
    else:
        for arg in obj.args:
            self.save(arg)
        self.write(pickle.INST + f"{obj.module}\n{obj.name}\n".encode())
    self.memoize(obj)


TensorHook = Callable[[Callable[..., Any], tuple[Any, ...]], tuple[Any, tuple[Any, ...]]]


class _CorpusPickler(pickle._Pickler):  # type: ignore[name-defined]
    """Pure-Python pickler that understands RawGlobal/RawInst and per-tensor rewrites.

    ``fix_imports`` is forced off so that protocol-2 files say ``builtins`` (not ``__builtin__``)
    unless a :class:`RawGlobal` says otherwise.
    """

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]
    dispatch[RawGlobal] = _save_raw_global
    dispatch[RawInst] = _save_raw_inst

    tensor_hooks: dict[int, TensorHook] = {}
    pid_hook: Callable[[Any], Any] | None = None

    def __init__(self, file: Any, protocol: int | None = None, **_: Any) -> None:
        super().__init__(file, protocol, fix_imports=False)

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is torch.Tensor and id(obj) in self.tensor_hooks:
            func, args = obj.__reduce_ex__(self.proto)
            return self.tensor_hooks[id(obj)](func, tuple(args))
        return NotImplemented

    def save_pers(self, pid: Any) -> None:
        if self.pid_hook is not None:
            pid = self.pid_hook(pid)
        super().save_pers(pid)


def pickle_module(
    tensor_hooks: dict[int, TensorHook] | None = None,
    pid_hook: Callable[[Any], Any] | None = None,
    dump_hook: Callable[[Any], Any] | None = None,
) -> types.ModuleType:
    """A module usable as ``torch.save(..., pickle_module=...)`` writing with the corpus pickler.

    ``dump_hook`` rewrites objects written with the module-level ``dump`` (the legacy format's
    magic number, protocol version and sys_info pickles).
    """

    class Pickler(_CorpusPickler):
        pass

    Pickler.tensor_hooks = dict(tensor_hooks or {})
    Pickler.pid_hook = staticmethod(pid_hook) if pid_hook else None  # type: ignore[assignment]

    def dump(obj: Any, file: Any, protocol: int | None = None, **_: Any) -> None:
        if dump_hook is not None:
            obj = dump_hook(obj)
        Pickler(file, protocol).dump(obj)

    def dumps(obj: Any, protocol: int | None = None, **_: Any) -> bytes:
        buf = io.BytesIO()
        dump(obj, buf, protocol)
        return buf.getvalue()

    mod = types.ModuleType("tgcorpus_pickle")
    mod.Pickler = Pickler  # type: ignore[attr-defined]
    mod.Unpickler = pickle.Unpickler  # type: ignore[attr-defined]
    mod.dump = dump  # type: ignore[attr-defined]
    mod.dumps = dumps  # type: ignore[attr-defined]
    mod.load = pickle.load  # type: ignore[attr-defined]
    mod.loads = pickle.loads  # type: ignore[attr-defined]
    return mod


def corpus_dumps(obj: Any, protocol: int = 2) -> bytes:
    """Pickle ``obj`` (may contain RawGlobal/Call/RawInst) to bytes."""
    return pickle_module().dumps(obj, protocol)


def pickle_globals(data: bytes) -> list[str]:
    """Every global a pickle stream names (GLOBAL, INST, STACK_GLOBAL), as ``module.name``.

    Only the first pickle in ``data`` is scanned. STACK_GLOBAL operands are tracked through the
    memo; good enough for pickles written by CPython.
    """
    found: list[str] = []
    pushed: list[Any] = []
    memo: dict[int, Any] = {}
    string_ops = {
        "SHORT_BINUNICODE",
        "BINUNICODE",
        "BINUNICODE8",
        "UNICODE",
        "STRING",
        "BINSTRING",
        "SHORT_BINSTRING",
    }
    for op, arg, _pos in pickletools.genops(data):
        name = op.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found.append(f"{module}.{attr}")
            pushed.append(None)
        elif name == "STACK_GLOBAL":
            module, attr = pushed[-2], pushed[-1]
            found.append(f"{module}.{attr}")
            pushed.append(None)
        elif name in string_ops:
            pushed.append(arg)
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[int(arg)] = pushed[-1] if pushed else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(int(arg)))
        elif name in ("FRAME", "PROTO"):
            pass
        else:
            pushed.append(None)
    return found


# --------------------------------------------------------------------------------------------
# Zip helpers (torch zip files)
# --------------------------------------------------------------------------------------------


@dataclass
class ZipMember:
    name: str
    header_offset: int  # offset of the local file header
    data_offset: int  # offset of the member's bytes
    size: int
    cd_offset: int  # offset of its central directory entry


@dataclass
class ZipLayout:
    members: dict[str, ZipMember]
    cd_offset: int  # start of the central directory
    eocd_offset: int  # start of the end-of-central-directory record


def zip_layout(data: bytes) -> ZipLayout:
    """Byte positions of each member of a (non-zip64-offset) zip file."""
    eocd = data.rfind(b"PK\x05\x06")
    assert eocd >= 0, "no end of central directory"
    cd_size, cd_offset = struct.unpack_from("<II", data, eocd + 12)
    if cd_offset == 0xFFFFFFFF:  # zip64: locate through the zip64 EOCD record
        z64 = data.rfind(b"PK\x06\x06")
        cd_size, cd_offset = struct.unpack_from("<QQ", data, z64 + 40)
    members: dict[str, ZipMember] = {}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        infos = zf.infolist()
    pos = cd_offset
    for info in infos:
        assert data[pos : pos + 4] == b"PK\x01\x02"
        n, m, k = struct.unpack_from("<HHH", data, pos + 28)
        name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
        data_offset = info.header_offset + 30 + name_len + extra_len
        members[info.filename] = ZipMember(
            info.filename, info.header_offset, data_offset, info.file_size, pos
        )
        pos += 46 + n + m + k
    return ZipLayout(members, cd_offset, eocd)


def member_ending(layout_or_names: ZipLayout | list[str], suffix: str) -> str:
    names = (
        list(layout_or_names.members)
        if isinstance(layout_or_names, ZipLayout)
        else list(layout_or_names)
    )
    hits = [n for n in names if n.endswith(suffix)]
    assert len(hits) == 1, (suffix, names)
    return hits[0]


def rezip(
    data: bytes,
    replace: dict[str, bytes] | None = None,
    rename: dict[str, str] | None = None,
    extra: list[tuple[str, bytes]] | None = None,
) -> bytes:
    """Rewrite a torch zip (stored, CRCs recomputed), replacing/renaming members by full name."""
    replace = replace or {}
    rename = rename or {}
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(data)) as src,
        zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst,
    ):
        for info in src.infolist():
            body = replace.get(info.filename, src.read(info.filename))
            dst.writestr(rename.get(info.filename, info.filename), body)
        for name, body in extra or []:
            dst.writestr(name, body)
    return out.getvalue()


def read_member(data: bytes, suffix: str) -> bytes:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return zf.read(member_ending(zf.namelist(), suffix))


def file_pickles(path: Path) -> list[bytes]:
    """The pickle streams of a checkpoint file (for checking ``dangerous`` against the file)."""
    data = Path(path).read_bytes()
    if zipfile.is_zipfile(path) and data[:2] == b"PK":
        with zipfile.ZipFile(path) as zf:
            return [zf.read(n) for n in zf.namelist() if n.endswith((".pkl", ".npy"))]
    if data[:1] == b"\x80":
        # legacy torch file or plain pickle: consecutive pickles up to the raw storages
        streams = []
        f = io.BytesIO(data)
        while f.tell() < len(data):
            start = f.tell()
            try:
                for op, _arg, _pos in pickletools.genops(f):
                    if op.name == "STOP":
                        break
            except Exception:
                break
            streams.append(data[start : f.tell()])
            if f.tell() < len(data) and data[f.tell() : f.tell() + 1] != b"\x80":
                break
        return streams
    return []


def pickled_globals_of(path: Path) -> set[str]:
    out: set[str] = set()
    for stream in file_pickles(path):
        if stream[:6] == b"\x93NUMPY":  # .npy member: the pickle follows the header
            header_len = struct.unpack_from("<H", stream, 8)[0]
            stream = stream[10 + header_len :]
            if not stream.startswith(b"\x80"):
                continue
        out.update(pickle_globals(stream))
    return out


# --------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------


def assert_bit_exact(actual: Any, expected: torch.Tensor, name: str = "") -> None:
    """Same dtype, same shape, same bytes (NaN payloads and -0.0 included)."""
    assert isinstance(actual, torch.Tensor), f"{name}: got {type(actual).__name__}, not a Tensor"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    a = actual.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    b = expected.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    assert torch.equal(a, b), f"{name}: bytes differ"


def sample_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """A small state dict touching the awkward corners: NaN/-0.0/inf, half types, views."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 3, generator=g)
    w[0, 0] = float("nan")
    w[0, 1] = -0.0
    w[0, 2] = float("inf")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7
    return {
        "w": w,
        "b": torch.randn(4, generator=g).half(),
        "bf": torch.randn(2, 3, generator=g).bfloat16(),
        "idx": torch.arange(-2, 3, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.25, dtype=torch.float64),
        "base": base,
        "view_t": base.t(),  # non-contiguous view sharing base's storage
        "window": base[1:3, 2:5],  # view with a storage offset
        "empty": torch.empty(0, 3),
    }


def clone_all(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


def small_tensors(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(3, 2, generator=g),
        "b": torch.randn(3, generator=g).half(),
        "n": torch.tensor(5, dtype=torch.int64),
    }


# --------------------------------------------------------------------------------------------
# Payloads
# --------------------------------------------------------------------------------------------


def _touch(marker: Path) -> str:
    return f"touch {shlex.quote(str(marker))}"


def _py_write(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').close()"


class _NativeReduce:
    """``__reduce__`` returning a real function: the plain C pickler names it as Python sees it."""

    def __init__(self, func: Callable[..., Any], *args: Any) -> None:
        self.func = func
        self.args = args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (self.func, self.args)


def payload(kind: str, marker: Path) -> tuple[Any, list[str]]:
    """(payload object, globals it names that would run code). Kinds: see PAYLOAD_KINDS."""
    cmd = _touch(marker)
    if kind == "os_system":
        return Call(RawGlobal("os", "system"), cmd), ["os.system"]
    if kind == "posix_system":  # what pickling the real os.system gives on Linux
        return _NativeReduce(os.system, cmd), ["posix.system"]
    if kind == "subprocess_popen":
        return Call(RawGlobal("subprocess", "Popen"), ["touch", str(marker)]), ["subprocess.Popen"]
    if kind == "builtins_eval":
        return Call(RawGlobal("builtins", "eval"), _py_write(marker)), ["builtins.eval"]
    if kind == "builtins_exec":
        code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('pwned')\n"
        return Call(RawGlobal("builtins", "exec"), code), ["builtins.exec"]
    if kind == "py2_builtin_eval":  # Python 2 spelling; pickle maps it to builtins.eval
        return Call(RawGlobal("__builtin__", "eval"), _py_write(marker)), ["__builtin__.eval"]
    if kind == "import_then_call":  # operator.methodcaller('system', cmd)(__import__('os'))
        caller = Call(RawGlobal("operator", "methodcaller"), "system", cmd)
        return Call(caller, Call(RawGlobal("builtins", "__import__"), "os")), [
            "operator.methodcaller",
            "builtins.__import__",
        ]
    if kind == "getattr_chain":  # getattr(__import__('os'), 'system')(cmd)
        os_mod = Call(RawGlobal("builtins", "__import__"), "os")
        system = Call(RawGlobal("builtins", "getattr"), os_mod, "system")
        return Call(system, cmd), ["builtins.getattr", "builtins.__import__"]
    if kind == "inst_opcode":
        return RawInst("os", "system", (cmd,), "i"), ["os.system"]
    if kind == "obj_opcode":
        return RawInst("posix", "system", (cmd,), "o"), ["posix.system"]
    if kind == "copyreg_reconstructor":
        # copyreg._reconstructor(Popen, Popen, argv) runs Popen.__init__(obj, argv)
        popen = RawGlobal("subprocess", "Popen")
        return Call(RawGlobal("copyreg", "_reconstructor"), popen, popen, ["touch", str(marker)]), [
            "subprocess.Popen"
        ]
    if kind == "torch_rebuild_from_type":
        # a torch-internal rebuild helper that calls whatever function it is handed
        func = RawGlobal("torch._tensor", "_rebuild_from_type_v2")
        return Call(func, RawGlobal("os", "system"), RawGlobal("torch", "Tensor"), (cmd,), {}), [
            "os.system"
        ]
    raise ValueError(kind)


PAYLOAD_KINDS = [
    "os_system",
    "posix_system",
    "subprocess_popen",
    "builtins_eval",
    "builtins_exec",
    "py2_builtin_eval",
    "import_then_call",
    "getattr_chain",
    "inst_opcode",
    "obj_opcode",
    "copyreg_reconstructor",
    "torch_rebuild_from_type",
]


# --------------------------------------------------------------------------------------------
# Malicious cases
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    """One hostile checkpoint.

    ``expected``: the real tensors ``tg.read(path)`` should give (keys and bytes); may be empty.
    ``dangerous``: code-running globals the file names, as written in the file (``module.name``).
    ``must_report``: the subset that ``placeholders`` must list when the file loads
    (defaults to all of ``dangerous``).
    ``must_load``: loading must succeed (no error allowed), e.g. a whole-model pickle.
    ``may_be_empty``: a reader that declines the file's tensor encoding may return no tensors;
    tensors it does return must match ``expected``.
    ``model_factory``: builds a fresh model the checkpoint fits (whole-model pickles).
    ``hidden_module``/``module_source``: the throwaway module a whole-model pickle refers to; it
    is gone after building. The source is kept only so a checker can re-create it.
    """

    name: str
    path: Path
    expected: dict[str, torch.Tensor]
    dangerous: list[str]
    kind: str  # torch-zip | torch-legacy | npz | pickle
    must_report: list[str] | None = None
    must_load: bool = False
    may_be_empty: bool = False
    model_factory: Callable[[], nn.Module] | None = None
    hidden_module: str | None = None
    module_source: str | None = None
    notes: str = ""

    def __post_init__(self) -> None:
        if self.must_report is None:
            self.must_report = list(self.dangerous)

    def __iter__(self) -> Iterator[Any]:  # lets callers write ``for name, path in ...``
        return iter((self.name, self.path))


def _zip_save(obj: Any, path: Path, protocol: int = 2, **hooks: Any) -> Path:
    torch.save(obj, path, pickle_module=pickle_module(**hooks), pickle_protocol=protocol)
    return path


def _legacy_save(obj: Any, path: Path, **hooks: Any) -> Path:
    torch.save(
        obj,
        path,
        pickle_module=pickle_module(**hooks),
        pickle_protocol=2,
        _use_new_zipfile_serialization=False,
    )
    return path


def _zip_payload_case(kind: str, tmp_dir: Path, marker: Path) -> Case:
    obj, dangerous = payload(kind, marker)
    tensors = sample_tensors()
    expected = clone_all(tensors)
    state = dict(tensors)
    state["evil"] = obj
    path = tmp_dir / f"zip_{kind}.pth"
    if kind == "posix_system":  # torch.save's own default (C) pickler, no corpus pickler at all
        torch.save(state, path)
    else:
        _zip_save(state, path)
    return Case(
        f"zip_{kind}",
        path,
        expected,
        dangerous,
        "torch-zip",
        notes=f"torch zip state dict {{...sample tensors, 'evil': {kind} payload}}",
    )


def _zip_stack_global_case(tmp_dir: Path, marker: Path) -> Case:
    obj, dangerous = payload("os_system", marker)
    tensors = small_tensors()
    path = _zip_save({**tensors, "evil": obj}, tmp_dir / "zip_protocol4.pth", protocol=4)
    return Case(
        "zip_protocol4_stack_global",
        path,
        clone_all(tensors),
        dangerous,
        "torch-zip",
        notes="protocol 4: every global (os.system too) is a STACK_GLOBAL",
    )


def _zip_hooks_case(tmp_dir: Path, marker: Path) -> Case:
    tensors = small_tensors()
    evil_hooks = Call(
        RawGlobal("collections", "OrderedDict"),
        [("hook", Call(RawGlobal("posix", "system"), _touch(marker)))],
    )

    def in_hooks(func: Any, args: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
        assert func is torch._utils._rebuild_tensor_v2 and len(args) == 6
        return func, args[:5] + (evil_hooks,)

    path = _zip_save(
        tensors, tmp_dir / "zip_backward_hooks.pth", tensor_hooks={id(tensors["w"]): in_hooks}
    )
    return Case(
        "zip_payload_in_backward_hooks",
        path,
        clone_all(tensors),
        ["posix.system"],
        "torch-zip",
        notes="w's _rebuild_tensor_v2 backward_hooks = OrderedDict([('hook', "
        "posix.system(cmd))]) instead of OrderedDict()",
    )


def _zip_metadata_case(tmp_dir: Path, marker: Path) -> Case:
    tensors = small_tensors()

    def in_metadata(func: Any, args: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
        assert func is torch._utils._rebuild_tensor_v2 and len(args) == 6
        return func, args + (Call(RawGlobal("os", "system"), _touch(marker)),)

    path = _zip_save(
        tensors, tmp_dir / "zip_metadata.pth", tensor_hooks={id(tensors["b"]): in_metadata}
    )
    return Case(
        "zip_payload_in_tensor_metadata",
        path,
        clone_all(tensors),
        ["os.system"],
        "torch-zip",
        notes="b's _rebuild_tensor_v2 gets a 7th (metadata) argument os.system(cmd)",
    )


def _zip_nested_case(tmp_dir: Path, marker: Path) -> Case:
    tensors = sample_tensors(3)
    evil, dangerous = payload("subprocess_popen", marker)
    key_evil, key_dangerous = payload("os_system", marker)
    ckpt = {
        "epoch": 3,
        "state_dict": tensors,
        "optimizer": {"state": {0: {"step": 10, "exp_avg": evil}}, "param_groups": [{"lr": 0.1}]},
        "meta": {key_evil: "payload used as a dict key"},
    }
    path = _zip_save(ckpt, tmp_dir / "zip_training_ckpt.pth")
    return Case(
        "zip_training_checkpoint_payloads",
        path,
        clone_all(tensors),
        dangerous + key_dangerous,
        "torch-zip",
        notes="training checkpoint; expected = ckpt['state_dict'] (auto-selected); "
        "payloads inside optimizer state and as a dict key under 'meta'",
    )


def _legacy_case(tmp_dir: Path, marker: Path) -> Case:
    tensors = sample_tensors(4)
    evil, dangerous = payload("os_system", marker)
    path = _legacy_save({**tensors, "evil": evil}, tmp_dir / "legacy_os_system.pt")
    return Case(
        "legacy_os_system",
        path,
        clone_all(tensors),
        dangerous,
        "torch-legacy",
        notes="legacy (non-zip) torch.save; payload next to the tensors in the main pickle",
    )


def _legacy_sysinfo_case(tmp_dir: Path, marker: Path) -> Case:
    tensors = small_tensors()
    evil, dangerous = payload("builtins_eval", marker)

    def poison(obj: Any) -> Any:
        if isinstance(obj, dict) and "protocol_version" in obj:  # the sys_info pickle
            return {**obj, "evil": evil}
        return obj

    path = _legacy_save(tensors, tmp_dir / "legacy_sysinfo.pt", dump_hook=poison)
    return Case(
        "legacy_payload_in_sys_info",
        path,
        clone_all(tensors),
        dangerous,
        "torch-legacy",
        must_report=[],  # a reader may skip the header pickles without unpickling them
        notes="payload in the legacy header's sys_info pickle (3rd pickle), which "
        "torch.load unpickles before the data",
    )


def _load_from_bytes_case(tmp_dir: Path, marker: Path) -> Case:
    tensors = small_tensors()
    evil, dangerous = payload("builtins_eval", marker)

    def poison(obj: Any) -> Any:
        if isinstance(obj, dict) and "protocol_version" in obj:  # legacy sys_info pickle
            return {**obj, "evil": evil}
        return obj

    # What pickle.dumps(tensor) writes: the storage is reduced to
    # torch.storage._load_from_bytes(<legacy torch.save of the storage>). Here that embedded
    # legacy file carries a payload in its sys_info header.
    w = tensors["w"]
    storage = torch.storage.TypedStorage(  # what Tensor.__reduce_ex__ hands to pickle
        wrap_storage=w.untyped_storage(), dtype=w.dtype, _internal=True
    )
    buf = io.BytesIO()
    torch.save(
        storage,
        buf,
        pickle_module=pickle_module(dump_hook=poison),
        pickle_protocol=2,
        _use_new_zipfile_serialization=False,
    )
    poisoned = Call(RawGlobal("torch.storage", "_load_from_bytes"), buf.getvalue())

    def swap_storage(func: Any, args: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
        return func, (poisoned,) + args[1:]

    # no persistent ids: a plain pickle, every storage goes through _load_from_bytes
    data = io.BytesIO()
    pickle_module(tensor_hooks={id(tensors["w"]): swap_storage}).Pickler(data, 2).dump(tensors)
    path = tmp_dir / "pickled_tensors.pkl"
    path.write_bytes(data.getvalue())
    return Case(
        "plain_pickle_tensor_load_from_bytes",
        path,
        clone_all(tensors),
        ["torch.storage._load_from_bytes"] + dangerous,
        "pickle",
        must_report=[],
        may_be_empty=True,
        notes="pickle.dumps-style state dict: storages are torch.storage._load_from_bytes(b) "
        "(= torch.load(b, weights_only=False)) with b a legacy torch file; w's embedded file has "
        "builtins.eval(...) in its sys_info pickle. Bytes are pickled the protocol-2 way: "
        "_codecs.encode(str, 'latin1'). A reader may decode the embedded files with its own "
        "restricted unpickler (then w/b/n load and builtins.eval is a placeholder) or refuse "
        "_load_from_bytes (then nothing loads, or an error names it)",
    )


def _npz_case(tmp_dir: Path, marker: Path) -> Case:
    evil, dangerous = payload("posix_system", marker)
    arrays = {
        "w": np.arange(12, dtype=np.float32).reshape(3, 4) / 3,
        "h": np.array([1.5, -0.0, 65504.0], dtype=np.float16),
        "idx": np.arange(5, dtype=np.int64),
        "mask": np.array([True, False]),
    }
    path = tmp_dir / "arrays_object.npz"
    obj_array = np.empty(2, dtype=object)
    obj_array[0] = "harmless"
    obj_array[1] = evil
    npy = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        npy, {"descr": "|O", "fortran_order": False, "shape": (2,)}
    )
    pickle.dump(obj_array, npy, protocol=3)  # exactly what np.save(allow_pickle=True) writes
    with zipfile.ZipFile(path, "w") as zf:
        for k, v in arrays.items():
            member = io.BytesIO()
            np.save(member, v)
            zf.writestr(f"{k}.npy", member.getvalue())
        zf.writestr("evil.npy", npy.getvalue())
    expected = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    return Case(
        "npz_object_array",
        path,
        expected,
        dangerous,
        "npz",
        notes="npz with w/h/idx/mask arrays and evil.npy: dtype=object array "
        "['harmless', posix.system(cmd)]",
    )


def _detectron2_pkl_case(tmp_dir: Path, marker: Path) -> Case:
    evil, dangerous = payload("getattr_chain", marker)
    rng = np.random.default_rng(0)
    model = {
        "backbone.stem.conv1.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "backbone.stem.conv1.norm.bias": rng.standard_normal(4).astype(np.float32),
        "backbone.stem.conv1.norm.running_var": rng.random(4).astype(np.float64),
        "roi_heads.box_predictor.cls_score.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "roi_heads.num_classes": np.array(3, dtype=np.int64),
    }
    obj = {
        "model": model,
        "__author__": "Detectron2 Model Zoo",
        "matching_heuristics": True,
        "extra": evil,
    }
    path = tmp_dir / "model_final_d2.pkl"
    path.write_bytes(corpus_dumps(obj, protocol=4))
    expected = {k: torch.from_numpy(v.copy()) for k, v in model.items()}
    return Case(
        "pkl_detectron2_getattr_chain",
        path,
        expected,
        dangerous,
        "pickle",
        notes="detectron2 model-zoo style {'model': {name: ndarray}, '__author__': ...}; "
        "expected = obj['model'] (auto-selected); protocol 4",
    )


# --- whole pickled nn.Module ----------------------------------------------------------------

MODEL_SOURCE = """\
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = Block()
        self.layers = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        self.heads = nn.ModuleDict({"cls": nn.Linear(2, 3), "box": nn.Linear(2, 4, bias=False)})
        self.scale = nn.Parameter(torch.tensor([0.5, 2.0]))
        self.register_buffer("steps", torch.tensor(7, dtype=torch.int64))
        self.register_buffer("cache", torch.zeros(3), persistent=False)
        self.register_parameter("unused", None)

    def forward(self, x):
        x = self.stem(x).mean((2, 3))
        return self.layers(x) * self.scale
"""


def make_twin_model() -> nn.Module:
    """A fresh model with the whole-model pickles' architecture (same source, new namespace)."""
    ns: dict[str, Any] = {"__name__": "tgcorpus_twin"}
    exec(compile(MODEL_SOURCE, "<tgcorpus twin model>", "exec"), ns)
    return ns["Net"]()


def _whole_model_case(tmp_dir: Path, marker: Path, *, legacy: bool, evil: bool) -> Case:
    modname = f"tgcorpus_hidden_{uuid.uuid4().hex[:12]}"
    src_dir = Path(tempfile.mkdtemp(prefix="tgcorpus_src_"))
    dangerous: list[str] = []
    try:
        (src_dir / f"{modname}.py").write_text(MODEL_SOURCE)
        sys.path.insert(0, str(src_dir))
        importlib.invalidate_caches()
        mod = importlib.import_module(modname)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(7)
            model = mod.Net()
            with torch.no_grad():
                model.stem.bn.running_mean.normal_()
                model.stem.bn.running_var.uniform_(0.5, 2.0)
                model.stem.bn.num_batches_tracked.fill_(5)
                model.cache.fill_(9.0)
        model.eval()
        expected = clone_all(model.state_dict())
        if evil:
            obj, dangerous = payload("posix_system", marker)
            model.evil = obj  # plain attribute: lands in the module's pickled __dict__
        suffix = "legacy" if legacy else "zip"
        tag = "_payload" if evil else ""
        path = tmp_dir / f"whole_model_{suffix}{tag}.pt"
        if legacy:
            torch.save(model, path, _use_new_zipfile_serialization=False)
        else:
            torch.save(model, path)
        del model, mod
    finally:
        sys.modules.pop(modname, None)
        if str(src_dir) in sys.path:
            sys.path.remove(str(src_dir))
        shutil.rmtree(src_dir, ignore_errors=True)
        importlib.invalidate_caches()
    assert importlib.util.find_spec(modname) is None
    name = f"whole_model_{suffix}{tag}"
    return Case(
        name,
        path,
        expected,
        dangerous,
        "torch-legacy" if legacy else "torch-zip",
        must_load=not evil,
        model_factory=make_twin_model,
        hidden_module=modname,
        module_source=MODEL_SOURCE,
        notes=f"torch.save(model) of {modname}.Net (module deleted after saving); expected = "
        "model.state_dict() (no 'cache': non-persistent buffer, no 'unused': None param)"
        + ("; model.evil = posix.system(cmd)" if evil else "")
        + (
            "; legacy format: classes arrive as ('module', cls, file, source) ids" if legacy else ""
        ),
    )


def control_case(tmp_dir: Path) -> Case:
    """A clean ``torch.save`` state dict (default pickler): the negative control."""
    tensors = sample_tensors(11)
    path = tmp_dir / "control_clean.pth"
    torch.save(tensors, path)
    return Case(
        "control_clean",
        path,
        clone_all(tensors),
        [],
        "torch-zip",
        must_load=True,
        notes="plain torch.save of the sample tensors; nothing dangerous",
    )


_BUILDERS: dict[str, Callable[[Path, Path], Case]] = {
    **{f"zip_{k}": (lambda d, m, k=k: _zip_payload_case(k, d, m)) for k in PAYLOAD_KINDS},
    "zip_protocol4_stack_global": _zip_stack_global_case,
    "zip_payload_in_backward_hooks": _zip_hooks_case,
    "zip_payload_in_tensor_metadata": _zip_metadata_case,
    "zip_training_checkpoint_payloads": _zip_nested_case,
    "legacy_os_system": _legacy_case,
    "legacy_payload_in_sys_info": _legacy_sysinfo_case,
    "plain_pickle_tensor_load_from_bytes": _load_from_bytes_case,
    "npz_object_array": _npz_case,
    "pkl_detectron2_getattr_chain": _detectron2_pkl_case,
    "whole_model_zip": lambda d, m: _whole_model_case(d, m, legacy=False, evil=False),
    "whole_model_zip_payload": lambda d, m: _whole_model_case(d, m, legacy=False, evil=True),
    "whole_model_legacy": lambda d, m: _whole_model_case(d, m, legacy=True, evil=False),
}

MALICIOUS_NAMES: list[str] = list(_BUILDERS)


def build_malicious(name: str, tmp_dir: Path | str, marker: Path | str) -> Case:
    """Build one case by name into ``tmp_dir``; ``marker`` is the file its payload would create."""
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    case = _BUILDERS[name](tmp_dir, Path(marker))
    assert case.name == name, (case.name, name)
    return case


def all_malicious(tmp_dir: Path | str, marker: Path | str) -> list[Case]:
    """Every hostile case, written into ``tmp_dir``. Cases unpack as ``(name, path)``."""
    return [build_malicious(n, tmp_dir, marker) for n in MALICIOUS_NAMES]


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


@dataclass
class BadCase:
    """A broken or mislabelled input.

    ``should_load``: True only for files whose content is fine but whose extension lies.
    ``names_any``: the error message must contain one of these (default: the path's name).
    ``mentions``: words the error message must contain (e.g. ``"LFS"``), case-insensitive.
    ``error``: name of the ``tg`` exception class expected, when one is clearly right.
    """

    name: str
    path: Path
    should_load: bool
    names_any: list[str] = field(default_factory=list)
    mentions: list[str] = field(default_factory=list)
    error: str | None = None
    expected: dict[str, torch.Tensor] = field(default_factory=dict)
    notes: str = ""

    def __post_init__(self) -> None:
        if not self.names_any:
            self.names_any = [self.path.name]

    def __iter__(self) -> Iterator[Any]:
        return iter((self.name, self.path, self.should_load))


def seed_tensors() -> dict[str, torch.Tensor]:
    """Tensors of the valid seed files; ``big`` is 4 KiB so cuts can land inside its record."""
    g = torch.Generator().manual_seed(5)
    return {
        "big": torch.randn(32, 32, generator=g),
        "small": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "h16": torch.randn(4, generator=g).half(),
    }


def torch_zip_bytes(tensors: dict[str, torch.Tensor] | None = None, stem: str = "archive") -> bytes:
    """A torch zip as ``torch.save`` writes it to a file named ``<stem>.pth``."""
    tensors = seed_tensors() if tensors is None else tensors
    d = Path(tempfile.mkdtemp(prefix="tgcorpus_"))
    try:
        p = d / f"{stem}.pth"
        torch.save(tensors, p)
        return p.read_bytes()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def torch_legacy_bytes(tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    buf = io.BytesIO()
    torch.save(
        seed_tensors() if tensors is None else tensors, buf, _use_new_zipfile_serialization=False
    )
    return buf.getvalue()


def safetensors_bytes(tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    tensors = seed_tensors() if tensors is None else tensors
    d = Path(tempfile.mkdtemp(prefix="tgcorpus_"))
    try:
        p = d / "x.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(p))
        return p.read_bytes()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def raw_safetensors(header: Any, data: bytes, header_len: int | None = None) -> bytes:
    """Safetensors bytes from a header (dict, str or bytes), padding like the reference writer."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode()
    header = header + b" " * (-len(header) % 8)
    n = len(header) if header_len is None else header_len
    return struct.pack("<Q", n) + header + data


LFS_POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 123456789\n"
)

HTML_PAGE = (
    '<!DOCTYPE html>\n<html lang="en">\n<head><meta charset="utf-8">'
    "<title>404 Not Found</title></head>\n<body><h1>Not Found</h1>"
    "<p>The requested URL was not found on this server.</p></body>\n</html>\n"
)


def _cut(data: bytes, at: int) -> bytes:
    assert 0 < at < len(data)
    return data[:at]


def _bad_torch_zip(d: Path) -> list[BadCase]:
    cases: list[BadCase] = []
    zdata = torch_zip_bytes(stem="seed")
    lay = zip_layout(zdata)
    pkl = lay.members[member_ending(lay, "/data.pkl")]
    rec = {k: lay.members[member_ending(lay, f"/data/{i}")] for i, k in enumerate(seed_tensors())}
    big = rec["big"]
    assert big.size == 4096

    def put(name: str, data: bytes, notes: str, suffix: str = ".pth") -> None:
        p = d / f"{name}{suffix}"
        p.write_bytes(data)
        cases.append(BadCase(name, p, False, notes=notes))

    put("zip_cut_in_local_header", _cut(zdata, 17), "cut inside data.pkl's local file header")
    put(
        "zip_cut_in_data_pkl",
        _cut(zdata, pkl.data_offset + pkl.size // 2),
        "cut halfway through data.pkl",
    )
    put(
        "zip_cut_in_tensor_record",
        _cut(zdata, big.data_offset + 1000),
        "cut 1000 bytes into the 4 KiB record of 'big'",
    )
    put(
        "zip_cut_after_last_record",
        _cut(zdata, lay.cd_offset),
        "every record intact, central directory and EOCD missing",
    )
    put(
        "zip_cut_in_central_directory",
        _cut(zdata, lay.cd_offset + 30),
        "cut 30 bytes into the central directory",
    )
    put("zip_cut_in_eocd", _cut(zdata, len(zdata) - 1), "last byte of the EOCD record missing")
    put("zip_half", _cut(zdata, len(zdata) // 2), "first half of the file")

    flipped = bytearray(zdata)
    flipped[lay.eocd_offset + 3] ^= 0xFF
    put("zip_flip_eocd_signature", bytes(flipped), "PK\\x05\\x06 -> PK\\x05\\xf9")

    flipped = bytearray(zdata)
    flipped[pkl.cd_offset + 2] ^= 0xFF
    put(
        "zip_flip_central_dir_signature",
        bytes(flipped),
        "data.pkl's central directory entry signature broken",
    )

    flipped = bytearray(zdata)
    assert zdata[pkl.data_offset + pkl.size - 1 : pkl.data_offset + pkl.size] == b"."
    flipped[pkl.data_offset + pkl.size - 1] = 0xFF  # STOP -> an opcode that does not exist
    put(
        "zip_flip_pickle_stop",
        bytes(flipped),
        "data.pkl's final STOP opcode replaced by 0xff (also breaks the CRC)",
    )

    # consistent zips (CRCs right) with inconsistent torch content
    put(
        "zip_missing_storage_record",
        rezip(zdata, rename={big.name: big.name.rsplit("/", 1)[0] + "/77"}),
        "record data/0 renamed data/77; data.pkl still refers to storage '0'",
    )

    tensors = seed_tensors()

    def oversize(func: Any, args: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
        return func, (args[0], args[1], (64, 64), (64, 1)) + args[4:]

    buf = io.BytesIO()
    hooks = {id(tensors["big"]): oversize}
    torch.save(tensors, buf, pickle_module=pickle_module(tensor_hooks=hooks))
    put(
        "zip_tensor_exceeds_storage",
        buf.getvalue(),
        "'big' claims shape (64, 64) over a 32*32-element storage",
    )

    def huge_numel(pid: Any) -> Any:
        if isinstance(pid, tuple) and pid[:1] == ("storage",) and pid[2] == "0":
            return pid[:4] + (2**40,)
        return pid

    def huge_view(func: Any, args: tuple[Any, ...]) -> tuple[Any, tuple[Any, ...]]:
        return func, (args[0], args[1], (2**40,), (1,)) + args[4:]

    tensors = seed_tensors()
    buf = io.BytesIO()
    torch.save(
        tensors,
        buf,
        pickle_module=pickle_module(
            tensor_hooks={id(tensors["big"]): huge_view}, pid_hook=huge_numel
        ),
    )
    put(
        "zip_storage_numel_lies",
        buf.getvalue(),
        "storage '0' claims 2**40 float32 elements (4 TiB) and 'big' views all of them; the "
        "record holds 4 KiB. Must fail without trying to allocate",
    )

    huge = b"\x80\x05\x96" + (2**40).to_bytes(8, "little") + b"\x00" * 16 + b"."
    put(
        "zip_pickle_bytearray8_huge",
        rezip(zdata, replace={pkl.name: huge}),
        "data.pkl is a protocol-5 BYTEARRAY8 claiming 2**40 bytes; CPython's C unpickler "
        "allocates the claimed size before reading",
    )

    def dotdot(pid: Any) -> Any:
        if isinstance(pid, tuple) and pid[:1] == ("storage",) and pid[2] == "0":
            return pid[:2] + ("../../0",) + pid[3:]
        return pid

    buf = io.BytesIO()
    torch.save(seed_tensors(), buf, pickle_module=pickle_module(pid_hook=dotdot))
    raw = buf.getvalue()
    names = zipfile.ZipFile(io.BytesIO(raw)).namelist()
    rec0 = member_ending(names, "/data/0")
    put(
        "zip_member_dotdot_record",
        rezip(raw, rename={rec0: rec0.rsplit("/", 1)[0] + "/../../0"}),
        "storage key '../../0'; the record is stored as 'archive/data/../../0'",
    )
    put(
        "zip_member_dotdot_extra",
        rezip(zdata, extra=[(pkl.name.split("/")[0] + "/../../evil.txt", b"outside\n")]),
        "a valid torch zip plus an unused member 'seed/../../evil.txt'",
    )
    return cases


def _bad_safetensors(d: Path) -> list[BadCase]:
    cases: list[BadCase] = []
    f32 = struct.pack("<4f", 1.0, 2.0, 3.0, 4.0)

    def put(name: str, data: bytes, notes: str) -> None:
        p = d / f"{name}.safetensors"
        p.write_bytes(data)
        cases.append(BadCase(name, p, False, notes=notes))

    def t(begin: int, end: int, shape: list[int] | None = None, dtype: str = "F32") -> dict:
        n = (end - begin) // 4 if shape is None else None
        return {
            "dtype": dtype,
            "shape": shape if shape is not None else [n],
            "data_offsets": [begin, end],
        }

    good_header = {"a": t(0, 16)}
    put(
        "st_header_len_exceeds_file",
        raw_safetensors(good_header, f32, header_len=4096),
        "8-byte length says 4096 header bytes; the file is far shorter",
    )
    put(
        "st_absurd_header_len",
        raw_safetensors(good_header, f32, header_len=2**60),
        "header length 2**60",
    )
    put(
        "st_data_beyond_file",
        raw_safetensors({"a": t(0, 4000)}, f32),
        "tensor claims 4000 data bytes, file holds 16",
    )
    put(
        "st_offsets_out_of_range",
        raw_safetensors({"a": t(0, 16), "b": t(64, 80)}, f32),
        "second tensor's offsets start past the end of the data",
    )
    put(
        "st_offsets_reversed",
        raw_safetensors({"a": {"dtype": "F32", "shape": [0], "data_offsets": [16, 0]}}, f32),
        "data_offsets [16, 0]",
    )
    put(
        "st_negative_offset",
        raw_safetensors({"a": {"dtype": "F32", "shape": [4], "data_offsets": [-16, 0]}}, f32),
        "data_offsets [-16, 0]",
    )
    put(
        "st_overlapping",
        raw_safetensors({"a": t(0, 16), "b": t(8, 24)}, f32 + f32[:8]),
        "a = [0, 16), b = [8, 24): overlap",
    )
    put(
        "st_shape_mismatch",
        raw_safetensors({"a": t(0, 16, shape=[3, 3])}, f32),
        "shape [3, 3] float32 needs 36 bytes, offsets span 16",
    )
    dup = (
        '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        '"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}'
    )
    put("st_duplicate_names", raw_safetensors(dup, f32), "the name 'a' appears twice in the JSON")
    put(
        "st_bad_json",
        raw_safetensors(b'{"a": {"dtype": "F32", "shape": [4], ', f32),
        "header is not JSON",
    )
    put(
        "st_unknown_dtype",
        raw_safetensors({"a": t(0, 16, shape=[4], dtype="F33")}, f32),
        "dtype 'F33'",
    )
    st = safetensors_bytes()
    put("st_truncated_data", _cut(st, len(st) - 100), "valid file minus its last 100 bytes")
    put("st_tiny", b"\x10\x00\x00\x00\x00", "5 bytes")
    return cases


def _bad_misc(d: Path) -> list[BadCase]:
    cases: list[BadCase] = []

    p = d / "empty.pth"
    p.write_bytes(b"")
    cases.append(BadCase("zero_length", p, False, notes="0 bytes"))

    p = d / "pytorch_model.bin"
    p.write_text(LFS_POINTER)
    cases.append(
        BadCase(
            "lfs_pointer_bin",
            p,
            False,
            mentions=["LFS"],
            notes="Git LFS pointer instead of the weights",
        )
    )
    p = d / "model_lfs.safetensors"
    p.write_text(LFS_POINTER)
    cases.append(
        BadCase(
            "lfs_pointer_safetensors",
            p,
            False,
            mentions=["LFS"],
            notes="Git LFS pointer named .safetensors",
        )
    )

    p = d / "download.pth"
    p.write_text(HTML_PAGE)
    cases.append(
        BadCase(
            "html_page_pth", p, False, mentions=["HTML"], notes="an HTTP error page saved as .pth"
        )
    )
    p = d / "weights_html.safetensors"
    p.write_text("\n  <html><head><title>Access denied</title></head><body>403</body></html>\n")
    cases.append(
        BadCase(
            "html_page_safetensors",
            p,
            False,
            mentions=["HTML"],
            notes="lower-case <html> after blank space, no doctype",
        )
    )

    p = d / "picture.pth"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    cases.append(BadCase("png_as_pth", p, False, notes="PNG bytes"))
    p = d / "notes.pt"
    p.write_text("these are not the weights you are looking for\n" * 20)
    cases.append(BadCase("text_as_pt", p, False, notes="plain text"))

    p = d / "does_not_exist.pth"
    cases.append(
        BadCase(
            "missing_file", p, False, error="CheckpointNotFoundError", notes="path does not exist"
        )
    )
    p = d / "empty_dir"
    p.mkdir()
    cases.append(BadCase("empty_directory", p, False, notes="a directory holding nothing"))

    legacy = torch_legacy_bytes()
    p = d / "legacy_cut_in_storage.pt"
    p.write_bytes(_cut(legacy, len(legacy) - 2000))
    cases.append(
        BadCase(
            "legacy_cut_in_storage",
            p,
            False,
            notes="legacy file missing the last 2000 bytes of raw storage",
        )
    )
    main_pickle_end = sum(len(s) for s in file_pickles_from_bytes(legacy)[:4])
    p = d / "legacy_cut_in_pickle.pt"
    p.write_bytes(_cut(legacy, main_pickle_end - 20))
    cases.append(
        BadCase(
            "legacy_cut_in_pickle",
            p,
            False,
            notes="legacy file cut 20 bytes before the end of the main pickle",
        )
    )

    plain = pickle.dumps({"model": {"w": np.arange(100, dtype=np.float32)}}, protocol=4)
    p = d / "plain_cut.pkl"
    p.write_bytes(_cut(plain, len(plain) - 50))
    cases.append(BadCase("pickle_cut", p, False, notes="plain pickle missing its last 50 bytes"))

    npz = io.BytesIO()
    np.savez(npz, w=np.arange(1000, dtype=np.float32))
    p = d / "cut.npz"
    p.write_bytes(_cut(npz.getvalue(), 2000))
    cases.append(BadCase("npz_cut", p, False, notes="npz cut inside the array"))
    return cases


def file_pickles_from_bytes(data: bytes) -> list[bytes]:
    d = Path(tempfile.mkdtemp(prefix="tgcorpus_"))
    try:
        (d / "x.pt").write_bytes(data)
        return file_pickles(d / "x.pt")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _write_index(folder: Path, weight_map: dict[str, str]) -> Path:
    p = folder / "model.safetensors.index.json"
    p.write_text(json.dumps({"metadata": {"total_size": 16}, "weight_map": weight_map}))
    return p


def _bad_hf_folders(d: Path) -> list[BadCase]:
    cases: list[BadCase] = []
    one = {"w": torch.arange(4, dtype=torch.float32)}

    # ../../x.safetensors from the folder resolves to a real, valid file inside d/traversal
    root = d / "traversal"
    folder = root / "outer" / "hf_traversal"
    folder.mkdir(parents=True)
    save_file(one, str(root / "x.safetensors"))
    save_file({"v": torch.ones(2)}, str(folder / "model-00001-of-00002.safetensors"))
    _write_index(folder, {"v": "model-00001-of-00002.safetensors", "w": "../../x.safetensors"})
    assert (folder / "../../x.safetensors").resolve().is_file()
    cases.append(
        BadCase(
            "hf_index_dotdot_shard",
            folder,
            False,
            names_any=[
                "../../x.safetensors",
                "x.safetensors",
                folder.name,
                "model.safetensors.index.json",
            ],
            notes="index maps 'w' to ../../x.safetensors, a real file outside the folder",
        )
    )

    folder = d / "hf_absolute"
    folder.mkdir()
    outside = d / "outside_abs.safetensors"
    save_file(one, str(outside))
    _write_index(folder, {"w": str(outside)})
    cases.append(
        BadCase(
            "hf_index_absolute_shard",
            folder,
            False,
            names_any=[str(outside), outside.name, folder.name, "model.safetensors.index.json"],
            notes="index maps 'w' to an absolute path of a real file",
        )
    )

    folder = d / "hf_missing"
    folder.mkdir()
    save_file({"v": torch.ones(2)}, str(folder / "model-00001-of-00002.safetensors"))
    _write_index(
        folder, {"v": "model-00001-of-00002.safetensors", "w": "model-00002-of-00002.safetensors"}
    )
    cases.append(
        BadCase(
            "hf_index_missing_shard",
            folder,
            False,
            names_any=["model-00002-of-00002.safetensors"],
            notes="index names a second shard that is not there",
        )
    )

    folder = d / "hf_lfs"
    folder.mkdir()
    (folder / "model.safetensors").write_text(LFS_POINTER)
    (folder / "config.json").write_text("{}")
    cases.append(
        BadCase(
            "hf_folder_lfs_pointer",
            folder,
            False,
            mentions=["LFS"],
            names_any=["model.safetensors", folder.name],
            notes="HF folder whose model.safetensors is an LFS pointer",
        )
    )
    return cases


def _wrong_extension(d: Path) -> list[BadCase]:
    tensors = seed_tensors()
    cases = []
    p = d / "really_safetensors.pth"
    p.write_bytes(safetensors_bytes(tensors))
    cases.append(
        BadCase(
            "safetensors_named_pth",
            p,
            True,
            expected=clone_all(tensors),
            notes="safetensors content, .pth name: content sniffing should win",
        )
    )
    p = d / "really_torch.safetensors"
    p.write_bytes(torch_zip_bytes(tensors, stem="really_torch"))
    cases.append(
        BadCase(
            "torch_zip_named_safetensors",
            p,
            True,
            expected=clone_all(tensors),
            notes="torch zip content, .safetensors name",
        )
    )
    p = d / "really_legacy.bin"
    p.write_bytes(torch_legacy_bytes(tensors))
    cases.append(
        BadCase(
            "torch_legacy_named_bin",
            p,
            True,
            expected=clone_all(tensors),
            notes="legacy torch content, .bin name",
        )
    )
    return cases


BAD_GROUPS: dict[str, Callable[[Path], list[BadCase]]] = {
    "torch_zip": _bad_torch_zip,
    "safetensors": _bad_safetensors,
    "misc": _bad_misc,
    "hf_folders": _bad_hf_folders,
    "wrong_extension": _wrong_extension,
}


def all_bad(tmp_dir: Path | str) -> list[BadCase]:
    """Every bad-input case written into ``tmp_dir`` (one sub-folder per group)."""
    out: list[BadCase] = []
    for group, build in BAD_GROUPS.items():
        sub = Path(tmp_dir) / group
        sub.mkdir(parents=True, exist_ok=True)
        out.extend(build(sub))
    names = [c.name for c in out]
    assert len(names) == len(set(names)), "duplicate bad-case names"
    return out


# --------------------------------------------------------------------------------------------
# Seeds for fuzzing
# --------------------------------------------------------------------------------------------


def fuzz_seeds() -> dict[str, bytes]:
    """Small valid files (name with extension -> bytes) to mutate."""
    tensors = {
        "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "i": torch.tensor([1, -2], dtype=torch.int64),
        "h": torch.tensor([0.5, -1.0], dtype=torch.float16),
    }
    return {
        "seed_zip.pth": torch_zip_bytes(tensors, stem="seed_zip"),
        "seed.safetensors": safetensors_bytes(tensors),
        "seed_legacy.pt": torch_legacy_bytes(tensors),
    }


__all__ = [
    "BadCase",
    "Call",
    "Case",
    "HTML_PAGE",
    "LFS_POINTER",
    "MALICIOUS_NAMES",
    "MODEL_SOURCE",
    "PAYLOAD_KINDS",
    "RawGlobal",
    "RawInst",
    "all_bad",
    "all_malicious",
    "assert_bit_exact",
    "build_malicious",
    "control_case",
    "corpus_dumps",
    "file_pickles",
    "fuzz_seeds",
    "make_twin_model",
    "payload",
    "pickle_globals",
    "pickle_module",
    "pickled_globals_of",
    "raw_safetensors",
    "read_member",
    "rezip",
    "zip_layout",
]
