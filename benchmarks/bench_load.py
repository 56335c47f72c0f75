"""Checkpoint-loading benchmark: torchgraft against the loaders people use today.

Run from the repository root::

    python benchmarks/bench_load.py                        # ~1 GB checkpoints, 5 repeats
    python benchmarks/bench_load.py --size 1 --repeats 3 --models llm --formats pth,safetensors
    python benchmarks/bench_load.py --size 0.25,0.5,1,2     # scaling curve
    python benchmarks/bench_load.py --size 0.005 --repeats 1 --tensors 200   # smoke test

What it does:

* Generates its own checkpoints (no downloads) in a work directory (a temp dir under /tmp,
  removed at the end unless ``--keep``): an LLM-shaped model (embedding, transformer blocks of
  linears and norms, head), a CNN-shaped one (many conv/bn tensors), a ``transformers``
  ``LlamaForCausalLM`` saved with ``save_pretrained`` (HF folder format only) and a
  many-small-tensors model (``--tensors``), each as ``.pth`` (torch zip), ``.safetensors`` and a
  sharded Hugging Face folder (``model-0000X-of-0000N.safetensors`` +
  ``model.safetensors.index.json``).
* Measures every (case, loader) in a fresh subprocess, interleaved (A B C A B C ...) over
  ``--repeats`` rounds, with the checkpoint read once by the parent just before each run so it
  is in the page cache. Each child builds the model, resets the VmHWM high-water mark (writes
  ``5`` to ``/proc/self/clear_refs``), reads the baseline, times the load call and reads VmHWM
  again: "peak RSS" is the growth above that baseline. Loaded values are verified against
  checksums taken when the checkpoint was written.
* A loader that raises (unsupported format, torchgraft not implemented yet, ...) is recorded
  as an error and not retried in later rounds; the benchmark carries on.
* ``read_bytes`` is the physical reference: reading the checkpoint's bytes from the page
  cache into a preallocated, pre-faulted buffer with ``os.preadv`` (``read_bytes_parallel``:
  the same with one thread per usable core, 32 MB chunks; ``mmap_copy``: mmap the file and
  memcpy it into the buffer, which is how safetensors-based loaders read). On a CUDA machine the
  cases are repeated with the model on the GPU and ``h2d_copy`` (a pinned host-to-device copy
  of the same bytes) is added as the reference.

Prints one table per (model, format, device) and, with several sizes or tensor counts, a
scaling table of torchgraft's time. Every repeat goes to ``--out`` (JSON, default
``bench-results/results.json``) with the machine description.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SCRIPT = Path(__file__).resolve()
REPO = SCRIPT.parents[1]
GB = 1e9
MB = 1e6
N_SHARDS = 4
ALL_FORMATS = ("pth", "safetensors", "hf")
ALL_MODELS = ("llm", "cnn", "llama")
TORCHGRAFT = "torchgraft"
PHYSICAL = ("read_bytes", "read_bytes_parallel", "mmap_copy", "h2d_copy")
LOADERS = (
    "read_bytes",
    "read_bytes_parallel",
    "mmap_copy",
    "h2d_copy",
    "torch_load",
    "torch_load_mmap",
    "safetensors_load_model",
    "timm_load_checkpoint",
    "mmengine_load_checkpoint",
    "transformers_from_pretrained",
    "torchgraft",
    "torchgraft_meta",
    "torchgraft_plan",
)
NOTES = (
    "time: wall time of the load call, median (and min) over fresh processes; GB/s = checkpoint "
    "bytes / time.",
    "peak: VmHWM growth above the baseline read after the model was built and the "
    "high-water mark reset; pages of an mmap-ed file count too.",
    "physical references: read_bytes(_parallel) = os.preadv from the page cache into a "
    "preallocated buffer (1 thread / one per core); mmap_copy = mmap the file and memcpy it "
    "(its peak is the mapped file pages); h2d_copy = pinned host -> GPU copy.",
    "torchgraft_meta and transformers_from_pretrained build or materialise the model inside "
    "the timed call, so their time and peak include the model itself (~100% of the "
    "checkpoint).",
    "torchgraft_plan: tg.plan only (read, select, map, plan and the report; no copying).",
    "hf folder: one-file peers load the shards one by one (load_state_dict(strict=False)).",
    "x tg: peer / torchgraft, > 1 means torchgraft is faster or uses less memory; a peak "
    "under 1 MB counts as 1 MB ('>N': lower bound).",
)


# --------------------------------------------------------------------------------------------
# models (plain torch.nn; torch is imported lazily so the parent stays lean)
# --------------------------------------------------------------------------------------------


def _model_classes() -> dict[str, Any]:
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.ln1 = nn.LayerNorm(d)
            self.q = nn.Linear(d, d)
            self.k = nn.Linear(d, d)
            self.v = nn.Linear(d, d)
            self.o = nn.Linear(d, d)
            self.ln2 = nn.LayerNorm(d)
            self.fc1 = nn.Linear(d, 4 * d)
            self.fc2 = nn.Linear(4 * d, d)

    class LLM(nn.Module):
        def __init__(self, vocab: int, d: int, layers: int) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
            self.norm = nn.LayerNorm(d)
            self.head = nn.Linear(d, vocab, bias=False)

    class ConvBN(nn.Module):
        def __init__(self, cin: int, cout: int) -> None:
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(cout)

    class ResBlock(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.a = ConvBN(c, c)
            self.b = ConvBN(c, c)

    class CNN(nn.Module):
        def __init__(self, c: int, blocks: int) -> None:
            super().__init__()
            self.stem = ConvBN(3, c)
            stages = []
            prev = c
            for mult in (1, 2, 4, 8):
                ch = c * mult
                stage = nn.Sequential(ConvBN(prev, ch), *(ResBlock(ch) for _ in range(blocks)))
                stages.append(stage)
                prev = ch
            self.stages = nn.ModuleList(stages)
            self.fc = nn.Linear(prev, 1000)

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(8, 8))
            self.bias = nn.Parameter(torch.empty(8))

    class ManyTensors(nn.Module):
        """``n`` tiny tensors: one ParameterDict (default) or a flat ModuleList of modules.

        torch's ``load_state_dict`` filters the whole state dict once per child module, so the
        flat ModuleList layout makes every peer that uses it O(n^2) (minutes at 100k).
        """

        def __init__(self, n: int, layout: str = "dict") -> None:
            super().__init__()
            if layout == "modulelist":
                self.items = nn.ModuleList(Tiny() for _ in range(n // 2))
                if n % 2:
                    self.extra = nn.Parameter(torch.empty(64))
            else:
                self.items = nn.ParameterDict({f"p{i}": nn.Parameter(torch.empty(8, 8)) for i in range(n)})

    return {"llm": LLM, "cnn": CNN, "tensors": ManyTensors}


def _llama_config(cfg: dict[str, Any]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**cfg)


def _construct(kind: str, cfg: dict[str, Any], dtype: Any) -> Any:
    """Build the model on the current default device (use under ``torch.device('meta')``)."""
    if kind == "llama":
        from transformers import LlamaForCausalLM

        return LlamaForCausalLM(_llama_config(cfg)).to(dtype)
    cls = _model_classes()[kind]
    return cls(**cfg).to(dtype)


def _meta_numel_bytes(kind: str, cfg: dict[str, Any], dtype: Any) -> int:
    import torch

    with torch.device("meta"):
        model = _construct(kind, cfg, dtype)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def size_config(kind: str, target_bytes: float, dtype_name: str) -> dict[str, Any]:
    """Pick a configuration of ``kind`` whose checkpoint is about ``target_bytes``."""
    import torch

    esize = torch.empty(0, dtype=getattr(torch, dtype_name)).element_size()
    params = target_bytes / esize

    def mult(x: float, m: int) -> int:
        return max(m, int(round(x / m)) * m)

    if kind == "llm":  # 12 blocks of 12 d^2 + embedding and head of 8d x d each
        d = mult(math.sqrt(params / 160), 32)
        return {"vocab": 8 * d, "d": d, "layers": 12}
    if kind == "cnn":  # 4 stages of `blocks` residual blocks, widths c, 2c, 4c, 8c
        c = 64
        blocks = int(round(params / (1530 * c * c)))
        if blocks < 1:
            blocks = 1
            c = mult(math.sqrt(params / 1530), 8)
        return {"c": c, "blocks": blocks}
    if kind == "llama":  # 12 layers of 13 d^2 + embedding and head of 8d x d each
        d = mult(math.sqrt(params / 172), 64)
        return {
            "vocab_size": 8 * d,
            "hidden_size": d,
            "intermediate_size": 3 * d,
            "num_hidden_layers": 12,
            "num_attention_heads": d // 64,
            "num_key_value_heads": d // 64,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": False,
            "dtype": dtype_name,
        }
    raise ValueError(kind)


# --------------------------------------------------------------------------------------------
# /proc helpers
# --------------------------------------------------------------------------------------------


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    with open("/proc/self/status") as fh:
        text = fh.read()
    out = {}
    for key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
        m = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.M)
        out[key] = int(m.group(1)) * 1024 if m else -1
    return out


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); True if it visibly worked."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    st = proc_status()
    return st["VmHWM"] - st["VmRSS"] <= 1 << 20


# --------------------------------------------------------------------------------------------
# child: one measurement in a fresh process
# --------------------------------------------------------------------------------------------


def _shards(path: str) -> list[str]:
    index = Path(path) / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [str(Path(path) / f) for f in files]


def _per_file(spec: dict[str, Any]) -> list[str]:
    return _shards(spec["path"]) if spec["format"] == "hf" else [spec["path"]]


def _imports(loader: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Import everything the loader needs before the baseline is taken."""
    mods: dict[str, Any] = {}
    if loader in PHYSICAL and loader != "h2d_copy":
        return mods
    import torch

    mods["torch"] = torch
    if spec["model"] == "llama" or loader == "transformers_from_pretrained":
        import transformers

        mods["transformers"] = transformers
    if loader == "safetensors_load_model":
        import safetensors.torch

        mods["safetensors"] = safetensors
    elif loader == "timm_load_checkpoint":
        import timm.models

        mods["timm"] = timm
    elif loader == "mmengine_load_checkpoint":
        import mmengine.runner

        mods["mmengine"] = mmengine
    elif loader.startswith("torchgraft"):
        import torchgraft  # on PYTHONPATH via _child_env() when not installed

        # torchgraft imports its pipeline on first use: import it here, outside the timed
        # load, as every peer's imports are
        for name in ("load", "plan", "read"):
            getattr(torchgraft, name)
        mods["torchgraft"] = torchgraft
    return mods


