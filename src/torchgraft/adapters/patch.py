"""``patch_embed``: a ViT patch-embedding kernel resampled to a new patch size (FlexiViT's
pseudo-inverse resize), so a token of a resized patch is the token of the original one.

For a patch ``x`` (``old`` pixels) and its resize ``B x`` (``new`` pixels, ``B`` the linear
bilinear/bicubic resize), the new kernel is ``w' = pinv(B^T) w``: ``<B x, w'> = <x, w>`` exactly
when the patch grows, and in the least-squares sense when it shrinks. ``B`` is separable
(``B = B_h kron B_w``), so ``w' = pinv(B_h)^T w pinv(B_w)`` with two small pseudo-inverses.
The role comes from module structure: a module with a ``patch_size`` attribute whose conv
child has ``kernel_size == stride == patch_size`` (timm's ``PatchEmbed.proj``, transformers'
``ViTPatchEmbeddings.projection`` and their relatives). When the input channels differ as well,
the channels are adapted first (as ``input_channels`` would), then the kernel resampled.

Example:
    >>> import torch
    >>> op = resample_patch((16, 16), (8, 8))
    >>> op.fn(torch.ones(4, 3, 16, 16)).shape
    torch.Size([4, 3, 8, 8])
    >>> op.describe()
    'resample_patch(from=16x16, to=8x8, mode=bicubic, antialias=True, how=pseudo-inverse)'
"""

from __future__ import annotations

from typing import Any

import torch

from ..transforms import Op, Role, int_pair, kind_of
from .channels import adapt_channels

MODES = ("bicubic", "bilinear")


def resize_matrix(old: int, new: int, mode: str = "bicubic", antialias: bool = True) -> torch.Tensor:
    """The ``[new, old]`` matrix of a 1-D resize (``F.interpolate``, ``align_corners=False``),
    in float32: column ``i`` is the resize of the ``i``-th unit vector.

    Example:
        >>> resize_matrix(2, 4, "bilinear", False).tolist()[0]
        [1.0, 0.0]
    """
    basis = torch.eye(old, dtype=torch.float32).reshape(old, 1, 1, old)  # along the last axis
    out = torch.nn.functional.interpolate(basis, size=(1, new), mode=mode, antialias=antialias,
                                          align_corners=False)
    return out[:, 0, 0, :].T.contiguous()


def resample_patch(old: tuple[int, int], new: tuple[int, int], mode: str = "bicubic",
                   antialias: bool = True) -> Op:
    """A patch-embedding kernel ``[out, in, *old] -> [out, in, *new]`` by the pseudo-inverse
    of the ``mode`` resize (timm's ``resample_patch_embed``); computed in float32, returned in
    the source dtype."""
    if mode not in MODES:
        from ..errors import OptionError

        raise OptionError(f"patch_embed: mode={mode!r}; expected one of {MODES}")

    def fn(w: torch.Tensor) -> torch.Tensor:
        if w.is_meta:
            return torch.empty((*w.shape[:-2], *new), dtype=w.dtype, device="meta")
        rows = torch.linalg.pinv(resize_matrix(old[0], new[0], mode, antialias))  # [oh, nh]
        cols = torch.linalg.pinv(resize_matrix(old[1], new[1], mode, antialias))  # [ow, nw]
        out = rows.T.to(w.device) @ w.float() @ cols.to(w.device)
        return out.to(w.dtype)

    return Op("resample_patch", fn, {"from": f"{old[0]}x{old[1]}", "to": f"{new[0]}x{new[1]}",
                                     "mode": mode, "antialias": antialias,
                                     "how": "pseudo-inverse"})


class PatchEmbedding:
    """A patch embedding's kernel to the model's patch size (default on: the role is read from
    the module structure). ``configured(mode="bilinear", antialias=False)`` picks the resize
    whose pseudo-inverse is used (default: bicubic with antialias, as timm)."""

    name = "patch_embed"
    roles = ("patch_embed",)
    default = True

    def __init__(self, mode: str = "bicubic", antialias: bool = True) -> None:
        if mode not in MODES:
            from ..errors import OptionError

            raise OptionError(f"patch_embed: mode={mode!r}: expected one of {MODES}")
        self.mode = mode
        self.antialias = bool(antialias)

    def configured(self, mode: str = "bicubic", antialias: bool = True) -> PatchEmbedding:
        return PatchEmbedding(mode, antialias)

    def propose(self, name: str, role: Any, src_shape: tuple[int, ...],
                dst_shape: tuple[int, ...]) -> list[Op] | None:
        if kind_of(role) != "patch_embed" or len(src_shape) != 4 or len(dst_shape) != 4:
            return None
        if src_shape[0] != dst_shape[0] or src_shape[2:] == dst_shape[2:]:
            return None  # same kernel size: input_channels' case (or no case at all)
        ops = []
        if src_shape[1] != dst_shape[1]:
            if not role.get("first_conv"):
                return None  # input channels only for the model's input layer
            ops.append(adapt_channels(src_shape[1], dst_shape[1]))
        old = (src_shape[2], src_shape[3])
        new = (dst_shape[2], dst_shape[3])
        ops.append(resample_patch(old, new, self.mode, self.antialias))
        return ops




def patch_embed_roles(model: torch.nn.Module) -> dict[str, Any]:
    """Structure: every module with a ``patch_size`` whose ``Conv2d`` child has kernel and stride
    equal to it. The role is keyed by the conv's exact weight name, so it takes precedence over
    a framework's ``first_conv`` prefix for the same layer (``input_channels`` handles both
    when ``first_conv``: the conv is the model's first one, not a hybrid's projection)."""
    out: dict[str, Any] = {}
    first = next((m for m in model.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)),
                 None)
    for path, module in model.named_modules():
        patch = int_pair(getattr(module, "patch_size", None))
        if patch is None:
            continue
        for child_name, conv in module.named_children():
            if not isinstance(conv, torch.nn.Conv2d) or conv.weight is None:
                continue
            if tuple(conv.kernel_size) != patch or tuple(conv.stride) != patch:
                continue
            base = f"{path}.{child_name}" if path else child_name
            out[f"{base}.weight"] = Role("patch_embed", (
                ("patch_size", patch), ("in_chans", conv.in_channels),
                ("out_chans", conv.out_channels), ("first_conv", conv is first)))
    return out
