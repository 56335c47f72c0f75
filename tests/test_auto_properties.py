"""Property tests for ``auto`` on generated module trees (issue 13, section 3).

Each example builds a real ``torch.nn`` model from a random tree spec (nested ``ModuleDict`` /
``Sequential`` of ``Linear``, ``Conv2d`` and ``BatchNorm2d`` with random small sizes, so equal
shapes are everywhere), derives a checkpoint from it the way real files differ from their model
(wrapper prefixes added or missing, tensors dropped, unrelated sub-trees added, a second copy of
the weights under another prefix) and loads it with ``tg.load``. Every tensor holds values no
other tensor holds, so where each value landed is checked bitwise:

* a model tensor holds its own initial value or the value of the checkpoint tensor that truly
  belongs there (or of the same name in a second copy, or in an added sub-tree that has the
  model's names and shapes), and all loaded values come from one copy of the weights;
* without a second copy, everything of the model that is in the file is loaded;
* or the load is refused with ``AmbiguousRenameError`` / ``NothingToLoadError`` and the model is
  unchanged.

Examples: ``TORCHGRAFT_HYPOTHESIS=long`` runs the long profile (thousands of examples); the
default profile keeps CI under ~20 s.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from torch import nn

import torchgraft as tg

settings.register_profile("auto-ci", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("auto-long", max_examples=5000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
PROFILE = "auto-long" if os.environ.get("TORCHGRAFT_HYPOTHESIS") == "long" else "auto-ci"

WIDTHS = st.sampled_from([2, 3, 4])
CHILD_NAMES = ["enc", "dec", "head", "stem", "lin3", "lin4", "conv1_BN", "conv2_BN", "blocks",
               "layer1", "fc", "norm", "backbone", "model"]
CKPT_PREFIXES = ["", "module.", "model.", "backbone.", "module.backbone.", "net.", "encoder.",
                 "student.", "_orig_mod.", "model.net."]
MODEL_WRAPS = ["", "backbone", "model", "encoder", "net"]
DUP_PREFIXES = ["ema.", "model_ema.", "teacher.", "target_encoder.", "copy."]
EXTRA_PREFIXES = ["aux.", "neck.", "decoder.", "loss_fn."]


# --- module trees ------------------------------------------------------------------------------


@st.composite
def trees(draw, depth: int = 0):
    kinds = ["linear", "conv", "bn"] + (["dict", "seq"] if depth < 2 else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "linear":
        return ("linear", draw(WIDTHS), draw(WIDTHS), draw(st.booleans()))
    if kind == "conv":
        return ("conv", draw(WIDTHS), draw(WIDTHS), draw(st.sampled_from([1, 3])))
    if kind == "bn":
        return ("bn", draw(WIDTHS))
    if kind == "dict":
        names = draw(st.lists(st.sampled_from(CHILD_NAMES), min_size=1, max_size=3, unique=True))
        return ("dict", [(n, draw(trees(depth + 1))) for n in names])
    return ("seq", [draw(trees(depth + 1)) for _ in range(draw(st.integers(1, 3)))])


def build(spec) -> nn.Module:
    kind = spec[0]
    if kind == "linear":
        return nn.Linear(spec[1], spec[2], bias=spec[3])
    if kind == "conv":
        return nn.Conv2d(spec[1], spec[2], spec[3])
    if kind == "bn":
        return nn.BatchNorm2d(spec[1])
    if kind == "dict":
        return nn.ModuleDict({n: build(s) for n, s in spec[1]})
    return nn.Sequential(*(build(s) for s in spec[1]))


class _Values:
    """Hands out values no other tensor of the example holds."""

    def __init__(self) -> None:
        self.next = 1

    def fill(self, like: torch.Tensor) -> torch.Tensor:
        n = like.numel()
        out = torch.arange(self.next, self.next + n, dtype=torch.float64).reshape(like.shape)
        self.next += n
        return out.to(like.dtype)


def _unique_state(module: nn.Module, values: _Values, sign: int = 1) -> dict[str, torch.Tensor]:
    return {k: values.fill(v) * sign for k, v in module.state_dict().items()}


# --- scenarios -----------------------------------------------------------------------------


@dataclass
class Scenario:
    model: nn.Module
    ckpt: dict[str, torch.Tensor]
    copies: dict[str, dict[str, torch.Tensor]]  # copy label -> model name -> tensor in the file
    dup_prefix: str | None
    dropped: int


@st.composite
def scenarios(draw) -> Scenario:
    inner_spec = draw(trees())
    values = _Values()
    inner = build(inner_spec)
    wrap = draw(st.sampled_from(MODEL_WRAPS))
    if wrap:
        parts = {wrap: inner}
        if draw(st.booleans()):
            parts["extra_head"] = build(draw(trees(depth=2)))
        model = nn.ModuleDict(parts)
    else:
        model = inner
    model_pre = wrap + "." if wrap else ""
    inner_names = list(inner.state_dict())

    # the true weights: the inner module's names, under a checkpoint prefix, some dropped
    truth = {n: t for n, t in _unique_state(inner, values).items()}
    prefix = draw(st.sampled_from(CKPT_PREFIXES))
    # real files keep most of their model: fewer than half of the tensors are dropped
    drop = draw(st.sets(st.sampled_from(inner_names), max_size=(len(inner_names) - 1) // 2))
    kept = [n for n in inner_names if n not in drop]
    ckpt = {prefix + n: truth[n] for n in kept}
    copies = {"true": {model_pre + n: truth[n] for n in kept}}
    # a file name that is another model tensor's name (prefix 'model.' over a model that has a
    # 'model' child) makes the file itself ambiguous: out of scope, loads as torch would
    model_names = set(model.state_dict())
    assume(all(prefix + n == model_pre + n or prefix + n not in model_names
               for n in inner_names))

    dup_prefix = None
    if draw(st.booleans()):
        dup_prefix = draw(st.sampled_from(DUP_PREFIXES))
        if dup_prefix != prefix and not any(dup_prefix + n in model_names for n in inner_names):
            dup = _unique_state(inner, values)
            ckpt.update({dup_prefix + n: t for n, t in dup.items()})
            copies["dup"] = {model_pre + n: t for n, t in dup.items()}
        else:
            dup_prefix = None
    if draw(st.booleans()):  # an unrelated sub-tree with its own (possibly equal) shapes
        extra = build(draw(trees(depth=1)))
        ep = draw(st.sampled_from(EXTRA_PREFIXES))
        extra_state = {ep + n: t for n, t in _unique_state(extra, values).items()}
        ckpt.update(extra_state)
        # where its names end in (or are the end of) a model name, with that name's shape, it is
        # indistinguishable from a copy of that part of the model
        congruent = {}
        for m, mt in model.state_dict().items():
            for e, t in extra_state.items():
                if t.shape == mt.shape and (e.endswith("." + m) or m.endswith("." + e[len(ep):])
                                            or m == e[len(ep):]):
                    congruent[m] = t
                    break
        if congruent:
            copies["extra"] = congruent
    # the model starts from values no checkpoint tensor has
    with torch.no_grad():
        for k, v in _unique_state(model, values, sign=-1).items():
            model.state_dict()[k].copy_(v)
    return Scenario(model, ckpt, copies, dup_prefix, len(inner_names) - len(kept))


def _origin(value: torch.Tensor, copies: dict[str, dict[str, torch.Tensor]],
            ckpt: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """Every (copy, model name) whose tensor equals ``value``; ("file", name) for others."""
    found = [(label, name) for label, copy in copies.items() for name, t in copy.items()
             if t.shape == value.shape and torch.equal(t, value)]
    if not found:
        found = [("file", name) for name, t in ckpt.items()
                 if t.shape == value.shape and torch.equal(t, value)]
    return found


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(settings.get_profile(PROFILE))
@given(sc=scenarios(), mismatch=st.sampled_from([None, "skip"]))
def test_auto_recovers_the_true_mapping_or_refuses(sc: Scenario, mismatch):
    before = {k: v.clone() for k, v in sc.model.state_dict().items()}
    opts = {} if mismatch is None else {"mismatch": mismatch}
    try:
        report = tg.load(sc.model, sc.ckpt, **opts)
    except (tg.AmbiguousRenameError, tg.NothingToLoadError) as err:
        event(f"refused: {type(err).__name__}")
        for k, v in sc.model.state_dict().items():
            assert torch.equal(v, before[k]), f"refused, but {k} changed"
        return
    state = sc.model.state_dict()
    # values the model's own loading code computes (BatchNorm's num_batches_tracked for a file
    # without it) come from no checkpoint tensor
    own = {e.target for e in report.entries if e.action == "adapted" and e.source is None}
    if not any(e.action in ("copied", "cast", "adapted") and e.source for e in report.entries):
        event("nothing loaded from the file")
        for k, v in state.items():
            assert k in own or torch.equal(v, before[k]), f"nothing loaded, but {k} changed"
        return
    used: set[str] = set()
    for name, value in state.items():
        if name in own or torch.equal(value, before[name]):
            continue
        origin = _origin(value, sc.copies, sc.ckpt)
        assert origin, f"{name} holds a value from nowhere"
        labels = {label for label, n in origin if n == name}
        assert labels, f"{name} was loaded from {origin[0]}: the wrong place\n{report}"
        used |= labels
    assert len(used) <= 1, f"loaded a mix of copies {used}\n{report}"
    event("loaded " + ("with auto rule" if report.rules else "as named") + f" from {used}")
    if len(sc.copies) == 1:  # one copy only: all of it that the model has is loaded
        for name, t in sc.copies["true"].items():
            assert torch.equal(state[name], t), f"{name} is in the file but not loaded\n{report}"
    elif sc.dup_prefix and "ema" in sc.dup_prefix and not sc.dropped:
        assert used <= {"true"}, f"loaded the EMA copy over the non-EMA one\n{report}"
    for rule in report.rules:  # the count a rule prints is what the plan copies by name
        if rule.startswith("auto:"):
            n = int(rule.split("(matches ")[1].split()[0])
            assert n == sum(1 for e in report.entries if e.source and e.target
                            and e.action in ("copied", "cast", "adapted")
                            and not e.reason.startswith("tied to"))
