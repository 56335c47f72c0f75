"""Where a model's absolute position embedding is, its grid, prefix tokens and storage layout:
from timm's and transformers' own modules and configs (never from a tensor name alone).

Example:
    >>> import torch
    >>> transformers_position_roles(torch.nn.Linear(2, 2))
    {}
"""

from __future__ import annotations

from typing import Any

import torch

from ..transforms import Role, int_pair


def _role(grid: Any, prefix: int, layout: str, antialias: bool = True) -> Role:
    """``antialias``: what the framework's own resampling uses (timm: True; transformers'
    ``interpolate_pos_encoding``: False, except the few models listed in ``_HF_ANTIALIAS``)."""
    return Role("pos_embed", (("grid", (int(grid[0]), int(grid[1]))), ("prefix_tokens", prefix),
                              ("layout", layout), ("antialias", antialias)))


# transformers embeddings whose own interpolate_pos_encoding resamples with antialias=True
_HF_ANTIALIAS = {"Dinov2WithRegistersEmbeddings"}


def timm_pos_embed_role(module: torch.nn.Module) -> Role | None:
    """timm ViT-style models (ViT, DeiT, EVA, BEiT, SAM, Hiera): ``pos_embed``'s grid, prefix
    tokens and layout, from the model itself (``patch_embed.grid_size``, ``num_prefix_tokens``,
    ``no_embed_class``; Hiera's ``tokens_spatial_shape``)."""
    pos = module._parameters.get("pos_embed")
    if pos is None:
        return None
    grid = getattr(getattr(module, "patch_embed", None), "grid_size", None)
    if grid is None:
        grid = getattr(module, "tokens_spatial_shape", None)  # Hiera
    grid = tuple(int(g) for g in grid) if isinstance(grid, (tuple, list)) else ()
    if pos.dim() == 4:
        if module._parameters.get("pos_embed_win") is not None:  # Hiera abs-win: own grid
            return _role(pos.shape[2:], 0, "nchw")
        if tuple(pos.shape[1:3]) == grid:  # SAM
            return _role(grid, 0, "nhwc")
        return None
    if pos.dim() != 3 or len(grid) != 2:
        return None
    prefix = 0 if getattr(module, "no_embed_class", False) else int(
        getattr(module, "num_prefix_tokens", 0 if hasattr(module, "tokens_spatial_shape") else 1))
    return _role(grid, prefix, "tokens")


_PREFIX_PARAMS = ("cls_token", "class_embedding", "distillation_token", "register_tokens")




def _sizes(module: torch.nn.Module) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(image_size, patch_size): the embeddings' config, else their patch embedding's (built
    from the config)."""
    for owner in (getattr(module, "config", None), getattr(module, "patch_embeddings", None),
                  module):
        image = int_pair(getattr(owner, "image_size", None))
        patch = int_pair(getattr(owner, "patch_size", None))
        if image and patch:
            return image, patch
    return None


def _embedding_role(module: torch.nn.Module) -> tuple[str, Role] | None:
    pos = module._parameters.get("position_embeddings")
    embedding = module._modules.get("position_embedding")
    if isinstance(pos, torch.Tensor) and pos.dim() == 3:
        key, tokens, layout = "position_embeddings", pos.shape[1], "tokens"
    elif isinstance(embedding, torch.nn.Embedding):
        key, tokens, layout = "position_embedding.weight", embedding.num_embeddings, "rows"
    else:
        return None
    patchify = module._modules.get("patch_embeddings") or module._modules.get("patch_embedding")
    sizes = _sizes(module)
    if patchify is None or sizes is None:
        return None  # not a vision embedding (text models' positions are token indexes)
    (ih, iw), (ph, pw) = sizes
    grid = (ih // ph, iw // pw)
    capacity = 0
    for pname in _PREFIX_PARAMS:
        param = module._parameters.get(pname)
        if param is not None:
            capacity += 1 if param.dim() < 2 else int(param.shape[-2])
    prefix = tokens - grid[0] * grid[1]
    if not 0 <= prefix <= capacity:
        return None  # tokens after the grid (YOLOS detection tokens...): not this layout
    return key, _role(grid, prefix, layout, type(module).__name__ in _HF_ANTIALIAS)


def transformers_position_roles(model: torch.nn.Module, prefix: str = "") -> dict[str, Any]:
    """transformers vision embeddings (ViT, DeiT, BEiT / Data2Vec-vision absolute, Dinov2,
    CLIP, SigLIP...): their position embedding (``[1, prefix + N, C]`` parameter or
    ``nn.Embedding`` ``[prefix + N, C]``), grid ``config.image_size // config.patch_size``,
    prefix tokens the embeddings' class / distillation / register tokens that fit the count;
    and a persistent ``position_ids`` buffer (role ``position_ids``, kept as built)."""
    out: dict[str, Any] = {}
    for path, module in model.named_modules():
        if not type(module).__module__.startswith("transformers."):
            continue
        found = _embedding_role(module)
        if found is None:
            continue
        base = f"{prefix}{path}." if path else prefix
        out[base + found[0]] = found[1]
        ids = module._buffers.get("position_ids")
        if ids is not None and "position_ids" not in module._non_persistent_buffers_set:
            out[base + "position_ids"] = Role("position_ids", (("positions", ids.shape[-1]),))
    return out
