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
