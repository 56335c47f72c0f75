"""The plan stage: pair model tensors with checkpoint tensors and decide an action for each.

Pure: it reads shapes and dtypes only and never writes to the model. Every error that can be
known before copying (shapes, strictness, nothing to load) is decided here.

Example:
    >>> import torch
    >>> from torchgraft.tensors import MemoryRef
    >>> from torchgraft.names import NameMap
    >>> model = torch.nn.Linear(2, 3)
    >>> refs = {"weight": MemoryRef(torch.ones(3, 2)), "bias": MemoryRef(torch.ones(4))}
    >>> p = make_plan(model_slots(model), refs, NameMap(target={"weight": "weight", "bias": "bias"}))
    >>> [(e.target, e.action) for e in p.entries]
    [('weight', 'copied'), ('bias', 'skipped')]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from .errors import (
    IncompatibleKeysError,
    NothingToLoadError,
    OptionError,
    ShapeMismatchError,
    TooLittleLoadedError,
    UnsupportedTargetError,
)
from .names import NameMap
from .report import Entry, LoadReport, group_names
from .tensors import TensorRef
from .transforms import Keep

MISMATCH_MODES = (None, "error", "skip")

#: ``mismatch=None`` (the default): the model framework's own rule decides (timm's replaceable
#: classifier is skipped when it does not fit), every other shape mismatch is an error.
#: ``"error"`` refuses every mismatch, ``"skip"`` keeps the model's own values for all of them.
DEFAULT_MISMATCH = None



@dataclass(slots=True)
class Slot:
    """A model tensor that can be filled: the state-dict name and the live tensor object."""

    name: str
    tensor: torch.Tensor
    group: int  # equal for names that share one tensor (tied weights)
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32
    plain: bool = True  # a dense strided torch.Tensor / Parameter that bytes can be copied into


@dataclass(slots=True)
class Copy:
    """One planned write: ``ref`` into every slot of ``slots`` (tied names share it)."""

    ref: TensorRef
    slots: list[Slot]
    source: str


@dataclass
class Plan:
    entries: list[Entry] = field(default_factory=list)
    copies: list[Copy] = field(default_factory=list)
    loaded_fraction: float = 0.0
    adapted_fraction: float = 0.0
    tolerated: set[str] = field(default_factory=set)  # mismatches that are not errors


def model_slots(model: torch.nn.Module) -> dict[str, Slot]:
    """The model's persistent state, as ``model.state_dict()`` names it, with tie groups."""
    slots: dict[str, Slot] = {}
    groups: dict[int, int] = {}
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}  # one shared tuple per distinct shape
    tensor, param, strided = torch.Tensor, torch.nn.Parameter, torch.strided
    is_lazy = torch.nn.parameter.is_lazy
    for name, value in model.state_dict(keep_vars=True).items():
        kind = type(value)
        if kind is param or kind is tensor:
            plain = value.layout is strided and value.dtype not in _QUANTIZED
        elif isinstance(value, tensor) and not is_lazy(value):
            plain = False
        else:
            continue
        key = id(value)
        gid = groups.get(key)
        if gid is None:
            gid = groups[key] = len(groups)
        shape = tuple(value.shape)
        slots[name] = Slot(name, value, gid, shapes.setdefault(shape, shape), value.dtype,
                           plain and not value.is_nested)
    return slots


_QUANTIZED = {torch.qint8, torch.quint8, torch.qint32, torch.quint4x2, torch.quint2x4}


_DTYPE_NAMES: dict[torch.dtype, str] = {}


def _dtype(d: torch.dtype) -> str:
    name = _DTYPE_NAMES.get(d)
    if name is None:
        name = _DTYPE_NAMES[d] = str(d).replace("torch.", "")
    return name


