"""The frameworks' other entry points, on real models and real framework checkpoints.

* mmengine: ``Runner(load_from=...)`` and ``Runner(resume=True)`` through torchgraft
  (``install_runner_loading``), compared with mmengine's own loading under
  ``torch.load(weights_only=False)``;
* Lightning: ``load_from_checkpoint`` / ``fine_tune_from`` compared with Lightning's own
  ``Cls.load_from_checkpoint(path, weights_only=False)``;
* transformers: ``tg.load(AutoModel.from_config(cfg), path)`` on wrapped/renamed state dicts.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import logging
import os
import pickle
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

import torchgraft as tg

try:
    import realmodels as rm
except ImportError:  # pragma: no cover - tests/ is a package
    from tests import realmodels as rm


def _same(a: object, b: object, where: str = "") -> list[str]:
    """Paths where two nested structures (tensors, arrays, containers) differ."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        ok = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
              and a.shape == b.shape and torch.equal(a, b))
        return [] if ok else [where]
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        ok = (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
              and np.array_equal(a, b))
        return [] if ok else [where]
    if type(a) is not type(b):
        return [f"{where}: {type(a).__name__} vs {type(b).__name__}"]
    if isinstance(a, dict):
        if list(a) != list(b):
            return [f"{where}: keys {list(a)} vs {list(b)}"]
        return [d for k in a for d in _same(a[k], b[k], f"{where}[{k!r}]")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{where}: length {len(a)} vs {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _same(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def _weights_only_false(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference: the frameworks' own loading with pickle allowed (trusted file)."""
    monkeypatch.setattr(torch, "load", functools.partial(torch.load, weights_only=False))


# ============================================================================ mmengine Runner
@pytest.fixture(scope="module")
def mm(tmp_path_factory):
    pytest.importorskip("mmpretrain")
    import torchgraft.integrations.mmengine as tgmm

    ckpt = rm.mmengine_runner_checkpoint(tmp_path_factory.mktemp("mmrun"))
    yield tgmm, ckpt
    tgmm.uninstall_runner_loading()


@pytest.fixture
def runner_loading(mm):
    tgmm, _ = mm
    tgmm.install_runner_loading()
    yield tgmm
    tgmm.uninstall_runner_loading()


def _runner(work_dir, max_epochs: int, num_classes: int = 10, **kwargs):
    """A fresh Runner with the configuration realmodels.mmengine_runner_checkpoint trains."""
    from mmengine.dataset import pseudo_collate
    from mmengine.runner import Runner

    model_cfg = rm._mmpretrain_classifier_cfg(num_classes)
    model_cfg["data_preprocessor"] = dict(
        type="ClsDataPreprocessor", num_classes=num_classes, mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375], to_rgb=True)
    loader = torch.utils.data.DataLoader(rm._TinyClsDataset(), batch_size=2, shuffle=False,
                                         num_workers=0, collate_fn=pseudo_collate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Runner(
            model=model_cfg, work_dir=str(work_dir), train_dataloader=loader,
            train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
            optim_wrapper=dict(optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.05)),
            param_scheduler=dict(type="MultiStepLR", milestones=[1], by_epoch=True),
            default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=1)),
            launcher="none", env_cfg=dict(cudnn_benchmark=False, dist_cfg=dict(backend="gloo")),
            log_level="ERROR", default_scope="mmpretrain", randomness=dict(seed=rm.SEED),
            experiment_name=f"tg_{work_dir.name}", **kwargs)


def _resumed_state(runner) -> dict:
    hub = runner.message_hub
    return {
        "model": dict(runner.model.state_dict()),
        "epoch": runner.epoch, "iter": runner.iter,
        "optimizer": runner.optim_wrapper.state_dict(),
        "schedulers": [s.state_dict() for s in runner.param_schedulers],
        "log_scalars": {k: (type(v).__name__, v._log_history, v._count_history, v.max_length)
                        for k, v in hub.log_scalars.items()},
        "runtime_info": {k: v for k, v in hub.runtime_info.items() if k != "last_ckpt"},
    }


def test_mm_runner_checkpoint_is_refused_by_weights_only_load(mm, tmp_path):
    """The problem: mmengine's own Runner loading fails on these files under torch >= 2.6."""
    _, ckpt = mm
    runner = _runner(tmp_path / "own", 1, load_from=str(ckpt))
    with pytest.raises(pickle.UnpicklingError, match="HistoryBuffer|weights_only"):
        runner.load_or_resume()
    rm._close_mm_logger(runner)


def test_mm_runner_load_from(mm, runner_loading, tmp_path, monkeypatch):
    _, ckpt = mm
    ours = _runner(tmp_path / "ours", 1, load_from=str(ckpt))
    before = {k: v.clone() for k, v in ours.model.state_dict().items()}
    ours.load_or_resume()
    report = ours.torchgraft_report
    assert report.ok and report.selected == "state_dict" and report.loaded_fraction == 1.0
    runner_loading.uninstall_runner_loading()
    _weights_only_false(monkeypatch)
    ref = _runner(tmp_path / "ref", 1, load_from=str(ckpt))
    ref.load_or_resume()
    assert _same(dict(ours.model.state_dict()), dict(ref.model.state_dict())) == []
    assert _same(dict(ours.model.state_dict()), before) != []  # the load changed the weights
    for r in (ours, ref):
        rm._close_mm_logger(r)


def _resumed_by_both(ckpt, runner_loading, tmp_path, monkeypatch, epochs, result):
    """``Runner(resume=True).train()`` for ``epochs`` through torchgraft, then through
    mmengine's own loading (trusted pickle): ``{"ours": result(runner), "ref": ...}``."""
    out = {}
    for name in ("ours", "ref"):
        if name == "ref":
            runner_loading.uninstall_runner_loading()
            _weights_only_false(monkeypatch)
        runner = _runner(tmp_path / name, epochs, load_from=str(ckpt), resume=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runner.train()
        out[name] = result(runner)
        rm._close_mm_logger(runner)
    return out


def test_mm_runner_resume_matches_mmengine(mm, runner_loading, tmp_path, monkeypatch):
    """resume=True: weights, optimizer, schedulers, epoch/iter and message hub as mmengine's own
    resume gives them (max_epochs=1 is reached: resumes, trains nothing)."""
    state = _resumed_by_both(mm[1], runner_loading, tmp_path, monkeypatch, 1, _resumed_state)
    ours, ref = state["ours"], state["ref"]
    assert (ours["epoch"], ours["iter"]) == (1, 2)
    assert type(ours["schedulers"][0]["milestones"]) is collections.Counter
    assert {v[0] for v in ours["log_scalars"].values()} == {"HistoryBuffer"}
    assert _same(ours, ref) == []


def test_mm_runner_resume_then_train(mm, runner_loading, tmp_path, monkeypatch):
    """Then one more epoch trains to bit-identical weights and optimizer state."""
    final = _resumed_by_both(mm[1], runner_loading, tmp_path, monkeypatch, 2, lambda r: (
        r.iter, dict(r.model.state_dict()), r.optim_wrapper.state_dict()))
    assert final["ours"][0] == 4
    assert _same(final["ours"], final["ref"]) == []


def test_mm_read_runner_checkpoint_runs_no_code(mm, monkeypatch):
    """HistoryBuffer is constructed from the recorded arrays; its pickled state methods (and
    anything else the file names) are never called."""
    tgmm, ckpt = mm
    from mmengine.logging import HistoryBuffer

    def boom(*args, **kwargs):
        raise AssertionError("the file's code ran")

    monkeypatch.setattr(HistoryBuffer, "__init__", boom)
    tree, notes = tgmm.read_runner_checkpoint(ckpt)
    reference = torch.load(ckpt, weights_only=False, map_location="cpu")
    for key, buf in tree["message_hub"]["log_scalars"].items():
        assert isinstance(buf, HistoryBuffer)
        ref = reference["message_hub"]["log_scalars"][key]
        assert np.array_equal(buf._log_history, ref._log_history)
        assert buf.mean() == ref.mean() and buf.current() == ref.current()
    assert _same(tree["optimizer"], reference["optimizer"]) == []
    assert _same(tree["param_schedulers"], reference["param_schedulers"]) == []


def test_mm_resume_part_that_cannot_be_rebuilt_is_an_error(mm, tmp_path):
    tgmm, ckpt = mm
    data = torch.load(ckpt, weights_only=False)
    data["param_schedulers"][0]["extra"] = argparse.ArgumentParser  # a class: a global
    bad = tmp_path / "bad.pth"
    torch.save(data, bad)
    with pytest.raises(tg.UnsafeCheckpointError,
                       match=r"\['param_schedulers'\]\[0\]\['extra'\]: argparse.ArgumentParser"):
        tgmm.read_runner_checkpoint(bad)
    data["param_schedulers"][0].pop("extra")
    data["meta"]["parser"] = argparse.ArgumentParser
    data["meta"]["config"] = "import os\nos.system('echo pwned')\n"
    torch.save(data, bad)
    tree, notes = tgmm.read_runner_checkpoint(bad)
    assert "config" not in tree["meta"]
    assert any("argparse.ArgumentParser" in n for n in notes)


def test_mm_runner_head_mismatch_all_or_nothing_and_options(mm, tmp_path):
    """A 10-class Runner checkpoint into a 5-class model: refused before any write (mmengine's
    own loading would load the rest and warn); mismatch='skip' given to install_runner_loading
    loads everything else and reports the head."""
    tgmm, ckpt = mm
    with pytest.raises(tg.OptionError, match="unknown option"):
        tgmm.install_runner_loading(stict=True)
    try:
        tgmm.install_runner_loading()
        runner = _runner(tmp_path / "five", 1, num_classes=5, load_from=str(ckpt))
        before = {k: v.clone() for k, v in runner.model.state_dict().items()}
        with pytest.raises(tg.ShapeMismatchError, match="head.fc.weight"):
            runner.load_or_resume()
        assert _same(dict(runner.model.state_dict()), before) == []
        rm._close_mm_logger(runner)
        tgmm.install_runner_loading(mismatch="skip")
        runner = _runner(tmp_path / "skip", 1, num_classes=5, load_from=str(ckpt))
        runner.load_or_resume()
        report = runner.torchgraft_report
        assert sorted(e.target for e in report.mismatched) == ["head.fc.bias", "head.fc.weight"]
        assert torch.equal(runner.model.head.fc.weight, before["head.fc.weight"])
        rm._close_mm_logger(runner)
    finally:
        tgmm.uninstall_runner_loading()
    from mmengine.runner import Runner

    assert not hasattr(Runner.load_checkpoint, "_torchgraft_original")


# ============================================================================ Lightning
RUN_CONFIG_BUILT: list[int] = []


def _build_run_config(hidden: int) -> RunConfig:
    """What unpickling a RunConfig calls (a global of this module, named in the file)."""
    RUN_CONFIG_BUILT.append(hidden)
    return RunConfig(hidden)


@dataclasses.dataclass
class RunConfig:
    """A user's own config class: pickled by reference, so a global torchgraft won't run."""

    hidden: int = 8

    def __reduce__(self):
        return _build_run_config, (self.hidden,)


@functools.cache
def _lit():
    """LightningModule classes (built on first use, so the module imports without Lightning)."""
    pl = pytest.importorskip("pytorch_lightning")
    from torch import nn

    class Base(pl.LightningModule):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    class LitClassifier(Base):  # the same __init__ as realmodels' _LitClassifier
        def __init__(self, num_classes: int = 10, lr: float = 0.1) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.lr = lr
            self.model = rm.timm_model("resnet18", num_classes=num_classes)

        def forward(self, x):
            return self.model(x)

    class LitNamespaceClassifier(Base):  # realmodels' _LitNamespaceClassifier
        def __init__(self, hparams: argparse.Namespace) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = rm.timm_model("resnet18", num_classes=hparams.num_classes)

        def forward(self, x):
            return self.model(x)

    class Tiny(Base):
        """save_hyperparameters(cfg): one saved argument (a Namespace or an OmegaConf config)."""

        def __init__(self, cfg) -> None:
            super().__init__()
            self.save_hyperparameters(cfg)
            hidden = cfg["hidden"] if isinstance(cfg, dict) else cfg.hidden
            self.net = nn.Sequential(nn.Linear(4, hidden), nn.BatchNorm1d(hidden),
                                     nn.Linear(hidden, 2))

        def forward(self, x):
            return self.net(x)

    class TinyObj(Base):
        def __init__(self, cfg: RunConfig, scale: float = 1.0) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.net = nn.Sequential(nn.Linear(4, cfg.hidden), nn.Linear(cfg.hidden, 2))

        def forward(self, x):
            return self.net(x)

    class TinyRenamed(Base):
        """Reads Tiny checkpoints: ``net.`` became ``body.``, fixed in on_load_checkpoint."""

        def __init__(self, cfg) -> None:
            super().__init__()
            hidden = cfg["hidden"] if isinstance(cfg, dict) else cfg.hidden
            self.body = nn.Sequential(nn.Linear(4, hidden), nn.BatchNorm1d(hidden),
                                      nn.Linear(hidden, 2))

        def on_load_checkpoint(self, checkpoint):
            sd = checkpoint["state_dict"]
            for key in list(sd):
                sd[key.replace("net.", "body.", 1)] = sd.pop(key)

    return argparse.Namespace(**{c.__name__: c for c in (LitClassifier, LitNamespaceClassifier,
                                                          Tiny, TinyObj, TinyRenamed)})


def _fit(lit, path):
    """One real training step with a real Trainer, then trainer.save_checkpoint(path)."""
    g = torch.Generator().manual_seed(rm.SEED)
    data = torch.utils.data.TensorDataset(torch.randn(4, 4, generator=g),
                                          torch.randint(0, 2, (4,), generator=g))
    return rm.fit_and_save(lit, torch.utils.data.DataLoader(data, batch_size=2), path)


@pytest.fixture(scope="module")
def lit_files(tmp_path_factory):
    _lit()
    tmp = tmp_path_factory.mktemp("lit")
    files = {"kwargs": rm.lightning_checkpoint(tmp, save_hyperparameters=True)[0],
             "namespace": rm.lightning_checkpoint(tmp, True, hparams_namespace=True)[0]}
    torch.manual_seed(rm.SEED)
    files["single"] = _fit(_lit().Tiny(argparse.Namespace(hidden=8, lr=0.1)), tmp / "single.ckpt")
    torch.manual_seed(rm.SEED)
    files["object"] = _fit(_lit().TinyObj(RunConfig(hidden=6)), tmp / "object.ckpt")
    return files


def _lightning_reference(cls, path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.load_from_checkpoint(path, weights_only=False, **kwargs)


def _compare_with_lightning(cls, path, **overrides):
    from torchgraft.integrations.lightning import load_from_checkpoint

    ours = load_from_checkpoint(cls, path, **overrides)
    ref = _lightning_reference(cls, path, **overrides)
    assert type(ours) is cls
    assert _same(dict(ours.state_dict()), dict(ref.state_dict())) == []
    assert _same(dict(ours.hparams), dict(ref.hparams)) == []
    assert load_from_checkpoint.last_report.ok
    return ours, ref


def test_lightning_kwargs_hparams(lit_files):
    cls = _lit().LitClassifier
    ours, _ = _compare_with_lightning(cls, lit_files["kwargs"])
    assert dict(ours.hparams) == {"num_classes": 10, "lr": 0.1}
    torch.manual_seed(rm.SEED)
    fresh = cls()
    assert _same(dict(ours.state_dict()), dict(fresh.state_dict())) != []  # it did load
    ours, _ = _compare_with_lightning(cls, lit_files["kwargs"], lr=0.5)
    assert ours.lr == 0.5 and ours.hparams.lr == 0.5


def test_lightning_namespace_hparams_rebuilt_without_running_code(lit_files):
    ours, ref = _compare_with_lightning(_lit().LitNamespaceClassifier, lit_files["namespace"])
    assert ours.hparams.hparams == argparse.Namespace(num_classes=10, lr=0.1)
    assert isinstance(ours.hparams.hparams, argparse.Namespace)


def test_lightning_single_saved_argument(lit_files):
    """save_hyperparameters(cfg): Lightning passes the saved dict as cfg=..., and so do we."""
    ours, _ = _compare_with_lightning(_lit().Tiny, lit_files["single"])
    assert dict(ours.hparams) == {"hidden": 8, "lr": 0.1}


def test_lightning_omegaconf_hparams(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"hidden": 8, "opt": {"lr": 0.1, "betas": [0.9, 0.99]},
                                      "name": "run", "tag": "${name}_v1", "none": None})
    torch.manual_seed(rm.SEED)
    path = _fit(_lit().Tiny(cfg), tmp_path / "omega.ckpt")
    assert "omegaconf.dictconfig.DictConfig" in tg.read(path).placeholders
    ours, ref = _compare_with_lightning(_lit().Tiny, path)
    assert isinstance(ours.hparams, omegaconf.DictConfig)
    assert omegaconf.OmegaConf.to_container(ours.hparams, resolve=True) == \
        omegaconf.OmegaConf.to_container(ref.hparams, resolve=True)
    assert ours.hparams.tag == "run_v1" and ours.hparams.opt.betas[1] == 0.99


def test_lightning_object_hparams_named_not_run(lit_files):
    from torchgraft.integrations.lightning import load_from_checkpoint

    cls = _lit().TinyObj
    built = len(RUN_CONFIG_BUILT)
    with pytest.raises(tg.UnsafeCheckpointError,
                       match=r"\['cfg'\]: [\w.]*_build_run_config.*TinyObj, path, cfg=\.\.\."):
        load_from_checkpoint(cls, lit_files["object"])
    assert len(RUN_CONFIG_BUILT) == built  # the file's global was named, never called
    whole = lit_files["object"].with_name("whole_object.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": RunConfig(6)}, whole)
    with pytest.raises(tg.UnsafeCheckpointError,
                       match=r"'hyper_parameters' is a pickled [\w.]*_build_run_config"):
        load_from_checkpoint(cls, whole)
    assert len(RUN_CONFIG_BUILT) == built
    ours = load_from_checkpoint(cls, lit_files["object"], cfg=RunConfig(hidden=6))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = cls.load_from_checkpoint(lit_files["object"], weights_only=False,
                                       cfg=RunConfig(hidden=6))
    assert _same(dict(ours.state_dict()), dict(ref.state_dict())) == []
    assert ours.hparams.scale == 1.0
    trusted = load_from_checkpoint(cls, lit_files["object"], trust=True)  # the user's choice
    assert trusted.hparams.cfg == RunConfig(hidden=6)
    assert _same(dict(trusted.state_dict()), dict(ref.state_dict())) == []


def test_lightning_on_load_checkpoint_hook_runs(lit_files):
    ours, _ = _compare_with_lightning(_lit().TinyRenamed, lit_files["single"])
    assert "body.0.weight" in ours.state_dict()


def test_lightning_strict_and_errors(lit_files, tmp_path):
    from torchgraft.integrations.lightning import load_from_checkpoint

    with pytest.raises(tg.OptionError, match="not a LightningModule"):
        load_from_checkpoint(torch.nn.Linear, lit_files["kwargs"])
    plain = tmp_path / "plain.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), plain)
    with pytest.raises(tg.SelectError, match="not a Lightning checkpoint"):
        load_from_checkpoint(_lit().LitClassifier, plain)
    with pytest.raises(tg.ShapeMismatchError, match="model.fc.weight"):  # Lightning: RuntimeError
        load_from_checkpoint(_lit().LitClassifier, lit_files["kwargs"], num_classes=5,
                             load_options={"mismatch": "error"})
    # the default: tg.load's rule for a timm model, whose replaceable classifier stays as built
    model = load_from_checkpoint(_lit().LitClassifier, lit_files["kwargs"], num_classes=5)
    report = load_from_checkpoint.last_report
    assert model.model.fc.out_features == 5
    assert sorted(e.target for e in report.mismatched) == ["model.fc.bias", "model.fc.weight"]


def test_lightning_fine_tune_from(lit_files):
    from torchgraft.integrations.lightning import fine_tune_from

    cls = _lit().LitClassifier
    ref = _lightning_reference(cls, lit_files["kwargs"])
    torch.manual_seed(rm.SEED)
    inner = rm.timm_model("resnet18", num_classes=10)
    report = fine_tune_from(inner, lit_files["kwargs"])
    assert report.ok and report.selected == "state_dict" and report.loaded_fraction == 1.0
    assert _same(dict(inner.state_dict()), dict(ref.model.state_dict())) == []
    torch.manual_seed(rm.SEED)
    whole = cls(num_classes=10)
    fine_tune_from(whole, lit_files["kwargs"])
    assert _same(dict(whole.state_dict()), dict(ref.state_dict())) == []


# ============================================================================ transformers
@pytest.fixture(scope="module")
def bert_files(tmp_path_factory):
    """A tiny BERT inside a training wrapper (``model.`` + a head), saved two ways transformers'
    from_pretrained cannot read: a wrapped checkpoint, and a folder of renamed tensors."""
    tf = pytest.importorskip("transformers")
    from safetensors.torch import save_file

    cfg = tf.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(rm.SEED)
    wrapper = torch.nn.Module()
    wrapper.model = tf.AutoModel.from_config(cfg)
    wrapper.head = torch.nn.Linear(32, 3)
    tmp = tmp_path_factory.mktemp("bert")
    torch.save({"state_dict": wrapper.state_dict(), "epoch": 3, "global_step": 120},
               tmp / "bert-finetuned.ckpt")
    folder = tmp / "bert-renamed"
    cfg.save_pretrained(folder)
    save_file({f"model.{k}": v.contiguous() for k, v in wrapper.model.state_dict().items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    return tf, cfg, wrapper.model, tmp / "bert-finetuned.ckpt", folder


def test_transformers_from_config_wrapped_checkpoint(bert_files):
    tf, cfg, trained, ckpt, _ = bert_files
    model = tf.AutoModel.from_config(cfg)
    report = tg.load(model, ckpt)
    assert report.ok and report.loaded_fraction == 1.0 and report.selected == "state_dict"
    assert report.unexpected_keys == ["head.weight", "head.bias"]
    assert _same(dict(model.state_dict()), dict(trained.state_dict())) == []


def test_transformers_from_config_renamed_folder(bert_files):
    """from_pretrained leaves every weight newly initialised; tg.load loads them all."""
    tf, _, trained, _, folder = bert_files
    with warnings.catch_warnings(), rm._quiet_loggers("transformers", level=logging.CRITICAL):
        warnings.simplefilter("ignore")
        theirs = tf.AutoModel.from_pretrained(str(folder), local_files_only=True)
    assert _same(dict(theirs.state_dict()), dict(trained.state_dict())) != []
    model = tf.AutoModel.from_config(tf.AutoConfig.from_pretrained(str(folder)))
    report = tg.load(model, folder)
    assert report.ok and report.loaded_fraction == 1.0
    assert any("strip 'model.'" in str(rule) for rule in report.rules)
    assert _same(dict(model.state_dict()), dict(trained.state_dict())) == []


# ============================================================================ hostile trees
def test_mm_custom_imports_opt_in(mm, tmp_path):
    """A config's custom_imports of torchgraft.integrations.mmengine_runner installs it."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    tgmm, ckpt = mm
    sys.modules.pop("torchgraft.integrations.mmengine_runner", None)
    cfg_file = tmp_path / "cfg.py"
    cfg_file.write_text("custom_imports = dict(imports=['torchgraft.integrations.mmengine_runner'],"
                        " allow_failed_imports=False)\n")
    try:
        Config.fromfile(str(cfg_file))
        assert hasattr(Runner.load_checkpoint, "_torchgraft_original")
        runner = _runner(tmp_path / "ci", 1, load_from=str(ckpt))
        runner.load_or_resume()
        assert runner.torchgraft_report.ok
        rm._close_mm_logger(runner)
    finally:
        tgmm.uninstall_runner_loading()


def test_mm_history_buffer_with_bad_state_is_corrupt(mm, tmp_path):
    tgmm, _ = mm
    from mmengine.logging import HistoryBuffer

    buf = HistoryBuffer([1.0, 2.0], [1, 1])
    buf._log_history = np.array(["a", None], dtype=object)
    path = tmp_path / "bad_hub.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "meta": {"epoch": 1, "iter": 2},
                "message_hub": {"log_scalars": {"loss": buf}, "runtime_info": {},
                                "resumed_keys": {}}}, path)
    with pytest.raises(tg.CorruptCheckpointError, match="HistoryBuffer.*_log_history"):
        tgmm.read_runner_checkpoint(path)


def test_rebuild_keeps_cycles_and_shared_references_linear(tmp_path):
    """A self-referencing list stays one object; 2**60 paths through shared lists are visited
    once each (run in a subprocess with a timeout and an address-space limit)."""
    code = textwrap.dedent("""
        import pickle, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))
        from torchgraft.formats.unpickler import restricted_loads
        from torchgraft.integrations._rebuild import placeholders_in, rebuild
        loop = []
        loop.append(loop)
        wide = [1]
        for _ in range(60):
            wide = [wide, wide]
        tree, _ = restricted_loads(pickle.dumps({"loop": loop, "wide": wide}))
        out = rebuild(tree)
        assert out["loop"][0] is out["loop"]
        assert out["wide"][0] is out["wide"][1]
        assert list(placeholders_in(out)) == []
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
