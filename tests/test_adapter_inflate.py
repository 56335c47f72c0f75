"""``inflate_3d`` (only when asked): a 2-D net's kernels inflated into its 3-D twin, which then
gives the 2-D output on every frame of a static video."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchgraft as tg
from torchgraft.adapters.inflate import inflate_kernel


def net2d() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))


def net3d(t: int, tpad: int) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv3d(3, 8, (t, 3, 3), padding=(tpad, 1, 1)), nn.BatchNorm3d(8),
                         nn.ReLU(), nn.Conv3d(8, 4, (t, 3, 3), padding=(tpad, 1, 1), bias=False),
                         nn.BatchNorm3d(4))


def _randomise_bn(net: nn.Module) -> None:
    torch.manual_seed(2)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 2)
            m.bias.data.uniform_(-1, 1)


def _static_clip(frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    image = torch.randn(2, 3, 12, 12)
    return image, image.unsqueeze(2).expand(-1, -1, frames, -1, -1).contiguous()


@pytest.mark.parametrize("t", [3, 5])
def test_mean_inflation_gives_the_2d_output_per_valid_frame(t: int) -> None:
    src = net2d().eval()
    _randomise_bn(src)
    model = net3d(t, 0).eval()  # no temporal padding: every window sees only real frames
    report = tg.load(model, src.state_dict(), adapt={"inflate_3d": True})
    image, clip = _static_clip(12)
    with torch.no_grad():
        out2d, out3d = src(image), model(clip)
    assert out3d.shape[2] == 12 - 2 * (t - 1)
    diff = (out3d - out2d.unsqueeze(2)).abs().max()
    assert diff <= 1e-5, diff
    adapted = sorted(e.target for e in report.by_action("adapted"))
    assert adapted == ["0.weight", "3.weight"]
    assert all("inflate_3d" in e.reason and "how=mean" in e.reason
               for e in report.by_action("adapted"))
    assert torch.equal(model[1].running_var, src[1].running_var)  # BatchNorm3d: plain copy
    assert torch.equal(model[4].weight, src[4].weight) and report.loaded_fraction == 1.0


@pytest.mark.parametrize("t", [3, 4])
def test_center_inflation_gives_the_2d_output_on_every_frame(t: int) -> None:
    src = net2d().eval()
    _randomise_bn(src)
    model = net3d(t, t // 2).eval()  # zero temporal padding: the centre tap sees its own frame
    tg.load(model, src.state_dict(), adapt={"inflate_3d": {"how": "center"}})
    image, clip = _static_clip(6)
    with torch.no_grad():
        out2d, out3d = src(image), model(clip)[:, :, :6]  # an even t makes one frame more
    diff = (out3d - out2d.unsqueeze(2).expand(-1, -1, 6, -1, -1)).abs().max()
    assert diff <= 1e-5, diff
    w = model[0].weight.detach()
    assert torch.equal(w[:, :, t // 2], src[0].weight)
    assert not torch.cat([w[:, :, :t // 2], w[:, :, t // 2 + 1:]], 2).any()  # zeros elsewhere


def test_not_applied_unless_asked() -> None:
    src, model = net2d(), net3d(3, 1)
    before = model[0].weight.detach().clone()
    with pytest.raises(tg.ShapeMismatchError, match="0.weight"):
        tg.load(model, src.state_dict())
    with pytest.raises(tg.ShapeMismatchError, match="3.weight"):  # named for the first conv only
        tg.load(model, src.state_dict(), adapt={"0.weight": {"adapter": "inflate_3d"}})
    assert torch.equal(model[0].weight, before)
    report = tg.load(model, src.state_dict(), adapt=["inflate_3d"])  # the list form: how="mean"
    assert len(report.by_action("adapted")) == 2
    with pytest.raises(tg.OptionError, match="inflate_3d"):
        tg.load(model, src.state_dict(), adapt={"inflate_3d": {"how": "edge"}})


def test_kernel_op_dtype_and_meta() -> None:
    w = torch.randn(4, 2, 3, 3, dtype=torch.bfloat16)
    mean = inflate_kernel(4, "mean").fn(w)
    assert mean.dtype == torch.bfloat16 and mean.shape == (4, 2, 4, 3, 3)
    assert torch.equal(mean, (w.float().unsqueeze(2).expand(-1, -1, 4, -1, -1) / 4).to(w.dtype))
    assert inflate_kernel(4, "center").fn(w.to("meta")).shape == (4, 2, 4, 3, 3)
    # a spatial size change is not an inflation: the shape error stays
    src = nn.Sequential(nn.Conv2d(3, 8, 5))
    with pytest.raises(tg.ShapeMismatchError):
        tg.load(nn.Sequential(nn.Conv3d(3, 8, 3)), src.state_dict(), adapt={"inflate_3d": True})
