"""Issue 13, sections 4 (``diff --min-loaded``) and 5 (smaller defects), on real files.

``select=`` reaches integer keys and list items; the summary never rounds a partial load to
``0.00%``; a failed check never prints a line ending in a colon; ``diff`` exits 1 below
``--min-loaded`` and calls a load below half of the model partial, never "would succeed"; an
ambiguous checkpoint fails ``check`` and ``diff`` with the options that pick each copy.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import torchgraft as tg
from torchgraft.cli import main
from torchgraft.report import LOW_LOAD_WARNING, error_summary, fmt_fraction

SPEC = "tests.test_fidelity_small:tiny_net"


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 64))


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --- select= reaches integer keys ---------------------------------------------------------------


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "optimizer_states": [opt.state_dict()], "epoch": 1}, path)
    return path, opt


def test_select_reaches_integer_keys_and_list_items(trained):
    path, opt = trained
    state = opt.state_dict()["state"]
    sd = tg.read(path, select="opt/state/0")
    assert sd.selected == "opt/state/0" and set(sd) == {"step", "exp_avg", "exp_avg_sq"}
    assert torch.equal(sd["exp_avg"], state[0]["exp_avg"])
    sd = tg.read(path, select="optimizer_states/0/state/3")
    assert torch.equal(sd["exp_avg_sq"], state[3]["exp_avg_sq"])


def test_select_error_shows_keys_as_they_are(trained):
    path, _ = trained
    with pytest.raises(tg.SelectError) as err:
        tg.read(path, select="opt/state/7")
    msg = str(err.value)
    assert "opt/state has no key '7'; its keys are [0, 1, 2, 3]" in msg
    with pytest.raises(tg.SelectError, match=r"list of 1 items; '2' is not an index of it"):
        tg.read(path, select="optimizer_states/2")
    with pytest.raises(tg.SelectError, match="is a int, not a container"):
        tg.read(path, select="epoch/x")


# --- the summary ------------------------------------------------------------------------------


def test_fraction_never_rounds_to_0_or_100():
    assert fmt_fraction(1.0) == "100%" and fmt_fraction(0.0) == "0%"
    assert fmt_fraction(0.999999) == "99.99%" and fmt_fraction(1e-7) == "<0.01%"
    assert fmt_fraction(0.5) == "50.00%"


def test_summary_of_a_tiny_partial_load_is_not_zero_percent():
    model = nn.Sequential(nn.Linear(2000, 1000), nn.BatchNorm1d(4))
    src = nn.BatchNorm1d(4)
    src.running_mean.uniform_()
    ckpt = {f"1.{k}": v for k, v in src.state_dict().items()}
    report = tg.load(model, ckpt)
    text = str(report)
    assert 0 < report.loaded_fraction < 1e-4
    assert "0.00%" not in text and "loaded <0.01% of model elements (5/7 tensors)" in text
    assert torch.equal(model[1].running_mean, src.running_mean)


def test_error_summary_never_ends_in_a_colon():
    err = ("2 tensor(s) match by name but not by shape:\n  head.weight: checkpoint [1000, 8] vs "
           "model [10, 8]\n  head.bias: checkpoint [1000] vs model [10]\nThe model was not "
           "changed. Pass mismatch=\"skip\" to load the rest.")
    line = error_summary(err)
    assert line == ("2 tensor(s) match by name but not by shape: head.weight: checkpoint "
                    "[1000, 8] vs model [10, 8]; head.bias: checkpoint [1000] vs model [10]")
    assert error_summary("nothing to list:") == "nothing to list"
    assert error_summary("one line") == "one line"


def test_failed_check_lists_the_mismatches(tmp_path, capsys):
    other = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 10))
    torch.save({"state_dict": other.state_dict()}, tmp_path / "ten.pth")
    code, out, _ = run(capsys, "check", tmp_path / "ten.pth", "--model", SPEC)
    assert code == 1
    lines = out.splitlines()
    failed = [i for i, ln in enumerate(lines) if "FAILED" in ln]
    assert failed
    for i in failed:  # a line ending in ':' is followed by what it announces
        if lines[i].rstrip().endswith(":"):
            assert i + 1 < len(lines) and lines[i + 1].strip(), lines[i]
    assert "2.weight: checkpoint [10, 4] vs model [64, 4]" in out


# --- diff --min-loaded and partial loads -------------------------------------------------------


@pytest.fixture
def partial(tmp_path):
    src = tiny_net()
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("2.")}
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    return path


def test_diff_partial_load_is_not_called_a_success(partial, capsys):
    code, out, _ = run(capsys, "diff", partial, SPEC)
    report = tg.plan(tiny_net(), partial)
    assert report.loaded_fraction < LOW_LOAD_WARNING
    assert code == 0 and "would succeed" not in out
    assert f"would load only {fmt_fraction(report.loaded_fraction)} of the model" in out
    assert "warning: only" in out


@pytest.mark.parametrize("command", ["diff", "check"])
def test_min_loaded_fails_diff_like_check(partial, capsys, command):
    args = [partial, SPEC] if command == "diff" else [partial, "--model", SPEC]
    code, out, _ = run(capsys, command, *args, "--min-loaded", "0.9")
    assert code == 1 and "--min-loaded is 90.00%" in out
    code, out, _ = run(capsys, command, *args, "--min-loaded", "0.05", "--json")
    res = json.loads(out)
    assert code == res["exit_code"] == 0 and res["ok"]
    assert res["min_loaded"] == 0.05 and 0.05 < res["loaded_fraction"] < LOW_LOAD_WARNING
    if command == "diff":
        assert res["warnings"] and res["error"] is None


def test_diff_min_loaded_needs_a_model(partial, capsys):
    code, _, err = run(capsys, "diff", partial, partial, "--min-loaded", "0.5")
    assert code == 2 and "--min-loaded applies to a checkpoint vs a model" in err


@pytest.mark.parametrize("command", ["diff", "check"])
def test_ambiguous_checkpoint_fails_check_and_diff(tmp_path, capsys, command):
    a, b = tiny_net(), tiny_net()
    sd = {**{f"student.{k}": v for k, v in a.state_dict().items()},
          **{f"teacher.{k}": v for k, v in b.state_dict().items()}}
    torch.save(sd, tmp_path / "distill.pth")
    args = [tmp_path / "distill.pth", SPEC] if command == "diff" else [
        tmp_path / "distill.pth", "--model", SPEC]
    code, out, _ = run(capsys, command, *args)
    assert code == 1 and "prefix='student'" in out and "prefix='teacher'" in out
    code, out, _ = run(capsys, command, *args, "--json")
    res = json.loads(out)
    assert code == 1 and not res["ok"] and (res["report"] is None or not res["report"]["ok"])
    code, out, _ = run(capsys, command, *args, "--prefix", "teacher")
    assert code == 0


# --- inspect: parameters and buffers ----------------------------------------------------------


def test_inspect_counts_buffers_apart_when_the_file_tells(tmp_path, capsys):
    from torchgraft.inspect_ import inspect_checkpoint

    model = tiny_net()
    n_params = sum(p.numel() for p in model.parameters())
    n_buffers = sum(b.numel() for b in model.buffers())
    torch.save(model, tmp_path / "whole.pt")  # a whole pickled module: it knows its buffers
    torch.save(model.state_dict(), tmp_path / "plain.pth")  # a plain state dict does not
    (whole,) = inspect_checkpoint(tmp_path / "whole.pt")["candidates"]
    assert (whole["parameters"], whole["buffers"]) == (n_params, n_buffers)
    assert whole["elements"] == n_params + n_buffers
    (plain,) = inspect_checkpoint(tmp_path / "plain.pth")["candidates"]
    assert plain["parameters"] is None and plain["buffers"] is None
    assert plain["elements"] == n_params + n_buffers
    code, out, _ = run(capsys, "inspect", tmp_path / "plain.pth")
    assert code == 0 and f"{n_params + n_buffers} elements" in out and "params" not in out
    code, out, _ = run(capsys, "inspect", tmp_path / "whole.pt")
    assert code == 0 and f"{n_params} params + {n_buffers} buffers" in out


def test_placeholder_repr_shows_what_the_file_recorded(tmp_path):
    import argparse

    torch.save({"state_dict": {"w": torch.ones(1)},
                "hparams": argparse.Namespace(num_classes=10, lr=0.1)}, tmp_path / "ns.pth")
    hparams = tg.read(tmp_path / "ns.pth").checkpoint.root["hparams"]
    assert repr(hparams) == "<not executed: argparse.Namespace(num_classes=10, lr=0.1)>"
    shared: list = []
    for _ in range(40):  # a hostile value: repr stays short and fast
        shared = [shared, shared]
    hostile = type(hparams)(shared)
    assert len(repr(hostile)) <= 320
