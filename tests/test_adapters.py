"""The transform step and the first adapter (input channels), against timm's own function."""

from __future__ import annotations

import pytest
import torch

import torchgraft as tg
from torchgraft.tensors import MemoryRef
from torchgraft.transforms import TransformRef, adapt_channels, registered_adapters

timm = pytest.importorskip("timm")


@pytest.mark.parametrize("chans", [1, 2, 4, 7])
def test_input_channels_match_timm_adapt_input_conv(chans: int) -> None:
    from timm.models import adapt_input_conv

    src = timm.create_model("resnet18", pretrained=False)
    model = timm.create_model("resnet18", pretrained=False, in_chans=chans)
    report = tg.load(model, src.state_dict())
    assert torch.equal(model.conv1.weight.detach(), adapt_input_conv(chans,
                                                                     src.conv1.weight.detach()))
    (entry,) = report.by_action("adapted")
    assert entry.target == "conv1.weight" and entry.source_shape == (64, 3, 7, 7)
    assert entry.target_shape == (64, chans, 7, 7) and "input_channels" in entry.reason
    assert report.loaded_fraction == 1.0 and "adapted (1):" in str(report)


def test_grey_model_sees_what_the_rgb_model_sees_on_a_grey_image() -> None:
    src = timm.create_model("resnet18", pretrained=False).eval()
    grey = timm.create_model("resnet18", pretrained=False, in_chans=1).eval()
    tg.load(grey, src.state_dict())
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.allclose(grey(x), src(x.expand(-1, 3, -1, -1)), atol=1e-4)


def test_structural_role_without_framework_metadata() -> None:
    torchvision = pytest.importorskip("torchvision")
    src = torchvision.models.resnet18()
    model = torchvision.models.resnet18()
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    report = tg.load(model, src.state_dict())
    assert torch.equal(model.conv1.weight, src.conv1.weight.sum(1, keepdim=True))
    assert [e.target for e in report.by_action("adapted")] == ["conv1.weight"]


def test_only_the_input_layer_is_adapted_and_adapt_false_restores_errors() -> None:
    src = timm.create_model("resnet18", pretrained=False)
    sd = dict(src.state_dict())
    sd["layer1.0.conv1.weight"] = torch.randn(64, 32, 3, 3)  # an inner conv of another width
    with pytest.raises(tg.ShapeMismatchError, match="layer1.0.conv1.weight"):
        tg.load(timm.create_model("resnet18", pretrained=False), sd)
    model = timm.create_model("resnet18", pretrained=False, in_chans=1)
    before = model.conv1.weight.detach().clone()
    with pytest.raises(tg.ShapeMismatchError, match="conv1.weight"):
        tg.load(model, src.state_dict(), adapt=False)
    assert torch.equal(model.conv1.weight, before)
    with pytest.raises(tg.OptionError, match="adapt="):
        tg.load(model, src.state_dict(), adapt="yes")


def test_transform_ref_is_lazy_and_typed() -> None:
    w = torch.randn(8, 3, 3, 3, dtype=torch.bfloat16)
    ref = TransformRef(MemoryRef(w), [adapt_channels(3, 1)], "input_channels")
    assert ref.shape == (8, 1, 3, 3) and ref.dtype == torch.bfloat16
    expected = w.float().sum(1, keepdim=True).to(torch.bfloat16)  # computed in float32
    assert torch.equal(ref.materialize(), expected)
    assert "input_channels" in [a.name for a in registered_adapters()]


def test_labels_subset_offset_and_permutation_give_those_logits() -> None:
    src = timm.create_model("resnet18", pretrained=False).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        logits = src(x)
    cases = [([3, 17, 250, 999, 0, 5, 6, 7, 8, 9], 10), (1, 999),
             (list(reversed(range(1000))), 1000)]
    for labels, n in cases:
        model = timm.create_model("resnet18", pretrained=False, num_classes=n).eval()
        report = tg.load(model, src.state_dict(), labels=labels)
        rows = list(range(1, 1000)) if labels == 1 else labels
        assert torch.equal(model.fc.weight, src.fc.weight[rows])  # exactly those rows
        assert torch.equal(model.fc.bias, src.fc.bias[rows])
        with torch.no_grad():  # the same logits (up to GEMM blocking of a smaller matrix)
            assert torch.allclose(model(x), logits[:, rows], atol=1e-5)
        assert sorted(e.target for e in report.by_action("adapted")) == ["fc.bias", "fc.weight"]


def test_bad_labels_are_errors_before_any_write() -> None:
    src = timm.create_model("resnet18", pretrained=False)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10)
    before = model.fc.weight.detach().clone()
    for labels, match in (([1, 2], "10 classes"), ([1000] * 10, "outside"), (995, "offset"),
                          ("cats", "labels=")):
        with pytest.raises(tg.OptionError, match=match):
            tg.load(model, src.state_dict(), labels=labels)
    assert torch.equal(model.fc.weight, before)
    with pytest.raises(tg.OptionError, match="classifier"):
        tg.load(torch.nn.Sequential(torch.nn.Linear(4, 2)),
                torch.nn.Sequential(torch.nn.Linear(4, 5)).state_dict(), labels=[0, 1])


