"""The core pipeline on real models and real file formats (issue: core load)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file, save_model

import torchgraft as tg
from tests import realmodels as rm


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: torch.nn.Module, snap: dict[str, torch.Tensor]) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, snap[k]), f"{k} changed"


def assert_loaded(model: torch.nn.Module, sd: dict[str, torch.Tensor],
                  skip: tuple[str, ...] = ()) -> None:
    for k, v in model.state_dict().items():
        if k in skip:
            continue
        assert torch.equal(v, sd[k].to(v.dtype)), f"{k} differs"


@pytest.fixture(scope="module")
def convnext_pair():
    src = rm.timm_model("convnext_tiny")
    torch.manual_seed(123)
    dst = rm.timm_model("convnext_tiny")
    with torch.no_grad():
        for p in dst.parameters():
            p.add_(1.0)
    return src, dst


def fresh(model: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(-1.0)
    return m


# --- containers ----------------------------------------------------------------------------


@pytest.mark.parametrize("layout,expected", [
    ("wrapped", "state_dict"), ("model", "model"), ("nested", "model/state_dict"),
    ("flat", ""), ("ema", "model"),
])
def test_containers_are_unwrapped(tmp_path, convnext_pair, layout, expected):
    src, dst = convnext_pair
    sd = src.state_dict()
    opt = rm._one_adamw_step(copy.deepcopy(src))
    obj = {
        "wrapped": {"state_dict": sd, "optimizer": opt, "epoch": 100},
        "model": {"model": sd},
        "nested": {"model": {"state_dict": sd}, "epoch": 3},
        "flat": sd,
        "ema": {"model": sd, "model_ema": sd},
    }[layout]
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    model = fresh(dst)
    report = tg.load(model, path)
    assert report.selected == expected
    assert report.ok and report.loaded_fraction == 1.0
    assert not report.missing_keys and not report.unexpected_keys
    assert_loaded(model, sd)
    if layout == "ema":
        assert any(a["ema"] and a["path"] == "model_ema" for a in report.alternatives)
        assert any("EMA" in n for n in report.notes)


def test_select_prefers_the_copy_that_fits(tmp_path, convnext_pair):
    src, dst = convnext_pair
    sd = src.state_dict()
    junk = {"something.else": torch.zeros(3)}
    torch.save({"model": junk, "model_ema": sd}, tmp_path / "c.pth")
    model = fresh(dst)
    report = tg.load(model, tmp_path / "c.pth")
    assert report.selected == "model_ema"
    assert_loaded(model, sd)


def test_explicit_select_and_bad_select(tmp_path, convnext_pair):
    src, dst = convnext_pair
    torch.save({"a": {"b": src.state_dict()}}, tmp_path / "c.pth")
    assert tg.read(tmp_path / "c.pth", select="a/b").selected == "a/b"
    with pytest.raises(tg.SelectError, match="has no key 'x'"):
        tg.read(tmp_path / "c.pth", select="a/x")


def test_lightning_checkpoint_loads_into_inner_module(tmp_path):
    ckpt, inner = rm.lightning_checkpoint(tmp_path, save_hyperparameters=True,
                                          hparams_namespace=True)
    target = rm.timm_model("resnet18", num_classes=10)
    report = tg.load(target, ckpt)
    assert report.selected == "state_dict"
    assert any("strip 'model.'" in r for r in report.rules)
    assert report.loaded_fraction == 1.0
    assert_loaded(target, inner.state_dict())
    assert "argparse.Namespace" in report.placeholders


# --- prefixes -------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", ["module.", "_orig_mod.", "module._orig_mod.", "model."])
def test_wrapper_prefixes_are_stripped(convnext_pair, wrap):
    src, dst = convnext_pair
    sd = {wrap + k: v for k, v in src.state_dict().items()}
    model = fresh(dst)
    report = tg.load(model, sd)
    assert report.ok and report.loaded_fraction == 1.0
    assert report.rules == [r for r in report.rules if r.startswith("auto")] and report.rules
    assert_loaded(model, src.state_dict())


def test_real_torch_compile_state_dict(convnext_pair):
    src, dst = convnext_pair
    sd = rm.compiled_state_dict(src)
    assert all(k.startswith("_orig_mod.") for k in sd)
    model = fresh(dst)
    tg.load(model, sd)
    assert_loaded(model, src.state_dict())
    # and the other way: a plain checkpoint into a compiled model
    compiled = torch.compile(fresh(dst))
    report = tg.load(compiled, src.state_dict())
    assert report.loaded_fraction == 1.0
    assert_loaded(compiled._orig_mod, src.state_dict())


def test_backbone_only_into_classifier_and_back():
    classifier = rm.mmpretrain_convnext_v2(num_classes=10)
    backbone = rm.mmpretrain_convnext_v2_backbone()
    target = fresh(classifier)
    report = tg.load(target, backbone.state_dict())
    assert any("add 'backbone.'" in r for r in report.rules)
    for k, v in backbone.state_dict().items():
        assert torch.equal(target.state_dict()["backbone." + k], v)
    assert set(report.missing_keys) == {"head.fc.weight", "head.fc.bias"}
    # full classifier checkpoint into the bare backbone
    bare = fresh(backbone)
    report = tg.load(bare, classifier.state_dict())
    assert report.loaded_fraction == 1.0
    assert set(report.unexpected_keys) == {"head.fc.weight", "head.fc.bias"}
    assert_loaded(bare, {k[9:]: v for k, v in classifier.state_dict().items()
                         if k.startswith("backbone.")})


# --- the seed scenario: mmengine prefix semantics --------------------------------------------


def test_seed_scenario_wrapped_convnext_v2_prefix_backbone(tmp_path):
    classifier = rm.mmpretrain_convnext_v2(num_classes=1000)
    path = tmp_path / "convnext-v2-atto.pth"
    rm.mm_wrapped_checkpoint(classifier, path, epoch=100)
    backbone = fresh(rm.mmpretrain_convnext_v2_backbone())
    report = tg.load(backbone, path, prefix="backbone")
    assert report.ok and report.selected == "state_dict"
    assert report.loaded_fraction == 1.0
    assert not report.missing_keys and not report.unexpected_keys and not report.mismatched
    expected = {k[len("backbone."):]: v for k, v in classifier.state_dict().items()
                if k.startswith("backbone.")}
    assert_loaded(backbone, expected)
    # head tensors were outside the prefix: skipped with that reason, not "unexpected"
    skipped = {e.source: e.reason for e in report.by_action("skipped")}
    assert skipped == {"head.fc.weight": "outside prefix 'backbone.'",
                       "head.fc.bias": "outside prefix 'backbone.'"}


def test_prefix_looks_through_ddp_and_backbone_only_files(tmp_path):
    classifier = rm.mmpretrain_convnext_v2(num_classes=1000)
    backbone_sd = {k[9:]: v for k, v in classifier.state_dict().items() if k.startswith("backbone.")}
    backbone = rm.mmpretrain_convnext_v2_backbone()
    ddp = rm.ddp_prefixed(classifier.state_dict())
    m1 = fresh(backbone)
    assert tg.load(m1, {"state_dict": ddp}, prefix="backbone").loaded_fraction == 1.0
    assert_loaded(m1, backbone_sd)
    m2 = fresh(backbone)
    report = tg.load(m2, {"state_dict": rm.ddp_prefixed(backbone_sd)}, prefix="backbone")
    assert report.loaded_fraction == 1.0 and any("as it is" in n for n in report.notes)
    assert_loaded(m2, backbone_sd)


def test_prefix_that_matches_nothing_lists_existing_prefixes():
    src = {"encoder.w": torch.ones(2), "decoder.w": torch.ones(2)}
    model = torch.nn.Linear(2, 2)
    with pytest.raises(tg.PrefixNotFoundError) as err:
        tg.load(model, src, prefix="backbone")
    assert "'encoder.'" in str(err.value) and "'decoder.'" in str(err.value)


# --- shape mismatch, nothing to load, strict -----------------------------------------------


def test_head_mismatch_error_leaves_model_untouched_and_skip_loads_the_rest(tmp_path):
    src = rm.timm_model("vit_tiny_patch16_224", num_classes=1000)
    dst = fresh(rm.timm_model("vit_tiny_patch16_224", num_classes=10))
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    snap = snapshot(dst)
    with pytest.raises(tg.ShapeMismatchError) as err:
        tg.load(dst, tmp_path / "vit.pth", mismatch="error")
    msg = str(err.value)
    assert "head.weight: checkpoint [1000, 192] vs model [10, 192]" in msg
    assert 'mismatch="skip"' in msg
    assert err.value.report is not None and not err.value.report.ok
    assert_unchanged(dst, snap)
    report = tg.load(dst, tmp_path / "vit.pth", mismatch="skip")
    assert [(e.target, e.source_shape, e.target_shape) for e in report.mismatched] == [
        ("head.weight", (1000, 192), (10, 192)), ("head.bias", (1000,), (10,))]
    assert_loaded(dst, src.state_dict(), skip=("head.weight", "head.bias"))
    assert torch.equal(dst.head.weight, snap["head.weight"])
    assert 0.99 < report.loaded_fraction < 1.0
    assert "head.weight: checkpoint [1000, 192] vs model [10, 192]" in str(report)


def test_plain_head_mismatch_raises_by_default(tmp_path):
    def net(classes: int) -> torch.nn.Module:
        torch.manual_seed(classes)
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                   torch.nn.Linear(16, classes))

    model = net(10)
    snap = snapshot(model)
    torch.save({"state_dict": net(1000).state_dict()}, tmp_path / "n.pth")
    with pytest.raises(tg.ShapeMismatchError, match=r"2\.weight: checkpoint \[1000, 16\]"):
        tg.load(model, tmp_path / "n.pth")
    assert_unchanged(model, snap)


def test_timm_classifier_is_left_as_initialised_by_default(tmp_path):
    src = rm.timm_model("vit_tiny_patch16_224", num_classes=1000)
    dst = rm.timm_model("vit_tiny_patch16_224", num_classes=10)
    head = dst.head.weight.detach().clone()
    report = tg.load(dst, src.state_dict())
    assert {e.target for e in report.mismatched} == {"head.weight", "head.bias"}
    assert all("timm classifier 'head'" in e.reason for e in report.mismatched)
    assert torch.equal(dst.head.weight, head)


def test_nothing_to_load_raises_with_names_and_hint(convnext_pair):
    src, dst = convnext_pair
    sd = {k.replace("stages", "encoder_stages", 1).replace("stem", "encoder_stem", 1)
          .replace("head", "encoder_head", 1): v for k, v in src.state_dict().items()}
    sd = {"encoder." + k: v for k, v in src.state_dict().items()
          if k.startswith("stages.0.downsample")} or sd
    model = fresh(dst)
    snap = snapshot(model)
    weird = {f"layer_{i}": torch.ones(i + 1, 7) for i in range(5)}
    with pytest.raises(tg.NothingToLoadError) as err:
        tg.load(model, weird)
    assert "layer_0" in str(err.value) and "stem.0.weight" in str(err.value)
    assert_unchanged(model, snap)


def test_nothing_to_load_hint_names_prefixes():
    model = torch.nn.Sequential()
    model.add_module("backbone", torch.nn.Linear(3, 4))
    src = {"encoder.weight": torch.ones(5, 3), "encoder.bias": torch.ones(5)}
    with pytest.raises(tg.NothingToLoadError, match="start with"):
        tg.load(model, src)


def test_strict_raises_before_writing(convnext_pair):
    src, dst = convnext_pair
    sd = dict(src.state_dict())
    sd.pop("head.fc.bias")
    sd["extra.weight"] = torch.ones(3)
    model = fresh(dst)
    snap = snapshot(model)
    with pytest.raises(tg.IncompatibleKeysError) as err:
        tg.load(model, sd, strict=True)
    assert "head.fc.bias" in str(err.value) and "extra.weight" in str(err.value)
    assert_unchanged(model, snap)
    report = tg.load(model, sd)
    assert report.missing_keys == ["head.fc.bias"] and report.unexpected_keys == ["extra.weight"]


def test_missing_and_unexpected_match_torch(convnext_pair):
    src, dst = convnext_pair
    sd = dict(src.state_dict())
    for k in list(sd)[:5]:
        sd.pop(k)
    sd["foo.bar"] = torch.ones(1)
    theirs = fresh(dst).load_state_dict(sd, strict=False)
    ours = tg.load(fresh(dst), sd, auto=False)
    assert ours.missing_keys == theirs.missing_keys
    assert ours.unexpected_keys == theirs.unexpected_keys
    missing, unexpected = ours
    assert missing == theirs.missing_keys


# --- rename -------------------------------------------------------------------------------


def test_rename_regex_dict_and_callable(convnext_pair):
    src, dst = convnext_pair
    sd = {k.replace("stages.", "layers."): v for k, v in src.state_dict().items()}
    m1 = fresh(dst)
    report = tg.load(m1, sd, rename=[(r"^layers\.", "stages.")])
    assert report.loaded_fraction == 1.0
    assert_loaded(m1, src.state_dict())
    m2 = fresh(dst)
    table = {k: k.replace("layers.", "stages.") for k in sd if k.startswith("layers.")}
    tg.load(m2, sd, rename=table)
    assert_loaded(m2, src.state_dict())
    m3 = fresh(dst)
    report = tg.load(m3, sd, rename=lambda k: None if k.startswith("head")
                     else k.replace("layers.", "stages."))
    assert {e.source for e in report.by_action("skipped")} >= {"head.fc.weight"}
    assert "head.fc.weight" in report.missing_keys
    with pytest.raises(tg.RenameError, match="both"):
        tg.load(fresh(dst), sd, rename=lambda k: "same")


# --- dtype, device, meta, tied -----------------------------------------------------------


def test_dtype_is_cast_to_the_model_and_reported(convnext_pair):
    src, dst = convnext_pair
    half = {k: v.half() if v.is_floating_point() else v for k, v in src.state_dict().items()}
    model = fresh(dst)
    report = tg.load(model, half)
    assert report.counts["cast"] == len([v for v in half.values() if v.is_floating_point()])
    assert "float16 -> float32" in str(report)
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, half[k].float())


def test_meta_model_is_materialised(tmp_path):
    src = rm.timm_model("resnet18")
    save_file(src.state_dict(), tmp_path / "r.safetensors")
    with torch.device("meta"):
        model = rm.timm_model("resnet18")
    report = tg.load(model, tmp_path / "r.safetensors")
    assert report.loaded_fraction == 1.0
    assert not any(t.is_meta for t in model.state_dict().values())
    assert_loaded(model, src.state_dict())
    x = torch.randn(1, 3, 32, 32)
    assert torch.allclose(model.eval()(x), src.eval()(x))


def test_meta_model_from_a_file_that_needs_casting(tmp_path):
    """Meta slots that cannot be read byte-for-byte (fp16 file, fp32 model) are cast on the way."""
    src = rm.timm_model("resnet18")
    half = {k: v.half() if v.is_floating_point() else v for k, v in src.state_dict().items()}
    save_file(half, tmp_path / "r16.safetensors")
    with torch.device("meta"):
        model = rm.timm_model("resnet18")
    report = tg.load(model, tmp_path / "r16.safetensors")
    assert report.counts["cast"] > 0 and report.loaded_fraction == 1.0
    for k, v in model.state_dict().items():
        assert not v.is_meta and v.dtype == src.state_dict()[k].dtype
        assert torch.equal(v, half[k].to(v.dtype))
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())


def test_tied_weights_stored_once(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)
    torch.manual_seed(0)
    src = GPT2LMHeadModel(cfg)
    save_model(src, str(tmp_path / "gpt2.safetensors"))  # drops one alias of the tied pair
    stored = set(tg.read(tmp_path / "gpt2.safetensors"))
    assert not ({"lm_head.weight", "transformer.wte.weight"} <= stored)
    torch.manual_seed(1)
    dst = GPT2LMHeadModel(cfg)
    report = tg.load(dst, tmp_path / "gpt2.safetensors")
    assert not report.missing_keys, report.missing_keys
    assert dst.lm_head.weight.data_ptr() == dst.transformer.wte.weight.data_ptr()
    assert torch.equal(dst.lm_head.weight, src.lm_head.weight)
    tied = [e for e in report.entries if "tied to" in e.reason]
    assert len(tied) == 1 and tied[0].action == "copied"


# --- formats ------------------------------------------------------------------------------


def test_formats_agree(tmp_path, convnext_pair):
    src, dst = convnext_pair
    sd = src.state_dict()
    torch.save(sd, tmp_path / "a.pth")
    torch.save(sd, tmp_path / "b.pth", _use_new_zipfile_serialization=False)
    save_file(sd, tmp_path / "c.safetensors")
    np.savez(tmp_path / "d.npz", **{k: v.numpy() for k, v in sd.items()})
    np.savez_compressed(tmp_path / "e.npz", **{k: v.numpy() for k, v in sd.items()})
    for name in ("a.pth", "b.pth", "c.safetensors", "d.npz", "e.npz"):
        model = fresh(dst)
        report = tg.load(model, tmp_path / name)
        assert report.loaded_fraction == 1.0, name
        assert_loaded(model, sd)


def test_hf_folders_single_and_sharded(tmp_path):
    for sharded in (False, True):
        folder, src = rm.hf_folder(tmp_path / str(sharded), "convnext", sharded=sharded)
        model = rm.hf_model("convnext")
        report = tg.load(model, folder)
        assert report.loaded_fraction == 1.0
        assert_loaded(model, src.state_dict())
        if sharded:
            assert report.format.startswith("hf-sharded")


def test_read_is_lazy_and_exact(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    torch.save({"t": t, "view": t.t(), "row": t[1]}, tmp_path / "v.pth")
    sd = tg.read(tmp_path / "v.pth")
    assert sd.ref("t").__class__.__name__ == "FileRef"
    assert torch.equal(sd["view"], t.t()) and torch.equal(sd["row"], t[1])
    assert sd.ref("view").alias_key() != sd.ref("t").alias_key()


def test_partial_load_is_reported(tmp_path):
    big = torch.nn.Sequential(*[torch.nn.Linear(300, 300) for _ in range(6)])  # not batched
    save_file(big.state_dict(), tmp_path / "m.safetensors")
    lazy = tg.read(tmp_path / "m.safetensors")
    with open(tmp_path / "m.safetensors", "r+b") as f:  # the file shrinks after planning
        f.truncate(lazy.ref("3.weight").offset + 16)
    model = fresh(big)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tg.PartialLoadError) as err:
        tg.load(model, lazy, progress=False)
    assert "PARTIALLY" in str(err.value)
    written = err.value.written
    assert "0.weight" in written
    # exact: every tensor not listed keeps its old value
    for name, value in model.state_dict().items():
        if name not in written:
            assert torch.equal(value, before[name]), name


def test_progress_bar_on_request_and_off_by_default(tmp_path, capsys):
    src = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    save_file(src.state_dict(), tmp_path / "m.safetensors")
    tg.load(fresh(src), tmp_path / "m.safetensors")  # not a TTY under pytest: no bar
    assert capsys.readouterr().err == ""
    model = fresh(src)
    tg.load(model, tmp_path / "m.safetensors", progress=True)
    err = capsys.readouterr().err
    assert "m.safetensors" in err and "GB/s" in err and err.endswith("\n")
    assert_loaded(model, src.state_dict())


def test_report_is_short_and_grouped(tmp_path):
    src = rm.timm_model("vit_tiny_patch16_224", num_classes=1000)
    dst = rm.timm_model("vit_tiny_patch16_224", num_classes=10)
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("blocks.1.")}
    sd.update({f"aux.{i}.weight": torch.ones(2) for i in range(30)})
    report = tg.load(dst, sd, mismatch="skip")
    text = str(report)
    assert len(text.splitlines()) <= 40
    assert "aux.{0..29}.weight" in text
    assert report.counts["missing"] == 12
    data = report.to_dict()
    assert data["counts"]["unexpected"] == 30 and len(data["entries"]) == len(report.entries)
    import json

    assert json.loads(report.to_json())["loaded_fraction"] == report.loaded_fraction


def test_plan_is_a_dry_run(convnext_pair):
    src, dst = convnext_pair
    model = fresh(dst)
    snap = snapshot(model)
    report = tg.plan(model, {"module." + k: v for k, v in src.state_dict().items()})
    assert report.ok and not report.applied and report.loaded_fraction == 1.0
    assert_unchanged(model, snap)


def test_staged_copy_path_is_exact_on_cpu(tmp_path):
    """The accelerator path (chunks through per-worker buffers) run with CPU targets."""
    from torchgraft.staged import copy_staged

    src = rm.timm_model("resnet18")
    save_file(src.state_dict(), tmp_path / "r.safetensors")
    state = tg.read(tmp_path / "r.safetensors")
    dst = fresh(src)
    targets = dst.state_dict()
    copy_staged([(state.ref(k), targets[k]) for k in targets], chunk_bytes=4096, workers=3)
    assert_loaded(dst, src.state_dict())


def test_large_tensors_are_read_in_parallel_slices_exactly(tmp_path):
    torch.manual_seed(0)
    src = torch.nn.Sequential(torch.nn.Embedding(9000, 1024), torch.nn.Linear(1024, 2048))
    torch.save(src.state_dict(), tmp_path / "big.pth")  # a 36 MB tensor: three slices
    dst = fresh(src)
    report = tg.load(dst, tmp_path / "big.pth")
    assert report.loaded_fraction == 1.0
    assert_loaded(dst, src.state_dict())


@pytest.mark.parametrize("stored", ["embed.weight", "head.weight"])
def test_tied_alias_before_or_after_the_stored_name(stored):
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

    torch.manual_seed(0)
    src = Tied()
    dst = Tied()
    report = tg.load(dst, {stored: src.embed.weight.detach().clone()})
    assert not report.missing_keys and report.loaded_fraction == 1.0
    assert dst.head.weight is dst.embed.weight
    assert torch.equal(dst.embed.weight, src.embed.weight)
    with torch.device("meta"):
        meta = Tied()
    tg.load(meta, {stored: src.embed.weight.detach().clone()})
    assert meta.head.weight is meta.embed.weight and not meta.embed.weight.is_meta
    assert torch.equal(meta.embed.weight, src.embed.weight)
