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

CHUNK_BYTES = 16 * 1024 * 1024
SMALL_BYTES = 256 * 1024  # tensors below this are read in batches
BATCH_BYTES = 8 * 1024 * 1024
BATCH_GAP = 64 * 1024


def _locate(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str, bool]:
    mod_path, _, attr = name.rpartition(".")
    module = model.get_submodule(mod_path) if mod_path else model
    return module, attr, attr in module._parameters


def _fresh(template: torch.Tensor) -> torch.Tensor:
    """An uninitialised CPU tensor to replace a meta-device one."""
    return torch.empty(tuple(template.shape), dtype=template.dtype, device="cpu")


def _install(model: torch.nn.Module, copy: Copy, new: torch.Tensor) -> None:
    """Set a filled tensor on every (tied) name of a meta-device slot."""
    template = copy.slots[0].tensor
    param = None
    for slot in copy.slots:
        module, attr, is_param = _locate(model, slot.name)
        if is_param:
            if param is None:
                param = torch.nn.Parameter(new, requires_grad=template.requires_grad)
            module._parameters[attr] = param
        else:
            module._buffers[attr] = new


def _materialize_meta(model: torch.nn.Module, copy: Copy) -> None:
    """Fill a meta-device slot: build a real tensor and set it on every tied name."""
    new = _fresh(copy.slots[0].tensor)
    copy.ref.read_into(new)
    _install(model, copy, new)


def _copy_one(model: torch.nn.Module, copy: Copy) -> None:
    target = copy.slots[0].tensor
    if target.device.type == "meta":
        _materialize_meta(model, copy)
    else:
        copy.ref.read_into(target.detach())


class _Work:
    """The copies of a plan sorted into how each is carried out, in file order.

    Meta-device targets that can be read byte-for-byte get a fresh CPU tensor here (``fresh``),
    are read like CPU targets, and are installed in the model once filled.
    """

    def __init__(self, copies: list[Copy], workers: int) -> None:
        self.staged: list[Copy] = []  # accelerator targets: pinned buffers, transfers in flight
        self.big: list[Copy] = []  # other CPU reads, run in threads (large ones sliced)
        self.small: list[tuple[str, int, int, int, Copy]] = []  # (path, start, end, ptr, copy)
        self.other: list[tuple[tuple, Copy]] = []  # everything else: read, then copy_
        self.fresh: dict[int, torch.Tensor] = {}  # id(copy) -> new tensor for a meta target
        self.threaded = threaded = workers > 1 and sys.platform != "win32"
        paths: dict[int, str] = {}
        for copy in copies:
            ref, target = copy.ref, copy.slots[0].tensor
            if not isinstance(ref, FileRef):
                self.other.append(((1, "", 0), copy))
                continue
            fh = ref.file
            path = paths.get(id(fh))
            if path is None:
                path = paths[id(fh)] = str(fh.path)
            start, end = ref.byte_range()
            on_cpu = target.is_cpu
            if target.is_meta and ref.contiguous and target.dtype == ref.dtype and end > start:
                target = self.fresh[id(copy)] = _fresh(target)
                on_cpu = True
            if on_cpu:
                if (ref.contiguous and 0 < end - start <= SMALL_BYTES and target.dtype == ref.dtype
                        and target.is_contiguous()):
                    self.small.append((path, start, end, target.data_ptr(), copy))
                    continue
                if threaded:  # read in the pool (preadv releases the GIL), sliced if large
                    self.big.append(copy)
                    continue
            elif stageable(ref, target):
                self.staged.append(copy)
                continue
            self.other.append(((0, path, start), copy))
        self.big.sort(key=lambda c: (str(c.ref.file.path), c.ref.byte_range()[0]))
        self.small.sort(key=lambda t: (t[0], t[1]))
        self.other.sort(key=lambda t: t[0])

    def target(self, copy: Copy) -> torch.Tensor:
        """The tensor a copy's bytes go into: the slot's own, or the fresh one of a meta slot."""
        new = self.fresh.get(id(copy)) if self.fresh else None
        return copy.slots[0].tensor if new is None else new

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

    def finished(copy: Copy) -> None:
        if work.fresh and id(copy) in work.fresh:
            _install(model, copy, work.fresh[id(copy)])
        done.append(copy)
        if progress:
            progress(copy.ref.nbytes)

    def run(copy: Copy) -> None:
        with torch.no_grad():
            if work.fresh and id(copy) in work.fresh:
                copy.ref.read_into(work.fresh[id(copy)])
            else:
                touched[id(copy)] = copy
                _copy_one(model, copy)
        with lock:
            finished(copy)

    def run_batch(batch: list[tuple[str, int, int, int, Copy]]) -> None:
        if not work.fresh:
            for item in batch:
                touched[id(item[4])] = item[4]
        _copy_batch(batch)
        with lock:
            if work.fresh:
                for item in batch:
                    finished(item[4])
                return
            done.extend(item[4] for item in batch)
            if progress:
                progress(sum(item[2] - item[1] for item in batch))

    try:
        if work.staged:
            for copy in work.staged:
                touched[id(copy)] = copy
            copy_staged([(c.ref, c.slots[0].tensor) for c in work.staged])
            for copy in work.staged:
                finished(copy)
        batches = work.batches()
        if work.big:
            tasks = [t for c in work.big for t in _chunks(c, work.target(c))]
            left = {id(c): 0 for c in work.big}
            for c, _, _ in tasks:
                left[id(c)] += 1

            def run_task(task: tuple[Copy, int, int]) -> None:
                if stop.is_set():  # an earlier task failed: start nothing new
                    return
                copy, start, n = task
                if n == 0:
                    run(copy)
                    return
                if not (work.fresh and id(copy) in work.fresh):
                    touched[id(copy)] = copy
                _read_chunk(copy, work.target(copy), start, n)
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
        for _, copy in work.other:
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


def _copy_batch(batch: list[tuple[str, int, int, int, Copy]]) -> None:
    """One ``preadv`` for the whole run, then a ``memmove`` into each parameter."""
    fh = batch[0][4].ref.file
    start = batch[0][1]
    end = max(item[2] for item in batch)
    buf = bytearray(end - start)
    fh.pread_into(memoryview(buf), start)
    base = ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf)) - start
    memmove = ctypes.memmove
    for _, b, e, ptr, _ in batch:
        memmove(ptr, base + b, e - b)


def _chunks(copy: Copy, target: torch.Tensor) -> list[tuple[Copy, int, int]]:
    """Slices of a large byte-for-byte read, so that one huge tensor keeps every thread busy;
    ``(copy, 0, 0)`` stands for the whole copy when it cannot be sliced."""
    ref = copy.ref
    direct = (ref.contiguous and target.dtype == ref.dtype and target.is_contiguous()
              and target.device.type == "cpu")
    if not direct or ref.nbytes <= CHUNK_BYTES:
        return [(copy, 0, 0)]
    return [(copy, s, min(CHUNK_BYTES, ref.nbytes - s)) for s in range(0, ref.nbytes, CHUNK_BYTES)]


def _read_chunk(copy: Copy, target: torch.Tensor, start: int, n: int) -> None:
    view = byte_view(target)[start:start + n]
    copy.ref.file.pread_into(view, copy.ref.byte_range()[0] + start)
