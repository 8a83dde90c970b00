"""Multi-process tests: real ``torchrun`` launches (gloo on CPU), two ranks.

* every mitigation under DDP gives bit-identical parameters and consolidated state on every rank,
  equal (float tolerance) to one process on the same global batch — this is what catches a
  Fisher / reference gradient / eigenpair estimated from one rank's shard without an all-reduce;
* ``MitigationTrainer`` under DDP (Accelerate inside the Trainer) over two tasks and a task
  boundary matches a single-process Trainer run;
* FSDP2 (``fully_shard``) runs on CPU/gloo in torch 2.13: plain training and clipping on sharded
  (DTensor) parameters match the unsharded single-process run; gradient projection and EWC,
  which need ``autograd.grad`` w.r.t. the parameters, refuse sharded parameters loudly.

Each launch is one module-scoped fixture; the tests read its per-mitigation verdicts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ddp_workers._common import torchrun

pytestmark = pytest.mark.distributed

WORKERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_workers")
DDP_MITIGATIONS = ("none", "agem", "ogd", "pcgrad", "ewc", "curvature", "curvature_preserve", "clip")
FSDP_MITIGATIONS = ("none", "agem", "ogd", "ewc")

def _launch(script: str, tmp_path_factory: pytest.TempPathFactory, only: tuple[str, ...]) -> dict:
    out = tmp_path_factory.mktemp("dist") / "result.json"
    proc = torchrun(os.path.join(WORKERS, script), "--out", str(out), "--only", ",".join(only))
    if not out.exists():
        pytest.fail(f"{script} wrote no result (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    results = json.loads(out.read_text())
    results["_returncode"] = proc.returncode
    return results


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return _launch("mitigations_worker.py", tmp_path_factory, DDP_MITIGATIONS)


@pytest.fixture(scope="module")
def fsdp_results(tmp_path_factory):
    return _launch("fsdp_worker.py", tmp_path_factory, FSDP_MITIGATIONS)


def _verdict(results: dict, name: str) -> None:
    res = results[name]
    assert res["ok"], json.dumps(res, indent=1)[:4000]


def test_replica_checker_sees_a_difference(ddp_results):
    _verdict(ddp_results, "_checker")


@pytest.mark.parametrize("name", DDP_MITIGATIONS)
def test_ddp_identical_ranks_and_matches_single_process(ddp_results, name):
    _verdict(ddp_results, name)


@pytest.mark.parametrize("name", ["none"])
def test_fsdp2_sharded_matches_single_process(fsdp_results, name):
    _verdict(fsdp_results, name)


@pytest.mark.parametrize("name", ["agem", "ogd", "ewc"])
def test_fsdp2_unsupported_mitigations_refuse_loudly(fsdp_results, name):
    """Gradient projection and EWC need autograd.grad w.r.t. the parameters, which FSDP2's
    DTensor shards do not give (the forward runs on all-gathered copies): they must raise a
    clear NotImplementedError, never silently project with zero gradients."""
    res = fsdp_results[name]
    assert not res["ok"]
    assert "does not support FSDP2-sharded parameters" in res.get("error", ""), res.get("error", "")[-2000:]


def test_worker_exit_code_reports_failures(ddp_results, fsdp_results):
    for results in (ddp_results, fsdp_results):
        all_ok = all(v["ok"] for k, v in results.items() if k != "_returncode")
        assert (results["_returncode"] == 0) == all_ok


def test_trainer_ddp_matches_single_process(tmp_path):
    script = os.path.join(WORKERS, "trainer_worker.py")
    ref = tmp_path / "ref.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    single = subprocess.run([sys.executable, script, "--save", str(ref), "--mitigations", "agem,clip,ewc"],
                            capture_output=True, text=True, timeout=240, env=env)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-4000:]
    proc = torchrun(script, "--compare", str(ref), "--mitigations", "agem,clip,ewc")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("OK (0 problems)") == 2, proc.stdout[-2000:]
