"""The map stage alone: prefix, rename and automatic prefix reconciliation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchgraft as tg
from tests import realmodels as rm
from torchgraft.names import count_matches, map_names

WRAPPERS = ["module.", "_orig_mod.", "model.", "backbone.", "net.", "encoder.", "student."]


_shapes_cache: dict[str, tuple[int, ...]] = {}


def _resnet_shapes() -> dict[str, tuple[int, ...]]:
    if not _shapes_cache:
        model = rm.timm_model("resnet18")
        _shapes_cache.update({k: tuple(v.shape) for k, v in model.state_dict().items()})
    return _shapes_cache


@pytest.fixture(scope="module")
def real_shapes() -> dict[str, tuple[int, ...]]:
    return dict(_resnet_shapes())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ckpt_wrap=st.lists(st.sampled_from(WRAPPERS), max_size=3),
       model_wrap=st.lists(st.sampled_from(WRAPPERS), max_size=2))
def test_random_wrapper_prefixes_are_reconciled_exactly(ckpt_wrap, model_wrap):
    shapes = _resnet_shapes()
    cp, mp = "".join(ckpt_wrap), "".join(model_wrap)
    src = {cp + k: s for k, s in shapes.items()}
    model = {mp + k: s for k, s in shapes.items()}
    result = map_names(src, model)
    assert result.target == {cp + k: mp + k for k in shapes}


@settings(max_examples=15, deadline=None)
@given(ckpt_wrap=st.lists(st.sampled_from(WRAPPERS), min_size=1, max_size=3))
def test_random_prefixes_load_real_tensors(ckpt_wrap):
    src = _small_model(0)
    dst = _small_model(1)
    cp = "".join(ckpt_wrap)
    report = tg.load(dst, {cp + k: v for k, v in src.state_dict().items()})
    assert report.loaded_fraction == 1.0
    for k, v in dst.state_dict().items():
        assert torch.equal(v, src.state_dict()[k])


def _small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
                               torch.nn.Flatten(), torch.nn.Linear(8, 4))


def test_auto_never_picks_a_rule_worse_than_none(real_shapes):
    src = dict(real_shapes)
    src.update({"module.fc.weight": (1000, 512)})
    result = map_names(src, real_shapes)
    assert result.auto_rule is None and result.target["conv1.weight"] == "conv1.weight"


def test_auto_false_keeps_names(real_shapes):
    src = {"module." + k: s for k, s in real_shapes.items()}
    assert map_names(src, real_shapes, auto=False).target == {k: k for k in src}


def test_rules_are_recorded_per_tensor(real_shapes):
    src = {"module.backbone." + k: s for k, s in real_shapes.items()}
    result = map_names(src, real_shapes, prefix="backbone")
    assert result.why["module.backbone.conv1.weight"] == ["prefix 'backbone.' stripped"]
    assert result.rules[0].startswith("prefix 'backbone.'")


def test_regex_rename_is_mmengine_revise_keys(real_shapes):
    src = {"module." + k: s for k, s in real_shapes.items()}
    result = map_names(src, real_shapes, rename=[(r"^module\.", "")], auto=False)
    assert result.target["module.conv1.weight"] == "conv1.weight"
    with pytest.raises(tg.RenameError):
        map_names(src, real_shapes, rename=[("(", "x")])


# --- invariants of auto on random name/shape tables (pure, fast) --------------------------------

COMPONENTS = ["a", "b", "enc", "head", "0", "1", "module", "ema", "layer_1"]
LEAVES = ["weight", "bias", "running_mean"]
SHAPES = [(2,), (3,), (2, 2), (2, 3)]


@st.composite
def name_tables(draw) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    def names(min_size: int) -> dict[str, tuple[int, ...]]:
        keys = draw(st.lists(
            st.tuples(st.lists(st.sampled_from(COMPONENTS), max_size=3),
                      st.sampled_from(LEAVES)).map(lambda t: ".".join([*t[0], t[1]])),
            min_size=min_size, max_size=12, unique=True))
        return {k: draw(st.sampled_from(SHAPES)) for k in keys}

    model = names(1)
    wrap = draw(st.sampled_from(["", "module.", "ema.", "a.", "b.enc."]))
    keep = draw(st.lists(st.booleans(), min_size=len(model), max_size=len(model)))
    src = {wrap + k: v for (k, v), kept in zip(model.items(), keep, strict=True) if kept}
    src.update(names(0))
    return src, model


@settings(max_examples=300, deadline=None)
@given(tables=name_tables())
def test_auto_invariants_on_random_tables(tables):
    """Never moves a tensor that fits; never renames onto a name the checkpoint holds; never maps
    two tensors onto one name; the count it prints is what the plan copies by name."""
    src, model = tables
    try:
        result = map_names(src, model)
    except tg.AmbiguousRenameError as err:
        assert "pass prefix=" in str(err) or "pass rename=" in str(err)
        return
    moved = {s: t for s, t in result.target.items() if s != t}
    for s, t in moved.items():
        assert model.get(s) != src[s], f"{s} fits but was moved to {t}"
        assert t not in src, f"{s} renamed onto {t}, a name the checkpoint holds"
        assert t in model and model[t] is not None
    targets = list(result.target.values())
    assert len(targets) == len(set(targets))
    for rule in result.rules:
        if rule.startswith("auto:"):
            n = int(rule.split("(matches ")[1].split()[0])
            assert n == count_matches(result.target, src, model)
