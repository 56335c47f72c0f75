"""``auto`` never guesses silently (issue 13, section 3), on real modules and real files.

Every case here was a silent wrong load before: a rule moved one layer's weights into another,
picked one of two equally good prefixes alphabetically, or printed a count the plan did not copy.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch import nn

import torchgraft as tg
from tests import realmodels as rm


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _seeded(seed: int, build):
    torch.manual_seed(seed)
    return build()


def _block() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _rule_count(report: tg.LoadReport) -> int:
    (rule,) = [r for r in report.rules if r.startswith("auto:")]
    return int(re.search(r"matches (\d+) tensors by name and shape", rule).group(1))


# --- a tensor is never moved onto a name the checkpoint already holds --------------------------


@pytest.mark.parametrize("mismatch", ["skip", "error"])
def test_sibling_tensor_is_never_moved_onto_a_held_name(tmp_path, mismatch):
    """The issue's minimal case: 'strip a. add b.' used to put a.bias into b.bias."""
    path = tmp_path / "ck.pth"
    torch.save({"a.bias": torch.ones(4), "b.bias": torch.full((4,), 2.0),
                "b.weight": torch.zeros(4, 3)}, path)
    model = nn.ModuleDict({"b": nn.Linear(5, 4)})
    before = _snapshot(model)
    if mismatch == "error":
        with pytest.raises(tg.ShapeMismatchError):
            tg.load(model, path, mismatch=mismatch)
        assert _unchanged(model, before)
        return
    report = tg.load(model, path, mismatch=mismatch)
    assert torch.equal(model.b.bias, torch.full((4,), 2.0))
    assert torch.equal(model.b.weight, before["b.weight"])
    assert report.unexpected_keys == ["a.bias"] and not report.rules
    assert [e.target for e in report.mismatched] == ["b.weight"]


def test_small_model_into_its_larger_sibling_keeps_every_layer_in_place(tmp_path):
    """A smaller model's file into the larger model: layers that do not fit are skipped, never
    filled from another layer of the same shape (the 'strip conv1_BN. add conv2_BN.' bug)."""
    def net(w1: int, w2: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, w1, 3), nn.BatchNorm2d(w1), nn.Conv2d(w1, w2, 3),
                             nn.BatchNorm2d(w2))

    small = _seeded(0, lambda: nn.ModuleDict({"conv1": nn.Conv2d(3, 16, 3),
                                              "conv1_BN": nn.BatchNorm2d(16),
                                              "conv2": nn.Conv2d(16, 32, 3),
                                              "conv2_BN": nn.BatchNorm2d(32)}))
    large = _seeded(1, lambda: nn.ModuleDict({"conv1": nn.Conv2d(3, 32, 3),
                                              "conv1_BN": nn.BatchNorm2d(32),
                                              "conv2": nn.Conv2d(32, 16, 3),
                                              "conv2_BN": nn.BatchNorm2d(16)}))
    for bn in (small.conv1_BN, small.conv2_BN):
        bn.running_mean.uniform_()
    torch.save({"state_dict": small.state_dict()}, tmp_path / "small.pth")
    before = _snapshot(large)
    report = tg.load(large, tmp_path / "small.pth", mismatch="skip")
    assert not report.rules
    copied = [e for e in report.entries if e.action in ("copied", "cast")]
    assert all(e.source == e.target for e in copied)
    for e in copied:  # only num_batches_tracked fits: same name, same (empty) shape
        assert torch.equal(large.state_dict()[e.target], small.state_dict()[e.source])
    for e in report.mismatched:
        assert torch.equal(large.state_dict()[e.target], before[e.target])


# --- ties are refused, with the option that picks each candidate -------------------------------


@pytest.mark.parametrize("mismatch", [None, "skip"])
def test_two_equally_good_prefixes_are_refused(tmp_path, mismatch):
    lin3, lin4 = _seeded(3, lambda: nn.Linear(5, 4)), _seeded(4, lambda: nn.Linear(5, 4))
    path = tmp_path / "layers.pth"
    torch.save({**{f"lin3.{k}": v for k, v in lin3.state_dict().items()},
                **{f"lin4.{k}": v for k, v in lin4.state_dict().items()}}, path)
    model = _seeded(9, lambda: nn.Linear(5, 4))
    before = _snapshot(model)
    opts = {} if mismatch is None else {"mismatch": mismatch}
    with pytest.raises(tg.AmbiguousRenameError) as err:
        tg.load(model, path, **opts)
    assert isinstance(err.value, tg.PlanError) and isinstance(err.value, tg.RenameError)
    msg = str(err.value)
    assert "strip 'lin3.'" in msg and "prefix='lin3'" in msg
    assert "strip 'lin4.'" in msg and "prefix='lin4'" in msg
    assert "not changed" in msg
    assert _unchanged(model, before)
    # the option the message gives loads exactly that copy
    report = tg.load(model, path, prefix="lin4")
    assert report.loaded_fraction == 1.0
    assert torch.equal(model.weight, lin4.weight) and torch.equal(model.bias, lin4.bias)


