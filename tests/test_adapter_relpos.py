"""Relative-position bias tables to a new window (timm, transformers, mmpretrain Swin v1/v2 and
BEiT), against timm's own ``resize_rel_pos_bias_table`` and timm's pretrained loading."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchgraft as tg
from torchgraft.adapters.relpos import RelPosTable, resize_rel_pos_table
from torchgraft.tensors import MemoryRef
from torchgraft.transforms import Role, TransformRef

timm = pytest.importorskip("timm")
from timm.layers import resize_rel_pos_bias_table  # noqa: E402

SWIN = dict(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 2))
TABLE = "relative_position_bias_table"


def swin(**kwargs) -> torch.nn.Module:
    torch.manual_seed(len(kwargs))
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **SWIN,
                             **kwargs).eval()


def timm_tables(model: torch.nn.Module, state: dict, old: tuple | None = None) -> dict:
    """What timm's resize_rel_pos_bias_table makes of each checkpoint table for ``model``."""
    out = {}
    for name, module in model.named_modules():
        table = module._parameters.get(TABLE)
        if table is not None:
            key = f"{name}.{TABLE}"
            out[key] = resize_rel_pos_bias_table(state[key], new_window_size=module.window_size,
                                                 new_bias_shape=table.shape, old_window_size=old)
    return out


def assert_tables(model: torch.nn.Module, expected: dict) -> None:
    state = model.state_dict()
    assert expected
    for key, value in expected.items():
        assert torch.equal(state[key], value), (key, (state[key] - value).abs().max().item())


def test_timm_swin_window_7_to_12_is_timms_resize_and_timms_pretrained_loading() -> None:
    src = swin()
    sd = src.state_dict()
    model = swin(img_size=384, window_size=12)
    report = tg.load(model, sd)
    adapted = report.by_action("adapted")
    assert len(adapted) == 8 and all(e.target.endswith(TABLE) for e in adapted)
    assert adapted[0].source_shape == (169, 1) and adapted[0].target_shape == (529, 1)
    assert "from=7x7 (assumed square)" in adapted[0].reason and "to=12x12" in adapted[0].reason
    assert report.loaded_fraction == 1.0 and not report.by_action("skipped")
    assert_tables(model, timm_tables(model, sd))  # bit-identical: max abs diff 0
    via_timm = swin(img_size=384, window_size=12)  # timm's pretrained path: checkpoint_filter_fn
    tg.load(via_timm, sd, filter="timm")
    assert_tables(model, {k: v for k, v in via_timm.state_dict().items() if k.endswith(TABLE)})
    src.set_input_size(img_size=384, window_size=12)  # timm's own runtime resize, same model
    x = torch.rand(1, 3, 384, 384)
    with torch.no_grad():
        assert torch.allclose(model(x), src(x), atol=1e-5)


def test_bicubic_mode_is_timms_simple_resize() -> None:
    from timm.layers.pos_embed_rel import resize_rel_pos_bias_table_simple

    sd = swin().state_dict()
    model = swin(img_size=384, window_size=12)
    report = tg.load(model, sd, adapt={"rel_pos_table": {"mode": "bicubic"}})
    assert all("mode=bicubic" in e.reason for e in report.by_action("adapted"))
    assert_tables(model, {k: resize_rel_pos_bias_table_simple(sd[k], (12, 12), v.shape)
                          for k, v in model.state_dict().items() if k.endswith(TABLE)})
    with pytest.raises(tg.OptionError, match="mode="):
        tg.load(model, sd, adapt={"rel_pos_table": {"mode": "nearest"}})


@pytest.mark.parametrize("shared", [False, True])
def test_timm_beit_window_change_keeps_the_three_class_rows(shared: bool) -> None:
    kw = dict(embed_dim=32, depth=2, num_heads=2, use_shared_rel_pos_bias=shared,
              use_rel_pos_bias=not shared)
    torch.manual_seed(0)
    src = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=64, **kw)
    sd = src.state_dict()
    model = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=96, **kw)
    report = tg.load(model, sd)
    adapted = report.by_action("adapted")
    assert len(adapted) == (1 if shared else 2) and report.loaded_fraction == 1.0
    assert adapted[0].source_shape == (7 * 7 + 3, 2) and adapted[0].target_shape == (11 * 11 + 3, 2)
    assert "extra_rows=3" in adapted[0].reason
    assert_tables(model, timm_tables(model, sd))
    for e in adapted:  # the class-token rows are the checkpoint's, unchanged
        assert torch.equal(model.state_dict()[e.target][-3:], sd[e.source][-3:])
    via_timm = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=96, **kw)
    tg.load(via_timm, sd, filter="timm")
    assert_tables(model, {k: v for k, v in via_timm.state_dict().items() if k.endswith(TABLE)})


