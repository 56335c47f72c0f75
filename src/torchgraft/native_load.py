"""The model's own loading contract: modules whose loading is not plain tensor copies.

``Module.load_state_dict`` runs each module's load pre-hooks, its ``_load_from_state_dict``
(which many models override), ``set_extra_state`` and the post-hooks, and passes the file's
per-module ``_metadata`` (versions). torchgraft copies bytes straight into parameters, which is
exactly the same thing for modules that do none of that. For the others (*native* modules) this
stage runs torch's own recursion, unchanged, on the module's sub-tree:

- while planning, on a deep copy of the sub-tree with copies of the checkpoint tensors, so a
  failing hook, a size mismatch or a non-tensor value is an error before anything is written,
  and the report can describe the tensors *after* the hooks (renamed, resized, removed);
- while applying, on the real sub-tree with the same tensors, after the plain copies.

Only the sub-trees that need it are materialised; every other module keeps the zero-copy path.

Example:
    >>> import torch
    >>> class Scaled(torch.nn.Linear):
    ...     def _load_from_state_dict(self, sd, prefix, *args):
    ...         sd[prefix + "weight"] = sd[prefix + "weight"] * 2
    ...         super()._load_from_state_dict(sd, prefix, *args)
    >>> m = torch.nn.Sequential(Scaled(2, 1))
    >>> [(g.prefix, g.reasons) for g in find_native(m, set(), None)]
    [('0.', ['Scaled._load_from_state_dict overrides torch'])]
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import LoadHookError, UnsupportedTargetError

_DEFAULT_LOAD = nn.Module._load_from_state_dict
_DEFAULT_SET_EXTRA = nn.Module.set_extra_state
_NORM_LOAD = nn.modules.batchnorm._NormBase._load_from_state_dict
_INSTANCE_LOAD = nn.modules.instancenorm._InstanceNorm._load_from_state_dict
_SIZE_MISMATCH = re.compile(r"^size mismatch for (.+?): copying a param with shape")
_PLAIN = (torch.Tensor, nn.Parameter)


@dataclass
class NativeGroup:
    """A sub-tree loaded by torch's own code: its state-dict prefix, module and why."""

    prefix: str
    module: nn.Module
    reasons: list[str]
    metadata: Any = None  # the file's _metadata, keyed by model module paths
    state: dict[str, Any] = field(default_factory=dict)  # model name -> value (pristine)
    sources: dict[str, str] = field(default_factory=dict)  # model name -> checkpoint name
    skip: set[str] = field(default_factory=set)  # names dropped after the hooks (tolerated)
    has_meta: bool = False
    computed: dict[str, Any] = field(default_factory=dict)  # name -> value a hook computed (dry run)


def _hook_name(hook: Any) -> str:
    inner = getattr(hook, "hook", hook)  # torch wraps some hooks in _WrappedHook
    inner = getattr(inner, "func", inner)  # functools.partial
    return getattr(inner, "__qualname__", None) or type(inner).__name__


def hook_names(module: nn.Module) -> list[str]:
    """Names of the module's own loading code: hooks, overrides, extra state."""
    cls = type(module)
    out = [f"pre-hook {_hook_name(h)}" for h in module._load_state_dict_pre_hooks.values()]
    if cls._load_from_state_dict is not _DEFAULT_LOAD:
        out.append(f"{cls._load_from_state_dict.__qualname__}")
    if getattr(cls, "set_extra_state", _DEFAULT_SET_EXTRA) is not _DEFAULT_SET_EXTRA:
        out.append(f"{cls.__name__}.set_extra_state")
    out += [f"post-hook {_hook_name(h)}" for h in module._load_state_dict_post_hooks.values()]
    return out


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def check_writable(model: nn.Module, prefix: str = "") -> None:
    """Refuse, before anything is written, model tensors torchgraft cannot write."""
    for name, t in _named_tensors(model):
        name = prefix + name
        if _is_dtensor(t):
            raise UnsupportedTargetError(
                f"model tensor {name!r} is a DTensor (an FSDP2 / tensor-parallel shard); "
                "torchgraft cannot write sharded targets yet. The model was not changed. Load "
                "into the model before fully_shard()/parallelize_module(), or use "
                "torch.distributed.checkpoint.state_dict.set_model_state_dict(..., "
                "options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)).")


