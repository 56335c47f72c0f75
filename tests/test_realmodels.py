"""Quick checks that the builders in ``tests/realmodels.py`` produce what they promise."""

from __future__ import annotations

import argparse
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file

try:
    import realmodels as rm
except ImportError:  # pragma: no cover - if tests/ ever becomes a package
    from tests import realmodels as rm


def _same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- timm
@pytest.mark.parametrize("name", ["convnext_tiny", "vit_tiny_patch16_224", "resnet18"])
def test_timm_model_deterministic_eval(name):
    a = rm.timm_model(name)
    b = rm.timm_model(name)
    assert not a.training
    assert _same(a.state_dict(), b.state_dict())


def test_timm_model_kwargs_and_seed():
    m = rm.timm_model("resnet18", num_classes=10)
    assert m.fc.weight.shape == (10, 512)
    other = rm.timm_model("resnet18", num_classes=10, seed=1)
    assert not _same(m.state_dict(), other.state_dict())


# --------------------------------------------------------------------------- mmpretrain
def test_mmpretrain_convnext_v2():
    m = rm.mmpretrain_convnext_v2()
    sd = m.state_dict()
    assert type(m).__name__ == "ImageClassifier"
    assert not m.training
    assert "backbone.stages.0.0.grn.gamma" in sd  # ConvNeXt-V2 GRN
    assert sd["head.fc.weight"].shape == (1000, 320)
    assert _same(sd, rm.mmpretrain_convnext_v2().state_dict())
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 1000)

    bb = rm.mmpretrain_convnext_v2_backbone().state_dict()
    expected = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
    assert set(bb) == set(expected)
    assert all(bb[k].shape == expected[k].shape for k in bb)


def test_mm_wrapped_checkpoint(tmp_path):
    m = rm.mmpretrain_convnext_v2(num_classes=10)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    p = rm.mm_wrapped_checkpoint(m, tmp_path / "sub" / "ckpt.pth", epoch=7)
    ck = torch.load(p, weights_only=True)
    assert set(ck) == {"state_dict", "optimizer", "epoch", "meta"}
    assert ck["epoch"] == 7 and ck["meta"]["epoch"] == 7
    assert _same(ck["state_dict"], before)
    assert _same(m.state_dict(), before)  # model untouched by the optimiser step
    opt = ck["optimizer"]
    n_params = sum(1 for _ in m.parameters())
    assert len(opt["state"]) == n_params
    assert all(int(s["step"]) == 1 and s["exp_avg"].abs().sum() > 0 for s in opt["state"].values())


def test_mmengine_runner_checkpoint(tmp_path):
    p = rm.mmengine_runner_checkpoint(tmp_path)
    assert p.name == "epoch_1.pth" and p.is_file()
    with pytest.raises(pickle.UnpicklingError, match="HistoryBuffer"):
        torch.load(p, weights_only=True)
    ck = torch.load(p, weights_only=False)
    assert {"meta", "state_dict", "message_hub", "optimizer"} <= set(ck)
    assert type(ck["message_hub"]["log_scalars"]["train/loss"]).__name__ == "HistoryBuffer"
    assert ck["meta"]["epoch"] == 1
    ref = rm.mmpretrain_convnext_v2(num_classes=10).state_dict()
    assert set(ck["state_dict"]) == set(ref)
    assert all(ck["state_dict"][k].shape == ref[k].shape for k in ref)
    # it really trained: weights moved away from the deterministic init
    assert not torch.equal(ck["state_dict"]["head.fc.weight"], ref["head.fc.weight"])


