"""The map stage alone: prefix, rename and automatic prefix reconciliation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchgraft as tg
from tests import realmodels as rm
from torchgraft.names import map_names

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
