"""The position_embedding adapter on every layout it claims (timm, transformers, mmpretrain),
against the frameworks' own resampling functions."""

from __future__ import annotations

import pytest
import torch

import torchgraft as tg
from torchgraft.adapters.position import PositionEmbedding, resample_grid
from torchgraft.transforms import Role

timm = pytest.importorskip("timm")
tf = pytest.importorskip("transformers")
F = torch.nn.functional
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)


def hf(kind: str, size, seed: int = 0, patch: int = 16):
    models = {"vit": (tf.ViTModel, tf.ViTConfig, {}), "deit": (tf.DeiTModel, tf.DeiTConfig, {}),
              "clip": (tf.CLIPVisionModel, tf.CLIPVisionConfig, {}),
              "siglip": (tf.SiglipVisionModel, tf.SiglipVisionConfig, {}),
              "dinov2": (tf.Dinov2Model, tf.Dinov2Config, {}),
              "dinov2_reg": (tf.Dinov2WithRegistersModel, tf.Dinov2WithRegistersConfig, {}),
              "beit": (tf.BeitModel, tf.BeitConfig, {"use_absolute_position_embeddings": True,
                                                     "use_relative_position_bias": False}),
              "data2vec": (tf.Data2VecVisionModel, tf.Data2VecVisionConfig,
                           {"use_absolute_position_embeddings": True,
                            "use_relative_position_bias": False})}
    cls, config, extra = models[kind]
    torch.manual_seed(seed)
    return cls(config(**SMALL, **extra, image_size=size, patch_size=patch)).eval()


def stored(model) -> tuple[str, torch.Tensor]:
    emb = model.embeddings
    if isinstance(getattr(emb, "position_embedding", None), torch.nn.Embedding):
        return "embeddings.position_embedding.weight", emb.position_embedding.weight.detach()
    return "embeddings.position_embeddings", emb.position_embeddings.detach()


@pytest.mark.parametrize("kind,prefix,own", [
    ("vit", 1, False), ("deit", 2, False), ("beit", 1, False), ("data2vec", 1, False),
    ("clip", 1, False), ("siglip", 0, False), ("dinov2", 1, False), ("dinov2_reg", 1, True)])
def test_transformers_roles_match_their_interpolate_pos_encoding(kind: str, prefix: int,
                                                                 own: bool) -> None:
    """transformers' own interpolate_pos_encoding is bicubic, align_corners=False, without
    antialias (``own``: Dinov2-with-registers with it): with that ``antialias`` the adapter
    computes exactly it; the other choice differs only in the grid, by at most 20% of the
    embedding's range (measured: ~9% when upsampling)."""
    patch = 14 if kind.startswith("dinov2") else 16
    src, model = hf(kind, 224, 0, patch), hf(kind, 384 if patch == 16 else 280, 1, patch)
    name = stored(src)[0]
    with torch.no_grad():
        src.get_parameter(name).normal_(std=0.02)  # some inits are zeros
    before = stored(src)[1]
    new = model.config.image_size // patch
    rows = name.endswith(".weight")
    with torch.no_grad():
        expected = src.embeddings.interpolate_pos_encoding(
            torch.zeros(1, prefix + new * new, 32), new * patch, new * patch)
    expected = expected[0] if rows else expected
    report = tg.load(model, src.state_dict())  # the default is the framework's own choice
    assert torch.equal(stored(model)[1], expected)
    (entry,) = report.by_action("adapted")
    assert entry.target == name and f"prefix_tokens={prefix}" in entry.reason
    assert "assumed square" in entry.reason and f"to={new}x{new}" in entry.reason
    other = hf(kind, model.config.image_size, 1, patch)
    tg.load(other, src.state_dict(), adapt={name: {"antialias": not own}})
    diff = (stored(other)[1] - expected).abs().max() / before.abs().max()
    assert 0 < diff < 0.2
    head = (lambda t: t[:prefix]) if rows else (lambda t: t[:, :prefix])
    assert torch.equal(head(stored(other)[1]), head(before))  # prefix tokens kept


def test_vit_at_384_computes_what_vit_224_interpolating_computes() -> None:
    src, model = hf("vit", 224), hf("vit", 384, 1)
    tg.load(model, src.state_dict())  # transformers' own choice (no antialias) by default
    x = torch.rand(2, 3, 384, 384)
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state,
                           src(x, interpolate_pos_encoding=True).last_hidden_state)


def test_rectangular_transformers_target_grid() -> None:
    src, model = hf("vit", 224), hf("vit", (224, 320), 1)
    tg.load(model, src.state_dict())
    with torch.no_grad():
        expected = src.embeddings.interpolate_pos_encoding(torch.zeros(1, 281, 32), 224, 320)
    assert torch.equal(model.embeddings.position_embeddings, expected)


