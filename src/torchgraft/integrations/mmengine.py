"""mmengine / OpenMMLab: the ``TorchgraftPretrained`` weight initializer.

Importing this module registers ``TorchgraftPretrained`` in mmengine's ``WEIGHT_INITIALIZERS``.
It is a drop-in replacement for mmengine's ``Pretrained`` that loads through :func:`tg.load`:
any container layout (``state_dict``/``model``/``module.``/backbone-only/Lightning...), files
that ``torch.load(weights_only=True)`` refuses (mmengine ``Runner`` checkpoints, ``meta`` holding
an ``argparse.Namespace``) without running their pickled code, and a clear error and report
instead of a silent partial load.

In a config (``custom_imports`` imports this module before the model is built)::

    custom_imports = dict(imports=['torchgraft.integrations.mmengine'],
                          allow_failed_imports=False)
    model = dict(
        type='ImageClassifier',
        backbone=dict(
            type='ConvNeXt', arch='atto', use_grn=True, layer_scale_init_value=0.,
            init_cfg=dict(type='TorchgraftPretrained', checkpoint='convnext-v2-atto.pth',
                          prefix='backbone')),
        ...)

Options: every :func:`tg.load` keyword (``select``, ``prefix``, ``rename``, ``auto``,
``mismatch``, ``strict``, ``trust``, ``progress``; ``rename`` may be a list of
``[regex, replacement]`` lists as configs write them). For drop-in compatibility with
``Pretrained`` / ``load_checkpoint`` it also takes ``map_location`` (ignored: tensors are copied
straight into the module's own parameters, on their device) and ``revise_keys`` (a list of
``(regex, replacement)`` pairs, applied like ``rename`` and before it). ``checkpoint`` is a
path, a folder, or an ``http(s)://`` / ``open-mmlab://`` / ``torchvision://`` / ``mmcls://``
address, downloaded once into torch hub's cache (where mmengine caches it too), or an in-memory
state dict / checkpoint mapping.

The report (``str(report)``) is logged through mmengine's current logger; the last one is also
kept in ``TorchgraftPretrained.last_report``. Errors raise the same :class:`TorchgraftError`
subclasses as :func:`tg.load`, before any weight is touched.

Ordering. mmengine runs an init_cfg of type ``'Pretrained'`` *after* the module's other
initializers and after its children's ``init_weights()`` (so nothing overwrites the loaded
weights), but it recognises only that literal name. Importing this module therefore wraps
``BaseModule.init_weights`` (once, idempotently) so that a ``TorchgraftPretrained`` entry gets
the same treatment, and a bit more: on a submodule whose class overrides ``init_weights`` (e.g.
mmpretrain's ``VisionTransformer`` re-draws ``pos_embed`` after ``super().init_weights()``
unless the type is literally ``'Pretrained'``), the load runs after that override has returned.
Modules without a ``TorchgraftPretrained`` init_cfg are initialised exactly as before. Two limits:
on the module you call ``init_weights()`` on yourself, code its class runs *after*
``super().init_weights()`` still runs after the load; and ``TorchgraftPretrained`` given inside an
``override=`` entry is an ordinary initializer (as ``Pretrained`` would be there).

Example:
    >>> import torch
    >>> from mmengine.model import BaseModule
    >>> import torchgraft.integrations.mmengine as tgmm
    >>> class Net(BaseModule):
    ...     def __init__(self, init_cfg=None):
    ...         super().__init__(init_cfg)
    ...         self.fc = torch.nn.Linear(4, 2)
    >>> ckpt = {"state_dict": {"module.fc.weight": torch.ones(2, 4),
    ...                        "module.fc.bias": torch.zeros(2)}}
    >>> net = Net(init_cfg=dict(type="TorchgraftPretrained", checkpoint=ckpt))
    >>> net.init_weights()   # doctest: +SKIP
    >>> bool((net.fc.weight == 1).all())   # doctest: +SKIP
    True
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlparse

import torch

try:
    from mmengine.logging import print_log
    from mmengine.model import BaseModule
    from mmengine.model.weight_init import initialize, update_init_info
    from mmengine.registry import WEIGHT_INITIALIZERS
except ImportError as _err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "torchgraft.integrations.mmengine needs mmengine (pip install mmengine)"
    ) from _err

from .. import api
from ..errors import OptionError, TorchgraftError
from ..report import LoadReport

__all__ = ["TorchgraftPretrained", "NAME", "install_init_order", "resolve_checkpoint"]

#: The registry name to use as ``init_cfg=dict(type=NAME, ...)``.
NAME = "TorchgraftPretrained"

_NOT_OPTIONS = {"model", "source"}


def _load_option_names() -> list[str]:
    """Keyword options of ``tg.load`` (read from its signature, so new options pass through)."""
    params = inspect.signature(api.load).parameters
    return [n for n, p in params.items() if n not in _NOT_OPTIONS
            and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _regex_pairs(value: Any, what: str) -> list[tuple[str, str]]:
    """``[[regex, repl], ...]`` (lists or tuples, as configs write them) → list of tuples."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise OptionError(f"{what}= must be a list of [regex, replacement] pairs, "
                          f"not {type(value).__name__}")
    pairs = []
    for item in value:
        ok = (isinstance(item, Sequence) and not isinstance(item, str) and len(item) == 2
              and all(isinstance(x, str) for x in item))
        if not ok:
            raise OptionError(f"{what}=: expected [regex, replacement] pairs of strings, "
                              f"got {item!r}")
        pairs.append((item[0], item[1]))
    return pairs


