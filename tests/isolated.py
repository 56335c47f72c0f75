"""Run a snippet in a fresh interpreter with a wall-clock timeout and a memory cap.

The child imports torch and torchgraft first, then caps its address space (``RLIMIT_AS``) at
what it already maps plus ``extra_mb``, so a test of a hostile file cannot eat the machine's
memory, hang the suite or crash the pytest process.

Example:
    >>> r = run_isolated("print(tg.__name__)")   # doctest: +SKIP
    >>> r.stdout.strip()
    'torchgraft'
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")
ROOT = str(Path(__file__).resolve().parents[1])

PRELUDE = """
import os, resource, sys
import torch, numpy
import torchgraft as tg

def _vm_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0

_cap = _vm_bytes() + {extra} * (1 << 20)
resource.setrlimit(resource.RLIMIT_AS, (_cap, _cap))
"""


def run_isolated(code: str, timeout: float = 60, extra_mb: int = 1024,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``code`` (torch, numpy, ``tg`` already imported) in a capped child process."""
    script = PRELUDE.format(extra=extra_mb) + textwrap.dedent(code)
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join([SRC, ROOT, child_env.get("PYTHONPATH", "")])
    child_env.update(env or {})
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=timeout, env=child_env, cwd=ROOT)
