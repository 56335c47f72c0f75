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

The Runner's own loading. ``Runner(load_from=...)``, ``Runner(resume=True)`` and
``runner.load_checkpoint(...)`` go through ``Runner.load_checkpoint``, which calls ``torch.load``
(refused under torch >= 2.6 for Runner checkpoints: their message hub holds ``HistoryBuffer``
objects). :func:`install_runner_loading` (or ``custom_imports`` of
``torchgraft.integrations.mmengine_runner``) replaces that method: the file is read without
running its pickle (:func:`read_runner_checkpoint`: ``HistoryBuffer`` and ``Counter`` rebuilt
from their recorded plain data), the Runner's ``after_load_checkpoint`` hooks run, the weights
are loaded with :func:`tg.load` and the rest (optimizer, param schedulers, meta, message hub)
goes to ``Runner.resume`` exactly as mmengine expects it.

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

import numpy as np
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
from ..errors import (
    CorruptCheckpointError,
    OptionError,
    TorchgraftError,
    UnsafeCheckpointError,
    UnsupportedFormatError,
)
from ..formats import open_checkpoint
from ..formats.unpickler import Placeholder
from ..report import LoadReport
from ._rebuild import placeholders_in, rebuild

__all__ = ["TorchgraftPretrained", "NAME", "install_init_order", "resolve_checkpoint",
           "install_runner_loading", "uninstall_runner_loading", "read_runner_checkpoint"]

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


