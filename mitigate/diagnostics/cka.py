"""Centered kernel alignment (CKA): how similar two sets of representations of the same inputs are.

Linear CKA (Kornblith et al., 2019, "Similarity of Neural Network Representations Revisited"), for
column-centred ``X (n, d1)`` and ``Y (n, d2)``:

    CKA(X, Y) = ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)
              = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)),  K = XXᵀ, L = YYᵀ.

It is invariant to orthogonal transforms and isotropic scaling of either side, and 1 for
identical representations. The mechanistic analysis of forgetting (arXiv 2601.18699) reports CKA
drops of 0.32–0.47 in intermediate layers after sequential fine-tuning (0.08–0.14 in upper ones).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mitigate._utils import Batch, preserve_state
from mitigate.diagnostics._common import Moments, Result, as_batch_list, hidden_states

__all__ = ["OUTLIER_FACTOR", "SATURATION_SHARE", "CKAResult", "layerwise_cka", "linear_cka", "outlier_share"]

#: A token is an outlier when its hidden-state norm is at least this many times the median
#: token norm of its batch (massive activations reach 10²–10³×).
OUTLIER_FACTOR = 10.0
#: Plain linear CKA of a layer *saturates* when outlier tokens carry at least this share of the
#: layer's total squared norm ``Σ‖h‖²``: ``XᵀX`` (and so CKA) is then mostly the outliers'.
SATURATION_SHARE = 0.5


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.dim() != 2 or y.dim() != 2:
        raise ValueError(
            f"linear_cka takes 2-D (n, d) features, got shapes {tuple(x.shape)} and {tuple(y.shape)}; "
            "flatten tokens first, e.g. h[mask] for hidden states (B, T, d)"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y need the same number of rows (examples), got {x.shape[0]} and {y.shape[0]}")


def _hsic_unbiased(k: Tensor, l: Tensor) -> Tensor:
    """Unbiased HSIC estimator (Song et al., 2012) on Gram matrices with zeroed diagonals:

    HSIC₁(K, L) = [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3)).
    """
    n = k.shape[0]
    k = k - torch.diag(torch.diagonal(k))
    l = l - torch.diag(torch.diagonal(l))
    trace = (k * l).sum()  # tr(K̃L̃) for symmetric L̃
    sums = k.sum() * l.sum() / ((n - 1) * (n - 2))
    cross = 2.0 / (n - 2) * (k.sum(0) @ l.sum(1))
    return (trace + sums - cross) / (n * (n - 3))


def linear_cka(x: Tensor, y: Tensor, *, unbiased: bool = False) -> Tensor:
    """Linear CKA between two representations of the same ``n`` examples.

    Biased (Kornblith et al., 2019), on column-centred features::

        CKA = ‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F)

    Unbiased (Nguyen et al., 2021, "Do Wide and Deep Networks Learn the Same Things?"): the same
    ratio with the unbiased HSIC₁ estimator of Song et al. (2012) on the Gram matrices
    ``K = XXᵀ``, ``L = YYᵀ`` (diagonals zeroed; see :func:`_hsic_unbiased`), which removes the
    upward bias of CKA when ``d`` is large relative to ``n``. Features are centred first.

    Computed in float64; the biased form uses whichever of the feature-space (d×d) and
    Gram (n×n) forms is cheaper.

    Args:
        x: ``(n, d1)`` features.
        y: ``(n, d2)`` features of the same examples.
        unbiased: use the unbiased estimator (needs ``n > 3``).

    Returns:
        0-dim float64 tensor in [0, 1] (the unbiased estimate can fall slightly below 0); NaN
        when one side has zero variance.

    Raises:
        ValueError: not 2-D, different ``n``, ``n < 2``, or ``unbiased`` with ``n <= 3``.
    """
    x, y = torch.as_tensor(x), torch.as_tensor(y)
    _check_pair(x, y)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"linear_cka needs at least 2 examples, got n={n}")
    if unbiased and n <= 3:
        raise ValueError(f"the unbiased CKA estimator needs n > 3 examples, got n={n}; use unbiased=False")
    x = x.detach().to(torch.float64)
    y = y.detach().to(torch.float64, copy=False).to(x.device)
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    if unbiased:
        k, l = x @ x.T, y @ y.T
        return _hsic_unbiased(k, l) / torch.sqrt(_hsic_unbiased(k, k) * _hsic_unbiased(l, l))
    d1, d2 = x.shape[1], y.shape[1]
    if n * (d1 * d2 + d1 * d1 + d2 * d2) <= n * n * (d1 + d2):
        return _cka_from_moments(x.T @ x, y.T @ y, x.T @ y)
    k, l = x @ x.T, y @ y.T
    return (k * l).sum() / (torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l))


def _cka_from_moments(xx: Tensor, yy: Tensor, xy: Tensor) -> Tensor:
    """Biased linear CKA from centred second moments ``XᵀX``, ``YᵀY``, ``XᵀY``."""
    return xy.square().sum() / (torch.linalg.matrix_norm(xx) * torch.linalg.matrix_norm(yy))


@dataclass
class CKAResult(Result):
    """Layer-wise CKA between two models.

    Attributes:
        per_layer: ``(len(layers),)`` float64 CKA per hidden state (index 0 = embeddings output
            when ``layers`` is all of them).
        layers: hidden-state indices the entries refer to.
        n_tokens: number of (non-pad) tokens the statistics cover.
    """

    per_layer: Tensor
    layers: list[int]
    n_tokens: int
    outlier_share: Tensor | None = None
    token_norm: bool = False

    @property
    def drop(self) -> Tensor:
        """``1 − CKA`` per layer (the seed's "CKA drop" when the reference is 1)."""
        return 1.0 - self.per_layer

    @property
    def saturated_layers(self) -> list[int]:
        """Hidden-state indices where plain CKA is dominated by outlier tokens
        (``outlier_share ≥ SATURATION_SHARE``; see :func:`outlier_share`). Empty when
        ``token_norm`` was used (every token then weighs the same) or the share is unknown."""
        if self.token_norm or self.outlier_share is None:
            return []
        return [i for i, v in zip(self.layers, self.outlier_share.tolist()) if v >= SATURATION_SHARE]


@torch.no_grad()
def outlier_share(x: Tensor, factor: float = OUTLIER_FACTOR) -> tuple[float, float]:
    """Squared norm carried by outlier tokens, and the total, for features ``x (n, d)``.

    Outliers: rows with ``‖x_j‖ ≥ factor · median_j ‖x_j‖``. Returns
    ``(Σ_outliers ‖x_j‖², Σ_j ‖x_j‖²)`` (sum them over batches; their ratio is the share of
    ``tr(XᵀX)`` the outliers hold). Linear CKA is built from ``XᵀX``; when the outliers hold most
    of it, CKA compares those few tokens and reads ≈ 1 whatever the others do.
    """
    sq = x.double().square().sum(-1)
    if sq.numel() == 0:
        return 0.0, 0.0
    med = sq.sqrt().median()
    out = sq[sq.sqrt() >= factor * med]
    return float(out.sum()), float(sq.sum())


@torch.no_grad()
def _rms_rows(x: Tensor) -> Tensor:
    """``x / √mean(x², -1)`` per row, shape ``(n, d)`` (all-zero rows stay zero)."""
    x = x.double()
    return x / x.square().mean(-1, keepdim=True).sqrt().clamp_min(1e-30)


def layerwise_cka(
    model_a: nn.Module,
    model_b: nn.Module,
    batches: Iterable[Batch] | Batch,
    *,
    layers: list[int] | None = None,
    token_norm: bool = False,
) -> CKAResult:
    """Streaming layer-wise linear CKA between the hidden states of two models on the same inputs.

    Every non-pad token (``attention_mask``) of every batch is one example. The **biased** linear
    CKA is computed exactly from feature-space statistics accumulated in float64 over the
    stream — ``XᵀX``, ``YᵀY``, ``XᵀY``, the column sums and the count — centred at the end
    (``XcᵀYc = XᵀY − sₓs_yᵀ/n``), so memory is ``O(d²)`` per layer, independent of the number of
    tokens. (The unbiased estimator needs the n×n Gram matrices and is not streamed.)

    Both models run in eval mode with ``output_hidden_states=True``; their modes and ``.grad``
    are restored.

    Args:
        model_a: e.g. the model before fine-tuning.
        model_b: e.g. the model after (same tokenizer; hidden sizes may differ).
        batches: dict batches (``input_ids``, ``attention_mask``, ...); ``labels`` are ignored.
        layers: hidden-state indices to compare (default all, ``num_hidden_layers + 1``).
        token_norm: divide every token's hidden vector by its RMS first (``h / √mean(h²)``).
            Pretrained LLMs carry *massive activations* in their middle layers: a few tokens (the
            first token, chat delimiters) reach 10²–10³× the norm of the others (SmolLM2-135M:
            ~25 000 against ~100 at layer 15), so plain linear CKA measures those few tokens and
            reads ≈ 1 whatever the others do. With ``token_norm`` every token weighs the same.

    **Saturation rule.** On ``model_a``'s hidden states, every layer's share of ``Σ‖h‖²`` held by
    outlier tokens (norm ≥ ``OUTLIER_FACTOR`` = 10× the batch's median token norm) is measured
    (``outlier_share``). Without ``token_norm``, a layer whose share is ≥ ``SATURATION_SHARE``
    (0.5) is *saturated* (``result.saturated_layers``) and a ``UserWarning`` names the layers and
    the fix (``token_norm=True``; the plan and ``python -m mitigate.diagnose`` use it by default).

    Returns:
        :class:`CKAResult` with ``per_layer`` and ``outlier_share`` of shape ``(len(layers),)``.

    Raises:
        ValueError: models with different numbers of hidden states, an out-of-range layer, or no
            tokens.
    """
    if layers is not None and not list(layers):
        raise ValueError("layers=[] selects nothing; pass None for every hidden state")
    stats: dict[int, Moments] = {}
    mass: dict[int, list[float]] = {}
    chosen: list[int] = []
    with preserve_state(model_a, mode=False), preserve_state(model_b, mode=False):
        for batch in as_batch_list(batches):
            ha, mask = hidden_states(model_a, batch)
            hb, _ = hidden_states(model_b, batch)
            if len(ha) != len(hb):
                raise ValueError(f"the models return {len(ha)} and {len(hb)} hidden states; compare like with like")
            if not chosen:
                chosen = list(range(len(ha))) if layers is None else [int(i) for i in layers]
                bad = [i for i in chosen if not -len(ha) <= i < len(ha)]
                if bad:
                    raise ValueError(f"layers={bad} out of range for {len(ha)} hidden states")
                chosen = [i % len(ha) for i in chosen]
            for i in chosen:
                m = mask.to(ha[i].device)
                xa, xb = ha[i][m], hb[i][m.to(hb[i].device)]
                o, t = outlier_share(xa)
                acc = mass.setdefault(i, [0.0, 0.0])
                acc[0] += o
                acc[1] += t
                if token_norm:
                    xa, xb = _rms_rows(xa), _rms_rows(xb)
                stats.setdefault(i, Moments(cross=True)).update(xa, xb)
    values = []
    for i in chosen:
        xx, yy, xy = stats[i].centered()
        values.append(_cka_from_moments(xx, yy, xy))
    share = torch.tensor([mass[i][0] / mass[i][1] if mass[i][1] > 0 else 0.0 for i in chosen], dtype=torch.float64)
    res = CKAResult(per_layer=torch.stack(values).cpu(), layers=chosen, n_tokens=stats[chosen[0]].n, outlier_share=share, token_norm=token_norm)
    sat = res.saturated_layers
    if sat:
        warnings.warn(
            f"layerwise_cka: plain CKA saturates on {len(sat)} of {len(chosen)} hidden states {sat}: tokens with "
            f"≥ {OUTLIER_FACTOR:g}× the median norm (massive activations) hold ≥ {SATURATION_SHARE:.0%} of Σ‖h‖², so "
            "CKA there compares those few tokens and reads ≈ 1; pass token_norm=True",
            UserWarning,
            stacklevel=2,
        )
    return res
