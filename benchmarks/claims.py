"""The seed papers' claims beside what a benchmark run measured, each with a 95 % interval.

Reads a ``results.json`` of ``benchmarks/compare.py`` and prints (or writes) the reproduction
table: for each claim, the paper's number, ours as the mean over seeds with a Student t 95 %
interval (paired against ``seq`` where the claim is a difference), and a verdict fixed by a rule
stated here, before looking at any run:

* a claimed **range** ``[lo, hi]`` is *consistent* when our interval overlaps it and *refuted*
  (above or below) when it lies entirely outside it;
* a claimed **value** is treated as the range ``value ± tolerance`` (the tolerance is in the
  table: "~75 %" is read as 70-80 %);
* with one seed there is no interval and the verdict is *no interval (1 seed)*.

Claims (``../shared/seeds/``):

=========================  ===============================================  ==================
claim                      ours                                             metric
=========================  ===============================================  ==================
15-23 % heads disrupted    seq's share of lower-half heads whose Q/K        ``disrupted_heads_
(lower layers)             change exceeds 2.5 σ of a null control run       null_lower_fraction``
CKA drop 0.32-0.47         seq's 1 − linear CKA of the middle layer         ``cka_drift_mid``
(intermediate layers)      (after-Task-0 vs final model)
λ_max falls ~75 %          seq's top Hessian eigenvalue of the Task-0 loss  ``lambda_max_ratio``
(after later tasks)        after every later task, over its value right
                           after Task 0 (claim: ratio 0.25 ± 0.05)
freeze bottom: Task 0      freeze-bottom − seq, final Task-0 accuracy,      ``task0_final``
11 % → 44 % (+33 points)   paired on seeds (claim: +33 ± 5 points)
curvature regularizer:     curvature's forgetting reduction over seq's      ``mitigation_pct``,
−34 % forgetting at +12 %  (claim 34 ± 5 %) and its time per step over      ``time_per_step_
cost                       seq's (claim 1.12 ± 0.05)                        vs_seq``
recovery with 10 examples  seq's Task-0 accuracy after the recovery probe   ``recovery_accuracy``
(spurious forgetting)      minus before it, paired on seeds, and the share
                           of the forgotten points it restores
=========================  ===============================================  ==================

The early-gradient-cosine ↔ forgetting correlation is measured by ``benchmarks/forecast.py``
(its own runs and interval), not from a compare run.

Run::

    python benchmarks/claims.py results/<run>/results.json [--out claims.md]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import fmt_value  # noqa: E402
from benchmarks.stats import PairedInterval, paired_interval  # noqa: E402


@dataclass(frozen=True)
class Claim:
    """One seed claim: ``lo``-``hi`` is the claimed range in the metric's units."""

    name: str
    paper: str
    lo: float
    hi: float
    unit: str  # a kind of benchmarks.report.fmt_value: "pct", "pp", "ratio", "pct100", "float"


def _per_seed(results: dict[str, Any], method: str, key: str) -> dict[int, float]:
    entry = results["methods"].get(method)
    if not entry or entry.get("status") != "ok":
        return {}
    return {r["seed"]: r["metrics"][key] for r in entry["seeds"] if r["metrics"].get(key) is not None}


def _verdict(iv: PairedInterval, claim: Claim) -> str:
    if iv.low is None:
        return "no interval (1 seed)"
    if iv.high < claim.lo:
        return "refuted (below)"
    if iv.low > claim.hi:
        return "refuted (above)"
    return "consistent"


def _row(claim: Claim, values: list[float], ours: str) -> dict[str, Any]:
    iv = paired_interval(values) if values else None
    if iv is None:
        return {"claim": claim.name, "paper": claim.paper, "ours": "not measured", "ci95": None,
                "n_seeds": 0, "verdict": "not measured"}
    ci = None if iv.low is None else [iv.low, iv.high]
    text = fmt_value(iv.mean, claim.unit)
    ci_text = "–" if ci is None else f"[{fmt_value(ci[0], claim.unit)}, {fmt_value(ci[1], claim.unit)}]"
    return {"claim": claim.name, "paper": claim.paper, "ours": f"{text} {ours}".strip(), "mean": iv.mean,
            "ci95": ci, "ci_text": ci_text, "n_seeds": iv.n, "verdict": _verdict(iv, claim),
            "claimed_range": [claim.lo, claim.hi]}


