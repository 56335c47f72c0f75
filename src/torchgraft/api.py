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
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .adapting import check_adapt_option, make_adapter
from .apply import apply_copies
from .errors import (
    OptionError,
    PartialLoadError,
    PlanError,
    SelectError,
)
from .formats import Checkpoint, open_checkpoint
from .names import NameMap, Rename, map_names
from .native_load import NativeGroup, apply_group, check_writable, find_native, plan_group
from .native_split import mapped_metadata, merge_entries, node_at, split_native
from .plan import (
    DEFAULT_MISMATCH,
    LOADED,
    MISMATCH_MODES,
    Copy,
    Slot,
    kind_error,
    loaded_fraction,
    low_load_cause,
    make_plan,
    model_slots,
    plan_error,
)
from .progress import ProgressBar
from .report import LOW_LOAD_WARNING, Entry, LoadReport
from .rules import model_rules, resolve_filter
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
    source = _resolved(source)  # hf:// ids and URLs become local paths; others unchanged
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


def _resolved(source: Any) -> Any:
    """``resolve_source`` for what may be a hub id or URL (the module is imported only then)."""
    if isinstance(source, (str, os.PathLike)) and ":/" in os.fspath(source) or \
            "torchgraft.sources" in sys.modules:
        from .sources import resolve_source

        return resolve_source(source)
    return source


@dataclass(frozen=True)
class LoadOptions:
    """Every option of :func:`plan` / :func:`load`, validated once (see :func:`load`)."""

    select: str | None = None
    prefix: str | None = None
    rename: Rename = None
    auto: bool = True
    mismatch: str | None = DEFAULT_MISMATCH
    strict: bool = False
    trust: bool = False
    timm_filter: bool = False
    min_loaded: float | None = None
    hooks: bool = True
    filter: Any = None
    adapt: Any = "auto"
    labels: Any = None

    def __post_init__(self) -> None:
        if self.labels is not None:
            object.__setattr__(self, "labels", _labels(self.labels))
        check_adapt_option(self.adapt)
        for name in ("auto", "strict", "trust", "timm_filter", "hooks"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise OptionError(f"{name}={value!r}: expected True or False, not a "
                                  f"{type(value).__name__}")
        for name in ("select", "prefix"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise OptionError(f"{name}={value!r}: expected a str or None, not a "
                                  f"{type(value).__name__}")
        if self.mismatch not in MISMATCH_MODES:
            raise OptionError(f"mismatch={self.mismatch!r}: expected None (the framework's "
                              "own rule, else error), 'error' or 'skip'")
        m = self.min_loaded
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float))
                              or not 0 <= m <= 1):
            raise OptionError(f"min_loaded={m!r}: expected a fraction between 0 and 1 "
                              "(e.g. 0.9), or None")

    def describe(self) -> dict[str, Any]:
        return {"select": self.select, "prefix": self.prefix, "rename": _describe(self.rename),
                "auto": self.auto, "mismatch": self.mismatch, "strict": self.strict,
                "trust": self.trust, "timm_filter": self.timm_filter,
                "min_loaded": self.min_loaded, "hooks": self.hooks,
                "filter": self.filter if self.filter is None or isinstance(self.filter, str)
                else getattr(self.filter, "__name__", repr(self.filter)),
                "adapt": sorted(self.adapt) if isinstance(self.adapt, (set, frozenset))
                else self.adapt,
                "labels": self.labels if self.labels is None or isinstance(self.labels, int)
                else f"{len(self.labels)} class indices"}


def _labels(lab: Any) -> int | tuple[int, ...]:
    """``labels=`` as an int offset or a tuple of ints (from a list, array or tensor)."""
    import operator

    bad = OptionError(f"labels={lab!r}: expected a list of checkpoint class indices (one per "
                      "model class; a list, array or tensor of ints) or an int offset")
    if isinstance(lab, (bool, str, bytes)):
        raise bad
    try:
        if hasattr(lab, "__len__") and getattr(lab, "ndim", 1) == 1:
            return tuple(operator.index(i) for i in lab)
        if getattr(lab, "ndim", 0) == 0:
            return operator.index(lab)
    except TypeError:
        pass
    raise bad


