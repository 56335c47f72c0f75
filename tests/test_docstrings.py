"""Every docstring example in the library runs and shows what it claims (doctest)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
import warnings

import pytest

import torchgraft

SIDE_EFFECTS = {"torchgraft.__main__", "torchgraft.integrations.mmengine_runner"}  # on import
MODULES = sorted(m.name for m in pkgutil.walk_packages(torchgraft.__path__, "torchgraft.")
                 if m.name not in SIDE_EFFECTS)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    try:
        module = importlib.import_module(name)
    except ImportError as err:  # an optional framework's integration
        pytest.skip(f"{name}: {err}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{name}: {result.failed} docstring example(s) failed"
