"""The central-directory reader behind torch zip checkpoints: zip64, fallbacks, CRC of the pickle."""

from __future__ import annotations

import os
import zipfile

import pytest
import torch

import torchgraft as tg
from torchgraft.errors import CorruptCheckpointError
from torchgraft.formats.zip_index import read_central_directory


def _zipfile_members(path):
    with zipfile.ZipFile(path) as zf:
        return {i.filename: (i.header_offset, i.compress_size, i.compress_type, i.CRC)
                for i in zf.infolist()}


def _ours(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_central_directory(fd, os.path.getsize(path))
    finally:
        os.close(fd)


def test_zip64_archive_of_many_tensors(tmp_path):
    """Over 65535 members: torch writes a zip64 end record; every member and value must match."""
    n = 70_000
    sd = {f"t{i}": torch.full((2,), float(i)) for i in range(n)}
    path = tmp_path / "many.pth"
    torch.save(sd, path)
    members = _ours(path)
    assert members is not None and len(members) > 0xFFFF
    assert members == _zipfile_members(path)
    got = tg.read(path)
    assert len(got) == n
    for i in (0, 1, 65_534, 65_535, 65_536, n - 1):
        assert got[f"t{i}"].tolist() == [float(i), float(i)]


def test_archive_comment_is_parsed_and_trailing_garbage_falls_back(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"w": torch.arange(4.0)}, path)
    with zipfile.ZipFile(path, "a") as zf:
        zf.comment = b"saved by a tool that writes comments"
    assert _ours(path) == _zipfile_members(path)
    assert tg.read(path)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]

    with open(path, "ab") as f:  # bytes after the archive: declined, zipfile decides
        f.write(b"\0" * 10)
    assert _ours(path) is None
    assert tg.read(path)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_corrupt_pickle_fails_its_crc(tmp_path):
    path = tmp_path / "w.pth"
    torch.save({"weight": torch.ones(3)}, path)
    data = bytearray(path.read_bytes())
    at = data.index(b"weight")
    data[at] = ord("W")  # still a valid pickle, silently a different name without the CRC
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError, match="CRC"):
        tg.read(path)


def test_not_a_zip_is_declined(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"PK\x05\x06" + b"\0" * 10)
    assert _ours(path) is None
