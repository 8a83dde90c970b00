"""GradientProjection's defaults on the fact-recall testbed (issue 13, items 1 and 4).

``GradientProjection(AdamW(...), mode=m, model=model)`` with no tuning argument,
``remember(model, task0)`` at the end of task 0, then task 1 (``tests/fact_recall.py``). The
thresholds below come from the measurements on seeds 0–2 of all three testbed shapes (full and
LoRA), with a margin of the seed-to-seed spread; see the numbers next to each. To stay within
the test budget the runs here are the cheapest shape (``llama-w32-d2``, seed 0); the other shapes
and seeds were measured with the same code (``fact_recall.run``).

What the measurements say per mode (3 shapes x full/LoRA x seeds 0-2, 18 cells each):

* agem (defaults ``hold="update"``, ``ref_batches=4``): +22 to +94 points over AdamW on the old
  task at >= 90 % of its new-task accuracy in 15 of 18 cells. Misses: gpt2-w48-d3 seed 1 full
  and LoRA (+15, +12; that seed's task 0 reaches only 54 %) and gpt2-w48-d3 seed 2 LoRA (+35
  old, but the new task 72.9 % against AdamW's 83.3 %, 88 %). The old defaults (gradient only, one
  reference batch) kept +18 to +41 on full fine-tuning and +9 to +31 on LoRA (seed 0).
* pcgrad (a replay objective at every step) keeps 52-100 % (>= +49 points) everywhere; the new
  task stays >= 90 % of AdamW's in 14 of 18 cells (misses: gpt2-w48-d3 seed 1 full and LoRA,
  seed 2 LoRA, llama-w64-d4 seed 0 LoRA: 80-88 %). ``hold`` changes it by about a point either way.

The 18-cell figures above were measured with a 150-step LoRA phase. The LoRA phase now trains
``fact_recall.STEPS_LORA`` = 300 steps (at 150, plain AdamW was still learning the new task, so
its new-task figure measured learning speed); re-measured at 300 on llama-w32-d2 seeds 0 / 1 / 2:
agem LoRA +98 / +69 / +61 points over AdamW at 100 / 96 / 100 % of its new-task accuracy, pcgrad
LoRA +98 / +93 / +89 at 87 / 102 / 100 % (seed 0 misses 90 %: 83 % new against AdamW's 96 %).
* ogd keeps no more than AdamW in any variant measured (loss or ground-truth-logit basis, 16 or
  96 directions, gradient or update hold: 2-10 % old on seed 0): its directions are first-order
  at the end of task 0, and 150 AdamW steps leave that neighbourhood. It does not meet the
  target; what is asserted is what it does achieve - the stored basis removes the first-order
  change of the old task's log-probs (and ``tests/test_projection.py`` that the update holds it).
"""

from __future__ import annotations

import functools

import pytest
import torch
from fact_recall import make_task, run, trained_on_task0

import mitigate

SHAPE = "llama-w32-d2"


@functools.lru_cache(maxsize=None)
def outcome(method: str, lora: bool):
    return run(SHAPE, method, lora=lora, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "lora"), [("agem", True)], ids=["agem-lora"])  # full: GAIN, not run (time)
def test_defaults_keep_the_old_task_and_learn_the_new_one(mode, lora):
    plain, proj = outcome("adamw", lora), outcome(mode, lora)
    assert plain.old_before == proj.old_before == 1.0  # task 0 memorised
    assert proj.new_after >= 0.9 * plain.new_after - 1 / 48  # one fact of slack (48 new facts)
    assert proj.old_after - plain.old_after >= GAIN[mode, lora]


# Least gain over AdamW in old-task accuracy asserted on seed 0 of llama-w32-d2. Measured gains
# (new defaults) on seeds 0 / 1 / 2: agem full +56 / +54 / +46, agem LoRA +98 / +69 / +61 (300-step
# LoRA phase; +94 / +88 / +59 at 150), (pcgrad LoRA +98 / +93 / +89: not run here, for the
# test-time budget). The old defaults
# (hold="gradient", ref_batches=1) gave +41 (full) and +24 (LoRA) on seed 0, below these thresholds; the margins (≥ 11 points below
# seed 0) exceed the seed-to-seed spread around it.
GAIN = {
    ("agem", False): 0.45,  # measured, failed before the fix (+41); not run, for the 60 s test budget
    ("agem", True): 0.50,
}


def test_ogd_stored_basis_removes_the_first_order_change_of_the_old_log_probs():
    """J = ∂ log p(y|x)/∂θ over 32 stored old facts, v = −∇L_task1: the share of ‖J v‖ removed
    by projecting v off the OGD basis remembered from those facts. Measured on llama-w32-d2 over
    all 96 facts (seed 0): loss gradients per batch (6 directions, the default) 58 %, per sample
    (96) 100 %, ground-truth logits (16) 15 %, (96) 23 %: for memorised facts ∇z_y is not the
    direction of ∇ log p = ∇z_y − Σₖ pₖ∇zₖ, so the GTL basis removes less here."""
    model, _ = trained_on_task0(SHAPE)
    stored, task1 = make_task(0)[:2], make_task(1)
    params = [p for p in model.parameters() if p.requires_grad]

    def flat(grads):
        return torch.cat([g.reshape(-1) for g in grads]).double()

    rows = []
    for b in stored:
        lp = torch.log_softmax(model(input_ids=b["input_ids"]).logits[:, 2], -1)
        for i, y in enumerate(b["labels"][:, 3].tolist()):
            rows.append(flat(torch.autograd.grad(lp[i, y], params, retain_graph=True)))
    J = torch.stack(rows)  # (32, D)
    v = -sum(flat(torch.autograd.grad(model(**b).loss, params)) for b in task1) / len(task1)
    bases = {"loss-sample": {"directions": "sample", "directions_per_task": 32},
             "gt-logit": {"ogd_basis": "gt_logit", "directions_per_task": 32}}
    removed = {}
    for name, kw in bases.items():
        opt = mitigate.GradientProjection(torch.optim.AdamW(params), mode="ogd", model=model, **kw)
        opt.remember(model, stored)
        U = opt.basis.double()
        assert U.shape[0] == 32
        removed[name] = 1 - float((J @ (v - U.T @ (U @ v))).norm() / (J @ v).norm())
    assert removed["loss-sample"] > 0.999  # the stored facts' own gradients: first order exactly
    assert removed["gt-logit"] < 0.9 * removed["loss-sample"]  # ground-truth logits: less here
