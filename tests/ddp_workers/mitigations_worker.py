"""DDP worker: every mitigation gives identical parameters on every rank, equal (within float
tolerance) to a single-process run on the same global batch.

Run by ``tests/test_distributed.py``::

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_workers/mitigations_worker.py \
        --out result.json [--only agem,ewc]

Each rank first computes the single-process reference itself (before the process group exists,
so no mitigation all-reduces), on the *global* batches. Then, under gloo + DDP, each rank
consolidates on its shard of the task-A batches and trains on its shard of the task-B batches.
Checks per mitigation:

* ``rank_spread``: max over parameters of (max over ranks − min over ranks) — must be 0;
* ``param_diff``: max |θ_ddp − θ_reference| — must be ≤ ``atol``;
* ``state_diff``: max |s_ddp − s_reference| over the consolidated state's tensors (Fisher,
  anchors, eigenpairs, OGD basis, A-GEM reference gradient) — must be ≤ ``atol``; this is what
  fails when a mitigation does not all-reduce its consolidation.

Rank 0 writes ``{mitigation: {...}}`` to ``--out``; the exit code is nonzero on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import lm_batch, task_tokens, tiny_llama  # noqa: E402

import mitigate  # noqa: E402
from mitigate.integrations import replica_divergence  # noqa: E402

GLOBAL_BATCH = 8
STEPS = 3
CONSOLIDATION_BATCHES = 2
ALL = ("none", "agem", "ogd", "pcgrad", "ewc", "ewc_calibrated", "curvature", "curvature_preserve", "clip")
ATOL = {"curvature": 1e-4, "curvature_preserve": 1e-4}
DEFAULT_ATOL = 2e-5


@dataclass
class Setup:
    optimizer: torch.optim.Optimizer
    penalty: nn.Module | None
    consolidate: Callable[[list[Any]], Any] | None
    state: Callable[[], dict[str, Any]]


def build(name: str, model: nn.Module) -> Setup:
    """The mitigation ``name`` on ``model`` with an SGD(momentum) base optimizer."""
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if name == "none":  # the harness itself: plain DDP must match the single process
        return Setup(base, None, None, dict)
    if name in ("agem", "ogd", "pcgrad"):
        opt = mitigate.GradientProjection(base, mode=name, model=model)
        return Setup(opt, None, lambda b: opt.remember(model, b), opt.wrapper_state_dict)
    if name == "ewc":
        ewc = mitigate.EWC(model, strength=50.0, fisher="empirical")
        return Setup(base, ewc, ewc.consolidate, ewc.state_dict)
    if name == "ewc_calibrated":  # the default: λ from the first 2 task-B batches, the global batch's gradient
        ewc = mitigate.EWC(model, calibration_batches=2)
        return Setup(base, ewc, ewc.consolidate, ewc.state_dict)
    if name == "curvature":  # the low-rank Laplace anchor term alone
        curv = mitigate.CurvatureRegularizer(model, strength=5.0, k=2, preservation_weight=0.0, replay_weight=0.0,
                                             curvature="hessian")
        return Setup(base, curv, curv.consolidate, curv.state_dict)
    if name == "curvature_preserve":  # + the eigenvalue-preservation term on the whole replay batch
        curv = mitigate.CurvatureRegularizer(model, strength=1.0, k=2, every=1, replay_batch_size=None,
                                             preservation_weight=1.0, replay_weight=0.0, curvature="hessian")
        return Setup(base, curv, curv.consolidate, curv.state_dict)
    if name == "clip":
        opt = mitigate.GradientClipping(base, max_norm=0.05)
        return Setup(opt, None, None, opt.wrapper_state_dict)
    raise ValueError(f"unknown mitigation {name!r}; choose from {ALL}")


def run(name: str, *, rank: int, world: int, ddp: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Consolidate on task A, train ``STEPS`` steps on task B. Returns (parameters, state tensors)."""
    model = tiny_llama(seed=0)
    a = task_tokens(0, GLOBAL_BATCH * CONSOLIDATION_BATCHES)
    b = task_tokens(1, GLOBAL_BATCH * STEPS)

    def shard(x: Tensor) -> Tensor:  # rank r takes the r-th contiguous block of the global batch
        return x.chunk(world)[rank] if ddp else x

    setup = build(name, model)
    if setup.consolidate is not None:
        setup.consolidate([lm_batch(shard(a[i : i + GLOBAL_BATCH])) for i in range(0, len(a), GLOBAL_BATCH)])
    net = nn.parallel.DistributedDataParallel(model) if ddp else model
    model.train()
    for s in range(STEPS):
        batch = lm_batch(shard(b[s * GLOBAL_BATCH : (s + 1) * GLOBAL_BATCH]))
        loss = net(**batch).loss
        if name == "ewc_calibrated":
            loss = loss + setup.penalty(batch)  # type: ignore[misc]
        elif setup.penalty is not None:
            loss = loss + setup.penalty()
        loss.backward()
        setup.optimizer.step()
        setup.optimizer.zero_grad()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return params, flat_state(setup.state())


