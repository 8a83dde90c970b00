"""benchmarks/ewc_scales.py: the chosen scale follows the stated rule; the table shows every scale."""

from __future__ import annotations

from benchmarks import ewc_scales as E


def _rows(news: dict, olds: dict) -> list[dict]:
    stats = {"fisher_mean": 1e-6, "top1pct_share": 0.5, "old_loss": 0.01, "new_grad_rms": 0.05}
    return [{"testbed": "t", "scale": s, "old": olds[s], "new": news[s], **({} if s is None else stats)} for s in news]


def test_best_scale_keeps_most_of_the_old_task_above_the_plasticity_floor():
    news = {None: 1.0, 0.01: 1.0, 1.0: 0.95, 100.0: 0.89}  # 100 learns < 90 % of the new task
    olds = {None: 0.05, 0.01: 0.06, 1.0: 0.40, 100.0: 0.90}
    assert E.best_scale(_rows(news, olds)) == 1.0
    assert E.best_scale(_rows({None: 1.0, 1.0: 0.5}, {None: 0.0, 1.0: 0.9})) is None
    table = E.table(_rows(news, olds))
    line = table.splitlines()[2]
    assert line.startswith("| t | 5 / 100 | 6 / 100 | — | 40 / 95 |") and "| 1 | 1.00e-06 |" in line


def test_sequence_table_has_seq_first_and_the_new_task_against_seqs():
    rows = [{"testbed": f"s{seed}", "balance": b, "old": old, "new": new}
            for seed, b, old, new in [(0, None, 0.10, 0.80), (0, 3e-3, 0.20, 0.72), (1, None, 0.05, 0.60), (1, 3e-3, 0.15, 0.54)]]
    lines = E.sequence_table(rows).splitlines()
    assert lines[2] == "| seq (no EWC) | 10.0 / 5.0 % | 80.0 / 60.0 % | 1.00 |"
    assert lines[3] == "| 0.003 | 20.0 / 15.0 % | 72.0 / 54.0 % | 0.90 |"
