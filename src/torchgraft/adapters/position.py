"""``position_embedding``: absolute position embeddings resampled to a new grid (resolution or
patch size changed), prefix tokens (class, distillation, registers) kept.

Storage layouts (the role's ``layout``): ``tokens`` ``[1, prefix + H*W, C]`` (timm, transformers
ViT/DeiT/BEiT/Dinov2, mmpretrain), ``rows`` ``[prefix + H*W, C]`` (an ``nn.Embedding`` weight:
CLIP, SigLIP), ``nhwc`` ``[1, H, W, C]`` (timm SAM) and ``nchw`` ``[1, C, H, W]`` (timm Hiera
abs-win). A flattened checkpoint grid is read as square unless ``source_grid`` is given.

Example:
    >>> import torch
    >>> resample_grid((2, 2), (3, 3), prefix=1).fn(torch.zeros(1, 5, 4)).shape
    torch.Size([1, 10, 4])
    >>> resample_grid((2, 4), (3, 3), 0, layout="rows", source="given").params["from"]
    '2x4 (given)'
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..transforms import Keep, Op, Role, int_pair, kind_of

LAYOUTS = ("tokens", "rows", "nhwc", "nchw")
MODES = ("bicubic", "bilinear")


def _out_shape(shape: torch.Size, new: tuple[int, int], prefix: int, layout: str) -> tuple:
    if layout == "tokens":
        return (shape[0], prefix + new[0] * new[1], shape[-1])
    if layout == "rows":
        return (prefix + new[0] * new[1], shape[-1])
    if layout == "nhwc":
        return (shape[0], new[0], new[1], shape[-1])
    return (shape[0], shape[1], new[0], new[1])


def resample_grid(old: tuple[int, int], new: tuple[int, int], prefix: int,
                  mode: str = "bicubic", antialias: bool = True, layout: str = "tokens",
                  source: str = "assumed square") -> Op:
    """An absolute position embedding stored as ``layout`` resampled from grid ``old`` to
    ``new`` (``torch.nn.functional.interpolate``, ``align_corners=False``), keeping the
    ``prefix`` tokens; in float32, returned in the source dtype. ``source`` says how ``old``
    was found (``"assumed square"``, ``"given"``, or ``""``: read from a 2-D storage)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")

    def fn(pe: torch.Tensor) -> torch.Tensor:
        if pe.is_meta:
            return torch.empty(_out_shape(pe.shape, new, prefix, layout), dtype=pe.dtype,
                               device="meta")
        x = pe.float()
        head = None
        if layout in ("tokens", "rows"):
            x = x.unsqueeze(0) if layout == "rows" else x
            head, x = x[:, :prefix], x[:, prefix:]
            x = x.reshape(x.shape[0], old[0], old[1], x.shape[-1]).permute(0, 3, 1, 2)
        elif layout == "nhwc":
            x = x.permute(0, 3, 1, 2)
        x = torch.nn.functional.interpolate(x, size=tuple(new), mode=mode, align_corners=False,
                                            antialias=antialias)
        if layout in ("tokens", "rows"):
            x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, x.shape[1])
            x = torch.cat([head, x], dim=1) if prefix else x
            x = x.squeeze(0) if layout == "rows" else x
        elif layout == "nhwc":
            x = x.permute(0, 2, 3, 1)
        return x.contiguous().to(pe.dtype)

    where = f"{old[0]}x{old[1]}" + (f" ({source})" if source else "")
    params: dict[str, Any] = {"from": where, "to": f"{new[0]}x{new[1]}", "prefix_tokens": prefix,
                              "mode": mode, "antialias": antialias}
    if layout != "tokens":
        params["layout"] = layout
    return Op("resample_grid", fn, params)


