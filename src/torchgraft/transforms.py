"""The transform step of a plan: tensors computed from checkpoint tensors, and the adapters
that propose them.

A planned copy normally moves one checkpoint tensor's bytes into one model tensor. When an
*adapter* recognises that a checkpoint tensor has the right role but the wrong shape (the first
conv of a model built for 1-channel input, ...), the plan copies a :class:`TransformRef`
instead: the source reference plus a chain of :class:`Op` (reshape, transpose, slice, resample,
channel adapt, row gather...). Nothing is computed while planning except shapes (on the meta
device); the ops run at apply time on the source's values, and the report lists the tensor as
``adapted`` with the adapter, both shapes and the ops' parameters.

Adapters are a registry (:func:`register_adapter`). An adapter sees the model tensor's name, its
role (from the framework's own metadata, see :mod:`torchgraft.rules`), the checkpoint and model
shapes, and returns ops or None. Two adapters proposing different ops for one tensor is an
error, never a silent choice.

Example:
    >>> import torch
    >>> from torchgraft.tensors import MemoryRef
    >>> ref = TransformRef(MemoryRef(torch.ones(8, 3, 3, 3)), [adapt_channels(3, 1)])
    >>> ref.shape, float(ref.materialize()[0, 0, 0, 0])
    ((8, 1, 3, 3), 3.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .tensors import TensorRef


@dataclass(frozen=True)
class Op:
    """One tensor operation of a transform chain; ``params`` are shown in the report."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    params: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"{self.name}({args})"


class TransformRef(TensorRef):
    """A tensor computed from ``source`` by ``ops``, lazily (shape and dtype from a meta run)."""

    def __init__(self, source: TensorRef, ops: list[Op], adapter: str = "") -> None:
        self.source = source
        self.ops = list(ops)
        self.adapter = adapter
        probe = torch.empty(source.shape, dtype=source.dtype, device="meta")
        for op in self.ops:
            probe = op.fn(probe)
        self.shape = tuple(probe.shape)
        self.dtype = probe.dtype

    def alias_key(self) -> Any:
        return ("transform", self.source.alias_key(), tuple(op.describe() for op in self.ops))

    def materialize(self) -> torch.Tensor:
        value = self.source.materialize()
        for op in self.ops:
            value = op.fn(value)
        return value

    def describe(self) -> str:
        return " -> ".join(op.describe() for op in self.ops)


# --- ops -------------------------------------------------------------------------------------


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


# --- adapters --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proposal:
    """An adapter's answer for one tensor."""

    adapter: str
    ops: list[Op]


class Adapter(Protocol):
    """Proposes ops that turn a checkpoint tensor into a model tensor of another shape."""

    name: str
    roles: tuple[str, ...]  # roles it handles ("first_conv", "classifier", ...)
    default: bool  # applied under adapt="auto" (else only when asked for by name)

    def propose(self, name: str, role: str | None, src_shape: tuple[int, ...],
                dst_shape: tuple[int, ...]) -> list[Op] | None: ...


class InputChannels:
    """The first conv / patch embedding: a different number of input channels."""

    name = "input_channels"
    roles = ("first_conv",)
    default = True

    def propose(self, name: str, role: str | None, src_shape: tuple[int, ...],
                dst_shape: tuple[int, ...]) -> list[Op] | None:
        if kind_of(role) != "first_conv" or not name.endswith("weight") or len(src_shape) < 3:
            return None
        if len(src_shape) != len(dst_shape) or src_shape[0] != dst_shape[0]:
            return None
        if src_shape[2:] != dst_shape[2:] or src_shape[1] == dst_shape[1]:
            return None
        return [adapt_channels(src_shape[1], dst_shape[1])]


def gather_rows(index: list[int]) -> Op:
    """Rows ``index`` of dim 0 (a classifier's weight or bias: one row per class)."""
    idx = torch.tensor(index, dtype=torch.long)

    def fn(w: torch.Tensor) -> torch.Tensor:
        if w.is_meta:
            return torch.empty((len(index),) + tuple(w.shape[1:]), dtype=w.dtype, device="meta")
        return w.index_select(0, idx)

    shown = (f"{index[:4]}... ({len(index)} rows)" if len(index) > 4 else str(index))
    return Op("gather_rows", fn, {"rows": shown})


class ClassifierRows:
    """``labels=``: the classifier's rows for a subset, a reordering or an offset of the
    checkpoint's classes (one source class index per model class, or an int offset such as 1
    for a 1001-class checkpoint with a background class into a 1000-class model)."""

    name = "classifier_rows"
    roles = ("classifier",)
    default = False

    def __init__(self, labels: Any) -> None:
        self.labels = labels

    def rows(self, n_src: int, n_dst: int, name: str) -> list[int]:
        from .errors import OptionError

        labels = self.labels
        if isinstance(labels, int) and not isinstance(labels, bool):
            if labels < 0 or labels + n_dst > n_src:
                raise OptionError(
                    f"labels={labels}: {name} has {n_src} checkpoint rows; offset {labels} "
                    f"with {n_dst} model classes needs {labels + n_dst}")
            return list(range(labels, labels + n_dst))
        index = [int(i) for i in labels]
        if len(index) != n_dst:
            raise OptionError(f"labels= has {len(index)} entries but {name} has {n_dst} classes "
                              "(one checkpoint class index per model class)")
        bad = [i for i in index if not 0 <= i < n_src]
        if bad:
            raise OptionError(f"labels= has indices {bad[:5]} outside the checkpoint's {n_src} "
                              f"classes of {name}")
        return index

    def propose(self, name: str, role: str | None, src_shape: tuple[int, ...],
                dst_shape: tuple[int, ...]) -> list[Op] | None:
        if kind_of(role) != "classifier" or not src_shape or src_shape[1:] != dst_shape[1:]:
            return None
        return [gather_rows(self.rows(src_shape[0], dst_shape[0], name))]


