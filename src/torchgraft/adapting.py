"""The ``adapt=`` option: which adapters may run on which model tensor, with which parameters.

``adapt`` is one of:

- ``"auto"`` / ``True`` (default): the adapters whose ``default`` is on (roles identified
  unambiguously: input channels, position embeddings, patch-embedding kernels, relative-position
  tables);
- ``False``: none (plain shape errors);
- a list of adapter names: exactly those;
- a dict on top of the defaults, keyed by adapter name or model tensor name:
  ``{"inflate_3d": True}`` adds an adapter, ``{"position_embedding": False}`` removes one,
  ``{"position_embedding": {"source_grid": (14, 20)}}`` configures one,
  ``{"pos_embed": False}`` leaves one tensor alone, ``{"pos_embed": "position_embedding"}``
  allows only that adapter on it, ``{"stem.weight": True}`` asks every adapter for it (the
  only-when-asked ones too; two that apply are refused as ambiguous),
  ``{"pos_embed": {"source_grid": (14, 20)}}`` configures the adapters asked for that tensor
  only.

Example:
    >>> choice = AdapterChoice.build({"input_channels": False}, ["weight", "bias"], [])
    >>> "input_channels" in [a.name for a in choice.for_tensor("weight")]
    False
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

from .errors import AmbiguousAdapterError, OptionError
from .plan import Slot
from .tensors import TensorRef
from .transforms import Adapter, Keep, TransformRef, kind_of, propose, registered_adapters, role_of


def check_adapt_option(value: Any) -> None:
    """Type-check ``adapt=`` (names are checked against the registry and model at plan time)."""
    if value in ("auto", True, False):
        return
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(n, str) for n in value):
        return
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value) and all(
            isinstance(v, (bool, str, Mapping)) for v in value.values()):
        return
    raise OptionError(f"adapt={value!r}: expected 'auto' (default), False, a list of adapter "
                      "names, or a dict {adapter or tensor name: True | False | adapter name | "
                      "{parameters}} (torchgraft.transforms.registered_adapters())")


def _configured(adapter: Adapter, params: Mapping[str, Any], where: str) -> Adapter:
    if not params:
        return adapter
    configure = getattr(adapter, "configured", None)
    if configure is None:
        raise OptionError(f"adapt={{{where!r}: {dict(params)!r}}}: the adapter {adapter.name!r} "
                          "takes no parameters")
    try:
        return configure(**params)
    except TypeError as err:
        raise OptionError(f"adapt={{{where!r}: {dict(params)!r}}}: {adapter.name!r} does not "
                          f"take these parameters ({err})") from None


def _configured_some(pool: list[Adapter], params: Mapping[str, Any], where: str
                     ) -> tuple[list[Adapter], set[str]]:
    """Per-tensor parameters without ``adapter``: every adapter that takes them is configured,
    the others stay as they are (and are refused at plan time if they are the one that handles
    the tensor); none taking them is an error. Returns the pool and the configured names."""
    out, took = [], set()
    for adapter in pool:
        configure = getattr(adapter, "configured", None)
        try:
            out.append(configure(**params) if configure is not None else adapter)
            if configure is not None:
                took.add(adapter.name)
        except TypeError:
            out.append(adapter)
    if not took:
        raise OptionError(f"adapt={{{where!r}: {dict(params)!r}}}: none of the adapters "
                          f"{[a.name for a in pool]} takes these parameters")
    return out, took


class AdapterChoice:
    """The adapters allowed for each model tensor under one ``adapt=`` value."""

    def __init__(self, default: list[Adapter], per_tensor: dict[str, list[Adapter]],
                 extra: list[Adapter]) -> None:
        self.default = default
        self.per_tensor = per_tensor
        self.extra = extra
        self.given: dict[str, tuple[dict[str, Any], set[str]]] = {}  # tensor -> its parameters

    def check_taken(self, name: str, adapter: str) -> None:
        """Per-tensor parameters the adapter that handles the tensor did not take: an error."""
        params, took = self.given.get(name, (None, None))
        if params is not None and adapter not in took:
            raise OptionError(f"adapt={{{name!r}: {params!r}}}: {adapter!r}, the adapter that "
                              "handles this tensor, does not take these parameters")

    @classmethod
    def build(cls, adapt: Any, model_names: Collection[str], extra: list[Adapter]
              ) -> AdapterChoice:
        """``model_names``: the model's state-dict names (tensor keys of a dict are checked)."""
        known = registered_adapters()
        by_name = {a.name: a for a in known}
        for adapter in extra:  # built for this load's options (labels=): nameable per tensor
            by_name.setdefault(adapter.name, adapter)

        def named(name: str, where: str) -> Adapter:
            if name == "classifier_rows" and name not in by_name:
                raise OptionError(f"adapt={where}: classifier_rows runs with labels= (one "
                                  "checkpoint class index per model class, or an offset)")
            if name not in by_name:
                raise OptionError(f"adapt={where}: no adapter named {name!r}; registered: "
                                  f"{sorted(by_name)}")
            return by_name[name]

        if adapt in ("auto", True):
            return cls([a for a in known if a.default], {}, extra)
        if isinstance(adapt, (list, tuple, set, frozenset)):
            wanted = [named(n, repr(sorted(adapt))) for n in adapt]
            return cls([a for a in known if a in wanted], {}, extra)
        chosen = {a.name: a for a in known if a.default}
        tensors: dict[str, Any] = {}
        for key, value in adapt.items():
            if key in by_name:
                if value is False:
                    chosen.pop(key, None)
                elif isinstance(value, str):
                    raise OptionError(f"adapt={{{key!r}: {value!r}}}: an adapter's value is "
                                      "True, False or a dict of its parameters")
                else:
                    chosen[key] = _configured(by_name[key], value if isinstance(value, Mapping)
                                              else {}, key)
                continue
            if key not in model_names:
                raise OptionError(f"adapt={{{key!r}: ...}}: {key!r} is neither an adapter "
                                  f"({sorted(by_name)}) nor a tensor of the model")
            tensors[key] = value
        default = [chosen[a.name] for a in known if a.name in chosen]
        per_tensor: dict[str, list[Adapter]] = {}
        given: dict[str, tuple[dict[str, Any], set[str]]] = {}
        for key, value in tensors.items():
            if value is False:
                per_tensor[key] = []
            elif value is True:  # naming the tensor asks for every adapter, default or not
                per_tensor[key] = list(extra) + [chosen.get(a.name, a) for a in known]
            elif isinstance(value, str):
                per_tensor[key] = [chosen.get(value) or named(value, f"{{{key!r}: {value!r}}}")]
            else:
                params = dict(value)
                only = params.pop("adapter", None)
                pool = ([chosen.get(only) or named(only, f"{{{key!r}: ...}}")] if only
                        else list(extra) + list(default))
                if not params:
                    per_tensor[key] = pool
                elif only:
                    per_tensor[key] = [_configured(pool[0], params, key)]
                else:
                    per_tensor[key], took = _configured_some(pool, params, key)
                    given[key] = (params, took)
        choice = cls(default, per_tensor, extra)
        choice.given = given
        return choice

    def for_tensor(self, name: str) -> list[Adapter]:
        """The adapters asked for model tensor ``name`` (a per-tensor choice replaces all)."""
        own = self.per_tensor.get(name)
        return list(self.extra) + self.default if own is None else list(own)


