"""Folders: Hugging Face ``save_pretrained`` output, single-file or sharded with ``*.index.json``.

A sharded folder becomes one flat state dict whose tensors point into their shards. Shard names
from the index are checked to stay inside the folder and to exist before anything is read: a
shard name is a plain relative path (no ``..``, not absolute, no NUL byte), and a shard that is a
symbolic link must resolve inside the folder, or, for a snapshot of the Hugging Face hub cache
(``models--org--name/snapshots/<rev>/``, whose files are links to ``../../blobs/<hash>``),
inside that repository's cache folder ``models--org--name/``. Only regular files are read.

Example:
    >>> ckpt = open_folder(Path("my-model/"))   # doctest: +SKIP
    >>> ckpt.notes  # doctest: +SKIP
    ['3 shards from model.safetensors.index.json']
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

from ..errors import CorruptCheckpointError, UnsupportedFormatError
from ..limits import LIMITS
from .base import Checkpoint

# preferred order when a folder holds several candidates
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin", "model.pth", "model.pt")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt", ".npz")


def open_folder(path: Path, open_file: Callable[[Path], Checkpoint]) -> Checkpoint:
    """Read a folder of weights through ``open_file`` for each file it names."""
    if (path / ".metadata").exists():
        raise UnsupportedFormatError(
            f"{path.name}: a torch.distributed.checkpoint folder; convert it first with "
            "`python -m torch.distributed.checkpoint.format_utils dcp_to_torch`"
        )
    listing = _listing(path)
    if "snapshots" in listing and "refs" in listing and "blobs" in listing:
        return open_folder(_hub_snapshot(path), open_file)
    indexes = [path / n for n in INDEX_NAMES if n in listing]
    indexes += sorted(path / n for n in listing
                      if n.endswith(".index.json") and path / n not in indexes)
    if indexes:
        return _open_sharded(path, indexes[0], open_file)
    for name in SINGLE_NAMES:
        if name in listing:
            return open_file(path / name)
    files = sorted(path / n for n in listing if n.endswith(WEIGHT_SUFFIXES)
                   and _is_regular(path / n))
    if len(files) == 1:
        return open_file(files[0])
    found = ", ".join(sorted(listing)[:8]) or "nothing"
    raise UnsupportedFormatError(
        f"{path.name}/: no weights found (looked for {', '.join(INDEX_NAMES + SINGLE_NAMES)} "
        f"or a single weight file); the folder holds {found}"
    )


def _listing(path: Path) -> set[str]:
    """Names in the folder, bounded by ``LIMITS.max_files`` (nothing is opened)."""
    names: set[str] = set()
    try:
        with os.scandir(path) as it:
            for entry in it:
                names.add(entry.name)
                if len(names) > LIMITS.max_files:
                    LIMITS.check("max_files", len(names), f"{path.name}/: files in the folder")
    except OSError as err:
        raise CorruptCheckpointError(f"{path.name}/: cannot list the folder ({err.strerror})") \
            from None
    return names


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def _kind(path: Path) -> str:
    """'a folder', 'a FIFO', ... for a path that is not a regular file."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError) as err:
        return f"unreadable ({getattr(err, 'strerror', None) or err})"
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def _hub_snapshot(repo: Path) -> Path:
    """The snapshot ``refs/main`` names in a Hugging Face hub cache folder (``models--org--x``)."""
    ref = repo / "refs" / "main"
    rev = ""
    if _is_regular(ref) and os.stat(ref).st_size < 256:
        rev = ref.read_text(errors="replace").strip()
    snap = repo / "snapshots" / rev
    if not rev or not rev.isalnum() or not snap.is_dir():
        revs = sorted(p.name for p in (repo / "snapshots").iterdir())[:5] if \
            (repo / "snapshots").is_dir() else []
        raise UnsupportedFormatError(
            f"{repo.name}/: a Hugging Face hub cache folder whose refs/main names no snapshot; "
            f"pass a snapshot folder instead, e.g. {repo.name}/snapshots/<revision> "
            f"(found: {', '.join(revs) or 'none'})")
    return snap