def _grid_candidates(n: int, target: tuple[int, int], most: int = 4) -> list[tuple[int, int]]:
    """Factor pairs ``h*w == n`` of aspect within 4:1, closest to ``target``'s aspect first."""
    want = math.log(target[0] / target[1])
    pairs = [(h, n // h) for h in range(1, n + 1) if n % h == 0
             and abs(math.log(h / (n // h))) <= math.log(4)]
    return sorted(pairs, key=lambda p: abs(math.log(p[0] / p[1]) - want))[:most]




class PositionEmbedding:
    """Absolute position embeddings to a new grid (resolution or patch size changed), prefix
    tokens kept. The new grid, the prefix-token count and the storage layout come from the
    framework (timm's ``patch_embed.grid_size`` and ``num_prefix_tokens``, transformers' config
    ``image_size // patch_size`` and the embeddings' class / distillation tokens). A flattened
    checkpoint grid is assumed square; any other count needs ``source_grid``
    (``adapt={"<tensor>": {"source_grid": (h, w)}}``), else the load is refused with
    :class:`~torchgraft.errors.AmbiguousAdapterError`. ``mode`` (``"bicubic"``, ``"bilinear"``)
    and ``antialias`` are parameters too; ``antialias`` defaults to what the model's framework
    itself computes (timm's ``resample_abs_pos_embed``: True; transformers'
    ``interpolate_pos_encoding``: False, except Dinov2-with-registers), so the numbers are the
    framework's own.

    A persistent ``position_ids`` index buffer of the embedding (role ``position_ids``) is kept
    as the model built it: the checkpoint's indexes are for the old grid."""

    name = "position_embedding"
    roles = ("pos_embed", "position_ids")
    default = True

    def __init__(self, source_grid: tuple[int, int] | None = None, mode: str = "bicubic",
                 antialias: bool | None = None) -> None:
        from ..errors import OptionError

        if mode not in MODES:
            raise OptionError(f"position_embedding: mode={mode!r}: expected one of {MODES}")
        if antialias is not None and not isinstance(antialias, bool):
            raise OptionError(f"position_embedding: antialias={antialias!r}: expected True or "
                              "False")
        self.source_grid = None if source_grid is None else int_pair(source_grid)
        if source_grid is not None and self.source_grid is None:
            raise OptionError(f"position_embedding: source_grid={source_grid!r}: expected "
                              "(height, width), two positive integers")
        self.mode = mode
        self.antialias = antialias

    def configured(self, source_grid: Any = None, mode: str = "bicubic",
                   antialias: bool | None = None) -> PositionEmbedding:
        """This adapter with parameters (``adapt={"position_embedding": {...}}`` or per
        tensor)."""
        return PositionEmbedding(source_grid, mode, antialias)

    def propose(self, name: str, role: Any, src_shape: tuple[int, ...],
                dst_shape: tuple[int, ...]) -> list[Op] | Keep | None:
        kind = kind_of(role)
        if kind == "position_ids":
            if len(dst_shape) >= 1 and dst_shape[-1] == role.get("positions"):
                return Keep("position index buffer: the model's own 0..N-1 for its grid, not "
                            f"the checkpoint's {list(src_shape)}")
            return None
        if kind != "pos_embed":
            return None
        layout, prefix = role.get("layout", "tokens"), int(role.get("prefix_tokens", 0))
        grid = tuple(role.get("grid", ()))
        if len(grid) != 2 or len(src_shape) != len(dst_shape) or dst_shape != _out_shape(
                torch.Size(src_shape), grid, prefix, layout):
            return None  # not the layout the framework declares: a plain shape error
        if layout in ("nhwc", "nchw"):
            old = tuple(src_shape[1:3]) if layout == "nhwc" else tuple(src_shape[2:])
            if self.source_grid is not None and self.source_grid != old:
                from ..errors import OptionError

                raise OptionError(f"adapt={{{name!r}: {{'source_grid': {self.source_grid}}}}}:"
                                  f" the checkpoint's {name} {list(src_shape)} stores a "
                                  f"{old[0]}x{old[1]} grid")
            return self._ops(old, grid, prefix, layout, "", role)
        n_old = (src_shape[1] if layout == "tokens" else src_shape[0]) - prefix
        if n_old <= 0:
            return None
        if self.source_grid is not None:
            if self.source_grid[0] * self.source_grid[1] != n_old:
                from ..errors import OptionError

                raise OptionError(f"adapt={{{name!r}: {{'source_grid': {self.source_grid}}}}}:"
                                  f" the checkpoint's {name} has {n_old} grid positions (after "
                                  f"{prefix} prefix token(s)), not "
                                  f"{self.source_grid[0] * self.source_grid[1]}")
            return self._ops(self.source_grid, grid, prefix, layout, "given", role)
        side = math.isqrt(n_old)
        if side * side != n_old:
            from ..errors import AmbiguousAdapterError

            options = ", ".join(f"{h}x{w}" for h, w in _grid_candidates(n_old, grid))
            other = [k for k in range(0, 9) if k != prefix and n_old + prefix - k > 0
                     and math.isqrt(n_old + prefix - k) ** 2 == n_old + prefix - k]
            hint = (f" (With {other[0]} prefix token(s) instead of the model's {prefix} it would "
                    "be a square grid: if the checkpoint's class/distillation/register tokens "
                    "differ from the model's, that is not adapted; build the model with the "
                    "checkpoint's tokens.)" if other and other[0] <= prefix + 8 else "")
            raise AmbiguousAdapterError(
                f"{name}: the checkpoint's position embedding has {n_old + prefix} positions; "
                f"with {prefix} prefix token(s) its {n_old} grid positions are no square grid, "
                f"so the old grid is ambiguous (it could be {options or 'any factor pair'}). "
                f'Pass adapt={{"{name}": {{"source_grid": (h, w)}}}} with the checkpoint\'s '
                f'grid, or adapt={{"{name}": False}} to keep the shape error.{hint}')
        return self._ops((side, side), grid, prefix, layout, "assumed square", role)

    def _ops(self, old: tuple, new: tuple, prefix: int, layout: str, source: str,
             role: Any = None) -> list[Op]:
        antialias = self.antialias
        if antialias is None:  # the framework's own choice
            antialias = bool(role.get("antialias", True)) if isinstance(role, Role) else True
        return [resample_grid((int(old[0]), int(old[1])), (int(new[0]), int(new[1])), prefix,
                              self.mode, antialias, layout, source)]
