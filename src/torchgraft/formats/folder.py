"""Folders: Hugging Face ``save_pretrained`` output, single-file or sharded with ``*.index.json``.

A sharded folder becomes one flat state dict whose tensors point into their shards. Shard names
from the index are checked to stay inside the folder and to exist before anything is read.

Example:
    >>> ckpt = open_folder(Path("my-model/"))   # doctest: +SKIP
    >>> ckpt.notes
    ['3 shards from model.safetensors.index.json']
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from ..errors import CorruptCheckpointError, UnsupportedFormatError
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
    indexes = [path / n for n in INDEX_NAMES if (path / n).is_file()]
    indexes += sorted(p for p in path.glob("*.index.json") if p not in indexes)
    if indexes:
        return _open_sharded(path, indexes[0], open_file)
    for name in SINGLE_NAMES:
        if (path / name).is_file():
            return open_file(path / name)
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(files) == 1:
        return open_file(files[0])
    found = ", ".join(p.name for p in sorted(path.iterdir())[:8]) or "nothing"
    raise UnsupportedFormatError(
        f"{path.name}/: no weights found (looked for {', '.join(INDEX_NAMES + SINGLE_NAMES)} "
        f"or a single weight file); the folder holds {found}"
    )


def _open_sharded(folder: Path, index: Path, open_file: Callable[[Path], Checkpoint]) -> Checkpoint:
    try:
        if index.stat().st_size > 64 * 1024 * 1024:
            raise CorruptCheckpointError(f"{index.name}: index larger than 64 MiB")
        data = json.loads(index.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{index.name}: not valid JSON ({err})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CorruptCheckpointError(f"{index.name}: no valid 'weight_map'")
    root_dir = folder.resolve()
    shards: dict[str, Path] = {}
    for shard in sorted(set(weight_map.values())):
        target = (folder / shard).resolve()
        if Path(shard).is_absolute() or not target.is_relative_to(root_dir):
            raise CorruptCheckpointError(
                f"{index.name}: shard {shard!r} lies outside the folder {folder.name}/ (refused)"
            )
        if not target.is_file():
            raise CorruptCheckpointError(
                f"{index.name}: shard {shard!r} is missing from {folder.name}/ (incomplete download?)"
            )
        shards[shard] = target
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
