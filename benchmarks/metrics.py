"""Metrics of a benchmark run: per seed (``compute_metrics``), over seeds (``aggregate``), and
paired between methods (``paired_comparisons``, with :mod:`benchmarks.stats`); ``recompute``
redoes them all from a saved ``results.json``. The definitions are in ``benchmarks/compare.py``'s
module docstring; nothing here trains or imports the runner.
"""

from __future__ import annotations

import math
import statistics
import warnings
from dataclasses import dataclass, field
from typing import Any

METRIC_KEYS = (
    "task0_after_task0", "task0_final", "task0_retention", "task0_curve_min",
    "task0_first_token_final", "average_accuracy", "backward_transfer", "forgetting",
    "mitigation_pct", "new_task_accuracy", "plasticity_vs_seq", "recovery_accuracy",
    "recovery_gain", "lambda_max_task0", "lambda_max_ratio", "cka_mid_layer", "cka_drift_mid",
    "disrupted_heads_fraction", "step_time_ms", "ref_step_time_ms", "time_per_step_vs_seq",
    "peak_memory_mb", "consolidation_s", "wall_s", "retention_gap", "plasticity_gap",
    "time_gap", "meets_target", "plasticity_gain", "task0_nll_final", "new_task_nll",
    "extra_train_steps", "old_examples_used", "stored_state_mb",
    "disrupted_heads_null_fraction", "disrupted_heads_null_lower_fraction",
)
"""Every key of every method's ``metrics`` (``None`` when unavailable)."""

TARGET = {"retention": 0.90, "plasticity": 0.95, "time": 1.15}


