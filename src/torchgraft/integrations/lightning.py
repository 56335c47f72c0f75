"""Lightning: build a ``LightningModule`` from a ``.ckpt`` without running its pickled code.

:func:`load_from_checkpoint` is ``Cls.load_from_checkpoint(path, **overrides)`` with the file
read by torchgraft's restricted reader: ``hyper_parameters`` holding plain values, an
``argparse.Namespace`` or an OmegaConf ``DictConfig``/``ListConfig`` are rebuilt from the
recorded plain data (a Namespace as ``Namespace(**state)``; an OmegaConf config as its plain
content, turned into a real ``DictConfig`` with ``OmegaConf.create`` when omegaconf is installed,
as Lightning does), the class is constructed by Lightning's own rules for
``save_hyperparameters`` (``cls(**hparams)``, or ``cls(name=hparams)`` for a single saved
argument; overrides win), and the weights are loaded with :func:`tg.load`. A global the file
names that cannot be rebuilt (any other class instance) is an
:class:`~torchgraft.UnsafeCheckpointError` naming it and its key, with the fix: pass that
argument yourself as an override.

:func:`fine_tune_from` is the ``ckpt_path=`` equivalent for fine-tuning from the weights only
(no optimizer, loop or callback state): ``tg.load(model, path, select='state_dict')``.

Works with ``pytorch_lightning`` and with the newer ``lightning`` package (``lightning.pytorch``):
the package is the one ``cls`` (or ``model``) derives from; this module imports neither.

Example:
    >>> from torchgraft.integrations.lightning import load_from_checkpoint
    >>> model = load_from_checkpoint(LitClassifier, "last.ckpt", lr=0.01)  # doctest: +SKIP
    >>> model.hparams.lr, load_from_checkpoint.last_report.ok  # doctest: +SKIP
    (0.01, True)
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import logging
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import torch

from .. import api
from ..errors import OptionError, SelectError, UnsafeCheckpointError
from ..formats import open_checkpoint
from ..formats.unpickler import Placeholder
from ..report import LoadReport
from ._rebuild import placeholders_in, rebuild

__all__ = ["load_from_checkpoint", "fine_tune_from", "lightning_package"]

log = logging.getLogger("torchgraft")

_PACKAGES = ("lightning.pytorch", "pytorch_lightning")
_HPARAMS = "hyper_parameters"
_HPARAMS_NAME = "hparams_name"
_HPARAMS_TYPE = "hparams_type"
_PAST_HPARAMS = ("hparams", "module_arguments")  # Lightning's CHECKPOINT_PAST_HPARAMS_KEYS
_OMEGA_CONTAINERS = ("omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig")


def lightning_package(cls: type) -> ModuleType:
    """The Lightning package (``lightning.pytorch`` or ``pytorch_lightning``) ``cls`` derives from.

    Only packages already imported are looked at (``cls``'s module imported its own).

    Example:
        >>> lightning_package(int)
        Traceback (most recent call last):
        ...
        torchgraft.errors.OptionError: int is not a LightningModule (lightning.pytorch, pytorch_lightning)
    """
    for name in _PACKAGES:
        pkg = sys.modules.get(name)
        base = getattr(pkg, "LightningModule", None)
        if isinstance(cls, type) and base is not None and issubclass(cls, base):
            return pkg  # type: ignore[return-value]
    shown = getattr(cls, "__name__", type(cls).__name__)
    raise OptionError(f"{shown} is not a LightningModule ({', '.join(_PACKAGES)})")


# --- OmegaConf containers, rebuilt from their recorded content ------------------------------


def _omega_node(value: Any, plain: Callable[[Any], Any]) -> Any:
    """A value inside an OmegaConf container: nodes give their ``_val``, containers recurse."""
    if isinstance(value, Placeholder) and value.qualname in _OMEGA_CONTAINERS:
        return _omega_content(value, plain)
    if isinstance(value, Placeholder) and value.qualname.startswith("omegaconf.nodes."):
        state = value.state if isinstance(value.state, Mapping) else {}
        return plain(state.get("_val"))
    return plain(value)


def _omega_content(ph: Placeholder, plain: Callable[[Any], Any]) -> Any:
    state = ph.state if isinstance(ph.state, Mapping) else {}
    content = state.get("_content")
    if isinstance(content, Mapping):
        return {plain(k): _omega_node(v, plain) for k, v in content.items()}
    if isinstance(content, list):
        return [_omega_node(v, plain) for v in content]
    return plain(content)  # None, '???' (missing) or an '${...}' interpolation


def _omega_flags(ph: Placeholder) -> dict[str, bool]:
    state = ph.state if isinstance(ph.state, Mapping) else {}
    meta = state.get("_metadata")
    flags = meta.state.get("flags") if isinstance(meta, Placeholder) and isinstance(
        meta.state, Mapping) else None
    if not isinstance(flags, Mapping):
        return {}
    return {k: v for k, v in flags.items() if k in ("readonly", "struct") and isinstance(v, bool)}


def _omega_container(ph: Placeholder, plain: Callable[[Any], Any]) -> Any:
    """A DictConfig/ListConfig: its plain content, made a real OmegaConf container when omegaconf
    is installed (never for a bare string, which OmegaConf.create would parse as YAML)."""
    content = _omega_content(ph, plain)
    if not isinstance(content, (dict, list)):
        return content
    try:
        from omegaconf import OmegaConf
    except ImportError:
        return content
    cfg = OmegaConf.create(content)
    flags = _omega_flags(ph)
    if flags.get("struct"):
        OmegaConf.set_struct(cfg, True)
    if flags.get("readonly"):
        OmegaConf.set_readonly(cfg, True)
    return cfg


_REBUILDERS = {name: _omega_container for name in _OMEGA_CONTAINERS}


# --- Lightning's _load_state rules -----------------------------------------------------------


def _init_names(cls: type) -> tuple[list[str], bool]:
    """``cls.__init__``'s named arguments (no self, *args, **kwargs) and whether it takes **kw."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    named = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return named, any(p.kind == p.VAR_KEYWORD for p in params)


def _convert_type(hparams: dict[str, Any], kind: Any, pkg: ModuleType) -> Any:
    """Lightning's ``_convert_loaded_hparams``: the saved ``hparams_type`` applied to the dict."""
    if not kind:
        return hparams
    if isinstance(kind, str):  # checkpoints of old Lightning versions
        return importlib.import_module(f"{pkg.__name__}.utilities.parsing").AttributeDict(hparams)
    qualname = getattr(kind, "qualname", "")
    if qualname == "omegaconf.dictconfig.DictConfig":
        try:
            from omegaconf import OmegaConf
        except ImportError:
            warnings.warn("the checkpoint's hyper-parameters are an OmegaConf DictConfig and "
                          "omegaconf is not installed: they are passed as a plain dict "
                          "(interpolations such as '${...}' stay unresolved text)", stacklevel=3)
            return hparams
        return OmegaConf.create(hparams)
    if isinstance(kind, type) and issubclass(kind, dict):  # a trusted read: the real class
        return kind(hparams)
    raise UnsafeCheckpointError(
        f"the checkpoint's hparams_type is {qualname or kind!r}; torchgraft does not construct it "
        "(that would run code the file names). Pass the hyper-parameters as overrides, or "
        "load with trust=True if you trust the file")


def _as_mapping(value: Any, key: str) -> Any:
    """The saved hyper-parameters as something ``dict.update`` takes (a Namespace: its vars)."""
    if isinstance(value, argparse.Namespace):
        return vars(value)
    if isinstance(value, Mapping) or (hasattr(value, "keys") and hasattr(value, "update")):
        return value
    if isinstance(value, Placeholder):
        raise UnsafeCheckpointError(
            f"the checkpoint's {key!r} is a pickled {value.qualname} object; torchgraft does not "
            "construct it (that would run code the file names). Pass the hyper-parameters as "
            "overrides, or load with trust=True if you trust the file")
    raise UnsafeCheckpointError(f"the checkpoint's {key!r} is {type(value).__name__}, not a "
                                "dict of hyper-parameters; pass them as overrides")


def _class_kwargs(cls: type, checkpoint: dict[str, Any], overrides: dict[str, Any],
                  pkg: ModuleType) -> dict[str, Any]:
    """The keyword arguments Lightning's ``load_from_checkpoint`` would construct ``cls`` with."""
    saved = _as_mapping(checkpoint.setdefault(_HPARAMS, {}), _HPARAMS)
    saved.update(overrides)  # Lightning updates the saved hparams with the overrides first
    names, varkw = _init_names(cls)
    loaded: dict[str, Any] = {}
    for key in _PAST_HPARAMS:
        loaded.update(_as_mapping(checkpoint.get(key, {}), key))
    loaded.update(saved)
    loaded = _convert_type(loaded, checkpoint.get(_HPARAMS_TYPE), pkg)
    args_name = checkpoint.get(_HPARAMS_NAME)
    if args_name and args_name in names:
        loaded = {args_name: loaded}
    kwargs = dict(loaded)
    kwargs.update(overrides)
    if not varkw:
        kwargs = {k: v for k, v in kwargs.items() if k in names}
    return kwargs


def _refuse_placeholders(kwargs: dict[str, Any], cls: type, path: Any) -> None:
    bad = list(placeholders_in(kwargs))
    if bad:
        listed = "; ".join(f"{where}: {name}" for where, name in bad[:8])
        first = bad[0][0].split("]")[0].strip("[]'\"")
        raise UnsafeCheckpointError(
            f"{path}: the hyper-parameters for {cls.__name__}(...) hold objects torchgraft does "
            f"not rebuild (that would run code the file names): {listed}. Pass them yourself, "
            f"e.g. load_from_checkpoint({cls.__name__}, path, {first}=...), or load with "
            "trust=True if you trust the file")


def _instantiate(cls: type, kwargs: dict[str, Any], pkg: ModuleType, path: Any) -> Any:
    instantiator = kwargs.pop("_instantiator", None)
    if instantiator is None:
        return cls(**kwargs)
    saving = importlib.import_module(f"{pkg.__name__}.core.saving")
    allowed = getattr(saving, "_ALLOWED_INSTANTIATORS", {f"{pkg.__name__}.cli.instantiate_module"})
    if not isinstance(instantiator, str) or instantiator not in allowed:
        raise UnsafeCheckpointError(f"{path}: the checkpoint asks for the instantiator "
                                    f"{instantiator!r}, which is not in Lightning's allowlist "
                                    f"{sorted(allowed)}")
    module, _, name = instantiator.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)(cls, kwargs)