def _check_model(model: Any, source: Any) -> None:
    if isinstance(model, torch.nn.Module):
        return
    if isinstance(source, torch.nn.Module):
        raise OptionError("the arguments are swapped: call tg.load(model, source) / "
                          "tg.plan(model, source), model first")
    raise OptionError(f"model must be a torch.nn.Module, not a {type(model).__name__}")


def plan(model: torch.nn.Module, source: Source, *, select: str | None = None,
         prefix: str | None = None, rename: Rename = None, auto: bool = True,
         mismatch: str | None = DEFAULT_MISMATCH, strict: bool = False, trust: bool = False,
         timm_filter: bool = False, min_loaded: float | None = None,
         hooks: bool = True, filter: Any = None, adapt: Any = "auto",
         labels: Any = None) -> LoadReport:
    """Dry run: the report ``load`` would give, without touching the model.

    A plan that ``load`` would refuse is returned with ``ok=False`` and ``error`` set, instead of
    raising; unreadable files still raise. The model's own loading code (load hooks,
    ``_load_from_state_dict`` overrides, extra state) runs on copies, never on the model.

    Example:
        >>> import torch, torchgraft as tg
        >>> r = tg.plan(torch.nn.Linear(2, 10), torch.nn.Linear(2, 1000).state_dict())
        >>> r.ok, [e.target for e in r.mismatched]
        (False, ['weight', 'bias'])
    """
    _check_model(model, source)
    opts = LoadOptions(select, prefix, rename, auto, mismatch, strict, trust, timm_filter,
                       min_loaded, hooks, filter, adapt, labels)
    with gc_paused():
        try:
            planned = _plan(model, source, opts)
        except PlanError as err:  # raised before a report exists (ambiguous names, adapters)
            report = LoadReport(source=str(source) if not isinstance(source, Mapping)
                                else "<in-memory>", ok=False, error=str(err),
                                options=opts.describe())
            err.report = report
            return report
    return planned.report


def _filtered(model: torch.nn.Module, cand: Candidate, fn: Any) -> Candidate:
    state = {n: r.materialize() for n, r in cand.tensors.items()}
    out = fn(model, state)
    if not isinstance(out, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in out.items()):
        raise OptionError("filter= must return a state dict (a mapping of str to tensors)")
    return Candidate(cand.path, {n: MemoryRef(t) for n, t in out.items()})


@dataclass
class _Planned:
    report: LoadReport
    copies: list[Copy]
    groups: list[NativeGroup]
    error: Exception | None
    refs: dict[str, TensorRef]  # the selected state dict, by checkpoint name (all of it)


