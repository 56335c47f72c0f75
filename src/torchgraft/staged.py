"""Staged copies to an accelerator: file → pinned host buffer → device, many in flight.

Each worker thread owns one staging buffer (pinned when the target is CUDA) and one CUDA stream.
It ``preadv``-s a chunk of the file into its buffer, starts an asynchronous host-to-device copy
on its own stream, and records an event; before reusing the buffer it waits on that event. With
several workers the disk/page-cache reads and the PCIe transfers overlap.

Only byte-for-byte copies come here (same dtype, contiguous target); the rest is cast on the
host by the plain path. On a machine without CUDA the same code runs with ordinary buffers and
synchronous copies, which is how it is tested there.

Example:
    >>> import torch, tempfile, os
    >>> from safetensors.torch import save_file
    >>> from torchgraft.formats import open_checkpoint
    >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
    >>> save_file({"w": torch.arange(10.0)}, path)
    >>> ref = open_checkpoint(path).root["w"]
    >>> out = torch.zeros(10)
    >>> copy_staged([(ref, out)], chunk_bytes=16, workers=2)
    >>> out.tolist() == list(range(10))
    True
"""

from __future__ import annotations

import queue
import threading

import torch

from .tensors import FileRef, byte_view

CHUNK_BYTES = 16 * 1024 * 1024
WORKERS = 8


def stageable(ref: object, target: torch.Tensor) -> bool:
    """True when ``ref`` can be streamed byte-for-byte into ``target`` on an accelerator."""
    return (isinstance(ref, FileRef) and ref.contiguous and target.device.type == "cuda"
            and target.dtype == ref.dtype and target.is_contiguous() and ref.nbytes > 0)


def copy_staged(pairs: list[tuple[FileRef, torch.Tensor]], chunk_bytes: int = CHUNK_BYTES,
                workers: int = WORKERS) -> None:
    """Copy every ``(ref, target)`` pair through per-worker staging buffers."""
    tasks: queue.SimpleQueue = queue.SimpleQueue()
    biggest = 0
    for ref, target in pairs:
        flat = target.detach().view(-1).view(torch.uint8) if target.numel() else None
        if flat is None:
            continue
        start, end = ref.byte_range()
        for off in range(0, end - start, chunk_bytes):
            n = min(chunk_bytes, end - start - off)
            tasks.put((ref.file, start + off, flat, off, n))
            biggest = max(biggest, n)
    if biggest == 0:
        return
    n_workers = max(1, min(workers, tasks.qsize()))
    errors: list[BaseException] = []
    threads = [threading.Thread(target=_worker, args=(tasks, biggest, errors), daemon=True)
               for _ in range(n_workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _worker(tasks: queue.SimpleQueue, size: int, errors: list[BaseException]) -> None:
    cuda = torch.cuda.is_available()
    try:
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=cuda)
        stream = torch.cuda.Stream() if cuda else None
        event = torch.cuda.Event() if cuda else None
        pending = False
        while not errors:
            try:
                fh, file_off, flat, dst_off, n = tasks.get_nowait()
            except queue.Empty:
                break
            if pending:
                event.synchronize()  # the last copy from this buffer has finished
            fh.pread_into(byte_view(buf)[:n], file_off)
            dst = flat[dst_off:dst_off + n]
            if stream is not None and dst.device.type == "cuda":
                with torch.cuda.stream(stream):
                    dst.copy_(buf[:n], non_blocking=True)
                    event.record(stream)
                pending = True
            else:
                dst.copy_(buf[:n])
        if stream is not None:
            stream.synchronize()
    except BaseException as err:  # reported to the caller, which raises PartialLoadError
        errors.append(err)