# --------------------------------------------------------------------------- Lightning
@pytest.mark.parametrize(("save_hp", "namespace"), [(False, False), (True, False), (True, True)])
def test_lightning_checkpoint(tmp_path, save_hp, namespace):
    path, inner = rm.lightning_checkpoint(tmp_path, save_hp, hparams_namespace=namespace)
    assert path.is_file() and not inner.training
    if namespace:
        with pytest.raises(pickle.UnpicklingError, match="argparse.Namespace"):
            torch.load(path, weights_only=True)
        ck = torch.load(path, weights_only=False)
    else:
        ck = torch.load(path, weights_only=True)
    assert ck["global_step"] == 1
    assert "optimizer_states" in ck and "pytorch-lightning_version" in ck
    sd = ck["state_dict"]
    assert all(k.startswith("model.") for k in sd)
    assert _same({k[len("model.") :]: v for k, v in sd.items()}, inner.state_dict())
    # one SGD step happened: differs from the seeded initial resnet18
    init = rm.timm_model("resnet18", num_classes=10).state_dict()
    assert not torch.equal(init["fc.weight"], inner.state_dict()["fc.weight"])
    if not save_hp:
        assert "hyper_parameters" not in ck
    elif namespace:
        hp = ck["hyper_parameters"]
        assert isinstance(hp["hparams"], argparse.Namespace)
        assert vars(hp["hparams"]) == {"num_classes": 10, "lr": 0.1}
    else:
        assert ck["hyper_parameters"] == {"num_classes": 10, "lr": 0.1}


# --------------------------------------------------------------------------- transformers
@pytest.mark.parametrize("kind", rm.HF_KINDS)
def test_hf_folder_single(tmp_path, kind):
    folder, model = rm.hf_folder(tmp_path, kind)
    assert sorted(f.name for f in folder.iterdir()) == ["config.json", "model.safetensors"]
    sd = model.state_dict()
    file_sd = load_file(folder / "model.safetensors")
    assert len(file_sd) == len(sd)
    if kind in ("convnext", "bert"):
        assert set(file_sd) == set(sd)
    ref = rm.hf_from_pretrained(folder, kind)
    assert type(ref) is type(model)
    assert _same(ref.state_dict(), sd)
    fresh = rm.hf_model(kind)
    assert type(fresh) is type(model) and list(fresh.state_dict()) == list(sd)
    assert not _same(fresh.state_dict(), sd)


@pytest.mark.parametrize("kind", ["vit_cls", "bert"])
def test_hf_folder_sharded(tmp_path, kind):
    folder, model = rm.hf_folder(tmp_path, kind, sharded=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    merged: dict = {}
    for s in shards:
        merged.update(load_file(s))
    assert set(merged) == set(index["weight_map"])
    assert len(merged) == len(model.state_dict())
    assert _same(rm.hf_from_pretrained(folder, kind).state_dict(), model.state_dict())


def test_hf_vit_native_format(tmp_path):
    folder, model = rm.hf_folder(tmp_path, "vit", original_format=False)
    assert set(load_file(folder / "model.safetensors")) == set(model.state_dict())


# --------------------------------------------------------------------------- DDP / compile
def test_ddp_prefixed():
    sd = rm.timm_model("resnet18").state_dict()
    p = rm.ddp_prefixed(sd)
    assert list(p) == ["module." + k for k in sd]
    assert all(p["module." + k] is v for k, v in sd.items())
    assert "module" in p._metadata
    assert list(rm.ddp_prefixed(sd, prefix="model.")) == ["model." + k for k in sd]


def test_compiled_state_dict_is_lazy():
    from torch._dynamo.utils import counters

    model = rm.timm_model("resnet18", num_classes=10)
    frames_before = sum(counters["frames"].values())
    sd = rm.compiled_state_dict(model)
    assert sum(counters["frames"].values()) == frames_before  # nothing was compiled
    assert all(k.startswith("_orig_mod.") for k in sd)
    ref = model.state_dict()
    assert list(sd) == ["_orig_mod." + k for k in ref]
    assert all(sd["_orig_mod." + k].data_ptr() == v.data_ptr() for k, v in ref.items())


# --------------------------------------------------------------------------- timm original ViT
def test_timm_original_vit_checkpoint():
    from timm.models.vision_transformer import checkpoint_filter_fn

    d = rm.timm_original_vit_checkpoint()
    assert "visual.class_embedding" in d and "visual.proj" in d
    assert "logit_scale" in d  # text tower present, as in a real CLIP file
    assert not any(k.startswith(("blocks.", "patch_embed.", "cls_token")) for k in d)

    ref = rm.timm_original_vit_model()
    model = rm.timm_original_vit_model(seed=123)
    assert not _same(model.state_dict(), ref.state_dict())
    converted = checkpoint_filter_fn(d, model)
    model.load_state_dict(converted, strict=True)
    assert _same(model.state_dict(), ref.state_dict())
