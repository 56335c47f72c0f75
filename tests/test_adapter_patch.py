"""``patch_embed``: a patch-embedding kernel resampled to a new patch size (FlexiViT), against
timm's own ``resample_patch_embed`` / ``checkpoint_filter_fn``, and FlexiViT's token equality."""

from __future__ import annotations

import pytest
import torch

import torchgraft as tg
from torchgraft.adapters.patch import resample_patch, resize_matrix

timm = pytest.importorskip("timm")


def _vit(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)


@pytest.mark.parametrize("patch,grid", [(8, 28), (32, 7), (14, 16)])
def test_timm_vit_patch_size_kernel_and_pos_embed_match_timm(patch: int, grid: int) -> None:
    from timm.layers import resample_abs_pos_embed, resample_patch_embed
    from timm.models.vision_transformer import checkpoint_filter_fn

    src, model = _vit(), _vit(patch_size=patch)
    report = tg.load(model, src.state_dict())
    kernel = resample_patch_embed(src.patch_embed.proj.weight.detach(), [patch, patch])
    pos = resample_abs_pos_embed(src.pos_embed.detach(), new_size=(grid, grid))
    assert torch.allclose(model.patch_embed.proj.weight, kernel, rtol=0, atol=2e-6)
    assert torch.equal(model.pos_embed.detach(), pos)
    filtered = checkpoint_filter_fn(dict(src.state_dict()), model)  # timm's own conversion
    assert torch.allclose(model.patch_embed.proj.weight, filtered["patch_embed.proj.weight"],
                          rtol=0, atol=2e-6)
    assert torch.equal(model.pos_embed.detach(), filtered["pos_embed"])
    adapted = {e.target: e for e in report.by_action("adapted")}
    assert sorted(adapted) == ["patch_embed.proj.weight", "pos_embed"]
    entry = adapted["patch_embed.proj.weight"]
    assert entry.source_shape == (192, 3, 16, 16) and entry.target_shape == (192, 3, patch, patch)
    assert "patch_embed" in entry.reason and f"to={patch}x{patch}" in entry.reason
    assert f"to={grid}x{grid}" in adapted["pos_embed"].reason
    assert report.loaded_fraction == 1.0


@pytest.mark.parametrize("mode,antialias", [("bicubic", True), ("bilinear", False),
                                            ("bilinear", True), ("bicubic", False)])
@pytest.mark.parametrize("old,new", [((16, 16), (8, 8)), ((8, 8), (16, 16)), ((14, 16), (9, 24))])
def test_resample_matches_timm_for_every_mode(mode: str, antialias: bool, old, new) -> None:
    from timm.layers import resample_patch_embed

    w = torch.randn(24, 3, *old)
    ref = resample_patch_embed(w, list(new), interpolation=mode, antialias=antialias)
    ours = resample_patch(old, new, mode, antialias).fn(w)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 2e-5 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("mode,antialias", [("bilinear", False), ("bilinear", True),
                                            ("bicubic", True)])
def test_flexivit_token_equality_for_one_patch(mode: str, antialias: bool) -> None:
    """<x, w> == <resize(x), resample(w)> for a patch grown 8 -> 16 (exact: the resize is
    injective), and the least-squares normal equations when it shrinks 16 -> 8."""
    torch.manual_seed(1)
    w, x = torch.randn(64, 3, 8, 8, dtype=torch.float64), torch.randn(1, 3, 8, 8)
    big = torch.nn.functional.interpolate(x, size=(16, 16), mode=mode, antialias=antialias)
    w16 = resample_patch((8, 8), (16, 16), mode, antialias).fn(w.float())
    token = torch.einsum("oihw,ihw->o", w, x[0].double())
    token16 = torch.einsum("oihw,ihw->o", w16.double(), big[0].double())
    assert (token - token16).abs().max() <= 1e-4 * float(token.abs().max())
    # shrinking: B (B^T w' - w) = 0 per kernel plane (w' is the least-squares solution)
    w8 = resample_patch((16, 16), (8, 8), mode, antialias).fn(w16).double()
    b = torch.kron(resize_matrix(16, 8, mode, antialias),
                   resize_matrix(16, 8, mode, antialias)).double()  # [64, 256]
    residual = w8.reshape(64, 3, 64) @ b - w16.double().reshape(64, 3, 256)
    assert (residual @ b.T).abs().max() <= 1e-4 * float(w16.abs().max())