def _optional(what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or ``None`` with a warning when the library piece is missing or
    fails (a benchmark run must not die on a diagnostic)."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - any failure of a diagnostic is reported, not fatal
        warnings.warn(f"{what} unavailable: {type(err).__name__}: {err}", stacklevel=2)
        return None


def _diagnostics():
    import mitigate.diagnostics as D

    return D


@dataclass
class BaseDiagnostics:
    """Measurements of the after-Task-0 model shared by every method of a seed."""

    row0: list[float]
    row0_first: list[float]
    lambda_max: float | None
    extra: dict[str, float]
    nll0: list[float | None] = field(default_factory=list)




def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a (nested) dict / list / tuple (a ``state_dict()``, a memory)."""
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def _nan_to_none(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _ref_ratio(raw: dict[str, Any]) -> float | None:
    if raw.get("step_time_ms") and raw.get("ref_step_time_ms"):
        return raw["step_time_ms"] / raw["ref_step_time_ms"]
    return None


def compute_metrics(record: dict[str, Any], base: BaseDiagnostics, seq: dict[str, Any] | None
                    ) -> dict[str, Any]:
    """Per-seed metrics of one method (``seq``: the seq record of the same seed, if run)."""
    R = record["acc_matrix"]
    T = len(R) - 1
    raw = record["raw"]
    m: dict[str, Any] = {k: None for k in METRIC_KEYS}
    m["task0_after_task0"] = R[0][0]
    m["task0_final"] = R[T][0]
    m["task0_retention"] = R[T][0] / R[0][0] if R[0][0] > 0 else None
    curve = record["task0_curve"]
    m["task0_curve_min"] = min(a for _, a in curve) if curve else None
    m["task0_first_token_final"] = _nan_to_none(record["first_token_matrix"][T][0])
    D = _optional("mitigate.diagnostics", _diagnostics)
    fm = _optional("forgetting_metrics", D.forgetting_metrics, R) if D is not None else None
    if fm is not None:
        m["average_accuracy"] = _nan_to_none(fm.average_accuracy)
        m["backward_transfer"] = _nan_to_none(fm.backward_transfer)
        m["forgetting"] = _nan_to_none(fm.forgetting)
    m["new_task_accuracy"] = statistics.fmean(R[j][j] for j in range(1, T + 1))
    # gain above the untrained floor: what training task j added to it, R[j][j] − R[j−1][j]
    m["plasticity_gain"] = statistics.fmean(R[j][j] - R[j - 1][j] for j in range(1, T + 1))
    N = record.get("nll_matrix")
    if N and N[T][0] is not None:
        m["task0_nll_final"] = N[T][0]
        new_nll = [N[j][j] for j in range(1, T + 1) if N[j][j] is not None]
        m["new_task_nll"] = statistics.fmean(new_nll) if new_nll else None
    for key in ("extra_train_steps", "old_examples_used", "stored_state_mb",
                "disrupted_heads_null_fraction", "disrupted_heads_null_lower_fraction"):
        m[key] = raw.get(key)
    rec = raw["recovery"]
    if rec is not None:
        m["recovery_accuracy"] = rec["after"]
        m["recovery_gain"] = rec["recovered_gain"]
    lam = raw["lambda_max_task0"]
    m["lambda_max_task0"] = lam
    if lam is not None and base.lambda_max:
        m["lambda_max_ratio"] = lam / base.lambda_max
    cka = raw["cka_per_layer"]
    if cka:
        mid = len(cka) // 2  # hidden state after the middle block (index 0 = embeddings)
        m["cka_mid_layer"] = cka[mid]
        m["cka_drift_mid"] = 1.0 - cka[mid]
    m["disrupted_heads_fraction"] = raw["disrupted_heads_fraction"]
    m["step_time_ms"] = raw["step_time_ms"]
    m["ref_step_time_ms"] = raw["ref_step_time_ms"]
    m["peak_memory_mb"] = raw["peak_memory_mb"]
    m["consolidation_s"] = raw["consolidation_s"]
    m["wall_s"] = raw["wall_s"]
    # ratios to seq. r = step / interleaved reference step; dividing by seq's own r cancels what
    # the interleaving itself costs the reference (its model's caches are cold after the
    # method's step), so seq is exactly 1.
    ratio = _ref_ratio(raw)
    seq_ratio = _ref_ratio(seq["raw"]) if seq is not None else None
    if ratio is not None and seq_ratio:
        m["time_per_step_vs_seq"] = ratio / seq_ratio
    elif ratio is not None:
        m["time_per_step_vs_seq"] = ratio
    elif seq is not None and seq["raw"]["step_time_ms"] and m["step_time_ms"]:
        m["time_per_step_vs_seq"] = m["step_time_ms"] / seq["raw"]["step_time_ms"]
    if seq is not None:
        seq_R = seq["acc_matrix"]
        seq_new = statistics.fmean(seq_R[j][j] for j in range(1, T + 1))
        m["plasticity_vs_seq"] = m["new_task_accuracy"] / seq_new if seq_new > 0 else None
        seq_fm = _optional("forgetting_metrics", D.forgetting_metrics, seq_R) if D else None
        f_seq = None if seq_fm is None else _nan_to_none(seq_fm.forgetting)
        if f_seq and m["forgetting"] is not None and f_seq > 0:
            m["mitigation_pct"] = 100.0 * (f_seq - m["forgetting"]) / f_seq
    # distance to the target (positive = short of it)
    if m["task0_retention"] is not None:
        m["retention_gap"] = TARGET["retention"] - m["task0_retention"]
    if m["plasticity_vs_seq"] is not None:
        m["plasticity_gap"] = TARGET["plasticity"] - m["plasticity_vs_seq"]
    if m["time_per_step_vs_seq"] is not None:
        m["time_gap"] = m["time_per_step_vs_seq"] - TARGET["time"]
    gaps = [m["retention_gap"], m["plasticity_gap"], m["time_gap"]]
    if all(g is not None for g in gaps):
        m["meets_target"] = all(g <= 0 for g in gaps)
    return m


def aggregate(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Mean ± std (sample std; 0 for one seed) of every numeric metric over seeds."""
    out: dict[str, dict[str, float | None]] = {}
    for key in METRIC_KEYS:
        vals = [s["metrics"][key] for s in per_seed if s["metrics"].get(key) is not None]
        vals = [float(v) for v in vals if isinstance(v, (int, float))]
        if not vals:
            out[key] = {"mean": None, "std": None, "n": 0}
            continue
        out[key] = {"mean": statistics.fmean(vals),
                    "std": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}
    return out


COMPARED = (("task0_final", "Task-0 accuracy", 0), ("new_task_accuracy", "new-task accuracy", None))
ALPHA = 0.05


def paired_comparisons(results: dict[str, Any], baseline: str = "seq", alpha: float = ALPHA
                       ) -> list[dict[str, Any]]:
    """Every method against ``baseline`` (and the best two by mean Task-0 accuracy against each
    other), paired on seeds: per-seed differences in points, mean ± SE with a t 95 % interval,
    McNemar's exact test on Task 0's items within each seed, Holm over the comparisons with the
    baseline (per metric; t-test p-values, or the within-seed McNemar p with one seed), and a
    verdict in words.

    Returns:
        one row per comparison: ``{"method", "baseline", "metric", "diff" (mean, points),
        "ci95": [lo, hi] or None, "n_seeds", "p_holm", "distinguishable"}`` and, beside them,
        ``"label", "se", "diffs" (per seed), "seeds", "p", "mcnemar" (per seed), "verdict"``.
        Empty without the baseline.
    """
    from benchmarks import stats

    methods = results["methods"]
    ok = {n: {r["seed"]: r for r in e["seeds"]} for n, e in methods.items() if e["status"] == "ok"}
    if baseline not in ok:
        return []
    pairs = [(n, baseline) for n in ok if n != baseline]
    ranked = sorted((n for n in ok if n != baseline),
                    key=lambda n: -statistics.fmean(r["metrics"]["task0_final"] for r in ok[n].values()))
    if len(ranked) >= 2:
        pairs.append((ranked[0], ranked[1]))
    out: list[dict[str, Any]] = []
    for key, label, task in COMPARED:
        rows, intervals = [], []
        for name, against in pairs:
            seeds = [s for s in sorted(set(ok[name]) & set(ok[against]))
                     if ok[name][s]["metrics"].get(key) is not None
                     and ok[against][s]["metrics"].get(key) is not None]
            if not seeds:
                continue
            diffs = [100.0 * (ok[name][s]["metrics"][key] - ok[against][s]["metrics"][key]) for s in seeds]
            iv = stats.paired_interval(diffs)
            mc = []
            if task is not None:
                for s in seeds:
                    a = (ok[name][s].get("final_items") or [None] * (task + 1))[task]
                    b = (ok[against][s].get("final_items") or [None] * (task + 1))[task]
                    if a is not None and b is not None and len(a) == len(b):
                        mc.append({"seed": s, **stats.mcnemar(a, b).to_dict()})
            p = iv.p_value if iv.n >= 2 else (mc[0]["p_value"] if len(mc) == 1 else None)
            rows.append({"method": name, "baseline": against, "metric": key, "diff": iv.mean,
                         "ci95": None if iv.low is None else [iv.low, iv.high], "n_seeds": iv.n,
                         "label": label, "se": iv.se, "diffs": diffs, "seeds": seeds, "p": p,
                         "mcnemar": mc})
            intervals.append(iv)
        vs_base = [r for r in rows if r["baseline"] == baseline]
        for r, ph in zip(vs_base, stats.holm([r["p"] for r in vs_base])):
            r["p_holm"] = ph
        for r, iv in zip(rows, intervals):
            if r["baseline"] != baseline:
                r["p_holm"] = r["p"]  # one planned comparison (the best two): no correction
            r["verdict"] = stats.verdict(iv, r["p_holm"], alpha)
            r["distinguishable"] = r["verdict"] == "distinguishable"
        out += rows
    return out


def recompute(results: dict[str, Any]) -> dict[str, Any]:
    """Recompute every metric and aggregate of a loaded ``results.json`` from its raw records
    (after a change of metric definitions; no training)."""
    bases = {b["seed"]: BaseDiagnostics(b["acc_row"], b["first_token_row"],
                                        b["lambda_max_task0"], b.get("extra_evals") or {},
                                        b.get("nll_row") or [])
             for b in results["baseline"]}
    seqs = {s["seed"]: s for s in results["methods"].get("seq", {}).get("seeds", [])}
    for entry in results["methods"].values():
        for rec in entry["seeds"]:
            rec["metrics"] = compute_metrics(rec, bases[rec["seed"]], seqs.get(rec["seed"]))
        entry["aggregate"] = aggregate(entry["seeds"])
        if entry["status"] != "ok":
            entry["aggregate"] = {k: {"mean": None, "std": None, "n": 0} for k in METRIC_KEYS}
    results["comparisons"] = paired_comparisons(results)
    return results