def test_dinov2_built_for_another_image_size() -> None:
    """Dinov2 interpolates at run time anyway; a model built at 224 from a 518 checkpoint gets
    the grid resampled once at load, and (antialias=False, Dinov2's own choice) then computes
    exactly what the 518 model computes on a 224 image."""
    src, model = hf("dinov2", 518, 0, 14), hf("dinov2", 224, 1, 14)
    report = tg.load(model, src.state_dict())
    assert model.embeddings.position_embeddings.shape == (1, 257, 32)
    assert "from=37x37 (assumed square)" in report.by_action("adapted")[0].reason
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, src(x).last_hidden_state)


def test_clip_position_ids_kept_as_built() -> None:
    """transformers < 4.31 saved CLIP's position_ids; a persistent [1, N] index of the old grid
    is kept as the model built it (a non-persistent one: the checkpoint's is unexpected)."""
    src, model = hf("clip", 224), hf("clip", 384, 1)
    sd = dict(src.state_dict())
    sd["embeddings.position_ids"] = torch.arange(197)[None]
    report = tg.load(model, sd)
    assert [e.source for e in report.by_action("unexpected")] == ["embeddings.position_ids"]
    model.embeddings._non_persistent_buffers_set.discard("position_ids")
    report = tg.load(model, sd)
    assert [e.target for e in report.by_action("kept")] == ["embeddings.position_ids"]
    assert torch.equal(model.embeddings.position_ids, torch.arange(577)[None])
    assert [e.target for e in report.by_action("adapted")] == [
        "embeddings.position_embedding.weight"]


def test_no_role_without_a_grid_layout() -> None:
    from torchgraft.rules import model_rules

    yolos = tf.YolosModel(tf.YolosConfig(**SMALL, image_size=[64, 64], patch_size=16))
    assert not [r for r in model_rules(yolos, True).roles().values()
                if getattr(r, "kind", r) == "pos_embed"]  # detection tokens after the grid
    beit = tf.BeitModel(tf.BeitConfig(**SMALL, image_size=64, patch_size=16))
    assert "embeddings.position_embeddings" not in model_rules(beit, True).roles()


# --- timm: ambiguous grids, parameters, 2-D storage ------------------------------------------

def test_non_square_source_names_the_option_and_the_option_decides() -> None:
    from timm.layers import resample_abs_pos_embed

    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(224, 320))
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=384)
    before = model.pos_embed.detach().clone()
    with pytest.raises(tg.AmbiguousAdapterError) as err:
        tg.load(model, src.state_dict())
    assert 'adapt={"pos_embed": {"source_grid": (h, w)}}' in str(err.value)
    assert "14x20" in str(err.value) and torch.equal(model.pos_embed, before)
    pe = src.pos_embed.detach()
    for adapt in ({"pos_embed": {"source_grid": (14, 20)}},
                  {"position_embedding": {"source_grid": [14, 20]}}):
        report = tg.load(model, src.state_dict(), adapt=adapt)
        assert torch.equal(model.pos_embed, resample_abs_pos_embed(pe, [24, 24], [14, 20], 1))
        assert "from=14x20 (given)" in report.by_action("adapted")[0].reason
    report = tg.load(model, src.state_dict(), adapt={"pos_embed": {
        "source_grid": (14, 20), "mode": "bilinear", "antialias": False}})
    assert torch.equal(model.pos_embed, resample_abs_pos_embed(
        pe, [24, 24], [14, 20], 1, interpolation="bilinear", antialias=False))
    assert "mode=bilinear" in report.by_action("adapted")[0].reason
    for bad, match in (({"source_grid": (13, 20)}, "280 grid positions"),
                       ({"source_grid": (14,)}, "height, width"), ({"mode": "nearest"}, "mode"),
                       ({"antialias": "yes"}, "antialias"), ({"grid": 3}, "none of the adapters")):
        with pytest.raises(tg.OptionError, match=match):
            tg.load(model, src.state_dict(), adapt={"pos_embed": bad})
    assert torch.equal(model.pos_embed, resample_abs_pos_embed(
        pe, [24, 24], [14, 20], 1, interpolation="bilinear", antialias=False))


def test_samvit_nhwc_matches_timm() -> None:
    from timm.layers import resample_abs_pos_embed_nhwc

    kw = dict(embed_dim=32, depth=1, num_heads=2, use_rel_pos=False)
    src = timm.create_model("samvit_base_patch16", pretrained=False, img_size=128, **kw)
    model = timm.create_model("samvit_base_patch16", pretrained=False, img_size=192, **kw)
    report = tg.load(model, src.state_dict())
    assert model.pos_embed.shape == (1, 12, 12, 32)
    assert torch.equal(model.pos_embed, resample_abs_pos_embed_nhwc(src.pos_embed, [12, 12]))
    (entry,) = report.by_action("adapted")
    assert "from=8x8," in entry.reason and "layout=nhwc" in entry.reason