def _build(loader: str, spec: dict[str, Any], mods: dict[str, Any]) -> Any:
    """Build the target model without a second copy (meta, to_empty, zero-fill)."""
    if loader in PHYSICAL or loader == "transformers_from_pretrained":
        return None
    torch = mods["torch"]
    dtype = getattr(torch, spec["dtype"])
    device = spec["device"]
    if loader == "torchgraft_meta":
        with torch.device("meta"):
            return _construct(spec["model"], spec["config"], dtype)
    if spec["model"] == "llama":  # what a user does: Model(config), real init, then move
        model = _construct("llama", spec["config"], dtype)
        return model.to(device)
    with torch.device("meta"):
        model = _construct(spec["model"], spec["config"], dtype)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.zero_()  # touch every page so the baseline holds the whole model
    return model


def _load(loader: str, spec: dict[str, Any], mods: dict[str, Any], model: Any) -> Any:
    """The timed call. Returns the loaded model."""
    path = spec["path"]
    files = _per_file(spec)
    sharded = spec["format"] == "hf"
    if loader == "torch_load" or loader == "torch_load_mmap":
        torch = mods["torch"]
        kw = {"mmap": True} if loader == "torch_load_mmap" else {}
        for f in files:
            sd = torch.load(f, map_location="cpu", weights_only=True, **kw)
            model.load_state_dict(sd, strict=not sharded)
            del sd
    elif loader == "safetensors_load_model":
        st = mods["safetensors"].torch
        dev = spec["device"]
        if sharded:
            for f in files:
                sd = st.load_file(f, device=dev)
                model.load_state_dict(sd, strict=False)
                del sd
        else:
            st.load_model(model, path, device=dev)
    elif loader == "timm_load_checkpoint":
        for f in files:
            mods["timm"].models.load_checkpoint(model, f, strict=not sharded)
    elif loader == "mmengine_load_checkpoint":
        for f in files:
            mods["mmengine"].runner.load_checkpoint(model, f, map_location="cpu")
    elif loader == "transformers_from_pretrained":
        from transformers import LlamaForCausalLM

        kw = {"device_map": spec["device"]} if spec["device"] != "cpu" else {}
        model = LlamaForCausalLM.from_pretrained(path, **kw)
    elif loader == "torchgraft":
        mods["torchgraft"].load(model, path)
    elif loader == "torchgraft_meta":  # torchgraft materialises meta tensors on the CPU
        mods["torchgraft"].load(model, path)
    elif loader == "torchgraft_plan":  # planning alone: nothing is copied
        report = mods["torchgraft"].plan(model, path)
        if not report.ok:
            raise AssertionError(f"plan failed: {report.error}")
    else:
        raise ValueError(f"unknown loader {loader}")
    return model


