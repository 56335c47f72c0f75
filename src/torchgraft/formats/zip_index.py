"""A fast, strict reader of a zip archive's central directory (zip64 included).

``zipfile.ZipFile`` builds a ``ZipInfo`` object per member, which dominates opening a torch
checkpoint of many small tensors. Torch's writer produces plain archives (stored members, one
disk, no encryption), so this reader parses only that shape of archive, with every field
checked, and returns ``None`` for anything else, leaving it to ``zipfile``.

Example:
    >>> import io, zipfile, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "a.zip")
    >>> with zipfile.ZipFile(path, "w") as z:
    ...     z.writestr("archive/data.pkl", b"x" * 5)
    >>> with open(path, "rb") as f:
    ...     members = read_central_directory(f.fileno(), os.path.getsize(path))
    >>> members["archive/data.pkl"][1:3]
    (5, 0)
"""

from __future__ import annotations

import os
import struct
import zipfile
from pathlib import Path

from ..errors import CorruptCheckpointError, UnsupportedFormatError
from ..limits import LIMITS

_EOCD = struct.Struct("<4sHHHHIIH")  # end of central directory record, 22 bytes
_EOCD64_LOCATOR = struct.Struct("<4sIQI")  # 20 bytes
_EOCD64 = struct.Struct("<4sQHHIIQQQQ")  # 56 bytes
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")  # 46 bytes
_MAX_COMMENT = 0xFFFF

# name -> (local header offset, stored size, compression method, CRC-32)
Members = dict[str, tuple[int, int, int, int]]