def _overridden(obj: Any, name: str, pkg: ModuleType) -> bool:
    return getattr(type(obj), name, None) is not getattr(pkg.LightningModule, name, None)


def _read(path: str, trust: bool) -> dict[str, Any]:
    root = open_checkpoint(path, trust=trust).root
    if not isinstance(root, dict) or "state_dict" not in root:
        found = sorted(map(str, root))[:10] if isinstance(root, Mapping) else type(root).__name__
        raise SelectError(f"{path}: not a Lightning checkpoint (no 'state_dict' entry; found "
                          f"{found}). For a plain state dict use tg.load(YourModule(...), path)")
    return root


def load_from_checkpoint(cls: type, checkpoint_path: str | os.PathLike, *,
                         map_location: str | torch.device | None = None,
                         strict: bool | None = None, trust: bool = False,
                         load_options: Mapping[str, Any] | None = None,
                         **overrides: Any) -> Any:
    """``cls.load_from_checkpoint(checkpoint_path, **overrides)``, safely (see the module doc).

    ``strict`` as in Lightning (``None``: the module's ``strict_loading``, default True);
    ``map_location``: move the module there after loading (Lightning would restore the saved
    device; here the module stays on the CPU unless told). ``load_options``: further
    :func:`tg.load` keywords (``rename``, ``mismatch``, ``min_loaded``...). ``trust=True`` reads
    with plain pickle (runs the file's code). As in Lightning, ``on_load_checkpoint`` and
    ``configure_model`` run when the class overrides them; the report is logged on the
    ``torchgraft`` logger and kept in ``load_from_checkpoint.last_report``.

    Example:
        >>> load_from_checkpoint(int, "x.ckpt")
        Traceback (most recent call last):
        ...
        torchgraft.errors.OptionError: int is not a LightningModule (lightning.pytorch, pytorch_lightning)
    """
    pkg = lightning_package(cls)
    path = os.path.expanduser(os.fspath(checkpoint_path))
    root = _read(path, trust)
    hparam_keys = (_HPARAMS, _HPARAMS_NAME, _HPARAMS_TYPE, *_PAST_HPARAMS)
    checkpoint = rebuild({k: v for k, v in root.items() if k in hparam_keys}, _REBUILDERS)
    kwargs = _class_kwargs(cls, checkpoint, dict(overrides), pkg)
    _refuse_placeholders(kwargs, cls, checkpoint_path)
    obj = _instantiate(cls, kwargs, pkg, checkpoint_path)
    own = getattr(obj, "_strict_loading", None)
    if own is not None and strict is not None and strict != obj.strict_loading:
        raise OptionError(f"strict={strict!r} conflicts with {cls.__name__}.strict_loading="
                          f"{obj.strict_loading!r}; give the same value for both")
    strict = getattr(obj, "strict_loading", True) if strict is None else strict
    if _overridden(obj, "configure_model", pkg):
        obj.configure_model()
    options = dict(load_options or {})
    options.setdefault("strict", bool(strict))
    source: Any = path
    if _overridden(obj, "on_load_checkpoint", pkg):  # it sees (and may edit) everything
        others = {k: v for k, v in root.items() if k not in hparam_keys}
        checkpoint.update(rebuild(others, _REBUILDERS))
        obj.on_load_checkpoint(checkpoint)
        source = checkpoint["state_dict"]
    else:  # straight from the file: tensors are read into the module's own memory
        options.setdefault("select", "state_dict")
        options.setdefault("trust", trust)
    report = api.load(obj, source, **options)
    load_from_checkpoint.last_report = report  # type: ignore[attr-defined]
    log.info("%s", report)
    if not options["strict"]:
        _warn_incompatible(report)
    if map_location is not None:
        obj = obj.to(map_location)
    return obj


