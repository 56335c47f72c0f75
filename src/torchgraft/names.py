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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from .errors import PrefixNotFoundError, RenameError

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


def _prefix_candidates(names: list[str]) -> list[str]:
    """Leading component runs (``'module.'``, ``'module.backbone.'``...) worth trying."""
    counts: Counter[str] = Counter()
    for name in names:
        parts = name.split(".")
        acc = ""
        for part in parts[: min(MAX_DEPTH, len(parts) - 1)]:
            acc += part + "."
            counts[acc] += 1
    floor = max(1, len(names) // 10)
    ranked = sorted((p for p, c in counts.items() if c >= floor), key=lambda p: (-counts[p], p))
    return [""] + ranked[:MAX_CANDIDATES]


def _apply_auto(names: dict[str, str], src: Mapping[str, Shape],
                model: Mapping[str, Shape], out: NameMap) -> dict[str, str]:
    current = {(cur, src[s]) for s, cur in names.items()}
    model_set = {(n, shp) for n, shp in model.items()}
    base = len(current & model_set)
    if base == min(len(current), len(model_set)):
        return names
    strip_sets = {}
    for s_pre in _prefix_candidates(list(names.values())):
        k = len(s_pre)
        taken = {(n, shp) for n, shp in current if n.startswith(s_pre)}
        strip_sets[s_pre] = (taken, {(n[k:], shp) for n, shp in taken})
    add_sets = {}
    for a_pre in _prefix_candidates(list(model)):
        k = len(a_pre)
        add_sets[a_pre] = {(n[k:], shp) for n, shp in model_set if n.startswith(a_pre)}
    options = []
    for s_pre, (taken, rest) in strip_sets.items():
        unchanged = base - len(taken & model_set)
        for a_pre, under in add_sets.items():
            if s_pre or a_pre:
                hits = len(rest & under)
                # a rule must be right for most of the names it renames: a handful of
                # coincidental shape matches never justifies renaming (a silent wrong load)
                if hits * 2 < len(taken):
                    continue
                options.append((-(hits + unchanged), len(s_pre) + len(a_pre), s_pre, a_pre))
    if not options:
        return names
    neg_score, _, s_pre, a_pre = min(options)
    score = -neg_score
    if score <= base:
        return names
    out.auto_rule = (s_pre, a_pre)
    parts = []
    if s_pre:
        parts.append(f"strip {s_pre!r}")
    if a_pre:
        parts.append(f"add {a_pre!r}")
    desc = "auto: " + " and ".join(parts)
    out.rules.append(f"{desc} (matches {score} tensors by name and shape instead of {base})")
    result = {}
    k = len(s_pre)
    for s, cur in names.items():
        if cur.startswith(s_pre):
            new = a_pre + cur[k:]
            if new != cur:
                _note(out, s, desc)
            result[s] = new
        else:
            result[s] = cur
    return result
