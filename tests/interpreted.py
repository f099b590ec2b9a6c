"""Run a test file's kernel script under Triton's CPU interpreter, in a subprocess.

``TRITON_INTERPRET=1`` is read when ``triton.language`` is first imported, so the kernels run in a
fresh interpreter: ``python <script> <out>`` computes its results and ``torch.save``s them to
``out``, which this loads back.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch


def run_interpreted(script: str, out: Path, timeout: int = 300) -> Any:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, script, str(out)], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"the interpreter run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return torch.load(out)
