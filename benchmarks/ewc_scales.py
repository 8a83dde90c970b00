"""Is ``λ = scale / mean(F)`` scale-free? EWC's scale swept on both of our testbeds.

``EWC(model)`` sets ``λ = scale / mean(F)`` from the finished task's own Fisher (``scale=100``).
Issue 13 asks for a strength that works without tuning on models the library has not seen. This
script measures, for each ``scale``, the old task kept and the new task learned:

* the unit tests' fact-recall testbed (``tests/fact_recall.py``): each model shape, full
  fine-tuning and LoRA, one seed, the testbed's own training (task 1 after task 0);
* the biography benchmark's default preset on a *tuning* seed (1000 by default; never a test
  seed): the first later task only (200 steps of plain AdamW + EWC consolidated on 4 Task-0
  batches, as the benchmark's ``ewc`` method does), scored on the tuning people;

and beside them what a scale rule could be built from: the Fisher's mean, its concentration
(share of ``ΣF`` in the top 1 % of entries), the old task's loss at ``θ*`` and the RMS of the new
task's first minibatch gradients. A rule that is scale-free would put the good scale of every
row at the same value of some such statistic.

Run (one process, one thread; ~5 min)::

    python benchmarks/ewc_scales.py --out results/ewc_scales.json

``--sequence-balances 1e-3,3e-3,1e-2`` instead runs the calibrated default's rule
(``EWC(model, balance=b)``, a λ per task from the next task's gradient) through biography's whole
sequence on the tuning seeds 1000–1001, against seq: how ``balance = 3e-3`` was checked (~8 min)::

    python benchmarks/ewc_scales.py --sequence-balances 1e-3,3e-3,1e-2 --out results/ewc_balance_sequence.json

Prints a markdown table; ``--out`` writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from benchmarks.report import finish_side_study, start_side_study  # noqa: E402

SCALES = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def fisher_stats(ewc, model, old: list[dict], new: list[dict]) -> dict:
    """Statistics a scale rule could use: mean, concentration and count of the stored Fisher, the
    old task's loss at θ* and the RMS of the new task's minibatch gradients at θ*."""
    f = torch.cat([x.flatten().double() for x in ewc.fisher().values()])
    with torch.no_grad():
        loss = sum(float(model(**b).loss) for b in old) / len(old)
    params = [p for p in model.parameters() if p.requires_grad]
    rms = []
    for b in new[:3]:
        grads = torch.autograd.grad(model(**b).loss, params, allow_unused=True)
        g = torch.cat([(x if x is not None else torch.zeros_like(p)).flatten() for x, p in zip(grads, params)])
        rms.append(float(g.pow(2).mean().sqrt()))
    top = f.sort(descending=True).values[: max(1, f.numel() // 100)]
    return {"n": f.numel(), "fisher_mean": float(f.mean()), "top1pct_share": float(top.sum() / f.sum()),
            "old_loss": loss, "new_grad_rms": sum(rms) / len(rms)}


def fact_recall_rows(shape: str, lora: bool, seed: int, scales: tuple[float, ...]) -> list[dict]:
    """One row per scale (and AdamW's, ``scale=None``) on a fact-recall cell."""
    sys.path.insert(0, str(_ROOT / "tests"))
    import fact_recall as fr

    import mitigate

    rows = []
    for scale in (None, *scales):
        model, old_before = fr.trained_on_task0(shape, seed=seed)
        task0, task1 = fr.make_task(0, seed=seed), fr.make_task(1, seed=seed)
        lr, steps = fr.LR_FULL, fr.STEPS
        if lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
            lr, steps = fr.LR_LORA, fr.STEPS_LORA
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
        torch.manual_seed(seed + 1)
        ewc, stats = None, {}
        if scale is not None:
            ewc = mitigate.EWC(model, scale=scale)
            ewc.consolidate(task0)
            stats = fisher_stats(ewc, model, task0, task1)
        fr._train(model, task1, opt, steps, ewc)
        rows.append({"testbed": f"fact-recall {shape} {'LoRA' if lora else 'full'} seed {seed}", "scale": scale,
                     "old": fr.accuracy(model, task0), "new": fr.accuracy(model, task1), **stats})
    return rows


def biography_rows(seed: int, scales: tuple[float, ...], cache_dir: str) -> list[dict]:
    """One row per scale (and seq's) on the biography default preset's first later task."""
    from benchmarks.biography import build_scenario
    from benchmarks.compare import BatchOrder

    import mitigate

    sc = build_scenario("default", cache_dir, seed)
    old, new = sc.tasks[0], sc.tasks[1]
    rows = []
    for scale in (None, *scales):
        model = sc.model_factory()
        opt = torch.optim.AdamW(model.parameters(), lr=sc.lr, weight_decay=0.0)
        ewc, stats = None, {}
        if scale is not None:
            ewc = mitigate.EWC(model, scale=scale)
            ewc.consolidate(old.train[:4])
            stats = fisher_stats(ewc, model, old.train[:4], new.train)
        order = BatchOrder(len(new.train), seed)
        model.train()
        for _ in range(sc.steps_per_task):
            loss = model(**new.train[order.next()]).loss
            if ewc is not None:
                loss = loss + ewc()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        rows.append({"testbed": f"biography default, task 1, tuning seed {seed}", "scale": scale,
                     "old": old.tune_evaluate(model)["accuracy"], "new": new.tune_evaluate(model)["accuracy"], **stats})
    return rows


def biography_sequence_rows(seed: int, balances: tuple[float, ...], cache_dir: str) -> list[dict]:
    """``EWC(model, balance=b)`` (the calibrated default's rule) through the biography default
    preset's *whole* sequence on a tuning seed, as the benchmark's ``ewc`` method does (consolidate
    on 4 batches of each finished task, ``ewc(batch)`` in every step), and seq's run (``balance``
    ``None``); Task 0 and every later task scored on the tuning people."""
    from benchmarks.biography import build_scenario
    from benchmarks.compare import BatchOrder

    import mitigate

    sc = build_scenario("default", cache_dir, seed)
    rows = []
    for balance in (None, *balances):
        model = sc.model_factory()
        opt = torch.optim.AdamW(model.parameters(), lr=sc.lr, weight_decay=0.0)
        ewc = None if balance is None else mitigate.EWC(model, balance=balance, progress=False)
        new_acc = []
        for t in range(1, len(sc.tasks)):
            if ewc is not None:
                ewc.consolidate(sc.tasks[t - 1].train[:4])
            order = BatchOrder(len(sc.tasks[t].train), seed + t)
            model.train()
            for _ in range(sc.steps_per_task):
                b = sc.tasks[t].train[order.next()]
                loss = model(**b).loss
                if ewc is not None:
                    loss = loss + ewc(b)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            model.eval()
            new_acc.append(sc.tasks[t].tune_evaluate(model)["accuracy"])
        rows.append({"testbed": f"biography default, whole sequence, tuning seed {seed}", "balance": balance,
                     "old": sc.tasks[0].tune_evaluate(model)["accuracy"], "new": sum(new_acc) / len(new_acc),
                     "new_per_task": new_acc, "task_lambdas": [] if ewc is None else ewc.task_lambdas})
    return rows


def sequence_table(rows: list[dict]) -> str:
    """Markdown: per balance, Task 0 at the end and the mean new-task accuracy per seed, and the
    new task against seq's (means over seeds)."""
    seeds = list(dict.fromkeys(r["testbed"] for r in rows))
    out = ["| balance | Task 0 at the end (per seed) | mean new-task accuracy (per seed) | new task / seq's |",
           "|---|---|---|---:|"]
    base = sum(r["new"] for r in rows if r["balance"] is None) / len(seeds)
    for b in dict.fromkeys(r["balance"] for r in rows):
        rs = [r for r in rows if r["balance"] == b]
        new = sum(r["new"] for r in rs) / len(rs)
        out.append(f"| {'seq (no EWC)' if b is None else f'{b:g}'} | "
                   + " / ".join(f"{100 * r['old']:.1f}" for r in rs) + " % | "
                   + " / ".join(f"{100 * r['new']:.1f}" for r in rs) + f" % | {new / base:.2f} |")
    return "\n".join(out)


def best_scale(rows: list[dict]) -> float | None:
    """The scale keeping the most of the old task among those whose new task is ≥ 90 % of the
    unregularised run's (issue 13's plasticity floor); ``None`` if none is."""
    base = next(r for r in rows if r["scale"] is None)
    ok = [r for r in rows if r["scale"] is not None and r["new"] >= 0.9 * base["new"]]
    return max(ok, key=lambda r: (r["old"], -r["scale"]))["scale"] if ok else None


def table(rows: list[dict]) -> str:
    """Markdown: one line per testbed with the old/new accuracy at every scale and the statistics."""
    out = ["| testbed | no EWC (old / new) | " + " | ".join(f"scale {s:g}" for s in SCALES)
           + " | best scale | mean F | top-1 % share | old loss | new-grad RMS |",
           "|---|---|" + "---|" * len(SCALES) + "---:|---:|---:|---:|---:|"]
    for bed in dict.fromkeys(r["testbed"] for r in rows):
        rs = [r for r in rows if r["testbed"] == bed]
        base = next(r for r in rs if r["scale"] is None)
        cells = {r["scale"]: f"{100 * r['old']:.0f} / {100 * r['new']:.0f}" for r in rs}
        st = rs[-1]
        best = best_scale(rs)
        out.append(f"| {bed} | {100 * base['old']:.0f} / {100 * base['new']:.0f} | "
                   + " | ".join(cells.get(s, "—") for s in SCALES)
                   + f" | {'none' if best is None else f'{best:g}'} | {st['fisher_mean']:.2e} | "
                   f"{st['top1pct_share']:.2f} | {st['old_loss']:.3f} | {st['new_grad_rms']:.2e} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="llama-w32-d2,gpt2-w48-d3,llama-w64-d4")
    p.add_argument("--seed", type=int, default=0, help="fact-recall seed")
    p.add_argument("--biography-seed", type=int, default=1000, help="a tuning seed (not a test seed)")
    p.add_argument("--no-biography", action="store_true")
    p.add_argument("--sequence-balances", default=None,
                   help="instead of the scale sweep: EWC(model, balance=b) through biography's whole sequence on "
                        "--sequence-seeds, e.g. 1e-3,3e-3,1e-2 (how the default's balance was checked)")
    p.add_argument("--sequence-seeds", default="1000,1001", help="tuning seeds for --sequence-balances")
    a, t0 = start_side_study(p, argv)
    rows: list[dict] = []
    if a.sequence_balances:
        balances = tuple(float(x) for x in a.sequence_balances.split(","))
        for seed in (int(x) for x in a.sequence_seeds.split(",")):
            rows += biography_sequence_rows(seed, balances, a.cache_dir)
        finish_side_study(rows, sequence_table(rows), t0, a.out)
        return rows
    for shape in a.shapes.split(","):
        for lora in (False, True):
            rows += fact_recall_rows(shape, lora, a.seed, SCALES)
    if not a.no_biography:
        rows += biography_rows(a.biography_seed, SCALES, a.cache_dir)
    finish_side_study(rows, table(rows), t0, a.out)
    return rows


if __name__ == "__main__":
    main()
