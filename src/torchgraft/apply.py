"""The apply stage: carry out a plan's copies, reading each tensor straight into the model.

Copies run in file order. A CPU parameter of the stored dtype is filled by ``preadv`` into its
own memory (no staging copy); anything else is read once and ``copy_``-ed (cast and moved to
the parameter's device). Meta-device tensors are replaced by real ones. If a copy fails, a
:class:`~torchgraft.errors.PartialLoadError` names what was already written.

Example:
    >>> import torch
    >>> from torchgraft.plan import Copy, model_slots
    >>> from torchgraft.tensors import MemoryRef
    >>> m = torch.nn.Linear(2, 1, bias=False)
    >>> slots = model_slots(m)
    >>> apply_copies(m, [Copy(MemoryRef(torch.ones(1, 2)), [slots["weight"]], "weight")])
    ['weight']
    >>> m.weight.tolist()
    [[1.0, 1.0]]
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from .errors import PartialLoadError
from .plan import Copy
from .staged import copy_staged, stageable
from .tensors import FileRef, byte_view

PARALLEL_MIN_BYTES = 4 * 1024 * 1024
CHUNK_BYTES = 16 * 1024 * 1024
SMALL_BYTES = 256 * 1024  # tensors below this are read in batches
BATCH_BYTES = 8 * 1024 * 1024
BATCH_GAP = 64 * 1024


def _order(copy: Copy) -> tuple:
    ref = copy.ref
    if isinstance(ref, FileRef):
        return (0, str(ref.file.path), ref.offset + ref.elem_offset * ref.dtype.itemsize)
    return (1, "", 0)


def _locate(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str, bool]:
    mod_path, _, attr = name.rpartition(".")
    module = model.get_submodule(mod_path) if mod_path else model
    return module, attr, attr in module._parameters


def _materialize_meta(model: torch.nn.Module, copy: Copy) -> None:
    """Fill a meta-device slot: build a real tensor and set it on every tied name."""
    template = copy.slots[0].tensor
    new = torch.empty(tuple(template.shape), dtype=template.dtype, device="cpu")
    copy.ref.read_into(new)
    param = None
    for slot in copy.slots:
        module, attr, is_param = _locate(model, slot.name)
        if is_param:
            if param is None:
                param = torch.nn.Parameter(new, requires_grad=template.requires_grad)
            module._parameters[attr] = param
        else:
            module._buffers[attr] = new


def _copy_one(model: torch.nn.Module, copy: Copy) -> None:
    target = copy.slots[0].tensor
    if target.device.type == "meta":
        _materialize_meta(model, copy)
    else:
        copy.ref.read_into(target.detach())


def apply_copies(
    model: torch.nn.Module,
    copies: list[Copy],
    progress: Callable[[int], None] | None = None,
    threads: int | None = None,
) -> list[str]:
    """Write every planned copy into ``model``; returns the names written."""
    written: list[str] = []
    lock = threading.Lock()

    def run(copy: Copy) -> None:
        with torch.no_grad():
            _copy_one(model, copy)
        with lock:
            written.extend(s.name for s in copy.slots)
            if progress:
                progress(copy.ref.nbytes)

    def run_batch(batch: list[Copy]) -> None:
        _copy_batch(batch)
        for copy in batch:
            written.extend(s.name for s in copy.slots)
            if progress:
                progress(copy.ref.nbytes)

    ordered = sorted(copies, key=_order)
    staged = [c for c in ordered if stageable(c.ref, c.slots[0].tensor)]
    if staged:
        ordered = [c for c in ordered if not stageable(c.ref, c.slots[0].tensor)]
    workers = threads if threads is not None else min(4, os.cpu_count() or 1)
    big = [c for c in ordered if _parallel_ok(c)] if workers > 1 else []
    rest = [c for c in ordered if not _parallel_ok(c)] if big else ordered
    try:
        if staged:  # accelerator targets: pinned buffers, many transfers in flight
            copy_staged([(c.ref, c.slots[0].tensor) for c in staged])
            for copy in staged:
                written.extend(s.name for s in copy.slots)
                if progress:
                    progress(copy.ref.nbytes)
        if big:
            with ThreadPoolExecutor(workers) as pool:
                tasks = [t for c in big for t in _chunks(c)]
                left = {id(c): 0 for c in big}
                for c, _, _ in tasks:
                    left[id(c)] += 1

                def run_task(task: tuple[Copy, int, int]) -> None:
                    copy, start, n = task
                    if n == 0:
                        run(copy)
                        return
                    _read_chunk(copy, start, n)
                    with lock:
                        left[id(copy)] -= 1
                        done = left[id(copy)] == 0
                        if done:
                            written.extend(s.name for s in copy.slots)
                            if progress:
                                progress(copy.ref.nbytes)

                list(pool.map(run_task, tasks))
        for item in _batches(rest):
            if isinstance(item, list):
                run_batch(item)
            else:
                run(item)
    except BaseException as err:
        if not written:
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            raise PartialLoadError(
                f"copying failed before any tensor was written ({type(err).__name__}: {err}); "
                "the model is unchanged", written) from err
        shown = ", ".join(written[:8]) + (" ..." if len(written) > 8 else "")
        raise PartialLoadError(
            f"copying failed part-way ({type(err).__name__}: {err}). The model is PARTIALLY "
            f"loaded: {len(written)} of {sum(len(c.slots) for c in copies)} tensors already hold "
            f"checkpoint values ({shown}); the rest keep their old values. Reload the model "
            "before using it.", written) from err
    return written


def _batchable(copy: Copy) -> bool:
    """A small contiguous file tensor going byte-for-byte into contiguous CPU memory."""
    ref, target = copy.ref, copy.slots[0].tensor
    return (isinstance(ref, FileRef) and ref.contiguous and 0 < ref.nbytes <= SMALL_BYTES
            and target.device.type == "cpu" and target.dtype == ref.dtype
            and target.is_contiguous())


def _batches(copies: list[Copy]) -> list[Copy | list[Copy]]:
    """Group runs of small tensors that lie close together in one file."""
    out: list[Copy | list[Copy]] = []
    batch: list[Copy] = []
    start = end = 0
    for copy in copies:
        if not _batchable(copy):
            out.append(copy)
            continue
        ref = copy.ref
        b, e = ref.byte_range()
        if batch and (ref.file is batch[0].ref.file and start <= b and b - end <= BATCH_GAP
                      and e - start <= BATCH_BYTES):
            batch.append(copy)
            end = max(end, e)
            continue
        if batch:
            out.append(batch)
        batch, start, end = [copy], b, e
    if batch:
        out.append(batch)
    return out


def _copy_batch(batch: list[Copy]) -> None:
    """One ``preadv`` for the whole run, then a ``memmove`` into each parameter."""
    fh = batch[0].ref.file
    start = batch[0].ref.byte_range()[0]
    end = max(c.ref.byte_range()[1] for c in batch)
    buf = bytearray(end - start)
    fh.pread_into(memoryview(buf), start)
    base = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf))
    for copy in batch:
        b, e = copy.ref.byte_range()
        ctypes.memmove(copy.slots[0].tensor.data_ptr(), base + (b - start), e - b)


CHUNK_BYTES = 16 * 1024 * 1024


def _chunks(copy: Copy) -> list[tuple[Copy, int, int]]:
    """Slices of a large byte-for-byte read, so that one huge tensor keeps every thread busy;
    ``(copy, 0, 0)`` stands for the whole copy when it cannot be sliced."""
    ref, target = copy.ref, copy.slots[0].tensor
    direct = (ref.contiguous and target.dtype == ref.dtype and target.is_contiguous()
              and target.device.type == "cpu")
    if not direct or ref.nbytes <= CHUNK_BYTES:
        return [(copy, 0, 0)]
    return [(copy, s, min(CHUNK_BYTES, ref.nbytes - s)) for s in range(0, ref.nbytes, CHUNK_BYTES)]


def _read_chunk(copy: Copy, start: int, n: int) -> None:
    view = byte_view(copy.slots[0].tensor)[start:start + n]
    copy.ref.file.pread_into(view, copy.ref.byte_range()[0] + start)


def _parallel_ok(copy: Copy) -> bool:
    """Large file reads into CPU memory run in threads (``preadv`` releases the GIL)."""
    target = copy.slots[0].tensor
    return (isinstance(copy.ref, FileRef) and copy.ref.nbytes >= PARALLEL_MIN_BYTES
            and target.device.type == "cpu" and sys.platform != "win32")
