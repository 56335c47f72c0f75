"""The apply seam: references give their byte spans, destinations say where values go, and a
new kind of destination plugs in without touching the planner."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import torchgraft as tg
from torchgraft import targets
from torchgraft.adapters.channels import adapt_channels
from torchgraft.tensors import MemoryRef
from torchgraft.transforms import TransformRef


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64),
                               torch.nn.Linear(64, 700))  # one tensor over 256 KiB


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_file_tensors_give_their_exact_bytes(tmp_path: Path, fmt: str) -> None:
    sd = _net().state_dict()
    path = tmp_path / f"net.{fmt}"
    torch.save(sd, path) if fmt == "pth" else save_file(dict(sd), path)
    state = tg.read(path)
    for name, tensor in sd.items():
        fh, start, end = state.ref(name).byte_span()
        buf = bytearray(end - start)
        fh.pread_into(memoryview(buf), start)
        assert bytes(buf) == tensor.numpy().tobytes(), name
    assert MemoryRef(torch.ones(2)).byte_span() is None
    computed = TransformRef(MemoryRef(torch.ones(4, 3, 2, 2)), [adapt_channels(3, 1)])
    assert computed.byte_span() is None  # computed: apply calls read_into


class _Recording(targets.InPlace):
    """A new kind of target: here CPU tensors, recording each finished copy."""

    __slots__ = ()
    seen: list[str] = []

    def finish(self, model: torch.nn.Module) -> None:
        _Recording.seen.append(self.copy.slots[0].name)


def test_a_registered_destination_receives_every_copy(tmp_path: Path, monkeypatch) -> None:
    src = _net()
    path = tmp_path / "net.safetensors"
    save_file(dict(src.state_dict()), path)
    monkeypatch.setattr(targets, "DESTINATIONS", list(targets.DESTINATIONS))  # undone after
    targets.register_destination(lambda t: _Recording if t.is_cpu else None)
    _Recording.seen = []
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64),
                                torch.nn.Linear(64, 700))
    report = tg.load(model, path)
    assert sorted(_Recording.seen) == sorted(src.state_dict())  # small, large and batched
    assert report.ok and all(torch.equal(a, b) for a, b in
                             zip(model.state_dict().values(), src.state_dict().values()))


def test_meta_targets_are_filled_and_tied_names_share_one_tensor(tmp_path: Path) -> None:
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(300, 256)  # 300 KiB: the threaded path
            self.out = torch.nn.Linear(256, 300, bias=False)
            self.out.weight = self.emb.weight

    src = Tied()
    path = tmp_path / "tied.safetensors"
    save_file({"emb.weight": src.emb.weight.detach()}, path)
    with torch.device("meta"):
        model = Tied()
    report = tg.load(model, path)
    assert report.ok and model.out.weight is model.emb.weight
    assert torch.equal(model.emb.weight, src.emb.weight) and not model.emb.weight.is_meta
