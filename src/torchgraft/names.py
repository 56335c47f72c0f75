"""The map stage: checkpoint names → model names, through ``prefix``, ``rename`` and ``auto``.

Each source name ends up with a target name (or is dropped), and with the list of rules that
changed it, so the report can say why every tensor went where it went.

Example:
    >>> src = {"module.backbone.conv.weight": (8, 3, 3, 3), "module.head.weight": (10, 8)}
    >>> model = {"conv.weight": (8, 3, 3, 3)}
    >>> m = map_names(src, model, prefix="backbone")
    >>> m.target["module.backbone.conv.weight"], m.dropped["module.head.weight"]
    ('conv.weight', "outside prefix 'backbone.'")
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from .errors import AmbiguousRenameError, PrefixNotFoundError, RenameError

Shape = tuple[int, ...]
Rename = Sequence[tuple[str, str]] | Mapping[str, str] | Callable[[str], "str | None"] | None

WRAPPERS = ("module.", "_orig_mod.")
MAX_DEPTH = 4
MAX_CANDIDATES = 12


@dataclass
class NameMap:
    """Result of the map stage.

    ``target[src]`` is the model name for checkpoint name ``src``; ``dropped[src]`` says why a
    name was taken out; ``why[src]`` lists the rules that renamed it; ``rules`` describes every
    rule that was applied, in order; ``notes`` holds remarks for the report.
    """

    target: dict[str, str] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)
    why: dict[str, list[str]] = field(default_factory=dict)
    rules: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    auto_rule: tuple[str, str] | None = None


def strip_wrappers(name: str) -> str:
    """Drop leading ``module.`` / ``_orig_mod.`` components (DDP, torch.compile)."""
    changed = True
    while changed:
        changed = False
        for w in WRAPPERS:
            if name.startswith(w):
                name, changed = name[len(w):], True
    return name


def map_names(
    src: Mapping[str, Shape],
    model: Mapping[str, Shape] | None,
    prefix: str | None = None,
    rename: Rename = None,
    auto: bool = True,
    framework_rename: Callable[[], Callable[[str], str] | None] | None = None,
) -> NameMap:
    """Map checkpoint names to model names; ``model`` maps model names to shapes.

    ``framework_rename`` builds a renaming the target's framework defines (transformers'
    conversion mapping). It is built and applied only when the names do not already all fit the
    model, after ``rename`` and before ``auto``, and recorded only if it changed a name.
    """
    out = NameMap()
    names = {n: n for n in src}  # src name -> current name
    if prefix:
        names = _apply_prefix(names, src, model, prefix, auto, out)
    if rename is not None:
        names = _apply_rename(names, rename, out)
    fits = model is not None and _all_fit(names, src, model)
    fn = None
    if framework_rename is not None and model is not None and not fits:
        fn = framework_rename()
    if fn is not None:
        before = len(out.rules)
        renamed = _apply_rename(names, fn, out)
        if renamed == names:
            del out.rules[before:]
        else:
            fits = _all_fit(renamed, src, model)
        names = renamed
    if auto and model is not None and not fits:
        names = _apply_auto(names, src, model, out)
    out.target = names
    return out


def _all_fit(names: dict[str, str], src: Mapping[str, Shape], model: Mapping[str, Shape]) -> bool:
    """Every model tensor, or every (distinct) checkpoint name, already matches by name and
    shape: no renaming can do better."""
    get = model.get
    matched = {cur for s, cur in names.items() if get(cur) == src[s]}
    return len(matched) == len(model) or len(matched) == len(names)


def _note(out: NameMap, src_name: str, text: str) -> None:
    out.why.setdefault(src_name, []).append(text)


def _apply_prefix(names: dict[str, str], src: Mapping[str, Shape],
                  model: Mapping[str, Shape] | None, prefix: str, auto: bool,
                  out: NameMap) -> dict[str, str]:
    p = prefix if prefix.endswith(".") else prefix + "."
    kept: dict[str, str] = {}
    for s, cur in names.items():
        seen = strip_wrappers(cur) if auto else cur
        if seen.startswith(p):
            kept[s] = seen[len(p):]
            _note(out, s, f"prefix {p!r} stripped")
        else:
            out.dropped[s] = f"outside prefix {p!r}"
    if kept:
        out.rules.append(f"prefix {p!r}: kept {len(kept)} of {len(names)} tensors, stripped {p!r}")
        return kept
    out.dropped.clear()
    if auto and model is not None:
        fits = sum(1 for s, cur in names.items() if model.get(strip_wrappers(cur)) == src[s])
        if names and fits >= max(1, len(names) // 2):
            out.notes.append(
                f"no tensor is under prefix {p!r}, but the checkpoint already fits the model "
                "as it is (a backbone-only file?): loaded as is"
            )
            out.rules.append(f"prefix {p!r}: no name under it; checkpoint loaded as is")
            return names
    heads = Counter(strip_wrappers(n).split(".", 1)[0] + "." for n in names.values())
    listing = ", ".join(f"{h!r} ({c})" for h, c in heads.most_common(8))
    raise PrefixNotFoundError(
        f"prefix {p!r} matches none of the {len(names)} checkpoint names; their first "
        f"components are {listing or 'none'}. Pass one of those as prefix=, or prefix=None."
    )


def _apply_rename(names: dict[str, str], rename: Rename, out: NameMap) -> dict[str, str]:
    if isinstance(rename, Mapping):
        fn = _dict_renamer(rename)
        out.rules.append(f"rename: {len(rename)} exact names")
    elif callable(rename):
        fn = rename
        out.rules.append(f"rename: function {getattr(rename, '__name__', repr(rename))}")
    elif isinstance(rename, Sequence) and not isinstance(rename, str):
        fn = _regex_renamer(rename)
        out.rules.append("rename: " + "; ".join(f"{p!r} => {r!r}" for p, r in rename))
    else:
        raise RenameError(
            f"rename= must be a list of (regex, replacement) pairs, a dict or a function, "
            f"not {type(rename).__name__}"
        )
    result: dict[str, str] = {}
    owner: dict[str, str] = {}
    for s, cur in names.items():
        new = fn(cur)
        if new is None:
            out.dropped[s] = "dropped by rename"
            continue
        if not isinstance(new, str):
            raise RenameError(f"rename returned {new!r} for {cur!r}; expected a str or None")
        if new in owner:
            raise RenameError(
                f"rename maps both {owner[new]!r} and {s!r} to {new!r}; make the rules specific"
            )
        owner[new] = s
        if new != cur:
            _note(out, s, f"renamed {cur!r} -> {new!r}")
        result[s] = new
    return result


def _dict_renamer(table: Mapping[str, str]) -> Callable[[str], str | None]:
    return lambda name: table.get(name, name)


def _regex_renamer(pairs: Sequence[tuple[str, str]]) -> Callable[[str], str]:
    try:
        compiled = [(re.compile(p), r) for p, r in pairs]
    except (re.error, ValueError, TypeError) as err:
        raise RenameError(f"rename: bad (regex, replacement) pair: {err}") from None

    def apply(name: str) -> str:
        for pattern, repl in compiled:
            name = pattern.sub(repl, name)
        return name

    return apply


# --- auto: reconcile leading components ------------------------------------------------------
#
# A rule renames checkpoint names under one leading run of components (``strip``) to another
# (``add``). It only moves checkpoint tensors that do not fit the model as named, and only onto
# model names the checkpoint does not hold, so a tensor that already fits is never moved and no
# two tensors ever end up on one name. A rule must explain most of the names under its prefix
# (or fill most of the model's free names under its target); translating one prefix into another
# (``encoder.`` -> ``backbone.``) is tried only when nothing fits as named and must explain every
# checkpoint tensor. A rule must not move a second copy of weights already in place (``ema.``,
# ``teacher.``) elsewhere, and must be clearly better (twice
# the matches) than every rule that would fill the same model tensors from other checkpoint
# tensors (or put the same tensors elsewhere); otherwise the load is refused with
# :class:`AmbiguousRenameError`, listing the ``prefix=``/``rename=`` that picks each candidate.
# A tie between one plain copy and EMA copies goes to the plain copy (with a note), as in the
# select stage. Several flatten rules (timm ``features_only``: ``stages.0.`` -> ``stages_0.``)
# may apply together; every other kind applies alone.

MAX_RULES = 16  # flatten rules (``stages.0.`` -> ``stages_0.``) applied together, at most
_KINDS = ("wrap", "flatten", "translate")
_EMA = re.compile(r"(^|[_\-.])ema($|[_\-.])", re.IGNORECASE)


@dataclass
class _Rule:
    """One candidate: rename ``strip + rest`` to ``add + rest``.

    ``moves`` maps every checkpoint name it renames to the new name; ``hits`` is the part of it
    that lands on a model name with the same shape."""

    strip: str
    add: str
    kind: str  # "wrap", "flatten" or "translate": see _rule_kind
    moves: dict[str, str]
    hits: dict[str, str]

    @property
    def score(self) -> int:
        return len(self.hits)

    @property
    def is_ema(self) -> bool:
        return bool(_EMA.search(self.strip))

    def sort_key(self) -> tuple:
        return (-self.score, self.is_ema, _KINDS.index(self.kind),
                len(self.strip) + len(self.add), self.strip, self.add)

    def describe(self) -> str:
        if self.kind == "flatten":
            return f"rename {self.strip!r} -> {self.add!r}"
        parts = [f"strip {self.strip!r}"] if self.strip else []
        if self.add:
            parts.append(f"add {self.add!r}")
        return " and ".join(parts)

    def option(self) -> str:
        """The explicit option that applies exactly this rule."""
        if self.strip and not self.add:
            return f"prefix={self.strip[:-1]!r}"
        return f"rename=[(r'^{re.escape(self.strip)}', {self.add!r})]"

    def conflicts(self, other: _Rule) -> bool:
        """Whether the two rules disagree about a tensor: one checkpoint tensor sent to two
        model names, or one model tensor filled from two checkpoint tensors."""
        get = self.hits.get
        if any(get(s, t) != t for s, t in other.hits.items()):
            return True
        owner = {t: s for s, t in self.hits.items()}
        return any(owner.get(t, s) != s for s, t in other.hits.items())


def _leading(name: str) -> Iterator[str]:
    """``'a.'``, ``'a.b.'``... of ``name`` (up to MAX_DEPTH components, never the whole name)."""
    parts = name.split(".")
    acc = ""
    for part in parts[: min(MAX_DEPTH, len(parts) - 1)]:
        acc += part + "."
        yield acc


def _prefix_candidates(names: list[str]) -> list[str]:
    """Leading component runs (``'module.'``, ``'module.backbone.'``...) worth trying."""
    counts: Counter[str] = Counter(p for name in names for p in _leading(name))
    floor = max(1, len(names) // 10)
    ranked = sorted((p for p, c in counts.items() if c >= floor), key=lambda p: (-counts[p], p))
    if len(ranked) > MAX_CANDIDATES:  # never cut through a tie: that would pick alphabetically
        last = counts[ranked[MAX_CANDIDATES - 1]]
        ranked = [p for p in ranked if counts[p] >= last]
    return [""] + ranked


def _component_prefixes(names: Mapping[str, Shape]) -> set[str]:
    return {p for name in names for p in _leading(name)}


def _canonical(strip: str, add: str) -> tuple[str, str]:
    """The rule without the trailing components both sides share: ``('module.backbone.',
    'backbone.')`` -> ``('module.', '')``, the general rule it is a part of."""
    s, a = strip.split(".")[:-1], add.split(".")[:-1]
    while s and a and s[-1] == a[-1]:
        s, a = s[:-1], a[:-1]
    return "".join(p + "." for p in s), "".join(p + "." for p in a)


def _second_copy(strip: str, add: str, names: list[str], fixed: Mapping[str, Shape],
                 cache: dict[tuple[str, str], bool]) -> bool:
    """Whether the general form of the rule would put some checkpoint tensor onto a model name
    a checkpoint tensor already fills: then its prefix holds a second copy of the weights
    (``ema.``, ``teacher.``), not the missing ones."""
    key = _canonical(strip, add)
    if key not in cache:
        cs, ca = key
        k = len(cs)
        cache[key] = any(n.startswith(cs) and ca + n[k:] in fixed and ca + n[k:] != n
                         for n in names)
    return cache[key]


def _general_form_explains(strip: str, add: str, free: Mapping[str, tuple[str, Shape]],
                           free_model: Mapping[str, Shape],
                           cache: dict[tuple[str, str], bool]) -> bool:
    """Whether the rule's general form lands most of the free names under its prefix on model
    names, or fills most of the free model names under its target."""
    key = _canonical(strip, add)
    if key == (strip, add):
        return True
    if key not in cache:
        cs, ca = key
        k = len(cs)
        rest = [cur[k:] for cur, _ in free.values() if cur.startswith(cs)]
        named = sum(1 for r in rest if ca + r in free_model)
        under = sum(1 for m in free_model if m.startswith(ca))
        cache[key] = named * 2 > len(rest) or named * 2 > under
    return cache[key]


def _loaded_elsewhere(rest: Mapping[str, tuple[str, Shape]], fixed: Mapping[str, Shape],
                      homes: list[str]) -> bool:
    """Whether most of these tensors match, by name and shape, tensors that already fit under
    one prefix of the model: they are a second copy of those (an EMA, a teacher), and no rule
    may put them anywhere else."""
    for home in homes:
        same = sum(1 for r, (_, shp) in rest.items() if fixed.get(home + r) == shp)
        if same * 2 > len(rest):
            return True
    return False


def _rule_kind(strip: str, add: str, model_prefixes: set[str]) -> str | None:
    """``"wrap"``, ``"flatten"``, ``"translate"``, or None for a rule auto must not try.

    Without their common trailing components, ``"wrap"`` has one side empty (a wrapper such as
    ``module.`` or ``backbone.`` taken off or put on), ``"flatten"`` has the same name with ``.``
    for ``_`` on both sides (timm ``features_only``), ``"translate"`` has two different names
    (``encoder.`` -> ``backbone.``: only when no tensor fits as named, and it must account for
    every checkpoint tensor and for most of the model; renaming one module of a model that
    otherwise fits into another, ``fc.`` -> ``classifier.``, is a guess). Moving a module the
    model has onto a sibling of it (``conv1_BN.`` -> ``conv2_BN.``) is never tried.
    """
    s, a = _canonical(strip, add)
    if not (s and a):
        kind = "wrap"
    else:
        # the same name with '.' for '_', maybe under a wrapper ('backbone.stages.2.')
        flat = a.replace(".", "_")
        parts = s.split(".")[:-1]
        kind = "translate"
        if any("".join(p + "_" for p in parts[i:]) == flat for i in range(len(parts))):
            kind = "flatten"
    if (strip and add and strip in model_prefixes
            and not strip.startswith(add) and not add.startswith(strip)):
        return None
    return kind


def _candidates(free: dict[str, tuple[str, Shape]], free_model: dict[str, Shape],
                names: list[str], fixed: dict[str, Shape], fitted: dict[str, Shape],
                model_prefixes: set[str], n_model: int) -> list[_Rule]:
    """Every admissible rule that makes at least one free checkpoint tensor fit the model.

    ``free``: checkpoint tensors that do not fit the model as named (src -> (name, shape));
    ``free_model``: model names no checkpoint tensor has; ``names``: every checkpoint name now;
    ``fixed``: the names (and shapes) of the tensors that fit (never moved); ``fitted``: those
    that fit before any rule; ``n_model``: the model's tensor count.
    """
    by_strip: dict[str, dict[str, tuple[str, Shape]]] = {}
    for sp in _prefix_candidates([cur for cur, _ in free.values()]):
        k = len(sp)
        by_strip[sp] = {cur[k:]: (s, shp) for s, (cur, shp) in free.items() if cur.startswith(sp)}
    by_add: dict[str, dict[str, Shape]] = {}
    for ap in _prefix_candidates(list(free_model)):
        k = len(ap)
        by_add[ap] = {n[k:]: shp for n, shp in free_model.items() if n.startswith(ap)}
    rules = []
    copies: dict[tuple[str, str], bool] = {}
    general: dict[tuple[str, str], bool] = {}
    homes = _prefix_candidates(list(fitted))
    for sp, rest in by_strip.items():
        if _loaded_elsewhere(rest, fitted, homes):
            continue
        for ap, under in by_add.items():
            if sp == ap:
                continue
            named = rest.keys() & under.keys()
            hits = [r for r in named if rest[r][1] == under[r]]
            # most of those with the model's shape: coincidences never justify renaming
            if len(hits) * 2 <= len(named):
                continue
            kind = _rule_kind(sp, ap, model_prefixes)
            if kind is None or (kind == "translate" and (
                    fitted or len(named) < len(free) or len(named) * 2 <= n_model)) \
                    or _second_copy(sp, ap, names, fixed, copies):
                continue
            # it must explain most of the names under its prefix, or fill most of the model's
            # free names under its target with (strictly) mostly the right shapes
            if len(named) * 2 <= len(rest) and len(named) * 2 <= len(under):
                continue
            # and so must its general form ('aux.' -> '' for 'aux.backbone.' -> 'backbone.'):
            # a sub-tree that happens to fit is a coincidence
            if not _general_form_explains(sp, ap, free, free_model, general):
                continue
            moves = {rest[r][0]: ap + r for r in named}
            rules.append(_Rule(sp, ap, kind, moves, {rest[r][0]: ap + r for r in hits}))
    return rules


def _pick(cands: list[_Rule], out: NameMap) -> _Rule:
    """The clearly best rule, or AmbiguousRenameError listing the ones that compete."""
    cands.sort(key=_Rule.sort_key)
    best = cands[0]
    rivals: list[_Rule] = []
    for r in cands[1:]:
        if r.score * 2 <= best.score:
            break
        if r.conflicts(best) and all(r.conflicts(x) for x in rivals):
            rivals.append(r)
    if not rivals:
        return best
    group = [best] + rivals
    plain = [r for r in group if not r.is_ema]
    if len(plain) == 1 and plain[0] is best and all(r.score == best.score for r in rivals):
        others = ", ".join(f"{r.strip!r} ({r.option()})" for r in rivals)
        out.notes.append(f"the checkpoint also holds an EMA copy that fits as well, under "
                         f"{others}; loaded the non-EMA copy ({best.describe()})")
        return best
    raise AmbiguousRenameError(_ambiguity_message(group))


def _ambiguity_message(group: list[_Rule]) -> str:
    lines = [f"  {r.describe()}: {r.score} tensors fit by name and shape -> pass {r.option()}"
             for r in group]
    tie = "equally well" if all(r.score == group[0].score for r in group) else "about as well"
    return (f"auto=True found {len(group)} ways to rename the checkpoint that fit the model {tie} "
            "(each fills the same model tensors from different checkpoint tensors, or puts the "
            "same tensors in different places); torchgraft does not guess. The model was not "
            "changed.\n" + "\n".join(lines)
            + "\nPass the option of the one you mean (or auto=False to load the names as they "
            "are).")


def count_matches(names: Mapping[str, str], src: Mapping[str, Shape],
                  model: Mapping[str, Shape]) -> int:
    """Checkpoint tensors the plan copies by name and shape: for each model name, the first
    checkpoint tensor mapped to it, if its shape is the model's."""
    seen: set[str] = set()
    n = 0
    for s, cur in names.items():
        if cur in seen:
            continue
        seen.add(cur)
        if model.get(cur) == src[s]:
            n += 1
    return n


