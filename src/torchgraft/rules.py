"""The framework-rules seam: what a model's framework says about loading it.

The plan consults one small protocol, :class:`FrameworkRules`, instead of knowing timm or
transformers. A rule set answers, for a model of its framework:

- ``tolerated(model)``: state-dict prefixes of replaceable heads whose shape mismatches are
  skipped (with the reason given) under ``mismatch=None`` (timm's classifier);
- ``renamer(model)``: a function checkpoint name -> model name the framework applies itself
  (transformers' conversion mapping), built lazily, only when the names do not already fit;
- ``filter(model, state)``: the framework's own conversion of a state dict in an original
  layout (timm's ``checkpoint_filter_fn``), run when ``filter="<name>"`` is passed;
- ``roles(model)``: model tensor name -> role (``"classifier"``, ``"first_conv"``,
  ``"pos_embed"``...), from the framework's own metadata, for adapters.

Rule sets are a registry (:func:`register_rules`); frameworks are never imported here unless
the model comes from them. Front-ends that *call* ``tg.load`` (the mmengine initializer) live in
``torchgraft.integrations`` and are not consulted by the plan.

Example:
    >>> import torch
    >>> model_rules(torch.nn.Linear(2, 2), auto=True).tolerated
    {}
    >>> sorted(r.name for r in registered_rules())
    ['timm', 'transformers']
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

Renamer = Callable[[str], str]
StateFilter = Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]


class FrameworkRules(Protocol):
    """One framework's loading rules (see the module docstring). Every method may return an
    empty result; ``applies`` must be cheap and must not import the framework."""

    name: str

    def applies(self, model: torch.nn.Module) -> bool: ...

    def tolerated(self, model: torch.nn.Module) -> dict[str, str]: ...

    def renamer(self, model: torch.nn.Module) -> Renamer | None: ...

    def filter(self, model: torch.nn.Module,
               state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]: ...

    def roles(self, model: torch.nn.Module) -> dict[str, str]: ...


class TimmRules:
    """timm: the replaceable classifier of ``pretrained_cfg`` and ``checkpoint_filter_fn``."""

    name = "timm"

    def applies(self, model: torch.nn.Module) -> bool:
        return "timm" in sys.modules  # a timm model would have imported it

    def tolerated(self, model: torch.nn.Module) -> dict[str, str]:
        from .integrations.timm import classifier_names, skip_reason

        return {p: skip_reason(p) for p in classifier_names(model)}

    def renamer(self, model: torch.nn.Module) -> Renamer | None:
        return None

    def filter(self, model: torch.nn.Module,
               state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        from .integrations.timm import timm_filter

        return timm_filter(model, state)

    def roles(self, model: torch.nn.Module) -> dict[str, str]:
        out: dict[str, str] = {}
        for path, module in model.named_modules():
            cfg = vars(module).get("pretrained_cfg")
            if cfg is None:
                continue
            cfg = cfg if isinstance(cfg, Mapping) else getattr(cfg, "__dict__", {})
            base = f"{path}." if path else ""
            for key in ("first_conv", "classifier"):
                value = cfg.get(key)
                for name in [value] if isinstance(value, str) else list(value or ()):
                    if isinstance(name, str) and name:
                        out[f"{base}{name}."] = key
            pos = _timm_pos_embed_role(module)
            if pos is not None:
                out[f"{base}pos_embed"] = pos
        return out


def _timm_pos_embed_role(module: torch.nn.Module) -> Any:
    """timm ViT-style models: the pos_embed's grid, prefix tokens and layout (see
    :func:`torchgraft.adapters.position_roles.timm_pos_embed_role`)."""
    from .adapters.position_roles import timm_pos_embed_role

    return timm_pos_embed_role(module)


class TransformersRules:
    """transformers: the hub-name conversion mapping ``from_pretrained`` applies."""

    name = "transformers"

    def applies(self, model: torch.nn.Module) -> bool:
        return "transformers" in sys.modules

    def tolerated(self, model: torch.nn.Module) -> dict[str, str]:
        return {}

    def renamer(self, model: torch.nn.Module) -> Renamer | None:
        from .integrations.transformers import hf_renamer

        return hf_renamer(model)

    def filter(self, model: torch.nn.Module,
               state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        from .errors import OptionError

        raise OptionError("filter='transformers': transformers' names are mapped by auto=True; "
                          "there is no separate filter")

    def roles(self, model: torch.nn.Module) -> dict[str, Any]:
        """The input and (untied) output token embeddings, from the model's own API; vision
        position embeddings from the embeddings' config and tokens."""
        try:
            from transformers import PreTrainedModel
        except ImportError:
            return {}
        from .transforms import Role

        inner = getattr(model, "_orig_mod", model)
        if not isinstance(inner, PreTrainedModel):
            return {}
        wanted = []
        for getter in ("get_input_embeddings", "get_output_embeddings"):
            try:
                module = getattr(inner, getter)()
            except Exception:  # some models raise NotImplementedError
                module = None
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.nn.Parameter):
                wanted.append(weight)
        prefix = "_orig_mod." if inner is not model else ""
        out: dict[str, Any] = {}
        for name, param in inner.named_parameters(remove_duplicate=False):
            if any(param is w for w in wanted):
                out[prefix + name] = Role("token_embedding", (("param", param),))
        from .adapters.position_roles import transformers_position_roles

        out.update(transformers_position_roles(inner, prefix))
        return out