def test_resize_matrix_is_timms_two_d_matrix() -> None:
    from timm.layers.patch_embed import _compute_resize_matrix

    full = _compute_resize_matrix((14, 16), (9, 24), "bicubic", True, torch.device("cpu"))
    ours = torch.kron(resize_matrix(14, 9), resize_matrix(16, 24))
    assert torch.allclose(ours, full, rtol=0, atol=1e-6)


def test_patch_and_channels_together_chain_both_ops() -> None:
    from timm.layers import resample_patch_embed
    from timm.models import adapt_input_conv

    src, model = _vit(), _vit(patch_size=8, in_chans=1)
    report = tg.load(model, src.state_dict())
    expected = resample_patch_embed(adapt_input_conv(1, src.patch_embed.proj.weight.detach()),
                                    [8, 8])
    assert torch.allclose(model.patch_embed.proj.weight, expected, rtol=0, atol=2e-6)
    (entry,) = [e for e in report.by_action("adapted") if e.target == "patch_embed.proj.weight"]
    assert "adapt_channels(from=3, to=1" in entry.reason and "resample_patch" in entry.reason
    only_channels = tg.load(_vit(in_chans=2), src.state_dict())  # channels only: input_channels
    (entry,) = only_channels.by_action("adapted")
    assert entry.reason.startswith("input_channels")


def test_transformers_vit_patch_size_kernel() -> None:
    tf = pytest.importorskip("transformers")
    from timm.layers import resample_patch_embed

    def vit(patch: int, image: int):
        torch.manual_seed(0)
        return tf.ViTModel(tf.ViTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, patch_size=patch, image_size=image))

    src, model = vit(16, 224), vit(8, 112)  # the same 14x14 grid: only the kernel differs
    report = tg.load(model, src.state_dict())
    name = "embeddings.patch_embeddings.projection.weight"
    expected = resample_patch_embed(src.state_dict()[name], [8, 8])
    assert torch.allclose(model.state_dict()[name], expected, rtol=0, atol=2e-6)
    assert [e.target for e in report.by_action("adapted")] == [name]


def test_dtype_meta_and_not_a_patch_embedding() -> None:
    w = torch.randn(8, 3, 16, 16, dtype=torch.bfloat16)
    out = resample_patch((16, 16), (8, 8)).fn(w)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, resample_patch((16, 16), (8, 8)).fn(w.float()).to(torch.bfloat16))
    assert resample_patch((16, 16), (8, 8)).fn(w.to("meta")).shape == (8, 3, 8, 8)
    # a stem conv (kernel != stride) is no patch embedding: its kernel size stays an error
    src = timm.create_model("resnet18", pretrained=False)
    model = timm.create_model("resnet18", pretrained=False)
    model.conv1 = torch.nn.Conv2d(3, 64, 5, 2, 2, bias=False)
    with pytest.raises(tg.ShapeMismatchError, match="conv1.weight"):
        tg.load(model, src.state_dict())
    with pytest.raises(tg.ShapeMismatchError, match="patch_embed.proj.weight"):
        tg.load(_vit(patch_size=8), _vit().state_dict(), adapt={"patch_embed": False,
                                                                "pos_embed": False})


def test_configured_mode_and_bad_mode() -> None:
    from timm.layers import resample_patch_embed

    src, model = _vit(), _vit(patch_size=8)
    report = tg.load(model, src.state_dict(), adapt={"patch_embed": {"mode": "bilinear",
                                                                     "antialias": False}})
    expected = resample_patch_embed(src.patch_embed.proj.weight.detach(), [8, 8],
                                    interpolation="bilinear", antialias=False)
    assert torch.allclose(model.patch_embed.proj.weight, expected, rtol=0, atol=2e-6)
    assert any("mode=bilinear" in e.reason for e in report.by_action("adapted"))
    with pytest.raises(tg.OptionError, match="patch_embed"):
        tg.load(model, src.state_dict(), adapt={"patch_embed": {"mode": "nearest"}})