@dataclass(frozen=True)
class Role:
    """A tensor's role with what the framework says about it (``params``)."""

    kind: str
    params: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)


def kind_of(role: Any) -> str | None:
    return getattr(role, "kind", role)


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
            from .errors import UnsupportedTargetError

            raise UnsupportedTargetError(
                f"{name}: the checkpoint's position embedding has {src_shape[1]} tokens; with "
                f"{prefix} prefix token(s) its {n_old} grid positions are no square grid, so "
                "the old grid is ambiguous. Resample it yourself, or pass adapt=False to keep "
                "the shape error")
        return [resample_grid((side, side), (grid[0], grid[1]), prefix)]


def resize_rows(n_dst: int, fill: str, model_rows: Callable[[], torch.Tensor] | None) -> Op:
    """Token-embedding rows (dim 0) to ``n_dst``: the rows that exist are copied; new rows are
    the model's own (``fill="model"``) or the mean of the checkpoint's rows (``"mean"``,
    transformers' ``mean_resizing``), computed in float32."""

    def fn(w: torch.Tensor) -> torch.Tensor:
        if w.is_meta:
            return torch.empty((n_dst,) + tuple(w.shape[1:]), dtype=w.dtype, device="meta")
        if n_dst <= w.shape[0]:
            return w[:n_dst].clone()
        extra = n_dst - w.shape[0]
        if fill == "mean":
            new = w.float().mean(0, keepdim=True).expand(extra, *w.shape[1:]).to(w.dtype)
        else:
            own = model_rows() if model_rows is not None else None
            if own is None or own.is_meta:
                from .errors import UnsupportedTargetError

                raise UnsupportedTargetError(
                    "token_rows: the model's own rows are not available (a meta-device model); "
                    "pass adapt=['token_rows_mean'] to fill new rows with the mean")
            new = own[w.shape[0]:n_dst].detach().to("cpu", w.dtype)
        return torch.cat([w, new], 0)

    return Op("resize_rows", fn, {"to": n_dst, "new_rows": fill})


class TokenRows:
    """Token embeddings (vocabulary grown or shrunk): only when asked for, by name."""

    roles = ("token_embedding",)
    default = False

    def __init__(self, fill: str) -> None:
        self.fill = fill
        self.name = "token_rows" if fill == "model" else "token_rows_mean"

    def propose(self, name: str, role: Any, src_shape: tuple[int, ...],
                dst_shape: tuple[int, ...]) -> list[Op] | None:
        if kind_of(role) != "token_embedding" or len(src_shape) != 2:
            return None
        if src_shape[1:] != dst_shape[1:] or src_shape[0] == dst_shape[0]:
            return None
        param = role.get("param") if isinstance(role, Role) else None
        return [resize_rows(dst_shape[0], self.fill, (lambda: param) if param is not None
                            else None)]


_ADAPTERS: list[Adapter] = [InputChannels(), PositionEmbedding(), TokenRows("model"),
                            TokenRows("mean")]


def register_adapter(adapter: Adapter, first: bool = True) -> None:
    """Add an adapter (``first=True``: asked before the built-in ones)."""
    if first:
        _ADAPTERS.insert(0, adapter)
    else:
        _ADAPTERS.append(adapter)


def registered_adapters() -> list[Adapter]:
    return list(_ADAPTERS)


def propose(name: str, role: str | None, src_shape: tuple[int, ...],
            dst_shape: tuple[int, ...], enabled: Callable[[Adapter], bool],
            extra: list[Adapter] = ()) -> list[Proposal]:
    """Every enabled adapter's proposal for one tensor (more than one: the caller refuses);
    ``extra`` adapters (built for this load's options, e.g. ``labels=``) are always asked."""
    out = []
    for adapter in list(extra) + [a for a in _ADAPTERS if enabled(a)]:
        ops = adapter.propose(name, role, src_shape, dst_shape)
        if ops:
            out.append(Proposal(adapter.name, ops))
    return out


def role_of(name: str, roles: dict[str, Any]) -> Any:
    """The role of model tensor ``name`` from ``{prefix or exact name: role}`` (an exact name,
    else the longest prefix ending in ``.``)."""
    if name in roles:
        return roles[name]
    best = None
    for prefix, role in roles.items():
        if (prefix.endswith(".") and name.startswith(prefix)
                and (best is None or len(prefix) > len(best[0]))):
            best = (prefix, role)
    return best[1] if best else None
