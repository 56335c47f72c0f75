"""torchgraft never runs code from a checkpoint.

Every case of :mod:`corpus` carries a payload that runs ``touch MARKER`` (or writes the marker
through ``eval``/``exec``) when loaded with ``pickle.load`` / ``torch.load(weights_only=False)``.
Reading it with torchgraft must leave no marker, start no process, and either give back the real
tensors bit-exactly with the payload's globals listed in ``placeholders``, or raise a
:class:`torchgraft.TorchgraftError` that names one of them.

Execution is watched three ways while torchgraft runs: the marker file, monkeypatched process
spawners (``os.system``, ``posix.system``, ``subprocess.Popen.__init__``, ``os.posix_spawn``,
``os.fork``, ``os.exec*``, ``_posixsubprocess.fork_exec`` ...), and a process-wide audit hook
(``sys.addaudithook``) that records and blocks process creation, any ``open`` of the marker and
any ``compile`` of source mentioning it.
"""

from __future__ import annotations

import _compat_pickle
import _posixsubprocess
import contextlib
import importlib.util
import os
import posix
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchgraft as tg

try:
    from tests import corpus
except ImportError:  # tests/ not importable as a package
    import corpus  # type: ignore[no-redef]

TIMEOUT_S = int(os.environ.get("TORCHGRAFT_TEST_TIMEOUT", "60"))


@pytest.fixture(autouse=True)
def _per_test_timeout() -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"test ran past {TIMEOUT_S}s (TORCHGRAFT_TEST_TIMEOUT)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------------------------
# Watching for execution
# --------------------------------------------------------------------------------------------

_SPAWN_EVENTS = {
    "os.system",
    "os.exec",
    "os.fork",
    "os.forkpty",
    "os.posix_spawn",
    "os.spawn",
    "os.startfile",
    "subprocess.Popen",
    "pty.spawn",
}


class Watch:
    """Records (and blocks) anything a payload would do, while active."""

    def __init__(self, marker: Path, forbidden_modules: set[str]) -> None:
        self.marker = marker
        self.marker_text = str(marker)
        self.forbidden_modules = forbidden_modules
        self.calls: list[str] = []

    def hit(self, what: str) -> None:
        self.calls.append(what)
        raise RuntimeError(f"torchgraft test: blocked {what}")

    def assert_clean(self) -> None:
        assert self.calls == [], f"payload activity recorded: {self.calls}"
        assert not self.marker.exists(), f"marker file {self.marker} was created"
        assert list(self.marker.parent.iterdir()) == [], "files appeared next to the marker"
        cwd = Path.cwd()
        assert list(cwd.iterdir()) == [], f"files appeared in the working directory {cwd}"
        for name in self.forbidden_modules:
            assert name not in sys.modules, f"module {name} was imported"


_ACTIVE: list[Watch] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _ACTIVE:
        return
    watch = _ACTIVE[-1]
    if event in _SPAWN_EVENTS:
        watch.hit(f"audit:{event}{args!r}"[:300])
    elif event == "open" and args and watch.marker_text in str(args[0]):
        watch.hit(f"audit:open({args[0]!r})")
    elif event == "compile" and args and watch.marker_text in str(args[0]):
        watch.hit(f"audit:compile({args[0]!r})"[:300])
    elif event == "import" and args and args[0] in watch.forbidden_modules:
        watch.calls.append(f"audit:import({args[0]})")


sys.addaudithook(_audit)  # process-wide and permanent, but inert unless a Watch is active


@contextlib.contextmanager
def watching(watch: Watch) -> Iterator[Watch]:
    def recorder(what: str) -> Callable[..., Any]:
        def record(*args: Any, **kwargs: Any) -> Any:
            watch.hit(f"{what}{args!r}"[:300])

        return record

    with pytest.MonkeyPatch.context() as mp:
        for mod in (os, posix):
            for attr in (
                "system", "popen", "fork", "forkpty", "posix_spawn", "posix_spawnp",
                "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                "spawnv", "spawnve", "spawnvp", "spawnvpe", "spawnl", "spawnle",
            ):  # fmt: skip
                if hasattr(mod, attr):
                    mp.setattr(mod, attr, recorder(f"{mod.__name__}.{attr}"))
        mp.setattr(subprocess.Popen, "__init__", recorder("subprocess.Popen"))
        mp.setattr(_posixsubprocess, "fork_exec", recorder("_posixsubprocess.fork_exec"))
        _ACTIVE.append(watch)
        try:
            yield watch
        finally:
            _ACTIVE.remove(watch)


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """files/ for the checkpoints, marker/ for the marker, cwd/ as the (empty) working dir."""
    dirs = {k: tmp_path / k for k in ("files", "marker", "cwd")}
    for d in dirs.values():
        d.mkdir()
    monkeypatch.chdir(dirs["cwd"])
    return dirs


