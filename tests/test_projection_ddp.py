"""GradientProjection / GradientClipping under DDP: torchrun, 2 CPU ranks (gloo).

The worker (tests/ddp_workers/projection_worker.py) asserts identical parameters on both ranks and
agreement with a single-process run on the full global batch; it exits nonzero otherwise.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

WORKER = Path(__file__).parent / "ddp_workers" / "projection_worker.py"


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_projection_and_clipping_agree_across_ranks_and_with_single_process():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER)],
        capture_output=True, text=True, timeout=180, env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "DDP-PROJECTION-OK" in proc.stdout, out[-4000:]