def _verify(model: Any, spec: dict[str, Any]) -> tuple[bool, str, int]:
    """Compare checksums of sample tensors; also count tensors left on the meta device."""
    sd = model.state_dict()
    left = sum(t.is_meta for t in [*model.parameters(), *model.buffers()])
    for key, want in spec["checks"].items():
        t = sd.get(key)
        if t is None:
            return False, f"{key} missing from the model", left
        if t.is_meta:
            return False, f"{key} is still on the meta device", left
        if str(t.device).split(":")[0] != spec["device"]:
            return False, f"{key} is on {t.device}, expected {spec['device']}", left
        got = t.detach().double().sum().item()
        if not math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-6):
            return False, f"{key}: checksum {got!r} != {want!r} (not loaded?)", left
    return True, "", left


def _physical(loader: str, spec: dict[str, Any]) -> float:
    """Read (or copy to the GPU) the checkpoint's bytes once; returns seconds."""
    files = spec["files"]
    sizes = [os.path.getsize(f) for f in files]
    total = sum(sizes)
    if loader != "h2d_copy":
        threads = len(os.sched_getaffinity(0)) if loader == "read_bytes_parallel" else 1
        spec["_threads"] = threads
        buf = bytearray(total)
        buf[::4096] = b"\x01" * len(range(0, total, 4096))  # pre-fault every page
        mv = memoryview(buf)
        gc.collect()
        spec["_hwm_reset"] = reset_hwm()
        spec["_base"] = proc_status()
        t0 = time.perf_counter()
        if loader == "mmap_copy":
            _mmap_into(files, sizes, mv)
        else:
            _read_into(files, sizes, mv, threads)
        return time.perf_counter() - t0
    import torch

    pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    _read_into(files, sizes, memoryview(pinned.numpy()))
    dev = torch.empty(total, dtype=torch.uint8, device="cuda")
    dev.copy_(pinned)
    torch.cuda.synchronize()
    gc.collect()
    spec["_hwm_reset"] = reset_hwm()
    spec["_base"] = proc_status()
    t0 = time.perf_counter()
    dev.copy_(pinned, non_blocking=True)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def _mmap_into(files: list[str], sizes: list[int], mv: memoryview) -> None:
    """Fill ``mv`` by mapping each file and copying it (memcpy from page-cache pages)."""
    import mmap

    pos = 0
    for f, size in zip(files, sizes):
        if size:
            with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                mv[pos : pos + size] = mm
        pos += size