def flat_state(state: Any, prefix: str = "") -> dict[str, Tensor]:
    """Floating tensors of a (nested) state dict, by path. Replay-memory batches are skipped:
    each rank stores its own shard of them by design."""
    out: dict[str, Tensor] = {}
    if isinstance(state, Tensor):
        if state.is_floating_point():
            out[prefix] = state.detach().float().clone()
    elif isinstance(state, dict):
        for k, v in state.items():
            if k in ("memory", "acc", "generator"):
                continue
            out.update(flat_state(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(flat_state(v, f"{prefix}.{i}"))
    return out


def max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> tuple[float, str]:
    if set(a) != set(b):
        return float("inf"), f"keys differ: {sorted(set(a) ^ set(b))}"
    worst, where = 0.0, ""
    for k in a:
        if a[k].shape != b[k].shape:
            return float("inf"), f"{k}: shape {tuple(a[k].shape)} vs {tuple(b[k].shape)}"
        d = (a[k] - b[k]).abs().max().item() if a[k].numel() else 0.0
        if not d <= worst:
            worst, where = d, k
    return worst, where


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default=",".join(ALL))
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    references: dict[str, Any] = {}
    for name in names:  # single-process references, before the process group exists
        try:
            references[name] = run(name, rank=0, world=1, ddp=False)
        except Exception:  # noqa: BLE001 - reported per mitigation
            references[name] = traceback.format_exc()

    dist.init_process_group("gloo")
    results: dict[str, Any] = {}
    # the checker itself: a difference on one rank must be seen by every rank
    probe = {"w": torch.full((3,), float(rank))}
    seen = replica_divergence(probe)["w"]
    results["_checker"] = {"ok": seen == float(world - 1), "spread": seen}
    for name in names:
        res: dict[str, Any] = {"ok": False}
        try:
            params, state = run(name, rank=rank, world=world, ddp=True)
            spread = replica_divergence(params)
            state_spread = replica_divergence(state)
            res["rank_spread"] = max(spread.values())
            res["state_rank_spread"] = max(state_spread.values(), default=0.0)
            ref = references[name]
            if isinstance(ref, str):
                res["error"] = "reference run failed:\n" + ref
            else:
                res["param_diff"], res["param_worst"] = max_diff(params, ref[0])
                res["state_diff"], res["state_worst"] = max_diff(state, ref[1])
                atol = ATOL.get(name, DEFAULT_ATOL)
                res["atol"] = atol
                res["ok"] = (
                    res["rank_spread"] == 0.0
                    and res["state_rank_spread"] == 0.0
                    and res["param_diff"] <= atol
                    and res["state_diff"] <= atol
                )
        except Exception:  # noqa: BLE001 - reported per mitigation
            res["error"] = traceback.format_exc()
        record(results, name, res)
    return finish(results, args.out)


def record(results: dict[str, Any], name: str, res: dict[str, Any]) -> None:
    """Store ``res`` under ``name`` once every rank agrees it passed (collective)."""
    ok = torch.tensor([1.0 if res["ok"] else 0.0])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    res["ok"] = bool(ok.item() == 1.0)
    results[name] = res
    if dist.get_rank() == 0:
        print(f"[{name}] {json.dumps(res, default=str)[:3000]}", flush=True)


def finish(results: dict[str, Any], out: str) -> int:
    """Rank 0 writes ``results`` to ``out``; tear down; exit code 1 unless everything passed."""
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f, indent=1, default=str)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    from _common import exit_now

    exit_now(main())
