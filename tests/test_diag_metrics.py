"""Continual-learning metrics on hand-made accuracy matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mitigate.diagnostics import forgetting_metrics

NAN = float("nan")


def test_three_task_matrix_by_hand():
    r = [[0.9, 0.1, 0.2], [0.6, 0.8, 0.3], [0.5, 0.7, 0.95]]
    m = forgetting_metrics(r, baseline=[0.0, 0.05, 0.1])
    assert m.average_accuracy == pytest.approx((0.5 + 0.7 + 0.95) / 3)
    assert m.backward_transfer == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    torch.testing.assert_close(m.per_task_forgetting, torch.tensor([0.4, 0.1], dtype=torch.float64))
    assert m.forgetting == pytest.approx(0.25)
    assert m.forward_transfer == pytest.approx(((0.1 - 0.05) + (0.3 - 0.1)) / 2)
    assert m.to_dict()["per_task_forgetting"] == pytest.approx([0.4, 0.1])


def test_forgetting_uses_the_best_earlier_accuracy_not_the_diagonal():
    # task 0 improves after task 1 (0.5 -> 0.8), then drops to 0.6: forgetting 0.2, BWT +0.1
    r = np.array([[0.5, NAN, NAN], [0.8, 0.9, NAN], [0.6, 0.9, 0.7]])
    m = forgetting_metrics(r)
    assert m.backward_transfer == pytest.approx(((0.6 - 0.5) + (0.9 - 0.9)) / 2)
    torch.testing.assert_close(m.per_task_forgetting, torch.tensor([0.2, 0.0], dtype=torch.float64))
    assert m.forward_transfer is None


def test_no_forgetting_and_single_task():
    m = forgetting_metrics(torch.ones(4, 4))
    assert m.backward_transfer == 0.0 and m.forgetting == 0.0 and m.average_accuracy == 1.0
    one = forgetting_metrics([[0.7]], baseline=[0.1])
    assert one.average_accuracy == pytest.approx(0.7)
    assert math.isnan(one.backward_transfer) and math.isnan(one.forgetting) and math.isnan(one.forward_transfer)
    assert one.per_task_forgetting.numel() == 0


def test_validation():
    with pytest.raises(ValueError, match="square"):
        forgetting_metrics([[0.1, 0.2]])
    with pytest.raises(ValueError, match="below the diagonal"):
        forgetting_metrics([[0.9, NAN], [NAN, 0.8]])
    with pytest.raises(ValueError, match="infinite"):
        forgetting_metrics([[0.9, math.inf], [0.5, 0.8]])
    with pytest.raises(ValueError, match=r"R\[j-1, j\]"):
        forgetting_metrics([[0.9, NAN], [0.5, 0.8]], baseline=[0.0, 0.0])
    with pytest.raises(ValueError, match="baseline"):
        forgetting_metrics([[0.9, 0.1], [0.5, 0.8]], baseline=[0.0])