def make_plan(slots: dict[str, Slot], refs: dict[str, TensorRef], names: NameMap,
              mismatch: str | None = "error",
              classifiers: dict[str, str] | None = None,
              adapt: Callable[[str, TensorRef, Slot], TensorRef | None] | None = None) -> Plan:
    """Decide, for every model slot and checkpoint tensor, what the load does.

    ``adapt(name, ref, slot)`` may turn a checkpoint tensor of the wrong shape into a computed
    one of the right shape (a :class:`~torchgraft.transforms.TransformRef`): it is then
    ``adapted`` instead of a shape mismatch; or answer :class:`~torchgraft.transforms.Keep`:
    the model's own value is right, reported ``kept``.

    ``classifiers`` maps name prefixes of replaceable heads (timm's
    ``pretrained_cfg['classifier']``) to the reason given when they do not fit: such shape
    mismatches are skipped even with ``mismatch="error"``.
    """
    if mismatch not in MISMATCH_MODES:
        raise OptionError(f"mismatch={mismatch!r}: expected one of {MISMATCH_MODES}")
    plan = Plan()
    by_target: dict[str, str] = {}
    duplicates: dict[str, str] = {}
    for src, tgt in names.target.items():
        if tgt in by_target:
            duplicates[src] = by_target[tgt]
        else:
            by_target[tgt] = src
    # pass 1: which model name carries each tie group's data (only when some names are tied)
    group_source: dict[int, str] = {}
    if len({slot.group for slot in slots.values()}) != len(slots):
        for name, slot in slots.items():
            src = by_target.get(name)
            if (src is not None and slot.group not in group_source
                    and refs[src].shape == slot.shape):
                group_source[slot.group] = name
    # pass 2: one entry per model tensor, in the model's order
    copies: dict[int, Copy] = {}
    forced = getattr(adapt, "forced", None)  # names adapted even when the shape fits
    used: set[str] = set()
    why_of = names.why
    entries = plan.entries
    for name, slot in slots.items():
        src = by_target.get(name)
        tshape, tdtype = slot.shape, slot.dtype
        if src is None:
            carrier = group_source.get(slot.group)
            dt = _dtype(tdtype)
            if carrier is not None:
                copy = copies.get(slot.group)
                if copy is None:  # the carrier comes later in the model's order
                    copy = copies[slot.group] = Copy(refs[by_target[carrier]], [], "")
                copy.slots.append(slot)
                entries.append(Entry(name, by_target[carrier], "copied", tshape, tshape, dt, dt,
                                     f"tied to {carrier} (shares its storage)"))
            else:
                entries.append(Entry(name, None, "missing", None, tshape, None, dt,
                                     "not in checkpoint"))
            continue
        ref = refs[src]
        used.add(src)
        why_list = why_of.get(src) if why_of else None
        why = "; ".join(why_list) if why_list else ""
        if adapt is not None and (ref.shape != tshape or (
                forced is not None and forced(name))):
            computed = adapt(name, ref, slot)
            if isinstance(computed, Keep):  # the model's own value is right (e.g. an index)
                entries.append(Entry(name, src, "kept", ref.shape, tshape, _dtype(ref.dtype),
                                     _dtype(tdtype), _join(computed.reason, why)))
                continue
            if computed is not None:
                how = getattr(computed, "describe", lambda: "")()
                who = getattr(computed, "adapter", "") or "adapter"
                entries.append(Entry(name, src, "adapted", ref.shape, tshape,
                                     _dtype(ref.dtype), _dtype(tdtype),
                                     _join(f"{who}: {how}", why)))
                _add_copy(copies, slot, computed, src)
                continue
        if ref.shape != tshape:
            head = None
            if classifiers and mismatch is None:
                head = next((p for p in classifiers if name.startswith(p)), None)
            reason = _join("shape mismatch", why) if head is None else classifiers[head]
            if head is not None:
                plan.tolerated.add(name)
            entries.append(Entry(name, src, "skipped", ref.shape, tshape, _dtype(ref.dtype),
                                 _dtype(tdtype), reason))
            continue
        rdtype = ref.dtype
        if rdtype == tdtype:
            sname = tname = _dtype(rdtype)
            action, reason = "copied", why
        else:
            sname, tname = _dtype(rdtype), _dtype(tdtype)
            action, reason = "cast", _join(f"{sname} -> {tname}", why)
        entries.append(Entry(name, src, action, ref.shape, tshape, sname, tname, reason))
        _add_copy(copies, slot, ref, src)
    for src, ref in refs.items():
        if src in used:
            continue
        if src in names.dropped:
            action, reason = "skipped", names.dropped[src]
        elif src in duplicates:
            action, reason = "unexpected", f"maps to {names.target[src]!r} like {duplicates[src]!r}"
        else:
            action = "unexpected"
            reason = "; ".join(names.why.get(src, [])) or "no model tensor of this name"
        plan.entries.append(Entry(None, src, action, ref.shape, None, _dtype(ref.dtype), None,
                                  reason))
    plan.copies = list(copies.values())
    kept = {slots[e.target].group for e in entries if e.action == "kept"}
    plan.loaded_fraction = loaded_fraction(slots, copies, kept)
    adapted = {slots[e.target].group for e in entries if e.action == "adapted"}
    plan.adapted_fraction = loaded_fraction(slots, adapted, kept) if adapted else 0.0
    return plan