def _named_tensors(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        pre = f"{mod_name}." if mod_name else ""
        for n, t in mod._parameters.items():
            if t is not None:
                yield pre + n, t
        for n, t in mod._buffers.items():
            if t is not None:
                yield pre + n, t


def _plain_target(t: torch.Tensor) -> bool:
    return (type(t) in _PLAIN and t.layout is torch.strided and not t.is_quantized
            and not t.is_nested)


def _version(metadata: Any, path: str) -> Any:
    if metadata is None:
        return None
    entry = metadata.get(path)
    return entry.get("version") if isinstance(entry, dict) else None


_CLASS_REASONS: dict[type, tuple[Any, bool]] = {}


def _class_facts(cls: type) -> tuple[Any, bool]:
    """(its ``_load_from_state_dict`` if not torch's default, has ``set_extra_state``)."""
    facts = _CLASS_REASONS.get(cls)
    if facts is None:
        loader = cls._load_from_state_dict
        extra = getattr(cls, "set_extra_state", _DEFAULT_SET_EXTRA) is not _DEFAULT_SET_EXTRA
        facts = _CLASS_REASONS[cls] = (None if loader is _DEFAULT_LOAD else loader, extra)
    return facts


def _reasons(module: nn.Module, prefix: str, names: set[str], metadata: Any,
             shapes: Callable[[str], tuple[int, ...] | None], tensors_odd: bool) -> list[str]:
    """Why ``module`` itself must be loaded by torch's code (empty: plain copies are exact)."""
    loader, extra = _class_facts(type(module))
    pre_hooks, post_hooks = module._load_state_dict_pre_hooks, module._load_state_dict_post_hooks
    if loader is None and not extra and not pre_hooks and not post_hooks and not tensors_odd:
        return []
    cls = type(module)
    out = [f"pre-hook {_hook_name(h)}" for h in pre_hooks.values()]
    if loader is _NORM_LOAD:
        version = _version(metadata, prefix[:-1])
        if (module.track_running_stats and (version is None or version < 2)
                and prefix + "num_batches_tracked" not in names):
            out.append(f"{cls.__name__} fills num_batches_tracked for a file without it "
                       f"(version {version})")
    elif loader is _INSTANCE_LOAD:
        version = _version(metadata, prefix[:-1])
        if (version is None and not module.track_running_stats
                and (prefix + "running_mean" in names or prefix + "running_var" in names)):
            out.append(f"{cls.__name__} refuses running stats in the file")
    elif loader is not None:
        out.append(f"{loader.__qualname__} overrides torch")
    if extra:
        out.append(f"{cls.__name__}.set_extra_state")
    out += [f"post-hook {_hook_name(h)}" for h in post_hooks.values()]
    if tensors_odd:
        for n, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is None or n in module._non_persistent_buffers_set and n in module._buffers:
                continue
            if nn.parameter.is_lazy(t):
                out.append(f"{n} is uninitialized (lazy)")
            elif not _plain_target(t):
                if _is_dtensor(t):
                    check_writable(module, prefix)
                out.append(f"{n} is a {type(t).__name__} ({t.layout}"
                           f"{', quantized' if t.is_quantized else ''})")
            elif t.dim() == 0 and shapes(prefix + n) == (1,):
                out.append(f"{n}: torch loads a 1-element tensor into a 0-dim one")
    return out


def find_native(model: nn.Module, names: set[str], metadata: Any,
                shapes: Callable[[str], tuple[int, ...] | None] = lambda n: None,
                odd: Iterable[str] | None = None) -> list[NativeGroup]:
    """The topmost modules whose loading is not plain copies, with the reasons.

    ``names`` are the model names the checkpoint provides (after mapping), ``metadata`` the
    file's ``_metadata`` (module path -> {"version": ...}) or None, ``shapes`` the checkpoint
    shape for a model name, ``odd`` the model tensor names that are not plain dense tensors or
    are 0-dim (None: check every module's tensors).
    """
    groups: list[NativeGroup] = []
    odd_modules = None if odd is None else {n.rpartition(".")[0] for n in odd}

    def visit(module: nn.Module, prefix: str) -> None:
        tensors_odd = odd_modules is None or prefix[:-1] in odd_modules
        reasons = _reasons(module, prefix, names, metadata, shapes, tensors_odd)
        if reasons:
            groups.append(NativeGroup(prefix, module, reasons, metadata))
            return
        for child_name, child in module._modules.items():
            if child is not None:
                visit(child, f"{prefix}{child_name}.")

    visit(model, "")
    for group in groups:  # below a native module, plain checks were not made: DTensors
        check_writable(group.module, group.prefix)
    return groups


# --- torch's own recursion -------------------------------------------------------------------


@dataclass
class NativeRun:
    """What torch's recursion did to one sub-tree."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    seen: dict[str, Any] = field(default_factory=dict)  # model name -> value its module got
    sent: dict[str, Any] = field(default_factory=dict)  # the values handed to the recursion
    changed_by: dict[str, str] = field(default_factory=dict)  # key -> "module: hooks"
    removed_by: dict[str, str] = field(default_factory=dict)

    @property
    def mismatched(self) -> list[str]:
        return [m.group(1) for e in self.errors if (m := _SIZE_MISMATCH.match(e))]


_ABSENT = object()


def run_torch_load(module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any,
                   skip: set[str] = frozenset()) -> NativeRun:
    """``module.load_state_dict(state)``'s recursion for a sub-tree at ``prefix``, as torch
    runs it (same calls, same order, same metadata); ``skip`` names are removed after each
    module's own pre-hooks (tolerated shape mismatches). Raises :class:`LoadHookError`."""
    run = NativeRun(sent=dict(state))
    sd: OrderedDict = OrderedDict(state)

    def load(mod: nn.Module, local: dict[str, Any], pre: str) -> None:
        local_metadata = {} if metadata is None else metadata.get(pre[:-1], {})
        own = hook_names(mod)
        handle = None
        if skip:
            mine = [k for k in skip if k.startswith(pre) and "." not in k[len(pre):]]
            if mine:
                handle = mod.register_load_state_dict_pre_hook(
                    lambda _m, d, *_a, keys=mine: [d.pop(k, None) for k in keys])
        before = {k: id(v) for k, v in local.items()} if own else None
        cut = len(pre)
        direct = {k: v for k, v in local.items() if k.startswith(pre) and "." not in k[cut:]}
        try:
            mod._load_from_state_dict(local, pre, local_metadata, True, run.missing,
                                      run.unexpected, run.errors)
        except Exception as err:
            raise LoadHookError(
                f"loading module {pre[:-1] or '<root>'} ({type(mod).__name__}) failed in its "
                f"own loading code ({', '.join(own) or 'torch default'}): "
                f"{type(err).__name__}: {err}. The model was not changed. Fix the hook, or pass "
                "hooks=False to copy tensors without running the model's loading code.") from err
        finally:
            if handle is not None:
                handle.remove()
        if before is not None:
            who = f"{type(mod).__name__} at {pre[:-1] or '<root>'}: {', '.join(own)}"
            for k, v in local.items():
                if before.get(k) != id(v):
                    run.changed_by[k] = who
            for k in before.keys() - local.keys():
                run.removed_by[k] = who
        # what this module's own entries held after its hooks (a key its loader consumed
        # keeps the value it had before)
        for k, v in local.items():
            if k.startswith(pre) and "." not in k[cut:]:
                run.seen[k] = v
        for k, v in direct.items():
            if k not in local:
                run.seen[k] = v
        for child_name, child in mod._modules.items():
            if child is not None:
                child_prefix = f"{pre}{child_name}."
                load(child, {k: v for k, v in local.items() if k.startswith(child_prefix)},
                     child_prefix)
        incompatible = nn.modules.module._IncompatibleKeys(run.missing, run.unexpected)
        for hook in mod._load_state_dict_post_hooks.values():
            try:
                out = hook(mod, incompatible)
            except Exception as err:
                raise LoadHookError(
                    f"load post-hook {_hook_name(hook)} of module {pre[:-1] or '<root>'} "
                    f"({type(mod).__name__}) failed: {type(err).__name__}: {err}. The model "
                    "was not changed. Pass hooks=False to skip the model's loading code."
                ) from err
            if out is not None:
                raise LoadHookError(
                    f"load post-hook {_hook_name(hook)} of module {pre[:-1] or '<root>'} "
                    "returned a value; torch requires post-hooks to modify incompatible_keys "
                    "in place")

    load(module, sd, prefix)
    return run


def has_meta(module: nn.Module) -> bool:
    return any(t.is_meta for _, t in _named_tensors(module))


def dry_copy(group: NativeGroup) -> nn.Module:
    """A deep copy of the group's sub-tree to run hooks on while planning."""
    try:
        dup = copy.deepcopy(group.module)
    except Exception as err:
        raise LoadHookError(
            f"module {group.prefix[:-1] or '<root>'} ({type(group.module).__name__}) has its own "
            f"loading code ({'; '.join(group.reasons)}), which torchgraft runs on a copy first "
            f"so a failure leaves the model unchanged, but the module cannot be copied "
            f"({type(err).__name__}: {err}). Pass hooks=False to copy tensors without running "
            "the model's loading code.") from err
    if group.has_meta:
        dup.to_empty(device="cpu")
    return dup


def clone_values(state: dict[str, Any]) -> dict[str, Any]:
    """Copies of the tensors (hooks may change them in place), other values deep-copied."""
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[k] = v.detach().clone()
        else:
            out[k] = copy.deepcopy(v)
    return out


# --- planning a group ------------------------------------------------------------------------

LOADED = ("copied", "cast", "adapted")


def _dt(value: Any) -> str | None:
    return str(value.dtype).replace("torch.", "") if isinstance(value, torch.Tensor) else None


def _shp(value: Any) -> tuple[int, ...] | None:
    if not isinstance(value, torch.Tensor) or nn.parameter.is_lazy(value):
        return None
    return tuple(value.shape)


@contextlib.contextmanager
def held_back() -> Iterator[io.StringIO]:
    """The dry run's prints, log records and warnings are held back (the real run at apply
    time emits them once); what was printed is yielded, for an error message."""
    said = io.StringIO()
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(said), \
                contextlib.redirect_stderr(said):
            warnings.simplefilter("ignore")
            yield said
    finally:
        logging.disable(previous)


def plan_group(group: NativeGroup, tolerate: Callable[[str], str | None]) -> list[Any]:
    """Dry-run torch's loading of ``group`` on copies; return its report entries.

    ``tolerate(name)`` gives the reason to skip a size mismatch on model name ``name`` (the
    ``mismatch="skip"`` option or a framework's replaceable classifier), or None to keep it as
    a mismatch (which the plan then refuses). Sets ``group.skip``. Raises LoadHookError.
    """
    from .report import Entry

    with held_back() as said:
        try:
            dup = dry_copy(group)
            run = run_torch_load(dup, clone_values(group.state), group.prefix, group.metadata)
            mism = run.mismatched
            skip = {k: why for k in mism if (why := tolerate(k)) is not None}
            first = run
            if skip:
                group.skip = set(skip)
                dup = dry_copy(group)
                run = run_torch_load(dup, clone_values(group.state), group.prefix,
                                     group.metadata, group.skip)
        except LoadHookError as err:
            text = said.getvalue().strip()
            if text:  # what the hook printed or logged before failing helps to fix it
                err.args = (f"{err.args[0]}\n  it printed: {text[-1000:]}",) + err.args[1:]
            raise
    other = [e for e in run.errors if not _SIZE_MISMATCH.match(e)]
    if other:
        raise LoadHookError(
            f"module {group.prefix[:-1] or '<root>'} ({type(group.module).__name__}): torch's "
            f"load_state_dict would fail: {' '.join(other)[:2000]} The model was not changed.")
    sent = {id(v): k for k, v in run.sent.items()}
    own = {id(v) for v in dup.state_dict(keep_vars=True).values()}  # before the run: identity
    entries: list[Entry] = []
    used: set[str] = set()
    why_native = "; ".join(group.reasons)
    for name, tval in group.module.state_dict(prefix=group.prefix, keep_vars=True).items():
        tshape, tdt = _shp(tval), _dt(tval)
        src = group.sources.get(name)
        if name in skip or name in run.mismatched:
            seen = first.seen.get(name)
            reason = skip.get(name) or "shape mismatch"
            if name in first.changed_by:
                reason += f" (after {first.changed_by[name]})"
            if src:
                used.add(src)
            entries.append(Entry(name, src, "skipped", _shp(seen), tshape, _dt(seen), tdt, reason))
            continue
        seen = run.seen.get(name, _ABSENT)
        if name in run.missing:
            reason = "not in checkpoint"
            if name in run.removed_by:
                reason = f"removed by {run.removed_by[name]}"
            entries.append(Entry(name, None, "missing", None, tshape, None, tdt, reason))
            continue
        origin = sent.get(id(seen)) if seen is not _ABSENT else None
        if origin is None and src is None and id(seen) in own:  # the module's own value
            entries.append(Entry(name, None, "kept", None, tshape, None, tdt,
                                 f"the module keeps its own value ({why_native}); torch does "
                                 "not count it missing"))
            continue
        if seen is _ABSENT and src is None:
            entries.append(Entry(name, None, "copied", None, tshape, None, tdt,
                                 f"set by {why_native}"))
            continue
        if not isinstance(tval, torch.Tensor):
            if src:
                used.add(src)
            what = "extra state, set by set_extra_state" if name.endswith("_extra_state") else \
                f"a {type(tval).__name__}, set by the module's own loading code"
            entries.append(Entry(name, src, "copied", None, None, None, None, what))
            continue
        if origin is not None:
            src_name = group.sources.get(origin, origin)
            used.add(src_name)
            original = group.state[origin]
            sdt = _dt(original)
            action = "copied" if sdt == tdt else "cast"
            reason = f"loaded by torch's load_state_dict ({why_native})"
            if origin != name:
                reason = f"renamed from {origin!r} by {run.changed_by.get(name, why_native)}"
            elif sdt != tdt:
                reason = f"{sdt} -> {tdt}; {reason}"
            entries.append(Entry(name, src_name, action, _shp(original), tshape, sdt, tdt, reason))
            continue
        original = group.state.get(name)
        if src:
            used.add(src)
        by = run.changed_by.get(name, why_native)
        if isinstance(seen, torch.Tensor):
            group.computed[name] = seen  # what convert --model writes for it
        entries.append(Entry(name, src, "adapted", _shp(original) or _shp(seen), tshape,
                             _dt(original) or _dt(seen), tdt, f"computed by {by}"))
    unexpected = set(run.unexpected)
    for tgt, src in group.sources.items():
        if src in used:
            continue
        value = group.state.get(tgt)
        if tgt in unexpected or tgt not in run.removed_by:
            entries.append(Entry(None, src, "unexpected", _shp(value), None, _dt(value), None,
                                 "no model tensor of this name"))
        else:
            entries.append(Entry(None, src, "skipped", _shp(value), None, _dt(value), None,
                                 f"removed by {run.removed_by[tgt]}"))
    return entries


def apply_group(group: NativeGroup) -> None:
    """Run torch's loading of ``group`` on the real sub-tree (after a successful dry run)."""
    if group.has_meta:
        group.module.to_empty(device="cpu")
    run_torch_load(group.module, dict(group.state), group.prefix, group.metadata, group.skip)
