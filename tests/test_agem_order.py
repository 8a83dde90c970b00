"""benchmarks/agem_order.py: the per-step decomposition of the probe loss's rise into its first-
order part and the rest, against a quadratic loss whose terms are known in closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks import agem_order as A


class Quadratic(nn.Module):
    """loss = ½ (w − c)ᵀ H (w − c) for a batch {"c": c}: gradient H (w − c), exact second order."""

    def __init__(self, h: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(h.shape[0], dtype=torch.float64))
        self.h = h

    def forward(self, c: torch.Tensor):  # noqa: D102
        d = self.w - c
        return type("Out", (), {"loss": 0.5 * d @ self.h @ d})()


def test_step_terms_split_a_quadratic_rise_into_gradient_and_curvature_parts():
    h = torch.tensor([[3.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    model = Quadratic(h)
    c = torch.tensor([0.5, -1.0], dtype=torch.float64)
    probe = [{"c": c}]
    delta = torch.tensor([0.2, 0.3], dtype=torch.float64)

    def step() -> None:
        with torch.no_grad():
            model.w.add_(delta)

    actual, first = A.step_terms(model, probe, step)
    grad = h @ (torch.zeros(2, dtype=torch.float64) - c)
    assert first == pytest.approx(float(grad @ delta), rel=1e-12)
    assert actual - first == pytest.approx(0.5 * float(delta @ h @ delta), rel=1e-12)  # the exact rest


def test_table_has_a_row_per_run():
    rows = [{"lr": 1e-3, "method": m, "rise": 1.0, "first_order": 0.1, "higher_order": 0.9, "task0": 0.1, "new": 0.8}
            for m in ("seq", "agem")]
    lines = A.table(rows).splitlines()
    assert len(lines) == 4 and lines[3].startswith("| 0.001 | agem | +1.000 | +0.100 | +0.900 | 10.0 % | 80.0 % |")
