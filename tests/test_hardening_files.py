"""Hostile containers: zip / npz / safetensors / legacy / folders / special files (issue #10).

Each test writes a real file with torch, safetensors or numpy and then breaks exactly one thing,
or builds the hostile bytes by hand where the point is hostility. Everything must end in a
:class:`torchgraft.TorchgraftError` raised before the first write, in bounded time and memory;
cases that could hang or eat memory run in a capped child process (:mod:`tests.isolated`).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import torchgraft as tg
from torchgraft.cli import main as cli_main
from torchgraft.cli.common import escape_text
from torchgraft.convert import convert

try:
    from tests.isolated import run_isolated
except ImportError:  # tests/ not importable as a package
    from isolated import run_isolated  # type: ignore[no-redef]


# --- helpers ----------------------------------------------------------------------------------


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed"


def st_write(path: Path, header: dict | bytes, data: bytes = b"") -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def zip_fields(path: Path, name: str) -> tuple[int, int]:
    """(central directory entry offset, local header offset) of member ``name``."""
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        local = zf.getinfo(name).header_offset
    pos = raw.find(b"PK\x01\x02")
    while pos >= 0:
        n_len = struct.unpack_from("<H", raw, pos + 28)[0]
        if raw[pos + 46:pos + 46 + n_len] == name.encode():
            return pos, local
        pos = raw.find(b"PK\x01\x02", pos + 4)
    raise KeyError(name)


def patch_zip(path: Path, name: str, *, crc: int | None = None,
              file_size: int | None = None) -> None:
    """Rewrite a member's CRC or declared uncompressed size in both of its headers."""
    central, local = zip_fields(path, name)
    raw = bytearray(path.read_bytes())
    if crc is not None:
        struct.pack_into("<I", raw, central + 16, crc)
        struct.pack_into("<I", raw, local + 14, crc)
    if file_size is not None:
        struct.pack_into("<I", raw, central + 24, file_size)
        struct.pack_into("<I", raw, local + 22, file_size)
    path.write_bytes(bytes(raw))


def npy_bytes(shape: tuple, descr: str = "<f4", payload: bytes = b"") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


