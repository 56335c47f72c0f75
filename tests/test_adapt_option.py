"""The ``adapt=`` option (per adapter, per tensor, with parameters), ``Keep`` answers, the
adapted fraction, and the CLI showing and writing the same plan (``diff``, ``check``,
``convert --model``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchgraft as tg
from torchgraft import transforms
from torchgraft.transforms import Keep, Role

timm = pytest.importorskip("timm")


def grey_resnet() -> torch.nn.Module:
    return timm.create_model("resnet18", pretrained=False, in_chans=1)


@pytest.fixture(scope="module")
def rgb_state() -> dict[str, torch.Tensor]:
    return timm.create_model("resnet18", pretrained=False).state_dict()


def test_dict_disables_one_adapter_or_one_tensor(rgb_state) -> None:
    for adapt in ({"input_channels": False}, {"conv1.weight": False}):
        model = grey_resnet()
        before = model.conv1.weight.detach().clone()
        with pytest.raises(tg.ShapeMismatchError, match="conv1.weight"):
            tg.load(model, rgb_state, adapt=adapt)
        assert torch.equal(model.conv1.weight, before)
    report = tg.load(grey_resnet(), rgb_state, adapt={"conv1.weight": "input_channels"})
    assert [e.target for e in report.by_action("adapted")] == ["conv1.weight"]


def test_dict_keys_and_values_are_checked_before_any_write(rgb_state) -> None:
    model = grey_resnet()
    cases = [({"no_such": True}, "neither an adapter"), ({"conv1.weight": "nope"}, "nope"),
             ({"input_channels": {"x": 1}}, "takes no parameters"),
             ({"input_channels": "yes"}, "True, False or a dict"), (["nope"], "nope"),
             ({"a": 1}, "adapt=")]
    for adapt, match in cases:
        with pytest.raises(tg.OptionError, match=match):
            tg.load(model, rgb_state, adapt=adapt)
    with pytest.raises(tg.OptionError, match="neither an adapter"):  # a bad option, as ever
        tg.plan(model, rgb_state, adapt={"no_such": True})


def test_adapted_fraction_is_counted_apart(rgb_state) -> None:
    report = tg.load(grey_resnet(), rgb_state)
    conv = 64 * 1 * 7 * 7
    total = sum(p.numel() for p in grey_resnet().state_dict().values())
    assert report.loaded_fraction == 1.0
    assert report.adapted_fraction == pytest.approx(conv / total)
    assert report.to_dict()["adapted_fraction"] == report.adapted_fraction
    assert "of elements adapted, not copied" in str(report).splitlines()[0]
    plain = tg.load(timm.create_model("resnet18", pretrained=False), rgb_state)
    assert plain.adapted_fraction == 0.0 and "adapted" not in str(plain).splitlines()[0]


class _IndexKeeper:
    """A user adapter: an index buffer the model builds itself is kept, not an error."""

    name = "keep_index"
    roles = ("index",)
    default = True

    def propose(self, name, role, src_shape, dst_shape):
        if getattr(role, "kind", None) == "index":
            return Keep(f"built by the model for size {role.get('size')}")
        return None


class _Windowed(torch.nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.register_buffer("index", torch.arange(size * size))
        self.size = size


def test_keep_answer_reports_kept_and_keeps_the_model_value(monkeypatch) -> None:
    from torchgraft import rules

    transforms.registered_adapters()  # the built-ins are registered before the registry is patched
    monkeypatch.setattr(transforms, "_ADAPTERS", [_IndexKeeper()] + transforms._ADAPTERS)

    def finder(m: torch.nn.Module) -> dict:
        return {"index": Role("index", (("size", m.size),))} if isinstance(m, _Windowed) else {}

    monkeypatch.setattr(rules, "_ROLE_FINDERS", [finder] + rules._ROLE_FINDERS)
    src, model = _Windowed(3), _Windowed(5)
    report = tg.load(model, src.state_dict())
    (kept,) = report.by_action("kept")
    assert kept.target == "index" and "size 5" in kept.reason
    assert torch.equal(model.index, torch.arange(25)) and torch.equal(model.proj.weight,
                                                                     src.proj.weight)
    assert report.missing_keys == [] and report.ok
    assert report.loaded_fraction == 1.0  # a kept tensor is not counted as left unloaded


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torchgraft", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_check_diff_and_convert_share_the_adapted_plan(tmp_path: Path, rgb_state) -> None:
    src = tmp_path / "r18.pth"
    torch.save(rgb_state, src)
    kwargs = json.dumps({"in_chans": 1, "num_classes": 4})
    labels = tmp_path / "labels.txt"
    labels.write_text("7\n3\n999\n0\n")
    out = _cli("diff", str(src), "timm:resnet18", "--kwargs", kwargs, "--labels", str(labels),
               "--json", cwd=tmp_path)
    plan = json.loads(out.stdout)
    assert out.returncode == 0, out.stderr
    text = _cli("diff", str(src), "timm:resnet18", "--kwargs", kwargs, "--labels", "7,3,999,0",
                cwd=tmp_path).stdout
    assert "(122/122 tensors;" in text and "adapted (3)" in text, text
    check = _cli("check", str(src), "--model", "timm:resnet18", "--kwargs", kwargs,
                 "--labels", "7,3,999,0", cwd=tmp_path)
    assert check.returncode == 0 and "adapted" in check.stdout, check.stdout + check.stderr
    off = _cli("check", str(src), "--model", "timm:resnet18", "--kwargs", kwargs,
               "--adapt", "off", cwd=tmp_path)
    assert off.returncode != 0 and "conv1.weight" in off.stdout + off.stderr
    dst = tmp_path / "grey4.safetensors"
    conv = _cli("convert", str(src), str(dst), "--model", "timm:resnet18", "--kwargs", kwargs,
                "--labels", "7,3,999,0", "--verify", cwd=tmp_path)
    assert conv.returncode == 0, conv.stdout + conv.stderr
    assert "adapted conv1.weight" in conv.stdout and "with no options" in conv.stdout
    model = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=4)
    report = tg.load(model, dst)  # the converted file loads with no options, nothing adapted
    assert report.ok and not report.by_action("adapted") and report.loaded_fraction == 1.0
    assert torch.equal(model.fc.weight, rgb_state["fc.weight"][[7, 3, 999, 0]])
    assert torch.equal(model.conv1.weight, rgb_state["conv1.weight"].sum(1, keepdim=True))
    adapted = {e["target"] for e in plan["report"]["entries"] if e["action"] == "adapted"} \
        if "report" in plan else {e["target"] for e in plan["entries"]
                                  if e["action"] == "adapted"}
    assert adapted == {"conv1.weight", "fc.weight", "fc.bias"}


def test_cli_names_an_adapter_refusal_once_and_the_option_decides(tmp_path: Path) -> None:
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(224, 320))
    path = tmp_path / "rect.pth"
    torch.save(src.state_dict(), path)
    spec = "timm:vit_tiny_patch16_224?img_size=384"
    for cmd in (["check", str(path), "--model", spec], ["diff", str(path), spec]):
        out = _cli(*cmd, cwd=tmp_path)
        assert out.returncode == 1 and out.stdout.count("source_grid") == 1, out.stdout
        assert "0/0 tensors" not in out.stdout and "--min-loaded" not in out.stdout
    ok = _cli("check", str(path), "--model", spec, "--adapt",
              '{"pos_embed": {"source_grid": [14, 20]}}', cwd=tmp_path)
    assert ok.returncode == 0 and "from=14x20 (given)" in ok.stdout, ok.stdout + ok.stderr


def test_naming_a_tensor_asks_for_asked_only_adapters_and_labels_take_arrays(rgb_state) -> None:
    import numpy as np

    net2d = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3))
    net3d = torch.nn.Sequential(torch.nn.Conv3d(3, 4, 3), torch.nn.Conv3d(4, 4, 3))
    with pytest.raises(tg.ShapeMismatchError):
        tg.load(net3d, net2d.state_dict())
    report = tg.load(net3d, net2d.state_dict(), adapt={"1.weight": True, "0.weight": True})
    assert sorted(e.target for e in report.by_action("adapted")) == ["0.weight", "1.weight"]
    assert torch.allclose(net3d[1].weight.sum(2), net2d[1].weight, atol=1e-6)  # mean inflation
    for labels in (np.array([5, 1, 0]), torch.tensor([5, 1, 0])):
        model = timm.create_model("resnet18", pretrained=False, num_classes=3)
        tg.load(model, rgb_state, labels=labels)
        assert torch.equal(model.fc.weight, rgb_state["fc.weight"][[5, 1, 0]])


def test_labels_into_a_model_whose_framework_names_no_classifier() -> None:
    """torchvision declares no classifier: labels= says how to name it, and then works."""
    torchvision = pytest.importorskip("torchvision")
    src = torchvision.models.resnet18()
    model = torchvision.models.resnet18(num_classes=3)
    before = model.fc.weight.detach().clone()
    with pytest.raises(tg.OptionError, match="classifier_rows"):
        tg.load(model, src.state_dict(), labels=[9, 2, 7])
    assert torch.equal(model.fc.weight, before)
    named = {"fc.weight": "classifier_rows", "fc.bias": "classifier_rows"}
    report = tg.load(model, src.state_dict(), labels=[9, 2, 7], adapt=named)
    assert torch.equal(model.fc.weight, src.fc.weight[[9, 2, 7]])
    assert torch.equal(model.fc.bias, src.fc.bias[[9, 2, 7]])
    assert sorted(e.target for e in report.by_action("adapted")) == ["fc.bias", "fc.weight"]
    with pytest.raises(tg.OptionError, match="runs with labels="):  # named without labels=
        tg.load(model, src.state_dict(), adapt=named)


def test_a_tensor_left_alone_is_left_alone_by_labels_too(rgb_state) -> None:
    model = timm.create_model("resnet18", pretrained=False, num_classes=3)
    own = model.fc.bias.detach().clone()
    report = tg.load(model, rgb_state, labels=[4, 5, 6], adapt={"fc.bias": False},
                     mismatch="skip")
    assert torch.equal(model.fc.weight, rgb_state["fc.weight"][[4, 5, 6]])
    assert torch.equal(model.fc.bias, own)  # fc.bias: no adapter at all, a skipped mismatch
    assert [e.target for e in report.mismatched] == ["fc.bias"]
