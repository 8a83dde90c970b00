"""benchmarks/stats.py against hand-computed cases: t interval, McNemar exact, Holm."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.stats import holm, mcnemar, paired_interval, verdict


def _t3_cdf(t: float) -> float:
    """Student t CDF with 3 degrees of freedom, closed form (independent of scipy)."""
    x = t / math.sqrt(3.0)
    return 0.5 + (x / (1 + x * x) + math.atan(x)) / math.pi


def test_paired_interval_by_hand():
    iv = paired_interval([1.0, 2.0, 3.0, 4.0])
    # mean 2.5; s = sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3) = sqrt(5/3); se = s / 2
    se = math.sqrt(5.0 / 3.0) / 2.0
    t975_3 = 3.182446305284263  # t table, 97.5 % quantile, 3 df
    assert iv.mean == 2.5 and iv.n == 4
    assert iv.se == pytest.approx(se, rel=1e-14)
    assert iv.low == pytest.approx(2.5 - t975_3 * se, rel=1e-12)
    assert iv.high == pytest.approx(2.5 + t975_3 * se, rel=1e-12)
    assert iv.p_value == pytest.approx(2 * (1 - _t3_cdf(2.5 / se)), rel=1e-10)
    assert iv.excludes_zero
    # the closed-form CDF puts the quantile where the table does
    assert _t3_cdf(t975_3) == pytest.approx(0.975, abs=1e-12)


def test_paired_interval_edges():
    one = paired_interval([3.0])
    assert one.mean == 3.0 and one.low is None and one.p_value is None and not one.excludes_zero
    assert verdict(one, 0.0) == "not distinguishable"
    zero = paired_interval([0.0, 0.0, 0.0])
    assert zero.p_value == 1.0 and not zero.excludes_zero
    const = paired_interval([2.0, 2.0])
    assert const.p_value == 0.0 and const.excludes_zero
    straddle = paired_interval([-1.0, 2.0, 0.5])
    assert straddle.low < 0 < straddle.high and verdict(straddle, 0.01) == "not distinguishable"
    for bad in ([], [float("nan")], [1.0, float("inf")]):
        with pytest.raises(ValueError, match="diffs"):
            paired_interval(bad)
    with pytest.raises(ValueError, match="confidence=1.5"):
        paired_interval([1.0, 2.0], confidence=1.5)


def test_mcnemar_by_hand():
    # 9 items only the method gets, 1 only the baseline: p = 2 · (C(10,0) + C(10,1)) / 2^10
    method = [1] * 9 + [0] + [1] * 5 + [0] * 5
    base = [0] * 9 + [1] + [1] * 5 + [0] * 5
    r = mcnemar(method, base)
    assert (r.n10, r.n01, r.n) == (9, 1, 20)
    assert r.p_value == pytest.approx(22 / 1024, rel=1e-12)
    # the SmolLM2 case: 7 of 12 against 12 of 12 — at best p = 2 / 2^5 = 0.0625
    r = mcnemar([1] * 7 + [0] * 5, [1] * 12)
    assert (r.n10, r.n01) == (0, 5) and r.p_value == pytest.approx(0.0625, rel=1e-12)
    assert mcnemar([True, False], [True, False]).p_value == 1.0  # no discordant item
    assert mcnemar([1, 0, 1], [0, 1, 1]).p_value == 1.0  # 1 vs 1: min(1, 2 · 3/4)


def test_mcnemar_rejects_bad_input():
    with pytest.raises(ValueError, match="3 items, baseline 2"):
        mcnemar([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="no items"):
        mcnemar([], [])
    with pytest.raises(ValueError, match="got 2"):
        mcnemar([2, 0], [1, 0])


def test_holm_by_hand():
    # sorted 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 → max so far 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02], rel=1e-12)
    assert holm([0.5, None, 0.2]) == [0.5, None, 0.4]
    assert holm([0.9, 0.8]) == [1.0, 1.0]  # capped at 1
    with pytest.raises(ValueError, match=r"p_values\[1\]=1.5"):
        holm([0.1, 1.5])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=1, max_size=12))
def test_holm_properties(ps):
    adj = holm(ps)
    m = len(ps)
    for p, a in zip(ps, adj):
        assert p - 1e-15 <= a <= 1.0
        assert a <= min(1.0, m * p) + 1e-15  # never worse than Bonferroni
    order = sorted(range(m), key=lambda i: ps[i])
    assert all(adj[order[i]] <= adj[order[i + 1]] + 1e-15 for i in range(m - 1))  # monotone