def test_transformers_swin_and_beit_tables_resized() -> None:
    tf = pytest.importorskip("transformers")

    def hf_swin(window: int, size: int) -> torch.nn.Module:
        return tf.SwinModel(tf.SwinConfig(image_size=size, embed_dim=16, depths=[1, 1],
                                          num_heads=[1, 2], window_size=window))

    sd = hf_swin(7, 224).state_dict()
    model = hf_swin(12, 384)
    index = {k: v.clone() for k, v in model.named_buffers() if "relative_position_index" in k}
    report = tg.load(model, sd)
    assert len(report.by_action("adapted")) == 2 and report.loaded_fraction == 1.0
    assert_tables(model, timm_tables(model, sd))
    assert index and all(torch.equal(dict(model.named_buffers())[k], v) for k, v in index.items())

    def hf_beit(size: int) -> torch.nn.Module:
        return tf.BeitModel(tf.BeitConfig(image_size=size, patch_size=16, hidden_size=32,
                                          num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, use_relative_position_bias=True))

    sd = hf_beit(64).state_dict()
    model = hf_beit(96)
    report = tg.load(model, sd)
    assert [e.target_shape for e in report.by_action("adapted")] == [(124, 2)] * 2
    assert_tables(model, timm_tables(model, sd))


def test_mmpretrain_swin_persistent_index_is_kept() -> None:
    mm = pytest.importorskip("mmpretrain.models.backbones")
    arch = dict(embed_dims=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1])
    sd = mm.SwinTransformer(arch=arch, img_size=224, window_size=7).state_dict()
    model = mm.SwinTransformer(arch=arch, img_size=384, window_size=12)
    own = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_index")}
    # hooks=False: mmpretrain's own load hook resizes with scipy (not a dependency here)
    report = tg.load(model, sd, hooks=False)
    kept = report.by_action("kept")
    assert sorted(e.target for e in kept) == sorted(own) and len(own) == 4
    assert all("built by the model for window 12x12" in e.reason for e in kept)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in own.items())
    assert_tables(model, timm_tables(model, sd))


def test_swin_v2_window_8_to_16_loads_the_mlp_and_keeps_the_buffers() -> None:
    kw = dict(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
    src = timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=128, **kw)
    model = timm.create_model("swinv2_tiny_window8_256", pretrained=False, img_size=256,
                              window_size=16, pretrained_window_sizes=(8,) * 4, **kw)
    report = tg.load(model, src.state_dict())  # timm: coords and index are not in the state
    assert report.loaded_fraction == 1.0 and not report.by_action("adapted")
    sd = src.state_dict()
    assert any("cpb_mlp" in k for k in sd)
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())  # mlp unchanged
    mm = pytest.importorskip("mmpretrain.models.backbones")
    arch = dict(embed_dims=32, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                extra_norm_every_n_blocks=0)
    sd = mm.SwinTransformerV2(arch=arch, img_size=128, window_size=8).state_dict()
    model = mm.SwinTransformerV2(arch=arch, img_size=256, window_size=16,
                                 pretrained_window_sizes=[8] * 4)
    own = {k: v.clone() for k, v in model.state_dict().items()
           if k.endswith(("_index", "coords_table"))}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = tg.load(model, sd, hooks=False)  # mmpretrain: persistent buffers, kept
    assert sorted(e.target for e in report.by_action("kept")) == sorted(own) and len(own) == 8
    assert all(torch.equal(model.state_dict()[k], v) for k, v in own.items())
    mlp = [k for k in sd if "cpb_mlp" in k]
    assert mlp and all(torch.equal(model.state_dict()[k], sd[k]) for k in mlp)


def test_rectangular_source_window_refused_before_any_write_then_decided() -> None:
    sd = swin(img_size=(192, 256), window_size=(6, 8)).state_dict()  # 11*15 = 165 rows
    model = swin(img_size=384, window_size=12)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tg.AmbiguousAdapterError, match=r"source_window.*\(h, w\)"):
        tg.load(model, sd)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    expected = timm_tables(model, sd, old=(6, 8))
    tg.load(model, sd, adapt={"rel_pos_table": {"source_window": (6, 8)}})
    assert_tables(model, expected)
    other = swin(img_size=384, window_size=12)
    report = tg.load(other, sd, adapt={k: {"source_window": (6, 8)} for k in expected})
    assert_tables(other, expected)
    assert all("from=6x8," in e.reason for e in report.by_action("adapted"))
    with pytest.raises(tg.OptionError, match="165"):
        tg.load(other, sd, adapt={"rel_pos_table": {"source_window": (7, 7)}})
    with pytest.raises(tg.OptionError, match="source_window"):
        tg.load(other, sd, adapt={"rel_pos_table": {"source_window": "big"}})


def test_adapt_false_restores_the_shape_error_and_same_window_adapts_nothing() -> None:
    src = swin()
    model = swin(img_size=384, window_size=12)
    for adapt in (False, {"rel_pos_table": False}):
        with pytest.raises(tg.ShapeMismatchError, match=TABLE):
            tg.load(model, src.state_dict(), adapt=adapt)
    same = swin(img_size=224)
    report = tg.load(same, src.state_dict())
    assert not report.by_action("adapted") and report.loaded_fraction == 1.0
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(same(x), src(x))


