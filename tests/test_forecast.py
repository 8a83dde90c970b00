"""``benchmarks/forecast.py``: the early-alignment vs forgetting measurement, end to end on micro."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from benchmarks import forecast as F
from mitigate.planning import forecast_forgetting


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("forecast")
    torch.set_num_threads(1)
    out = root / "forecast.json"
    res = F.main(["--preset", "micro", "--seeds", "0,1", "--pairs-lrs", "0.3,1,3", "--early-steps", "3",
                  "--num-new-tasks", "1", "--n-boot", "200", "--out", str(out),
                  "--cache-dir", str(root / "cache")])
    return out, res, json.loads(out.read_text())


def test_json_has_one_row_per_task_seed_lr(micro):
    out, _, data = micro
    pairs = data["pairs"]
    assert sorted((p["task"], p["seed"], p["lr_factor"]) for p in pairs) == sorted(
        (1, s, k) for s in (0, 1) for k in (0.3, 1.0, 3.0))
    for p in pairs:
        assert p["early_steps"] == 3
        assert -1.0 <= p["early_cosine"] <= 1.0
        assert p["early_min_cosine"] <= p["early_cosine"]
        assert math.isclose(p["forgetting"], p["acc0_before"] - p["acc0_after"], abs_tol=1e-12)
        assert math.isclose(p["lr"], data["base_lr"] * p["lr_factor"])
    assert out.with_suffix(".png").stat().st_size > 0


def test_correlation_is_pearson_of_the_table_or_null(micro):
    _, _, data = micro
    x = np.array([p["early_cosine"] for p in data["pairs"]])
    y = np.array([p["forgetting"] for p in data["pairs"]])
    c = data["correlation"]["forgetting"]
    assert c["n"] == len(x)
    if np.ptp(y) == 0:
        assert c["pearson_r"] is None
    else:
        assert -1.0 <= c["pearson_r"] <= 1.0
        assert c["pearson_r"] == pytest.approx(float(np.corrcoef(x, y)[0, 1]))
        if c["pearson_ci"] is not None:
            assert -1.0 <= c["pearson_ci"][0] <= c["pearson_ci"][1] <= 1.0
    assert data["seed_r"] == -0.79
    # within-lr r: each lr factor's mean removed from both variables
    lr = np.array([p["lr_factor"] for p in data["pairs"]])
    xc, yc = x.copy(), y.copy()
    for k in np.unique(lr):
        xc[lr == k] -= x[lr == k].mean()
        yc[lr == k] -= y[lr == k].mean()
    if np.ptp(yc) == 0:
        assert c["pearson_r_within_lr"] is None
    else:
        assert c["pearson_r_within_lr"] == pytest.approx(float(np.corrcoef(xc, yc)[0, 1]))
    assert set(c["pearson_r_per_lr"]) == {"0.3", "1", "3"}


def test_prior_forecast_fields_match_the_library_and_scores_follow(micro):
    _, _, data = micro
    fs = data["forecast"]["forgetting"]
    err, cover = [], []
    for p in data["pairs"]:
        f = forecast_forgetting(p["early_cosine"])
        got = p["prior_forgetting"]
        assert got == {"expected": pytest.approx(f.expected_forgetting), "low": pytest.approx(f.low),
                       "high": pytest.approx(f.high)}
        err.append(abs(f.expected_forgetting - p["forgetting"]))
        cover.append(f.low <= p["forgetting"] <= f.high)
    assert fs["prior"]["mae"] == pytest.approx(np.mean(err))
    assert fs["prior"]["coverage"] == pytest.approx(np.mean(cover))
    # leave-one-out: 5 others each, so every pair gets a calibrated forecast
    assert fs["loo"]["n"] == len(data["pairs"])
    for p in data["pairs"]:
        lo = p["loo_forgetting"]
        assert lo["low"] <= lo["high"]


def test_leave_one_out_excludes_the_held_out_pair():
    rows = [{"early_cosine": c, "y": y} for c, y in [(0.0, 0.0), (0.1, 0.1), (0.2, 0.2), (0.3, 5.0)]]
    F.forecast_scores(rows, "y", 0.9, 50)
    # the outlier's forecast comes from the exact line y = cos through the other three
    assert rows[3]["loo_y"]["expected"] == pytest.approx(0.3)


def test_degenerate_inputs_give_null_correlation():
    assert F.pearson(np.array([0.1, 0.2, 0.3]), np.array([0.5, 0.5, 0.5])) is None
    assert F.pearson(np.array([0.1, 0.2]), np.array([0.0, 1.0])) is None
    assert F.spearman(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 1.0, 2.0, 3.0])) == pytest.approx(
        float(np.corrcoef([1, 2, 3, 4], [1.5, 1.5, 3, 4])[0, 1]))


def test_bad_settings_raise_naming_the_value():
    with pytest.raises(ValueError, match="lr_factors"):
        F.ForecastConfig(lr_factors=[0.0])
    with pytest.raises(ValueError, match="early_steps"):
        F.ForecastConfig(steps=5, early_steps=10)
