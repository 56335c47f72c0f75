"""``rel_pos_table`` / ``rel_pos_index``: relative-position bias tables (Swin v1, BEiT,
Data2Vec-vision) resized to the model's window, and the index buffers the model built from its
window (Swin v1/v2, BEiT, the Swin v2 coordinate table) kept as the model built them.

A flat table has one row per relative offset of a ``Wh x Ww`` window, ``(2Wh-1)*(2Ww-1)`` rows in
row-major (height-major) order, then ``extra`` rows (BEiT's class-token rows: cls to token, token
to cls, cls to cls), and one column per head. The extra rows are copied unchanged.

Example:
    >>> import torch
    >>> op = resize_rel_pos_table((7, 7), (12, 12), extra=3)
    >>> op.fn(torch.zeros(13 * 13 + 3, 2)).shape
    torch.Size([532, 2])
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..transforms import Keep, Op, Role, int_pair, kind_of

MODES = ("geometric", "bicubic")


def _geometric_points(src: int, dst: int) -> torch.Tensor:
    """Where the ``src`` offsets of one table side sit on the ``dst`` side's integer offsets:
    unevenly spaced (BEiT's rule, timm's and mmpretrain's too), the steps growing by a ratio
    found by bisection so that the outermost source offset lands near the outermost target."""
    half_src, half_dst = src // 2, dst // 2
    lo, hi = 1.01, 1.5
    ratio = lo
    while hi - lo > 1e-6:
        ratio = (lo + hi) / 2.0
        if (1.0 - ratio ** half_src) / (1.0 - ratio) > half_dst:
            hi = ratio
        else:
            lo = ratio
    steps, at = [], 1
    for i in range(half_src):
        steps.append(at)
        at += ratio ** (i + 1)
    return torch.tensor([-s for s in reversed(steps)] + [0] + steps, dtype=torch.float32)


def _linear_weights(points: torch.Tensor, at: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For each target ``at``: left/right source indices and their distances (linear weights
    on an uneven grid; outside the grid the nearest value)."""
    right = torch.bucketize(at, points).clamp(max=len(points) - 1)
    left = (right - 1).clamp(0, len(points) - 1)
    d_left = (at - points[left]).clamp(min=0)
    d_right = (points[right] - at).clamp(min=0)
    same = (d_left == 0) & (d_right == 0)
    d_left = torch.where(same, 1.0, d_left)
    d_right = torch.where(same, 1.0, d_right)
    return left, right, d_left, d_right


def _geometric(grid: torch.Tensor, dst: tuple[int, int]) -> torch.Tensor:
    """``grid [heads, 2Wh-1, 2Ww-1]`` (float32) resampled linearly at the target offsets."""
    axes = []
    for side, size in zip(grid.shape[1:], dst):
        half = size // 2
        axes.append(_linear_weights(_geometric_points(side, size),
                                    torch.arange(-half, half + 1, dtype=torch.float32)))
    (top, bottom, dy_top, dy_bottom), (left, right, dx_left, dx_right) = axes
    out = 0.0
    for rows, wy in ((top, dy_bottom), (bottom, dy_top)):  # a corner weighs the far distance
        for cols, wx in ((left, dx_right), (right, dx_left)):
            out = out + grid[:, rows][:, :, cols] * (wy[:, None] * wx[None, :])
    norm = (dy_top + dy_bottom)[:, None] * (dx_left + dx_right)[None, :]
    return out / norm


def resize_rel_pos_table(old: tuple[int, int], new: tuple[int, int], extra: int = 0,
                         mode: str = "geometric", assumed: bool = True) -> Op:
    """A flat table ``[(2*old_h-1)*(2*old_w-1) + extra, heads]`` resized to window ``new``.

    ``mode="geometric"``: BEiT's uneven-grid linear resampling, as timm's
    ``resize_rel_pos_bias_table`` (and timm's pretrained loading) does; ``"bicubic"``: a plain
    bicubic resize of the offset grid (the Swin repository's, timm's
    ``resize_rel_pos_bias_table_simple``). The ``extra`` rows are kept; float32 throughout.
    """
    src = (2 * old[0] - 1, 2 * old[1] - 1)
    dst = (2 * new[0] - 1, 2 * new[1] - 1)

    def fn(table: torch.Tensor) -> torch.Tensor:
        rows = dst[0] * dst[1] + extra
        if table.is_meta:
            return torch.empty((rows, table.shape[1]), dtype=table.dtype, device="meta")
        x = table.float()
        heads = x.shape[1]
        grid = x[:src[0] * src[1]].t().reshape(heads, src[0], src[1])
        if mode == "bicubic":
            out = torch.nn.functional.interpolate(grid[None], size=dst, mode="bicubic",
                                                  align_corners=False)[0]
        else:
            out = _geometric(grid, dst)
        out = out.reshape(heads, dst[0] * dst[1]).t()
        if extra:
            out = torch.cat([out, x[x.shape[0] - extra:]], 0)
        return out.to(table.dtype).contiguous()

    how = " (assumed square)" if assumed else ""
    return Op("resize_rel_pos_table", fn, {"from": f"{old[0]}x{old[1]}{how}",
                                           "to": f"{new[0]}x{new[1]}", "extra_rows": extra,
                                           "mode": mode})


def _source_window(name: str, rows: int, extra: int) -> tuple[int, int]:
    offsets = rows - extra
    side = math.isqrt(max(offsets, 0))
    if offsets > 0 and side * side == offsets and side % 2 == 1:
        return ((side + 1) // 2,) * 2
    from ..errors import AmbiguousAdapterError

    raise AmbiguousAdapterError(
        f"{name}: the checkpoint's relative-position table has {rows} rows; with {extra} extra "
        f"row(s) its {offsets} window offsets are no (2W-1)^2 square, so the checkpoint's window "
        f"is ambiguous. Pass adapt={{{name!r}: {{'source_window': (h, w)}}}} with the window it "
        "was trained with, or adapt=False to keep the shape error")


class RelPosTable:
    """A relative-position bias table to the model's window (the window and the extra rows from
    the model's attention module; the checkpoint's window from its row count, square assumed,
    or ``source_window=(h, w)``)."""

    name = "rel_pos_table"
    roles = ("rel_pos_table",)
    default = True

    def __init__(self, source_window: Any = None, mode: str = "geometric") -> None:
        from ..errors import OptionError

        if mode not in MODES:
            raise OptionError(f"rel_pos_table: mode={mode!r}; expected one of {MODES}")
        if source_window is not None:
            window = int_pair(source_window)
            if window is None:
                raise OptionError(f"rel_pos_table: source_window={source_window!r}; expected "
                                  "(height, width) of the checkpoint's window")
            source_window = window
        self.source_window = source_window
        self.mode = mode

    def configured(self, source_window: Any = None, mode: str | None = None) -> RelPosTable:
        return RelPosTable(source_window if source_window is not None else self.source_window,
                           mode or self.mode)

    def propose(self, name: str, role: Any, src_shape: tuple[int, ...],
                dst_shape: tuple[int, ...]) -> list[Op] | None:
        if kind_of(role) != "rel_pos_table" or len(src_shape) != 2 or len(dst_shape) != 2:
            return None
        window, extra = tuple(role.get("window", ())), role.get("extra_rows", 0)
        if (src_shape[1] != dst_shape[1] or len(window) != 2
                or dst_shape[0] != (2 * window[0] - 1) * (2 * window[1] - 1) + extra):
            return None
        old = self.source_window
        if old is None:
            old = _source_window(name, src_shape[0], extra)
        elif (2 * old[0] - 1) * (2 * old[1] - 1) + extra != src_shape[0]:
            from ..errors import OptionError

            raise OptionError(
                f"{name}: source_window={old} means {(2 * old[0] - 1) * (2 * old[1] - 1)} + "
                f"{extra} rows, but the checkpoint's table has {src_shape[0]}")
        return [resize_rel_pos_table(old, window, extra, self.mode,
                                     assumed=self.source_window is None)]


class RelPosIndex:
    """Index / coordinate buffers the model builds from its own window: kept as built."""

    name = "rel_pos_index"
    roles = ("rel_pos_index",)
    default = True

    def propose(self, name: str, role: Any, src_shape: tuple[int, ...],
                dst_shape: tuple[int, ...]) -> Keep | None:
        if kind_of(role) != "rel_pos_index" or not _window_built(src_shape, role.get("what")):
            return None  # the checkpoint's tensor is no buffer of that kind: a shape error
        h, w = role.get("window")
        return Keep(f"{role.get('what')} built by the model for window {h}x{w} (the "
                    "checkpoint's is for another window)")


def _window(module: torch.nn.Module) -> tuple[int, int] | None:
    value = vars(module).get("window_size")
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (isinstance(value, (tuple, list, torch.Size)) and len(value) == 2
            and all(isinstance(v, int) and v > 0 for v in value)):
        return int(value[0]), int(value[1])
    return None


def _built_buffer(buf: torch.Tensor, h: int, w: int) -> str | None:
    """What a buffer of a windowed module is, if its shape is the one its window gives."""
    area, shape = h * w, tuple(buf.shape)
    if not buf.is_floating_point():
        sides = [(n, n) for n in (area, area + 1)]
        return "relative position index" if shape in sides + [(a * b,) for a, b in sides] \
            else None
    if shape[-3:] == (2 * h - 1, 2 * w - 1, 2):
        return "relative coordinates table"
    if len(shape) == 3 and shape[1:] == (area, area):
        return "attention mask"
    return None


def _window_built(shape: tuple[int, ...], what: str) -> bool:
    """Whether a checkpoint tensor of ``shape`` is a buffer of kind ``what`` for *some* window
    (both sides must be window-built for the model's own value to replace the file's)."""
    if what == "relative position index":
        return (len(shape) == 2 and shape[0] == shape[1] > 0) or (
            len(shape) == 1 and shape[0] > 0 and math.isqrt(shape[0]) ** 2 == shape[0])
    if what == "relative coordinates table":
        return len(shape) >= 3 and shape[-1] == 2 and shape[-3] % 2 == 1 and shape[-2] % 2 == 1
    if what == "attention mask":
        return len(shape) == 3 and shape[1] == shape[2] > 0
    return False


def rel_pos_roles(model: torch.nn.Module) -> dict[str, Any]:
    """Structure: modules with a ``window_size`` attribute; their flat
    ``relative_position_bias_table`` parameter (``rel_pos_table``, with the window and the extra
    rows) and the buffers their window determines (``rel_pos_index``)."""
    out: dict[str, Any] = {}
    for path, module in model.named_modules():
        window = _window(module)
        if window is None:
            continue
        h, w = window
        base = f"{path}." if path else ""
        table = module._parameters.get("relative_position_bias_table")
        if table is not None and table.dim() == 2:
            extra = table.shape[0] - (2 * h - 1) * (2 * w - 1)
            if extra >= 0:
                out[f"{base}relative_position_bias_table"] = Role("rel_pos_table", (
                    ("window", window), ("extra_rows", extra),
                    ("layout", "(2h-1)x(2w-1) offsets height-major, extra rows last")))
        for key, buf in module._buffers.items():
            what = _built_buffer(buf, h, w) if buf is not None else None
            if what is not None and key not in module._non_persistent_buffers_set:
                out[f"{base}{key}"] = Role("rel_pos_index", (("window", window), ("what", what)))
    return out
