"""The command line for a first-time user: progress bars, plain-text help with the model-spec
syntax, ``~`` in paths, and ``check``'s multi-line reasons printed as (escaped) lines.

Everything runs on real files written by torch/safetensors, through ``main(argv)`` in-process
(stderr is captured, so it is not a terminal) and once as a real subprocess.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from torchgraft import progress as progress_mod
from torchgraft.cli import check as check_cmd
from torchgraft.cli import main
from torchgraft.cli.common import SPEC_HELP, message_lines
from torchgraft.cli.specs import build_model, parse_spec
from torchgraft.errors import TorchgraftError
from torchgraft.progress import ProgressBar, fmt_eta

LINEAR = "torch.nn:Linear?in_features=16&out_features=8"
COMMANDS = ("inspect", "diff", "convert", "check", "demo")
SPEC_COMMANDS = ("diff", "convert", "check")


def run(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def ws(tmp_path, monkeypatch) -> SimpleNamespace:
    """HOME is tmp_path (so ``~/x`` is tmp_path/x); a Linear's weights as .pth and .safetensors,
    a copy with other values, and a checkpoint with names that fit nothing."""
    monkeypatch.setenv("HOME", str(tmp_path))
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(16, 8)
    sd = {"weight": torch.randn(8, 16, generator=g), "bias": torch.randn(8, generator=g)}
    lin.load_state_dict(sd)
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "lin.pth")
    save_file(sd, tmp_path / "lin.safetensors")
    other = {k: v + 1 for k, v in sd.items()}
    save_file(other, tmp_path / "other.safetensors")
    torch.save({"encoder.proj.w": torch.zeros(3, 3), "encoder.proj.b": torch.zeros(3)},
               tmp_path / "unrelated.pth")
    return SimpleNamespace(dir=tmp_path, sd=sd, pth=tmp_path / "lin.pth",
                           st=tmp_path / "lin.safetensors", other=tmp_path / "other.safetensors",
                           unrelated=tmp_path / "unrelated.pth")


# --- progress bars ----------------------------------------------------------------------------


def test_inspect_stats_progress_bar_on_request(ws, capsys):
    code, out, err = run(capsys, "inspect", ws.pth, "--stats", "--progress")
    assert code == 0 and "weight" in out
    assert "stats lin.pth" in err and "kB" not in err
    assert re.search(r"\d+\.\d/0\.0 MB", err) and "GB/s" in err
    assert "ETA " in err and "in 0:00" in err and err.endswith("\n")
    assert "\r" in err and "\r" not in out  # the bar never touches stdout


def test_no_bar_with_no_progress_nor_off_a_terminal(ws, capsys):
    for extra in (["--no-progress"], []):  # [] is auto, and capsys is not a terminal
        for argv in (["inspect", ws.pth, "--stats"], ["diff", ws.st, ws.other, "--values"],
                     ["convert", ws.pth, ws.dir / f"c{len(extra)}.safetensors"]):
            code, _, err = run(capsys, *argv, *extra)
            assert code in (0, 1) and err == "", (argv, extra, err)
    code, _, err = run(capsys, "--no-progress", "inspect", ws.pth, "--stats")  # before COMMAND
    assert code == 0 and err == ""


def test_diff_values_and_convert_progress(ws, capsys):
    code, out, err = run(capsys, "diff", ws.st, ws.other, "--values", "--progress")
    assert code == 1 and "values differ (2)" in out
    assert "diff --values" in err and "ETA " in err and "MB" in err
    code, _, err = run(capsys, "convert", ws.pth, ws.dir / "out.safetensors", "--progress")
    assert code == 0 and "out.safetensors" in err and "2/2 tensors" in err and "MB" in err


def test_progress_in_a_real_subprocess(ws):
    env = {**os.environ, "HOME": str(ws.dir)}
    proc = subprocess.run([sys.executable, "-m", "torchgraft", "inspect", "~/lin.pth", "--stats",
                           "--progress"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ETA " in proc.stderr and "GB/s" in proc.stderr and "weight" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "torchgraft", "inspect", "~/lin.pth",
                           "--stats"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stderr == ""


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_bar_only_on_a_terminal_big_or_slow(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert ProgressBar.auto(10 << 30, None) is None  # not a terminal
    monkeypatch.setattr(sys, "stderr", _Tty())
    assert ProgressBar.auto(100, False) is None
    big, small = ProgressBar.auto(2 << 30, None), ProgressBar.auto(100, None)
    assert big.delay == 0 and small.delay == progress_mod.AUTO_DELAY
    assert ProgressBar.auto(100, True).delay == 0
    # a delayed bar whose work ends before the delay writes nothing at all
    quiet = ProgressBar(100, "x", stream=_Tty(), delay=3600)
    quiet.update(50)
    quiet.update(50)
    quiet.close()
    assert quiet.stream.getvalue() == ""
    # the old API is unchanged: maybe() is only for big work in auto mode
    assert ProgressBar.maybe(100, None) is None and ProgressBar.maybe(100, True) is not None


def test_bar_text_has_bytes_rate_and_eta():
    stream = io.StringIO()
    bar = ProgressBar(3_000_000_000, "big.pth", stream=stream)
    bar.update(1_000_000_000)
    text = stream.getvalue()
    assert "big.pth" in text and "1.00/3.00 GB" in text and "GB/s" in text
    assert re.search(r"ETA \d+:\d\d", text)
    bar.update(2_000_000_000)
    bar.close()
    assert "3.00/3.00 GB" in stream.getvalue() and " in " in stream.getvalue()
    assert (fmt_eta(0), fmt_eta(59.6), fmt_eta(61), fmt_eta(3600)) == \
        ("0:00", "1:00", "1:01", "1:00:00")


@pytest.fixture()
def http_dir(tmp_path, monkeypatch):
    """A plain HTTP server on 127.0.0.1 serving tmp_path/www; torch.hub's cache in tmp_path."""
    www = tmp_path / "www"
    www.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("no_proxy", "*")
    handler = functools.partial(_QuietHandler, directory=str(www))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(dir=www, base=f"http://127.0.0.1:{srv.server_address[1]}")
    srv.shutdown()
    srv.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_download_bar_follows_the_flag(ws, http_dir, capsys):
    save_file(ws.sd, http_dir.dir / "a.safetensors")
    save_file(ws.sd, http_dir.dir / "b.safetensors")
    code, out, err = run(capsys, "inspect", f"{http_dir.base}/a.safetensors", "--progress")
    assert code == 0 and "weight" in out
    assert "a.safetensors" in err and "MB/s" in err
    code, out, err = run(capsys, "inspect", f"{http_dir.base}/b.safetensors", "--no-progress")
    assert code == 0 and "weight" in out and err == ""


