"""Paired statistics for comparing continual-learning methods on the same seeds and items.

Two methods run on the same seeds (same data, same task-0 model) and are scored on the same
items, so their differences are *paired*:

* over seeds, a Student t interval on the per-seed differences ``d_s = m_s − b_s``:
  ``d̄ ± t_{1−α/2, n−1} · s_d / √n`` and the two-sided p-value of ``H0: E[d] = 0``;
* within one seed, McNemar's exact test on the items one method answers and the other does not
  (``n01`` / ``n10``): under ``H0`` the ``n01 + n10`` discordant items split as
  ``Binomial(n01 + n10, ½)``, two-sided ``p = min(1, 2·P[X ≤ min(n01, n10)])``
  (McNemar 1947; the exact form of Fay 2010);
* over several comparisons against one baseline, Holm's step-down correction
  (Holm 1979): with the ``m`` p-values sorted ``p_(1) ≤ … ≤ p_(m)``,
  ``p̃_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j))``.

A difference is *distinguishable* only when its t interval excludes zero **and** its
Holm-adjusted p-value is below ``α``; every table says "distinguishable" or "not
distinguishable" in words (a difference on one seed has no interval and is never a claim).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from scipy import stats as _st

__all__ = [
    "McNemar",
    "PairedInterval",
    "holm",
    "mcnemar",
    "paired_interval",
    "verdict",
]


@dataclass(frozen=True)
class PairedInterval:
    """t interval of the mean paired difference over ``n`` seeds.

    Attributes:
        mean: ``d̄``.
        se: ``s_d / √n`` (``None`` for one seed).
        low / high: the ``confidence`` interval (``None`` for one seed).
        p_value: two-sided p of ``H0: E[d] = 0`` (``None`` for one seed; 1.0 when every
            difference is 0; 0.0 when they are all equal and non-zero).
        n: number of seeds.
        confidence: the interval's level.
    """

    mean: float
    se: float | None
    low: float | None
    high: float | None
    p_value: float | None
    n: int
    confidence: float

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies strictly on one side of 0 (False for one seed)."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_interval(diffs: Sequence[float], confidence: float = 0.95) -> PairedInterval:
    """Student t interval of the mean of per-seed paired differences.

    Args:
        diffs: ``d_s = m_s − b_s`` for each seed ``s`` (finite numbers).
        confidence: level in (0, 1).

    Returns:
        :class:`PairedInterval`; for one seed only ``mean`` is set.

    Raises:
        ValueError: no differences, a non-finite one, or ``confidence`` outside (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} must be in (0, 1), e.g. 0.95")
    d = [float(x) for x in diffs]
    if not d:
        raise ValueError("diffs is empty: pass one paired difference per seed")
    if not all(math.isfinite(x) for x in d):
        raise ValueError(f"diffs={d!r} holds a non-finite value")
    n = len(d)
    mean = math.fsum(d) / n
    if n == 1:
        return PairedInterval(mean, None, None, None, None, 1, confidence)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    if se == 0.0:
        p = 1.0 if mean == 0.0 else 0.0
        return PairedInterval(mean, 0.0, mean, mean, p, n, confidence)
    tq = float(_st.t.ppf(0.5 + confidence / 2, n - 1))
    p = float(2 * _st.t.sf(abs(mean / se), n - 1))
    return PairedInterval(mean, se, mean - tq * se, mean + tq * se, p, n, confidence)


@dataclass(frozen=True)
class McNemar:
    """McNemar's exact test on one seed's paired items.

    Attributes:
        n01: items the baseline answers and the method does not.
        n10: items the method answers and the baseline does not.
        n: items in all.
        p_value: two-sided exact p (1.0 with no discordant item).
    """

    n01: int
    n10: int
    n: int
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mcnemar(method_correct: Sequence[bool | int], baseline_correct: Sequence[bool | int]) -> McNemar:
    """McNemar's exact (binomial) test of two methods scored on the same items.

    Args:
        method_correct / baseline_correct: per item, 1 (right) or 0 (wrong), in the same order.

    Returns:
        :class:`McNemar` with ``p = min(1, 2·BinomCDF(min(n01, n10); n01 + n10, ½))``.

    Raises:
        ValueError: different lengths, no items, or a value other than 0/1.
    """
    a, b = list(method_correct), list(baseline_correct)
    if len(a) != len(b):
        raise ValueError(f"method has {len(a)} items, baseline {len(b)}: score both on the same items")
    if not a:
        raise ValueError("no items: pass the per-item correctness of both methods")
    bad = [x for x in a + b if x not in (0, 1)]  # True/False compare equal to 1/0
    if bad:
        raise ValueError(f"per-item correctness must be 0/1 (or bool), got {bad[0]!r}")
    n10 = sum(1 for x, y in zip(a, b) if x and not y)
    n01 = sum(1 for x, y in zip(a, b) if y and not x)
    k = n01 + n10
    p = 1.0 if k == 0 else min(1.0, 2.0 * float(_st.binom.cdf(min(n01, n10), k, 0.5)))
    return McNemar(n01=n01, n10=n10, n=len(a), p_value=p)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjusted p-values, in the input order (``None`` entries stay ``None``
    and do not count towards ``m``).

    Raises:
        ValueError: a p-value outside [0, 1].
    """
    idx = [i for i, p in enumerate(p_values) if p is not None]
    for i in idx:
        p = p_values[i]
        if not (0.0 <= float(p) <= 1.0):  # type: ignore[arg-type]
            raise ValueError(f"p_values[{i}]={p!r} is not a probability in [0, 1]")
    m = len(idx)
    order = sorted(idx, key=lambda i: float(p_values[i]))  # type: ignore[arg-type]
    out: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))  # type: ignore[arg-type]
        out[i] = running
    return out


def verdict(interval: PairedInterval, p_adjusted: float | None, alpha: float = 0.05) -> str:
    """``"distinguishable"`` when the interval excludes 0 and the adjusted p is below ``alpha``,
    else ``"not distinguishable"`` (always so for one seed)."""
    if interval.excludes_zero and p_adjusted is not None and p_adjusted < alpha:
        return "distinguishable"
    return "not distinguishable"
