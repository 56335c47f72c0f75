"""A structure-aware fuzzer for torchgraft's pickle readers (run in a child process by
``test_hardening_pickle.test_pickle_fuzzer``; ``python -m tests.pickle_fuzz DIR N SEED`` by hand).

Seeds are real files written by torch and pickle: a training checkpoint (state dict, optimizer,
numpy metadata, an inert ``argparse.Namespace``, shared sub-objects) as a torch zip and as a
legacy torch file, a whole pickled ``nn.Module``, and a plain ``.pkl`` of numpy arrays. Each
case applies one to three mutations at opcode boundaries of the seed's pickle:

* insert an opcode: BUILD/SETITEM/APPEND/REDUCE/DUP/MARK..., memo GET/PUT with random and huge
  indices, EXT opcodes, a GLOBAL naming an allowlisted object (to BUILD on it), big integers;
* change an opcode's integer argument (sizes, strides, offsets, memo references, lengths);
* duplicate a run of opcodes elsewhere (shared sub-objects, stack confusion) or delete one.

Every case must end with the file read or a ``TorchgraftError``, within a per-case time limit;
a read file is also inspected, materialised and loaded into a model, which must be unchanged
whenever that load raises. After every case the process is checked for leftover state (shared
allowlisted objects, copyreg's extension cache, placeholder caches), and every 25 cases a benign
load must still be bit-identical to ``torch.load``.
"""

from __future__ import annotations

import argparse
import copyreg
import io
import json
import pickletools
import random
import signal
import sys
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import torchgraft as tg
from torchgraft.formats import unpickler
from torchgraft.inspect_ import inspect_checkpoint

try:
    from tests.hostile_pickles import read_pickle, replace_pickle
except ImportError:  # run from tests/
    from hostile_pickles import read_pickle, replace_pickle  # type: ignore[no-redef]

PER_CASE_S = 20
_ALLOWED_NAMES = ["torch.FloatStorage", "torch.LongStorage", "numpy.dtype", "torch.Size",
                  "collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
                  "numpy.core.multiarray.scalar", "numpy.core.multiarray._reconstruct",
                  "numpy.ndarray", "builtins.set", "copyreg._reconstructor", "torch.float32",
                  "torch._utils._rebuild_parameter", "torch._tensor._rebuild_from_type_v2",
                  "torch.serialization._get_layout", "torch.device", "_codecs.encode",
                  "builtins.bytearray", "torch.nn.modules.linear.Linear", "os.system"]
_INTS = [0, 1, 2, 3, 4, 7, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, -1, -2**31]


def _model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(4, 3)


def make_seeds(folder: Path) -> list[tuple[str, Path, bytes]]:
    """(kind, file, its pickle) for each seed file."""
    lin = _model()
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    lin(torch.ones(2, 4)).sum().backward()
    opt.step()
    shared = [1, 2]
    ckpt = {"state_dict": lin.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
            "meta": {"np": np.float64(0.5), "arr": np.arange(3), "ns": argparse.Namespace(lr=0.1),
                     "shared": [shared, shared], "od": OrderedDict(a=1), "size": torch.Size([2])}}
    seeds = []
    zip_path = folder / "seed.pth"
    torch.save(ckpt, zip_path)
    seeds.append(("zip", zip_path, read_pickle(zip_path)))
    module_path = folder / "module.pth"
    torch.save(lin, module_path)
    seeds.append(("zip", module_path, read_pickle(module_path)))
    legacy = folder / "legacy.pth"
    torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)
    seeds.append(("legacy", legacy, b""))
    pkl = folder / "seed.pkl"
    import pickle

    arrays = {"weight": lin.weight.detach().numpy(), "bias": lin.bias.detach().numpy(),
              "meta": ckpt["meta"] | {"size": (2,)}}
    pkl.write_bytes(pickle.dumps(arrays, protocol=4))
    seeds.append(("pkl", pkl, pkl.read_bytes()))
    return seeds


