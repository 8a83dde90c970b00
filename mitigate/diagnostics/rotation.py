"""Rotation of the leading principal components of a layer's representations.

The mechanistic analysis of forgetting (arXiv 2601.18699, §2.4) reports that fine-tuning rotates
the dominant principal components of intermediate layers by 35–52° while higher-order components
stay put. For the top-``k`` unit eigenvectors ``u_i`` (before) and ``w_i`` (after) of the feature
covariance:

    angle_i = arccos |⟨u_i, w_i⟩|              (matched directions, sign-invariant)
    θ_j     = arccos σ_j(Uₖᵀ Wₖ)               (principal angles between the k-dim subspaces)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mitigate._utils import Batch, preserve_state
from mitigate.diagnostics._common import Moments, Result, as_batch_list, hidden_states

__all__ = ["RotationResult", "layer_pc_rotation", "pc_rotation"]


@dataclass
class RotationResult(Result):
    """Principal-component rotation between two representations.

    Attributes:
        angles_deg: ``(k,)`` angle in degrees between the i-th principal component before and
            after, ``arccos |⟨u_i, w_i⟩|`` ∈ [0°, 90°].
        principal_angles_deg: ``(k,)`` principal angles between the two top-k subspaces,
            ascending, in degrees.
        explained_variance_before: ``(k,)`` fraction of total variance of each component before.
        explained_variance_after: ``(k,)`` same, after.
    Note that components with (nearly) equal eigenvalues are only defined up to a rotation within
    their eigenspace, so individual ``angles_deg`` are unstable there; principal angles are not.
    """

    angles_deg: Tensor
    principal_angles_deg: Tensor
    explained_variance_before: Tensor
    explained_variance_after: Tensor


def _top_k(cov: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k eigenvectors ``(d, k)`` and explained-variance fractions ``(k,)`` of a covariance."""
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    total = evals.clamp_min(0).sum()
    frac = evals[:k].clamp_min(0) / total if total > 0 else torch.zeros(k, dtype=cov.dtype, device=cov.device)
    return evecs[:, :k], frac


def rotation_from_covariances(cov_before: Tensor, cov_after: Tensor, k: int) -> RotationResult:
    """:class:`RotationResult` from two ``(d, d)`` (unnormalised) covariance matrices.

    Raises:
        ValueError: shapes differ or ``k`` not in ``[1, d]``.
    """
    if cov_before.shape != cov_after.shape or cov_before.dim() != 2:
        raise ValueError(
            f"covariances must be square and the same shape, got {tuple(cov_before.shape)} and {tuple(cov_after.shape)}"
        )
    d = cov_before.shape[0]
    if not 1 <= k <= d:
        raise ValueError(f"k={k!r} must be between 1 and the feature dimension {d}")
    u, fu = _top_k(cov_before.to(torch.float64), k)
    w, fw = _top_k(cov_after.to(torch.float64).to(u.device), k)
    matched = (u * w).sum(0).abs().clamp(0.0, 1.0)
    sigma = torch.linalg.svdvals(u.T @ w).clamp(0.0, 1.0)  # descending -> angles ascending
    return RotationResult(
        angles_deg=torch.rad2deg(torch.arccos(matched)).cpu(),
        principal_angles_deg=torch.rad2deg(torch.arccos(sigma)).cpu(),
        explained_variance_before=fu.cpu(),
        explained_variance_after=fw.cpu(),
    )


def pc_rotation(x_before: Tensor, x_after: Tensor, *, k: int = 5) -> RotationResult:
    """Rotation of the top-``k`` principal components between two sets of features.

    ``angle_i = arccos |⟨u_i, w_i⟩|`` for the i-th unit eigenvectors of the centred covariances
    of ``x_before`` and ``x_after``, and the principal angles ``arccos σ_j(UₖᵀWₖ)`` between the
    spanned subspaces (arXiv 2601.18699: leading components rotate 35–52° in intermediate layers).
    Computed in float64.

    Args:
        x_before: ``(n1, d)`` features before fine-tuning.
        x_after: ``(n2, d)`` features after (usually the same inputs, ``n1 == n2``).
        k: number of leading components.

    Returns:
        :class:`RotationResult` with ``(k,)`` tensors.

    Raises:
        ValueError: not 2-D, different ``d``, fewer than 2 rows, or ``k`` not in ``[1, d]``.
    """
    x_before, x_after = torch.as_tensor(x_before), torch.as_tensor(x_after)
    if x_before.dim() != 2 or x_after.dim() != 2 or x_before.shape[1] != x_after.shape[1]:
        raise ValueError(
            f"pc_rotation needs (n, d) features with the same d, got {tuple(x_before.shape)} and {tuple(x_after.shape)}"
        )
    if min(x_before.shape[0], x_after.shape[0]) < 2:
        raise ValueError("pc_rotation needs at least 2 rows on each side")
    covs = []
    for x in (x_before, x_after):
        x = x.detach().to(torch.float64)
        x = x - x.mean(0, keepdim=True)
        covs.append(x.T @ x)
    return rotation_from_covariances(covs[0], covs[1], k)


@torch.no_grad()
def layer_pc_rotation(
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[Batch] | Batch,
    layer: int,
    k: int = 5,
) -> RotationResult:
    """:func:`pc_rotation` of one hidden state of two models over a stream of batches.

    The centred covariances of the non-pad tokens are accumulated in float64 (memory ``O(d²)``,
    independent of the number of tokens). Models run in eval mode; modes and ``.grad`` restored.

    Args:
        model_a: the model before.
        model_b: the model after.
        batches: dict batches (``input_ids``, ``attention_mask``).
        layer: hidden-state index (0 = embeddings; negative counts from the end).
        k: number of leading components.

    Returns:
        :class:`RotationResult`.

    Raises:
        ValueError: ``layer`` out of range, or ``k`` not in ``[1, d]``.
    """
    acc = Moments(cross=False)
    with preserve_state(model_a, mode=False), preserve_state(model_b, mode=False):
        for batch in as_batch_list(batches):
            ha, mask = hidden_states(model_a, batch)
            hb, _ = hidden_states(model_b, batch)
            if not -len(ha) <= layer < len(ha) or len(hb) != len(ha):
                raise ValueError(f"layer={layer!r} out of range for {len(ha)} hidden states (and {len(hb)})")
            xa, xb = ha[layer], hb[layer]
            acc.update(xa[mask.to(xa.device)], xb[mask.to(xb.device)])
    xx, yy, _ = acc.centered()
    return rotation_from_covariances(xx, yy, k)