def _add_copy(copies: dict[int, Copy], slot: Slot, ref: TensorRef, src: str) -> None:
    copy = copies.get(slot.group)
    if copy is None:
        copies[slot.group] = Copy(ref, [slot], src)
    elif not copy.source:  # a tied alias was seen first: this is the carrier
        copy.ref, copy.source = ref, src
        copy.slots.insert(0, slot)
    else:
        copy.slots.append(slot)  # tied names both in the file: written once


def _join(a: str, b: str) -> str:
    return f"{a}; {b}" if b else a


def loaded_fraction(slots: dict[str, Slot], loaded_groups: Iterable[int],
                    kept_groups: Iterable[int] = ()) -> float:
    """Fraction of the model's elements (tied tensors counted once) in ``loaded_groups``;
    ``kept_groups`` (the model's own value is the right one: an index buffer built for its
    window, a value its own loading code keeps) are not counted at all."""
    sizes: dict[int, int] = {}
    for slot in slots.values():
        sizes[slot.group] = math.prod(slot.shape)
    for g in kept_groups:
        sizes.pop(g, None)
    total = sum(sizes.values())
    if total == 0:
        return 1.0 if not slots else 0.0
    return sum(sizes.get(g, 0) for g in set(loaded_groups)) / total


def plan_error(report: LoadReport, n_source: int, mismatch: str | None, strict: bool,
               tolerated: set[str] = frozenset(),
               min_loaded: float | None = None) -> Exception | None:
    """Build (not raise) the error for a plan that cannot be loaded with these options."""
    mism = [e for e in report.mismatched if e.target not in tolerated]
    if mism and mismatch != "skip":
        lines = [f"  {e.target}: checkpoint {list(e.source_shape or ())} vs model "
                 f"{list(e.target_shape or ())}" + (f" ({e.reason})" if e.reason and
                                                    e.reason != "shape mismatch" else "")
                 for e in mism]
        return ShapeMismatchError(
            f"{len(mism)} tensor(s) match by name but not by shape:\n" + "\n".join(lines)
            + "\nThe model was not changed. Pass mismatch=\"skip\" to keep the model's own values "
            "for these and load the rest.", report)
    loaded = sum(1 for e in report.entries if e.target is not None and e.action in LOADED)
    if n_source and loaded == 0:
        return NothingToLoadError(_nothing_message(report), report)
    if strict and (report.missing_keys or report.unexpected_keys):
        parts = []
        if report.missing_keys:
            parts.append("missing from the checkpoint: "
                         + ", ".join(group_names(report.missing_keys)[:10]))
        if report.unexpected_keys:
            parts.append("not in the model: "
                         + ", ".join(group_names(report.unexpected_keys)[:10]))
        return IncompatibleKeysError(
            "strict=True and the names differ:\n  " + "\n  ".join(parts)
            + "\nThe model was not changed. Pass strict=False to load what matches, or "
            "rename=/prefix= to fix the names.", report)
    if min_loaded is not None and report.loaded_fraction < min_loaded:
        return TooLittleLoadedError(
            f"only {report.loaded_fraction:.1%} of the model's elements would be loaded, below "
            f"min_loaded={min_loaded}. The model was not changed.\n  {low_load_cause(report)}",
            report)
    return None


def kind_error(copies: list[Copy], report: LoadReport) -> Exception | None:
    """Tensor kinds (read from the file) that cannot go into a plain dense model tensor;
    ``load_state_dict`` refuses them too. Plain targets only: other targets load natively.
    A reference names its kind in ``ref.kind`` (tensor kinds rebuilt by the readers)."""
    bad = []
    for copy in copies:
        ref = copy.ref
        kind = getattr(ref, "kind", None)
        if not isinstance(kind, str):
            continue
        target = copy.slots[0]
        why = None
        if not getattr(ref, "has_values", True):
            why = "has no values (a meta tensor)"
        elif ref.dtype in _QUANTIZED:
            why = "is quantized; dequantize it, or load into a quantized model"
        elif "nested" in kind:
            why = "is a nested tensor"
        if why:
            bad.append(f"  {copy.source} ({kind}) into {target.name} "
                       f"({str(target.dtype).replace('torch.', '')} {list(target.shape)}): {why}")
    if not bad:
        return None
    return UnsupportedTargetError(
        f"{len(bad)} checkpoint tensor(s) cannot be loaded into plain model tensors (torch's "
        "load_state_dict refuses them too):\n" + "\n".join(bad)
        + "\nThe model was not changed. Pass rename=/prefix= to leave them out, or build the "
        "model of the matching kind.", report)