# --- help -------------------------------------------------------------------------------------


def help_text(capsys, *argv: str) -> str:
    code, out, err = run(capsys, *argv, "--help")
    assert code == 0 and err == ""
    return out


def test_help_is_plain_text(capsys):
    for argv in ([], *([c] for c in COMMANDS)):
        text = help_text(capsys, *argv)
        assert "`" not in text, (argv, [line for line in text.splitlines() if "`" in line])
        assert not re.search(r":(func|class|meth|data|attr|mod|exc):", text), argv
        assert "--progress" in text and "--no-progress" in text, argv


def test_help_explains_model_specs_with_examples(capsys):
    for command in SPEC_COMMANDS:
        text = help_text(capsys, command)
        for piece in ("model specs", "timm:NAME", "?num_classes=10", "transformers:CLASS",
                      "config=ViTConfig&image_size=224", "transformers:BertModel?config=",
                      "package.module:CALLABLE", "--kwargs", "examples:", "$ torchgraft " +
                      command):
            assert piece in text, (command, piece)
    assert "model specs" not in help_text(capsys, "inspect")


def test_spec_help_examples_are_real_specs():
    """Every 'e.g.' spec in the help parses, to the kind it is listed under; those needing only
    torch build."""
    tokens = [tok.strip("'") for line in SPEC_HELP.splitlines() if "e.g." in line
              for tok in line.split()]
    specs = [tok for tok in tokens if re.match(r"^[\w.]+:\w", tok)]
    assert len(specs) >= 7, specs
    for spec in specs:
        expected = spec.split(":")[0] if spec.startswith(("timm:", "transformers:")) else "python"
        assert parse_spec(spec).kind == expected, spec
    model = build_model("torch.nn:Linear?in_features=4&out_features=2")
    assert tuple(model.weight.shape) == (2, 4)


