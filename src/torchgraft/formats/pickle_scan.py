"""A linear pre-scan of a pickle's opcodes, run before the C unpickler sees it.

Two opcodes are dangerous in CPython's unpickler whatever ``find_class`` does:

* ``LONG_BINPUT``/``PUT`` with a huge memo index: the unpickler grows its memo array to twice the
  index, so a 9-byte pickle can make it allocate and zero gigabytes.
* ``EXT1``/``EXT2``/``EXT4``: the object comes from ``copyreg``'s process-wide extension cache
  without ``find_class`` being asked.

:func:`check_opcodes` walks the opcode stream exactly as the unpickler will read it and raises
:class:`~torchgraft.errors.CorruptCheckpointError` on any extension opcode and on a memo index
larger than the pickle itself (a real pickle numbers its memo entries 0, 1, 2, ... and every entry
costs at least one byte). Runs of ordinary opcodes are skipped by one compiled regular expression,
so the scan costs about 12 ns per byte of pickle; only long strings, big memo indices and the
opcodes above reach Python code.

Example:
    >>> import pickle
    >>> data = pickle.dumps({"a": [1, 2.0, "x" * 300]})
    >>> check_opcodes(data) == len(data) - 1  # where STOP is
    True
    >>> try:
    ...     check_opcodes(b"\\x80\\x02N\\x82\\x01.")
    ... except CorruptCheckpointError as err:
    ...     print(str(err)[:47])
    pickle uses the extension opcode EXT1 at byte 3
"""

from __future__ import annotations

import functools
import re
from typing import Any

from ..errors import CorruptCheckpointError

_ANY = b"[\\x00-\\xff]"
_NO_ARG = b"()012NRQ]abdelostu}\x81\x85\x86\x87\x88\x89\x8f\x90\x91\x92\x93\x94\x97\x98"
_EXT = {0x82: "EXT1", 0x83: "EXT2", 0x84: "EXT4"}
_LEN1 = frozenset(b"\x8cCU\x8a")  # 1-byte length, then that many bytes
_LEN4 = {ord("X"): False, ord("B"): False, ord("T"): True, 0x8B: True}  # -> signed length
_LEN8 = frozenset(b"\x8d\x8e\x96")
_LINE1 = frozenset(b"IFLSVgP")  # one newline-terminated argument
_LINE2 = frozenset(b"ci")  # two


def _lit(byte: int) -> bytes:
    return re.escape(bytes([byte]))


def _counted(op: bytes, width: int, below: int = 128) -> bytes:
    """``op``, a little-endian length under ``below`` in ``width`` bytes, then that many bytes
    (longer strings take the slow path; each alternative costs regex compile time)."""
    pad = b"\\x00" * (width - 1)
    alts = [_lit(n) + pad + (_ANY + b"{%d}" % n if n else b"") for n in range(below)]
    return re.escape(op) + b"(?:" + b"|".join(alts) + b")"


@functools.cache
def _run_pattern(put_limit: int) -> re.Pattern[bytes]:
    """Any run of harmless opcodes; ``LONG_BINPUT`` only with an index below ``put_limit``
    (65536 times a power of two)."""
    high = put_limit >> 16  # allowed values of the index's upper two bytes: 0 .. high-1
    if high <= 256:
        put = b"r" + _ANY + b"{2}[\\x00-" + b"\\x%02x" % (high - 1) + b"]\\x00"
    else:
        put = b"r" + _ANY + b"{3}[\\x00-" + b"\\x%02x" % ((high >> 8) - 1) + b"]"
    parts = [  # most frequent in torch pickles first
        put, b"[Khq\\x80]" + _ANY, b"[" + b"".join(_lit(c) for c in _NO_ARG) + b"]",
        _counted(b"X", 4), _counted(b"\x8c", 1), b"M" + _ANY + b"{2}", b"[Jj]" + _ANY + b"{4}",
        b"[G\\x95]" + _ANY + b"{8}",
        # rarer counted opcodes (B T C U LONG1) take the slow path: each _counted() adds 256
        # alternatives, and compiling them cost ~30 ms per fresh process
        b"[IFLSVgP][^\\n]*\\n", b"[ci][^\\n]*\\n[^\\n]*\\n",
    ]
    return re.compile(b"(?:" + b"|".join(parts) + b")*+")  # possessive: no backtracking state


