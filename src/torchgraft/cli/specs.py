"""Model specs: one mini-language that names a model, shared by every command.

    timm:convnext_tiny                         timm.create_model(..., pretrained=False)
    timm:convnext_tiny?num_classes=10&in_chans=1
    transformers:ViTModel?config=path/to/config.json-or-folder&num_hidden_layers=2
    transformers:ViTModel?config=ViTConfig&hidden_size=64     (a config class, default args)
    package.module:callable?depth=2            (plus --kwargs '{"num_classes": 10}')

``package.module`` is imported as by ``python -m``: modules in the current folder count.
Query values are parsed as int, float, bool (true/false), none, JSON lists/objects, else
strings. Models start with random weights; nothing is ever downloaded (``pretrained`` is always
False and transformers configs are read with ``local_files_only=True``). ``~`` in ``config=`` is
expanded. Models are built on the meta device when the constructor allows it (shapes only,
instant), else on the CPU. ``torchgraft check --help`` shows this syntax with examples
(``common.SPEC_HELP``: keep the two in step).

Example:
    >>> m = build_model("torch.nn:Linear?in_features=4&out_features=2")
    >>> tuple(m.weight.shape)
    (2, 4)
    >>> looks_like_spec("timm:resnet18"), looks_like_spec("ckpt.pth")
    (True, False)
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import torch

from .common import CliError

SPEC_RE = re.compile(r"^(timm|transformers):|^[\w.]+:[\w.]+")


class SpecError(CliError):
    """The model spec is malformed, names something unknown, or the model cannot be built."""


@dataclass
class ModelSpec:
    """A parsed spec: ``kind`` is 'timm', 'transformers' or 'python'."""

    kind: str
    target: str
    params: dict[str, Any] = field(default_factory=dict)
    text: str = ""


def looks_like_spec(text: str) -> bool:
    """True for ``timm:x``, ``transformers:x`` or ``pkg.mod:attr`` that is not an existing path."""
    return bool(SPEC_RE.match(text)) and not os.path.exists(text)


def parse_value(text: str) -> Any:
    """``'10'`` → 10, ``'0.1'`` → 0.1, ``'true'`` → True, ``'none'`` → None, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def parse_spec(text: str) -> ModelSpec:
    """Split ``kind:target?key=value&...`` into a :class:`ModelSpec`."""
    head, _, query = text.partition("?")
    kind, sep, target = head.partition(":")
    if not sep or not target:
        raise SpecError(f"model spec {text!r}: expected 'timm:NAME', 'transformers:CLASS' or "
                        "'package.module:callable'")
    params: dict[str, Any] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise SpecError(f"model spec {text!r}: query part {part!r} is not key=value")
        params[unquote(key)] = parse_value(unquote(value))
    if kind not in ("timm", "transformers"):
        target, kind = f"{kind}:{target}", "python"
    return ModelSpec(kind, target, params, text)


def build_model(spec: str | ModelSpec, kwargs: dict[str, Any] | None = None,
                meta: bool = True) -> torch.nn.Module:
    """Build the model a spec names (random weights); ``kwargs`` add to the query parameters."""
    s = parse_spec(spec) if isinstance(spec, str) else spec
    params = {**s.params, **(kwargs or {})}
    make = {"timm": _timm, "transformers": _transformers, "python": _python}[s.kind]
    factory = make(s, params)
    model = None
    if meta:
        try:
            with torch.device("meta"):
                model = factory()
        except Exception:
            model = None  # constructors that compute on tensors (e.g. .tolist()) need real memory
    if model is None:
        try:
            model = factory()
        except SpecError:
            raise
        except Exception as err:
            raise SpecError(f"{s.text}: cannot build the model "
                            f"({type(err).__name__}: {err})") from None
    if not isinstance(model, torch.nn.Module):
        raise SpecError(f"{s.text} returned a {type(model).__name__}, not a torch.nn.Module")
    model.eval()  # not `return model.eval()`: some models' train() returns None
    return model


def _missing(package: str) -> SpecError:
    return SpecError(f"the model spec needs the package '{package}', which is not installed; "
                     f"run: pip install {package}")


def _timm(s: ModelSpec, params: dict[str, Any]):
    try:
        import timm
    except ImportError:
        raise _missing("timm") from None
    if not timm.is_model(s.target):
        close = difflib.get_close_matches(s.target, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise SpecError(f"timm has no model named {s.target!r}{hint}")
    params.pop("pretrained", None)
    return lambda: timm.create_model(s.target, pretrained=False, **params)


def _transformers(s: ModelSpec, params: dict[str, Any]):
    try:
        import transformers
    except ImportError:
        raise _missing("transformers") from None
    cls = _hf_attr(transformers, s.target, "model class")
    config_ref = params.pop("config", None)
    if isinstance(config_ref, str) and config_ref.startswith("~"):
        config_ref = os.path.expanduser(config_ref)
    if config_ref is None:
        config_class = getattr(cls, "config_class", None)
        if config_class is None or not params:
            name = getattr(config_class, "__name__", "ConfigClass")
            raise SpecError(
                f"{s.text}: which size? Pass ?config=PATH (a model folder or config.json), or "
                f"?config={name} to build {name}'s defaults explicitly, or the sizes as "
                f"parameters (e.g. ?hidden_size=192&num_hidden_layers=12)")
        config = config_class(**params)
    elif os.path.exists(str(config_ref)):
        try:
            config = transformers.AutoConfig.from_pretrained(
                str(config_ref), local_files_only=True, **params)
        except Exception as err:
            raise SpecError(f"{s.text}: cannot read config {config_ref} ({err})") from None
    elif re.fullmatch(r"\w+Config", str(config_ref)):
        config = _hf_attr(transformers, str(config_ref), "config class")(**params)
    else:
        raise SpecError(f"{s.text}: config={config_ref!r} is neither an existing path "
                        "(config.json or a model folder) nor a config class such as ViTConfig")
    if s.target.startswith("Auto") and hasattr(cls, "from_config"):
        return lambda: cls.from_config(config)
    return lambda: cls(config)


def _hf_attr(module: Any, name: str, what: str) -> Any:
    try:
        return getattr(module, name)
    except (AttributeError, ImportError, RuntimeError) as err:
        names = [n for n in dir(module) if not n.startswith("_")]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        detail = "" if isinstance(err, AttributeError) else f" ({err})"
        raise SpecError(f"transformers has no {what} named {name!r}{detail}{hint}") from None


def _python(s: ModelSpec, params: dict[str, Any]):
    module_name, _, attr_path = s.target.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # like `python -m`: modules of the current folder import
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            raise SpecError(f"{s.text}: no module named {err.name!r} (is the package installed "
                            "and the module on PYTHONPATH?)") from None
        raise SpecError(f"{s.text}: importing {module_name} failed ({err})") from None
    except Exception as err:
        raise SpecError(f"{s.text}: importing {module_name} failed "
                        f"({type(err).__name__}: {err})") from None
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise SpecError(f"{s.text}: {module_name} has no attribute {attr_path!r}{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SpecError(f"{s.text}: {attr_path} is not callable")
    return lambda: obj(**params)
