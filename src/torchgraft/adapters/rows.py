"""Row adapters, only when asked: ``classifier_rows`` (``labels=``: a subset, reordering or
offset of the checkpoint's classes) and ``token_rows`` / ``token_rows_mean`` (vocabulary grown
or shrunk).

Example:
    >>> import torch
    >>> gather_rows([2, 0]).fn(torch.arange(3.0)).tolist()
    [2.0, 0.0]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..transforms import Op, Role, kind_of


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
        from ..errors import OptionError

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
                from ..errors import UnsupportedTargetError

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