def _normalise_rename(rename: Any, revise_keys: Any) -> Any:
    revise = _regex_pairs(revise_keys, "revise_keys") if revise_keys is not None else []
    if rename is None:
        return revise or None
    if isinstance(rename, Mapping):
        if revise:
            raise OptionError("give either rename= as a dict or revise_keys=, not both "
                              "(or write rename= as [regex, replacement] pairs)")
        return {str(k): str(v) for k, v in rename.items()}
    if callable(rename):
        if revise:
            raise OptionError("give either rename= as a function or revise_keys=, not both")
        return rename
    return revise + _regex_pairs(rename, "rename")


# --- checkpoint addresses --------------------------------------------------------------------


def _download(url: str) -> str:
    """Download ``url`` once into ``<torch hub dir>/checkpoints`` (mmengine's cache too)."""
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    os.makedirs(folder, exist_ok=True)
    name = os.path.basename(urlparse(url).path) or "checkpoint.pth"
    target = os.path.join(folder, name)
    if not os.path.exists(target):
        print_log(f"torchgraft: downloading {url} to {target}", logger="current")
        torch.hub.download_url_to_file(url, target, progress=False)
    return target


def _mm_model_zoo(scheme: str) -> dict[str, str]:
    from mmengine.runner import checkpoint as mmckpt

    if scheme in ("open-mmlab", "openmmlab"):
        urls = dict(mmckpt.get_external_models())
        for old, new in mmckpt.get_deprecated_model_names().items():
            urls.setdefault(old, urls.get(new, ""))
        return urls
    if scheme == "torchvision":
        return dict(mmckpt.get_torchvision_models())
    return dict(mmckpt.get_mmcls_models())


def resolve_checkpoint(checkpoint: str | os.PathLike) -> str:
    """A local path for ``checkpoint``: paths as given (``~`` expanded); URLs downloaded once.

    Example:
        >>> resolve_checkpoint("~/ckpt.pth").endswith("ckpt.pth")
        True
    """
    text = os.fspath(checkpoint)
    if "://" not in text:
        return os.path.expanduser(text)
    scheme, _, rest = text.partition("://")
    if scheme in ("http", "https"):
        return _download(text)
    if scheme in ("open-mmlab", "openmmlab", "torchvision", "mmcls"):
        url = _mm_model_zoo(scheme).get(rest)
        if not url:
            raise OptionError(f"checkpoint={text!r}: {rest!r} is not in mmengine's {scheme} "
                              "model zoo list")
        return _download(url)
    raise OptionError(f"checkpoint={text!r}: torchgraft reads local files, folders and "
                      "http(s)/open-mmlab/torchvision/mmcls addresses; fetch this one first")


# --- the initializer -------------------------------------------------------------------------


@WEIGHT_INITIALIZERS.register_module(name=NAME, force=True)
class TorchgraftPretrained:
    """Initialise a module from a checkpoint through :func:`tg.load` (mmengine initializer).

    ``checkpoint`` is required; the keywords are ``tg.load``'s plus ``map_location`` (ignored)
    and ``revise_keys`` (regex pairs, applied like ``rename``).

    Example:
        >>> import torch
        >>> init = TorchgraftPretrained({"fc.weight": torch.ones(2, 4), "fc.bias": torch.zeros(2)},
        ...                             prefix="fc")
        >>> lin = torch.nn.Linear(4, 2)
        >>> init(lin)   # doctest: +SKIP
        >>> init.report.ok, bool((lin.weight == 1).all())   # doctest: +SKIP
        (True, True)
    """

    #: The report of the most recent load by any ``TorchgraftPretrained`` (None before).
    last_report: LoadReport | None = None

    def __init__(self, checkpoint: Any, *, map_location: Any = None, revise_keys: Any = None,
                 **options: Any) -> None:
        accepted = _load_option_names()
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise OptionError(
                f"{NAME}: unknown option(s) {unknown}; accepted: checkpoint, "
                f"{', '.join(accepted)}, map_location (ignored), revise_keys")
        options["rename"] = _normalise_rename(options.get("rename"), revise_keys)
        self.checkpoint = checkpoint
        self.map_location = map_location  # kept for repr only: tensors go where the module is
        self.options = options
        self.report: LoadReport | None = None
        self.wholemodule = False  # set by mmengine's _initialize; no meaning here

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items() if v is not None)
        return f"{NAME}(checkpoint={self.checkpoint!r}{', ' if opts else ''}{opts})"

    def __call__(self, module: torch.nn.Module) -> LoadReport:
        source = self.checkpoint
        if isinstance(source, (str, os.PathLike)):
            source = resolve_checkpoint(source)
        print_log(f"torchgraft: loading {self.checkpoint} into {type(module).__name__}",
                  logger="current")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", api.LowLoadWarning)
                report = api.load(module, source, **self.options)
        except TorchgraftError as err:
            failed = getattr(err, "report", None)
            if failed is not None:
                print_log(str(failed), logger="current", level=logging.ERROR)
            raise
        self.report = report
        TorchgraftPretrained.last_report = report
        print_log(str(report), logger="current")
        for w in caught:  # a low load: said in mmengine's log and as a Python warning
            if issubclass(w.category, api.LowLoadWarning):
                print_log(str(w.message), logger="current", level=logging.WARNING)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if hasattr(module, "_params_init_info"):
            update_init_info(module, init_info=self._get_init_info())
        return report

    def _get_init_info(self) -> str:
        return f"{NAME}: load from {self.checkpoint}"