def rezip(src: Path, dst: Path, method: int) -> Path:
    """Copy a zip with every member written with compression ``method``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", method) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
    return dst


# --- item 9: special files --------------------------------------------------------------------


def test_char_device_is_refused_without_reading() -> None:
    with pytest.raises(tg.UnsupportedFormatError, match="character device"):
        tg.read("/dev/zero")


def test_fifo_path_and_fifo_index_fail_at_once(tmp_path: Path) -> None:
    # a FIFO nobody writes to: opening it for reading would block forever
    os.mkfifo(tmp_path / "pipe.pth")
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(folder / "model-00001-of-00001.safetensors"))
    os.mkfifo(folder / "a.index.json")
    single = tmp_path / "single"
    single.mkdir()
    os.mkfifo(single / "model.safetensors")
    r = run_isolated(f"""
        for p in ({str(tmp_path / 'pipe.pth')!r}, {str(folder)!r}, {str(single)!r}):
            try:
                tg.read(p)
            except tg.TorchgraftError as err:
                print(type(err).__name__, "|", err)
        """, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 3, r.stdout
    assert lines[0].startswith("UnsupportedFormatError") and "FIFO" in lines[0]
    assert "a.index.json" in lines[1] and "FIFO" in lines[1]
    assert "FIFO" in lines[2]


def test_symlink_loop_path_is_a_read_error(tmp_path: Path) -> None:
    loop = tmp_path / "loop.pth"
    os.symlink(loop, loop)
    with pytest.raises(tg.ReadError, match="cannot be read"):
        tg.read(loop)


# --- item 10: Hugging Face hub cache ----------------------------------------------------------


def _hub_snapshot(repo: Path, rev: str, tensors: dict[str, torch.Tensor]) -> Path:
    """One revision of a hub-cache repo: shards in blobs/, snapshot entries are links."""
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    blobs = repo / "blobs"
    blobs.mkdir(exist_ok=True)
    names = sorted(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        shard = f"model-{i:05d}-of-00002.safetensors"
        tmp = repo / "tmp.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(tmp))
        blob = blobs / f"{rev}{i:02d}{'ab' * 18}"
        tmp.rename(blob)
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snap / shard)
        weight_map.update({n: shard for n in part})
    index_blob = blobs / f"{rev}idx"
    index_blob.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    os.symlink(os.path.join("..", "..", "blobs", index_blob.name),
               snap / "model.safetensors.index.json")
    return snap


def test_hub_cache_sharded_snapshots_load(tmp_path: Path) -> None:
    repo = tmp_path / "hub" / "models--org--tiny"
    torch.manual_seed(0)
    v1 = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    v2 = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    snap1 = _hub_snapshot(repo, "aaaa1111", v1.state_dict())
    snap2 = _hub_snapshot(repo, "bbbb2222", v2.state_dict())
    for snap, ref in ((snap1, v1), (snap2, v2)):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        report = tg.load(model, snap)
        assert report.ok and report.loaded_fraction == 1.0
        for k, v in ref.state_dict().items():
            assert torch.equal(model.state_dict()[k], v)
    # the repository folder itself: refs/main names the snapshot
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("bbbb2222")
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert tg.load(model, repo).ok
    assert torch.equal(model[2].weight, v2[2].weight)
    (repo / "refs" / "main").write_text("../../x")
    with pytest.raises(tg.UnsupportedFormatError, match="refs/main names no snapshot"):
        tg.read(repo)
    # a link in the snapshot that leaves the repository's cache folder is still refused
    outside = tmp_path / "outside.safetensors"
    save_file({"0.weight": torch.zeros(8, 4)}, str(outside))
    shard = snap1 / "model-00001-of-00002.safetensors"
    shard.unlink()
    os.symlink(outside, shard)
    with pytest.raises(tg.CorruptCheckpointError, match="outside the folder"):
        tg.read(snap1)


@pytest.mark.parametrize("shard", ["../other/model.safetensors", "/etc/hostname",
                                   "sub/../../x.safetensors"])
def test_index_names_that_leave_the_folder_are_refused(tmp_path: Path, shard: str) -> None:
    repo = tmp_path / "models--org--x"
    snap = _hub_snapshot(repo, "cccc", {"w": torch.ones(2), "b": torch.ones(3)})
    (repo / "other").mkdir()
    save_file({"w": torch.ones(2)}, str(repo / "other" / "model.safetensors"))
    index = snap / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["w"] = shard
    index.unlink()
    index.write_text(json.dumps(data))
    with pytest.raises(tg.CorruptCheckpointError, match="outside the folder"):
        tg.read(snap)


def test_plain_folder_link_outside_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(tmp_path / "elsewhere.safetensors"))
    os.symlink(tmp_path / "elsewhere.safetensors", folder / "s1.safetensors")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "s1.safetensors"}}))
    with pytest.raises(tg.CorruptCheckpointError, match="outside the folder"):
        tg.read(folder)


# --- item 8: raw exceptions -------------------------------------------------------------------


@pytest.mark.parametrize("aliases", [json.dumps({"alias": ["w"]}), json.dumps({"alias": {}}),
                                     json.dumps(["w"]), "[" * 100000])
def test_safetensors_alias_metadata_of_other_types_is_ignored(tmp_path: Path,
                                                              aliases: str) -> None:
    path = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(2)}, str(path), metadata={"torchgraft.aliases": aliases})
    state = tg.read(path)
    assert list(state) == ["w"]


@pytest.mark.parametrize("entry, match", [
    ({"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}, "unknown dtype"),
    ({"dtype": {"F32": 1}, "shape": [1], "data_offsets": [0, 4]}, "unknown dtype"),
    ({"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}, "bad shape"),
    ({"dtype": "F32", "shape": [1, False], "data_offsets": [0, 0]}, "bad shape"),
    ({"dtype": "F32", "shape": [2 ** 40, 2 ** 40], "data_offsets": [0, 4]}, "do not fit"),
    ({"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}, "bad shape"),
])
def test_safetensors_bad_entries(tmp_path: Path, entry: dict, match: str) -> None:
    path = st_write(tmp_path / "x.safetensors", {"w": entry}, b"\0" * 4)
    with pytest.raises(tg.CorruptCheckpointError, match=match):
        tg.read(path)


@pytest.mark.parametrize("shape", [(-1,), (2 ** 40,), (3, -2), (2 ** 31, 2 ** 31)])
@pytest.mark.parametrize("method", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_npz_impossible_shapes(tmp_path: Path, shape: tuple, method: int) -> None:
    path = tmp_path / "w.npz"
    with zipfile.ZipFile(path, "w", method) as zf:
        zf.writestr("ok.npy", npy_bytes((2,), payload=b"\0" * 8))
        zf.writestr("w.npy", npy_bytes(shape, payload=b"\0" * 16))
    with pytest.raises(tg.CorruptCheckpointError, match="member w"):
        tg.read(path)


def test_npz_header_shape_larger_than_member_does_not_read_the_next_one(tmp_path: Path) -> None:
    # item 12: w claims 4 floats but holds 2; the next member's bytes follow it in the file
    path = tmp_path / "w.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("w.npy", npy_bytes((4,), payload=np.ones(2, "<f4").tobytes()))
        zf.writestr("secret.npy", npy_bytes((4,), payload=np.full(4, 7, "<f4").tobytes()))
    with pytest.raises(tg.CorruptCheckpointError, match="needs 16 bytes"):
        tg.read(path)


def _sharded(tmp_path: Path, weight_map: object | None = None, raw: str | None = None) -> Path:
    folder = tmp_path / "sharded"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(folder / "s1.safetensors"))
    text = raw if raw is not None else json.dumps({"weight_map": weight_map})
    (folder / "model.safetensors.index.json").write_text(text)
    return folder


@pytest.mark.parametrize("shard, match", [
    ("s1\0.safetensors", "NUL byte"),
    ("x" * 300 + ".safetensors", "too long"),
    ("a/" * 2100 + "s.safetensors", "too long"),
    ("", "empty"),
])
def test_bad_shard_names(tmp_path: Path, shard: str, match: str) -> None:
    folder = _sharded(tmp_path, {"w": shard})
    with pytest.raises(tg.CorruptCheckpointError, match=match):
        tg.read(folder)


def test_shard_symlink_loop(tmp_path: Path) -> None:
    folder = _sharded(tmp_path, {"w": "loop.safetensors"})
    os.symlink(folder / "loop.safetensors", folder / "loop.safetensors")
    with pytest.raises(tg.CorruptCheckpointError, match="looping symbolic link"):
        tg.read(folder)


@pytest.mark.parametrize("raw, match", [
    ("[" * 200000 + "]" * 200000, "not valid JSON"),
    ('{"weight_map": ' + '{"a":' * 100000 + "1" + "}" * 100001, "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"weight_map": {"w": ["s1.safetensors"]}}', "no valid 'weight_map'"),
    ('{"weight_map": {"w": {"x": 1}}}', "no valid 'weight_map'"),
])
def test_bad_index_json(tmp_path: Path, raw: str, match: str) -> None:
    folder = _sharded(tmp_path, raw=raw)
    with pytest.raises(tg.CorruptCheckpointError, match=match):
        tg.read(folder)


def test_index_json_that_is_a_folder(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(folder / "s1.safetensors"))
    (folder / "model.safetensors.index.json").mkdir()
    with pytest.raises(tg.CorruptCheckpointError, match="is a folder, not a JSON file"):
        tg.read(folder)


def test_shard_that_is_a_folder(tmp_path: Path) -> None:
    folder = _sharded(tmp_path, {"w": "dir.safetensors"})
    (folder / "dir.safetensors").mkdir()
    with pytest.raises(tg.CorruptCheckpointError, match="is a folder, not a regular file"):
        tg.read(folder)


def test_convert_force_onto_a_folder(tmp_path: Path) -> None:
    src = tmp_path / "a.pth"
    torch.save({"w": torch.ones(2)}, src)
    dst = tmp_path / "out.safetensors"
    dst.mkdir()
    with pytest.raises(tg.TorchgraftError, match="is a folder"):
        convert(src, dst, force=True)
    assert dst.is_dir() and not any(dst.iterdir())
    assert cli_main(["convert", str(src), str(dst), "--force"]) == 2


def test_convert_into_a_folder_that_cannot_be_written(tmp_path: Path) -> None:
    src = tmp_path / "a.pth"
    torch.save({"w": torch.ones(2)}, src)
    # /proc refuses new files even for root
    with pytest.raises(tg.TorchgraftError, match="cannot create a file there|not writable"):
        convert(src, "/proc/torchgraft-test.safetensors")
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(tg.TorchgraftError, match="not writable"):
                convert(src, ro / "x.safetensors")
        finally:
            ro.chmod(0o700)


def test_zip_with_a_member_twice(tmp_path: Path) -> None:
    plain = tmp_path / "a.pth"
    torch.save({"w": torch.ones(2)}, plain)
    dup = tmp_path / "dup.pth"
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(dup, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info.filename))
        with pytest.warns(UserWarning):
            zout.writestr("a/data.pkl", pickle.dumps({"w": 1}, protocol=2))
    with pytest.raises(tg.CorruptCheckpointError, match="twice"):
        tg.read(dup)


# --- item 13: safetensors overlap and duplicate keys ------------------------------------------


def _entry(begin: int, n: int) -> dict:
    return {"dtype": "F32", "shape": [n], "data_offsets": [begin, begin + 4 * n]}


@pytest.mark.parametrize("entries", [
    # an empty tensor sorted between two overlapping ranges hid the overlap
    {"a": _entry(0, 4), "z": _entry(4, 0), "b": _entry(8, 4)},
    # a long range overlapping a later one, with a short range in between
    {"a": _entry(0, 10), "b": _entry(4, 1), "c": _entry(20, 2)},
    {"a": _entry(0, 2), "b": _entry(0, 2)},
])
def test_safetensors_overlaps_found(tmp_path: Path, entries: dict) -> None:
    end = max(e["data_offsets"][1] for e in entries.values())
    path = st_write(tmp_path / "o.safetensors", entries, b"\0" * end)
    with pytest.raises(tg.CorruptCheckpointError, match="overlap"):
        tg.read(path)


def test_safetensors_empty_tensors_anywhere_are_fine(tmp_path: Path) -> None:
    entries = {"a": _entry(0, 2), "e1": _entry(4, 0), "e2": _entry(8, 0), "b": _entry(8, 2),
               "e3": _entry(16, 0)}
    path = st_write(tmp_path / "o.safetensors", entries, np.arange(4, dtype="<f4").tobytes())
    state = tg.read(path)
    assert state["b"].tolist() == [2.0, 3.0]


@pytest.mark.parametrize("raw", [
    b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"data\\u005foffsets":[4,8]}}',
    b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
    b'"\\u0077":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
    b'{"__metadata__":{"a":"1","\\u0061":"2"},'
    b'"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    # the same, spelled literally
    b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"data_offsets":[4,8]}}',
    b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
    b'"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
    b'{"__metadata__":{"a":"1","a":"2"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
])
def test_safetensors_duplicate_keys_however_spelled(tmp_path: Path, raw: bytes) -> None:
    path = st_write(tmp_path / "d.safetensors", raw, b"\0" * 8)
    with pytest.raises(tg.CorruptCheckpointError, match="duplicate key"):
        tg.read(path)


# --- item 5: amplification -------------------------------------------------------------------


def _deflated_checkpoint(tmp_path: Path, filler: int) -> Path:
    """A torch.save file whose data.pkl (holding ``filler`` bytes of text) is deflated."""
    plain = tmp_path / "plain.pth"
    torch.save({"w": torch.arange(3.0), "note": "x" * filler}, plain)
    dst = tmp_path / "deflated.pth"
    with zipfile.ZipFile(plain) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            method = zipfile.ZIP_DEFLATED if info.filename.endswith("data.pkl") else 0
            zout.writestr(info.filename, zin.read(info.filename), method)
    return dst


def test_deflated_pickle_reads(tmp_path: Path) -> None:
    path = _deflated_checkpoint(tmp_path, 1000)
    with zipfile.ZipFile(path) as zf:
        assert zf.getinfo("plain/data.pkl").compress_type == zipfile.ZIP_DEFLATED
    state = tg.read(path)
    assert state["w"].tolist() == [0.0, 1.0, 2.0]


def test_deflated_pickle_over_the_limit_is_refused_before_inflating(tmp_path: Path) -> None:
    path = _deflated_checkpoint(tmp_path, 4 << 20)
    with tg.limits_raised(max_pickle_bytes=1 << 20), \
            pytest.raises(tg.ResourceLimitError, match="max_pickle_bytes"):
        tg.read(path)


def test_deflate_ratio_bomb_is_refused(tmp_path: Path) -> None:
    path = _deflated_checkpoint(tmp_path, 40 << 20)  # 40 MB of 'x': ~40 kB deflated
    with pytest.raises(tg.ResourceLimitError, match="max_compression_ratio"):
        tg.read(path)
    with tg.limits_raised(max_compression_ratio=10 ** 6):
        assert tg.read(path)["w"].tolist() == [0.0, 1.0, 2.0]


def _lying_bomb(path: Path, member: str, inflated: int, declared: int) -> None:
    """A member that inflates to ``inflated`` bytes but declares ``declared``."""
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunks = [comp.compress(b"\0" * (1 << 20)) for _ in range(inflated >> 20)]
    stream = b"".join(chunks) + comp.flush()
    info = zipfile.ZipInfo(member)
    info.compress_type = zipfile.ZIP_STORED
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/byteorder" if member.endswith("pkl") else "a.npy",
                    b"little" if member.endswith("pkl") else npy_bytes((1,), payload=b"\0" * 4))
        zf.writestr(info, stream)
    # now mark it deflated, declaring a small size
    central, local = zip_fields(path, member)
    raw = bytearray(path.read_bytes())
    for pos, method_at, size_at in ((central, 10, 24), (local, 8, 22)):
        struct.pack_into("<H", raw, pos + method_at, zipfile.ZIP_DEFLATED)
        struct.pack_into("<I", raw, pos + size_at, declared)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("name, member", [("bomb.pth", "archive/data.pkl"),
                                          ("bomb.npz", "b.npy")])
def test_lying_declared_size_never_inflates_past_it(tmp_path: Path, name: str,
                                                    member: str) -> None:
    path = tmp_path / name
    # inflating it all would need 512 MB; the child may use 300 MB more than torch needs
    _lying_bomb(path, member, inflated=512 << 20, declared=1000)
    r = run_isolated(f"""
        try:
            tg.read({str(path)!r})
        except tg.TorchgraftError as err:
            print(type(err).__name__, err)
        """, timeout=120, extra_mb=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("CorruptCheckpointError"), r.stdout
    assert "cannot be decompressed" in r.stdout or "inflates to" in r.stdout, r.stdout


def test_npz_object_member_bomb(tmp_path: Path) -> None:
    path = tmp_path / "obj.npz"
    big = np.empty(1, dtype=object)
    big[0] = "y" * (8 << 20)
    np.savez_compressed(path, ok=np.ones(2, np.float32), obj=big)
    with tg.limits_raised(max_pickle_bytes=1 << 20), \
            pytest.raises(tg.ResourceLimitError, match="max_pickle_bytes"):
        tg.read(path)


def test_npz_total_declared_bytes_limit(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    np.savez_compressed(path, a=np.zeros(1000, np.float32), b=np.zeros(1000, np.float32))
    with tg.limits_raised(max_decompressed_bytes=5000), \
            pytest.raises(tg.ResourceLimitError, match="max_decompressed_bytes"):
        tg.read(path)
    assert set(tg.read(path)) == {"a", "b"}


# --- item 7: npz CRC failure before the first write -------------------------------------------


def test_npz_bad_crc_in_a_deflated_member_leaves_the_model_unchanged(tmp_path: Path) -> None:
    # the deflated member is large enough that reading its .npy header does not reach its end
    # (where zipfile checks the CRC): it used to fail only during the copy, after the stored one
    model = nn.Sequential(nn.Linear(64, 512))
    path = tmp_path / "mixed.npz"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w") as zf:
        buf = io.BytesIO()
        np.save(buf, rng.standard_normal(512).astype(np.float32))
        zf.writestr(zipfile.ZipInfo("0.bias.npy"), buf.getvalue())  # stored
        buf = io.BytesIO()
        np.save(buf, rng.standard_normal((512, 64)).astype(np.float32))
        info = zipfile.ZipInfo("0.weight.npy")
        info.compress_type = zipfile.ZIP_DEFLATED
        zf.writestr(info, buf.getvalue())
    with zipfile.ZipFile(path) as zf:
        crc = zf.getinfo("0.weight.npy").CRC
    patch_zip(path, "0.weight.npy", crc=crc ^ 0xFFFF)
    before = snapshot(model)
    with pytest.raises(tg.CorruptCheckpointError, match="0.weight"):
        tg.load(model, path)
    assert_same(model, before)
    with pytest.raises(tg.CorruptCheckpointError):
        tg.read(path)


def test_mixed_npz_loads_when_intact(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    path = tmp_path / "ok.npz"
    np.savez_compressed(path, **{"0.weight": np.ones((3, 4), np.float32),
                                 "0.bias": np.full(3, 2, np.float32)})
    assert tg.load(model, path).ok
    assert model[0].bias.tolist() == [2.0, 2.0, 2.0]


# --- item 12: legacy views outside their storage ----------------------------------------------


def _legacy_with_view(path: Path, view: tuple | None, numel: int = 8) -> None:
    """A legacy torch file whose one tensor's storage is referenced through ``view``."""
    from torchgraft.formats.torch_legacy import MAGIC

    data = torch.arange(numel, dtype=torch.float32)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            if isinstance(obj, torch.storage.TypedStorage):
                return ("storage", torch.FloatStorage, "k0", "cpu", numel, view)
            return None

    with open(path, "wb") as f:
        for obj in (MAGIC, 1001, {"protocol_version": 1001, "little_endian": True,
                                  "type_sizes": {"short": 2, "int": 4, "long": 4}}):
            pickle.dump(obj, f, protocol=2)
        Pickler(f, protocol=2).dump({"w": data[:4]})
        pickle.dump(["k0"], f, protocol=2)
        f.write(struct.pack("<q", numel) + data.numpy().tobytes())