def test_one_layer_into_two_identical_siblings_is_refused(tmp_path):
    src = _seeded(3, lambda: nn.Linear(5, 4))
    torch.save(src.state_dict(), tmp_path / "one.pth")
    model = nn.ModuleDict({"lin3": nn.Linear(5, 4), "lin4": nn.Linear(5, 4)})
    before = _snapshot(model)
    with pytest.raises(tg.AmbiguousRenameError) as err:
        tg.load(model, tmp_path / "one.pth")
    msg = str(err.value)
    assert "add 'lin3.'" in msg and "add 'lin4.'" in msg
    assert _unchanged(model, before)
    # the rename= printed for lin4 is valid Python that loads into lin4
    option = re.search(r"pass (rename=.*'lin4\.'\)\])", msg).group(1)
    report = tg.load(model, tmp_path / "one.pth", **eval(f"dict({option})"))
    assert torch.equal(model.lin4.weight, src.weight) and report.missing_keys == [
        "lin3.weight", "lin3.bias"]


class _LitLike(nn.Module):
    """What a LightningModule with an EMA copy (or a distillation module) holds."""

    def __init__(self, first: str, second: str) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.add_module(first, _seeded(11, _block))
        self.add_module(second, _seeded(12, _block))
        for m in (getattr(self, first), getattr(self, second)):
            m[1].running_mean.uniform_()
            m[1].num_batches_tracked.fill_(7)


def _lit_file(tmp_path, first: str, second: str) -> tuple[str, _LitLike]:
    lit = _LitLike(first, second)
    opt = torch.optim.SGD(lit.parameters(), lr=0.1, momentum=0.9)
    path = tmp_path / "lit.ckpt"
    torch.save({"epoch": 3, "global_step": 30, "pytorch-lightning_version": "2.5.0",
                "state_dict": lit.state_dict(), "optimizer_states": [opt.state_dict()],
                "lr_schedulers": []}, path)
    return str(path), lit


def test_lightning_net_and_ema_loads_the_non_ema_copy(tmp_path):
    path, lit = _lit_file(tmp_path, "net", "ema")
    model = _seeded(0, _block)
    report = tg.load(model, path)
    assert report.selected == "state_dict" and report.loaded_fraction == 1.0
    assert any("strip 'net.'" in r for r in report.rules)
    assert any("EMA" in n and "prefix='ema'" in n for n in report.notes)
    for k, v in model.state_dict().items():
        assert torch.equal(v, lit.net.state_dict()[k]), k
    # and the EMA copy is one option away
    tg.load(model, path, prefix="ema")
    for k, v in model.state_dict().items():
        assert torch.equal(v, lit.ema.state_dict()[k]), k


@pytest.mark.parametrize(("first", "second"), [("student", "teacher"),
                                                ("encoder", "target_encoder"),
                                                ("model_a", "model_b")])
@pytest.mark.parametrize("mismatch", [None, "skip"])
def test_two_copies_without_a_convention_are_refused(tmp_path, first, second, mismatch):
    path, lit = _lit_file(tmp_path, first, second)
    model = _seeded(0, _block)
    before = _snapshot(model)
    opts = {} if mismatch is None else {"mismatch": mismatch}
    with pytest.raises(tg.AmbiguousRenameError) as err:
        tg.load(model, path, **opts)
    msg = str(err.value)
    assert f"prefix='{first}'" in msg and f"prefix='{second}'" in msg
    assert _unchanged(model, before)
    assert not tg.plan(model, path, prefix=second).error
    tg.load(model, path, prefix=second)
    for k, v in model.state_dict().items():
        assert torch.equal(v, getattr(lit, second).state_dict()[k]), k


def test_a_clearly_better_prefix_wins_over_a_partial_copy(tmp_path):
    """A detector-like file: the backbone under 'backbone.', and a copy of its last layer under
    'roi_head.shared.' (as mmdet's shared ResNet layer4): the full backbone clearly wins."""
    backbone = _seeded(5, lambda: nn.Sequential(_block(), _block(), _block(), _block()))
    shared = _seeded(6, lambda: nn.Sequential(_block()))
    sd = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
          **{f"roi_head.shared.{k}": v for k, v in shared.state_dict().items()}}
    torch.save({"state_dict": sd, "meta": {"epoch": 12}}, tmp_path / "det.pth")
    model = _seeded(0, lambda: nn.Sequential(_block(), _block(), _block(), _block()))
    report = tg.load(model, tmp_path / "det.pth")
    assert any("strip 'backbone.'" in r for r in report.rules)
    for k, v in model.state_dict().items():
        assert torch.equal(v, backbone.state_dict()[k]), k