def make_adapter(model_names: Collection[str], adapt: Any, labels: Any,
                 roles: Callable[[], dict[str, Any]]) -> Callable[..., Any] | None:
    """The plan's ``adapt(name, ref, slot)`` callback for these options (None: ``adapt=False``).

    It returns a :class:`~torchgraft.transforms.TransformRef`, a :class:`Keep`, or None (no
    adapter: the plan reports the shape mismatch). Roles are computed on the first call only.
    """
    if adapt is False:
        return None
    extra: list[Adapter] = []
    if labels is not None:
        from .adapters.rows import ClassifierRows

        extra = [ClassifierRows(labels)]
    chosen: list[AdapterChoice] = []
    if adapt not in ("auto", True) or extra:  # options are checked before planning goes on
        chosen.append(AdapterChoice.build(adapt, model_names, extra))
    cache: list[dict[str, Any]] = []

    def get_roles() -> dict[str, Any]:
        if not cache:  # only when some tensor does not fit, or labels= is given
            found = dict(roles())
            if extra:  # tensors the user named for classifier_rows are the classifier
                named = [k for k, pool in chosen[0].per_tensor.items()
                         if any(a.name == "classifier_rows" for a in pool)]
                for key in named:
                    found[key] = "classifier"
                if "classifier" not in {kind_of(r) for r in found.values()}:
                    raise OptionError(
                        "labels= needs the model's classifier, and this model's framework does "
                        "not name one (timm: pretrained_cfg['classifier']); name its tensors: "
                        "adapt={'fc.weight': 'classifier_rows', 'fc.bias': 'classifier_rows'} "
                        "(with your model's names)")
            cache.append(found)
        return cache[0]

    def adapt_one(name: str, ref: TensorRef, slot: Slot) -> TensorRef | Keep | None:
        if not chosen:  # the default: the adapter registry is loaded only when a shape differs
            chosen.append(AdapterChoice.build(adapt, model_names, extra))
        choice = chosen[0]
        found = propose(name, role_of(name, get_roles()), ref.shape, slot.shape,
                        choice.for_tensor(name))
        if not found:
            return None
        if len({p.key() for p in found}) > 1:
            raise AmbiguousAdapterError(
                f"{name}: adapters {[p.adapter for p in found]} propose different results for "
                f"checkpoint {list(ref.shape)} -> model {list(slot.shape)}; pass "
                f"adapt={{{name!r}: {found[0].adapter!r}}} to choose one, or "
                f"adapt={{{name!r}: False}} to keep the shape error")
        choice.check_taken(name, found[0].adapter)
        if isinstance(found[0].ops, Keep):
            return found[0].ops
        return TransformRef(ref, found[0].ops, found[0].adapter)

    adapt_one.forced = ((lambda name: kind_of(role_of(name, get_roles())) == "classifier")
                        if extra else None)
    return adapt_one
