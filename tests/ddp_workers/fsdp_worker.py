"""FSDP2 worker: gradient projection and EWC on sharded (DTensor) parameters.

Run by ``tests/test_distributed.py``::

    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_workers/fsdp_worker.py \
        --out result.json [--only agem,ogd,pcgrad,ewc]

Same protocol as ``mitigations_worker.py``: each rank computes the single-process reference on
the global batches first, then the model is sharded with ``torch.distributed.fsdp.fully_shard``
(every decoder layer, then the root) on gloo/CPU, each rank consolidates and trains on its shard
of the data. Checks per mitigation:

* ``param_diff``: the gathered full parameters (``DTensor.full_tensor()``) vs the reference;
* ``state_diff``: the consolidated state (Fisher, anchors, OGD basis, A-GEM reference gradient),
  which under FSDP2 is each rank's shard, gathered back into full tensors vs the reference's;
* ``effect``: how far the reference moved from plain training (``none``): the mitigation really
  acted, so matching the reference is not matching plain FSDP training;
* ``roundtrip``: the per-rank state dict loads into a fresh mitigation and gives the same
  penalty / projection state; another rank's state dict is refused (``StateMismatchError``).

Projections need global dot products over sharded gradients (local partial dots, all-reduced);
a mitigation that treats the local shard as the whole vector fails ``param_diff`` here. Rank 0
writes ``{mitigation: {...}}`` to ``--out``; exit code nonzero on any failure.
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
    Setup,
    build,
    finish,
    flat_state,
    max_diff,
    record,
)

import mitigate  # noqa: E402
from mitigate.errors import StateMismatchError  # noqa: E402

ALL = ("agem", "ogd", "pcgrad", "ewc", "clip", "agem_tensor", "ogd_tensor_qr", "ogd_sample", "pcgrad_backward",
       "ewc_batch", "ewc_online", "agem_partly_sharded", "ewc_partly_sharded", "curvature_sharded", "ewc_calibrated_layers")
# only the decoder layers sharded, the root's parameters plain (and never synchronised by FSDP):
# unsupported, must raise NotImplementedError with this text rather than project a mix of shards
REFUSED = {"agem_partly_sharded": "some selected parameters are FSDP2-sharded DTensors and some are not",
           "ewc_partly_sharded": "some selected parameters are FSDP2-sharded DTensors and some are not",
           "curvature_sharded": "CurvatureRegularizer does not support FSDP2-sharded parameters"}
ATOL = 2e-5
MIN_EFFECT = 1e-4  # the mitigation must move the parameters at least this far from plain training
TASK_A = 61  # counts down by 2 while task B (1) counts up by 2: gradients conflict, A-GEM projects


def build_fsdp(name: str, model: torch.nn.Module) -> Setup:
    """``build`` of ``mitigations_worker`` plus variants exercising the other FSDP2 code paths."""
    name = name.removesuffix("_partly_sharded").removesuffix("_sharded")
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if name == "agem_tensor":
        opt = mitigate.GradientProjection(base, mode="agem", model=model, granularity="tensor")
    elif name == "ogd_tensor_qr":
        opt = mitigate.GradientProjection(base, mode="ogd", model=model, granularity="tensor",
                                          orthogonalization="qr")
    elif name == "ogd_sample":
        opt = mitigate.GradientProjection(base, mode="ogd", model=model, directions="sample")
    elif name == "pcgrad_backward":  # combined in backward: no remember, a replay loss each step
        opt = mitigate.GradientProjection(base, mode="pcgrad", model=model)
        return Setup(opt, None, None, opt.wrapper_state_dict)
    elif name == "ewc_batch":
        ewc = mitigate.EWC(model, strength=50.0, fisher="batch")
        return Setup(base, ewc, ewc.consolidate, ewc.state_dict)
    elif name == "ewc_calibrated_layers":
        # the default calibrated λ, measured on the first task-B batch between the forward and the
        # backward, with only the decoder layers selected: the root's (embeddings, norm, head)
        # gradients of that step must survive the calibration's own backward
        ewc = mitigate.EWC(model, balance=1.0, calibration_batches=1, params=r".*\.layers\..*")  # strong enough to act
        return Setup(base, ewc, ewc.consolidate, ewc.state_dict)
    elif name == "ewc_online":  # two consolidations merged: F ← γ F_old + F_new
        ewc = mitigate.EWC(model, strength=50.0, online_decay=0.5)

        def twice(batches: list[Any]) -> None:
            ewc.consolidate(batches[:1])
            ewc.consolidate(batches[1:])

        return Setup(base, ewc, twice, ewc.state_dict)
    else:
        return build(name, model)
    return Setup(opt, None, lambda b: opt.remember(model, b), opt.wrapper_state_dict)


def run(name: str, *, rank: int, world: int, fsdp: bool) -> tuple[dict[str, Tensor], dict[str, Tensor], Any, Any]:
    """Consolidate on task A, train on task B. Returns the full (gathered) parameters, the
    consolidated state as full tensors, (FSDP only) the state round-trip verdict, and the
    projection statistics (``None`` for loss terms)."""
    model = tiny_llama(seed=0)
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        if name not in REFUSED:
            fully_shard(model)
    a = task_tokens(TASK_A, GLOBAL_BATCH * CONSOLIDATION_BATCHES)
    b = task_tokens(1, GLOBAL_BATCH * STEPS)

    def shard(x: Tensor) -> Tensor:
        return x.chunk(world)[rank] if fsdp else x

    setup = build_fsdp(name, model)
    if setup.consolidate is not None:
        setup.consolidate([lm_batch(shard(a[i : i + GLOBAL_BATCH])) for i in range(0, len(a), GLOBAL_BATCH)])
    model.train()
    for s in range(STEPS):
        batch = lm_batch(shard(b[s * GLOBAL_BATCH : (s + 1) * GLOBAL_BATCH]))
        loss = model(**batch).loss
        if name.startswith("ewc_calibrated"):
            loss = loss + setup.penalty(batch)  # type: ignore[misc]
        elif setup.penalty is not None:
            loss = loss + setup.penalty()
        if name == "pcgrad_backward":
            r = s % CONSOLIDATION_BATCHES
            replay = lm_batch(shard(a[r * GLOBAL_BATCH : (r + 1) * GLOBAL_BATCH]))
            setup.optimizer.pcgrad_backward([loss, model(**replay).loss])
        else:
            loss.backward()
        setup.optimizer.step()
        setup.optimizer.zero_grad()
    out = {}
    for n, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n] = full.detach().clone()
    state = flat_state(setup.state())
    roundtrip = None
    if fsdp:
        state = gather_state(state, model)
        if isinstance(setup.penalty, mitigate.EWC) or isinstance(setup.optimizer, mitigate.GradientProjection):
            roundtrip = check_roundtrip(name, setup, model)
    stats = setup.optimizer.stats() if isinstance(setup.optimizer, mitigate.GradientProjection) else None
    return out, state, roundtrip, stats


def gather_state(state: dict[str, Tensor], model: torch.nn.Module) -> dict[str, Tensor]:
    """Full tensors from per-rank FSDP2 state: a tensor shaped like a parameter's local shard is
    gathered along dim 0 (FSDP2's ``Shard(0)``); one whose last dimension is the local flat size
    (OGD basis, reference gradient) is cut per parameter, gathered, and flattened again."""
    params = [p for _, p in model.named_parameters()]
    local_shapes = [tuple(p.to_local().shape) for p in params]
    local_total = sum(p.to_local().numel() for p in params)
    out = {}
    for key, t in state.items():
        mine = [t]
        if t.dim() >= 1 and t.shape[-1] == local_total and "fisher" not in key and "anchor" not in key:
            lead = t.shape[:-1]
            parts = t.split([p.to_local().numel() for p in params], dim=-1)
            full_parts = []
            for part, shp in zip(parts, local_shapes):
                gathered: list[Any] = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, part.reshape(*lead, *shp))
                full = torch.cat(gathered, dim=len(lead))
                full_parts.append(full.reshape(*lead, -1))
            out[key] = torch.cat(full_parts, dim=-1)
        elif t.dim() >= 1 and tuple(t.shape) in local_shapes:
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, t)
            out[key] = torch.cat(gathered, dim=0)
        else:
            out[key] = mine[0]
    return out


def check_roundtrip(name: str, setup: Setup, model: torch.nn.Module) -> dict[str, Any]:
    """Per-rank state dict -> fresh mitigation: same state; another rank's state refused."""
    res: dict[str, Any] = {"ok": False}
    rank, world = dist.get_rank(), dist.get_world_size()
    if isinstance(setup.penalty, mitigate.EWC):
        sd = setup.penalty.state_dict()
        fresh = mitigate.EWC(model, strength=setup.penalty.config.strength)
        fresh.load_state_dict(sd)
        a, b = setup.penalty().item(), fresh().item()
        res["penalty"], res["penalty_loaded"] = a, b
        same = a == b
        other = dict(sd)
        extra = dict(other["_extra_state"])
        extra["shard"] = {"rank": (rank + 1) % world, "world_size": world}
        other["_extra_state"] = extra
        probe = mitigate.EWC(model, strength=1.0)
    else:
        opt = setup.optimizer
        sd = opt.wrapper_state_dict()
        fresh = mitigate.GradientProjection(torch.optim.SGD(model.parameters(), lr=0.1),
                                            model=model, config=opt.config)
        fresh.load_wrapper_state_dict(sd)
        ours = flat_state(sd)
        theirs = flat_state(fresh.wrapper_state_dict())
        same = max_diff(ours, theirs)[0] == 0.0
        other = dict(sd)
        other["shard"] = {"rank": (rank + 1) % world, "world_size": world}
        probe = mitigate.GradientProjection(torch.optim.SGD(model.parameters(), lr=0.1),
                                            model=model, config=opt.config)
    try:
        (probe.load_state_dict if isinstance(probe, mitigate.EWC) else probe.load_wrapper_state_dict)(other)
        refused = False
    except StateMismatchError:
        refused = True
    res.update(same=same, other_rank_refused=refused)
    res["ok"] = bool(same and refused)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--only", default=",".join(ALL))
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    references: dict[str, Any] = {}
    for name in dict.fromkeys(["none", *names]):
        try:
            references[name] = run(name, rank=0, world=1, fsdp=False)
        except Exception:  # noqa: BLE001
            references[name] = traceback.format_exc()
    dist.init_process_group("gloo")
    results: dict[str, Any] = {}
    for name in names:
        res: dict[str, Any] = {"ok": False}
        if name in REFUSED:
            try:
                run(name, rank=rank, world=world, fsdp=True)
                res["error"] = "ran on a partly sharded model instead of refusing"
            except NotImplementedError as exc:
                res["refused"] = str(exc)
                res["ok"] = REFUSED[name] in str(exc)
            except Exception:  # noqa: BLE001
                res["error"] = traceback.format_exc()
            record(results, name, res)
            continue
        try:
            params, state, roundtrip, stats = run(name, rank=rank, world=world, fsdp=True)
            ref = references[name]
            if isinstance(ref, str):
                res["error"] = "reference run failed:\n" + ref
            else:
                res["param_diff"], res["param_worst"] = max_diff(params, ref[0])
                res["state_diff"], res["state_worst"] = max_diff(state, ref[1])
                plain = references["none"]
                res["effect"] = max_diff(ref[0], plain[0])[0] if name != "none" and not isinstance(plain, str) else None
                res["roundtrip"] = roundtrip
                res["stats"], res["reference_stats"] = stats, ref[3]
                res["ok"] = (
                    res["param_diff"] <= ATOL
                    and res["state_diff"] <= ATOL
                    and (name == "none" or (res["effect"] is not None and res["effect"] >= MIN_EFFECT))
                    and (roundtrip is None or roundtrip["ok"])
                    and (stats is None or stats["projected_fraction"] > 0)
                )
        except Exception:  # noqa: BLE001
            res["error"] = traceback.format_exc()
        record(results, name, res)
    return finish(results, args.out)


if __name__ == "__main__":
    from _common import exit_now

    exit_now(main())