def _build(name: str, sandbox: dict[str, Path]) -> tuple[corpus.Case, Watch]:
    marker = sandbox["marker"] / "PWNED"
    case = corpus.build_malicious(name, sandbox["files"], marker)
    forbidden = {case.hidden_module} if case.hidden_module else set()
    return case, Watch(marker, forbidden)


# --------------------------------------------------------------------------------------------
# Outcome checks
# --------------------------------------------------------------------------------------------


def _aliases(qualname: str) -> set[str]:
    """``__builtin__.eval`` and ``builtins.eval`` name the same thing (pickle's fix_imports)."""
    module, _, attr = qualname.rpartition(".")
    out = {qualname}
    for table in (_compat_pickle.NAME_MAPPING, _compat_pickle.REVERSE_NAME_MAPPING):
        if (module, attr) in table:
            out.add(".".join(table[(module, attr)]))
    for table in (_compat_pickle.IMPORT_MAPPING, _compat_pickle.REVERSE_IMPORT_MAPPING):
        if module in table:
            out.add(f"{table[module]}.{attr}")
    return out


def _assert_reported(placeholders: Any, names: list[str]) -> None:
    listed = set(placeholders)
    for name in names:
        assert _aliases(name) & listed, f"placeholders {sorted(listed)} do not list {name}"


def _assert_error_names_global(err: BaseException, case: corpus.Case) -> None:
    if not isinstance(err, tg.TorchgraftError):
        raise err  # anything else is a failure; re-raise for the traceback
    assert not case.must_load, f"{case.name} must load, got {type(err).__name__}: {err}"
    msg = str(err)
    names = {a for d in case.dangerous for a in _aliases(d)}
    assert any(n in msg for n in names), (
        f"{type(err).__name__} does not name any of {case.dangerous}: {msg}"
    )


