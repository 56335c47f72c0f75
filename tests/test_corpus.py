"""The hostile/bad corpus is what it claims, checked statically (no payload is ever run here).

Runs without torchgraft, so a torch or Python upgrade that changes how files are written
(e.g. how ``os.system`` or tensors are pickled) shows up here first.
"""

from __future__ import annotations

import importlib.util
import io
import json
import pickle
import re
import sys
import types
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

try:
    from tests import corpus
except ImportError:  # tests/ not importable as a package
    import corpus  # type: ignore[no-redef]

# globals that live in a file embedded in the pickle (bytes), not in the outer pickle itself
_NESTED = {"plain_pickle_tensor_load_from_bytes": {"builtins.eval"}}


@pytest.fixture(scope="module")
def malicious(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[corpus.Case], Path]:
    d = tmp_path_factory.mktemp("malicious")
    marker = d / "marker" / "PWNED"
    return corpus.all_malicious(d / "files", marker), marker


def test_building_runs_nothing(malicious: tuple[list[corpus.Case], Path]) -> None:
    cases, marker = malicious
    assert not marker.exists()
    assert len({c.name for c in cases}) == len(cases) == len(corpus.MALICIOUS_NAMES)
    for name, path in cases:  # cases unpack as (name, path)
        assert path.is_file(), name


def test_dangerous_globals_are_written_as_declared(
    malicious: tuple[list[corpus.Case], Path],
) -> None:
    for case in malicious[0]:
        names = corpus.pickled_globals_of(case.path)
        missing = set(case.dangerous) - names - _NESTED.get(case.name, set())
        assert not missing, f"{case.name}: {sorted(missing)} not in {sorted(names)}"
        assert set(case.must_report or []) <= set(case.dangerous), case.name


def test_os_system_pickles_as_posix_system(malicious: tuple[list[corpus.Case], Path]) -> None:
    """Pitfall: the real os.system is written ``posix system`` on Linux."""
    if sys.platform != "linux":
        pytest.skip("posix spelling is Linux-specific")
    case = next(c for c in malicious[0] if c.name == "zip_posix_system")
    names = corpus.pickled_globals_of(case.path)
    assert "posix.system" in names and "os.system" not in names


def test_whole_model_modules_are_gone(malicious: tuple[list[corpus.Case], Path]) -> None:
    for case in malicious[0]:
        if case.hidden_module:
            assert case.hidden_module not in sys.modules
            assert importlib.util.find_spec(case.hidden_module) is None
            names = corpus.pickled_globals_of(case.path)
            assert f"{case.hidden_module}.Net" in names
            twin = case.model_factory()  # type: ignore[misc]
            assert sorted(twin.state_dict()) == sorted(case.expected)


_ALLOWED = re.compile(
    r"^(torch\._utils\._rebuild_tensor_v2|torch\._utils\._rebuild_parameter"
    r"|torch\.\w+Storage|collections\.OrderedDict|_codecs\.encode|builtins\.set"
    r"|numpy\.(_core|core)\.multiarray\._reconstruct|numpy\.ndarray|numpy\.dtype)$"
)


class _Inert:
    """Stands in for every global outside the allow-list: callable, falsy, never does anything."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert(self.name + "()")

    def __bool__(self) -> bool:
        return False


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if _ALLOWED.match(f"{module}.{name}"):
            return super().find_class(module, name)
        return _Inert(f"{module}.{name}")


_inert_pickle = types.ModuleType("inert_pickle")
_inert_pickle.Unpickler = _AllowListUnpickler  # type: ignore[attr-defined]
_inert_pickle.load = lambda f, **kw: _AllowListUnpickler(f, **kw).load()  # type: ignore[attr-defined]
_inert_pickle.loads = lambda b, **kw: _AllowListUnpickler(io.BytesIO(b), **kw).load()  # type: ignore[attr-defined]


def _inert_load(case: corpus.Case) -> dict[str, Any]:
    if case.kind in ("torch-zip", "torch-legacy"):
        obj = torch.load(case.path, weights_only=False, pickle_module=_inert_pickle)
    elif case.kind == "npz":
        with np.load(case.path, allow_pickle=False) as z:
            obj = {k: torch.from_numpy(z[k]) for k in z.files if k != "evil"}
    else:
        with open(case.path, "rb") as f:
            obj = _AllowListUnpickler(f).load()
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in obj.items()}


def test_expected_tensors_are_in_the_files(malicious: tuple[list[corpus.Case], Path]) -> None:
    """Unpickle with every non-allow-listed global replaced by an inert stand-in."""
    cases, marker = malicious
    for case in cases:
        if case.hidden_module or case.may_be_empty:  # need the real class / _load_from_bytes
            continue
        got = _inert_load(case)
        for key, want in case.expected.items():
            corpus.assert_bit_exact(got[key], want, f"{case.name}:{key}")
    assert not marker.exists()


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> list[corpus.BadCase]:
    return corpus.all_bad(tmp_path_factory.mktemp("bad"))


def test_bad_cases_are_what_they_claim(bad: list[corpus.BadCase]) -> None:
    by_name = {c.name: c for c in bad}
    assert {n for n, c in by_name.items() if c.should_load} == {
        "safetensors_named_pth",
        "torch_zip_named_safetensors",
        "torch_legacy_named_bin",
    }
    for name, path, _should_load in bad:  # bad cases unpack as (name, path, should_load)
        assert path.exists() or name == "missing_file", name
    assert by_name["zero_length"].path.stat().st_size == 0
    assert by_name["lfs_pointer_bin"].path.read_text().startswith("version https://git-lfs")
    assert "<html" in by_name["html_page_pth"].path.read_text().lower()
    idx = by_name["hf_index_dotdot_shard"].path / "model.safetensors.index.json"
    shard = json.loads(idx.read_text())["weight_map"]["w"]
    assert shard == "../../x.safetensors" and (idx.parent / shard).is_file()
    with zipfile.ZipFile(by_name["zip_member_dotdot_record"].path) as zf:
        assert any("../" in n for n in zf.namelist())
    for name in ("zip_cut_in_data_pkl", "zip_cut_in_tensor_record", "zip_cut_in_central_directory"):
        assert not zipfile.is_zipfile(by_name[name].path), name