# --- ~ in paths -------------------------------------------------------------------------------


def test_tilde_is_expanded_in_every_path(ws, capsys):
    code, out, _ = run(capsys, "inspect", "~/lin.pth")
    assert code == 0 and "state_dict" in out
    code, out, _ = run(capsys, "diff", "~/lin.safetensors", "~/other.safetensors", "--values")
    assert code == 1 and "values differ (2)" in out
    code, out, _ = run(capsys, "check", "~/lin.pth", "--model", LINEAR)
    assert code == 0 and "check OK" in out
    code, _, _ = run(capsys, "convert", "~/lin.pth", "~/conv.safetensors")
    assert code == 0 and (ws.dir / "conv.safetensors").is_file()
    code, out, _ = run(capsys, "diff", "~/conv.safetensors", LINEAR)
    assert code == 0 and "would succeed" in out
    demo_dir = ws.dir / "demo"
    demo_dir.mkdir()
    code, _, err = run(capsys, "demo", "--dir", "~/demo", "--json")
    assert code == 0, err
    assert any(demo_dir.iterdir())


def test_tilde_in_a_spec_config_path(ws, capsys):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=32)
    folder = ws.dir / "bert"
    cfg.save_pretrained(folder)
    model = transformers.BertModel(cfg)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              folder / "model.safetensors")
    code, out, err = run(capsys, "check", "~/bert/model.safetensors", "--model",
                         "transformers:BertModel?config=~/bert/config.json")
    assert code == 0, out + err


# --- check: multi-line reasons, escaped text ----------------------------------------------------


def test_check_prints_a_multi_line_reason_as_lines(ws, capsys):
    code, out, _ = run(capsys, "check", ws.unrelated, "--model", LINEAR)
    assert code == 1
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("check FAILED"))
    failed = lines[start:]
    assert len(failed) >= 3, failed  # the plan's error keeps its lines
    assert any(line.strip().startswith("model names:") for line in failed)
    assert any(line.strip().startswith("checkpoint names:") for line in failed)
    assert all(line.startswith("  ") for line in failed[1:])
    code, out, _ = run(capsys, "check", ws.unrelated, "--model", LINEAR, "--json")
    reasons = json.loads(out)["reasons"]
    assert code == 1 and reasons and all("\n" not in r for r in reasons)  # JSON: one line each
    assert any("model names:" in r for r in reasons)


def test_check_text_escapes_names_from_the_file(ws, capsys):
    hostile = {"weight\x1b[2J\x07": torch.zeros(8, 16), "bias\nFAKE: check OK": torch.zeros(8)}
    save_file(hostile, ws.dir / "hostile.safetensors")
    code, out, _ = run(capsys, "check", ws.dir / "hostile.safetensors", "--model", LINEAR)
    assert code == 1
    assert "\x1b" not in out and "\x07" not in out and "\\e[2J\\x07" in out
    assert not any(line.startswith("FAKE") for line in out.splitlines())
    assert "bias\\nFAKE" in out


def test_several_reasons_are_listed(ws, capsys):
    code, out, _ = run(capsys, "check", ws.unrelated, "--model", LINEAR, "--strict")
    assert code == 1
    assert re.search(r"check FAILED \(\d reasons\):", out)
    assert "  - --strict:" in out and "  - only 0" in out


def test_errors_keep_their_lines_on_stderr(ws, capsys, monkeypatch):
    def boom(args: object) -> int:
        raise TorchgraftError("first line\n  second line \x1b[31mred\nthird")

    monkeypatch.setattr(check_cmd, "run", boom)
    code, out, err = run(capsys, "check", ws.pth, "--model", LINEAR)
    assert code == 2 and out == ""
    assert err == "torchgraft: error: first line\n    second line \\e[31mred\n  third\n"
    assert message_lines("a\n\n b\nc") == ["a", "   b", "  c"]


def test_path_helpers_leave_specs_and_plain_paths_alone(ws, capsys):
    code, out, _ = run(capsys, "diff", LINEAR, str(ws.pth))
    assert code == 0 and "would succeed" in out
    assert Path(os.path.expanduser("~")) == ws.dir