_RULES: list[FrameworkRules] = [TimmRules(), TransformersRules()]


def register_rules(rules: FrameworkRules, first: bool = True) -> None:
    """Add a framework's rule set (``first=True``: consulted before the built-in ones)."""
    if first:
        _RULES.insert(0, rules)
    else:
        _RULES.append(rules)


def registered_rules() -> list[FrameworkRules]:
    return list(_RULES)


def rules_for(model: torch.nn.Module) -> list[FrameworkRules]:
    """The rule sets that apply to ``model``."""
    return [r for r in _RULES if r.applies(model)]


@dataclass
class ModelRules:
    """What the plan takes from the frameworks for one model (combined over rule sets)."""

    tolerated: dict[str, str] = field(default_factory=dict)
    renamer: Callable[[], Renamer | None] | None = None  # built only when names need it
    roles: Callable[[], dict[str, Any]] | None = None  # framework, then structural


RoleFinder = Callable[[torch.nn.Module], dict[str, Any]]
_ROLE_FINDERS: list[RoleFinder] = []


def register_role_finder(finder: RoleFinder, first: bool = False) -> None:
    """Add a structural role finder: ``finder(model) -> {name or "prefix.": role}`` from module
    types and attributes (never from names alone). Consulted after the frameworks' rules: a
    role kind a framework names for the model overrides every structural role of that kind."""
    if first:
        _ROLE_FINDERS.insert(0, finder)
    else:
        _ROLE_FINDERS.append(finder)


def structural_roles(model: torch.nn.Module) -> dict[str, Any]:
    """Roles from every registered role finder (built-in ones in :mod:`torchgraft.adapters`)."""
    from .transforms import _load_builtins

    _load_builtins()
    out: dict[str, Any] = {}
    for finder in _ROLE_FINDERS:
        for name, role in finder(model).items():
            out.setdefault(name, role)
    return out


def _merged_roles(model: torch.nn.Module, framework: dict[str, Any]) -> dict[str, Any]:
    kinds = {getattr(r, "kind", r) for r in framework.values()}
    out = {n: r for n, r in structural_roles(model).items()
           if getattr(r, "kind", r) not in kinds}
    out.update(framework)
    return out


def model_rules(model: torch.nn.Module, auto: bool) -> ModelRules:
    """The combined rules for ``model``; with ``auto=False`` only the structural roles."""
    if not auto:
        return ModelRules(roles=lambda: _merged_roles(model, {}))
    found = rules_for(model)
    tolerated: dict[str, str] = {}
    for r in found:
        tolerated.update(r.tolerated(model))

    def renamer() -> Renamer | None:
        for r in found:
            fn = r.renamer(model)
            if fn is not None:
                return fn
        return None

    def roles() -> dict[str, Any]:
        out: dict[str, Any] = {}
        for r in found:
            out.update(r.roles(model))
        return _merged_roles(model, out)

    return ModelRules(tolerated, renamer if found else None, roles)


def resolve_filter(spec: Any, model: torch.nn.Module) -> StateFilter | None:
    """``filter=``: None, a callable ``(model, state) -> state``, or a framework's name."""
    from .errors import OptionError

    if spec is None or callable(spec):
        return spec
    if isinstance(spec, str):
        for r in _RULES:
            if r.name == spec:
                return r.filter
        raise OptionError(f"filter={spec!r}: no framework of that name; known: "
                          f"{[r.name for r in _RULES]}, or pass a function (model, state) -> "
                          "state")
    raise OptionError(f"filter={spec!r}: expected None, a framework name such as 'timm', or a "
                      "function (model, state) -> state")
