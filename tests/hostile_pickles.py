"""Helpers that write hostile pickles and torch checkpoints for the hardening tests and the fuzzer.

Everything here writes real files: pickles through :mod:`pickle` itself (with reducer objects
that emit exactly the REDUCE/BUILD sequences an attacker would), torch zip archives laid out as
``torch.save`` lays them out, and raw opcode strings where the point is hostility.
"""

from __future__ import annotations

import io
import os
import pickle
import resource
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent


class R:
    """Pickles as ``fn(*args)`` followed, when ``state`` is given, by BUILD with ``state``."""

    def __init__(self, fn: Any, args: tuple, state: Any = None) -> None:
        self.fn, self.args, self.state = fn, args, state

    def __reduce__(self) -> tuple:
        if self.state is None:
            return (self.fn, self.args)
        return (self.fn, self.args, self.state)


class Storage:
    """A storage record: pickled as torch's persistent id, its bytes go to ``data/<key>``."""

    def __init__(self, key: str, data: bytes, storage_type: Any = torch.FloatStorage) -> None:
        self.key, self.data, self.storage_type = key, data, storage_type
        self.numel = len(data) // 4 if storage_type is torch.FloatStorage else len(data)


class _TorchPickler(pickle.Pickler):
    def __init__(self, file: io.BytesIO, storages: dict[str, bytes]) -> None:
        super().__init__(file, protocol=2)
        self.storages = storages

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Storage):
            self.storages[obj.key] = obj.data
            return ("storage", obj.storage_type, obj.key, "cpu", obj.numel)
        return None


def torch_pickle(obj: Any) -> tuple[bytes, dict[str, bytes]]:
    """``obj`` pickled the way ``torch.save`` does (protocol 2, storages as persistent ids)."""
    buf, storages = io.BytesIO(), {}
    _TorchPickler(buf, storages).dump(obj)
    return buf.getvalue(), storages


def tensor(storage: Storage, size: Any, stride: Any, offset: Any = 0) -> R:
    """What ``torch.save`` writes for a tensor: ``_rebuild_tensor_v2(storage, ...)``."""
    from collections import OrderedDict

    return R(torch._utils._rebuild_tensor_v2, (storage, offset, size, stride, False, OrderedDict()))


def write_torch_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes]) -> Path:
    """A torch zip archive (``archive/data.pkl``, ``archive/data/<key>``), members stored."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", "3\n")
    return path


def save_obj(path: Path, obj: Any) -> Path:
    """``obj`` (with :class:`Storage`/:class:`R` leaves) as a torch zip checkpoint."""
    data, storages = torch_pickle(obj)
    return write_torch_zip(path, data, storages)


def replace_pickle(src: Path, dst: Path, data_pkl: bytes) -> Path:
    """A copy of torch zip ``src`` whose ``data.pkl`` is ``data_pkl``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = data_pkl if info.filename.endswith("/data.pkl") else zin.read(info)
            zout.writestr(info.filename, data)
    return dst


def read_pickle(path: Path) -> bytes:
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith("/data.pkl"))
        return zf.read(name)


def run_isolated(code: str, timeout: float = 120, address_space_gb: int = 6,
                 cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with a timeout and ``RLIMIT_AS`` (torch's own import
    maps about 3 GB of address space, so a few GB is the floor)."""
    limit = address_space_gb << 30

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
               PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit_memory, env=env, cwd=cwd)