def _pread(fd: int, offset: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        got = os.pread(fd, n - len(out), offset + len(out))
        if not got:
            break
        out += got
    return out


def _end_record(fd: int, size: int) -> tuple[int, int, int] | None:
    """(entries, central directory size, central directory offset), zip64 resolved."""
    tail_len = min(size, _EOCD.size + _MAX_COMMENT)
    tail = _pread(fd, size - tail_len, tail_len)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + _EOCD.size > len(tail):
        return None
    _, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, comment_len = _EOCD.unpack_from(tail, at)
    if at + _EOCD.size + comment_len != len(tail):
        return None  # trailing bytes after the archive, or a false signature
    if 0xFFFF not in (n_total, disk) and 0xFFFFFFFF not in (cd_size, cd_offset):
        if disk or cd_disk or n_disk != n_total:
            return None
        return n_total, cd_size, cd_offset
    eocd_pos = size - tail_len + at
    if eocd_pos < _EOCD64_LOCATOR.size:
        return None
    loc = _pread(fd, eocd_pos - _EOCD64_LOCATOR.size, _EOCD64_LOCATOR.size)
    sig, _, rec_offset, n_disks = _EOCD64_LOCATOR.unpack(loc)
    if sig != b"PK\x06\x07" or n_disks > 1 or rec_offset + _EOCD64.size > eocd_pos:
        return None
    rec = _pread(fd, rec_offset, _EOCD64.size)
    if len(rec) != _EOCD64.size:
        return None
    sig, _, _, _, disk, cd_disk, n_disk, n_total, cd_size, cd_offset = _EOCD64.unpack(rec)
    if sig != b"PK\x06\x06" or disk or cd_disk or n_disk != n_total:
        return None
    return n_total, cd_size, cd_offset


def _zip64_extra(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int] | None:
    """Resolve 0xFFFFFFFF fields from the zip64 extra block (id 1), in the order the spec gives."""
    pos = 0
    while pos + 4 <= len(extra):
        hid, hlen = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4:pos + 4 + hlen]
        if hid == 1:
            vals = [v for (v,) in struct.iter_unpack("<Q", body[: len(body) // 8 * 8])]
            fields = [usize, csize, offset]
            for i, v in enumerate(fields):
                if v == 0xFFFFFFFF:
                    if not vals:
                        return None
                    fields[i] = vals.pop(0)
            return fields[0], fields[1], fields[2]
        pos += 4 + hlen
    return None


def read_central_directory(fd: int, size: int) -> Members | None:
    """Members of the zip in ``fd`` (``size`` bytes long), or None if the archive is not a plain
    single-disk, unencrypted one this reader fully understands (``zipfile`` then decides)."""
    end = _end_record(fd, size)
    if end is None:
        return None
    n_total, cd_size, cd_offset = end
    if cd_offset + cd_size > size or n_total * _CENTRAL.size > cd_size:
        return None
    cd = _pread(fd, cd_offset, cd_size)
    if len(cd) != cd_size:
        return None
    members: Members = {}
    unpack = _CENTRAL.unpack_from
    pos = 0
    for _ in range(n_total):
        if pos + 46 > cd_size:
            return None
        (sig, _, _, flags, method, _, _, crc, csize, usize, n_len, e_len, c_len, disk, _, _,
         offset) = unpack(cd, pos)
        end_pos = pos + 46 + n_len + e_len + c_len
        if sig != b"PK\x01\x02" or flags & 0x41 or disk not in (0, 0xFFFF) or end_pos > cd_size:
            return None  # encrypted, strong-encrypted, multi-disk or garbled: zipfile decides
        raw = cd[pos + 46:pos + 46 + n_len]
        try:
            name = raw.decode("utf-8" if flags & 0x800 else "cp437")
        except UnicodeDecodeError:
            return None
        if 0xFFFFFFFF in (csize, usize, offset):
            fixed = _zip64_extra(cd[pos + 46 + n_len:pos + 46 + n_len + e_len], usize, csize, offset)
            if fixed is None:
                return None
            usize, csize, offset = fixed
        if name in members or (method == 0 and csize != usize) or offset + 30 > cd_offset:
            return None
        members[name] = (offset, csize, method, crc)
        pos = end_pos
    return members


# --- bounded reading of members (shared by the torch zip and npz readers) ---------------------

_RATIO_FLOOR = 16 << 20  # below this many declared bytes any compression ratio is accepted


def check_declared_size(path: Path, name: str, declared: int, stored: int, limit: str) -> None:
    """Refuse a compressed member before inflating it when the size its header declares is over
    ``LIMITS.<limit>`` or more than ``LIMITS.max_compression_ratio`` times its stored size."""
    LIMITS.check(limit, declared, f"{path.name}: member {name} declares {declared} bytes "
                                  "when decompressed, which")
    if declared > _RATIO_FLOOR and declared > LIMITS.max_compression_ratio * max(stored, 1):
        LIMITS.check("max_compression_ratio", declared // max(stored, 1),
                     f"{path.name}: member {name} inflates {stored} stored bytes to {declared}; "
                     "that ratio")


def inflate_member(zf: zipfile.ZipFile, name: str, limit: str = "max_pickle_bytes",
                   keep: bool = True) -> bytes:
    """A compressed member's bytes (``keep=False``: only verified, ``b""`` returned).

    Its declared size is checked first (see :func:`check_declared_size`); it is then inflated in
    bounded steps, never past the declared size, and must match it and its CRC exactly.
    """
    info = zf.getinfo(name)
    path = Path(zf.filename or "?")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise UnsupportedFormatError(
            f"{path.name}: member {name} uses zip compression method {info.compress_type}; "
            "only stored and deflate members are read (what torch and numpy write)")
    check_declared_size(path, name, info.file_size, info.compress_size, limit)
    out = bytearray()
    got = 0
    try:
        with zf.open(info) as f:  # ZipExtFile: bounded decompress steps, stops at declared size
            while chunk := f.read(1 << 20):
                got += len(chunk)
                if keep:
                    out += chunk
    except Exception as err:  # BadZipFile (CRC), zlib.error, EOFError on garbage
        raise CorruptCheckpointError(
            f"{path.name}: member {name} cannot be decompressed ({err}); the file is corrupt - "
            "download it again") from None
    if got != info.file_size:
        raise CorruptCheckpointError(
            f"{path.name}: {name} inflates to {got} bytes, its header declares "
            f"{info.file_size}; the file is corrupt - download it again")
    return bytes(out)


def check_stored_size(path: Path, name: str, size: int, limit: str) -> None:
    """Refuse a stored member larger than ``LIMITS.<limit>`` before reading it into memory."""
    LIMITS.check(limit, size, f"{path.name}: member {name} size in bytes")
