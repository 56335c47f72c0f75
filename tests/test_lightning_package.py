"""The newer ``lightning`` package (``lightning.pytorch``): a checkpoint trained and saved by its
own Trainer, loaded by ``load_from_checkpoint`` / ``fine_tune_from`` and compared with
Lightning's own ``load_from_checkpoint``."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pytest
import torch

import torchgraft as tg

try:
    from realmodels import fit_and_save
except ImportError:  # pragma: no cover - tests/ is a package
    from tests.realmodels import fit_and_save

L = pytest.importorskip("lightning.pytorch")


class TinyLit(L.LightningModule):
    def __init__(self, hparams: argparse.Namespace, scale: float = 1.0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, hparams.hidden),
                                       torch.nn.BatchNorm1d(hparams.hidden),
                                       torch.nn.Linear(hparams.hidden, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lightning") / "tiny.ckpt"
    torch.manual_seed(0)
    lit = TinyLit(argparse.Namespace(hidden=6, lr=0.1), scale=2.0)
    data = torch.utils.data.TensorDataset(torch.randn(4, 4), torch.randint(0, 2, (4,)))
    return fit_and_save(lit, torch.utils.data.DataLoader(data, batch_size=2), path, max_steps=2)


def test_weights_only_load_refuses_the_file(ckpt: Path) -> None:
    with pytest.raises(Exception, match="weights_only|Namespace"):
        torch.load(ckpt, weights_only=True)


def test_load_from_checkpoint_matches_lightning(ckpt: Path) -> None:
    from torchgraft.integrations.lightning import lightning_package, load_from_checkpoint

    assert lightning_package(TinyLit).__name__ == "lightning.pytorch"
    ours = load_from_checkpoint(TinyLit, ckpt, scale=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = TinyLit.load_from_checkpoint(ckpt, weights_only=False, scale=3.0)
    assert type(ours) is TinyLit and ours.hparams.scale == 3.0 == ref.hparams.scale
    assert ours.hparams.hparams == argparse.Namespace(hidden=6, lr=0.1) == ref.hparams.hparams
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert torch.equal(a, b), name
    assert load_from_checkpoint.last_report.ok


def test_fine_tune_from_loads_only_the_weights(ckpt: Path) -> None:
    from torchgraft.integrations.lightning import fine_tune_from

    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6),
                              torch.nn.Linear(6, 2))
    report = fine_tune_from(net, ckpt)
    saved = tg.read(ckpt, "state_dict")
    assert report.ok and report.loaded_fraction == 1.0 and report.rules
    assert all(torch.equal(v, saved[f"net.{k}"]) for k, v in net.state_dict().items())
