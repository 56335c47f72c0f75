"""End-to-end smoke test of ``benchmarks/bench_load.py`` on tiny checkpoints.

Runs the benchmark once (in a subprocess, as a user would) and checks that it exits 0 and
writes well-formed JSON with every expected case. It never asserts anything about timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow  # minutes of setup: CI runs it separately (bash scripts/test -m slow)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "bench_load.py"
FORMATS = ("pth", "safetensors", "hf")
PEERS = ("torch_load", "torch_load_mmap", "timm_load_checkpoint", "mmengine_load_checkpoint")
TG = ("torchgraft", "torchgraft_meta", "torchgraft_plan")


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, dict]:
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "results.json"
    cmd = [
        sys.executable, str(SCRIPT),
        "--size", "0.005", "--repeats", "1", "--tensors", "200",
        "--out", str(out), "--workdir", str(tmp / "work"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert out.exists(), proc.stderr[-4000:]
    return proc, json.loads(out.read_text())


def _cases(results: dict[str, Any]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(c["model"], c["format"], c["device"]): c for c in results["cases"]}


def test_exits_zero_and_prints_tables(bench: tuple[subprocess.CompletedProcess, dict]) -> None:
    proc, _ = bench
    assert "== llm / pth / cpu" in proc.stdout
    assert "median s" in proc.stdout and "GB/s" in proc.stdout and "peak MB" in proc.stdout


def test_machine_info(bench: tuple[subprocess.CompletedProcess, dict]) -> None:
    _, res = bench
    m = res["machine"]
    for key in ("cpu_model", "cpu_count", "ram_bytes", "date", "versions"):
        assert key in m
    assert m["versions"]["torch"]


def test_expected_cases(bench: tuple[subprocess.CompletedProcess, dict]) -> None:
    _, res = bench
    cases = _cases(res)
    assert all("generation_error" not in c for c in res["cases"])
    expected = {(m, f, "cpu") for m in ("llm", "cnn", "tensors-200") for f in FORMATS}
    expected.add(("llama", "hf", "cpu"))
    assert expected <= set(cases)
    if "cuda" not in res["devices"]:
        assert all(c["device"] == "cpu" for c in res["cases"])
    assert cases[("tensors-200", "pth", "cpu")]["n_tensors"] == 200
    assert cases[("llm", "hf", "cpu")]["n_files"] > 1


def test_loaders_and_runs(bench: tuple[subprocess.CompletedProcess, dict]) -> None:
    _, res = bench
    for (model, fmt, _), case in _cases(res).items():
        loaders = case["loaders"]
        assert case["ckpt_bytes"] > 0
        for name in ("read_bytes", "read_bytes_parallel", "mmap_copy", *PEERS, *TG):
            assert name in loaders, (model, fmt, name)
        assert ("safetensors_load_model" in loaders) == (fmt != "pth")
        assert ("transformers_from_pretrained" in loaders) == (model == "llama")
        for name, stats in loaders.items():
            assert len(stats["runs"]) == 1, (model, fmt, name)
            assert stats["status"] in ("ok", "error")
            run = stats["runs"][0]
            if stats["status"] == "ok":
                assert run["ok"] and run["verified"]
                assert run["time_s"] >= 0
                assert isinstance(run["peak_rss_above_baseline_bytes"], int)
                assert stats["median_time_s"] == run["time_s"]
            else:  # a loader that raises is recorded, not fatal
                assert stats["error"] and not run["ok"]
        # the physical reference and the plain torch.load path always work
        assert loaders["read_bytes"]["status"] == "ok"
        assert loaders["read_bytes_parallel"]["status"] == "ok"
        assert loaders["mmap_copy"]["status"] == "ok"
        if fmt == "pth":
            assert loaders["torch_load"]["status"] == "ok"


def test_failing_loader_is_recorded(tmp_path: Path) -> None:
    """A loader that raises (here: a torchgraft that cannot be imported) is an error entry."""
    fake = tmp_path / "fake"
    (fake / "torchgraft").mkdir(parents=True)
    (fake / "torchgraft" / "__init__.py").write_text("raise ImportError('not built yet')\n")
    out = tmp_path / "r.json"
    cmd = [
        sys.executable, str(SCRIPT),
        "--size", "0.002", "--repeats", "2", "--tensors", "none", "--models", "llm",
        "--formats", "pth", "--loaders", "torch_load,torchgraft",
        "--out", str(out), "--workdir", str(tmp_path / "work"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(fake)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (case,) = json.loads(out.read_text())["cases"]
    tg = case["loaders"]["torchgraft"]
    assert tg["status"] == "error" and "not built yet" in tg["error"]
    assert len(tg["runs"]) == 1  # not retried after the first failure
    assert case["loaders"]["torch_load"]["status"] == "ok"
    assert len(case["loaders"]["torch_load"]["runs"]) == 2
    assert "ERROR" in proc.stdout
