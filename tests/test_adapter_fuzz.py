"""Adapters on shapes nobody planned for: a checkpoint tensor of any shape in an adapted role
either loads (reported ``adapted``) or is refused with a torchgraft error before any write;
never a crash from inside torch."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchgraft as tg

timm = pytest.importorskip("timm")

ROLE_TENSORS = ["pos_embed", "patch_embed.proj.weight", "cls_token", "head.weight",
                "blocks.0.attn.qkv.weight"]


@functools.cache
def _vit():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=64,
                             num_classes=5)


@functools.cache
def _swin():
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, embed_dim=8,
                             depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, len(ROLE_TENSORS) - 1),
       shape=st.lists(st.integers(1, 70), min_size=1, max_size=4),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_any_shape_in_an_adapted_role_loads_or_is_refused(which, shape, dtype) -> None:
    model = _vit()
    name = ROLE_TENSORS[which]
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd[name] = torch.randn(shape).to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        report = tg.load(model, sd, labels=None)
    except tg.TorchgraftError:
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return
    assert report.ok and tuple(model.state_dict()[name].shape) == tuple(before[name].shape)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=st.integers(1, 400), heads=st.integers(1, 3), extra_dim=st.booleans())
def test_any_relative_position_table_loads_or_is_refused(rows, heads, extra_dim) -> None:
    model = _swin()
    name = "layers.0.blocks.0.attn.relative_position_bias_table"
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd[name] = torch.randn((rows, heads, 2) if extra_dim else (rows, heads))
    before = model.get_parameter(name).detach().clone()
    try:
        report = tg.load(model, sd)
    except tg.TorchgraftError:
        assert torch.equal(model.get_parameter(name), before)
        return
    assert report.ok and model.get_parameter(name).shape == before.shape


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tokens=st.integers(1, 700), chans=st.integers(1, 5), k1=st.integers(1, 20),
       k2=st.integers(1, 20), which=st.integers(0, 1))
def test_near_miss_shapes_for_vit_adapters(tokens, chans, k1, k2, which) -> None:
    """Shapes one step from what the adapters handle: the right rank and width, any size."""
    model = _vit()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if which == 0:
        sd["pos_embed"] = torch.randn(1, tokens, 192)
    else:
        sd["patch_embed.proj.weight"] = torch.randn(192, chans, k1, k2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        report = tg.load(model, sd)
    except tg.TorchgraftError:
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return
    assert report.ok and all(torch.isfinite(v).all() for v in model.state_dict().values()
                             if v.is_floating_point())