LOADED = ("copied", "cast", "adapted")


def low_load_cause(report: LoadReport) -> str:
    """The likeliest reason a load covers little of the model, as one line with the fix."""
    import re
    from pathlib import Path

    src = Path(report.source) if report.source and report.source != "<in-memory>" else None
    if src is not None and src.is_file():
        shard = re.search(r"-\d{5}-of-\d{5}\.", src.name)
        index = [p.name for p in src.parent.glob("*.index.json")] if src.parent.is_dir() else []
        if shard or index:
            beside = f" ({index[0]} is beside it)" if index else ""
            return (f"the file is one shard of a sharded checkpoint{beside}: pass the folder "
                    f"{str(src.parent)!r} instead")
    missing = report.missing_keys
    loaded = [e.target for e in report.entries if e.target and e.action in LOADED]
    mism = report.mismatched
    unexpected = report.unexpected_keys
    from .report import fold_indices

    deeper = []
    loaded_set = set(loaded)
    by_pattern = {p: m for p, m in fold_indices(loaded + missing)}
    for pattern, members in by_pattern.items():
        got = [m for m in members if m in loaded_set]
        if len(got) >= 2 and len(got) < len(members) and "{" in pattern:
            deeper.append(pattern)
    if deeper:
        return ("the checkpoint is of a model with fewer layers (depth differs): e.g. "
                f"{deeper[0]} is only partly in the file; load a checkpoint of this model size")
    if mism and len(mism) * 4 >= len(loaded) + len(mism):
        e = mism[0]
        return (f"{len(mism)} tensors differ in shape (width differs, e.g. {e.target}: checkpoint "
                f"{list(e.source_shape or ())} vs model {list(e.target_shape or ())}); load a "
                "checkpoint of this model size")
    if unexpected and len(unexpected) >= len(loaded):
        return (f"{len(unexpected)} checkpoint tensors are not used: the model is a sub-model of "
                "the checkpoint's (features_only / a backbone?), which is fine if intended")
    if missing:
        tops = sorted({m.split(".", 1)[0] for m in missing})[:5]
        return (f"the checkpoint covers only part of the model ({len(missing)} tensors missing, "
                f"under {tops}); it may be a backbone-only file or a sub-model's")
    return "most model tensors do not match the checkpoint by name and shape"


def _nothing_message(report: LoadReport) -> str:
    model_all = [e.target for e in report.entries if e.target]
    ckpt_all = [e.source for e in report.entries if e.source and not e.target]
    mism = report.mismatched
    head = "not a single checkpoint tensor matches a model tensor by name and shape"
    if mism:
        head = f"every matching name differs in shape ({len(mism)} tensors)"
    return (f"{head}; nothing would be loaded. The model was not changed.\n"
            f"  model names:      {model_all[:5]}\n  checkpoint names: {ckpt_all[:5]}\n"
            f"  {_likely_fix(model_all, ckpt_all)}")


def _first(name: str) -> str:
    return name.split(".", 1)[0] + "." if "." in name else ""


def _likely_fix(model: list[str], ckpt: list[str]) -> str:
    """Suggest the option that fixes the commonest naming mismatch."""
    model_set = set(model)
    c_heads = sorted({_first(n) for n in ckpt} - {""})
    m_heads = sorted({_first(n) for n in model} - {""})
    for c in c_heads:
        if any(n[len(c):] in model_set for n in ckpt if n.startswith(c)):
            return (f"checkpoint names are model names with {c!r} in front: pass "
                    f"prefix='{c[:-1]}' (or leave auto=True)")
    if len(c_heads) == 1 and len(m_heads) == 1:
        return (f"checkpoint names start with {c_heads[0]!r}, model names with {m_heads[0]!r}: "
                f"pass rename=[(r'^{c_heads[0][:-1]}\\.', '{m_heads[0]}')]")
    return (f"checkpoint names start with {c_heads[:4]}, model names with {m_heads[:4]}: pass "
            "rename= to map one onto the other, or select= another state dict")