def test_legacy_file_round_trip_helper(tmp_path: Path) -> None:
    path = tmp_path / "ok.pth"
    _legacy_with_view(path, None)
    assert tg.read(path)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("view", [("v", -6, 4), ("v", 6, 4), ("v", "1", 4)])
def test_legacy_view_outside_its_storage(tmp_path: Path, view: tuple) -> None:
    path = tmp_path / "v.pth"
    _legacy_with_view(path, view)
    with pytest.raises(tg.CorruptCheckpointError, match="storage view"):
        tg.read(path)


# --- item 14: terminal injection --------------------------------------------------------------

HOSTILE = "blocks.0\x1b]0;pwned\x07\x1b[2J\n.weight\u202e"


def _hostile_file(tmp_path: Path) -> Path:
    path = tmp_path / "hostile.safetensors"
    save_file({HOSTILE: torch.ones(2), "plain": torch.ones(1)}, str(path),
              metadata={"note\x1b[31m": "v\x07\r"})
    return path


def test_inspect_text_escapes_and_json_is_exact(tmp_path: Path, capsys) -> None:
    path = _hostile_file(tmp_path)
    assert cli_main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\r" not in out
    assert escape_text(HOSTILE) in out or "blocks.0\\e]0;pwned" in out
    assert cli_main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert HOSTILE in [t["name"] for t in info["tensors"]]
    assert info["metadata"].get("note\x1b[31m") == "v\x07\r"


