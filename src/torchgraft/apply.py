"""The apply stage: carry out a plan's copies, reading each tensor straight into the model.

Copies run in file order. The stage asks each reference where its bytes lie
(:meth:`~torchgraft.tensors.TensorRef.byte_span`) and each copy's
:class:`~torchgraft.targets.Destination` where they go: a CPU parameter of the stored dtype is
filled by ``preadv`` into its own memory (no staging copy); anything else is read once and
``copy_``-ed (cast and moved to the parameter's device); meta-device tensors are replaced by
real ones. If a copy fails, a :class:`~torchgraft.errors.PartialLoadError` names what was
already written.

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
from typing import Any

import torch

from . import targets
from .errors import PartialLoadError
from .plan import Copy
from .staged import copy_staged, stageable
from .targets import Accelerator, Destination, FreshForMeta, destination_for
from .tensors import ByteSpan, byte_view

CHUNK_BYTES = 16 * 1024 * 1024
SMALL_BYTES = 256 * 1024  # tensors below this are read in batches
BATCH_BYTES = 8 * 1024 * 1024
BATCH_GAP = 64 * 1024


class _Work:
    """The copies of a plan sorted into how each is carried out, in file order.

    Each copy gets its :class:`~torchgraft.targets.Destination`; a reference whose bytes lie in
    a file (:meth:`~torchgraft.tensors.TensorRef.byte_span`) going into raw CPU memory of the
    same dtype is read straight in (small ones batched, large ones sliced over threads).
    """

    def __init__(self, copies: list[Copy], workers: int) -> None:
        self.staged: list[Copy] = []  # accelerator targets: pinned buffers, transfers in flight
        self.big: list[tuple[str, int, Copy]] = []  # other direct reads, in threads
        self.small: list[tuple[str, int, int, int, Copy]] = []  # (path, start, end, ptr, copy)
        self.other: list[Copy] = []  # everything else: the destination writes the reference
        self.dest: dict[int, Destination] = {}  # none for a CPU tensor filled in place
        self.spans: dict[int, ByteSpan] = {}  # large raw reads, sliced over threads
        self.handles: dict[str, Any] = {}  # path -> file handle of the small reads
        threaded = workers > 1 and sys.platform != "win32"
        paths: dict[int, str] = {}
        custom = len(targets.DESTINATIONS) > 1  # else: CPU tensors filled in place, no object
        for copy in copies:
            ref = copy.ref
            target = copy.slots[0].tensor
            if custom:
                dest = self.dest[id(copy)] = destination_for(copy)
            elif target.is_cpu:
                dest = None
            else:
                dest = self.dest[id(copy)] = (FreshForMeta if target.is_meta else Accelerator)(copy)
            span = ref.byte_span()
            if span is None or span[2] <= span[1]:
                self.other.append(copy)
                continue
            fh, start, end = span
            path = paths.get(id(fh))
            if path is None:
                path = paths[id(fh)] = str(fh.path)
            if dest is None:
                raw = target.dtype == ref.dtype and target.is_contiguous()
            else:
                raw = dest.raw_memory(ref.dtype)
            if raw:
                if end - start <= SMALL_BYTES:
                    ptr = (target if dest is None else dest.buffer()).data_ptr()
                    self.small.append((path, start, end, ptr, copy))
                    self.handles[path] = fh
                    continue
                self.spans[id(copy)] = span
            if threaded and not isinstance(dest, Accelerator):
                # read in the pool (preadv releases the GIL), sliced if raw and large
                self.big.append((path, start, copy))
            elif isinstance(dest, Accelerator) and stageable(ref, dest.tensor):
                self.staged.append(copy)
            else:
                self.other.append(copy)
        self.big.sort(key=lambda t: (t[0], t[1]))
        self.small.sort(key=lambda t: (t[0], t[1]))

    def batches(self) -> list[list[tuple[str, int, int, int, Copy]]]:
        """Runs of small tensors that lie close together in one file, one read each."""
        out: list[list[tuple[str, int, int, int, Copy]]] = []
        batch: list[tuple[str, int, int, int, Copy]] = []
        path, first, last = "", 0, 0
        for item in self.small:
            b, e = item[1], item[2]
            if batch and item[0] == path and b - last <= BATCH_GAP and e - first <= BATCH_BYTES:
                batch.append(item)
                if e > last:
                    last = e
                continue
            if batch:
                out.append(batch)
            batch, path, first, last = [item], item[0], b, e
        if batch:
            out.append(batch)
        return out


def apply_copies(
    model: torch.nn.Module,
    copies: list[Copy],
    progress: Callable[[int], None] | None = None,
    threads: int | None = None,
) -> list[str]:
    """Write every planned copy into ``model``; returns the names written."""
    done: list[Copy] = []
    touched: dict[int, Copy] = {}  # copies whose target may hold some new bytes already
    lock = threading.Lock()
    stop = threading.Event()

    workers = threads if threads is not None else min(4, os.cpu_count() or 1)
    work = _Work(copies, workers)

    dests = work.dest

    def finished(copy: Copy) -> None:
        dest = dests.get(id(copy)) if dests else None
        if dest is not None:
            dest.finish(model)
        done.append(copy)
        if progress:
            progress(copy.ref.nbytes)

    def started(copy: Copy) -> None:
        dest = dests.get(id(copy)) if dests else None
        if dest is None or dest.writes_model:
            touched[id(copy)] = copy

    def buffer(copy: Copy) -> torch.Tensor:
        dest = dests.get(id(copy)) if dests else None
        return copy.slots[0].tensor.detach() if dest is None else dest.buffer()

    def run(copy: Copy) -> None:
        started(copy)
        with torch.no_grad():
            copy.ref.read_into(buffer(copy))
        with lock:
            finished(copy)

    def run_batch(batch: list[tuple[str, int, int, int, Copy]]) -> None:
        if not dests:  # all in place: no per-tensor bookkeeping beyond the lists
            for item in batch:
                touched[id(item[4])] = item[4]
            _copy_batch(batch, work.handles[batch[0][0]])
            with lock:
                done.extend(item[4] for item in batch)
                if progress:
                    progress(sum(item[2] - item[1] for item in batch))
            return
        for item in batch:
            started(item[4])
        _copy_batch(batch, work.handles[batch[0][0]])
        with lock:
            for item in batch:
                finished(item[4])

    try:
        if work.staged:
            for copy in work.staged:
                started(copy)
            copy_staged([(c.ref, c.slots[0].tensor) for c in work.staged])
            for copy in work.staged:
                finished(copy)
        batches = work.batches()
        if work.big:
            tasks = [t for _, _, c in work.big for t in _chunks(c, work.spans.get(id(c)))]
            left = {id(c): 0 for _, _, c in work.big}
            for c, _, _ in tasks:
                left[id(c)] += 1

            def run_task(task: tuple[Copy, int, int]) -> None:
                if stop.is_set():  # an earlier task failed: start nothing new
                    return
                copy, start, n = task
                if n == 0:
                    run(copy)
                    return
                started(copy)
                _read_chunk(work.spans[id(copy)], buffer(copy), start, n)
                with lock:
                    left[id(copy)] -= 1
                    if left[id(copy)] == 0:
                        finished(copy)

            def guarded(task: tuple[Copy, int, int]) -> None:
                try:
                    run_task(task)
                except BaseException:
                    stop.set()
                    raise

            with ThreadPoolExecutor(workers) as pool:
                results = pool.map(guarded, tasks)  # all submitted now
                try:
                    for batch in batches:  # small runs on this thread meanwhile (GIL-bound)
                        run_batch(batch)
                    list(results)
                except BaseException:
                    stop.set()
                    raise
        else:
            for batch in batches:
                run_batch(batch)
        for copy in work.other:
            run(copy)
    except BaseException as err:
        hit = {id(c) for c in done} | set(touched)
        written = [s.name for c in copies if id(c) in hit for s in c.slots]
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
    return [s.name for c in done for s in c.slots]


def _copy_batch(batch: list[tuple[str, int, int, int, Copy]], fh: Any) -> None:
    """One ``preadv`` for the whole run, then a ``memmove`` into each parameter."""
    start = batch[0][1]
    end = max(item[2] for item in batch)
    buf = bytearray(end - start)
    fh.pread_into(memoryview(buf), start)
    base = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf)) - start
    memmove = ctypes.memmove
    for _, b, e, ptr, _ in batch:
        memmove(ptr, base + b, e - b)


def _chunks(copy: Copy, span: ByteSpan | None) -> list[tuple[Copy, int, int]]:
    """Slices of a large byte-for-byte read (``span``: raw bytes into raw memory), so that one
    huge tensor keeps every thread busy; ``(copy, 0, 0)`` stands for the whole copy."""
    n = span[2] - span[1] if span is not None else 0
    if n <= CHUNK_BYTES:
        return [(copy, 0, 0)]
    return [(copy, s, min(CHUNK_BYTES, n - s)) for s in range(0, n, CHUNK_BYTES)]


def _read_chunk(span: ByteSpan, target: torch.Tensor, start: int, n: int) -> None:
    span[0].pread_into(byte_view(target)[start:start + n], span[1] + start)
