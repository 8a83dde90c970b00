"""Outputs of a benchmark run: ``results.json``, CSVs, ``summary.md`` and plots.

``results.json`` schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "config":   {...BenchConfig..., "diag": {...}},
      "machine":  {"python", "platform", "torch", "transformers", "cpu_count", "device", ...},
      "scenario": {"name", "notes", "tasks": [...], "steps_per_task", "lr", "config", "lora"},
      "baseline": [{"seed", "acc_row", "first_token_row", "lambda_max_task0", "extra_evals",
                    "recovery_control"}],
      "methods": {
        "<name>": {
          "help", "hyperparameters", "status": "ok" | "skipped" | "failed", "message",
          "seeds": [{"seed", "acc_matrix": R (T+1, T+1), "first_token_matrix",
                     "task0_curve": [[step, acc], ...], "metrics": {METRIC_KEYS...},
                     "extra_evals", "step_times_ms", "raw": {...}}],
          "aggregate": {"<metric>": {"mean", "std", "n"}}
        }
      },
      "wall_time_s": float
    }

``R[i][j]`` is the accuracy on task ``j`` after training task ``i`` (row 0: the Task-0 model).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

from benchmarks.metrics import ALPHA, METRIC_KEYS

SUMMARY_COLUMNS = (
    ("task0_final", "Task-0 acc", "pct"),
    ("task0_retention", "retained", "pct"),
    ("task0_curve_min", "Task-0 min (Task 1)", "pct"),
    ("recovery_accuracy", "recovery (K=10)", "pct"),
    ("average_accuracy", "avg acc", "pct"),
    ("backward_transfer", "BWT", "pp"),
    ("forgetting", "forgetting", "pp"),
    ("mitigation_pct", "mitigation", "pct100"),
    ("new_task_accuracy", "new-task acc", "pct"),
    ("plasticity_gain", "new-task gain", "pp"),
    ("plasticity_vs_seq", "plasticity vs seq", "ratio"),
    ("task0_nll_final", "Task-0 NLL", "float"),
    ("lambda_max_ratio", "λ_max ratio", "ratio"),
    ("cka_drift_mid", "CKA drift (mid)", "float"),
    ("disrupted_heads_fraction", "disrupted heads", "pct"),
    ("disrupted_heads_null_lower_fraction", "disrupted heads vs null (lower half)", "pct"),
    ("time_per_step_vs_seq", "time/step vs seq", "ratio"),
    ("peak_memory_mb", "peak mem (MiB)", "float1"),
    ("extra_train_steps", "extra steps", "int"),
    ("old_examples_used", "old examples", "int"),
    ("stored_state_mb", "state (MiB)", "float2"),
    ("wall_s", "wall (s)", "float1"),
)


def fmt_value(value: float | None, kind: str) -> str:
    """One number as the benchmark's tables show it: ``kind`` is ``"pct"`` (a fraction, as %),
    ``"pct100"`` (already in percent), ``"pp"`` (a difference of fractions, in signed points),
    ``"ratio"``, ``"float1"``/``"int"`` (no decimals), ``"float2"`` or anything else (3 decimals);
    ``None`` or non-finite: ``"–"``."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "pct100":
        return f"{value:.0f}%"
    if kind == "pp":
        return f"{100 * value:+.1f}"
    if kind == "ratio":
        return f"{value:.2f}×"
    if kind == "float1":
        return f"{value:.0f}"
    if kind == "float2":
        return f"{value:.2f}"
    if kind == "int":
        return f"{value:.0f}"
    return f"{value:.3f}"


def _cell(agg: dict[str, Any], key: str, kind: str) -> str:
    entry = agg.get(key) or {}
    mean, std, n = entry.get("mean"), entry.get("std"), entry.get("n", 0)
    text = fmt_value(mean, kind)
    if n and n > 1 and std is not None and mean is not None:
        scale = 100 if kind in ("pct", "pp") else 1
        text += f" ± {scale * std:.1f}" if kind in ("pct", "pp", "pct100") else f" ± {std:.2f}"
    return text


def target_text(agg: dict[str, Any]) -> str:
    """How far a method is from the issue's target (≥90% retained, ≥95% of seq's new-task
    accuracy, ≤1.15× seq's time per step); ``meets`` when all three hold."""
    def mean(key: str) -> float | None:
        return (agg.get(key) or {}).get("mean")

    parts = []
    ret, pla, tim = mean("retention_gap"), mean("plasticity_gap"), mean("time_gap")
    if ret is None and pla is None and tim is None:
        return "–"
    if ret is not None and ret > 0:
        parts.append(f"retention −{100 * ret:.1f} pp")
    if pla is not None and pla > 0:
        parts.append(f"plasticity −{100 * pla:.1f} pp")
    if tim is not None and tim > 0:
        parts.append(f"time +{tim:.2f}×")
    missing = [n for n, v in (("retention", ret), ("plasticity", pla), ("time", tim)) if v is None]
    if missing:
        parts.append("n/a: " + ", ".join(missing))
    return "meets" if not parts else "; ".join(parts)