def _read_index(index: Path) -> dict:
    """The parsed index.json: a regular file, bounded in size, valid JSON, an object."""
    if not _is_regular(index):
        raise CorruptCheckpointError(
            f"{index.name}: is {_kind(index)}, not a JSON file; remove or rename it")
    try:
        size = os.stat(index).st_size
        LIMITS.check("max_header_bytes", size, f"{index.name}: index size in bytes")
        with open(index, "rb") as f:
            raw = f.read(size + 1)
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise CorruptCheckpointError(
            f"{index.name}: not valid JSON ({str(err)[:200] or 'nested too deeply'})") from None
    except OSError as err:
        raise CorruptCheckpointError(f"{index.name}: cannot be read ({err.strerror})") from None
    if not isinstance(data, dict):
        raise CorruptCheckpointError(
            f"{index.name}: expected a JSON object with a 'weight_map', found a "
            f"{type(data).__name__}")
    return data


def _allowed_root(folder: Path) -> Path:
    """The folder shard links may point into: the folder itself or, for a snapshot of the
    Hugging Face hub cache, the repository's cache folder (``models--org--name``)."""
    resolved = folder.resolve()
    parent = resolved.parent
    if parent.name == "snapshots" and parent.parent.name.startswith(
            ("models--", "datasets--", "spaces--")) and (parent.parent / "blobs").is_dir():
        return parent.parent
    return resolved


def _shard_name_problem(shard: str) -> str | None:
    if not shard or "\x00" in shard:
        return "is empty or holds a NUL byte"
    if len(shard) > 4096 or any(len(part.encode()) > 255 for part in shard.split("/")):
        return "is too long for a file name"
    if shard.startswith(("/", "\\")) or Path(shard).is_absolute() or ".." in shard.replace(
            "\\", "/").split("/"):
        return "lies outside the folder (absolute or '..' names are refused)"
    return None


def _shard_path(folder: Path, root: Path, index: Path, shard: str) -> Path:
    problem = _shard_name_problem(shard)
    if problem is not None:
        raise CorruptCheckpointError(f"{index.name}: shard name {shard[:200]!r} {problem}")
    try:
        target = (folder / shard).resolve(strict=True)
    except FileNotFoundError:
        raise CorruptCheckpointError(
            f"{index.name}: shard {shard!r} is missing from {folder.name}/ (incomplete download?)"
        ) from None
    except (OSError, RuntimeError, ValueError) as err:  # a link loop, a too-long path
        reason = getattr(err, "strerror", None) or str(err)
        raise CorruptCheckpointError(
            f"{index.name}: shard {shard!r} cannot be resolved ({reason}); a broken or looping "
            "symbolic link?") from None
    if not target.is_relative_to(root):
        raise CorruptCheckpointError(
            f"{index.name}: shard {shard!r} is a link to {target}, outside the folder "
            f"{root.name}/ (refused)")
    if not _is_regular(target):
        raise CorruptCheckpointError(
            f"{index.name}: shard {shard!r} is {_kind(target)}, not a regular file")
    return folder / shard  # checked; opened under its own name (a hub blob has no suffix)


def _open_sharded(folder: Path, index: Path, open_file: Callable[[Path], Checkpoint]) -> Checkpoint:
    data = _read_index(index)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CorruptCheckpointError(
            f"{index.name}: no valid 'weight_map' (expected an object of tensor name -> shard "
            "file name strings)")
    root_dir = _allowed_root(folder)
    names = sorted(set(weight_map.values()))
    LIMITS.check("max_files", len(names), f"{index.name}: shard files named")
    shards: dict[str, Path] = {}
    for shard in names:
        shards[shard] = _shard_path(folder, root_dir, index, shard)
    merged: dict = {}
    placeholders: list[str] = []
    fmt = ""
    for shard, target in shards.items():
        ckpt = open_file(target)
        fmt = ckpt.format
        placeholders += [p for p in ckpt.placeholders if p not in placeholders]
        if not isinstance(ckpt.root, dict):
            raise CorruptCheckpointError(f"{shard}: shard is not a flat state dict")
        for name, ref in ckpt.root.items():
            if weight_map.get(name, shard) != shard:
                continue  # the index says another shard owns it
            if name in merged:
                raise CorruptCheckpointError(f"{index.name}: tensor {name!r} is in two shards")
            merged[name] = ref
    absent = [n for n in weight_map if n not in merged]
    if absent:
        raise CorruptCheckpointError(
            f"{index.name}: {len(absent)} tensors listed in the index are in no shard, "
            f"e.g. {absent[:3]}"
        )
    meta = data.get("metadata") if isinstance(data.get("metadata"), dict) else {}
    return Checkpoint(
        root=merged, format=f"hf-sharded({fmt})", path=folder, placeholders=placeholders,
        metadata={str(k): str(v) for k, v in meta.items()},
        notes=[f"{len(shards)} shards from {index.name}"],
    )