def _read_into(files: list[str], sizes: list[int], mv: memoryview, threads: int = 1) -> None:
    """Fill ``mv`` with the files' bytes, back to back; chunks spread over ``threads``."""
    chunk = (32 << 20) if threads > 1 else (1 << 62)
    fds = [os.open(f, os.O_RDONLY) for f in files]
    jobs = []  # (fd, file offset, buffer position, length)
    pos = 0
    for fd, size in zip(fds, sizes):
        jobs += [(fd, off, pos + off, min(chunk, size - off)) for off in range(0, size, chunk)]
        pos += size

    def read(job: tuple[int, int, int, int]) -> None:
        fd, off, at, length = job
        done = 0
        while done < length:
            n = os.preadv(fd, [mv[at + done : at + length]], off + done)
            if n <= 0:
                raise OSError("short read")
            done += n

    try:
        if threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(read, jobs))
        else:
            for job in jobs:
                read(job)
    finally:
        for fd in fds:
            os.close(fd)


def child_main(spec_path: str, result_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    loader = spec["loader"]
    res: dict[str, Any] = {"ok": False, "phase": "import"}
    try:
        if loader in PHYSICAL:
            res["phase"] = "load"
            res["time_s"] = _physical(loader, spec)
            res["hwm_reset"] = spec["_hwm_reset"]
            res["threads"] = spec.get("_threads", 1)
            base = spec["_base"]
            after = proc_status()
            res["verified"] = True
        else:
            mods = _imports(loader, spec)
            torch = mods["torch"]
            cuda = spec["device"] == "cuda"
            res["phase"] = "build"
            model = _build(loader, spec, mods)
            gc.collect()
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                gbase = torch.cuda.memory_allocated()
            res["hwm_reset"] = reset_hwm()
            base = proc_status()
            res["phase"] = "load"
            t0 = time.perf_counter()
            model = _load(loader, spec, mods, model)
            if cuda:
                torch.cuda.synchronize()
            res["time_s"] = time.perf_counter() - t0
            after = proc_status()
            if cuda:
                res["gpu_peak_above_baseline_bytes"] = torch.cuda.max_memory_allocated() - gbase
            res["phase"] = "verify"
            ok, why, left = (True, "", 0) if loader == "torchgraft_plan" else _verify(model, spec)
            res["verified"] = ok
            res["meta_tensors_left"] = left
            if not ok:
                raise AssertionError(f"verification failed: {why}")
            if "torchgraft" in mods:
                res["torchgraft_version"] = getattr(mods["torchgraft"], "__version__", "?")
        res["baseline_rss_bytes"] = base["VmHWM"]
        res["peak_rss_bytes"] = after["VmHWM"]
        res["peak_rss_above_baseline_bytes"] = after["VmHWM"] - base["VmHWM"]
        res["rss_after_bytes"] = after["VmRSS"]
        res["rss_anon_after_bytes"] = after["RssAnon"]
        res["rss_file_after_bytes"] = after["RssFile"]
        res["rss_anon_baseline_bytes"] = base["RssAnon"]
        res["rss_file_baseline_bytes"] = base["RssFile"]
        # file-backed pages (shared libraries) reclaimed during the run lower RSS and can hide
        # part of the growth from VmHWM; record how much went away
        res["rss_file_drop_bytes"] = max(0, base["RssFile"] - after["RssFile"])
        res["ok"] = True
    except BaseException as err:  # noqa: B036 - everything a loader raises is a result
        res["error"] = f"{type(err).__name__}: {err}"[:800]
        res["traceback"] = traceback.format_exc()[-4000:]
    Path(result_path).write_text(json.dumps(res))
    return 0


# --------------------------------------------------------------------------------------------
# child: checkpoint generation, and machine probe
# --------------------------------------------------------------------------------------------


def _save_sharded(sd: dict[str, Any], folder: Path, n_shards: int) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    total = sum(t.numel() * t.element_size() for t in sd.values())
    limit = max(1, math.ceil(total / n_shards))
    groups: list[dict[str, Any]] = [{}]
    size = 0
    for k, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > limit:
            groups.append({})
            size = 0
        groups[-1][k] = t
        size += nbytes
    n = len(groups)
    weight_map = {}
    for i, g in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(g, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(g, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def generate_main(spec_path: str, result_path: str) -> int:
    """Write one model's checkpoints in every requested format."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    kind, cfg, formats = spec["model"], spec["config"], spec["formats"]
    dtype = getattr(torch, spec["dtype"])
    out = Path(spec["dir"])
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    if kind == "llama":
        model = _construct(kind, cfg, dtype)
    else:
        with torch.device("meta"):
            model = _construct(kind, cfg, dtype)
        model = model.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.uniform_(-0.1, 0.1, generator=gen)
            else:
                t.fill_(7)
    sd = model.state_dict()
    keys = list(sd)
    picks = {keys[0], keys[len(keys) // 2], keys[-1]}
    picks.update([k for k in keys if not sd[k].is_floating_point()][:1])
    checks = {k: sd[k].double().sum().item() for k in keys if k in picks}
    paths: dict[str, str] = {}
    for fmt in formats:
        if fmt == "pth":
            p = out / f"{kind}.pth"
            torch.save(sd, p)
        elif fmt == "safetensors":
            from safetensors.torch import save_file

            p = out / f"{kind}.safetensors"
            save_file(dict(sd), str(p), metadata={"format": "pt"})
        else:
            p = out / f"{kind}-hf"
            total = sum(t.numel() * t.element_size() for t in sd.values())
            if kind == "llama":
                model.save_pretrained(p, max_shard_size=max(1, math.ceil(total / N_SHARDS)))
            else:
                _save_sharded(sd, p, N_SHARDS)
        paths[fmt] = str(p)
    result = {
        "paths": paths,
        "checks": checks,
        "n_tensors": len(sd),
        "param_bytes": sum(t.numel() * t.element_size() for t in sd.values()),
    }
    Path(result_path).write_text(json.dumps(result))
    return 0


def probe_main(result_path: str) -> int:
    """Versions and CUDA availability, measured away from the parent (no CUDA context there)."""
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    info["torch_threads"] = torch.get_num_threads()
    Path(result_path).write_text(json.dumps(info))
    return 0


# --------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------


def _child_env(threads: int = 0) -> dict[str, str]:
    env = dict(os.environ)
    if threads > 0:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[var] = str(threads)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TQDM_DISABLE", "1")
    if importlib.util.find_spec("torchgraft") is None and (REPO / "src" / "torchgraft").is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "src"), env.get("PYTHONPATH", "")) if p)
    return env


def run_child(mode: str, spec: dict[str, Any], tmp: Path, timeout: float, threads: int = 0) -> dict[str, Any]:
    """Run ``mode`` (_child/_generate/_probe) in a fresh interpreter; return its JSON result."""
    spec_path, result_path = tmp / "spec.json", tmp / "result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(SCRIPT), mode, str(spec_path), str(result_path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_child_env(threads))
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout:.0f} s"}
    if result_path.exists():
        res = json.loads(result_path.read_text())
        res.setdefault("ok", True)
        return res
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-5:]
    return {"ok": False, "error": f"child exited {proc.returncode}: " + " | ".join(tail)}


def warm_page_cache(files: list[str], chunk: bytearray) -> None:
    """Read every byte once so the timed runs find the file in the page cache."""
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(chunk):
                pass


def case_files(fmt: str, path: str) -> list[str]:
    return _shards(path) if fmt == "hf" else [path]


def machine_info(probe: dict[str, Any]) -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = 0
    try:
        m = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
        ram = int(m.group(1)) * 1024 if m else 0
    except OSError:
        pass
    versions = {}
    for pkg in ("torch", "safetensors", "timm", "mmengine", "transformers", "torchgraft"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    thp = ""
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        pass
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ram_bytes": ram,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "transparent_hugepage": thp,
        "versions": versions,
        "git_commit": commit,
        **{f"probe_{k}": v for k, v in probe.items()},
    }


def applicable(loader: str, model: str, fmt: str, device: str) -> bool:
    if loader == "h2d_copy":
        return device == "cuda"
    if loader in ("torchgraft_meta", "torchgraft_plan"):  # meta: materialised on the CPU
        return device == "cpu"
    if loader == "safetensors_load_model":
        return fmt in ("safetensors", "hf")
    if loader == "transformers_from_pretrained":
        return model == "llama" and fmt == "hf"
    return True


def summarize(case: dict[str, Any]) -> None:
    """Medians, GB/s and ratios to torchgraft, stored in the case dict."""
    nbytes = case["ckpt_bytes"]
    for stats in case["loaders"].values():
        ok = [r for r in stats["runs"] if r.get("ok")]
        if stats["runs"] and len(ok) == len(stats["runs"]):
            t = statistics.median(r["time_s"] for r in ok)
            peak = statistics.median(r["peak_rss_above_baseline_bytes"] for r in ok)
            stats.update(
                status="ok",
                median_time_s=t,
                min_time_s=min(r["time_s"] for r in ok),
                max_time_s=max(r["time_s"] for r in ok),
                gb_per_s=nbytes / t / GB if t > 0 else None,
                median_peak_rss_above_baseline_bytes=peak,
                peak_pct_of_ckpt=100 * peak / nbytes if nbytes else None,
                hwm_reset_ok=all(r.get("hwm_reset") for r in ok),
                max_rss_file_drop_bytes=max(r.get("rss_file_drop_bytes", 0) for r in ok),
            )
            gpu = [r["gpu_peak_above_baseline_bytes"] for r in ok if "gpu_peak_above_baseline_bytes" in r]
            if gpu:
                stats["median_gpu_peak_above_baseline_bytes"] = statistics.median(gpu)
        elif stats["runs"]:
            bad = next(r for r in stats["runs"] if not r.get("ok"))
            stats.update(status="error", error=bad.get("error", "?"))
    tg = case["loaders"].get(TORCHGRAFT, {})
    for name, stats in case["loaders"].items():
        if stats.get("status") != "ok" or tg.get("status") != "ok":
            continue
        stats["time_ratio_vs_torchgraft"] = stats["median_time_s"] / tg["median_time_s"]
        tg_peak = tg["median_peak_rss_above_baseline_bytes"]
        peak = stats["median_peak_rss_above_baseline_bytes"]
        # RSS counters are approximate to a few hundred kB: below 1 MB torchgraft's peak is
        # taken as 1 MB and the ratio is a lower bound (shown as ">N")
        if name == TORCHGRAFT:
            stats["mem_ratio_vs_torchgraft"] = 1.0
        elif name not in PHYSICAL and peak >= 0:
            stats["mem_ratio_vs_torchgraft"] = peak / max(tg_peak, MB)
            stats["mem_ratio_is_lower_bound"] = tg_peak < MB


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _ratio(x: float | None) -> str:
    return "-" if x is None else format(x, ".0f" if x >= 100 else ".2f")


def _table(headers: list[str], rows: list[list[str]], note_col: bool = True) -> str:
    """Plain-text table; first column (and the trailing note column) left-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        cells = []
        for i, (c, w) in enumerate(zip(r, widths)):
            left = i == 0 or (note_col and i == len(r) - 1)
            cells.append(c.ljust(w) if left else c.rjust(w))
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_case(case: dict[str, Any]) -> str:
    cuda = case["device"] == "cuda"
    headers = ["loader", "median s", "min s", "GB/s", "peak MB", "% ckpt"]
    headers += ["GPU MB"] if cuda else []
    headers += ["time x tg", "mem x tg", "note"]
    rows = []
    for name, s in case["loaders"].items():
        if s.get("status") == "ok":
            row = [
                name,
                _fmt(s["median_time_s"], ".3f"),
                _fmt(s["min_time_s"], ".3f"),
                _fmt(s["gb_per_s"], ".2f"),
                _fmt(max(0.0, s["median_peak_rss_above_baseline_bytes"] / MB), ".0f"),
                _fmt(max(0.0, s["peak_pct_of_ckpt"]), ".0f"),
            ]
            if cuda:
                g = s.get("median_gpu_peak_above_baseline_bytes")
                row.append(_fmt(None if g is None else g / MB, ".0f"))
            note = "physical reference" if name in PHYSICAL else ""
            if name in ("torchgraft_meta", "transformers_from_pretrained"):
                note = "includes building the model"
            if name == "torchgraft_plan":
                note = "planning only, no copy"
            if not s.get("hwm_reset_ok", True):
                note += " (VmHWM reset failed)"
            if s.get("max_rss_file_drop_bytes", 0) > 0.1 * case["ckpt_bytes"] + 16 * MB:
                note += " (file pages reclaimed: peak may be low)"
            row += [
                _ratio(s.get("time_ratio_vs_torchgraft")),
                (">" if s.get("mem_ratio_is_lower_bound") else "") + _ratio(s.get("mem_ratio_vs_torchgraft")),
                note,
            ]
        else:
            err = s.get("error", "not run")
            row = [name, *["-"] * (len(headers) - 2), "ERROR " + err.splitlines()[0][:70]]
        rows.append(row)
    size = "" if case["size_gb"] is None else f", target {case['size_gb']:g} GB"
    title = (
        f"== {case['model']} / {case['format']} / {case['device']}: "
        f"{case['ckpt_bytes'] / MB:.1f} MB, {case['n_tensors']} tensors{size}, "
        f"{case['repeats']} repeats =="
    )
    return title + "\n" + _table(headers, rows)


def format_scaling(cases: list[dict[str, Any]]) -> str:
    out = []

    def tg_time(c: dict[str, Any], name: str) -> float | None:
        s = c["loaders"].get(name, {})
        return s.get("median_time_s") if s.get("status") == "ok" else None

    sized = [c for c in cases if c["size_gb"] is not None]
    if len({c["size_gb"] for c in sized}) > 1:
        rows = []
        for c in sorted(sized, key=lambda c: (c["model"], c["format"], c["device"], c["size_gb"])):
            t = tg_time(c, TORCHGRAFT)
            gb = c["ckpt_bytes"] / GB
            rows.append(
                [
                    f"{c['model']}/{c['format']}/{c['device']}",
                    f"{c['size_gb']:g}",
                    f"{gb:.3f}",
                    _fmt(t, ".3f"),
                    _fmt(None if t is None else t / gb, ".3f"),
                    _fmt(tg_time(c, "torch_load"), ".3f"),
                ]
            )
        out.append(
            "== scaling with size (torchgraft) ==\n"
            + _table(["case", "target GB", "GB", "tg s", "tg s/GB", "torch_load s"], rows, note_col=False)
        )
    counted = [c for c in cases if c["size_gb"] is None]
    if len({c["n_tensors"] for c in counted}) > 1:
        rows = []
        for c in sorted(counted, key=lambda c: (c["format"], c["device"], c["n_tensors"])):
            t, ref = tg_time(c, TORCHGRAFT), tg_time(c, "torch_load")
            n = c["n_tensors"]
            rows.append(
                [
                    f"{c['format']}/{c['device']}",
                    str(n),
                    _fmt(t, ".3f"),
                    _fmt(None if t is None else 1e6 * t / n, ".1f"),
                    _fmt(None if ref is None else 1e6 * ref / n, ".1f"),
                ]
            )
        out.append(
            "== scaling with tensor count ==\n"
            + _table(
                ["format/device", "tensors", "tg s", "tg us/tensor", "torch_load us/tensor"],
                rows,
                note_col=False,
            )
        )
    return "\n\n".join(out)


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip() and x.strip().lower() != "none"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark torchgraft.load against other checkpoint loaders.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--size", default="1", help="checkpoint size(s) in GB, comma-separated")
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per loader")
    p.add_argument("--formats", default=",".join(ALL_FORMATS), help="pth,safetensors,hf")
    p.add_argument(
        "--models",
        default=",".join(ALL_MODELS),
        help="llm,cnn,llama (llama: transformers LlamaForCausalLM, hf format only)",
    )
    p.add_argument(
        "--tensors",
        default="10000,100000",
        help="many-small-tensors cases (tensor counts; 'none' to skip)",
    )
    p.add_argument(
        "--tensors-layout",
        default="dict",
        choices=["dict", "modulelist"],
        help="many-tensors model: one ParameterDict, or a flat ModuleList of tiny modules "
        "(torch's load_state_dict is quadratic in the number of child modules)",
    )
    p.add_argument("--loaders", default=",".join(LOADERS), help="subset of loaders to run")
    p.add_argument("--devices", default="auto", help="cpu,cuda or auto (cuda when available)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="dtype of every floating-point tensor",
    )
    p.add_argument("--out", default="bench-results/results.json", help="JSON results file")
    p.add_argument(
        "--workdir",
        default=None,
        help="parent of the temp dir for the checkpoints (None: the system temp dir)",
    )
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="OMP/torch threads in the children (0: torch's default)",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    args = p.parse_args(argv)
    args.sizes = [float(s) for s in _csv(args.size)]
    args.format_list = _csv(args.formats)
    args.model_list = _csv(args.models)
    args.tensor_list = [int(float(n)) for n in _csv(args.tensors)]
    args.loader_list = _csv(args.loaders)
    for name, got, allowed in (
        ("format", args.format_list, ALL_FORMATS),
        ("model", args.model_list, ALL_MODELS),
        ("loader", args.loader_list, LOADERS),
    ):
        bad = sorted(set(got) - set(allowed))
        if bad:
            p.error(f"unknown {name}(s) {bad}; choose from {list(allowed)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def iter_case_specs(args: argparse.Namespace) -> Iterator[tuple[str, dict[str, Any], Any]]:
    """(model kind, generation spec, size target or None) in run order."""
    for size in args.sizes:
        for kind in args.model_list:
            formats = ["hf"] if kind == "llama" else args.format_list
            formats = [f for f in formats if f in args.format_list]
            if formats:
                cfg = size_config(kind, size * GB, args.dtype)
                yield kind, {"model": kind, "config": cfg, "formats": formats}, size
    for n in args.tensor_list:
        if args.format_list:
            yield (
                "tensors",
                {
                    "model": "tensors",
                    "config": {"n": n, "layout": args.tensors_layout},
                    "formats": args.format_list,
                },
                None,
            )


def run_case(
    case: dict[str, Any],
    base_spec: dict[str, Any],
    loaders: list[str],
    args: argparse.Namespace,
    tmp: Path,
    chunk: bytearray,
    on_run: Callable[[], None],
) -> None:
    """Interleave the loaders over the repeats, each run in a fresh process."""
    files = case_files(case["format"], base_spec["path"])
    spec_common = dict(base_spec, files=files)
    failed: set[str] = set()
    for rep in range(args.repeats):
        for loader in loaders:
            if loader in failed:
                continue
            warm_page_cache(files, chunk)
            res = run_child("_child", dict(spec_common, loader=loader), tmp, args.timeout, args.threads)
            res["repeat"] = rep
            case["loaders"][loader]["runs"].append(res)
            label = f"{case['id']} rep {rep + 1}/{args.repeats} {loader}"
            if res.get("ok"):
                _log(
                    f"  {label}: {res['time_s']:.3f} s, "
                    f"+{max(0, res['peak_rss_above_baseline_bytes']) / MB:.0f} MB"
                )
            else:
                failed.add(loader)
                _log(f"  {label}: ERROR {res.get('error', '?').splitlines()[0][:120]}")
            on_run()


def _on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds: the running child is killed, workdir removed


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    root = Path(args.workdir or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="torchgraft-bench-", dir=root))
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = work / "ipc"
    tmp.mkdir()
    try:
        probe = run_child("_probe", {}, tmp, 600, args.threads)
        if not probe.get("ok", True) or "torch" not in probe:
            _log(f"probe failed: {probe.get('error')}")
            probe = {"cuda": False}
        devices = ["cpu", "cuda"] if probe.get("cuda") else ["cpu"]
        if args.devices != "auto":
            devices = [d for d in _csv(args.devices) if d == "cpu" or probe.get("cuda")]
        results: dict[str, Any] = {
            "schema": 1,
            "machine": machine_info(probe),
            "args": {k: v for k, v in vars(args).items()},
            "devices": devices,
            "notes": list(NOTES),
            "cases": [],
        }

        def save() -> None:
            out_path.write_text(json.dumps(results, indent=1))

        chunk = bytearray(16 << 20)
        printed: list[str] = []
        for kind, gspec, size in iter_case_specs(args):
            label = kind if size is not None else f"tensors-{gspec['config']['n']}"
            sub = f"{size:g}GB" if size is not None else ""
            gdir = work / f"{label}-{sub or 'n'}"
            _log(f"generating {label} {sub} {gspec['config']} ...")
            gen = run_child("_generate", dict(gspec, dtype=args.dtype, dir=str(gdir)), tmp, args.timeout)
            if "paths" not in gen:
                _log(f"  generation failed: {gen.get('error')}")
                results["cases"].append({"id": f"{label}/{sub}", "generation_error": gen})
                save()
                continue
            for fmt in gspec["formats"]:
                path = gen["paths"][fmt]
                files = case_files(fmt, path)
                nbytes = sum(os.path.getsize(f) for f in files)
                for device in devices:
                    case_id = "/".join(x for x in (label, fmt, sub, device) if x)
                    loaders = [n for n in args.loader_list if applicable(n, kind, fmt, device)]
                    case = {
                        "id": case_id,
                        "model": label,
                        "format": fmt,
                        "device": device,
                        "size_gb": size,
                        "dtype": args.dtype,
                        "repeats": args.repeats,
                        "ckpt_bytes": nbytes,
                        "param_bytes": gen["param_bytes"],
                        "n_tensors": gen["n_tensors"],
                        "n_files": len(files),
                        "model_config": gspec["config"],
                        "loaders": {n: {"runs": []} for n in loaders},
                    }
                    results["cases"].append(case)
                    spec = {
                        "model": kind,
                        "config": gspec["config"],
                        "dtype": args.dtype,
                        "format": fmt,
                        "path": path,
                        "device": device,
                        "checks": gen["checks"],
                    }
                    _log(f"case {case_id}: {nbytes / MB:.1f} MB in {len(files)} file(s)")
                    run_case(case, spec, loaders, args, tmp, chunk, save)
                    summarize(case)
                    save()
                    text = format_case(case)
                    printed.append(text)
                    print(text + "\n", flush=True)
            if not args.keep:
                shutil.rmtree(gdir, ignore_errors=True)
        scaling = format_scaling([c for c in results["cases"] if "loaders" in c])
        if scaling:
            print(scaling + "\n")
        print("notes:\n" + "\n".join(f"  - {n}" for n in NOTES))
        save()
        print(f"\nresults: {out_path}")
    finally:
        if args.keep:
            _log(f"checkpoints kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        sys.exit(child_main(sys.argv[2], sys.argv[3]))
    if len(sys.argv) > 1 and sys.argv[1] == "_generate":
        sys.exit(generate_main(sys.argv[2], sys.argv[3]))
    if len(sys.argv) > 1 and sys.argv[1] == "_probe":
        sys.exit(probe_main(sys.argv[3]))
    sys.exit(main())