def summary_markdown(results: dict[str, Any]) -> str:
    """The summary table (one row per method, mean ± std over seeds) with a target column."""
    sc = results.get("scenario") or {}
    cfg = results.get("config", {})
    lines = [
        f"# {sc.get('name', cfg.get('scenario'))} — preset `{cfg.get('preset')}`, "
        f"{cfg.get('seeds')} seed(s)",
        "",
        f"{sc.get('notes', '')}. Device `{results.get('machine', {}).get('device')}`, "
        f"wall time {results.get('wall_time_s', float('nan')):.0f} s.",
        "",
        "Target: keep ≥ 90% of the Task-0 accuracy it had right after Task 0, reach ≥ 95% of "
        "seq's new-task accuracy, at ≤ 1.15× seq's time per step. The last column says how far "
        "each method is from it. Time per step is the median training step over the median "
        "plain-AdamW reference step taken interleaved with it (same load); on a shared machine "
        "it is still noisy.",
        "",
    ]
    base = results.get("baseline") or []
    if base:
        a0 = [b["acc_row"][0] for b in base]
        lines += [f"Task-0 accuracy right after Task 0: {100 * sum(a0) / len(a0):.1f}%.", ""]
        ctrl = [b["recovery_control"]["after"] for b in base if b.get("recovery_control")]
        if ctrl:
            lines += [
                f"Recovery probe applied to that model itself (control): {100 * sum(a0) / len(a0):.1f}% → "
                f"{100 * sum(ctrl) / len(ctrl):.1f}%: the probe itself moves Task-0 accuracy by the "
                "difference, so read each method's recovery against this, not against its own "
                "accuracy before the probe.", ""]
    header = ["method"] + [h for _, h, _ in SUMMARY_COLUMNS] + ["distance to target"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * len(header)) + "|")
    for name, entry in results["methods"].items():
        if entry["status"] != "ok":
            lines.append(f"| {name} | {entry['status']}: {entry.get('message') or ''} |"
                         + " |" * (len(header) - 2))
            continue
        agg = entry["aggregate"]
        cells = [_cell(agg, key, kind) for key, _, kind in SUMMARY_COLUMNS]
        lines.append("| " + " | ".join([name, *cells, target_text(agg)]) + " |")
    lines += comparisons_markdown(results.get("comparisons"))
    return "\n".join(lines) + "\n"


