"""Hugging Face transformers: hub (saved) names → the model's own state-dict names.

Since transformers 5, some architectures' modules were renamed (``ViTModel``:
``layers.0.attention.q_proj``) while ``save_pretrained`` still writes the historical hub names
(``encoder.layer.0.attention.attention.query``); ``from_pretrained`` renames on load through
its *conversion mapping*. :func:`hf_renamer` gives that renaming as a plain function, built from
transformers' own ``WeightRenaming`` objects (``get_model_conversion_mapping`` and
``rename_source_key``), so ``tg.load`` reads a ``save_pretrained`` folder into a transformers
model the way ``from_pretrained`` does. The base-model prefix (``vit.``, ``bert.``) is *not*
handled here: ``auto`` adds or strips it afterwards.

Conversions that change tensors (``WeightConverter``: fused qkv split, MoE experts stacked...)
are not applied; such tensors show up in the report as unexpected/missing.

Example:
    >>> import torch
    >>> hf_renamer(torch.nn.Linear(2, 2)) is None   # not a transformers model
    True
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["hf_renamer"]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    for _ in range(8):
        inner = getattr(model, "_orig_mod", None)  # torch.compile
        if not isinstance(inner, torch.nn.Module):
            break
        model = inner
    return model


_CACHE: dict[tuple, tuple[list[Any], list[Any]] | None] = {}


def _transforms(model: Any) -> tuple[list[Any], list[Any]] | None:
    """transformers' renamings and converters for ``model``, cached per class and model type
    (building them compiles about a thousand regexes)."""
    key = (type(model), getattr(getattr(model, "config", None), "model_type", None))
    if key not in _CACHE:
        _CACHE[key] = _build_transforms(model)
    return _CACHE[key]


def _build_transforms(model: Any) -> tuple[list[Any], list[Any]] | None:
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:  # transformers < 5: files hold the modules' own names
        return None
    transforms = get_model_conversion_mapping(model) or []
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    return renamings, converters


def hf_renamer(model: torch.nn.Module) -> Callable[[str], str] | None:
    """For a ``transformers.PreTrainedModel``: a function hub name → model state-dict name.

    Built from transformers' own conversion mapping for ``model`` (its class, its
    ``model_type``, its sub-models, plus the legacy renamings such as ``LayerNorm.gamma`` →
    ``LayerNorm.weight``), applied as ``from_pretrained`` applies them, including its guard: a
    name that the renaming would turn into no model name while it already is one is kept. So
    names already in the model's own layout (``save_pretrained(save_original_format=False)``)
    pass through unchanged. Names may carry the base-model prefix or not; it is kept as given.

    ``None`` for anything that is not a transformers model (transformers is then not imported),
    for transformers < 5, and for models whose mapping has no renaming. The function has
    ``converted_patterns``: source patterns of tensor conversions that are not applied.

    Example:
        >>> import transformers as tf
        >>> cfg = tf.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                    intermediate_size=64, image_size=32, patch_size=8)
        >>> rename = hf_renamer(tf.ViTForImageClassification(cfg))
        >>> rename("encoder.layer.0.attention.attention.query.weight")
        'layers.0.attention.q_proj.weight'
        >>> rename("vit.layers.0.attention.q_proj.weight")
        'vit.layers.0.attention.q_proj.weight'
    """
    if "transformers" not in sys.modules:
        return None  # a transformers model would have imported it
    try:
        from transformers import PreTrainedModel
        from transformers.core_model_loading import rename_source_key
    except ImportError:
        return None
    inner = _unwrap(model)
    if not isinstance(inner, PreTrainedModel):
        return None
    found = _transforms(inner)
    if found is None or not found[0]:
        return None
    renamings, converters = found
    names = set(inner.state_dict())
    base = getattr(inner, "base_model_prefix", "") or ""

    def known(name: str) -> bool:
        if name in names:
            return True
        if not base:
            return False
        if name.startswith(base + ".") and name[len(base) + 1:] in names:
            return True
        return f"{base}.{name}" in names

    def rename(name: str) -> str:
        new, _ = rename_source_key(name, renamings, [])
        if new != name and not known(new) and known(name):
            return name  # transformers' guard: it should not have been renamed
        return new

    rename.__name__ = f"transformers conversion mapping of {type(inner).__name__}"
    rename.__qualname__ = rename.__name__
    rename.converted_patterns = [  # type: ignore[attr-defined]
        p for c in converters for p in getattr(c, "source_patterns", [])]
    return rename
