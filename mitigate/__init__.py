"""mitigate: continual fine-tuning of transformer language models without catastrophic forgetting.

Three ways in:

* wrap your optimizer: :class:`GradientProjection` (A-GEM, OGD, PCGrad), :class:`GradientClipping`,
  :class:`LowRankCircuitProjection`;
* add a regularizer to your loss: :class:`EWC`, :class:`CurvatureRegularizer`;
* freeze before training: :func:`freeze_bottom_layers`, :func:`freeze_attention_qk`.

:mod:`mitigate.diagnostics` measures the mechanisms of forgetting; :func:`plan` turns a diagnosis
into a mitigation. Public names are imported lazily, so ``import mitigate`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "AppliedPlan": "mitigate.planning",
    "AttentionKernelError": "mitigate.errors",
    "Candidate": "mitigate.planning",
    "ClippingConfig": "mitigate.optim.clipping",
    "CurvatureConfig": "mitigate.regularizers.curvature",
    "CurvatureDrift": "mitigate.regularizers.curvature",
    "CurvatureRegularizer": "mitigate.regularizers.curvature",
    "Diagnosis": "mitigate.planning",
    "EWC": "mitigate.regularizers.ewc",
    "EWCConfig": "mitigate.regularizers.ewc",
    "Forecast": "mitigate.planning",
    "FreezeReport": "mitigate.freezing",
    "GradientClipping": "mitigate.optim.clipping",
    "GradientProjection": "mitigate.optim.projection",
    "LRCPConfig": "mitigate.optim.lrcp",
    "LRCPModuleStats": "mitigate.optim.lrcp",
    "LowRankCircuitProjection": "mitigate.optim.lrcp",
    "MitigationPlan": "mitigate.planning",
    "ModelMap": "mitigate.architectures",
    "OptimizerWrapper": "mitigate.optim._base",
    "PlanPolicy": "mitigate.planning",
    "ProjectionConfig": "mitigate.optim.projection",
    "StateMismatchError": "mitigate.errors",
    "TaskEndReport": "mitigate.reports",
    "UnsupportedArchitectureError": "mitigate.errors",
    "forecast_forgetting": "mitigate.planning",
    "freeze_attention_qk": "mitigate.freezing",
    "freeze_bottom_layers": "mitigate.freezing",
    "load_state": "mitigate.state_io",
    "model_map": "mitigate.architectures",
    "plan": "mitigate.planning",
    "save_state": "mitigate.state_io",
}
_SUBMODULES = ("diagnostics", "integrations")

__all__ = sorted([*_EXPORTS, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"mitigate.{name}")
    raise AttributeError(f"module 'mitigate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from mitigate.architectures import ModelMap, model_map
    from mitigate.errors import AttentionKernelError, StateMismatchError, UnsupportedArchitectureError
    from mitigate.freezing import FreezeReport, freeze_attention_qk, freeze_bottom_layers
    from mitigate.optim._base import OptimizerWrapper
    from mitigate.optim.clipping import ClippingConfig, GradientClipping
    from mitigate.optim.lrcp import LRCPConfig, LRCPModuleStats, LowRankCircuitProjection
    from mitigate.optim.projection import GradientProjection, ProjectionConfig
    from mitigate.planning import AppliedPlan, Candidate, Diagnosis, Forecast, MitigationPlan, PlanPolicy, forecast_forgetting, plan
    from mitigate.regularizers.curvature import CurvatureConfig, CurvatureDrift, CurvatureRegularizer
    from mitigate.regularizers.ewc import EWC, EWCConfig
    from mitigate.reports import TaskEndReport
    from mitigate.state_io import load_state, save_state