def _num(x: float | None, fmt: str = "{:+.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def comparisons_markdown(rows: list[dict[str, Any]] | None, alpha: float = ALPHA) -> list[str]:
    """The paired-comparison table (rows of ``compare.paired_comparisons``) as markdown lines."""
    if not rows:
        return []
    lines = [
        "",
        "## Paired differences (points; per seed, against `seq` and between the best two)",
        "",
        "Mean ± SE over seeds with a t 95 % interval; McNemar's exact p on Task 0's items within "
        f"each seed; Holm over the comparisons with `seq` (α = {alpha}). Only rows marked "
        "distinguishable are differences; one seed gives no interval and is never a claim.",
        "",
        "| method | against | metric | Δ mean ± SE | 95 % CI | seeds | McNemar p per seed | Holm p | verdict |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        se = "" if r["se"] is None else f" ± {r['se']:.1f}"
        ci = "–" if r["ci95"] is None else f"[{r['ci95'][0]:+.1f}, {r['ci95'][1]:+.1f}]"
        mc = ", ".join(f"{m['p_value']:.2g}" for m in r["mcnemar"]) or "–"
        lines.append(f"| {r['method']} | {r['baseline']} | {r['label']} | {r['diff']:+.1f}{se} | {ci} "
                     f"| {r['n_seeds']} | {mc} | {_num(r['p_holm'], '{:.2g}')} | {r['verdict']} |")
    return lines


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean(obj: Any) -> Any:
    """NaN/inf -> None (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def write_csvs(results: dict[str, Any], out_dir: Path) -> None:

    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", "status", *METRIC_KEYS])
        for name, entry in results["methods"].items():
            if entry["status"] != "ok":
                w.writerow([name, "", entry["status"], *[""] * len(METRIC_KEYS)])
            for s in entry["seeds"]:
                w.writerow([name, s["seed"], entry["status"],
                            *["" if s["metrics"][k] is None else s["metrics"][k]
                              for k in METRIC_KEYS]])
    with open(out_dir / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "status", "n_seeds",
                    *[f"{k}_{s}" for k in METRIC_KEYS for s in ("mean", "std")], "target"])
        for name, entry in results["methods"].items():
            agg = entry["aggregate"]
            vals = []
            for k in METRIC_KEYS:
                for s in ("mean", "std"):
                    v = (agg.get(k) or {}).get(s)
                    vals.append("" if v is None else v)
            w.writerow([name, entry["status"], len(entry["seeds"]), *vals,
                        target_text(agg) if entry["status"] == "ok" else ""])


def _mean_matrix(seeds: list[dict[str, Any]]) -> list[list[float]]:
    mats = [s["acc_matrix"] for s in seeds]
    n = len(mats[0])
    return [[sum(m[i][j] for m in mats) / len(mats) for j in range(n)] for i in range(n)]


def write_plots(results: dict[str, Any], out_dir: Path) -> list[str]:
    """``task0_curve.png``, ``acc_matrix.png``, ``retention_vs_cost.png`` (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = {n: e for n, e in results["methods"].items() if e["status"] == "ok" and e["seeds"]}
    written = []
    if not ok:
        return written

    # Task-0 accuracy along Task 1 (mean over seeds at common steps)
    colors = plt.get_cmap("tab20").colors
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for idx, (name, e) in enumerate(ok.items()):
        curves = [dict(s["task0_curve"]) for s in e["seeds"] if s["task0_curve"]]
        if not curves:
            continue
        steps = sorted(set.intersection(*[set(c) for c in curves]))
        ax.plot(steps, [100 * sum(c[x] for c in curves) / len(curves) for x in steps],
                marker=".", label=name, color=colors[(2 * idx) % 20 + (idx >= 10)],
                linestyle="--" if name == "seq" else "-")
    ax.set_xlabel("step of Task 1")
    ax.set_ylabel("Task-0 accuracy (%)")
    ax.set_title("Task-0 accuracy during the first steps of Task 1")
    ax.grid(alpha=0.3)
    # outside the axes: with a dozen methods an inside legend covers the curves
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(out_dir / "task0_curve.png", dpi=120)
    plt.close(fig)
    written.append("task0_curve.png")

    # accuracy-matrix heatmaps
    n = len(ok)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for idx, (ax, (name, e)) in enumerate(zip(axes.flat, ok.items())):
        mat = _mean_matrix(e["seeds"])
        im = ax.imshow([[100 * v for v in r] for r in mat], vmin=0, vmax=100, cmap="viridis")
        for i, r in enumerate(mat):
            for j, v in enumerate(r):
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if v < 0.5 else "black")
        ax.set_title(name, fontsize=9)
        if idx // cols == rows - 1 or idx + cols >= n:
            ax.set_xlabel("task evaluated")
        if idx % cols == 0:
            ax.set_ylabel("after task")
        ax.set_xticks(range(len(mat)))
        ax.set_yticks(range(len(mat)))
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.colorbar(im, ax=axes, shrink=0.6, label="accuracy (%)")
    fig.savefig(out_dir / "acc_matrix.png", dpi=120)
    plt.close(fig)
    written.append("acc_matrix.png")

    # retention against cost
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for idx, (name, e) in enumerate(ok.items()):
        agg = e["aggregate"]
        tx, ty = agg.get("time_per_step_vs_seq") or {}, agg.get("task0_retention") or {}
        x, y = tx.get("mean"), ty.get("mean")
        if x is None or y is None:
            continue
        # numbered markers with the names in a legend beside the axes (labels next to the
        # points overlapped where methods cost the same), ± one std over seeds as bars
        ax.errorbar([x], [100 * y], xerr=[tx.get("std") or 0.0], yerr=[100 * (ty.get("std") or 0.0)],
                    fmt="o", ms=7, capsize=2, color=colors[(2 * idx) % 20 + (idx >= 10)],
                    label=f"{idx + 1}  {name}")
        ax.annotate(str(idx + 1), (x, 100 * y), fontsize=6, ha="center", va="center", color="white")
    ax.axhline(100 * 0.90, color="gray", linestyle=":", linewidth=1)
    ax.axvline(1.15, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("time per step relative to seq")
    ax.set_ylabel("Task-0 accuracy retained (%)")
    ax.set_title("Retention against cost (target: top-left of the dotted lines)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(out_dir / "retention_vs_cost.png", dpi=120)
    plt.close(fig)
    written.append("retention_vs_cost.png")
    return written


def start_side_study(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, float]:
    """Begin a side study's script (``ewc_scales.py``, ``recovery_control.py``, ``agem_order.py``):
    add ``--cache-dir`` and ``--out`` to ``parser``, parse ``argv``, silence warnings and INFO logs,
    run on one intra-op thread. Returns the arguments and the start time
    (``time.perf_counter()``, for :func:`finish_side_study`)."""
    import logging
    import time
    import warnings

    import torch

    parser.add_argument("--cache-dir", default=".cache/mitigate-bench")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    return args, time.perf_counter()


def finish_side_study(rows: list[dict[str, Any]], table: str, started: float, out: str | None) -> None:
    """End a side study's script (``ewc_scales.py``, ``recovery_control.py``): print its markdown
    ``table`` and the wall seconds since ``started`` (``time.perf_counter()``), and write its
    ``rows`` as JSON to ``out`` (parents created) when given."""
    import time

    print(table)
    print(f"\n{time.perf_counter() - started:.0f} s")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(_clean(rows), indent=1, default=_json_default))


def write_outputs(results: dict[str, Any], out_dir: str | Path, plots: bool = True) -> Path:
    """Write ``results.json``, ``results.csv``, ``summary.csv``, ``summary.md`` and the plots."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "results.json", "w") as f:
        json.dump(_clean(results), f, indent=1, default=_json_default)
    write_csvs(results, out_dir)
    (out_dir / "summary.md").write_text(summary_markdown(results))
    if plots:
        write_plots(results, out_dir)
    return out_dir