load_from_checkpoint.last_report = None  # type: ignore[attr-defined]


def _warn_incompatible(report: LoadReport) -> None:
    if report.missing_keys:
        warnings.warn("Found keys that are in the model state dict but not in the checkpoint: "
                      f"{report.missing_keys}", stacklevel=3)
    if report.unexpected_keys:
        warnings.warn("Found keys that are not in the model state dict but in the checkpoint: "
                      f"{report.unexpected_keys}", stacklevel=3)


def fine_tune_from(model: torch.nn.Module, ckpt_path: str | os.PathLike,
                   **options: Any) -> LoadReport:
    """Load only the weights of a Lightning ``.ckpt`` into ``model`` (the ``ckpt_path=`` equivalent
    for fine-tuning: no optimizer, loop, callback or hyper-parameter state).

    ``model`` is the LightningModule or the plain module inside it (``auto`` strips the
    ``model.``-style attribute prefix). ``options`` are :func:`tg.load` keywords; ``select``
    defaults to ``'state_dict'``. Returns the report.

    Example:
        >>> report = fine_tune_from(lit.model, "last.ckpt", mismatch="skip")  # doctest: +SKIP
    """
    options.setdefault("select", "state_dict")
    return api.load(model, os.path.expanduser(os.fspath(ckpt_path)), **options)