def _plan(model: torch.nn.Module, source: Source, opts: LoadOptions) -> _Planned:
    source = _resolved(source)  # hf:// ids and URLs become local paths; others unchanged
    ckpt = open_checkpoint(source, trust=opts.trust)
    slots = model_slots(model)
    shapes = _shapes(slots)
    rules = model_rules(model, opts.auto)
    classifiers, framework_rename = rules.tolerated, rules.renamer
    state_filter = resolve_filter("timm" if opts.timm_filter and opts.filter is None
                                  else opts.filter, model)
    mapped: dict[str, NameMap] = {}
    converted: dict[str, Candidate] = {}

    def score(cand: Candidate) -> tuple[int, int]:
        if state_filter is not None:
            converted[cand.path] = cand = _filtered(model, cand, state_filter)
        src_shapes = {n: r.shape for n, r in cand.tensors.items()}
        mapped[cand.path] = map_names(src_shapes, shapes, prefix=opts.prefix, rename=opts.rename,
                                      auto=opts.auto, framework_rename=framework_rename)
        return _fit(mapped[cand.path], cand.tensors, shapes)

    cand, ranked = _choose(ckpt, opts.select, score)
    names = mapped[cand.path]
    if state_filter is not None:
        cand = converted[cand.path]
        how = opts.filter if isinstance(opts.filter, str) else "timm" if opts.timm_filter \
            else getattr(opts.filter, "__name__", "a function")
        ckpt.notes.append(f"converted by the filter {how!r}"
                          + (" (the timm model family's checkpoint_filter_fn)"
                             if how == "timm" else ""))
    refs = cand.tensors
    groups: list[NativeGroup] = []
    if opts.hooks:
        node = node_at(source, ckpt.root, cand.path)
        metadata = mapped_metadata(getattr(node, "_metadata", None), names)
        src_of = {t: s for s, t in names.target.items()}
        odd = [n for n, sl in slots.items() if not sl.plain or not sl.shape]
        groups = find_native(model, set(src_of), metadata,
                             lambda n: refs[src_of[n]].shape if n in src_of else None, odd)
    else:
        check_writable(model)
    tolerated: set[str] = set()
    native_entries: list[Entry] = []
    if groups:
        slots, refs, names = split_native(groups, slots, refs, names, node)

        def tolerate(name: str) -> str | None:
            if opts.mismatch == "skip":
                return "shape mismatch"
            head = next((p for p in classifiers if name.startswith(p)), None)
            if opts.mismatch is None and head is not None:
                tolerated.add(name)
                return classifiers[head]
            return None

        for group in groups:
            native_entries += plan_group(group, tolerate)
    adapt = make_adapter(shapes.keys(), opts.adapt, opts.labels, rules.roles)
    p = make_plan(slots, refs, names, opts.mismatch, classifiers, adapt)
    tolerated |= p.tolerated
    entries = merge_entries(p.entries, native_entries, groups) if groups else p.entries
    all_slots = model_slots(model) if groups else slots
    kept = _loaded_groups(all_slots, entries, ("kept",)) if groups else set()
    report = LoadReport(
        entries=entries, selected=cand.path, format=ckpt.format,
        source=str(ckpt.path) if ckpt.path else "<in-memory>",
        rules=list(names.rules), notes=list(ckpt.notes) + list(names.notes),
        alternatives=[{"path": c.path, "tensors": len(c.tensors), "ema": c.is_ema,
                       "matched": c.fit[1] if c.fit and c.fit[1] >= 0 else None}
                      for c in ranked if c is not cand],
        placeholders=list(ckpt.placeholders),
        loaded_fraction=loaded_fraction(all_slots, _loaded_groups(all_slots, entries), kept)
        if groups else p.loaded_fraction,
        adapted_fraction=loaded_fraction(
            all_slots, _loaded_groups(all_slots, entries, ("adapted",)), kept)
        if groups else p.adapted_fraction,
        options=opts.describe(),
    )
    if ckpt.path is not None:
        sources = sys.modules.get("torchgraft.sources")  # imported only if a source needed it
        report.provenance = sources.provenance_of(ckpt.path) if sources else None
    for group in groups:
        report.notes.append(f"{group.prefix[:-1] or 'the model'} ({type(group.module).__name__})"
                            f" is loaded by its own loading code: {'; '.join(group.reasons)}")
    if any(a["ema"] for a in report.alternatives) and not cand.is_ema:
        report.notes.append("the file also holds an EMA copy of the weights; pass select= to "
                            "load it")
    error = kind_error(p.copies, report) or plan_error(
        report, len(cand.tensors), opts.mismatch, opts.strict, tolerated, opts.min_loaded)
    if error is not None:
        report.ok, report.error = False, str(error)
    return _Planned(report, p.copies, groups, error, cand.tensors)


def _loaded_groups(slots: dict[str, Slot], entries: list[Entry],
                   actions: tuple[str, ...] = LOADED) -> set[int]:
    return {slots[e.target].group for e in entries if e.target in slots and e.action in actions}