def test_hiera_tokens_and_abswin_nchw_match_timm() -> None:
    from timm.layers import resample_abs_pos_embed, resample_abs_pos_embed_nhwc

    kw = dict(embed_dim=16, stages=(1, 1, 1, 1))
    src = timm.create_model("hiera_tiny_224", pretrained=False, **kw)
    model = timm.create_model("hiera_tiny_224", pretrained=False, img_size=256, **kw)
    tg.load(model, src.state_dict())
    assert torch.equal(model.pos_embed, resample_abs_pos_embed(src.pos_embed, [64, 64],
                                                               num_prefix_tokens=0))
    src = timm.create_model("hiera_small_abswin_256", pretrained=False, **kw)
    model = timm.create_model("hiera_small_abswin_256", pretrained=False,
                              global_pos_size=(20, 12), **kw)
    report = tg.load(model, src.state_dict())
    nhwc = resample_abs_pos_embed_nhwc(src.pos_embed.permute(0, 2, 3, 1), [20, 12])
    assert torch.equal(model.pos_embed, nhwc.permute(0, 3, 1, 2))
    assert "layout=nchw" in report.by_action("adapted")[0].reason


def test_mmpretrain_resize_pos_embed_is_the_no_antialias_choice() -> None:
    mm = pytest.importorskip("mmpretrain.models.utils")
    pe = torch.randn(1, 1 + 14 * 20, 24, dtype=torch.bfloat16)
    for mode in ("bicubic", "bilinear"):
        ours = resample_grid((14, 20), (24, 24), 1, mode, antialias=False, source="given")
        assert torch.equal(ours.fn(pe), mm.resize_pos_embed(pe, (14, 20), (24, 24), mode, 1))
    default = resample_grid((14, 20), (24, 24), 1).fn(pe.float())
    ref = mm.resize_pos_embed(pe.float(), (14, 20), (24, 24), "bicubic", 1)
    assert 0 < (default - ref).abs().max() < 0.2 * pe.float().abs().max()


def test_rows_layout_in_bfloat16() -> None:
    w = torch.randn(1 + 16, 8, dtype=torch.bfloat16)
    role = Role("pos_embed", (("grid", (3, 5)), ("prefix_tokens", 1), ("layout", "rows")))
    (op,) = PositionEmbedding().propose("w", role, (17, 8), (16, 8))
    got = op.fn(w)
    assert got.dtype == torch.bfloat16 and torch.equal(got[0], w[0])
    ref = F.interpolate(w[1:].float().reshape(1, 4, 4, 8).permute(0, 3, 1, 2), size=(3, 5),
                        mode="bicubic", antialias=True)
    assert torch.equal(got[1:], ref.permute(0, 2, 3, 1).reshape(15, 8).to(torch.bfloat16))


def test_vit_224_at_384_classifies_the_upsampled_image_alike() -> None:
    """Random init: the position embedding is made smooth and large (0.5, as trained ones are
    relative to the patch tokens; at timm's init scale 0.02 positions barely change the output
    and this test would say nothing). Logits are centred over the batch (a random network's
    logits share a large constant part). The resampled model must agree with the 224 model on
    smooth images shown at 384 (measured: cosine 0.996, top-1 97%), clearly better than the
    same model with its positions shuffled (cosine 0.914, top-1 81%)."""
    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10).eval()
    torch.nn.init.normal_(src.head.weight)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 14), torch.linspace(0, 1, 14), indexing="ij")
    freq, phase = torch.rand(192, 2) * 2, torch.rand(192) * 6.28
    wave = torch.sin(6.2832 * (freq[:, :1, None] * yy + freq[:, 1:, None] * xx) + phase[:, None, None])
    with torch.no_grad():
        src.pos_embed[0, 1:] = wave.permute(1, 2, 0).reshape(196, 192) * 0.5
    x = torch.rand(64, 3, 7, 7)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                              img_size=384).eval()
    tg.load(model, src.state_dict())
    shuffled = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                                 img_size=384).eval()
    order = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(576)])
    shuffled.load_state_dict({**src.state_dict(), "pos_embed": model.pos_embed[:, order]})
    with torch.no_grad():
        ref = src(F.interpolate(x, size=224, mode="bilinear"))
        big = F.interpolate(x, size=384, mode="bilinear")
        ours, control = model(big), shuffled(big)

    def agree(a: torch.Tensor) -> tuple[float, float]:
        a, b = a - a.mean(0), ref - ref.mean(0)
        return (float(F.cosine_similarity(a, b).mean()),
                float((a.argmax(1) == b.argmax(1)).float().mean()))

    (cos, top1), (cos_c, top1_c) = agree(ours), agree(control)
    assert cos > 0.99 and top1 >= 0.9
    assert cos > cos_c + 0.03 and top1 > top1_c
