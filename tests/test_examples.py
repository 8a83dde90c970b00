"""The example scripts run end to end (``--quick`` sizes), as a user would start them."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import warnings

import pytest

from ddp_workers._common import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group. On timeout every process of the group gets SIGABRT
    (``PYTHONFAULTHANDLER`` prints each one's Python stack), then SIGKILL; the stacks are in the
    failure message."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONFAULTHANDLER="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGABRT)
            try:
                out, err = proc.communicate(timeout=20)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            raise TimeoutError(f"{cmd} timed out after {timeout}s\n{out[-3000:]}\n{err[-8000:]}") from None
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    assert done.returncode == 0, f"{cmd}\n{out[-3000:]}\n{err[-5000:]}"
    return done


def _table(out: str, name: str) -> list[list[float]]:
    """Rows of the result table printed under ``name:``."""
    block = out.split(f"\n{name}:", 1)[1]
    rows = []
    for line in block.splitlines()[1:]:
        if not line.strip().startswith("after"):
            break
        rows.append([float(x) for x in re.findall(r"-?\d+\.\d+", line.split(":", 1)[1])])
    return rows


def test_plain_pytorch_loop():
    out = _run([sys.executable, os.path.join(EXAMPLES, "plain_pytorch_loop.py"), "--quick"]).stdout
    for name in ("baseline", "mitigated"):
        rows = _table(out, name)
        assert len(rows) == 2 and all(len(r) == 2 for r in rows)
        assert rows[0][0] < rows[0][1]  # learned task 0 (lower loss than the unseen task 1)
    assert "average forgetting" in out


@pytest.mark.parametrize("mitigation", ["ewc", "agem"])
def test_continual_trainer_lora(mitigation):
    out = _run([sys.executable, os.path.join(EXAMPLES, "continual_trainer_lora.py"), "--quick",
                "--mitigation", mitigation]).stdout
    for name in ("none", mitigation):
        rows = _table(out, name)
        assert len(rows) == 2 and all(len(r) == 2 and all(0.0 <= x <= 1.0 for x in r) for r in rows)
    assert f"[{mitigation}] task dec" in out


@pytest.mark.distributed
def test_accelerate_ddp_two_processes():
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), os.path.join(EXAMPLES, "accelerate_ddp.py"), "--cpu", "--quick"]
    try:
        out = _run(cmd, timeout=150).stdout
    except TimeoutError as err:
        # Seen once in ~10 runs on an overloaded machine: a rank stuck in a futex at gloo teardown
        # after the script finished its work. Retry once and make the first hang visible.
        warnings.warn(f"accelerate launch hung once; retrying. {str(err)[-6000:]}", stacklevel=1)
        out = _run(cmd, timeout=150).stdout
    assert "2 process(es): replicas identical" in out
    assert out.count("task 1: held-out loss") == 1  # printed by the main process only


def test_accelerate_ddp_single_process():
    out = _run([sys.executable, os.path.join(EXAMPLES, "accelerate_ddp.py"), "--cpu", "--quick"]).stdout
    assert "1 process(es): replicas identical" in out
