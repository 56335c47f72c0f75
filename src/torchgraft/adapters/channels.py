"""``input_channels``: the first conv / patch embedding built for another number of input
channels (1, 2, 4+ from 3, or any count to any count).

Example:
    >>> import torch
    >>> op = adapt_channels(3, 1)
    >>> op.fn(torch.ones(8, 3, 3, 3)).shape
    torch.Size([8, 1, 3, 3])
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..transforms import Op, kind_of


def adapt_channels(src: int, dst: int, dim: int = 1) -> Op:
    """Input channels ``src -> dst`` of a first conv / patch embedding (weight dim ``dim``).

    To 1 channel: the sum over the source channels (a grey image replicated to ``src`` channels
    gives the same features). From 1 channel: repeated and divided by ``dst``. Otherwise: the
    source channels repeated cyclically to ``dst`` and scaled by ``src / dst``, so a constant
    input produces the same pre-activation. Computed in float32, returned in the source dtype.
    """

    def fn(w: torch.Tensor) -> torch.Tensor:
        if w.is_meta:
            shape = list(w.shape)
            shape[dim] = dst
            return torch.empty(shape, dtype=w.dtype, device="meta")
        x = w.float()
        if dst == 1:
            out = x.sum(dim=dim, keepdim=True)
        else:
            reps = math.ceil(dst / src)
            out = torch.cat([x] * reps, dim=dim).narrow(dim, 0, dst) * (src / dst)
        return out.to(w.dtype)

    how = "sum" if dst == 1 else "repeat and scale"
    return Op("adapt_channels", fn, {"from": src, "to": dst, "how": how})


class InputChannels:
    """The first conv / patch embedding: a different number of input channels."""

    name = "input_channels"
    roles = ("first_conv", "patch_embed")  # a patch embedding that is the model's first conv
    default = True

    def propose(self, name: str, role: str | None, src_shape: tuple[int, ...],
                dst_shape: tuple[int, ...]) -> list[Op] | None:
        if kind_of(role) not in self.roles or not name.endswith("weight") or len(src_shape) < 3:
            return None
        if kind_of(role) == "patch_embed" and not role.get("first_conv"):
            return None  # a hybrid ViT's projection of backbone features
        if len(src_shape) != len(dst_shape) or src_shape[0] != dst_shape[0]:
            return None
        if src_shape[2:] != dst_shape[2:] or src_shape[1] == dst_shape[1]:
            return None
        return [adapt_channels(src_shape[1], dst_shape[1])]


def first_conv_role(model: torch.nn.Module) -> dict[str, Any]:
    """Structure, when the framework names no input layer: the model's first convolution."""
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.modules.conv._ConvNd):
            return {f"{path}.": "first_conv"}
    return {}
