"""A seeded, structure-aware fuzzer of checkpoint containers (issue #10).

Seeds are real files written by torch, safetensors and numpy: ``torch.save`` zips (stored and
with a deflated ``data.pkl``), legacy torch files, ``.safetensors``, ``.npz`` (stored and
compressed) and Hugging Face style sharded folders (safetensors and ``.bin`` shards with an
``index.json``). Each case applies one or more mutations:

* bytes: bit flips, "interesting" integers written over 2/4/8 bytes, truncation, a duplicated
  slice;
* zip: a field of a local header, central directory entry or end record (sizes, offsets, CRC,
  method, name and extra lengths, entry counts) set to an interesting value, a member renamed
  or duplicated, an inner member (``data.pkl``, an ``.npy`` header) changed and the archive
  rewritten with valid CRCs so the change reaches the parser behind the zip checks;
* safetensors: the header length, an entry's shape / offsets / dtype / name, duplicate keys
  spelled with ``\\u`` escapes, odd ``__metadata__``;
* folders: ``index.json`` contents (``../`` and absolute names, missing shards, wrong types,
  deep nesting), shards replaced by links that leave the folder, link loops, folders, FIFOs.

Every case then runs ``tg.load`` into a fresh model (after an alarm is armed) and
``inspect_checkpoint``, and checks: only :class:`torchgraft.TorchgraftError` escapes, the model
is bit-identical when the load failed, and nothing takes longer than the per-case limit.
``run`` returns a summary; ``python -m tests.fuzz_containers DIR COUNT SEED`` prints it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import struct
import sys
import time
import traceback
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

import torchgraft as tg
from torchgraft.inspect_ import inspect_checkpoint

INTERESTING = [0, 1, 2, 7, 8, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF, 0x10000,
               0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40, (1 << 63) - 1, 1 << 63,
               (1 << 64) - 1]


class CaseTimeout(BaseException):
    """Raised by the per-case alarm (a BaseException, so no ``except Exception`` eats it)."""


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.BatchNorm1d(3))


# --- seeds ------------------------------------------------------------------------------------


def build_seeds(root: Path) -> list[tuple[str, Path]]:
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    sd = {k: v.clone() for k, v in make_model().state_dict().items()}
    for v in sd.values():
        if v.is_floating_point():
            v.uniform_(-1, 1)
    seeds: list[tuple[str, Path]] = []
    p = root / "plain.pth"
    torch.save(sd, p)
    seeds.append(("zip", p))
    p = root / "ckpt.pth"
    torch.save({"state_dict": sd, "epoch": 3, "meta": {"lr": [0.1, 0.01]}}, p)
    seeds.append(("zip", p))
    p = root / "deflated.pth"
    with zipfile.ZipFile(root / "plain.pth") as zin, zipfile.ZipFile(p, "w") as zout:
        for info in zin.infolist():
            method = zipfile.ZIP_DEFLATED if info.filename.endswith("data.pkl") else 0
            zout.writestr(info.filename, zin.read(info.filename), method)
    seeds.append(("zip", p))
    p = root / "legacy.pth"
    torch.save(sd, p, _use_new_zipfile_serialization=False)
    seeds.append(("bytes", p))
    p = root / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
    seeds.append(("safetensors", p))
    arrays = {k: v.numpy() for k, v in sd.items()}
    p = root / "stored.npz"
    np.savez(p, **arrays)
    seeds.append(("npz", p))
    p = root / "compressed.npz"
    np.savez_compressed(p, **arrays)
    seeds.append(("npz", p))
    for kind, suffix in (("st", "safetensors"), ("bin", "bin")):
        folder = root / f"sharded-{kind}"
        folder.mkdir()
        names = sorted(sd)
        weight_map = {}
        for i, part in enumerate((names[:3], names[3:]), 1):
            shard = f"model-{i:05d}-of-00002.{suffix}"
            tensors = {n: sd[n].contiguous() for n in part}
            if suffix == "bin":
                torch.save(tensors, folder / shard)
            else:
                save_file(tensors, str(folder / shard))
            weight_map.update({n: shard for n in part})
        index = "model.safetensors.index.json" if suffix == "safetensors" else \
            "pytorch_model.bin.index.json"
        (folder / index).write_text(json.dumps({"metadata": {"total_size": 1},
                                                "weight_map": weight_map}))
        seeds.append(("folder", folder))
    return seeds


# --- byte mutations ---------------------------------------------------------------------------


def _interesting(rng: random.Random, near: int | None = None) -> int:
    if near is not None and rng.random() < 0.4:
        return max(0, near + rng.choice([-1, 1, -8, 8, -30, 30, near, -near]))
    return rng.choice(INTERESTING)


def put_int(raw: bytearray, pos: int, width: int, value: int) -> None:
    if 0 <= pos and pos + width <= len(raw):
        raw[pos:pos + width] = (value % (1 << (8 * width))).to_bytes(width, "little")


def mutate_bytes(raw: bytearray, rng: random.Random) -> str:
    op = rng.choice(["flip", "int", "truncate", "duplicate", "zero"])
    if not raw:
        return "empty"
    if op == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(raw))
            raw[i] ^= 1 << rng.randrange(8)
    elif op == "int":
        width = rng.choice([2, 4, 8])
        put_int(raw, rng.randrange(len(raw)), width, _interesting(rng))
    elif op == "truncate":
        del raw[rng.randrange(len(raw)):]
    elif op == "duplicate":
        a = rng.randrange(len(raw))
        b = min(len(raw), a + rng.randint(1, 256))
        at = rng.randrange(len(raw))
        raw[at:at] = raw[a:b]
    else:
        a = rng.randrange(len(raw))
        raw[a:a + rng.randint(1, 64)] = bytes(min(len(raw) - a, 64))
    return op


# --- zip mutations ----------------------------------------------------------------------------

# (signature, {field: (offset, width)}) for the records a zip holds
_RECORDS = {
    b"PK\x03\x04": {"method": (8, 2), "crc": (14, 4), "csize": (18, 4), "usize": (22, 4),
                    "name_len": (26, 2), "extra_len": (28, 2), "flags": (6, 2)},
    b"PK\x01\x02": {"method": (10, 2), "crc": (16, 4), "csize": (20, 4), "usize": (24, 4),
                    "name_len": (28, 2), "extra_len": (30, 2), "comment_len": (32, 2),
                    "disk": (34, 2), "offset": (42, 4), "flags": (8, 2)},
    b"PK\x05\x06": {"entries_disk": (8, 2), "entries": (10, 2), "cd_size": (12, 4),
                    "cd_offset": (16, 4), "comment_len": (20, 2)},
    b"PK\x06\x06": {"entries": (32, 8), "cd_size": (40, 8), "cd_offset": (48, 8)},
    b"PK\x06\x07": {"eocd64_offset": (8, 8)},
}


def mutate_zip_field(raw: bytearray, rng: random.Random) -> str:
    found = [(sig, m.start()) for sig in _RECORDS
             for m in re.finditer(re.escape(sig), raw)]
    if not found:
        return mutate_bytes(raw, rng)
    sig, pos = rng.choice(found)
    field, (off, width) = rng.choice(list(_RECORDS[sig].items()))
    current = int.from_bytes(raw[pos + off:pos + off + width], "little")
    put_int(raw, pos + off, width, _interesting(rng, current))
    return f"zip:{sig[2:4].hex()}:{field}"


def rewrite_zip(src: Path, dst: Path, rng: random.Random) -> str:
    """Change something inside the archive, then write a valid zip (CRCs right)."""
    with zipfile.ZipFile(src) as zin:
        members = [(i, zin.read(i.filename)) for i in zin.infolist()]
    op = rng.choice(["member", "member", "rename", "duplicate", "drop", "npy_header",
                     "deflate"])
    k = rng.randrange(len(members))
    info, data = members[k]
    pkl = [j for j, (i, _) in enumerate(members) if i.filename.endswith(("data.pkl", ".npy"))]
    if op == "member" and pkl:
        k = rng.choice(pkl)
        info, data = members[k]
        buf = bytearray(data)
        mutate_bytes(buf, rng)
        members[k] = (info, bytes(buf))
    elif op == "rename":
        name = info.filename
        choices = [name + "x", name[:-1], "../" + name, "/abs/" + name, name.replace("/", "//"),
                   name + "\x1b[2J", name.split("/")[0] + "/data/999"]
        members[k] = (zipfile.ZipInfo(rng.choice(choices)), data)
    elif op == "duplicate":
        members.insert(rng.randrange(len(members) + 1), (info, data[: len(data) // 2]))
    elif op == "drop" and len(members) > 1:
        members.pop(k)
    elif op == "npy_header":
        npys = [j for j, (i, _) in enumerate(members) if i.filename.endswith(".npy")]
        if npys:
            k = rng.choice(npys)
            info, data = members[k]
            shape = rng.choice(["(-1,)", "(1099511627776,)", "(3, -2)", "(True,)", "()",
                                "(2.5,)", "('a',)", "(99999999, 99999999)", "(0,)"])
            descr = rng.choice(["'<f4'", "'|O'", "'<V16'", "[('a', '<f4')]", "'<f4'", "'>f8'",
                                "'(2,)<f4'", "'<U3'"])
            header = f"{{'descr': {descr}, 'fortran_order': {rng.choice(['False', 'True'])}, " \
                     f"'shape': {shape}, }}"
            header = header.ljust(118) + "\n"
            members[k] = (info, b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header))
                          + header.encode() + data[128:])
    elif op == "deflate":
        pass
    method = zipfile.ZIP_DEFLATED if op == "deflate" or rng.random() < 0.2 else None
    with zipfile.ZipFile(dst, "w") as zout, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns on duplicate names: they are the point
        for info, data in members:
            new = zipfile.ZipInfo(info.filename)
            new.compress_type = method if method is not None else info.compress_type
            zout.writestr(new, data)
    return f"rewrite:{op}"


# --- safetensors mutations --------------------------------------------------------------------


def mutate_safetensors(raw: bytearray, rng: random.Random) -> str:
    (n,) = struct.unpack_from("<Q", raw, 0)
    header = json.loads(bytes(raw[8:8 + n]))
    data = bytes(raw[8 + n:])
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    op = rng.choice(["shape", "offsets", "dtype", "name", "dupkey", "metadata", "length",
                     "overlap", "empty"])
    text = None
    if op == "shape":
        entry["shape"] = rng.choice([[-1], [True], [2.5], ["3"], [1 << 40, 1 << 40], [],
                                     [0], entry["shape"] + [1], [[1]], None, {"a": 1}])
    elif op == "offsets":
        b, e = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[e, b], [b - 4, e - 4], [b + 4, e + 4], [b], [b, e, 0],
                                            [-1, e], [b, 1 << 62], [b, e + 4], ["0", e], None])
    elif op == "dtype":
        entry["dtype"] = rng.choice(["F32", "F16", "I64", "BOOL", "X9", ["F32"], {"F32": 1},
                                     None, 32, "F8_E4M3", "U64"])
    elif op == "name":
        header[rng.choice(["", "\x1b]0;t\x07", "a" * 5000, name + "\x00", "../x"])] = \
            header.pop(name)
    elif op == "dupkey":
        body = json.dumps(header)
        esc = "".join(f"\\u{ord(c):04x}" for c in name)
        text = body[:-1] + f', "{esc}": ' + json.dumps(entry) + "}"
    elif op == "metadata":
        header["__metadata__"] = rng.choice([[1], "x", {"torchgraft.aliases": '{"a": ["b"]}'},
                                             {"torchgraft.aliases": json.dumps({"z": name})},
                                             {"k": {"nested": 1}}, None])
    elif op == "overlap":
        other = header[rng.choice(names)]
        entry["data_offsets"] = list(other["data_offsets"])
    elif op == "empty":
        header["zz_empty"] = {"dtype": "F32", "shape": [0],
                              "data_offsets": [rng.randrange(len(data) + 1)] * 2}
    body = (text if text is not None else json.dumps(header)).encode()
    length = len(body)
    if op == "length":
        length = _interesting(rng, length)
    raw[:] = struct.pack("<Q", length % (1 << 64)) + body + data
    return f"st:{op}"


# --- folder mutations -------------------------------------------------------------------------


def mutate_folder(folder: Path, rng: random.Random, outside: Path) -> str:
    index = next(folder.glob("*.index.json"))
    data = json.loads(index.read_text())
    shards = sorted(set(data["weight_map"].values()))
    shard = folder / rng.choice(shards)
    op = rng.choice(["index", "index", "shard_bytes", "link_out", "loop", "dir", "fifo_shard",
                     "fifo_index", "extra_index", "missing"])
    if op == "index":
        key = rng.choice(list(data["weight_map"]))
        data["weight_map"][key] = rng.choice(
            ["../x.safetensors", "/etc/hostname", "nope.safetensors", 3, None, ["a"],
             "a\x00b", "x" * 300, "", "sub/../" + shards[0], shards[-1]])
        if rng.random() < 0.2:
            data = rng.choice([[data], {"weight_map": [1]}, {"weight_map": None}, "x", 1])
        index.write_text(json.dumps(data))
    elif op == "shard_bytes":
        raw = bytearray(shard.read_bytes())
        mutate_bytes(raw, rng)
        shard.write_bytes(bytes(raw))
    elif op == "link_out":
        shard.unlink()
        os.symlink(outside, shard)
    elif op == "loop":
        shard.unlink()
        os.symlink(shard, shard)
    elif op == "dir":
        shard.unlink()
        shard.mkdir()
    elif op == "fifo_shard":
        shard.unlink()
        os.mkfifo(shard)
    elif op == "fifo_index":
        index.unlink()
        os.mkfifo(index)
    elif op == "extra_index":
        os.mkfifo(folder / "a.index.json")
        index.unlink()
    else:
        shard.unlink()
    return f"folder:{op}"


# --- the loop ---------------------------------------------------------------------------------


def make_case(kind: str, seed: Path, case: Path, rng: random.Random, outside: Path) -> tuple[
        Path, str]:
    if kind == "folder":
        shutil.copytree(seed, case / seed.name, symlinks=True)
        return case / seed.name, mutate_folder(case / seed.name, rng, outside)
    dst = case / seed.name
    if kind in ("zip", "npz") and rng.random() < 0.35:
        return dst, rewrite_zip(seed, dst, rng)
    raw = bytearray(seed.read_bytes())
    ops = []
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        if kind in ("zip", "npz") and rng.random() < 0.6:
            ops.append(mutate_zip_field(raw, rng))
        elif kind == "safetensors" and rng.random() < 0.7 and len(raw) > 8:
            try:
                ops.append(mutate_safetensors(raw, rng))
            except (ValueError, KeyError, IndexError, TypeError, AttributeError, struct.error):
                ops.append(mutate_bytes(raw, rng))
        else:
            ops.append(mutate_bytes(raw, rng))
    dst.write_bytes(bytes(raw))
    return dst, "+".join(ops)


_STORAGE_NAMES = [n for n in dir(torch) if n.endswith("Storage") and n != "UntypedStorage"]


def process_state() -> tuple:
    """What a hostile file must not change in the process: storage types' dtypes, torch's
    default dtype, the pickle extension registry, the limits."""
    import copyreg
    import dataclasses

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage.dtype is deprecated, still the target
        storages = tuple((name, getattr(getattr(torch, name), "dtype", None))
                         for name in _STORAGE_NAMES)
    # (copyreg.dispatch_table is left out: lazy imports, e.g. sympy through torch, add to it)
    return (storages, torch.get_default_dtype(), dict(copyreg._extension_registry),
            dict(copyreg._inverted_registry), dataclasses.astuple(tg.LIMITS))


def _alarm(signum: int, frame: Any) -> None:
    raise CaseTimeout()


def check_case(path: Path, per_case_s: int) -> tuple[str, str | None]:
    """('loaded' | 'error', failure or None)."""
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outcome, failure = "loaded", None
    signal.signal(signal.SIGALRM, _alarm)
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("load", lambda: tg.load(model, path)),
        ("inspect", lambda: inspect_checkpoint(str(path))),
    ]
    state = process_state()
    for what, step in steps:
        signal.alarm(per_case_s)
        try:
            step()
        except tg.TorchgraftError as err:
            if what == "load":
                outcome = "error"
                after = model.state_dict()
                if any(not torch.equal(after[k], v) for k, v in before.items()):
                    failure = f"load: model changed although it raised {type(err).__name__}: " \
                              f"{str(err)[:300]}"
        except CaseTimeout:
            failure = f"{what}: no result within {per_case_s} s"
        except RecursionError:
            failure = f"{what}: RecursionError"
        except Exception as err:  # the point: nothing but TorchgraftError may escape
            tb = traceback.format_exc(limit=-4)
            failure = f"{what}: {type(err).__name__}: {str(err)[:300]}\n{tb[-1500:]}"
        finally:
            signal.alarm(0)
        if not failure and process_state() != state:
            failure = f"{what}: the process state changed (storage dtypes, default dtype, " \
                      "copyreg extension registry or limits)"
        if failure:
            break
    return outcome, failure


def run(workdir: str | Path, count: int, seed: int, per_case_s: int = 10) -> dict[str, Any]:
    work = Path(workdir)
    seeds = build_seeds(work / "seeds")
    outside = work / "outside.safetensors"
    save_file({"0.weight": torch.zeros(8, 4)}, str(outside))
    rng = random.Random(seed)
    summary: dict[str, Any] = {"cases": 0, "errors": 0, "loaded": 0, "failures": [],
                               "seed": seed, "ops": {}}
    start = time.monotonic()
    for i in range(count):
        kind, src = seeds[i % len(seeds)]
        case = work / f"case{i}"
        case.mkdir()
        case_seed = rng.randrange(1 << 30)
        path, op = make_case(kind, src, case, random.Random(case_seed), outside)
        outcome, failure = check_case(path, per_case_s)
        summary["cases"] += 1
        summary[outcome + ("s" if outcome == "error" else "")] += 1
        summary["ops"][op.split("+")[0]] = summary["ops"].get(op.split("+")[0], 0) + 1
        if failure:
            summary["failures"].append({"case": i, "case_seed": case_seed, "seed_file": src.name,
                                        "mutation": op, "failure": failure})
        shutil.rmtree(case, ignore_errors=True)
    summary["seconds"] = round(time.monotonic() - start, 1)
    return summary


if __name__ == "__main__":
    out = run(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    print(json.dumps(out, indent=1))