def _legacy_split(data: bytes) -> tuple[bytes, bytes, bytes]:
    """(before, the main pickle, after) of a legacy torch file."""
    stream = io.BytesIO(data)
    for _ in range(3):
        for _ in pickletools.genops(stream):
            pass
    start = stream.tell()
    for _ in pickletools.genops(stream):
        pass
    return data[:start], data[start:stream.tell()], data[stream.tell():]


def _ops(data: bytes) -> list[tuple[int, int, Any, str]]:
    """(start, end, arg, opcode name) of each opcode."""
    out, prev = [], None
    for op, arg, pos in pickletools.genops(data):
        if prev is not None:
            out[-1] = (out[-1][0], pos, out[-1][2], out[-1][3])
        out.append((pos, len(data), arg, op.name))
        prev = pos
    return out


def _snippet(rng: random.Random) -> bytes:
    kind = rng.randrange(9)
    if kind == 0:
        return bytes([rng.choice(b"bsaeuR2t0(}]\x81\x93\x94\x85\x86\x87")])
    if kind == 1:
        return b"h" + bytes([rng.randrange(256)])
    if kind == 2:
        return b"j" + rng.choice(_INTS[:12]).to_bytes(4, "little", signed=False)
    if kind == 3:
        return b"r" + rng.choice([5, 300, 70000, 2**26, 2**32 - 1]).to_bytes(4, "little")
    if kind == 4:
        return bytes([rng.choice(b"\x82\x83\x84")]) + bytes(rng.choice([1, 2, 4]))
    if kind == 5:
        module, _, name = rng.choice(_ALLOWED_NAMES).rpartition(".")
        return b"c" + module.encode() + b"\n" + name.encode() + b"\n"
    if kind == 6:
        value = rng.choice([v for v in _INTS if -2**31 <= v < 2**31])
        return b"J" + value.to_bytes(4, "little", signed=True) \
            if rng.random() < 0.5 else b"K" + bytes([rng.randrange(256)])
    if kind == 7:
        return b"\x8a\x08" + rng.getrandbits(64).to_bytes(8, "little")
    return b"X" + (3).to_bytes(4, "little") + rng.choice([b"cpu", b"abc", b"\xff\xfe\x00"])


def _with_int(op: str, arg: int, rng: random.Random) -> bytes | None:
    value = rng.choice(_INTS + [arg + 1, arg - 1, arg * 2])
    fmt = {"BININT1": (b"K", 1, False), "BININT2": (b"M", 2, False), "BININT": (b"J", 4, True),
           "BINGET": (b"h", 1, False), "LONG_BINGET": (b"j", 4, False),
           "BINPUT": (b"q", 1, False), "LONG_BINPUT": (b"r", 4, False)}.get(op)
    if fmt is None:
        return None
    code, width, signed = fmt
    try:
        return code + value.to_bytes(width, "little", signed=signed)
    except OverflowError:
        return None


def mutate(data: bytes, rng: random.Random) -> tuple[bytes, list[str]]:
    ops = _ops(data)
    done: list[str] = []
    for _ in range(rng.randint(1, 2)):
        i = rng.randrange(1, max(2, len(ops) - 1))
        choice = rng.random()
        if choice < 0.4:  # an integer argument: keeps the structure, changes sizes/memo refs
            ints = [k for k, op in enumerate(ops) if isinstance(op[2], int) and
                    _with_int(op[3], op[2], rng)]
            i = rng.choice(ints) if ints else i
        start, end, arg, name = ops[min(i, len(ops) - 1)]
        if choice >= 0.4 and choice < 0.7:
            piece = _snippet(rng)
            data = data[:start] + piece + data[start:]
            done.append(f"insert {piece[:24]!r} at {start}")
        elif choice < 0.4 and isinstance(arg, int) and (new := _with_int(name, arg, rng)):
            data = data[:start] + new + data[end:]
            done.append(f"{name} {arg} -> {new!r} at {start}")
        elif choice < 0.9:
            j = min(len(ops) - 1, i + rng.randint(1, 12))
            piece = data[start:ops[j][0]]
            at = ops[rng.randrange(1, len(ops) - 1)][0]
            data = data[:at] + piece + data[at:]
            done.append(f"copy {len(piece)} bytes from {start} to {at}")
        else:
            data = data[:start] + data[end:]
            done.append(f"delete {name} at {start}")
        ops = _ops_or_empty(data) or ops
    return data, done


