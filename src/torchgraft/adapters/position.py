"""``position_embedding``: absolute position embeddings resampled to a new grid (resolution or
patch size changed), prefix tokens (class, distillation, registers) kept.

Example:
    >>> import torch
    >>> resample_grid((2, 2), (3, 3), prefix=1).fn(torch.zeros(1, 5, 4)).shape
    torch.Size([1, 10, 4])
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..transforms import Op, kind_of


def resample_grid(old: tuple[int, int], new: tuple[int, int], prefix: int,
                  mode: str = "bicubic", antialias: bool = True) -> Op:
    """An absolute position embedding ``[1, prefix + H*W, C]`` resampled from grid ``old`` to
    ``new``, keeping the ``prefix`` tokens (class, distillation, registers); in float32."""

    def fn(pe: torch.Tensor) -> torch.Tensor:
        n_new = prefix + new[0] * new[1]
        if pe.is_meta:
            return torch.empty((pe.shape[0], n_new, pe.shape[-1]), dtype=pe.dtype, device="meta")
        head, grid = pe[:, :prefix], pe[:, prefix:]
        dim = grid.shape[-1]
        x = grid.float().reshape(grid.shape[0], old[0], old[1], dim).permute(0, 3, 1, 2)
        x = torch.nn.functional.interpolate(x, size=new, mode=mode, antialias=antialias)
        x = x.permute(0, 2, 3, 1).reshape(grid.shape[0], -1, dim).to(pe.dtype)
        return torch.cat([head, x], dim=1) if prefix else x

    return Op("resample_grid", fn, {"from": f"{old[0]}x{old[1]} (assumed square)",
                                    "to": f"{new[0]}x{new[1]}",
                                    "prefix_tokens": prefix, "mode": mode,
                                    "antialias": antialias})


class PositionEmbedding:
    """Absolute position embeddings ``[1, prefix + H*W, C]`` to a new grid (resolution or patch
    size changed). The new grid and the prefix-token count come from the framework (timm's
    ``patch_embed.grid_size`` and ``num_prefix_tokens``); the old grid must be the only square
    one that fits the checkpoint, otherwise the load is refused."""

    name = "position_embedding"
    roles = ("pos_embed",)
    default = True

    def propose(self, name: str, role: Any, src_shape: tuple[int, ...],
                dst_shape: tuple[int, ...]) -> list[Op] | None:
        if kind_of(role) != "pos_embed" or len(src_shape) != 3 or len(dst_shape) != 3:
            return None
        if src_shape[0] != dst_shape[0] or src_shape[2] != dst_shape[2]:
            return None
        prefix, grid = role.get("prefix_tokens", 0), tuple(role.get("grid", ()))
        if len(grid) != 2 or dst_shape[1] != prefix + grid[0] * grid[1]:
            return None
        n_old = src_shape[1] - prefix
        side = math.isqrt(max(n_old, 0))
        if n_old <= 0 or side * side != n_old:
            from ..errors import UnsupportedTargetError

            raise UnsupportedTargetError(
                f"{name}: the checkpoint's position embedding has {src_shape[1]} tokens; with "
                f"{prefix} prefix token(s) its {n_old} grid positions are no square grid, so "
                "the old grid is ambiguous. Resample it yourself, or pass adapt=False to keep "
                "the shape error")
        return [resample_grid((side, side), (grid[0], grid[1]), prefix)]