def _describe_all(rules: list[_Rule]) -> str:
    """``rename 'stages.{0..3}.' -> 'stages_{0..3}.'`` for flatten rules that differ only in one
    index; every other rule as it is."""
    groups: dict[tuple[str, str], list[_Rule]] = {}
    for r in rules:
        key = (re.sub(r"\d+", "#", r.strip), re.sub(r"\d+", "#", r.add))
        groups.setdefault(key, []).append(r)
    parts = []
    for (s_pat, a_pat), members in groups.items():
        nums = [re.findall(r"\d+", r.strip) for r in members]
        if (len(members) > 1 and s_pat.count("#") == 1 and a_pat.count("#") == 1
                and all(re.findall(r"\d+", r.add) == n for r, n in zip(members, nums))):
            vals = sorted(int(n[0]) for n in nums)
            span = (f"{{{vals[0]}..{vals[-1]}}}" if vals == list(range(vals[0], vals[-1] + 1))
                    else "{" + ",".join(map(str, vals)) + "}")
            parts.append(f"rename {s_pat.replace('#', span)!r} -> {a_pat.replace('#', span)!r}")
        else:
            parts += [r.describe() for r in sorted(members, key=lambda r: r.strip)]
    return "; ".join(parts)


def _apply_auto(names: dict[str, str], src: Mapping[str, Shape],
                model: Mapping[str, Shape], out: NameMap) -> dict[str, str]:
    held = set(names.values())
    free = {s: (cur, src[s]) for s, cur in names.items() if model.get(cur) != src[s]}
    free_model = {n: shp for n, shp in model.items() if n not in held}
    if not free or not free_model:
        return names
    model_prefixes = _component_prefixes(model)
    fixed = {cur: model[cur] for s, cur in names.items() if s not in free}
    fitted = dict(fixed)
    result = dict(names)
    chosen: list[_Rule] = []
    while len(chosen) < MAX_RULES:
        cands = _candidates(free, free_model, list(result.values()), fixed, fitted,
                            model_prefixes, len(model))
        if chosen:  # after a flatten rule, only its siblings ('stages.1.' after 'stages.0.')
            cands = [r for r in cands if r.kind == "flatten"]
        if not cands:
            break
        rule = _pick(cands, out)
        desc = "auto: " + rule.describe()
        for s, new in rule.moves.items():
            if model[new] == src[s]:
                fixed[new] = model[new]
            free_model.pop(new)
            free.pop(s)
            result[s] = new
            _note(out, s, desc)
        chosen.append(rule)
        if rule.kind != "flatten" or not free or not free_model:
            break
    if not chosen:
        return names
    out.auto_rule = (chosen[0].strip, chosen[0].add)
    base, after = count_matches(names, src, model), count_matches(result, src, model)
    out.rules.append("auto: " + _describe_all(chosen)
                     + f" (matches {after} tensors by name and shape instead of {base})")
    return result
