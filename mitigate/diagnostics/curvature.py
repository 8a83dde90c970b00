"""Sharpness of the loss around a task's solution: the top Hessian eigenvalue λ_max, and its ratio
to a reference (e.g. the model right after the task was learned).

The mechanistic analysis of forgetting (arXiv 2601.18699, §2.6) reports λ_max of an old task
falling from 147.3 to 34.2 (≈ −75%) after three later tasks — the landscape around the old
minimum flattens. The eigen-solver is :func:`mitigate.curvature.hessian_eigenvalues`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Union

from torch import Tensor, nn

from mitigate._utils import Batch, LossFn
from mitigate.diagnostics._common import Result

__all__ = ["CurvatureReport", "lambda_max"]


@dataclass
class CurvatureReport(Result):
    """Top Hessian eigenvalues of a task loss.

    Attributes:
        values: ``(k,)`` float64, descending (``values[0]`` is λ_max).
        ratio_to_reference: ``λ_max / λ_max,ref`` when a reference was given, else ``None``
            (seed: ≈ 0.25 after three later tasks).
        reference_values: the reference's eigenvalues when computed here, else ``None``.
        converged: whether the eigen-solver met its tolerance.
        iterations: Hessian-vector products taken.
        repeated: the eigen-solver detected a repeated eigenvalue at the top (its eigenvectors
            are not unique; see :func:`mitigate.curvature.hessian_eigenvalues`).
    """

    values: Tensor
    ratio_to_reference: float | None = None
    reference_values: Tensor | None = None
    converged: bool = True
    iterations: int = 0
    repeated: bool = False

    @property
    def lambda_max(self) -> float:
        """``values[0]``."""
        return float(self.values[0])

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python copy, with ``lambda_max``."""
        return {**super().to_dict(), "lambda_max": self.lambda_max}


Reference = Union[float, CurvatureReport, nn.Module, None]


def lambda_max(
    model: nn.Module,
    batches: Iterable[Batch] | Batch,
    loss_fn: LossFn | None = None,
    *,
    k: int = 1,
    reference: Reference = None,
    **engine_kwargs: Any,
) -> CurvatureReport:
    """Top-``k`` eigenvalues of the Hessian of a task loss (λ_max first) and the ratio of λ_max
    to a reference.

    ``H = Σ_b n_b ∇²L_b / Σ_b n_b`` at the current parameters, via
    :func:`mitigate.curvature.hessian_eigenvalues` (Lanczos; eval mode; needs eager attention).
    ``ratio_to_reference = λ_max / λ_max,ref``.

    Args:
        model: the model.
        batches: batches of the task whose landscape is probed (e.g. the old task).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``.
        k: number of eigenvalues.
        reference: ``None``; a float (λ_max,ref); a :class:`CurvatureReport`; or a model (its
            λ_max is computed on the same batches with the same settings).
        **engine_kwargs: passed to ``hessian_eigenvalues`` (``params``, ``max_iter``, ``tol``,
            ``seed``, ``generator``, ``method``, ``curvature="ggn"`` for the positive
            semi-definite Gauss-Newton matrix, ...).

    Returns:
        :class:`CurvatureReport`.

    Raises:
        AttentionKernelError: SDPA/flash attention (load with ``attn_implementation="eager"``).
        ValueError: bad arguments (see ``hessian_eigenvalues``).
    """
    from mitigate.curvature import hessian_eigenvalues

    batches = [batches] if isinstance(batches, dict) else list(batches)
    res = hessian_eigenvalues(model, batches, loss_fn, k=k, **engine_kwargs)
    ref_values = None
    if reference is None:
        ref = None
    elif isinstance(reference, CurvatureReport):
        ref = reference.lambda_max
    elif isinstance(reference, nn.Module):
        ref_res = hessian_eigenvalues(reference, batches, loss_fn, k=k, **engine_kwargs)
        ref_values = ref_res.values
        ref = float(ref_res.values[0])
    else:
        ref = float(reference)
    ratio = None if ref is None else (float(res.values[0]) / ref if ref != 0 else float("nan"))
    return CurvatureReport(
        values=res.values,
        ratio_to_reference=ratio,
        reference_values=ref_values,
        converged=bool(res.converged),
        iterations=int(res.iterations),
        repeated=bool(res.repeated),
    )