# --- counts: what the rule says equals what the plan copies ------------------------------------


def test_rule_count_equals_what_the_plan_copies(tmp_path):
    src = _seeded(1, lambda: nn.Sequential(_block(), _block(), nn.Linear(2, 10)))
    dst = _seeded(2, lambda: nn.Sequential(_block(), _block(), nn.Linear(2, 3)))
    sd = {f"module.{k}": v.double() if k.startswith("0.") and v.is_floating_point() else v
          for k, v in src.state_dict().items() if not k.startswith("1.2.")}
    torch.save(sd, tmp_path / "ddp.pth")
    report = tg.load(dst, tmp_path / "ddp.pth", mismatch="skip")
    c = report.counts
    assert c["cast"] > 0 and c["skipped"] == 2 and c["missing"] == 2
    assert _rule_count(report) == c["copied"] + c["cast"]


# --- real framework models ---------------------------------------------------------------------


def test_bert_mlm_folder_into_sequence_classifier_has_no_bogus_rule(tmp_path):
    tf = pytest.importorskip("transformers")
    cfg = tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    mlm = _seeded(0, lambda: tf.BertForMaskedLM(cfg))
    with rm._quiet_loggers("transformers", level=logging.ERROR):
        mlm.save_pretrained(tmp_path / "mlm")
    model = _seeded(1, lambda: tf.BertForSequenceClassification(cfg))
    before = _snapshot(model)
    report = tg.load(model, tmp_path / "mlm")
    assert not any("cls.predictions" in r for r in report.rules)
    assert all(e.source == e.target for e in report.entries if e.action == "copied")
    assert sorted(report.missing_keys) == ["bert.pooler.dense.bias", "bert.pooler.dense.weight",
                                           "classifier.bias", "classifier.weight"]
    mlm_sd = mlm.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, mlm_sd[k] if k in mlm_sd else before[k]), k
    for r in report.rules:
        if r.startswith("auto:"):
            assert _rule_count(report) == report.counts["copied"] + report.counts["cast"]


def test_timm_features_only_resnet_from_plain_resnet():
    timm = pytest.importorskip("timm")
    src = rm.timm_model("resnet18")
    model = timm.create_model("resnet18", features_only=True, pretrained=False)
    report = tg.load(model, src.state_dict())
    assert report.loaded_fraction == 1.0
    assert set(report.unexpected_keys) == {"fc.weight", "fc.bias"}
    for k, v in model.state_dict().items():
        assert torch.equal(v, src.state_dict()[k]), k


@pytest.mark.parametrize("wrap", ["", "backbone.", "module.backbone."])
def test_timm_features_only_convnext_is_mapped_stage_by_stage_or_refused(wrap):
    """Flattened stage names ('stages_2.') need one rule per stage: all of them, never one (the
    issue's 'strip backbone.stages.2. add stages_2.' loaded 40%)."""
    timm = pytest.importorskip("timm")
    src = rm.timm_model("convnext_atto")
    model = timm.create_model("convnext_atto", features_only=True, pretrained=False)
    before = _snapshot(model)
    try:
        report = tg.load(model, {wrap + k: v for k, v in src.state_dict().items()})
    except (tg.AmbiguousRenameError, tg.NothingToLoadError):
        assert _unchanged(model, before)
        return
    assert report.loaded_fraction == 1.0
    flat = {re.sub(r"^(stem|stages)\.(\d+)\.", r"\1_\2.", k): v
            for k, v in src.state_dict().items()}
    for k, v in model.state_dict().items():
        assert torch.equal(v, flat[k]), k
    assert _rule_count(report) == report.counts["copied"]
    assert f"rename '{wrap}stages.{{0..3}}.' -> 'stages_{{0..3}}.'" in report.rules[0]


def test_many_siblings_never_cut_to_the_alphabetically_first():
    """More prefix candidates than the search keeps: a tie at the cut is never decided by the
    alphabet (lpips' lin0..lin6, two of them of the model's shape)."""
    class OneLayer(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(c, 1, 1, bias=False))

    widths = [64, 128, 256, 384, 384, 512, 512]
    sd = {f"lin{i}.model.1.weight": torch.randn(1, c, 1, 1) for i, c in enumerate(widths)}
    for width, twins in ((384, ("lin3", "lin4")), (512, ("lin5", "lin6"))):
        model = OneLayer(width)
        with pytest.raises(tg.AmbiguousRenameError) as err:
            tg.load(model, sd)
        assert all(f"prefix='{t}'" in str(err.value) for t in twins)
