"""Issue 13 item 1: ``EWC(model)`` with no tuning arguments keeps more of the old task than plain
AdamW on the fact-recall testbed (``tests/fact_recall.py``), full fine-tuning.

Measured with the default (λ = 100 / mean F, scripts in the h3 report), old-task accuracy after
task 1 (AdamW → EWC) and new-task accuracy (AdamW → EWC), seeds 0 / 1 / 2:

* llama-w32-d2: old 5→57 / 9→58 / 15→64 %, new 100→100 % on all three (+49 to +52 points).
* gpt2-w48-d3:  old 6→56 / 4→12 / 7→39 %, new 100→94 / 88→23 / 100→85 % (seed 1's task 0
  reached only 54 %).

The assertions use seed 0 with margins well inside the seed-to-seed spread of the gain on
llama-w32-d2 (49–52 points): ≥ 30 points and ≥ 90 % of AdamW's new-task accuracy. gpt2 is
asserted at ≥ 20 points with ≥ 85 % of AdamW's new task (measured 50 points, 94 %). LoRA does
not meet the target with the parameter-space Fisher (see the EWC docstring), so it is not
asserted here.
"""

from __future__ import annotations

import pytest
import torch
from fact_recall import run

torch.set_num_threads(1)


@pytest.mark.parametrize(("shape", "gain", "new_share"), [("llama-w32-d2", 0.30, 0.90), ("gpt2-w48-d3", 0.20, 0.85)])
def test_default_ewc_keeps_the_old_task_full_finetuning(shape, gain, new_share):
    base = run(shape, "adamw", seed=0)
    ewc = run(shape, "ewc", seed=0)
    assert ewc.old_after - base.old_after >= gain, (base, ewc)
    assert ewc.new_after >= new_share * base.new_after, (base, ewc)
