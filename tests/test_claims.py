"""benchmarks/claims.py: the seed claims against a run, on a results dict built by hand."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from benchmarks import claims as CL


def _results(seq: dict, **methods: dict) -> dict:
    def entry(per_seed: dict) -> dict:
        keys = sorted(per_seed)
        n = len(per_seed[keys[0]])
        return {"status": "ok", "seeds": [{"seed": s, "metrics": {k: per_seed[k][s] for k in keys}}
                                          for s in range(n)]}
    return {"baseline": [{"seed": s} for s in range(len(next(iter(seq.values()))))],
            "scenario": {"tasks": ["task0", "task1", "task2", "task3"]},
            "methods": {"seq": entry(seq), **{m: entry(v) for m, v in methods.items()}}}


def test_claims_use_t_intervals_and_the_stated_ranges():
    seq = {"disrupted_heads_null_lower_fraction": [0.40, 0.50, 0.45], "cka_drift_mid": [0.10, 0.20, 0.15],
           "lambda_max_ratio": [0.2, 0.3, 0.25], "task0_final": [0.10, 0.12, 0.08],
           "recovery_accuracy": [0.30, 0.32, 0.28], "task0_after_task0": [0.90, 0.92, 0.88]}
    fb = {"task0_final": [0.40, 0.46, 0.40]}
    curv = {"mitigation_pct": [30.0, 40.0, 35.0], "time_per_step_vs_seq": [2.0, 2.2, 2.1]}
    heads = next(r for r in CL.claims_table(_results(seq)) if r["claim"].startswith("disrupted"))
    tq = stats.t.ppf(0.975, 2)
    se = 0.05 / math.sqrt(3)  # sd of (0.40, 0.50, 0.45) is 0.05
    assert heads["mean"] == pytest.approx(0.45) and heads["ci95"] == pytest.approx([0.45 - tq * se, 0.45 + tq * se])
    assert heads["verdict"] == "refuted (above)" and heads["n_seeds"] == 3  # [0.33, 0.57] vs 15-23 %
    table = CL.claims_table(_results(seq, **{"freeze-bottom": fb, "curvature": curv}))
    verdict = {r["claim"].split(",")[0].split(":")[0]: r["verdict"] for r in table}
    assert verdict["CKA drop"] == "refuted (below)"  # [0.03, 0.27] < 0.32
    assert table[2]["verdict"] == "consistent" and "after 3 later task(s)" in table[2]["claim"]
    freeze = table[3]
    assert freeze["mean"] == pytest.approx(0.32)  # paired: (0.30, 0.34, 0.32)
    assert freeze["verdict"] == "consistent" and "10.0 % → 42.0 %" in freeze["ours"]
    assert table[4]["verdict"] == "consistent"  # mitigation 35 ± 12 overlaps 29-39
    assert table[5]["verdict"] == "refuted (above)"  # 2.1× vs 1.07-1.17
    rec = table[6]
    assert rec["mean"] == pytest.approx(0.20) and rec["verdict"] == "consistent"
    assert "restores 25.0 % of the 80.0 points lost" in rec["ours"]  # 0.60 of 2.40 lost in all


def test_missing_methods_and_one_seed_say_so():
    one = _results({"cka_drift_mid": [0.4]})
    table = CL.claims_table(one)
    cka = next(r for r in table if r["claim"].startswith("CKA"))
    assert cka["verdict"] == "no interval (1 seed)" and cka["ci95"] is None
    assert next(r for r in table if r["claim"].startswith("freeze"))["verdict"] == "not measured"
    text = CL.claims_markdown(one)
    assert "| CKA drop, middle layer | 0.32–0.47 | 0.400 (seq) | – | 1 | no interval (1 seed) |" in text