def test_op_is_lazy_float32_inside_and_keeps_the_dtype() -> None:
    table = torch.randn(13 * 13 + 3, 4, dtype=torch.bfloat16)
    ref = TransformRef(MemoryRef(table), [resize_rel_pos_table((7, 7), (10, 10), extra=3)])
    assert ref.shape == (19 * 19 + 3, 4) and ref.dtype == torch.bfloat16
    expected = resize_rel_pos_bias_table(table, new_window_size=(10, 10),
                                         new_bias_shape=(19 * 19 + 3, 4))
    assert torch.equal(ref.materialize(), expected)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(old=st.integers(1, 9), new=st.tuples(st.integers(1, 9), st.integers(1, 9)),
       extra=st.sampled_from([0, 3]), heads=st.integers(1, 3))
def test_square_sources_match_timm_any_target(old: int, new: tuple, extra: int,
                                              heads: int) -> None:
    """Any square checkpoint window to any model window: bit-identical to timm; a row count
    that is no (2W-1)^2 square is refused, never guessed."""
    rows = (2 * old - 1) ** 2 + extra
    dst = ((2 * new[0] - 1) * (2 * new[1] - 1) + extra, heads)
    if rows == dst[0]:
        return  # shapes fit: no adapter is asked
    role = Role("rel_pos_table", (("window", new), ("extra_rows", extra)))
    table = torch.randn(rows, heads)
    ops = RelPosTable().propose("t", role, (rows, heads), dst)
    got = TransformRef(MemoryRef(table), ops).materialize()
    assert torch.equal(got, resize_rel_pos_bias_table(table, new_window_size=new,
                                                      new_bias_shape=dst))
    with pytest.raises(tg.AmbiguousAdapterError, match="source_window"):
        RelPosTable().propose("t", role, (rows + 1, heads), dst)


def test_tensor_parameters_go_to_the_adapters_that_take_them() -> None:
    """``{tensor: {parameters}}`` configures the adapters that take them (here rel_pos_table,
    not input_channels); parameters no adapter takes are an error."""
    sd = swin().state_dict()
    model = swin(img_size=384, window_size=12)
    key = f"layers.0.blocks.0.attn.{TABLE}"
    with pytest.raises(tg.OptionError, match="'rel_pos_table', the adapter that handles"):
        tg.load(model, sd, adapt={key: {"source_grid": (7, 7)}})  # position_embedding's
    with pytest.raises(tg.OptionError, match="none of the adapters"):
        tg.load(model, sd, adapt={key: {"no_such_parameter": 1}})
    with pytest.raises(tg.OptionError, match="does not take"):
        tg.load(model, sd, adapt={key: {"adapter": "rel_pos_table", "window": 7}})
    report = tg.load(model, sd, adapt={key: {"mode": "bicubic"}})
    modes = {e.target: e.reason.split("mode=")[1] for e in report.by_action("adapted")}
    assert modes.pop(key).startswith("bicubic") and all(m.startswith("geometric")
                                                        for m in modes.values())


class _Windowed(torch.nn.Module):
    """A Swin-style window attention whose index buffer is persistent (as in mmpretrain)."""

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window_size = (window, window)
        self.relative_position_bias_table = torch.nn.Parameter(
            torch.randn((2 * window - 1) ** 2, 2))
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window),
                                            indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("relative_position_index", rel[..., 0] * (2 * window - 1)
                             + rel[..., 1])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(src=st.integers(1, 6), dst=st.integers(1, 6), other=st.lists(st.integers(1, 40),
                                                                  min_size=1, max_size=3))
def test_index_buffer_kept_only_when_both_sides_are_window_built(src, dst, other) -> None:
    """The model keeps its own index only when the file's tensor is an index too (of some
    window); any other tensor in its place stays a shape error."""
    sd = dict(_Windowed(src).state_dict())
    model = _Windowed(dst)
    built = model.relative_position_index.clone()
    if src != dst:
        report = tg.load(model, sd)
        assert [e.target for e in report.by_action("kept")] == ["relative_position_index"]
        assert torch.equal(model.relative_position_index, built)
    sd["relative_position_index"] = torch.zeros(other, dtype=torch.long)
    square = (len(other) == 2 and other[0] == other[1]) or (
        len(other) == 1 and math.isqrt(other[0]) ** 2 == other[0])
    if tuple(other) == tuple(built.shape):
        return  # fits as is: copied, no adapter asked
    if square:
        assert tg.load(model, sd).by_action("kept")
    else:
        with pytest.raises(tg.ShapeMismatchError, match="relative_position_index"):
            tg.load(model, sd)
    assert torch.equal(model.relative_position_index, built)
