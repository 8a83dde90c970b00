"""Gradient-norm clipping as an optimizer wrapper — the baseline the projections are compared to.

:class:`GradientClipping` applies ``torch.nn.utils.clip_grad_norm_`` semantics to every parameter
of the wrapped optimizer's groups inside ``step()``::

    ‖g‖ = (Σ_p ‖g_p‖ᵖ)^(1/p);   g ← g · min(1, max_norm / (‖g‖ + 1e-6))

(Pascanu et al. 2013, *On the difficulty of training recurrent neural networks*). Unlike the bare
call, a non-finite total norm (fp16 overflow) leaves the gradients untouched for the base
optimizer / GradScaler to handle, and is counted. Clipping and the counters need no host sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from mitigate.optim._base import OptimizerWrapper


@dataclass
class ClippingConfig:
    """Options of :class:`GradientClipping`.

    Attributes:
        max_norm: largest allowed total gradient norm (> 0).
        norm_type: the ``p`` of the p-norm (> 0, or ``inf``), as in ``clip_grad_norm_``.
    """

    max_norm: float
    norm_type: float = 2.0

    def __post_init__(self) -> None:
        if isinstance(self.max_norm, bool) or not isinstance(self.max_norm, (int, float)) or not (
            math.isfinite(self.max_norm) and self.max_norm > 0
        ):
            raise ValueError(f"max_norm={self.max_norm!r} must be a finite number > 0")
        if isinstance(self.norm_type, bool) or not isinstance(self.norm_type, (int, float)) or not (
            self.norm_type > 0
        ):
            raise ValueError(f"norm_type={self.norm_type!r} must be > 0 (or float('inf'))")
        self.max_norm = float(self.max_norm)
        self.norm_type = float(self.norm_type)


class GradientClipping(OptimizerWrapper):
    """Clip the total gradient norm of the optimizer's parameters before each base step.

    Example::

        opt = mitigate.GradientClipping(torch.optim.AdamW(model.parameters()), max_norm=1.0)

    Args:
        optimizer: the base optimizer (its groups' parameters are clipped together).
        max_norm: largest allowed total norm.
        norm_type: p of the p-norm (``float("inf")`` for the max norm).

    Raises:
        ValueError: ``max_norm`` or ``norm_type`` out of range (the message names the value).
    """

    def __init__(self, optimizer: Optimizer, max_norm: float, norm_type: float = 2.0) -> None:
        super().__init__(optimizer)
        self.config = ClippingConfig(max_norm=max_norm, norm_type=norm_type)
        self._steps = 0
        self._acc: dict[str, Tensor] = {}

    def transform_gradients(self) -> None:
        """Scale ``.grad`` in place so the total norm is at most ``max_norm`` (finite norms only)."""
        self._steps += 1
        params = self.params_with_grad()
        if not params:
            return
        grads = [p.grad for p in params]
        total = torch.nn.utils.get_total_norm(grads, self.config.norm_type, foreach=True)
        finite = torch.isfinite(total)
        # a non-finite norm scales by exactly 1 (untouched), like no clipping at all
        safe = torch.where(finite, total, torch.zeros_like(total))
        torch.nn.utils.clip_grads_with_norm_(params, self.config.max_norm, safe, foreach=True)
        clipped = finite & (total > self.config.max_norm)
        upd = {
            "clipped": clipped.float(),
            "nonfinite": (~finite).float(),
            "norm": safe.float(),
            "finite": finite.float(),
        }
        for k, v in upd.items():
            self._acc[k] = v if k not in self._acc else self._acc[k] + v

    def stats(self) -> dict[str, float | int]:
        """``steps``, ``clipped`` (count), ``clipped_fraction``, ``mean_norm`` (pre-clip, finite
        steps), ``nonfinite_skips``. One host sync here, none in ``step``."""
        vals = {k: float(v) for k, v in self._acc.items()}
        finite = vals.get("finite", 0.0)
        return {
            "steps": self._steps,
            "clipped": int(vals.get("clipped", 0.0)),
            "clipped_fraction": vals.get("clipped", 0.0) / self._steps if self._steps else 0.0,
            "mean_norm": vals.get("norm", 0.0) / finite if finite else 0.0,
            "nonfinite_skips": int(vals.get("nonfinite", 0.0)),
        }

    def wrapper_state_dict(self) -> dict[str, Any]:
        """Config and counters (tensors + plain Python)."""
        return {
            "max_norm": self.config.max_norm,
            "norm_type": self.config.norm_type,
            "steps": self._steps,
            "acc": {k: v.detach().cpu().clone() for k, v in self._acc.items()},
        }

    def validate_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        """Refuse a state that is not a :meth:`wrapper_state_dict` output; change nothing.

        Raises:
            ValueError: keys missing or counters not tensors.
        """
        missing = [k for k in ("steps", "acc") if k not in state]
        if missing or not isinstance(state["acc"], dict) or not all(
                isinstance(v, Tensor) for v in state["acc"].values()):
            raise ValueError(
                f"not a GradientClipping state (keys {sorted(state)}, missing {missing}); "
                "load a state dict saved by GradientClipping"
            )

    def load_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters (the clipping threshold stays the constructor's).

        Raises:
            ValueError: not a GradientClipping state (nothing is changed).
        """
        self.validate_wrapper_state_dict(state)
        self._steps = int(state["steps"])
        device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        self._acc = {k: v.to(device) for k, v in state["acc"].items()}
