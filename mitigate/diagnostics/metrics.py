"""Continual-learning metrics from an accuracy matrix.

``R[i, j]`` = accuracy on task ``j`` after training task ``i`` (``T × T``, tasks in training order):

* average accuracy ``ACC = 1/T Σ_j R[T−1, j]``;
* backward transfer ``BWT = 1/(T−1) Σ_{j<T−1} (R[T−1, j] − R[j, j])`` (Lopez-Paz & Ranzato,
  2017, "Gradient Episodic Memory for Continual Learning");
* forgetting ``F = 1/(T−1) Σ_{j<T−1} f_j``, ``f_j = max_{l<T−1} R[l, j] − R[T−1, j]``
  (Chaudhry et al., 2018, "Riemannian Walk for Incremental Learning");
* forward transfer ``FWT = 1/(T−1) Σ_{j≥1} (R[j−1, j] − b_j)`` with ``b_j`` the accuracy of the
  initial model on task ``j`` (Lopez-Paz & Ranzato, 2017).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mitigate.diagnostics._common import Result

__all__ = ["ForgettingMetrics", "forgetting_metrics"]


@dataclass
class ForgettingMetrics(Result):
    """Continual-learning summary of an accuracy matrix (see the module docstring for formulas).

    Attributes:
        average_accuracy: ``ACC``.
        backward_transfer: ``BWT`` (negative = forgetting); NaN when ``T == 1``.
        forgetting: ``F`` (positive = forgetting); NaN when ``T == 1``.
        forward_transfer: ``FWT``, or ``None`` without a baseline (NaN when ``T == 1``).
        per_task_forgetting: ``(T−1,)`` float64 ``f_j`` for ``j < T−1``.
    """

    average_accuracy: float
    backward_transfer: float
    forgetting: float
    forward_transfer: float | None
    per_task_forgetting: Tensor


def forgetting_metrics(
    acc_matrix: Tensor | Sequence[Sequence[float]] | Any,
    baseline: Tensor | Sequence[float] | Any | None = None,
) -> ForgettingMetrics:
    """ACC, BWT (Lopez-Paz & Ranzato 2017), forgetting (Chaudhry et al. 2018) and FWT.

    Args:
        acc_matrix: ``(T, T)`` accuracies, ``R[i, j]`` = accuracy on task ``j`` after training
            task ``i`` (tensor, nested lists or a NumPy array). Entries on and below the diagonal
            must be finite. Entries above the diagonal (tasks not trained yet) may be NaN — they
            are only used by FWT (``R[j−1, j]``, which must then be finite) and, when given, by
            the ``max_{l<T−1}`` of the forgetting measure, which follows Chaudhry et al. in
            ranging over all earlier rows.
        baseline: ``(T,)`` accuracy ``b_j`` of the initial model on each task (``b_0`` unused),
            for forward transfer; ``None`` skips FWT.

    Returns:
        :class:`ForgettingMetrics`.

    Raises:
        ValueError: not square, empty, infinite entries, NaN on/below the diagonal (or at
            ``R[j−1, j]`` with a baseline), or a baseline of the wrong length/non-finite.
    """
    r = torch.as_tensor(acc_matrix, dtype=torch.float64).detach().cpu()
    if r.dim() != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ValueError(f"acc_matrix must be a non-empty square (T, T) matrix, got shape {tuple(r.shape)}")
    t = r.shape[0]
    if torch.isinf(r).any():
        raise ValueError(f"acc_matrix has infinite entries at {torch.nonzero(torch.isinf(r)).tolist()}")
    lower = torch.tril(torch.ones(t, t, dtype=torch.bool))
    bad = torch.isnan(r) & lower
    if bad.any():
        raise ValueError(
            f"acc_matrix has NaN on or below the diagonal at (row, col) {torch.nonzero(bad).tolist()}; "
            "only not-yet-trained tasks (above the diagonal) may be NaN"
        )
    last = r[t - 1]
    acc = float(last.mean())
    nan = float("nan")
    fwt: float | None = None
    if baseline is not None:
        b = torch.as_tensor(baseline, dtype=torch.float64).detach().cpu().reshape(-1)
        if b.numel() != t or not torch.isfinite(b).all():
            raise ValueError(f"baseline must hold {t} finite accuracies (one per task), got {b.tolist()}")
        if t == 1:
            fwt = nan
        else:
            zero_shot = torch.stack([r[j - 1, j] for j in range(1, t)])
            if torch.isnan(zero_shot).any():
                raise ValueError(
                    "forward transfer needs R[j-1, j] (accuracy on task j just before training it) for j >= 1; "
                    f"got {zero_shot.tolist()}"
                )
            fwt = float((zero_shot - b[1:]).mean())
    if t == 1:
        return ForgettingMetrics(acc, nan, nan, fwt, torch.zeros(0, dtype=torch.float64))
    diag = torch.diagonal(r)[: t - 1]
    bwt = float((last[: t - 1] - diag).mean())
    earlier = r[: t - 1, : t - 1]  # rows l < T-1, columns j < T-1
    best = torch.where(torch.isnan(earlier), torch.full_like(earlier, -math.inf), earlier).amax(0)
    per_task = best - last[: t - 1]
    return ForgettingMetrics(acc, bwt, float(per_task.mean()), fwt, per_task)
