"""Diagnostics of forgetting: measure the mechanisms before choosing a mitigation.

* gradient interference — :func:`gradient_alignment`, :class:`AlignmentTracker` (early-alignment
  forecaster of forgetting);
* representational drift — :func:`linear_cka`, :func:`layerwise_cka`, :func:`pc_rotation`,
  :func:`layer_pc_rotation`;
* attention disruption — :func:`attention_entropy`, :func:`disrupted_heads`;
* landscape flattening — :func:`lambda_max`, :func:`hessian_eigenvalues`;
* weight movement and MoE routing — :class:`WeightTrajectory`, :func:`router_drift`;
* outcomes — :func:`forgetting_metrics`, :func:`recovery_probe`;
* all at once — :func:`report` (and ``python -m mitigate.diagnose``).

Names are imported lazily, so ``import mitigate.diagnostics`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "AlignmentReport": "mitigate.diagnostics.alignment",
    "AlignmentSummary": "mitigate.diagnostics.alignment",
    "AlignmentTracker": "mitigate.diagnostics.alignment",
    "CKAResult": "mitigate.diagnostics.cka",
    "CurvatureReport": "mitigate.diagnostics.curvature",
    "DisruptedHeads": "mitigate.diagnostics.attention",
    "EigenResult": "mitigate.curvature",
    "ForgettingMetrics": "mitigate.diagnostics.metrics",
    "RecoveryResult": "mitigate.diagnostics.recovery",
    "RotationResult": "mitigate.diagnostics.rotation",
    "RouterDrift": "mitigate.diagnostics.router",
    "WeightTrajectory": "mitigate.diagnostics.trajectory",
    "attention_entropy": "mitigate.diagnostics.attention",
    "disrupted_heads": "mitigate.diagnostics.attention",
    "forgetting_metrics": "mitigate.diagnostics.metrics",
    "gradient_alignment": "mitigate.diagnostics.alignment",
    "head_weight_distance": "mitigate.diagnostics.attention",
    "hessian_eigenvalues": "mitigate.curvature",
    "lambda_max": "mitigate.diagnostics.curvature",
    "layer_pc_rotation": "mitigate.diagnostics.rotation",
    "layerwise_cka": "mitigate.diagnostics.cka",
    "linear_cka": "mitigate.diagnostics.cka",
    "pc_rotation": "mitigate.diagnostics.rotation",
    "recovery_probe": "mitigate.diagnostics.recovery",
    "report": "mitigate.diagnostics.report",
    "router_drift": "mitigate.diagnostics.router",
    "task_gradient": "mitigate.diagnostics.alignment",
}

__all__ = sorted(_EXPORTS)


# The function shadows its module's name: bind it now so ``mitigate.diagnostics.report`` is the
# function whether or not the submodule was imported first.
from mitigate.diagnostics.report import report  # noqa: E402


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mitigate.diagnostics' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from mitigate.curvature import EigenResult, hessian_eigenvalues
    from mitigate.diagnostics.alignment import (
        AlignmentReport,
        AlignmentSummary,
        AlignmentTracker,
        gradient_alignment,
        task_gradient,
    )
    from mitigate.diagnostics.attention import DisruptedHeads, attention_entropy, disrupted_heads, head_weight_distance
    from mitigate.diagnostics.cka import CKAResult, layerwise_cka, linear_cka
    from mitigate.diagnostics.curvature import CurvatureReport, lambda_max
    from mitigate.diagnostics.metrics import ForgettingMetrics, forgetting_metrics
    from mitigate.diagnostics.recovery import RecoveryResult, recovery_probe
    from mitigate.diagnostics.rotation import RotationResult, layer_pc_rotation, pc_rotation
    from mitigate.diagnostics.router import RouterDrift, router_drift
    from mitigate.diagnostics.trajectory import WeightTrajectory