def _attempt(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as err:  # judged after the watch has been checked
        return err


def _read_everything(path: Path, **kwargs: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    state = tg.read(path, **kwargs)
    tensors = {key: state[key] for key in state}
    for key, value in tensors.items():
        assert isinstance(value, torch.Tensor), f"{key}: {type(value).__name__} is not a Tensor"
        value.detach().cpu().clone()  # materialise
    return state, tensors


def _check_read(case: corpus.Case, outcome: Any) -> None:
    if isinstance(outcome, BaseException):
        _assert_error_names_global(outcome, case)
        return
    state, tensors = outcome
    if case.may_be_empty and not tensors:
        return
    assert sorted(tensors) == sorted(case.expected), "keys differ from the real tensors"
    for key, want in case.expected.items():
        corpus.assert_bit_exact(tensors[key], want, key)
    _assert_reported(state.placeholders, case.must_report or [])


def model_for(tensors: dict[str, torch.Tensor]) -> nn.Module:
    """A module whose state dict has exactly these names/shapes/dtypes, filled with junk."""
    root = nn.Module()
    for name, t in tensors.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if part not in mod._modules:
                mod.add_module(part, nn.Module())
            mod = mod._modules[part]
        blank = torch.zeros(t.shape, dtype=t.dtype)
        if t.is_floating_point():
            mod.register_parameter(leaf, nn.Parameter(blank.fill_(0.5)))
        else:
            mod.register_buffer(leaf, blank)
    return root


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------

LOADABLE = [
    n for n in corpus.MALICIOUS_NAMES
    if not n.startswith("plain_pickle_tensor")  # nothing guaranteed to load there
]  # fmt: skip


@pytest.mark.parametrize("name", corpus.MALICIOUS_NAMES)
def test_read_runs_no_payload(name: str, sandbox: dict[str, Path]) -> None:
    case, watch = _build(name, sandbox)
    with watching(watch):
        outcome = _attempt(lambda: _read_everything(case.path))
    watch.assert_clean()
    _check_read(case, outcome)


@pytest.mark.parametrize("name", corpus.MALICIOUS_NAMES)
def test_second_read_is_as_inert(name: str, sandbox: dict[str, Path]) -> None:
    """Reading twice (caches, lazy state) is as inert as reading once."""
    case, watch = _build(name, sandbox)
    with watching(watch):
        first = _attempt(lambda: _read_everything(case.path))
        second = _attempt(lambda: _read_everything(case.path))
    watch.assert_clean()
    assert type(first) is type(second)
    _check_read(case, second)


@pytest.mark.parametrize("name", LOADABLE)
def test_load_runs_no_payload(name: str, sandbox: dict[str, Path]) -> None:
    case, watch = _build(name, sandbox)
    factory = case.model_factory or (lambda: model_for(case.expected))
    model = factory()
    before = _snapshot(model)
    with watching(watch):
        outcome = _attempt(lambda: tg.load(model, case.path))
    watch.assert_clean()
    if isinstance(outcome, BaseException):
        _assert_error_names_global(outcome, case)
        after = _snapshot(model)
        for key, value in before.items():  # all-or-nothing: a refused file changes nothing
            corpus.assert_bit_exact(after[key], value, key)
        return
    state = model.state_dict()
    assert sorted(state) == sorted(case.expected)
    for key, want in case.expected.items():
        corpus.assert_bit_exact(state[key], want, key)
    _assert_reported(outcome.placeholders, case.must_report or [])


WHOLE_MODEL = [n for n in corpus.MALICIOUS_NAMES if n.startswith("whole_model")]


@pytest.mark.parametrize("name", WHOLE_MODEL)
def test_whole_model_pickle_becomes_its_state_dict(name: str, sandbox: dict[str, Path]) -> None:
    case, watch = _build(name, sandbox)
    assert case.hidden_module and importlib.util.find_spec(case.hidden_module) is None
    with watching(watch):
        outcome = _attempt(lambda: _read_everything(case.path))
    watch.assert_clean()
    assert importlib.util.find_spec(case.hidden_module) is None
    if isinstance(outcome, BaseException):
        _assert_error_names_global(outcome, case)
        return
    state, tensors = outcome
    assert sorted(tensors) == sorted(case.expected)
    assert "cache" not in tensors, "non-persistent buffer leaked into the state dict"
    assert "unused" not in tensors
    for key, want in case.expected.items():
        corpus.assert_bit_exact(tensors[key], want, key)
    assert any(p.startswith(case.hidden_module + ".") for p in state.placeholders), (
        f"the model class {case.hidden_module}.Net is not among {state.placeholders}"
    )
    _assert_reported(state.placeholders, case.must_report or [])


@pytest.mark.parametrize("name", WHOLE_MODEL)
def test_whole_model_pickle_loads_into_fresh_twin(name: str, sandbox: dict[str, Path]) -> None:
    case, watch = _build(name, sandbox)
    assert case.model_factory is not None
    model = case.model_factory()
    assert sorted(model.state_dict()) == sorted(case.expected)
    with watching(watch):
        outcome = _attempt(lambda: tg.load(model, case.path))
    watch.assert_clean()
    if isinstance(outcome, BaseException):
        _assert_error_names_global(outcome, case)
        return
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for key, want in case.expected.items():
        got = params.get(key, buffers.get(key))
        assert got is not None, key
        corpus.assert_bit_exact(got, want, key)
    corpus.assert_bit_exact(model.cache, torch.zeros(3), "cache")  # non-persistent: untouched
    assert isinstance(model.scale, nn.Parameter)


def test_control_reads_clean(sandbox: dict[str, Path]) -> None:
    case = corpus.control_case(sandbox["files"])
    watch = Watch(sandbox["marker"] / "PWNED", set())
    with watching(watch):
        state, tensors = _read_everything(case.path)
    watch.assert_clean()
    assert sorted(tensors) == sorted(case.expected)
    for key, want in case.expected.items():
        corpus.assert_bit_exact(tensors[key], want, key)
    assert list(state.placeholders) == []


def test_control_with_trust(sandbox: dict[str, Path]) -> None:
    case = corpus.control_case(sandbox["files"])
    state, tensors = _read_everything(case.path, trust=True)
    assert sorted(tensors) == sorted(case.expected)
    for key, want in case.expected.items():
        corpus.assert_bit_exact(tensors[key], want, key)
    model = model_for(case.expected)
    report = tg.load(model, case.path, trust=True)
    for key, want in case.expected.items():
        corpus.assert_bit_exact(model.state_dict()[key], want, key)
    assert list(report.placeholders) == []


def test_control_load_reports_no_placeholders(sandbox: dict[str, Path]) -> None:
    case = corpus.control_case(sandbox["files"])
    model = model_for(case.expected)
    report = tg.load(model, case.path)
    assert list(report.placeholders) == []
    for key, want in case.expected.items():
        corpus.assert_bit_exact(model.state_dict()[key], want, key)


def test_watch_catches_a_real_payload(sandbox: dict[str, Path]) -> None:
    """The harness itself works: plain torch.load of a corpus file is caught and blocked."""
    case, watch = _build("zip_os_system", sandbox)
    with watching(watch):
        outcome = _attempt(lambda: torch.load(case.path, weights_only=False))
    assert isinstance(outcome, RuntimeError) and "blocked" in str(outcome)
    assert watch.calls, "the watch recorded nothing"
    assert not watch.marker.exists()