# --- ordering: run after every other initializer, like mmengine's 'Pretrained' ---------------


def _is_ours(cfg: Any) -> bool:
    kind = cfg.get("type") if isinstance(cfg, Mapping) else None
    if kind is TorchgraftPretrained:
        return True
    return isinstance(kind, str) and kind.rsplit(".", 1)[-1] == NAME


def _split(init_cfg: Any) -> tuple[Any, list[Any]]:
    """``(init_cfg without ours, our entries)``; the first is None when nothing else is left."""
    if not init_cfg:
        return init_cfg, []
    cfgs = [init_cfg] if isinstance(init_cfg, Mapping) else list(init_cfg)
    ours = [c for c in cfgs if _is_ours(c)]
    if not ours:
        return init_cfg, []
    others = [c for c in cfgs if not _is_ours(c)]
    return (others or None), ours


def _start_init_info(module: BaseModule) -> None:
    """What mmengine's top-level ``init_weights`` sets up (so the dump can include our load)."""
    info: defaultdict = defaultdict(dict)
    for _, param in module.named_parameters():
        info[param]["init_info"] = (f"The value is the same before and after calling "
                                    f"`init_weights` of {module.__class__.__name__} ")
        info[param]["tmp_mean_value"] = param.data.mean().cpu()
    for sub in module.modules():
        sub._params_init_info = info


def _end_init_info(module: BaseModule, dump: bool) -> None:
    if dump:
        module._dump_init_info()
    for sub in module.modules():
        if "_params_init_info" in vars(sub):
            del sub._params_init_info


def _deferred_init(module: BaseModule, others: Any, ours: list[Any]) -> Callable[[], None]:
    def init_weights() -> None:
        _uninstall(module)
        saved = module.init_cfg
        module.init_cfg = others
        try:
            type(module).init_weights(module)  # the class's own, including post-super code
        finally:
            module.init_cfg = saved
        initialize(module, ours)

    init_weights._torchgraft_deferred = True  # type: ignore[attr-defined]
    return init_weights


def _uninstall(module: torch.nn.Module) -> None:
    fn = vars(module).get("init_weights")
    if fn is not None and getattr(fn, "_torchgraft_deferred", False):
        del module.init_weights


def _install_deferred(top: BaseModule) -> list[torch.nn.Module]:
    installed = []
    for sub in top.modules():
        if sub is top or not isinstance(sub, BaseModule) or getattr(sub, "_is_init", False):
            continue
        others, ours = _split(getattr(sub, "init_cfg", None))
        if ours and "init_weights" not in vars(sub):
            sub.init_weights = _deferred_init(sub, others, ours)
            installed.append(sub)
    return installed


def _wrap(original: Callable[[BaseModule], None]) -> Callable[[BaseModule], None]:
    def init_weights(self: BaseModule) -> None:
        top = not hasattr(self, "_params_init_info")
        others, ours = _split(self.init_cfg)
        if not ours or self._is_init:
            installed = _install_deferred(self) if top else []
            try:
                original(self)
            finally:
                for sub in installed:
                    _uninstall(sub)
            return
        installed = _install_deferred(self) if top else []
        if top:
            _start_init_info(self)  # so that the original does not dump it before our load
        done = False
        try:
            saved = self.init_cfg
            self.init_cfg = others
            try:
                original(self)  # other initializers, children, mmengine 'Pretrained'
            finally:
                self.init_cfg = saved
            initialize(self, ours)  # then ours, last
            done = True
        finally:
            for sub in installed:
                _uninstall(sub)
            if top:
                _end_init_info(self, dump=done)

    init_weights.__doc__ = original.__doc__
    init_weights.__name__ = "init_weights"
    init_weights.__qualname__ = "BaseModule.init_weights"
    init_weights._torchgraft_original = original  # type: ignore[attr-defined]
    return init_weights


def install_init_order() -> None:
    """Make ``BaseModule.init_weights`` run ``TorchgraftPretrained`` last (done on import).

    Idempotent. Modules without a ``TorchgraftPretrained`` init_cfg behave exactly as before.

    Example:
        >>> install_init_order()
        >>> hasattr(BaseModule.init_weights, "_torchgraft_original")
        True
    """
    current = BaseModule.init_weights
    if getattr(current, "_torchgraft_original", None) is None:
        BaseModule.init_weights = _wrap(current)


install_init_order()