def claims_table(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per claim: ``{"claim", "paper", "ours", "mean", "ci95", "n_seeds", "verdict"}``."""
    rows = []
    seq = lambda key: _per_seed(results, "seq", key)  # noqa: E731
    rows.append(_row(Claim("disrupted heads (lower half, vs null)", "15–23 %", 0.15, 0.23, "pct"),
                     list(seq("disrupted_heads_null_lower_fraction").values()), "of seq's heads"))
    rows.append(_row(Claim("CKA drop, middle layer", "0.32–0.47", 0.32, 0.47, "float"),
                     list(seq("cka_drift_mid").values()), "(seq)"))
    n_later = len((results.get("scenario") or {}).get("tasks") or []) - 1
    rows.append(_row(Claim(f"λ_max of the Task-0 loss after {n_later} later task(s), / after Task 0",
                           "falls ~75 % (0.25×)", 0.20, 0.30, "ratio"),
                     list(seq("lambda_max_ratio").values()), "(seq)"))
    fb, sq = _per_seed(results, "freeze-bottom", "task0_final"), seq("task0_final")
    common = sorted(set(fb) & set(sq))
    levels = ""
    if common:
        levels = (f"({100 * sum(sq[s] for s in common) / len(common):.1f} % → "
                  f"{100 * sum(fb[s] for s in common) / len(common):.1f} %)")
    rows.append(_row(Claim("freeze bottom layers + embeddings − seq, final Task-0 accuracy",
                           "11 % → 44 % (+33 points)", 0.28, 0.38, "pp"),
                     [fb[s] - sq[s] for s in common], levels))
    rows.append(_row(Claim("curvature regularizer: forgetting reduction over seq", "−34 %", 34 - 5, 34 + 5, "pct100"),
                     list(_per_seed(results, "curvature", "mitigation_pct").values()), ""))
    rows.append(_row(Claim("curvature regularizer: time per step / seq's", "+12 % (1.12×)", 1.07, 1.17, "ratio"),
                     list(_per_seed(results, "curvature", "time_per_step_vs_seq").values()), ""))
    rec, fin, after0 = seq("recovery_accuracy"), seq("task0_final"), seq("task0_after_task0")
    common = sorted(set(rec) & set(fin) & set(after0))
    gains = [rec[s] - fin[s] for s in common]
    lost = [after0[s] - fin[s] for s in common]
    share = ""
    if common and sum(lost) > 0:
        share = f"(restores {100 * sum(gains) / sum(lost):.1f} % of the {100 * sum(lost) / len(lost):.1f} points lost)"
    rows.append(_row(Claim("recovery probe, 10 Task-0 examples: seq's gain", "substantial (spurious forgetting)",
                           0.10, 1.0, "pp"), gains, share))
    return rows


def claims_markdown(results: dict[str, Any]) -> str:
    """The table as markdown (verdict rule in the module docstring)."""
    seeds = sorted({b["seed"] for b in results.get("baseline", [])})
    lines = [f"Seeds {seeds}; mean over seeds with a t 95 % interval; verdict: our interval against "
             "the claimed range (benchmarks/claims.py).", "",
             "| claim | paper | ours | 95 % CI | seeds | verdict |", "|---|---|---|---|---|---|"]
    for r in claims_table(results):
        lines.append(f"| {r['claim']} | {r['paper']} | {r['ours']} | {r.get('ci_text', '–')} | "
                     f"{r['n_seeds']} | {r['verdict']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path, help="a results.json of benchmarks/compare.py")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    a = p.parse_args(argv)
    text = claims_markdown(json.loads(a.results.read_text()))
    if a.out:
        a.out.write_text(text)
    sys.stdout.write(text)
    return text


if __name__ == "__main__":
    main()