def test_diff_text_escapes(tmp_path: Path, capsys) -> None:
    path = _hostile_file(tmp_path)
    other = tmp_path / "other.safetensors"
    save_file({"plain": torch.ones(1)}, str(other))
    assert cli_main(["diff", str(other), str(path)]) == 1
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "pwned" in out
    assert cli_main(["diff", str(other), str(path), "--json"]) == 1
    added = json.loads(capsys.readouterr().out)["added"]
    assert HOSTILE in [t["name"] for t in added]


def test_diff_plan_text_escapes(tmp_path: Path, capsys) -> None:
    path = tmp_path / "h.safetensors"
    save_file({"0.weight\x1b[2J": torch.ones(3, 4), "bias": torch.ones(3)}, str(path))
    code = cli_main(["diff", str(path), "torch.nn:Linear?in_features=4&out_features=3"])
    out = capsys.readouterr()
    assert code in (0, 1), out.err  # 1 if the plan would fail; either way it is printed
    assert "\x1b" not in out.out and "\x1b" not in out.err
    assert "0.weight\\e[2J" in out.out


def test_convert_text_escapes(tmp_path: Path, capsys) -> None:
    shared = torch.ones(3)
    src = tmp_path / "tied.pth"
    torch.save({"a\x1b[2J": shared, "b\x07": shared}, src)
    dst = tmp_path / "out.safetensors"
    assert cli_main(["convert", str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "shared, stored once" in out
    assert "\x1b" not in out and "\x07" not in out and "a\\e[2J" in out


def test_colour_codes_survive_and_hostile_ones_do_not() -> None:
    from torchgraft.cli.common import Style, terminal_lines

    st = Style()
    st.on = True
    text = terminal_lines([st.red("name\x1b]0;title\x07\x1b[31m") + " plain\nnext"], st)
    assert text.startswith("\x1b[31mname\\e]0;title\\x07")
    assert text.count("\x1b") == 3  # ours: red, the hostile SGR (a plain colour), reset
    assert text.endswith("\x1b[0m plain\\nnext\n")


def test_error_lines_are_escaped(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "evil\x1b[2J\x07"
    folder.mkdir()
    assert cli_main(["inspect", str(folder)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\x07" not in err and "evil\\e[2J\\x07" in err


# --- the container fuzzer ---------------------------------------------------------------------


def test_container_fuzzer(tmp_path: Path) -> None:
    """Seeded structure-aware mutations of real zip / safetensors / npz / folder checkpoints.

    ``TORCHGRAFT_FUZZ_EXAMPLES`` (default 150) sets the number of cases; the child process has a
    per-case alarm, a memory cap and an overall timeout.
    """
    count = int(os.environ.get("TORCHGRAFT_FUZZ_EXAMPLES", "150"))
    seed = int(os.environ.get("TORCHGRAFT_FUZZ_SEED", "1234"))
    r = run_isolated(f"""
        from tests.fuzz_containers import run
        import json
        print(json.dumps(run({str(tmp_path)!r}, count={count}, seed={seed})))
        """, timeout=max(120, count * 2), extra_mb=1500)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["cases"] == count
    assert not summary["failures"], json.dumps(summary["failures"][:5], indent=1)
    assert summary["errors"] > 0  # the mutations do hit checks


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
