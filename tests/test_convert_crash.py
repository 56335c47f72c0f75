"""A convert killed with SIGKILL mid-write never leaves a partial DST (issue: safety, 4)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import torchgraft as tg


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("old_dst", [False, True])
def test_kill_9_mid_write_leaves_old_dst_or_none(tmp_path, old_dst):
    src = tmp_path / "big.pth"
    torch.save({"state_dict": {f"w{i}": torch.randn(1024, 1024) for i in range(64)}}, src)
    src_hash = sha(src)
    dst = tmp_path / "out.safetensors"
    if old_dst:
        tg_sd = {"old": torch.ones(3)}
        from safetensors.torch import save_file

        save_file(tg_sd, dst)
        old_hash = sha(dst)
    proc = subprocess.Popen(
        [sys.executable, "-m", "torchgraft", "convert", str(src), str(dst), "--force"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    killed = False
    while time.monotonic() < deadline and proc.poll() is None:
        temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        if temps and temps[0].stat().st_size > 1 << 20:
            os.kill(proc.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.005)
    proc.wait()
    assert killed, "the writer finished before it could be killed; make the file bigger"
    assert sha(src) == src_hash
    if old_dst:
        assert sha(dst) == old_hash
        assert set(tg.read(dst)) == {"old"}
    else:
        assert not dst.exists()