def _fast_put_limit(bound: int) -> int:
    """The largest 65536 * 2**k (k <= 16) not above ``bound``: memo indices below it need no
    Python code (at most 17 patterns are ever compiled)."""
    limit = 1 << 16
    while limit * 2 <= min(bound, 1 << 32):
        limit *= 2
    return limit


def check_opcodes(buf: Any, start: int = 0, complete: bool = True) -> int:
    """Check the pickle that starts at ``buf[start]``; return where its ``STOP`` opcode is, or
    ``len(buf)`` when the data ran out first (the unpickler reports that as truncation).

    ``buf`` is bytes or a bytearray. ``complete=False`` says more data may follow: a string
    running past the end then just ends the scan instead of being refused.
    """
    end = len(buf)
    bound = max(end - start, 1 << 16)  # no real pickle has more memo entries than bytes
    run = _run_pattern(_fast_put_limit(bound)).match
    pos = start
    while True:
        pos = run(buf, pos).end()
        if pos >= end:
            return end
        op = buf[pos]
        if op == 0x2E:  # STOP: the unpickler reads no further
            return pos
        pos = _slow_opcode(buf, pos, op, end if complete else -end, bound, start)


def _slow_opcode(buf: Any, pos: int, op: int, end: int, bound: int, start: int) -> int:
    """Check the opcode at ``pos`` that the fast pattern did not take; return the next one's
    position (``end`` when the data runs out, which the unpickler reports itself). A negative
    ``end`` means the data may continue past ``-end``."""
    complete = end >= 0
    end = abs(end)
    if op in _EXT:
        raise CorruptCheckpointError(
            f"pickle uses the extension opcode {_EXT[op]} at byte {pos - start} (copyreg's "
            "process-wide extension registry); torch and numpy never write it, so the file is "
            "corrupt or hostile")
    if op == 0x72:  # LONG_BINPUT with an index the fast pattern did not accept
        _check_memo_index(int.from_bytes(buf[pos + 1:pos + 5], "little"), bound, pos - start)
        return pos + 5
    if op == 0x70:  # PUT (protocol 0): a decimal index on its own line
        nl = buf.find(b"\n", pos + 1)
        if nl < 0:
            return end
        try:
            index = int(bytes(buf[pos + 1:nl]))
        except ValueError:
            raise CorruptCheckpointError(
                f"pickle has a bad PUT index at byte {pos - start}; the file is corrupt") from None
        _check_memo_index(index, bound, pos - start)
        return nl + 1
    if op in _LEN4:
        n = int.from_bytes(buf[pos + 1:pos + 5], "little", signed=_LEN4[op])
        return end if n < 0 else _counted_end(pos, 5, n, end, start, complete)
    if op in _LEN8:
        n = int.from_bytes(buf[pos + 1:pos + 9], "little")
        return _counted_end(pos, 9, n, end, start, complete)
    if op in _LEN1:
        return pos + 2 + buf[pos + 1] if pos + 1 < end else end
    if op in _LINE1 or op in _LINE2:
        return end  # no newline left: truncated
    if op in b"\x80KhqMJjG\x95":
        return end  # fixed-size argument cut off by the end of the data
    raise CorruptCheckpointError(
        f"pickle has an invalid opcode {op:#04x} at byte {pos - start}; the file is corrupt or "
        "not a pickle")


def _counted_end(pos: int, header: int, n: int, end: int, start: int, complete: bool) -> int:
    """Where a string or bytes argument of ``n`` bytes ends; the unpickler would allocate all
    ``n`` bytes before finding that the data is shorter, so that is refused here."""
    if pos + header + n > end:
        if not complete:
            return end
        raise CorruptCheckpointError(
            f"pickle has a {n}-byte string at byte {pos - start} but only {end - pos - header} "
            "bytes follow; the file is truncated or corrupt")
    return pos + header + n


def _check_memo_index(index: int, bound: int, at: int) -> None:
    if index > bound:
        raise CorruptCheckpointError(
            f"pickle stores memo entry {index} at byte {at}, but a pickle of this size holds at "
            f"most {bound} entries; the file is corrupt or hostile (it would make the unpickler "
            f"allocate {16 * index} bytes)")