def _ops_or_empty(data: bytes) -> list:
    try:
        return _ops(data)
    except Exception:  # not parseable any more: keep mutating at the old boundaries
        return []


def _write_case(kind: str, seed_path: Path, data: bytes, folder: Path, n: int) -> Path:
    if kind == "zip":
        return replace_pickle(seed_path, folder / f"case{n % 4}.pth", data)
    path = folder / f"case{n % 4}.{'pkl' if kind == 'pkl' else 'pth'}"
    if kind == "legacy":
        before, _, after = _legacy_split(seed_path.read_bytes())
        path.write_bytes(before + data + after)
    else:
        path.write_bytes(data)
    return path


def _process_state() -> Any:
    table = unpickler.allowed_globals()
    return (
        {k: (getattr(v, "dtype", None), sorted(getattr(v, "__dict__", {}) or {}),
             getattr(v, "__defaults__", None)) for k, v in table.items()},
        dict(copyreg._extension_cache), getattr(unpickler._CURRENT, "ctx", None),
        np.dtype("f4").byteorder, np.dtype("f8").descr)


class _Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Hang(f"case ran past {PER_CASE_S}s")


def run_case(path: Path, stats: dict[str, int]) -> None:
    """Read, inspect, materialise and load one file; only TorchgraftError may escape."""
    try:
        sd = tg.read(path)
    except tg.TorchgraftError:
        stats["errors"] += 1
        return
    stats["loaded"] += 1
    for call in (lambda: inspect_checkpoint(path),
                 lambda: [ref.materialize() for ref in list(sd.refs.values())[:20]
                          if ref.numel < 10_000_000]):
        try:
            call()
        except tg.TorchgraftError:
            pass
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        tg.load(model, path, mismatch="skip")
    except tg.PartialLoadError as err:
        raise AssertionError(f"partial load: {err}") from None
    except tg.TorchgraftError:
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), f"model changed by a failed load: {k}"


def benign_check(folder: Path) -> None:
    path = folder / "benign.pth"
    torch.save(_model().state_dict(), path)
    want = torch.load(path, weights_only=True)
    model = nn.Linear(4, 3)
    tg.load(model, path)
    for k, v in model.state_dict().items():
        assert v.dtype == want[k].dtype and torch.equal(v, want[k]), f"benign load differs: {k}"


def main(folder: str, examples: int = 150, seed: int = 1234) -> dict[str, Any]:
    root = Path(folder)
    rng = random.Random(seed)
    seeds = make_seeds(root)
    legacy_main = {p: _legacy_split(p.read_bytes())[1] for k, p, _ in seeds if k == "legacy"}
    state = _process_state()
    stats = {"cases": 0, "errors": 0, "loaded": 0}
    failures: list[dict[str, Any]] = []
    signal.signal(signal.SIGALRM, _alarm)
    for n in range(examples):
        kind, seed_path, data = seeds[n % len(seeds)]
        data = legacy_main.get(seed_path, data)
        mutated, how = mutate(data, rng)
        path = _write_case(kind, seed_path, mutated, root, n)
        signal.alarm(PER_CASE_S)
        try:
            run_case(path, stats)
            if _process_state() != state:
                raise AssertionError("process state changed")
            if n % 25 == 24:
                benign_check(root)
        except BaseException as err:  # noqa: BLE001 - the fuzzer's whole point
            if isinstance(err, KeyboardInterrupt):
                raise
            keep = root / f"failure{len(failures)}{path.suffix}"
            keep.write_bytes(path.read_bytes())
            failures.append({"case": n, "seed": str(seed_path.name), "mutations": how,
                             "error": f"{type(err).__name__}: {err}"[:400], "file": str(keep),
                             "trace": traceback.format_exc()[-1500:]})
        finally:
            signal.alarm(0)
        stats["cases"] += 1
    benign_check(root)
    summary = {**stats, "failures": failures[:20]}
    print(json.dumps(summary))
    sys.stdout.flush()
    return summary


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
