"""``inflate_3d`` (only when asked): a 2-D conv kernel ``[out, in, kh, kw]`` inflated into a
3-D conv ``[out, in, t, kh, kw]`` (I3D), so a video of identical frames gives the 2-D net's
output on every frame.

``how="mean"`` (default, I3D's choice): the kernel repeated over the ``t`` time steps and
divided by ``t`` (exact on a static clip wherever the temporal window sees no padding).
``how="center"``: the kernel at time index ``t // 2``, zeros elsewhere (exact on a static clip
on every frame, zero temporal padding included). Ask for it with ``adapt={"inflate_3d": True}``
or ``adapt={"inflate_3d": {"how": "center"}}`` (per tensor: ``adapt={"conv.weight": {"adapter":
"inflate_3d", "how": "center"}}``). The role comes from the module type: every ``nn.Conv3d``.

Example:
    >>> import torch
    >>> w = inflate_kernel(3, "mean").fn(torch.ones(2, 1, 3, 3))
    >>> tuple(w.shape), round(float(w.sum()), 4)
    ((2, 1, 3, 3, 3), 18.0)
    >>> inflate_kernel(3, "center").fn(torch.ones(2, 1, 3, 3))[:, :, 0].abs().sum().item()
    0.0
"""

from __future__ import annotations

from typing import Any

import torch

from ..transforms import Op, Role, kind_of

HOWS = ("mean", "center")


def inflate_kernel(t: int, how: str = "mean") -> Op:
    """A 2-D kernel ``[out, in, kh, kw] -> [out, in, t, kh, kw]``: repeated and divided by
    ``t`` (``"mean"``) or placed at time index ``t // 2`` (``"center"``); in float32."""
    if how not in HOWS:
        from ..errors import OptionError

        raise OptionError(f"inflate_3d: how={how!r}; expected one of {HOWS}")

    def fn(w: torch.Tensor) -> torch.Tensor:
        shape = (*w.shape[:2], t, *w.shape[2:])
        if w.is_meta:
            return torch.empty(shape, dtype=w.dtype, device="meta")
        x = w.float().unsqueeze(2)
        if how == "mean":
            out = x.expand(shape) / t
        else:
            out = torch.zeros(shape, dtype=torch.float32, device=w.device)
            out[:, :, t // 2] = x[:, :, 0]
        return out.to(w.dtype).contiguous()

    return Op("inflate_3d", fn, {"time": t, "how": how})


class Inflate3d:
    """A ``Conv3d`` weight from a 2-D checkpoint kernel (only when asked for by name)."""

    name = "inflate_3d"
    roles = ("conv3d", "first_conv")
    default = False

    def __init__(self, how: str = "mean") -> None:
        if how not in HOWS:
            from ..errors import OptionError

            raise OptionError(f"inflate_3d: how={how!r}: expected one of {HOWS}")
        self.how = how

    def configured(self, how: str = "mean") -> Inflate3d:
        return Inflate3d(how)

    def propose(self, name: str, role: Any, src_shape: tuple[int, ...],
                dst_shape: tuple[int, ...]) -> list[Op] | None:
        if kind_of(role) not in self.roles or len(src_shape) != 4 or len(dst_shape) != 5:
            return None  # a first conv counts only as a 2-D kernel into a 3-D one
        if src_shape[:2] != dst_shape[:2] or src_shape[2:] != dst_shape[3:]:
            return None
        return [inflate_kernel(dst_shape[2], self.how)]


def conv3d_roles(model: torch.nn.Module) -> dict[str, Any]:
    """Structure: every ``nn.Conv3d`` (its weight and bias, by prefix)."""
    out: dict[str, Any] = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Conv3d):
            role = Role("conv3d", (("kernel_size", tuple(module.kernel_size)),))
            out[f"{path}." if path else "weight"] = role
    return out
