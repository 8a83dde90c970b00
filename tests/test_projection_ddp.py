"""GradientProjection / GradientClipping under DDP: torchrun, 2 CPU ranks (gloo).

The worker (tests/ddp_workers/projection_worker.py) asserts identical parameters on both ranks and
agreement with a single-process run on the full global batch; it exits nonzero otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist
from ddp_workers._common import torchrun

WORKER = Path(__file__).parent / "ddp_workers" / "projection_worker.py"


@pytest.mark.distributed
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")
def test_projection_and_clipping_agree_across_ranks_and_with_single_process():
    proc = torchrun(str(WORKER), nproc=2, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "DDP-PROJECTION-OK" in proc.stdout, out[-4000:]
