"""Does the recovery probe see spurious forgetting when there is some? A positive control.

The spurious-forgetting seed (Zheng et al. 2025) calls a drop in the old task *spurious* when a
few old examples bring it back (the task alignment broke, the knowledge did not), and the
benchmark's recovery probe (``mitigate.diagnostics.recovery_probe``: 10 steps on K = 10 Task-0
examples at a tenth of the lr) restores nothing on the biography preset, where we call the
forgetting real. That verdict is only worth something if the probe *does* restore a drop that is
spurious by construction. This script trains the after-Task-0 model of the default preset on one
of three "later tasks", 200 steps of plain AdamW at the preset's lr, and runs the probe after:

* ``new people`` — the preset's own task 1 (new people's biographies and QA): new knowledge in
  the old format, the benchmark's setting;
* ``format shift`` — the QA of Task 0's *own* trained people with every answer written in another
  format (``"the <value>"``): no new knowledge at all, only the answer format changes, so any drop
  of Task 0 (scored in the old format, on held-out people) is a broken alignment;
* ``new people, new format`` — task 1's people, their biographies and QA, answers in the new format.

Reported per seed: Task-0 accuracy (held-out test people, old format) after Task 0, after the
later task, and after the probe (and the probe on the un-forgotten model, its control), and
Task 0 after the later task scored with answers in the *new* format (is the knowledge there?). Run (one process, one thread; ~1 min a seed)::

    python benchmarks/recovery_control.py --seeds 0,1,2 --out results/recovery_control.json
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from benchmarks.report import finish_side_study, start_side_study  # noqa: E402

from benchmarks import biography as B  # noqa: E402
from benchmarks.compare import BatchOrder  # noqa: E402

PREFIX = "the"  # the new answer format: "the <value>" (a word of the tokenizer's corpus)
CONDITIONS = ("new people", "format shift", "new people, new format")


def later_task(cond: str, cfg: B.BiographyConfig, codec: B.WordCodec, data: B.BiographyData, seed: int
               ) -> list[dict[str, torch.Tensor]]:
    """Training batches of one of :data:`CONDITIONS` (batch size and mix as the preset's tasks)."""
    rng = random.Random(seed + 17)
    if cond == "format shift":
        people = data.qa_split(0)[0]  # Task 0's trained half: facts the model already knows
        examples = [codec.qa_example(B.qa_pair(p, a)[0], f"{PREFIX} {p.value(a)}") for p in people for a in B.ATTRIBUTES]
        return codec.batches(examples, cfg.batch_size, rng)
    examples = B._mixed_examples(cfg, codec, data, 1)
    if cond == "new people, new format":
        qa = {tuple(codec.qa_example(*B.qa_pair(p, a))[0]): codec.qa_example(B.qa_pair(p, a)[0], f"{PREFIX} {p.value(a)}")
              for p in data.qa_split(1)[0] for a in B.ATTRIBUTES}
        examples = [qa.get(tuple(ids), (ids, labels)) for ids, labels in examples]
    return codec.batches(examples, cfg.batch_size, rng)


def run_seed(seed: int, cache_dir: str, steps: int | None, recovery_steps: int, lr_scale: float,
             preset: str = "default") -> list[dict]:
    """Every condition on ``seed``: Task-0 accuracy (held-out test people) before, after, after the probe."""
    from mitigate.diagnostics import recovery_probe

    cfg = B.resolve_config(preset)
    sc = B.build_scenario(preset, cache_dir, seed)  # the cached after-Task-0 model
    data = B.generate_data(cfg, seed)
    codec = B.WordCodec(B.build_tokenizer())
    task0 = sc.tasks[0]
    steps = steps or sc.steps_per_task

    def probe(model: torch.nn.Module, reference: float):
        return recovery_probe(model, task0.recovery, task0.evaluate, steps=recovery_steps,
                              lr=sc.lr * lr_scale, seed=seed, reference=reference)

    # Task 0's held-out test people asked the same questions, answers in the new format: whether
    # the knowledge is still there when the old format is gone
    test_people = data.tune_test_split(0, cfg.tune_fraction)[1]
    new_format = codec.batches([codec.qa_example(B.qa_pair(p, a)[0], f"{PREFIX} {p.value(a)}")
                                for p in test_people for a in B.ATTRIBUTES], 256)
    base = sc.model_factory()
    before = task0.evaluate(base)["accuracy"]
    control = probe(base, before)
    rows = []
    for cond in CONDITIONS:
        batches = later_task(cond, cfg, codec, data, seed)
        model = sc.model_factory()
        opt = torch.optim.AdamW(model.parameters(), lr=sc.lr, weight_decay=0.0)
        order = BatchOrder(len(batches), seed)
        torch.manual_seed(seed)
        model.train()
        for _ in range(steps):
            loss = model(**batches[order.next()]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        rec = probe(model, before)
        in_new_format = B.answer_accuracy(model, new_format, codec.eos_id)["accuracy"]
        rows.append({"seed": seed, "condition": cond, "task0_before": before, "task0_after": rec.before,
                     "task0_after_new_format": in_new_format,
                     "task0_after_probe": rec.after, "probe_gain": rec.recovered_gain,
                     "recovered_fraction": rec.recovered_fraction,
                     "control_gain": control.recovered_gain})
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: per condition, the means over seeds (per-seed values in brackets)."""
    out = ["| later task | Task 0 after Task 0 | after the later task | same, answers in the new format | after the probe | probe gain (points) | share of the drop recovered |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for cond in CONDITIONS:
        rs = [r for r in rows if r["condition"] == cond]
        def cell(key: str, scale: float = 100.0, fmt: str = ".1f") -> str:
            vals = [r[key] * scale for r in rs if r[key] is not None]
            per = " / ".join(f"{v:{fmt}}" for v in vals)
            return f"{statistics.fmean(vals):{fmt}} ({per})" if vals else "—"
        out.append(f"| {cond} | {cell('task0_before')} | {cell('task0_after')} | {cell('task0_after_new_format')} | "
                   f"{cell('task0_after_probe')} | "
                   f"{cell('probe_gain')} | {cell('recovered_fraction', 100.0, '.0f')} % |")
    ctrl = [r["control_gain"] * 100 for r in rows if r["condition"] == CONDITIONS[0]]
    out.append("")
    out.append("Probe on the un-forgotten model (control), gain in points: " + " / ".join(f"{v:+.1f}" for v in ctrl))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--preset", default="default", choices=sorted(B.PRESETS))
    p.add_argument("--steps", type=int, default=None, help="steps of the later task (default: the preset's)")
    p.add_argument("--recovery-steps", type=int, default=10)
    p.add_argument("--recovery-lr-scale", type=float, default=0.1)
    a, t0 = start_side_study(p, argv)
    rows = [r for s in a.seeds.split(",") for r in run_seed(int(s), a.cache_dir, a.steps, a.recovery_steps,
                                                             a.recovery_lr_scale, a.preset)]
    finish_side_study(rows, table(rows), t0, a.out)
    return rows


if __name__ == "__main__":
    main()