def _describe(rename: Rename) -> Any:
    if rename is None or isinstance(rename, (list, tuple, dict)):
        return rename if not isinstance(rename, tuple) else list(rename)
    return getattr(rename, "__name__", repr(rename))


def load(model: torch.nn.Module, source: Source, *, select: str | None = None,
         prefix: str | None = None, rename: Rename = None, auto: bool = True,
         mismatch: str | None = DEFAULT_MISMATCH, strict: bool = False, trust: bool = False,
         timm_filter: bool = False, min_loaded: float | None = None, hooks: bool = True,
         filter: Any = None, adapt: Any = "auto", labels: Any = None,
         progress: bool | None = None) -> LoadReport:
    """Load ``source`` into ``model`` all-or-nothing and return the report.

    The model ends up exactly as ``model.load_state_dict(mapped, strict=False)`` would leave it
    (its load hooks, ``_load_from_state_dict`` overrides, extra state and the file's version
    metadata included; ``hooks=False`` copies tensors without running that code). Everything
    that can fail is checked before the first write (hooks run on copies while planning); on
    such an error the model is untouched and the exception carries the report (``err.report``).

    ``mismatch``: None (default) lets the model's framework tolerate a replaceable classifier
    that does not fit (timm) and refuses every other shape mismatch; ``"error"`` refuses all;
    ``"skip"`` keeps the model's own values for all. ``min_loaded``: refuse (TooLittleLoadedError)
    when less than this fraction of the model's elements would be loaded; without it a load
    below 90% only warns (``tg.LowLoadWarning``).

    Example:
        >>> import torch, torchgraft as tg
        >>> def net(classes): return torch.nn.Sequential(torch.nn.Linear(4, 8),
        ...                                               torch.nn.Linear(8, classes))
        >>> r = tg.load(net(10), net(1000).state_dict(), mismatch="skip")
        >>> r.ok, [e.target for e in r.mismatched]
        (True, ['1.weight', '1.bias'])
    """
    _check_model(model, source)
    opts = LoadOptions(select, prefix, rename, auto, mismatch, strict, trust, timm_filter,
                       min_loaded, hooks, filter, adapt, labels)
    if progress is not None and not isinstance(progress, bool):
        raise OptionError(f"progress={progress!r}: expected True, False or None")
    with gc_paused():
        planned = _plan(model, source, opts)
        report = planned.report
        if planned.error is not None:
            raise planned.error
        bar = None
        copies = planned.copies
        if ProgressBar.wanted(progress):
            total = sum(c.ref.nbytes for c in copies)
            bar = ProgressBar.maybe(total, progress, label=os.path.basename(report.source))
        try:
            written = apply_copies(model, copies, progress=bar.update if bar else None)
        finally:
            if bar:
                bar.close()
        _apply_native(planned.groups, written)
    report.applied = True
    if report.loaded_fraction < LOW_LOAD_WARNING and min_loaded is None:
        warnings.warn(LowLoadWarning(
            f"torchgraft: only {report.loaded_fraction:.1%} of the model's elements were loaded "
            f"from {report.source}; {low_load_cause(report)}. Pass min_loaded= to make this an "
            "error."), stacklevel=2)
    return report


class LowLoadWarning(UserWarning):
    """``tg.load`` loaded less than half of the model (``min_loaded=`` makes it an error)."""


def _apply_native(groups: list[NativeGroup], written: list[str]) -> None:
    for i, group in enumerate(groups):
        try:
            apply_group(group)
        except BaseException as err:
            done = list(written) + [n for g in groups[:i] for n in g.state]
            done += [n for n in group.state]  # conservatively: the failing group is touched
            raise PartialLoadError(
                f"the model's own loading code failed on the real model after succeeding on a "
                f"copy ({type(err).__name__}: {err}). The model is PARTIALLY loaded: "
                f"{len(done)} tensors may hold checkpoint values. Reload the model before "
                "using it.", done) from err