def _load_logged(module: torch.nn.Module, source: Any, options: dict[str, Any],
                 origin: tuple[str, str] | None = None) -> LoadReport:
    """``tg.load`` with the report (or the failed plan's report) in mmengine's log; a low-load
    warning is logged there too and re-emitted as a Python warning. ``origin``: the file and
    format an in-memory ``source`` was read from, for the report."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", api.LowLoadWarning)
            report = api.load(module, source, **options)
    except TorchgraftError as err:
        failed = getattr(err, "report", None)
        if failed is not None:
            _set_origin(failed, origin)
            print_log(str(failed), logger="current", level=logging.ERROR)
        raise
    _set_origin(report, origin)
    print_log(str(report), logger="current")
    for w in caught:  # a low load: said in mmengine's log and as a Python warning
        if issubclass(w.category, api.LowLoadWarning):
            print_log(str(w.message), logger="current", level=logging.WARNING)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return report


def _set_origin(report: Any, origin: tuple[str, str] | None) -> None:
    if origin is not None and isinstance(report, LoadReport):
        report.source, report.format = origin


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
        report = _load_logged(module, source, self.options)
        self.report = report
        TorchgraftPretrained.last_report = report
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


# --- Runner(load_from=...) / Runner(resume=True) through torchgraft ---------------------------

_HISTORY_BUFFER = "mmengine.logging.history_buffer.HistoryBuffer"
_HISTORY_KEYS = ("_log_history", "_count_history")
_RESUME_PARTS = ("optimizer", "param_schedulers")
_RUNNER_OPTIONS: dict[str, Any] = {}


def _statistic_names(methods: Any) -> list[str]:
    """Names of the statistics methods a pickled HistoryBuffer recorded (never resolved)."""
    return [str(k) for k in methods] if isinstance(methods, Mapping) else []


def _history_buffer_rebuilder(notes: list[str]) -> Callable[..., Any]:
    def rebuild_history_buffer(ph: Placeholder, plain: Callable[[Any], Any]) -> Any:
        from mmengine.logging import HistoryBuffer

        state = ph.state
        if not isinstance(state, Mapping):
            raise CorruptCheckpointError(f"{_HISTORY_BUFFER} with state {state!r:.80}: "
                                         "expected a dict")
        data = {k: plain(state.get(k)) for k in (*_HISTORY_KEYS, "max_length")}
        logs, counts = (data[k] for k in _HISTORY_KEYS)
        ok = (all(isinstance(a, np.ndarray) and a.ndim == 1 and a.dtype.kind in "biuf"
                  for a in (logs, counts)) and len(logs) == len(counts)
              and type(data["max_length"]) is int)
        if not ok:
            raise CorruptCheckpointError(
                f"{_HISTORY_BUFFER}: expected 1-d numeric _log_history and _count_history of "
                f"equal length and an int max_length; found {data!r:.200}")
        buf = HistoryBuffer.__new__(HistoryBuffer)
        buf.__setstate__(data)  # mmengine's own restore, given only the vetted plain data
        for name in _statistic_names(state.get("statistics_methods")):
            if name not in HistoryBuffer._statistics_methods:
                notes.append(f"HistoryBuffer statistics method {name!r} is not registered "
                             "here; register it (HistoryBuffer.register_statistics) before "
                             "resuming to use it")
        return buf

    return rebuild_history_buffer


def _as_device(map_location: Any) -> str | torch.device | None:
    if isinstance(map_location, torch.device):
        return map_location
    if isinstance(map_location, str) and map_location != "default":
        return map_location
    return None  # callables and dicts: tensors stay on the CPU, the model's own device wins


def read_runner_checkpoint(filename: str | os.PathLike, map_location: Any = "cpu", *,
                           trust: bool = False) -> tuple[dict[str, Any], list[str]]:
    """Read an mmengine ``Runner`` checkpoint without running its pickled code.

    Returns ``(checkpoint, notes)``: the checkpoint as ``torch.load`` would give it to the
    Runner — tensors (on ``map_location`` when it is a device string or ``torch.device``),
    ``meta`` with ``epoch``/``iter``, ``optimizer`` and ``param_schedulers`` state dicts
    (``collections.Counter`` milestones rebuilt), ``message_hub`` whose ``log_scalars`` are
    real ``HistoryBuffer`` objects built from the recorded arrays — and plain-text notes.
    Nothing the file names is imported or called: ``HistoryBuffer`` is mmengine's own class,
    constructed from the recorded numbers.
    ``meta['config']`` (old mmcv checkpoints) is dropped: ``Runner.resume`` would execute that
    Python text to compare GPU counts. A global the file names that cannot be rebuilt raises
    :class:`UnsafeCheckpointError` when it sits in a part resuming uses (optimizer, schedulers,
    the message hub's ``log_scalars``, ``meta`` epoch/iter); elsewhere (other ``meta`` entries,
    the hub's ``runtime_info``) it stays an inert placeholder and is named in the notes. Tensors
    are all read into memory, as ``torch.load`` would (the Runner's hooks may change them).

    Example:
        >>> ckpt, notes = read_runner_checkpoint("work_dirs/epoch_1.pth")  # doctest: +SKIP
        >>> ckpt["meta"]["epoch"], type(ckpt["message_hub"]["log_scalars"]["train/loss"])
        ... # doctest: +SKIP
        (1, <class 'mmengine.logging.history_buffer.HistoryBuffer'>)
    """
    tree, notes, _ = _read_runner(filename, map_location, trust)
    return tree, notes


def _read_runner(filename: Any, map_location: Any,
                 trust: bool) -> tuple[dict[str, Any], list[str], tuple[str, str]]:
    source = resolve_checkpoint(filename)
    ckpt = open_checkpoint(source, trust=trust)
    notes: list[str] = []
    tree = rebuild(ckpt.root, {_HISTORY_BUFFER: _history_buffer_rebuilder(notes)},
                   _as_device(map_location))
    if not isinstance(tree, dict):
        raise UnsupportedFormatError(f"{filename}: holds {type(tree).__name__}, not a "
                                     "checkpoint dict or a state dict")
    meta = tree.get("meta")
    if isinstance(meta, dict) and "config" in meta:
        del meta["config"]
        notes.append("meta['config'] (a Python config text) was not passed on: mmengine would "
                     "execute it")
    _check_placeholders(tree, filename, notes)
    return tree, notes, (str(ckpt.path or source), ckpt.format)


def _check_placeholders(tree: dict[str, Any], filename: Any, notes: list[str]) -> None:
    needed = [(f"[{k!r}]", tree[k]) for k in _RESUME_PARTS if k in tree]
    hub = tree.get("message_hub")
    if isinstance(hub, dict) and "log_scalars" in hub:
        needed.append(("['message_hub']['log_scalars']", hub["log_scalars"]))
    meta = tree.get("meta")
    if isinstance(meta, dict):
        needed += [(f"['meta'][{k!r}]", meta[k]) for k in ("epoch", "iter") if k in meta]
    bad = [(p + sub, q) for p, value in needed for sub, q in placeholders_in(value)]
    if bad:
        listed = "; ".join(f"{p}: {q}" for p, q in bad[:8])
        raise UnsafeCheckpointError(
            f"{filename}: resuming needs objects torchgraft does not rebuild without running "
            f"the file's code: {listed}. Rebuild them yourself, or if you trust the file, "
            "install_runner_loading(trust=True)")
    others = sorted({q for _, q in placeholders_in(tree)})
    if others:
        notes.append(f"not executed (left as inert placeholders): {', '.join(others)}")


def _runner_load_checkpoint(self: Any, filename: str, map_location: Any = "cpu",
                            strict: bool = False,
                            revise_keys: Any = ((r"^module.", ""),)) -> dict[str, Any]:
    """``Runner.load_checkpoint`` through torchgraft (installed by install_runner_loading)."""
    from mmengine.model import is_model_wrapper

    options = dict(_RUNNER_OPTIONS)
    checkpoint, notes, origin = _read_runner(filename, map_location, bool(options.get("trust")))
    for note in notes:
        print_log(f"torchgraft: {note}", logger="current")
    self.call_hook("after_load_checkpoint", checkpoint=checkpoint)
    model = self.model.module if is_model_wrapper(self.model) else self.model
    if options.get("select") is None and "state_dict" in checkpoint:
        options["select"] = "state_dict"
    revise = [list(p) for p in revise_keys]
    if revise == [[r"^module.", ""]]:  # mmengine's default: auto strips 'module.' already
        revise = []
    options["rename"] = _normalise_rename(options.get("rename"), revise)
    options["strict"] = bool(strict or options.get("strict"))
    options["trust"] = False  # the file was read above; the checkpoint is now in memory
    print_log(f"torchgraft: loading {filename} into {type(model).__name__}", logger="current")
    self.torchgraft_report = _load_logged(model, checkpoint, options, origin)
    self._has_loaded = True
    self.logger.info(f"Load checkpoint from {filename}")
    return checkpoint


def install_runner_loading(**options: Any) -> None:
    """Make mmengine's ``Runner`` load checkpoints through torchgraft (idempotent).

    Replaces ``Runner.load_checkpoint``, which ``Runner(load_from=...)``, ``Runner(resume=True)``
    (through ``Runner.resume``) and direct calls use: the file is read by
    :func:`read_runner_checkpoint` (no pickled code runs, so Runner checkpoints that
    ``torch.load(weights_only=True)`` refuses under torch >= 2.6 load), the Runner's
    ``after_load_checkpoint`` hooks see the checkpoint as before, and the weights are loaded
    with :func:`tg.load` (``revise_keys`` become ``rename``, all-or-nothing, report in the log
    and in ``runner.torchgraft_report``). ``options`` are :func:`tg.load` keywords used for every
    load (``prefix``, ``mismatch``, ``min_loaded``, ``strict``, ``trust``...). A second call
    replaces the options. :func:`uninstall_runner_loading` restores mmengine's own method.
    In a config, ``custom_imports = dict(imports=['torchgraft.integrations.mmengine_runner'])``
    does the same with no options.

    Example:
        >>> install_runner_loading(min_loaded=0.9)
        >>> from mmengine.runner import Runner
        >>> Runner.load_checkpoint.__name__
        'load_checkpoint'
        >>> uninstall_runner_loading()
    """
    from mmengine.runner import Runner

    accepted = _load_option_names()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise OptionError(f"install_runner_loading: unknown option(s) {unknown}; accepted: "
                          f"{', '.join(accepted)}")
    _RUNNER_OPTIONS.clear()
    _RUNNER_OPTIONS.update(options)
    current = Runner.load_checkpoint
    if getattr(current, "_torchgraft_original", None) is None:
        def load_checkpoint(self: Any, filename: str, map_location: Any = "cpu",
                            strict: bool = False,
                            revise_keys: Any = ((r"^module.", ""),)) -> dict[str, Any]:
            return _runner_load_checkpoint(self, filename, map_location, strict, revise_keys)

        load_checkpoint.__doc__ = _runner_load_checkpoint.__doc__
        load_checkpoint._torchgraft_original = current  # type: ignore[attr-defined]
        Runner.load_checkpoint = load_checkpoint


def uninstall_runner_loading() -> None:
    """Give ``Runner.load_checkpoint`` back to mmengine (no-op when not installed)."""
    from mmengine.runner import Runner

    original = getattr(Runner.load_checkpoint, "_torchgraft_original", None)
    if original is not None:
        Runner.load_checkpoint = original
    _RUNNER_OPTIONS.clear()
