"""FSDP2 worker: gradient projection and a loss term on sharded (DTensor) parameters.

Run by ``tests/test_distributed.py``::

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_workers/fsdp_worker.py \
        --out result.json [--only agem,ogd,ewc]

Same protocol as ``mitigations_worker.py``: each rank computes the single-process reference on
the global batches first, then the model is sharded with ``torch.distributed.fsdp.fully_shard``
(every decoder layer, then the root) on gloo/CPU, each rank consolidates and trains on its shard
of the data, and the gathered full parameters (``DTensor.full_tensor()``) must match the
reference within ``atol``. Projections need global dot products over sharded gradients (local
partial dots, all-reduced); a mitigation that treats the local shard as the whole vector fails
here. Rank 0 writes ``{mitigation: {...}}`` to ``--out``; exit code nonzero on any failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import lm_batch, task_tokens, tiny_llama  # noqa: E402
from mitigations_worker import (  # noqa: E402
    CONSOLIDATION_BATCHES,
    GLOBAL_BATCH,
    STEPS,
    build,
    finish,
    max_diff,
    record,
)

ALL = ("agem", "ogd", "ewc")
ATOL = 2e-5


def run(name: str, *, rank: int, world: int, fsdp: bool) -> dict[str, Tensor]:
    """Consolidate on task A, train on task B; returns the full (gathered) parameters."""
    model = tiny_llama(seed=0)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    a = task_tokens(0, GLOBAL_BATCH * CONSOLIDATION_BATCHES)
    b = task_tokens(1, GLOBAL_BATCH * STEPS)

    def shard(x: Tensor) -> Tensor:
        return x.chunk(world)[rank] if fsdp else x

    setup = build(name, model)
    if setup.consolidate is not None:
        setup.consolidate([lm_batch(shard(a[i : i + GLOBAL_BATCH])) for i in range(0, len(a), GLOBAL_BATCH)])
    model.train()
    for s in range(STEPS):
        batch = lm_batch(shard(b[s * GLOBAL_BATCH : (s + 1) * GLOBAL_BATCH]))
        loss = model(**batch).loss
        if setup.penalty is not None:
            loss = loss + setup.penalty()
        loss.backward()
        setup.optimizer.step()
        setup.optimizer.zero_grad()
    out = {}
    for n, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n] = full.detach().clone()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default=",".join(ALL))
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    references: dict[str, Any] = {}
    for name in names:
        try:
            references[name] = run(name, rank=0, world=1, fsdp=False)
        except Exception:  # noqa: BLE001
            references[name] = traceback.format_exc()
    dist.init_process_group("gloo")
    results: dict[str, Any] = {}
    for name in names:
        res: dict[str, Any] = {"ok": False}
        try:
            params = run(name, rank=rank, world=world, fsdp=True)
            ref = references[name]
            if isinstance(ref, str):
                res["error"] = "reference run failed:\n" + ref
            else:
                res["param_diff"], res["param_worst"] = max_diff(params, ref)
                res["ok"] = res["param_diff"] <= ATOL
        except Exception:  # noqa: BLE001
            res["error"] = traceback.format_exc()
        record(results, name, res)
    return finish(results, args.out)


if __name__ == "__main__":
    sys.exit(main())
