"""The select stage: find the state dicts inside a checkpoint container and pick one.

Every nested mapping that holds tensors is a *candidate* (optimizer and trainer state are
skipped). With a model, the candidate that fits it best after name mapping wins; ties go to the
conventional names, then to a non-EMA copy. Without a model, the one with most tensors wins.

Example:
    >>> from torchgraft.tensors import MemoryRef
    >>> import torch
    >>> t = MemoryRef(torch.ones(1))
    >>> cands = find_candidates({"state_dict": {"w": t}, "model_ema": {"w": t}, "epoch": 3})
    >>> [c.path for c in cands]
    ['state_dict', 'model_ema']
    >>> rank(cands, None)[0].path
    'state_dict'
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import AmbiguousRenameError, SelectError
from .limits import LIMITS
from .tensors import TensorRef

CONVENTIONAL = ("state_dict", "model", "model_state_dict", "module", "net", "network",
                "params", "weights", "state", "")
NOT_MODEL = {"optimizer", "optimizers", "optimizer_states", "optim", "optimizer_state_dict",
             "lr_scheduler", "lr_schedulers", "scheduler", "schedulers", "loops", "callbacks",
             "message_hub", "amp", "scaler", "grad_scaler", "rng_state"}
_EMA = re.compile(r"(^|[_\-.])ema($|[_\-.])", re.IGNORECASE)


@dataclass
class Candidate:
    """One state dict inside the container: its ``/``-path and its tensors."""

    path: str
    tensors: dict[str, TensorRef]
    fit: tuple[int, int] | None = None  # (elements matched, tensors matched) when scored
    error: str | None = None

    @property
    def is_ema(self) -> bool:
        return any(_EMA.search(part) for part in self.path.split("/"))

    @property
    def conventional_rank(self) -> int:
        last = self.path.rsplit("/", 1)[-1]
        return CONVENTIONAL.index(last) if last in CONVENTIONAL else len(CONVENTIONAL)

    def sort_key(self) -> tuple:
        fit = self.fit if self.fit is not None else (len(self.tensors), len(self.tensors))
        return (-fit[0], -fit[1], self.is_ema, self.conventional_rank, self.path.count("/"),
                self.path)


MAX_NESTING = 8  # state dicts are looked for this many mappings deep


def find_candidates(root: Any) -> list[Candidate]:
    """All mappings in ``root`` that directly hold tensors, outer ones first.

    A mapping reached by several paths is a candidate under each of them (``{"model": sd,
    "model_ema": sd}``) but is looked into only once, so the walk is linear in the size of the
    container however its objects are shared; it counts toward ``LIMITS.max_nodes``.
    """
    found: list[Candidate] = []
    direct: dict[int, dict[str, TensorRef]] = {}  # id -> the tensors it holds, once looked into
    stack: list[tuple[Any, str, int]] = [(root, "", 0)]
    work = 0
    while stack:
        node, path, depth = stack.pop()
        if not isinstance(node, dict):
            continue
        tensors = direct.get(id(node))
        first = tensors is None
        if first:
            tensors = direct[id(node)] = {k: v for k, v in node.items()
                                          if isinstance(k, str) and isinstance(v, TensorRef)}
            work += len(node)
        if tensors:
            found.append(Candidate(path, tensors))
            work += len(tensors)
        LIMITS.check("max_nodes", work, "objects visited looking for state dicts")
        if first and depth < MAX_NESTING:
            children = [(value, f"{path}/{key}" if path else key, depth + 1)
                        for key, value in node.items()
                        if isinstance(key, str) and isinstance(value, dict)
                        and key.lower() not in NOT_MODEL]
            stack.extend(reversed(children))
    return found


def resolve(root: Any, select: str) -> Candidate:
    """The candidate at an explicit ``select=`` path (``"model/state_dict"``)."""
    node = root
    parts = [p for p in select.strip("/").split("/") if p] if select else []
    for i, part in enumerate(parts):
        found, node_next = _step(node, part)
        if not found:
            here = "/".join(parts[:i]) or "the top level"
            raise SelectError(
                f"select={select!r}: {here} {_has_no(node, part)}. "
                f"State dicts found: {[c.path or '<top>' for c in find_candidates(root)]}"
            )
        node = node_next
    if not isinstance(node, dict):
        raise SelectError(f"select={select!r} is a {type(node).__name__}, not a state dict")
    tensors = {k: v for k, v in node.items() if isinstance(k, str) and isinstance(v, TensorRef)}
    if not tensors:
        raise SelectError(
            f"select={select!r} holds no tensors. State dicts found: "
            f"{[c.path or '<top>' for c in find_candidates(root)]}"
        )
    return Candidate("/".join(parts), tensors)


def _step(node: Any, part: str) -> tuple[bool, Any]:
    """One ``/``-component of a select path: a string key, else an integer key (optimizer
    ``state/0``) or a list index (Lightning ``optimizer_states/0``)."""
    if isinstance(node, dict):
        if part in node:
            return True, node[part]
        key = _as_int(part)
        if key is not None and key in node:
            return True, node[key]
    elif isinstance(node, (list, tuple)):
        index = _as_int(part)
        if index is not None and -len(node) <= index < len(node):
            return True, node[index]
    return False, None


def _as_int(part: str) -> int | None:
    try:
        return int(part)
    except ValueError:
        return None


def _has_no(node: Any, part: str) -> str:
    """What the node lacks, with its keys shown as they are (``[0, 1]`` vs ``['0', '1']``)."""
    if isinstance(node, dict):
        keys = list(node)[:12]
        more = f" ... ({len(node)} keys)" if len(node) > 12 else ""
        return f"has no key {part!r}; its keys are {keys!r}{more}"
    if isinstance(node, (list, tuple)):
        return (f"is a {type(node).__name__} of {len(node)} items; {part!r} is not an index "
                f"of it (0..{len(node) - 1})" if node else f"is an empty {type(node).__name__}")
    return f"is a {type(node).__name__}, not a container; it has no {part!r}"


def rank(cands: list[Candidate],
         score: Callable[[Candidate], tuple[int, int]] | None) -> list[Candidate]:
    """Score (when a model is given) and order candidates, best first."""
    if score is not None:
        for cand in cands:
            try:
                cand.fit = score(cand)
            except AmbiguousRenameError:  # never fall back silently to another candidate
                raise
            except Exception as err:  # e.g. a prefix absent from this candidate
                cand.fit, cand.error = (-1, -1), str(err)
    return sorted(cands, key=Candidate.sort_key)


def describe_container(root: Any) -> str:
    """One line on what the container holds, for errors."""
    if isinstance(root, dict):
        return "a mapping with keys " + ", ".join(repr(k) for k in list(root)[:10])
    hint = ("; torchgraft loads state dicts (names -> tensors): save {'name': tensor, ...} "
            "instead, or read the file with torch.load")
    if isinstance(root, TensorRef):
        dt = str(root.dtype).replace("torch.", "")
        return f"a single tensor (shape {list(root.shape)}, {dt}), not a state dict{hint}"
    if isinstance(root, (list, tuple)) and root and all(isinstance(v, TensorRef) for v in root):
        return f"a {type(root).__name__} of {len(root)} tensors without names{hint}"
    return f"a {type(root).__name__}"
