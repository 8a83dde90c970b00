"""``MitigationTrainer`` under DDP: two tasks, a task boundary, identical ranks, and the same
parameters as a single process with the same global batch.

Run by ``tests/test_distributed.py`` twice::

    python tests/ddp_workers/trainer_worker.py --save ref.pt --mitigations agem,clip
    python -m torch.distributed.run --nproc_per_node=2 tests/ddp_workers/trainer_worker.py \
        --compare ref.pt --mitigations agem,clip

The single-process run uses per-device batches ``world`` times larger. Accelerate shards the
same seeded sampler order over ranks (rank r takes the r-th slice of each global batch), so every
optimizer step sees the same global batch in both runs. Under torchrun every rank checks after
the task boundary and at the end that all ranks hold bit-identical parameters and consolidated
state, and that the parameters match the reference within ``ATOL``; exit code 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import task_tokens, tiny_llama  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

import mitigate  # noqa: E402
from mitigate.integrations import (  # noqa: E402
    MitigationTrainer,
    OptimizerMitigation,
    find_wrappers,
    replica_divergence,
)

ATOL = 2e-5
BATCH = 4  # global batch per optimizer step
EVAL_BATCH = 4  # global batch for consolidation
STEPS = 4


def dataset(task: int, n: int = 32) -> Dataset:
    t = task_tokens(task, n)
    return Dataset.from_dict({"input_ids": t.tolist(), "attention_mask": torch.ones_like(t).tolist(), "labels": t.tolist()})


def make_mitigations(names: list[str], model: torch.nn.Module) -> list:
    out: list = []
    for n in names:
        if n in ("agem", "ogd", "pcgrad"):
            out.append(OptimizerMitigation(mitigate.GradientProjection, mode=n))
        elif n == "clip":
            out.append(OptimizerMitigation(mitigate.GradientClipping, max_norm=0.5))
        elif n == "ewc":
            out.append(mitigate.EWC(model, strength=50.0, fisher="empirical"))
        elif n == "curvature":
            out.append(mitigate.CurvatureRegularizer(model, strength=5.0, k=2))
        else:
            raise ValueError(f"unknown mitigation {n!r}")
    return out


def state_tensors(trainer: MitigationTrainer) -> dict[str, torch.Tensor]:
    """Consolidated state of every mitigation, floating tensors by path (replay memory skipped)."""
    from mitigations_worker import flat_state

    out = {}
    for name, term in trainer.mitigations.loss_terms.items():
        out.update({f"{name}.{k}": v for k, v in flat_state(term.state_dict()).items()})
    for i, w in enumerate(find_wrappers(trainer.optimizer)):
        out.update({f"wrapper{i}.{k}": v for k, v in flat_state(w.wrapper_state_dict()).items()})
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mitigations", default="agem,clip")
    ap.add_argument("--save")
    ap.add_argument("--compare")
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    names = [n for n in args.mitigations.split(",") if n]

    model = tiny_llama(seed=0)
    mitigations = make_mitigations(names, model)
    tmp = tempfile.mkdtemp()
    common = dict(
        output_dir=tmp, report_to=[], use_cpu=True, max_steps=STEPS, learning_rate=5e-3,
        per_device_train_batch_size=BATCH // world, per_device_eval_batch_size=EVAL_BATCH // world,
        max_grad_norm=1.0, logging_steps=2, save_strategy="no", seed=0, disable_tqdm=True,
        ddp_backend="gloo" if world > 1 else None, dataloader_drop_last=True,
    )
    problems: list[str] = []
    trainer = None
    for task in (0, 1):
        trainer = MitigationTrainer(model=model, args=TrainingArguments(**common), train_dataset=dataset(task),
                                    mitigations=mitigations)
        trainer.train()
        trainer.end_task(dataset(task), max_batches=2)
        if world > 1:
            for what, values in (("parameters", replica_divergence(model)),
                                 ("consolidated state", replica_divergence(state_tensors(trainer)))):
                bad = {k: v for k, v in values.items() if v != 0.0}
                if bad:
                    problems.append(f"task {task}: {what} differ across ranks: {bad}")

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = state_tensors(trainer)
    if args.save:
        torch.save({"params": params, "state": state}, args.save)
    if args.compare:
        ref = torch.load(args.compare, weights_only=True)
        for kind, mine, theirs in (("parameter", params, ref["params"]), ("state", state, ref["state"])):
            if set(mine) != set(theirs):
                problems.append(f"{kind} keys differ: {sorted(set(mine) ^ set(theirs))}")
                continue
            for k in mine:
                d = (mine[k] - theirs[k]).abs().max().item() if mine[k].numel() else 0.0
                if not d <= ATOL:
                    problems.append(f"{kind} {k}: max |ddp - single| = {d:.3e} > {ATOL}")
    rank = int(os.environ.get("RANK", "0"))
    for p in problems:
        print(f"[rank {rank}] MISMATCH {p}", flush=True)
    print(f"[rank {rank}] {'FAIL' if problems else 'OK'} ({len(problems)} problems)", flush=True)
    return 1 if problems else 0


if __name__ == "__main__":
    from _common import exit_now

    exit_now(main())
