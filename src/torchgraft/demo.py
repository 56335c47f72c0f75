"""``torchgraft demo``: the seed scenarios on a small ConvNeXt-V2-style model (torch only).

The models here are real (they train and run) but tiny: a ConvNeXt-V2-style backbone (stem
conv, stages of depthwise conv + LayerNorm + MLP with GRN blocks, downsample layers) and a
classifier that wraps it as ``.backbone`` + ``.head``. Scenarios, each loaded with ``tg.load``
and checked tensor by tensor:

(a) an mmengine-style ``{'state_dict', 'optimizer', 'epoch'}`` classifier checkpoint loaded into
    the bare backbone with ``prefix='backbone'``;
(b) the same 1000-class checkpoint into a 10-class classifier: the shape-mismatch error (the
    model is left unchanged), then ``mismatch='skip'``;
(c) a DDP checkpoint (``module.`` prefix) loaded with no options.

Example:
    >>> import io
    >>> run_demo(out=io.StringIO())
    True
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import TextIO

import torch
from torch import nn

from . import load
from .errors import ShapeMismatchError


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class GRN(nn.Module):
    """Global Response Normalization (ConvNeXt-V2), channels-last."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class Block(nn.Module):
    """Depthwise 7x7 conv, LayerNorm, Linear 4x, GELU, GRN, Linear back; residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.grn = GRN(4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        y = self.pwconv2(self.grn(self.act(self.pwconv1(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtV2(nn.Module):
    """A small ConvNeXt-V2-style backbone; ``forward`` returns pooled, normalized features."""

    def __init__(self, in_chans: int = 3, depths: tuple[int, ...] = (1, 1, 2, 1),
                 dims: tuple[int, ...] = (16, 32, 64, 128)) -> None:
        super().__init__()
        stem = nn.Sequential(nn.Conv2d(in_chans, dims[0], 4, stride=4), LayerNorm2d(dims[0]))
        self.downsample_layers = nn.ModuleList([stem] + [
            nn.Sequential(LayerNorm2d(dims[i]), nn.Conv2d(dims[i], dims[i + 1], 2, stride=2))
            for i in range(len(dims) - 1)])
        self.stages = nn.ModuleList(nn.Sequential(*[Block(d) for _ in range(n)])
                                    for d, n in zip(dims, depths))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.num_features = dims[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for down, stage in zip(self.downsample_layers, self.stages):
            x = stage(down(x))
        return self.norm(x.mean((-2, -1)))


class Classifier(nn.Module):
    """``backbone`` (:class:`ConvNeXtV2`) + linear ``head``, as mmpretrain/timm wrap them."""

    def __init__(self, num_classes: int = 1000, **backbone: object) -> None:
        super().__init__()
        self.backbone = ConvNeXtV2(**backbone)  # type: ignore[arg-type]
        self.head = nn.Linear(self.backbone.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def trained_classifier(num_classes: int, seed: int = 0) -> tuple[Classifier, dict]:
    """A classifier after one real AdamW step, and the optimizer's state dict."""
    torch.manual_seed(seed)
    model = Classifier(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, num_classes, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return model.eval(), opt.state_dict()


def _equal(a: dict, b: dict) -> int:
    """How many tensors of ``a`` equal (exactly) the same-named tensors of ``b``; -1 if any not."""
    same = sum(torch.equal(a[k], b[k]) for k in a)
    return same if same == len(a) else -1


def run_demo(folder: str | None = None, out: TextIO | None = None) -> bool:
    """Write the scenario checkpoints to ``folder`` (a temp folder), load them, print, check."""
    out = out or sys.stdout
    ok = True

    def say(text: str = "") -> None:
        out.write(text + "\n")

    def verdict(passed: bool, text: str) -> None:
        nonlocal ok
        ok = ok and passed
        say(("ok: " if passed else "FAILED: ") + text)

    with tempfile.TemporaryDirectory(prefix="torchgraft-demo-") as tmp:
        folder = folder or tmp
        src, optim = trained_classifier(1000)
        path = os.path.join(folder, "convnextv2_epoch100.pth")
        torch.save({"state_dict": src.state_dict(), "optimizer": optim, "epoch": 100}, path)
        want = src.backbone.state_dict()

        say("== (a) wrapped classifier checkpoint -> bare backbone ==")
        say("$ tg.load(ConvNeXtV2(), 'convnextv2_epoch100.pth', prefix='backbone')")
        torch.manual_seed(1)
        backbone = ConvNeXtV2()
        say(str(load(backbone, path, prefix="backbone")))
        n = _equal(backbone.state_dict(), want)
        verdict(n > 0, f"all {n} backbone tensors equal the checkpoint's")

        say("\n== (b) 1000-class checkpoint -> 10-class classifier ==")
        say("$ tg.load(Classifier(num_classes=10), 'convnextv2_epoch100.pth')")
        torch.manual_seed(2)
        clf = Classifier(10)
        before = {k: v.clone() for k, v in clf.state_dict().items()}
        try:
            load(clf, path)
            verdict(False, "expected a ShapeMismatchError")
        except ShapeMismatchError as err:
            say(f"ShapeMismatchError: {err}")
        verdict(_equal(clf.state_dict(), before) > 0, "the model was not changed")
        say("$ tg.load(Classifier(num_classes=10), 'convnextv2_epoch100.pth', mismatch='skip')")
        say(str(load(clf, path, mismatch="skip")))
        n = _equal(clf.backbone.state_dict(), want)
        head = _equal(clf.head.state_dict(), {k[5:]: v for k, v in before.items()
                                              if k.startswith("head.")})
        verdict(n > 0 and head > 0, f"all {n} backbone tensors equal; the head keeps its own "
                                    "initialization")

        say("\n== (c) DDP checkpoint ('module.' prefix) -> plain model ==")
        ddp_src, _ = trained_classifier(10, seed=3)
        ddp_path = os.path.join(folder, "ddp_model.pth")
        torch.save({f"module.{k}": v for k, v in ddp_src.state_dict().items()}, ddp_path)
        say("$ tg.load(Classifier(num_classes=10), 'ddp_model.pth')")
        torch.manual_seed(4)
        plain = Classifier(10)
        say(str(load(plain, ddp_path)))
        n = _equal(plain.state_dict(), ddp_src.state_dict())
        verdict(n > 0, f"all {n} tensors equal the DDP checkpoint's")
        with torch.no_grad():
            x = torch.randn(2, 3, 32, 32)
            verdict(torch.equal(plain(x), ddp_src(x)), "and the outputs are identical")
        say("\n== (d) RGB checkpoint -> grey-image backbone (an adapter) ==")
        say("$ tg.load(ConvNeXtV2(in_chans=1), 'convnextv2_epoch100.pth', prefix='backbone')")
        torch.manual_seed(5)
        grey = ConvNeXtV2(in_chans=1).eval()
        say(str(load(grey, path, prefix="backbone")))
        with torch.no_grad():
            x = torch.rand(2, 1, 32, 32)
            same = torch.allclose(grey(x), src.backbone(x.expand(-1, 3, -1, -1)), atol=1e-5)
        verdict(same, "on a grey image it computes what the RGB backbone computes on that image "
                      "in 3 channels")
    say("\ndemo " + ("passed" if ok else "FAILED") + f"; files were written to {folder}"
        + (" (removed)" if folder == tmp else ""))
    return ok
