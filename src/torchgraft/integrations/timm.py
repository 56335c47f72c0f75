"""timm: the classifier rule of timm's own pretrained loading, and its ``checkpoint_filter_fn``.

``tg.load(timm_model, path)`` follows timm where timm has a rule:

* **Classifier.** When the checkpoint's classifier does not fit the model (``num_classes``
  differs), timm drops it and keeps the model's freshly initialised head. :func:`classifier_names`
  gives the state-dict prefixes of that classifier (``model.pretrained_cfg['classifier']``); the
  plan stage reports a shape mismatch under them as skipped, with :func:`skip_reason`, instead of
  raising under the default ``mismatch="error"``.
* **Original layouts.** A file in a model family's original layout (OpenAI CLIP, the original
  DeiT/BEiT/ConvNeXt releases...) is converted by the family's own ``checkpoint_filter_fn``:
  ``tg.load(model, path, timm_filter=True)`` runs :func:`timm_filter` on the selected state dict.

Neither function imports timm unless the model is a timm model.

Example:
    >>> import torch
    >>> classifier_names(torch.nn.Linear(2, 2))
    []
    >>> skip_reason("head.fc.")
    "timm classifier 'head.fc' does not fit (num_classes differs): left as initialised"
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import OptionError
from ..names import strip_wrappers

__all__ = ["classifier_names", "skip_reason", "timm_filter", "timm_module"]


def _classifiers(cfg: Any) -> list[str]:
    if not isinstance(cfg, Mapping):
        cfg = getattr(cfg, "__dict__", None)  # a timm PretrainedCfg dataclass
        if not isinstance(cfg, Mapping):
            return []
    clf = cfg.get("classifier")
    if isinstance(clf, str):
        return [clf] if clf else []
    if isinstance(clf, (tuple, list)):
        return [c for c in clf if isinstance(c, str) and c]
    return []


def classifier_names(model: torch.nn.Module) -> list[str]:
    """State-dict prefixes of the timm classifier(s) in ``model`` (``['head.fc.']``...).

    Read from ``pretrained_cfg['classifier']`` (a str or a tuple of str) of the outermost timm
    model(s) inside ``model``: ``model`` itself, or a timm model held by a wrapper (then the
    prefix includes the path, e.g. ``'net.head.fc.'``, or ``'_orig_mod.head.'`` for
    ``torch.compile``). Empty for models without a ``pretrained_cfg``.

    Example:
        >>> import timm
        >>> classifier_names(timm.create_model("resnet18", num_classes=10))
        ['fc.']
    """
    found: list[str] = []
    taken: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(t) for t in taken):
            continue
        # the instance's own attribute: torch.compile's wrapper forwards getattr to the model
        names = _classifiers(vars(module).get("pretrained_cfg"))
        if not names:
            continue
        base = f"{path}." if path else ""
        taken.append(base)
        found += [f"{base}{n}." for n in names if f"{base}{n}." not in found]
    return found


def skip_reason(prefix: str) -> str:
    """The report's reason for a classifier left as initialised.

    Example:
        >>> skip_reason("head.")
        "timm classifier 'head' does not fit (num_classes differs): left as initialised"
    """
    return (f"timm classifier '{prefix.rstrip('.')}' does not fit (num_classes differs): "
            "left as initialised")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    seen = 0
    while seen < 8 and isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
        model = model._orig_mod  # torch.compile
        seen += 1
    return model


def timm_module(model: torch.nn.Module) -> Any:
    """The timm model module (e.g. ``timm.models.vision_transformer``) defining ``model``.

    The first class in ``type(model).__mro__`` defined under ``timm.``, so a user subclass of
    a timm model finds its parent's module. Raises :class:`OptionError` if there is none.

    Example:
        >>> import timm
        >>> timm_module(timm.create_model("resnet18")).__name__
        'timm.models.resnet'
    """
    inner = _unwrap(model)
    for cls in type(inner).__mro__:
        name = getattr(cls, "__module__", "") or ""
        if name == "timm" or name.startswith("timm."):
            module = sys.modules.get(name)
            if module is not None:
                return module
    raise OptionError(
        f"timm_filter=True needs a timm model; {type(inner).__module__}.{type(inner).__name__} "
        "is not one (use rename= to convert the names instead)")


def timm_filter(model: torch.nn.Module,
                state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Run the model family's own ``checkpoint_filter_fn(state, model)`` from timm.

    Converts a state dict in the family's original layout (OpenAI CLIP ``visual.*``, original
    DeiT, BEiT...) to timm's names and shapes, exactly as ``timm.create_model(...,
    pretrained=True)`` would. Leading ``module.`` / ``_orig_mod.`` components are removed from
    the names first, and a ``torch.compile``d model is unwrapped (the result then has the inner
    model's names, which ``auto`` maps back). ``state`` is not modified.

    Raises :class:`OptionError` when ``model`` is not a timm model or its module has no
    ``checkpoint_filter_fn``.

    Example:
        >>> import timm
        >>> model = timm.create_model("convnext_atto")
        >>> list(timm_filter(model, model.state_dict())) == list(model.state_dict())
        True
    """
    inner = _unwrap(model)
    module = timm_module(inner)
    fn = getattr(module, "checkpoint_filter_fn", None)
    if not callable(fn):
        raise OptionError(
            f"timm_filter=True: {module.__name__} (model {type(inner).__name__}) has no "
            "checkpoint_filter_fn; load without timm_filter, with rename= if the names differ")
    plain = {strip_wrappers(k): v for k, v in state.items()}
    out = fn(plain, inner)
    if not isinstance(out, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in out.items()):
        raise OptionError(f"timm_filter=True: {module.__name__}.checkpoint_filter_fn did not "
                          "return a state dict of tensors")
    return dict(out)
