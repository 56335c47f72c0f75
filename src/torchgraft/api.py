"""The public facade: ``read``, ``plan`` and ``load`` (= plan + apply).

Example:
    >>> import torch, torchgraft as tg
    >>> src = torch.nn.Linear(4, 2)
    >>> ckpt = {"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}, "epoch": 3}
    >>> model = torch.nn.Linear(4, 2)
    >>> report = tg.load(model, ckpt)
    >>> report.ok, report.selected, torch.equal(model.weight, src.weight)
    (True, 'state_dict', True)
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .apply import apply_copies
from .errors import SelectError
from .formats import Checkpoint, open_checkpoint
from .names import NameMap, Rename, map_names
from .plan import DEFAULT_MISMATCH, Slot, make_plan, model_slots, plan_error
from .progress import ProgressBar
from .report import LoadReport
from .selection import Candidate, describe_container, find_candidates, rank, resolve
from .tensors import MemoryRef, TensorRef

Source = str | os.PathLike | Mapping


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector: planning makes many small acyclic objects, and its
    generation scans would otherwise make large checkpoints cost more than linear time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class StateDict(Mapping):
    """The selected state dict of a checkpoint: a lazy ``Mapping[str, Tensor]``.

    Indexing reads that one tensor from the file (nothing is cached). ``refs`` holds the lazy
    references, ``selected`` the container path, ``placeholders`` the globals the file named
    but that were not executed, ``checkpoint`` the whole container.
    """

    def __init__(self, refs: dict[str, TensorRef], checkpoint: Checkpoint, selected: str,
                 candidates: list[Candidate]) -> None:
        self.refs = refs
        self.checkpoint = checkpoint
        self.selected = selected
        self.candidates = candidates

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.refs[name].materialize()

    def __iter__(self) -> Iterator[str]:
        return iter(self.refs)

    def __len__(self) -> int:
        return len(self.refs)

    def ref(self, name: str) -> TensorRef:
        return self.refs[name]

    @property
    def placeholders(self) -> list[str]:
        return self.checkpoint.placeholders

    @property
    def format(self) -> str:
        return self.checkpoint.format

    @property
    def metadata(self) -> dict[str, str]:
        return self.checkpoint.metadata

    def __repr__(self) -> str:
        return (f"<StateDict {len(self)} tensors from {self.checkpoint.name} "
                f"[{self.format}] selected {self.selected!r}>")


def read(source: Source, select: str | None = None, *, trust: bool = False) -> StateDict:
    """Read the state dict inside ``source`` lazily.

    Example:
        >>> import torch, torchgraft as tg
        >>> sd = tg.read({"model": {"w": torch.ones(2)}, "epoch": 1})
        >>> sd.selected, sd["w"].tolist()
        ('model', [1.0, 1.0])
    """
    ckpt = open_checkpoint(source, trust=trust)
    cand, ranked = _choose(ckpt, select, None)
    return StateDict(cand.tensors, ckpt, cand.path, ranked)


def _choose(ckpt: Checkpoint, select: str | None, score: Any) -> tuple[Candidate, list[Candidate]]:
    if select is not None:
        cand = resolve(ckpt.root, select)
        if score is not None:
            cand.fit = score(cand)
        return cand, [cand]
    cands = find_candidates(ckpt.root)
    if not cands:
        raise SelectError(f"{ckpt.name}: no state dict (no tensors) found; the file holds "
                          f"{describe_container(ckpt.root)}")
    ranked = rank(cands, score)
    if ranked[0].fit == (-1, -1) and ranked[0].error:
        # every candidate failed to map (e.g. prefix absent): re-raise for the likeliest one
        best = min(cands, key=lambda c: (c.is_ema, c.conventional_rank, -len(c.tensors)))
        score(best)
    return ranked[0], ranked


def _shapes(slots: dict[str, Slot]) -> dict[str, tuple[int, ...]]:
    return {n: s.shape for n, s in slots.items()}


def _fit(names: NameMap, refs: dict[str, TensorRef],
         model_shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    elems = count = 0
    for src, tgt in names.target.items():
        ref = refs[src]
        if model_shapes.get(tgt) == ref.shape:
            elems += ref.numel
            count += 1
    return elems, count


def plan(model: torch.nn.Module, source: Source, *, select: str | None = None,
         prefix: str | None = None, rename: Rename = None, auto: bool = True,
         mismatch: str = DEFAULT_MISMATCH, strict: bool = False, trust: bool = False,
         timm_filter: bool = False) -> LoadReport:
    """Dry run: the report ``load`` would give, without touching the model.

    A plan that ``load`` would refuse is returned with ``ok=False`` and ``error`` set, instead of
    raising; unreadable files still raise.

    Example:
        >>> import torch, torchgraft as tg
        >>> r = tg.plan(torch.nn.Linear(2, 10), torch.nn.Linear(2, 1000).state_dict())
        >>> r.ok, [e.target for e in r.mismatched]
        (False, ['weight', 'bias'])
    """
    with gc_paused():
        report, _, _ = _plan(model, source, select, prefix, rename, auto, mismatch, strict, trust,
                             timm_filter)
    return report


def _framework_rules(model: torch.nn.Module, auto: bool) -> tuple[dict[str, str], Any]:
    """What the model's framework says about loading it: timm's replaceable classifier and
    transformers' hub-name mapping. Only with ``auto=True``; frameworks are never imported here
    unless the model comes from them."""
    if not auto:
        return {}, None
    from .integrations.timm import classifier_names, skip_reason
    from .integrations.transformers import hf_renamer

    classifiers = {p: skip_reason(p) for p in classifier_names(model)}
    return classifiers, lambda: hf_renamer(model)  # built only when the names need it


def _filtered(model: torch.nn.Module, cand: Candidate) -> Candidate:
    from .integrations.timm import timm_filter

    state = {n: r.materialize() for n, r in cand.tensors.items()}
    out = timm_filter(model, state)
    return Candidate(cand.path, {n: MemoryRef(t) for n, t in out.items()})


def _plan(model, source, select, prefix, rename, auto, mismatch, strict, trust,
          timm_filter=False):
    ckpt = open_checkpoint(source, trust=trust)
    slots = model_slots(model)
    shapes = _shapes(slots)
    classifiers, framework_rename = _framework_rules(model, auto)
    mapped: dict[str, NameMap] = {}
    converted: dict[str, Candidate] = {}

    def score(cand: Candidate) -> tuple[int, int]:
        if timm_filter:
            converted[cand.path] = cand = _filtered(model, cand)
        src_shapes = {n: r.shape for n, r in cand.tensors.items()}
        mapped[cand.path] = map_names(src_shapes, shapes, prefix=prefix, rename=rename, auto=auto,
                                      framework_rename=framework_rename)
        return _fit(mapped[cand.path], cand.tensors, shapes)

    cand, ranked = _choose(ckpt, select, score)
    names = mapped[cand.path]
    if timm_filter:
        cand = converted[cand.path]
        ckpt.notes.append("converted by the timm model family's checkpoint_filter_fn "
                          "(timm_filter=True)")
    p = make_plan(slots, cand.tensors, names, mismatch, classifiers)
    report = LoadReport(
        entries=p.entries, selected=cand.path, format=ckpt.format,
        source=str(ckpt.path) if ckpt.path else "<in-memory>",
        rules=list(names.rules), notes=list(ckpt.notes) + list(names.notes),
        alternatives=[{"path": c.path, "tensors": len(c.tensors), "ema": c.is_ema,
                       "matched": c.fit[1] if c.fit and c.fit[1] >= 0 else None}
                      for c in ranked if c is not cand],
        placeholders=list(ckpt.placeholders), loaded_fraction=p.loaded_fraction,
        options={"select": select, "prefix": prefix, "rename": _describe(rename), "auto": auto,
                 "mismatch": str(mismatch), "strict": strict, "trust": trust,
                 "timm_filter": timm_filter},
    )
    if any(a["ema"] for a in report.alternatives) and not cand.is_ema:
        report.notes.append("the file also holds an EMA copy of the weights; pass select= to "
                            "load it")
    error = plan_error(report, len(cand.tensors), mismatch, strict, p.tolerated)
    if error is not None:
        report.ok, report.error = False, str(error)
    return report, p, error


def _describe(rename: Rename) -> Any:
    if rename is None or isinstance(rename, (list, tuple, dict)):
        return rename if not isinstance(rename, tuple) else list(rename)
    return getattr(rename, "__name__", repr(rename))


def load(model: torch.nn.Module, source: Source, *, select: str | None = None,
         prefix: str | None = None, rename: Rename = None, auto: bool = True,
         mismatch: str = DEFAULT_MISMATCH, strict: bool = False, trust: bool = False,
         timm_filter: bool = False, progress: bool | None = None) -> LoadReport:
    """Load ``source`` into ``model`` all-or-nothing and return the report.

    Everything that can fail before copying is checked first; on such an error the model is
    untouched and the exception carries the report (``err.report``).

    Example:
        >>> import torch, torchgraft as tg
        >>> def net(classes): return torch.nn.Sequential(torch.nn.Linear(4, 8),
        ...                                               torch.nn.Linear(8, classes))
        >>> r = tg.load(net(10), net(1000).state_dict(), mismatch="skip")
        >>> r.ok, [e.target for e in r.mismatched]
        (True, ['1.weight', '1.bias'])
    """
    with gc_paused():
        report, p, error = _plan(model, source, select, prefix, rename, auto, mismatch, strict,
                                 trust, timm_filter)
        if error is not None:
            raise error
        bar = None
        if ProgressBar.wanted(progress):
            total = sum(c.ref.nbytes for c in p.copies)
            bar = ProgressBar.maybe(total, progress, label=os.path.basename(report.source))
        try:
            apply_copies(model, p.copies, progress=bar.update if bar else None)
        finally:
            if bar:
                bar.close()
    report.applied = True
    return report
