"""Does early gradient alignment predict forgetting? The measurement behind the seed's claim.

The mechanistic analysis of forgetting (arXiv 2601.18699) reports that the mean cosine between
the new task's gradient and the old task's gradient over the first steps of fine-tuning predicts
the final forgetting of the old task with Pearson r = −0.79. ``mitigate.planning.forecast_forgetting``
ships a *prior* line derived from that claim. This script measures the relation on the embedded
``biography`` scenario and checks the forecast against it.

Protocol: start from the shared after-Task-0 model (``benchmarks.compare.task0_model``, trained
once and cached); for every new task ``t`` in 1..T, run seed ``s`` and learning rate
``lr · k`` (``k`` in ``--pairs-lrs``), fine-tune a fresh copy with plain AdamW (``seq``) for the
task's steps. During the first ``--early-steps`` steps an
:class:`~mitigate.diagnostics.AlignmentTracker` (reference: the Task-0 training batches) records
``cos(g_new, g_task0)`` after each ``backward()``; afterwards

    forgetting = acc_task0(before) − acc_task0(after)      (exact-match QA accuracy, held-out)
    relative   = forgetting / acc_task0(before)

Reported: every pair; Pearson r and Spearman ρ between early mean cosine and forgetting with a
pairs-bootstrap 90% CI, beside the seed's −0.79, and the same r at a fixed lr (each lr's mean
removed from both variables: lr moves both the early cosine and the forgetting, so the pooled r
can be an lr effect); the prior forecast ``forecast_forgetting(cos)``
vs the measurement (MAE, coverage of its 90% interval) in both units; and the leave-one-out
calibrated forecast (``calibration=`` the other pairs) MAE and coverage.

Commands::

    python benchmarks/forecast.py --preset quick --out results/forecast/forecast.json  # < 4 min, 2 CPU cores
    python benchmarks/forecast.py --preset micro --seeds 0,1 --out /tmp/f.json          # seconds (tests)
    python benchmarks/forecast.py --preset default --seeds 0,1,2 --num-new-tasks 2

``--num-new-tasks`` (default 3) overrides the preset's T; population 0 and the pretraining do not
depend on it (``biography.generate_data``), but the Task-0 cache key does, so the first run with a
new T trains Task 0 once (cached under ``--cache-dir``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
from torch import nn

from benchmarks import biography
from benchmarks.compare import BatchOrder, task0_model
from benchmarks.scenario import Scenario
from mitigate.diagnostics.alignment import AlignmentTracker
from mitigate.planning import forecast_forgetting

SEED_R = -0.79  # arXiv 2601.18699: early gradient alignment vs final forgetting


@dataclass
class ForecastConfig:
    """Settings of one measurement run.

    Attributes:
        preset: biography preset (``micro``/``quick``/``default``).
        lr_factors: multipliers of the scenario's lr; one run per factor (spreads forgetting).
        early_steps: steps over which the early mean cosine is recorded (the forecaster's input).
        seeds: run seeds (batch order and torch RNG); the scenario itself uses ``scenario_seed``.
        num_new_tasks: T, overriding the preset (``None`` keeps the preset's).
        steps: fine-tuning steps per pair (``None``: the scenario's ``steps_per_task``).
        cache_dir: scenario / Task-0 cache.
        out: JSON output path (a ``.png`` scatter is written beside it unless ``plots`` is off).
        scenario_seed: seed of the scenario (people, pretraining, Task 0).
        level: forecast interval level.
        n_boot: bootstrap resamples (correlation CI and calibrated forecasts).
        plots: write the scatter PNG.
    """

    preset: str = "quick"
    lr_factors: list[float] = field(default_factory=lambda: [0.3, 1.0, 3.0])
    early_steps: int = 20
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    num_new_tasks: int | None = 3
    steps: int | None = None
    cache_dir: str = ".cache/mitigate-bench"
    out: str = "results/forecast/forecast.json"
    scenario_seed: int = 0
    level: float = 0.9
    n_boot: int = 1000
    plots: bool = True

    def __post_init__(self) -> None:
        if self.preset not in biography.PRESETS:
            raise ValueError(f"preset={self.preset!r}; choose one of {sorted(biography.PRESETS)}")
        if not self.lr_factors or any(not (k > 0 and math.isfinite(k)) for k in self.lr_factors):
            raise ValueError(f"lr_factors={self.lr_factors!r} must be positive finite numbers, e.g. 0.3,1,3")
        if self.early_steps < 1:
            raise ValueError(f"early_steps={self.early_steps!r} must be >= 1")
        if not self.seeds:
            raise ValueError("seeds must name at least one seed, e.g. --seeds 0,1")
        if self.num_new_tasks is not None and self.num_new_tasks < 1:
            raise ValueError(f"num_new_tasks={self.num_new_tasks!r} must be >= 1")
        if self.steps is not None and self.steps < self.early_steps:
            raise ValueError(f"steps={self.steps!r} must be >= early_steps={self.early_steps}")
        if not 0.0 < self.level < 1.0:
            raise ValueError(f"level={self.level!r} must be in (0, 1)")


def parse_args(argv: list[str] | None) -> ForecastConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    floats = lambda s: [float(x) for x in s.split(",") if x]
    ints = lambda s: [int(x) for x in s.split(",") if x]
    p.add_argument("--preset", default="quick", choices=sorted(biography.PRESETS))
    p.add_argument("--pairs-lrs", type=floats, default=[0.3, 1.0, 3.0],
                   help="lr multipliers, comma-separated (default 0.3,1,3)")
    p.add_argument("--early-steps", type=int, default=20)
    p.add_argument("--seeds", type=ints, default=[0, 1, 2], help="run seeds, comma-separated")
    p.add_argument("--num-new-tasks", type=int, default=3,
                   help="T new tasks (overrides the preset; 0 keeps the preset's)")
    p.add_argument("--steps", type=int, default=None, help="steps per pair (default: the preset's)")
    p.add_argument("--cache-dir", default=".cache/mitigate-bench")
    p.add_argument("--out", default="results/forecast/forecast.json")
    p.add_argument("--scenario-seed", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=1000)
    p.add_argument("--no-plots", action="store_true")
    a = p.parse_args(argv)
    return ForecastConfig(preset=a.preset, lr_factors=a.pairs_lrs, early_steps=a.early_steps,
                          seeds=a.seeds, num_new_tasks=a.num_new_tasks or None, steps=a.steps,
                          cache_dir=a.cache_dir, out=a.out, scenario_seed=a.scenario_seed,
                          n_boot=a.n_boot, plots=not a.no_plots)


# ============================================================================ one pair


def run_pair(base: nn.Module, scenario: Scenario, t: int, seed: int, lr: float, steps: int,
             early_steps: int, acc0_before: float) -> dict[str, Any]:
    """Fine-tune a copy of ``base`` on task ``t`` with plain AdamW, tracking the early cosine.

    Returns:
        One row: task, seed, lr, early cosine summary, Task-0 accuracy before/after, forgetting
        (absolute and relative), the new task's final accuracy and the wall time.
    """
    t0 = time.perf_counter()
    tasks = scenario.tasks
    torch.manual_seed(seed)
    model = copy.deepcopy(base).train()
    tracker = AlignmentTracker(model, tasks[0].train, max_steps=early_steps)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=scenario.weight_decay)
    order = BatchOrder(len(tasks[t].train), seed * 1000 + t)  # as compare.run_method
    for _ in range(steps):
        loss = model(**tasks[t].train[order.next()]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not tracker.done:
            tracker.update()
        opt.step()
    opt.zero_grad(set_to_none=True)
    s = tracker.summary()
    acc0_after = float(tasks[0].evaluate(model)["accuracy"])
    forgetting = acc0_before - acc0_after
    return {
        "task": t, "seed": seed, "lr": lr,
        "early_cosine": s.mean_cosine, "early_min_cosine": s.min_cosine,
        "early_fraction_negative": s.fraction_negative, "early_steps": s.steps,
        "early_per_group": s.per_group_mean,
        "acc0_before": acc0_before, "acc0_after": acc0_after,
        "forgetting": forgetting,
        "relative_forgetting": forgetting / acc0_before if acc0_before > 0 else None,
        "new_task_acc": float(tasks[t].evaluate(model)["accuracy"]),
        "wall_s": time.perf_counter() - t0,
    }


# ============================================================================ statistics


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (for Spearman's ρ)."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    for v in np.unique(x):
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson r, or ``None`` when fewer than 3 points or either variable is constant."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    return pearson(_ranks(x), _ranks(y))


def bootstrap_ci(x: np.ndarray, y: np.ndarray, stat, level: float, n_boot: int, seed: int
                 ) -> list[float] | None:
    """Percentile pairs-bootstrap interval of ``stat(x, y)`` (degenerate resamples skipped)."""
    if stat(x, y) is None:
        return None
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        v = stat(x[i], y[i])
        if v is not None:
            vals.append(v)
    if len(vals) < n_boot // 2:
        return None
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return [float(lo), float(hi)]


def forecast_scores(rows: list[dict[str, Any]], key: str, level: float, n_boot: int
                    ) -> dict[str, Any]:
    """Prior and leave-one-out calibrated forecasts of ``row[key]`` from ``row["early_cosine"]``.

    Adds ``prior_<key>`` / ``loo_<key>`` ``{expected, low, high}`` to each row and returns
    ``{"prior": {mae, coverage, mean_width}, "loo": {...} | None}``.
    """
    usable = [r for r in rows if r[key] is not None and math.isfinite(r["early_cosine"])]
    out: dict[str, Any] = {"n": len(usable)}
    for kind in ("prior", "loo"):
        err, cover, width = [], [], []
        for i, r in enumerate(usable):
            if kind == "prior":
                f = forecast_forgetting(r["early_cosine"], level=level)
            else:
                calib = [(o["early_cosine"], o[key]) for j, o in enumerate(usable) if j != i]
                try:
                    f = forecast_forgetting(r["early_cosine"], calib, level=level, n_boot=n_boot, seed=i)
                except ValueError:  # < 3 others or constant cosines
                    r[f"{kind}_{key}"] = None
                    continue
            r[f"{kind}_{key}"] = {"expected": f.expected_forgetting, "low": f.low, "high": f.high}
            err.append(abs(f.expected_forgetting - r[key]))
            cover.append(f.low <= r[key] <= f.high)
            width.append(f.high - f.low)
            if kind == "prior" and i == 0:
                out["prior_basis"] = f.basis
        out[kind] = None if not err else {
            "mae": float(np.mean(err)), "coverage": float(np.mean(cover)),
            "mean_width": float(np.mean(width)), "n": len(err)}
    return out


def correlations(rows: list[dict[str, Any]], key: str, level: float, n_boot: int) -> dict[str, Any]:
    pts = [(r["early_cosine"], r[key]) for r in rows
           if r[key] is not None and math.isfinite(r["early_cosine"])]
    x = np.array([p[0] for p in pts], dtype=np.float64)
    y = np.array([p[1] for p in pts], dtype=np.float64)
    fit = None
    if len(x) >= 2 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        fit = {"intercept": float(intercept), "slope": float(slope)}
    # lr moves both the early cosine and the forgetting: remove each lr's mean from both and
    # correlate the rest (the relation at a fixed lr), and report r inside each lr
    lr = np.array([r["lr_factor"] for r in rows
                   if r[key] is not None and math.isfinite(r["early_cosine"])], dtype=np.float64)
    xc, yc = x.copy(), y.copy()
    per_lr = {}
    for k in np.unique(lr):
        m = lr == k
        xc[m] -= x[m].mean()
        yc[m] -= y[m].mean()
        per_lr[f"{k:g}"] = pearson(x[m], y[m])
    return {
        "n": len(pts),
        "pearson_r_within_lr": pearson(xc, yc),
        "pearson_ci_within_lr": bootstrap_ci(xc, yc, pearson, level, n_boot, 2),
        "pearson_r_per_lr": per_lr,
        "pearson_r": pearson(x, y), "pearson_ci": bootstrap_ci(x, y, pearson, level, n_boot, 0),
        "spearman_rho": spearman(x, y), "spearman_ci": bootstrap_ci(x, y, spearman, level, n_boot, 1),
        "least_squares": fit,
    }


# ============================================================================ report


def _f(v: Any, fmt: str = "{:+.3f}") -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def _ci(ci: list[float] | None) -> str:
    return "—" if ci is None else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _fc(fc: dict | None) -> str:
    return "—" if fc is None else f"{fc['expected']:.3f} [{fc['low']:.3f}, {fc['high']:.3f}]"


def markdown(res: dict[str, Any]) -> str:
    c = res["config"]
    lines = [
        f"## Early gradient alignment vs forgetting — biography `{c['preset']}`",
        "",
        (f"{len(res['pairs'])} runs of plain AdamW from the shared after-Task-0 model "
         f"(Task-0 accuracy {res['acc0_before']:.3f}): tasks 1..{res['num_new_tasks']} × seeds "
         f"{c['seeds']} × lr {res['base_lr']:g} × {c['lr_factors']}, {res['steps']} steps each; "
         f"early cosine = mean cos(g_new, g_task0) over the first {res['early_steps_used']} steps. "
         "Forgetting = Task-0 accuracy before − after (exact match, held-out people)."),
        "",
        ("| task | seed | lr | early cos | min cos | Task-0 after | forgetting | new-task acc "
         "| prior forecast [90%] | LOO forecast [90%] |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in res["pairs"]:
        lines.append(
            f"| {r['task']} | {r['seed']} | {r['lr']:.2g} | {_f(r['early_cosine'])} | "
            f"{_f(r['early_min_cosine'])} | {r['acc0_after']:.3f} | {r['forgetting']:+.3f} | "
            f"{r['new_task_acc']:.3f} | {_fc(r.get('prior_forgetting'))} | {_fc(r.get('loo_forgetting'))} |")
    lines += ["", "| target | n | Pearson r [90% CI] | Spearman ρ [90% CI] | seed's r | LS fit |",
              "|---|---:|---|---|---:|---|"]
    for key, name in (("forgetting", "absolute forgetting"), ("relative_forgetting", "relative forgetting")):
        s = res["correlation"][key]
        fit = s["least_squares"]
        fit_s = "—" if fit is None else f"{fit['intercept']:+.3f} {fit['slope']:+.3f}·cos"
        lines.append(f"| {name} | {s['n']} | {_f(s['pearson_r'], '{:+.2f}')} {_ci(s['pearson_ci'])} | "
                     f"{_f(s['spearman_rho'], '{:+.2f}')} {_ci(s['spearman_ci'])} | {SEED_R:+.2f} | {fit_s} |")
    s = res["correlation"]["forgetting"]
    per = ", ".join(f"×{k}: {_f(v, '{:+.2f}')}" for k, v in s["pearson_r_per_lr"].items())
    lines += ["", (f"At a fixed lr (each lr's mean removed from cosine and forgetting): Pearson r = "
                   f"{_f(s['pearson_r_within_lr'], '{:+.2f}')} {_ci(s['pearson_ci_within_lr'])}; "
                   f"inside each lr: {per}.")]
    lines += ["", "| forecast | target | n | MAE | coverage of 90% interval | mean width |",
              "|---|---|---:|---:|---:|---:|"]
    for key, name in (("forgetting", "absolute"), ("relative_forgetting", "relative")):
        fs = res["forecast"][key]
        for kind, label in (("prior", "prior (no calibration)"), ("loo", "leave-one-out calibrated")):
            m = fs.get(kind)
            if m is None:
                lines.append(f"| {label} | {name} | 0 | — | — | — |")
            else:
                lines.append(f"| {label} | {name} | {m['n']} | {m['mae']:.3f} | {m['coverage']:.0%} | "
                             f"{m['mean_width']:.3f} |")
    lines += ["", f"prior basis: {res['forecast']['forgetting'].get('prior_basis', '—')}",
              f"wall time {res['wall_time_s']:.1f}s (Task-0 model {res['task0_s']:.1f}s)"]
    return "\n".join(lines)


def scatter(res: dict[str, Any], path: Path) -> None:
    """``early cosine`` vs forgetting, coloured by lr, with the prior and the fitted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["pairs"] if math.isfinite(r["early_cosine"])]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    lrs = sorted({r["lr"] for r in rows})
    markers = "osD^v<>"
    for li, lr in enumerate(lrs):
        for t in sorted({r["task"] for r in rows}):
            pts = [r for r in rows if r["lr"] == lr and r["task"] == t]
            ax.scatter([r["early_cosine"] for r in pts], [r["forgetting"] for r in pts],
                       color=f"C{li}", marker=markers[(t - 1) % len(markers)],
                       label=f"lr {lr:.2g}, task {t}")
    if rows:
        xs = np.linspace(min(r["early_cosine"] for r in rows) - 0.05,
                         max(r["early_cosine"] for r in rows) + 0.05, 50)
        prior = [forecast_forgetting(float(x)).expected_forgetting for x in xs]
        ax.plot(xs, prior, "k--", lw=1, label="forecast_forgetting prior")
        fit = res["correlation"]["forgetting"]["least_squares"]
        if fit is not None:
            ax.plot(xs, fit["intercept"] + fit["slope"] * xs, "k-", lw=1, label="least squares")
    r = res["correlation"]["forgetting"]["pearson_r"]
    ax.set_title(f"biography {res['config']['preset']}: r = {_f(r, '{:+.2f}')} (seed: {SEED_R:+.2f})")
    ax.set_xlabel(f"mean cos(g_new, g_task0), first {res['early_steps_used']} steps")
    ax.set_ylabel("Task-0 forgetting (acc before − after)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ============================================================================ main


def run(cfg: ForecastConfig) -> dict[str, Any]:
    t_start = time.perf_counter()
    overrides = {} if cfg.num_new_tasks is None else {"num_new_tasks": cfg.num_new_tasks}
    scenario = biography.build_scenario(cfg.preset, cfg.cache_dir, cfg.scenario_seed, **overrides)
    if scenario.cpu_threads:
        torch.set_num_threads(scenario.cpu_threads)
    device = torch.device("cpu")
    t0 = time.perf_counter()
    base = task0_model(scenario, cfg.cache_dir, cfg.scenario_seed, device)
    task0_s = time.perf_counter() - t0
    acc0_before = float(scenario.tasks[0].evaluate(base)["accuracy"])
    steps = cfg.steps or scenario.steps_per_task
    T = len(scenario.tasks) - 1
    pairs = []
    for t in range(1, T + 1):
        for seed in cfg.seeds:
            for k in cfg.lr_factors:
                row = run_pair(base, scenario, t, seed, scenario.lr * k, steps, cfg.early_steps,
                               acc0_before)
                row["lr_factor"] = k
                pairs.append(row)
                print(f"task {t} seed {seed} lr {row['lr']:.2g}: early cos {row['early_cosine']:+.3f}  "
                      f"forgetting {row['forgetting']:+.3f}  ({row['wall_s']:.1f}s)",
                      file=sys.stderr, flush=True)
    res: dict[str, Any] = {
        "config": asdict(cfg), "scenario": scenario.config, "base_lr": scenario.lr,
        "num_new_tasks": T, "steps": steps, "early_steps_used": min(cfg.early_steps, steps),
        "acc0_before": acc0_before, "task0_s": task0_s,
        "seed_r": SEED_R, "pairs": pairs,
        "correlation": {k: correlations(pairs, k, cfg.level, cfg.n_boot)
                        for k in ("forgetting", "relative_forgetting")},
        "forecast": {k: forecast_scores(pairs, k, cfg.level, cfg.n_boot)
                     for k in ("forgetting", "relative_forgetting")},
    }
    res["wall_time_s"] = time.perf_counter() - t_start
    return res


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv``, measure, print the markdown report, write the JSON (and PNG); returns the
    results dict (with ``"output"``)."""
    cfg = parse_args(argv)
    random.seed(cfg.scenario_seed)
    res = run(cfg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if cfg.plots:
        scatter(res, out.with_suffix(".png"))
        res["plot"] = str(out.with_suffix(".png"))
    res = _clean(res)
    out.write_text(json.dumps(res, indent=1))
    res["output"] = str(out)
    print(markdown(res), flush=True)
    return res


if __name__ == "__main__":
    main()