@pytest.mark.parametrize("kwargs,grid,prefix", [
    ({"img_size": 384}, (24, 24), 1),
    ({"img_size": (224, 320)}, (14, 20), 1),
    ({"img_size": 256, "reg_tokens": 4, "no_embed_class": True}, (16, 16), 0),
    ({"img_size": 288, "class_token": False, "global_pool": "avg"}, (18, 18), 0),
])
def test_position_embedding_matches_timm_resample(kwargs: dict, grid: tuple, prefix: int) -> None:
    from timm.layers import resample_abs_pos_embed

    base = {k: v for k, v in kwargs.items() if k != "img_size"}
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, **base)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    report = tg.load(model, src.state_dict())
    expected = resample_abs_pos_embed(src.pos_embed.detach(), new_size=grid,
                                      num_prefix_tokens=prefix)
    assert torch.equal(model.pos_embed.detach(), expected)
    (entry,) = report.by_action("adapted")
    assert entry.target == "pos_embed" and entry.target_shape == tuple(expected.shape)
    assert f"to={grid[0]}x{grid[1]}" in entry.reason and f"prefix_tokens={prefix}" in entry.reason


def test_position_embedding_non_square_source_is_refused() -> None:
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(224, 320))
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=384)
    before = model.pos_embed.detach().clone()
    with pytest.raises(tg.AmbiguousAdapterError, match="source_grid"):
        tg.load(model, src.state_dict())
    assert torch.equal(model.pos_embed, before)
    with pytest.raises(tg.ShapeMismatchError, match="pos_embed"):
        tg.load(model, src.state_dict(), adapt=False)


def test_token_rows_only_when_asked_keep_rows_and_fill_new_ones() -> None:
    tf = pytest.importorskip("transformers")

    def bert(vocab: int, seed: int):
        torch.manual_seed(seed)
        return tf.BertModel(tf.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=64))

    sd = bert(100, 0).state_dict()
    old = sd["embeddings.word_embeddings.weight"]
    grown = bert(120, 1)
    own = grown.embeddings.word_embeddings.weight.detach().clone()
    with pytest.raises(tg.ShapeMismatchError, match="word_embeddings"):
        tg.load(grown, sd)  # not by default: the policy for vocabulary changes
    report = tg.load(grown, sd, adapt=["token_rows"])
    w = grown.embeddings.word_embeddings.weight
    assert torch.equal(w[:100], old) and torch.equal(w[100:], own[100:])
    (entry,) = report.by_action("adapted")
    assert entry.source_shape == (100, 32) and entry.target_shape == (120, 32)
    mean = bert(120, 2)
    tg.load(mean, sd, adapt=["token_rows_mean"])
    assert torch.allclose(mean.embeddings.word_embeddings.weight[100:],
                          old.mean(0, keepdim=True).expand(20, 32))
    shrunk = bert(80, 3)
    tg.load(shrunk, sd, adapt=["token_rows"])
    assert torch.equal(shrunk.embeddings.word_embeddings.weight, old[:80])


# --- property tests: every adapter guess recovers the truth or refuses ----------------------

import math  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from torchgraft.transforms import PositionEmbedding, Role  # noqa: E402


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(old=st.tuples(st.integers(1, 9), st.integers(1, 9)),
       new=st.tuples(st.integers(1, 9), st.integers(1, 9)), prefix=st.integers(0, 4))
def test_position_embedding_grid_is_recovered_or_refused(old, new, prefix) -> None:
    """The old grid is inferred from the token count under the documented assumption every
    framework makes (timm, mmpretrain, transformers): the pretrained grid is square. Square grids
    are resampled exactly as timm does; a count that is no square is refused, never guessed as a
    rectangle. (A rectangular grid whose count happens to be square, e.g. 1x4, cannot be told
    apart from the file: the report says "assumed square".)"""
    from timm.layers import resample_abs_pos_embed

    if old[0] != old[1] and math.isqrt(old[0] * old[1]) ** 2 == old[0] * old[1]:
        old = (math.isqrt(old[0] * old[1]),) * 2  # indistinguishable: the assumption applies
    pe = torch.randn(1, prefix + old[0] * old[1], 8)
    role = Role("pos_embed", (("grid", new), ("prefix_tokens", prefix)))
    dst = (1, prefix + new[0] * new[1], 8)
    if tuple(pe.shape) == dst:
        return  # shapes fit: no adapter is asked
    try:
        ops = PositionEmbedding().propose("pos_embed", role, tuple(pe.shape), dst)
    except tg.UnsupportedTargetError:
        assert old[0] != old[1]  # refused only when the source grid is not square
        return
    assert old[0] == old[1] and ops is not None and "assumed square" in ops[0].describe()
    got = TransformRef(MemoryRef(pe), ops).materialize()
    assert torch.equal(got, resample_abs_pos_embed(pe, new_size=list(new),
                                                   num_prefix_tokens=prefix))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(widths=st.lists(st.integers(2, 6), min_size=2, max_size=4), which=st.integers(0, 3),
       chans=st.integers(1, 5))
def test_only_the_input_convolution_is_adapted(widths, which, chans) -> None:
    """A conv stack whose checkpoint differs in the input channels of one conv: the first conv
    is adapted (its sum/repeat rule), any other conv is a refused shape mismatch."""
    which %= len(widths)

    def stack(ins: list[int]) -> torch.nn.Sequential:
        return torch.nn.Sequential(*[torch.nn.Conv2d(i, o, 3) for i, o in zip(ins, widths)])

    ins = [3] + widths[:-1]
    src = stack(ins)
    changed = list(ins)
    changed[which] = chans if chans != ins[which] else ins[which] + 1
    model = stack(changed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if which == 0:
        report = tg.load(model, src.state_dict())
        assert [e.target for e in report.by_action("adapted")] == ["0.weight"]
        expected = adapt_channels(3, changed[0]).fn(src[0].weight.detach())
        assert torch.equal(model[0].weight, expected)
    else:
        with pytest.raises(tg.ShapeMismatchError, match=f"{which}.weight"):
            tg.load(model, src.state_dict())
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
