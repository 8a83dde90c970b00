"""Diagnosis-driven mitigation: probe the new task briefly, measure the mechanisms of forgetting,
and turn the numbers into a plan you can read, save and apply.

:func:`plan` runs, on the model as it stands after the old task:

1. **gradient interference** — :func:`~mitigate.diagnostics.gradient_alignment` between the old-
   and new-task gradients (global, per layer, per head's Q/K rows);
2. a **probe**: ``probe_steps`` AdamW steps of the new task on a deep copy of the model;
3. **attention disruption** — :func:`~mitigate.diagnostics.disrupted_heads` between the model and
   the probed copy on old-task inputs (entropy increase in bits, Q/K weight-change z-score);
4. **representational drift** — :func:`~mitigate.diagnostics.layerwise_cka` between the model and
   the probed copy on old-task inputs;
5. **landscape flattening** — λ_max of the old-task Hessian before and after the probe
   (:func:`~mitigate.curvature.hessian_eigenvalues`; skipped, with a reason, where the attention
   kernel has no double backward);

then applies the rules of :class:`PlanPolicy` (all thresholds in one place), **verifies** the
candidate plans the rules propose by probing each on a copy (``PlanPolicy.verify``: the one that
loses the least old-task loss at ≥ 90% of the unmitigated new-task progress wins, simplest on
ties) and forecasts forgetting from the early gradient alignment (:func:`forecast_forgetting`).

The rules, in order (``L`` blocks, ``H`` heads per block):

* **freeze_bottom** ("Spurious forgetting": task alignment lives in the bottom layers and the
  embeddings; freezing them is the strongest single recipe) — start at
  ``min_freeze_bottom``; raise to ``similar_task_freeze_bottom`` when the tasks are similar
  (global cosine ``> similar_task_cosine``: "more similar task formats benefit from freezing more
  layers"); extend upward over contiguous bottom layers where at least ``bottom_head_fraction`` of
  the heads are disrupted (mechanistic study: 15–23% of lower-layer heads); cap at
  ``max_freeze_bottom_fraction · L`` and at ``L − 1``.
* **freeze_heads** (mechanism 1) — above the frozen layers, heads that are *disrupted*
  (entropy increase ``> entropy_increase_bits`` or weight z ``> weight_z``) or *conflicting*
  (Q/K gradient cosine ``< head_conflict_cosine`` and weight z ``> conflict_z``); at most
  ``max_frozen_head_fraction`` of those heads, most severe first. When bottom blocks are frozen,
  the weight z-scores are recomputed among the heads that will still train (the frozen blocks'
  motion in the probe no longer dilutes them).
* **lrcp_targets** (mechanism 2) — the FFN linears of every unfrozen block whose CKA drop
  ``1 − CKA`` on old-task inputs is ``≥ cka_drop_lrcp``; plus that block's attention
  projections when the global cosine is ``< global_conflict_cosine`` (strong interference).
* **curvature** (mechanism 3) — when ``λ_max(after) / λ_max(before) < lambda_ratio``.

With ``PlanPolicy.verify`` (default) the rules only *propose*: for every bottom depth from
``min_freeze_bottom`` to the cap, a freeze-only candidate and one with the rules' head freezing
and LRCP are each probed on a copy (``MitigationPlan.apply`` on the copy, then the same
``probe_steps`` AdamW steps); then an **EWC anchor** (:class:`~mitigate.EWC` on the old task,
over the parameters left trainable, ``λ = scale / mean(F)`` for each ``PlanPolicy.ewc_scales``)
is probed on top of each of those (``ewc_on="every"``) or of the best one (``"best"``). The plan
keeps the candidate with the smallest old-task loss increase among those that keep
``min_plasticity`` of the unmitigated new-task loss decrease (:func:`select_candidate`). The
curvature decision is not probed (it costs Lanczos runs). The probes run within a budget
(``plan(budget_steps=..., budget_s=...)``, default 12 probes' worth of steps): deep models get a
coarse depth grid (``PlanPolicy.max_depths``), anchors on the best structure only and fewer
strengths; a candidate must beat a simpler one by more than the probe's own noise
(``PlanPolicy.noise_z`` paired standard errors over the old examples), else the simpler one is kept.

Usage::

    p = mitigate.plan(model, old_batches, new_batches, probe_steps=20, lr=1e-4)  # budget: 240 steps
    print(p)                                  # table: actions, per-block numbers, reasons
    applied = p.apply(model, optimizer)       # freezes, wraps, consolidates on old_batches
    for batch in new_task:
        loss = model(**batch).loss + applied.penalty()
        loss.backward(); applied.optimizer.step(); applied.optimizer.zero_grad()
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from mitigate._utils import Batch, LossFn, model_device, resolve_loss_fn

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class PlanPolicy:
    """Every decision threshold of :func:`plan`, in one place (see the module docstring).

    Seed numbers: "Mechanistic analysis of catastrophic forgetting" (arXiv 2601.18699; entropy
    increase > 1.8 bits and 2.5σ weight change mark a disrupted head, 15–23% of lower-layer heads
    disrupted, first-epoch cosine < −0.3 → 2.4× forgetting, λ_max < 50% of original = flattened)
    and "Spurious forgetting" (freeze the bottom 1–3 layers + embeddings; more for similar tasks).
    Probe-scale thresholds (CKA, λ ratio) are lower than the seed's end-of-training numbers because
    the probe is a few steps, not a few epochs.

    Attributes:
        entropy_increase_bits: a head whose mean attention entropy on old inputs rises by more is
            disrupted (seed: 1.8 bits).
        weight_z: a head whose Q/K weight change has a z-score above this is disrupted (seed 2.5).
        head_conflict_cosine: τ — a head whose joint Q/K gradient cosine (old vs new) is below τ
            conflicts.
        conflict_z: a conflicting head is frozen only if its weight z also exceeds this (it moved).
        max_frozen_head_fraction: cap on frozen heads, as a fraction of the heads above the frozen
            bottom layers (most severe first).
        min_freeze_bottom: bottom blocks always frozen (seed: 1, "even single-task SFT gains";
            default 0 so the verification probes can also choose not to freeze: on biography
            the unfrozen LRCP + EWC candidates beat every frozen one, see docs/BENCHMARKS.md).
        similar_task_cosine: global gradient cosine above which the tasks count as similar.
        similar_task_freeze_bottom: bottom blocks frozen for similar tasks (seed: 1–3, more for
            similar formats).
        bottom_head_fraction: a bottom block with at least this fraction of disrupted heads is
            frozen whole (seed: 15–23% of lower-layer heads).
        max_freeze_bottom_fraction: never freeze more than this fraction of the blocks (and always
            leave one trainable).
        freeze_embeddings: freeze the embeddings with the bottom blocks (seed: yes).
        cka_drop_lrcp: an unfrozen block whose ``1 − CKA`` after the probe is at least this gets
            LRCP on its FFN (seed's end-of-training drop is 0.32–0.47; probe scale is smaller).
        global_conflict_cosine: below this global cosine, LRCP also covers the attention
            projections of drifting blocks (seed: cos < −0.3 → 2.4× forgetting).
        lrcp_energy, lrcp_max_rank: :class:`~mitigate.LowRankCircuitProjection` settings.
        lambda_ratio: curvature protection when ``λ_max(after probe)/λ_max(before)`` is below this.
        curvature_strength, curvature_k: :class:`~mitigate.CurvatureRegularizer` settings.
        compute_curvature: measure λ_max at all (two Lanczos runs; needs eager attention).
        lambda_max_iter, lambda_tol: Lanczos budget and relative tolerance for λ_max.
        lambda_batches: old-task batches λ_max is measured on (the dominant cost on CPU).
        verify: probe each candidate plan (every bottom-freeze depth from ``min_freeze_bottom``
            to the cap, each with and without the head/LRCP protections) on a copy and keep the
            one that loses the least old-task loss while keeping at least ``min_plasticity`` of
            the unmitigated probe's new-task loss decrease; candidates within
            ``verify_tolerance`` (a fraction of the unmitigated old-loss increase) of the best
            count as ties and the simplest wins (fewest frozen blocks, then freeze-only). The
            rules above then only propose; the probe decides.
        min_plasticity, verify_tolerance: see ``verify``.
        ewc_scales: EWC anchor strengths the verification probes on top of the structural
            candidates (``()``: no anchor candidates). Relative: the applied
            ``λ = scale / mean(F)`` over the parameters left trainable, so ``scale`` is the
            penalty's stiffness ``λ F_i`` on a parameter with the mean Fisher; a number that
            carries across models, unlike λ. Only the probe can pick a strength, so without
            ``verify`` no anchor is planned.
        ewc_fisher: the :class:`~mitigate.EWC` Fisher estimate for the anchor.
        ewc_on: ``"every"`` probes each anchor strength on every structural candidate
            (``S·(1 + len(ewc_scales))`` probes for ``S`` structures); ``"best"`` only on the
            best structure (``S + len(ewc_scales)``, for deep models); ``"auto"`` (default):
            ``"every"`` when that fits the plan's probe budget, else ``"best"``. On biography
            quick, 8 seeds: ``"every"`` keeps +2.4 ± 0.8 pp more Task-0 accuracy than the ``ewc``
            recipe at the same new-task accuracy, ``"best"`` +0.9 ± 1.4 pp.
        max_depths: the bottom-freeze depths the verification probes: every depth from
            ``min_freeze_bottom`` to the cap when there are at most this many, else a coarse
            grid of this many — the cap and its halvings (cap/2, cap/4, …) plus
            ``min_freeze_bottom``: depths {0, L/8, L/4, L/2} at the default cap ``L/2`` of a
            deep model, instead of ``L/2 + 1`` depths.
        noise_z: refuse to pick a candidate over a simpler one when its old-task advantage is
            within ``noise_z`` standard errors of the probe's noise (the spread, over the
            held-out old-task examples, of the paired per-example loss difference): the
            simpler one wins and the plan's reasons say so. ``0`` turns the refusal off.
        diagnostic_batches: at most this many old/new batches feed the diagnostics (``None``:
            all); the probe cycles over all new batches and :meth:`MitigationPlan.apply` uses
            all old batches.
    """

    entropy_increase_bits: float = 1.8
    weight_z: float = 2.5
    head_conflict_cosine: float = -0.1
    conflict_z: float = 1.0
    max_frozen_head_fraction: float = 0.25
    min_freeze_bottom: int = 0
    similar_task_cosine: float = 0.3
    similar_task_freeze_bottom: int = 2
    bottom_head_fraction: float = 0.15
    max_freeze_bottom_fraction: float = 0.5
    freeze_embeddings: bool = True
    cka_drop_lrcp: float = 0.05
    global_conflict_cosine: float = -0.3
    lrcp_energy: float = 0.99
    lrcp_max_rank: int | float = 0.5
    lambda_ratio: float = 0.8
    curvature_strength: float = 1.0
    curvature_k: int = 1
    compute_curvature: bool = True
    lambda_max_iter: int = 20
    lambda_tol: float = 2e-2
    lambda_batches: int = 2
    diagnostic_batches: int | None = 4
    verify: bool = True
    min_plasticity: float = 0.9
    verify_tolerance: float = 0.02
    ewc_scales: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
    ewc_fisher: str = "empirical"
    ewc_on: str = "auto"
    max_depths: int = 4
    noise_z: float = 2.0

    def __post_init__(self) -> None:
        scales = self.ewc_scales
        if isinstance(scales, (int, float)) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in scales):
            raise ValueError(f"ewc_scales={scales!r} must be a sequence of finite numbers > 0, e.g. (1.0, 3.0), or () for no EWC anchor")
        object.__setattr__(self, "ewc_scales", tuple(float(v) for v in scales))
        if self.ewc_on not in ("auto", "every", "best"):
            raise ValueError(
                f"ewc_on={self.ewc_on!r} must be 'auto' (every when the budget allows), 'every' (anchor every "
                "structural candidate) or 'best' (only the best one: cheaper)"
            )
        if isinstance(self.max_depths, bool) or not isinstance(self.max_depths, int) or self.max_depths < 1:
            raise ValueError(f"max_depths={self.max_depths!r} must be a positive int (bottom-freeze depths probed), e.g. 4")
        if not (isinstance(self.noise_z, (int, float)) and math.isfinite(self.noise_z) and self.noise_z >= 0):
            raise ValueError(f"noise_z={self.noise_z!r} must be a finite number ≥ 0 (0: no noise refusal)")
        if self.ewc_fisher not in ("empirical", "true", "batch"):
            raise ValueError(f"ewc_fisher={self.ewc_fisher!r} must be 'empirical', 'true' or 'batch' (see mitigate.EWCConfig)")
        for name in ("entropy_increase_bits", "weight_z", "conflict_z", "curvature_strength"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be ≥ 0")
        for name in ("head_conflict_cosine", "similar_task_cosine", "global_conflict_cosine"):
            if not -1.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)!r} is a cosine: pass a value in [-1, 1]")
        for name in ("min_plasticity", "verify_tolerance", "max_frozen_head_fraction", "bottom_head_fraction", "max_freeze_bottom_fraction", "cka_drop_lrcp", "lrcp_energy", "lambda_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be in [0, 1]")
        for name in ("min_freeze_bottom", "similar_task_freeze_bottom"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}={v!r} must be a non-negative int")
        for name in ("lambda_max_iter", "lambda_batches", "diagnostic_batches"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}={v!r} must be a positive int" + (" or None" if name == "diagnostic_batches" else ""))
        if not self.lambda_tol > 0:
            raise ValueError(f"lambda_tol={self.lambda_tol!r} must be > 0")
        if isinstance(self.curvature_k, bool) or not isinstance(self.curvature_k, int) or self.curvature_k < 1:
            raise ValueError(f"curvature_k={self.curvature_k!r} must be a positive int")


# ----------------------------------------------------------------------------- forecast

#: The default forecast is a *prior*, not a measurement: a line through two anchor points the
#: mechanistic study implies, with its correlation r = −0.79 between early gradient cosine and
#: final forgetting setting the residual spread. Forgetting is in units of the fraction of
#: old-task accuracy lost. Anchors: f(+0.2) = 0.16 and f(−0.3) = 2.4 · f(+0.2) ("first-epoch
#: cosine < −0.3: 2.4× higher forgetting"); residual sd = 0.15 · √(1 − 0.79²) ≈ 0.092, where
#: 0.15 is an assumed spread of forgetting across task pairs.
PRIOR_INTERCEPT = 0.25
PRIOR_SLOPE = -0.449
PRIOR_RESIDUAL_SD = 0.15 * math.sqrt(1 - 0.79**2)


@dataclass(frozen=True)
class Forecast:
    """Forecast of forgetting from the early gradient cosine.

    Attributes:
        expected_forgetting: point forecast (same units as the calibration pairs; default prior:
            fraction of old-task accuracy lost).
        low, high: interval bounds at ``level``.
        basis: where the numbers come from (prior or fit, with its coefficients).
        cosine: the early gradient cosine the forecast is for.
        level: interval coverage (0.9 = 5th–95th percentile).
    """

    expected_forgetting: float
    low: float
    high: float
    basis: str
    cosine: float
    level: float = 0.9


def _normal_quantile(p: float) -> float:
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(p, dtype=torch.float64)))


def forecast_forgetting(
    cosine: float,
    calibration: Sequence[tuple[float, float]] | None = None,
    *,
    level: float = 0.9,
    n_boot: int = 2000,
    seed: int = 0,
) -> Forecast:
    """Forecast forgetting from the early old/new gradient cosine with a linear model.

    ``f = a + b · cos``. Without ``calibration``, ``(a, b)`` and the residual spread are the
    shipped prior (:data:`PRIOR_INTERCEPT`, :data:`PRIOR_SLOPE`, :data:`PRIOR_RESIDUAL_SD`,
    derived from the seed's r = −0.79 — a prior, not a measurement) and the interval is
    ``f ± z · sd``, clipped to ``[0, 1]``. With ``calibration`` (your own ``(cosine, forgetting)``
    pairs, at least 3, with distinct cosines), ``(a, b)`` is the least-squares fit and the
    interval is a pairs-bootstrap prediction interval: for each of ``n_boot`` resamples, refit and
    add a residual drawn from that fit; report the ``(1 ± level)/2`` percentiles.

    Args:
        cosine: early gradient cosine between old and new task, in [−1, 1].
        calibration: optional ``[(cosine, forgetting), ...]``.
        level: interval coverage in (0, 1).
        n_boot: bootstrap resamples.
        seed: seed of the bootstrap generator.

    Returns:
        :class:`Forecast`.

    Raises:
        ValueError: ``cosine`` not finite, bad ``level``, or fewer than 3 usable calibration pairs.
    """
    if not math.isfinite(cosine):
        raise ValueError(f"cosine={cosine!r} must be finite (was a gradient zero?)")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level!r} must be in (0, 1), e.g. 0.9")
    lo_q, hi_q = (1 - level) / 2, (1 + level) / 2
    if calibration is None:
        f = PRIOR_INTERCEPT + PRIOR_SLOPE * cosine
        half = _normal_quantile(hi_q) * PRIOR_RESIDUAL_SD
        clip = lambda v: min(1.0, max(0.0, v))  # noqa: E731
        return Forecast(
            expected_forgetting=clip(f), low=clip(f - half), high=clip(f + half), cosine=float(cosine), level=level,
            basis=(
                f"prior (not a measurement): forgetting = {PRIOR_INTERCEPT:.3f} {PRIOR_SLOPE:+.3f}·cos, "
                f"residual sd {PRIOR_RESIDUAL_SD:.3f}, from the mechanistic study's r = −0.79 and "
                "'cos < −0.3 → 2.4× forgetting'; pass calibration=[(cos, forgetting), ...] to fit your own"
            ),
        )
    pairs = torch.tensor([(float(c), float(y)) for c, y in calibration], dtype=torch.float64).reshape(-1, 2)
    if pairs.shape[0] < 3 or pairs[:, 0].unique().numel() < 2 or not bool(torch.isfinite(pairs).all()):
        raise ValueError(
            f"calibration needs at least 3 finite (cosine, forgetting) pairs with distinct cosines; got {pairs.tolist()}"
        )

    def fit(xy: Tensor) -> tuple[float, float, Tensor] | None:
        x, y = xy[:, 0], xy[:, 1]
        vx = float(((x - x.mean()) ** 2).sum())
        if x.unique().numel() < 2:
            return None
        b = float(((x - x.mean()) * (y - y.mean())).sum()) / vx
        a = float(y.mean()) - b * float(x.mean())
        return a, b, y - (a + b * x)

    a, b, resid = fit(pairs)  # type: ignore[misc]
    g = torch.Generator().manual_seed(seed)
    n = pairs.shape[0]
    preds = []
    for _ in range(n_boot):
        sample = pairs[torch.randint(0, n, (n,), generator=g)]
        res = fit(sample)
        if res is None:
            continue
        ab, bb, rb = res
        # residuals rescaled by √(n/(n−2)) so their variance is unbiased for the 2-parameter fit
        e = float(rb[torch.randint(0, n, (1,), generator=g)]) * math.sqrt(n / max(n - 2, 1))
        preds.append(ab + bb * cosine + e)
    q = torch.tensor(preds, dtype=torch.float64).quantile(torch.tensor([lo_q, hi_q], dtype=torch.float64))
    r = float(torch.corrcoef(pairs.T)[0, 1])
    return Forecast(
        expected_forgetting=a + b * cosine, low=float(q[0]), high=float(q[1]), cosine=float(cosine), level=level,
        basis=(
            f"fit on {n} calibration pairs: forgetting = {a:.3f} {b:+.3f}·cos (r = {r:.2f}); "
            f"{int(level * 100)}% pairs-bootstrap prediction interval (B = {len(preds)}, seed {seed})"
        ),
    )


# ----------------------------------------------------------------------------- diagnosis


@dataclass
class Diagnosis:
    """The numbers a plan is made from (plain Python; ``L`` blocks, ``H`` heads).

    Attributes:
        model_type: ``model_map(model).model_type``.
        num_layers, n_heads: ``L``, ``H``.
        global_cosine: cosine of the full old/new task gradients.
        layer_cosine: ``(L,)`` cosine over each block's parameters (NaN where unknown).
        head_cosine: ``(L, H)`` joint Q/K gradient cosine per query head (NaN where unknown).
        entropy_change: ``(L, H)`` attention entropy change (bits) on old inputs after the probe.
        weight_z: ``(L, H)`` z-score of each head's Q/K weight change in the probe (across all
            heads of the model).
        weight_distance: ``(L, H)`` ``‖ΔW_q,h‖² + ‖ΔW_k,g(h)‖²`` in the probe.
        cka: ``(L,)`` CKA between the model's and the probed copy's block outputs on old inputs,
            token-normalised (``layerwise_cka(token_norm=True)``: plain CKA saturates at ≈ 1 under
            massive activations, e.g. 29 of 30 blocks of SmolLM2-135M).
        lambda_before, lambda_after: old-task λ_max before/after the probe (``None``: skipped).
        probe_steps, probe_lr: the probe.
        probe_loss: new-task training loss at the first and last probe step.
        old_loss: old-task eval loss (diagnostic batches) before and after the probe.
        new_loss: new-task eval loss (diagnostic batches) before and after the probe.
        notes: diagnostics that were skipped and why.
        old_example_loss: per-example old-task eval loss (diagnostic batches) before and after
            the probe, for the verification's noise estimate (not in :meth:`MitigationPlan.to_dict`).
    """

    model_type: str
    num_layers: int
    n_heads: int
    global_cosine: float
    layer_cosine: list[float]
    head_cosine: list[list[float]]
    entropy_change: list[list[float]]
    weight_z: list[list[float]]
    weight_distance: list[list[float]]
    cka: list[float]
    lambda_before: float | None = None
    lambda_after: float | None = None
    probe_steps: int = 0
    probe_lr: float = 0.0
    probe_loss: tuple[float, float] | None = None
    old_loss: tuple[float, float] | None = None
    new_loss: tuple[float, float] | None = None
    notes: list[str] = field(default_factory=list)
    old_example_loss: tuple[list[float], list[float]] | None = field(default=None, repr=False)

    @property
    def lambda_ratio(self) -> float | None:
        """``λ_max(after) / λ_max(before)`` or ``None``."""
        if self.lambda_before is None or self.lambda_after is None or self.lambda_before == 0:
            return None
        return self.lambda_after / self.lambda_before


def _layer_cosines(al: Any, L: int) -> list[float]:
    """Per-block cosine from an AlignmentReport's per-(group, layer) cosines (mean over groups)."""
    vals: dict[int, list[float]] = {}
    for key, v in getattr(al, "per_layer", {}).items():
        layer = key[1] if isinstance(key, tuple) else key
        if isinstance(layer, int) and 0 <= layer < L and v == v:
            vals.setdefault(layer, []).append(float(v))
    return [sum(vals[i]) / len(vals[i]) if i in vals else float("nan") for i in range(L)]


@torch.no_grad()
def _eval_loss(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn) -> float:
    """Mean loss over ``batches`` in eval mode (flags and ``.grad`` restored)."""
    from mitigate._utils import preserve_state

    with preserve_state(model, mode=False):
        return sum(float(loss_fn(model, b)) for b in batches) / len(batches)


def _examples(batches: Sequence[Batch]) -> list[Batch]:
    """Each dict batch split into one-example batches (every tensor sliced on its leading
    ``B``); a batch that cannot be split (not a dict, or tensors of different leading sizes)
    stays whole."""
    out: list[Batch] = []
    for b in batches:
        sizes = {v.shape[0] for v in b.values() if isinstance(v, Tensor) and v.dim() > 0} if isinstance(b, dict) else set()
        if len(sizes) != 1:
            out.append(b)
            continue
        n = sizes.pop()
        out += [{k: (v[i : i + 1] if isinstance(v, Tensor) and v.dim() > 0 else v) for k, v in b.items()} for i in range(n)]
    return out


@torch.no_grad()
def _example_losses(model: nn.Module, examples: Sequence[Batch], loss_fn: LossFn) -> list[float]:
    """Loss of each one-example batch in eval mode (NaN where it has no labelled token)."""
    from mitigate._utils import preserve_state

    with preserve_state(model, mode=False):
        return [float(loss_fn(model, b)) for b in examples]


def _paired_gap(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and standard error of ``a_i − b_i`` over the examples where both are finite."""
    d = [x - y for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    if len(d) < 2:
        return (sum(d) / len(d) if d else 0.0), 0.0
    t = torch.tensor(d, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=True)) / math.sqrt(len(d))


def _cuda_devices(model: nn.Module) -> list[int]:
    """CUDA device indices of ``model``'s parameters (for ``torch.random.fork_rng``)."""
    return sorted({q.device.index or 0 for q in model.parameters() if q.device.type == "cuda"})


def _probe(
    model: nn.Module,
    batches: list[Batch],
    loss_fn: LossFn,
    steps: int,
    lr: float,
    weight_decay: float,
    seed: int,
    prepare: Callable[[nn.Module, Optimizer], tuple[Optimizer, Callable[[], Tensor] | None]] | None = None,
) -> tuple[nn.Module, tuple[float, float] | None]:
    """``steps`` AdamW steps of the new task on a deep copy of ``model`` (train mode, seeded).

    ``prepare(copy, adamw) -> (optimizer, penalty)`` installs a candidate mitigation on the copy."""
    probed = copy.deepcopy(model)
    for p in probed.parameters():
        p.grad = None
    params = [p for p in probed.parameters() if p.requires_grad]
    if not params or steps == 0:
        return probed, None
    opt: Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    penalty = None
    if prepare is not None:
        opt, penalty = prepare(probed, opt)
    probed.train()
    losses = []
    with torch.random.fork_rng(devices=_cuda_devices(probed)):
        torch.manual_seed(seed)
        for i in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(probed, batches[i % len(batches)])
            (loss if penalty is None else loss + penalty()).backward()
            opt.step()
            if i in (0, steps - 1):
                losses.append(float(loss.detach()))
    opt.zero_grad(set_to_none=True)
    probed.train(model.training)
    return probed, (losses[0], losses[-1])


def diagnose(
    model: nn.Module,
    old_batches: Sequence[Batch],
    new_batches: Sequence[Batch],
    loss_fn: LossFn | None = None,
    *,
    probe_steps: int = 20,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    policy: PlanPolicy | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Diagnosis:
    """Measure what :func:`plan` decides from (see the module docstring); ``model`` is untouched.

    Args:
        model: the model after the old task (single-stack: decoder-only or encoder-only).
        old_batches, new_batches: lists of batches of the old and new tasks.
        loss_fn: ``loss_fn(model, batch) -> scalar`` (default ``model(**batch).loss``) for both.
        probe_steps, lr, weight_decay: the AdamW probe of the new task on a copy.
        policy: thresholds passed to the diagnostics (entropy, z).
        seed: seeds the probe (dropout) and the Lanczos start vector.
        progress: a tqdm bar over the stages (shown after 2 s) and the Lanczos runs' own bars.

    Returns:
        :class:`Diagnosis`.

    Raises:
        ValueError: empty batch lists, bad probe settings, or a multi-stack model.
    """
    from mitigate.architectures import model_map
    from mitigate.diagnostics import disrupted_heads, gradient_alignment, layerwise_cka

    policy = policy or PlanPolicy()
    if not old_batches or not new_batches:
        raise ValueError("plan() needs non-empty old_batches and new_batches (lists of batches)")
    if isinstance(probe_steps, bool) or not isinstance(probe_steps, int) or probe_steps < 1:
        raise ValueError(f"probe_steps={probe_steps!r} must be a positive int (a few dozen is typical)")
    if not lr > 0:
        raise ValueError(f"lr={lr!r} must be > 0 (the new task's learning rate)")
    mm = model_map(model)
    if len(mm.stacks) != 1:
        raise ValueError(
            f"plan() supports single-stack models; {mm.model_type} has stacks {mm.stacks}. Use the "
            "diagnostics and mitigations directly for encoder-decoder models"
        )
    L, H = mm.num_layers, mm.n_heads
    loss = resolve_loss_fn(loss_fn)
    notes: list[str] = []
    probe_batches = list(new_batches)
    k = policy.diagnostic_batches
    old_batches, new_batches = list(old_batches)[:k], probe_batches[:k]

    from mitigate._utils import progress_bar

    stages = ["alignment", "λ_max before", "probe", "losses", "heads", "CKA", "λ_max after"] if policy.compute_curvature else ["alignment", "probe", "losses", "heads", "CKA"]
    bar = progress_bar(stages, desc="plan: diagnose", unit="stage", delay=2.0, leave=False, enabled=progress)
    stage = iter(bar)

    def step() -> None:
        bar.set_postfix_str(next(stage), refresh=True)

    step()
    al = gradient_alignment(model, old_batches, new_batches, loss_fn)
    head_cos = [[float("nan")] * H for _ in range(L)]
    for layer, t in al.per_head.items():
        if isinstance(layer, int) and 0 <= layer < L:
            head_cos[layer] = [float(v) for v in t.tolist()]

    lam_b = lam_a = None
    if policy.compute_curvature:
        step()
        lam_b = _lambda_max(model, old_batches, loss_fn, seed, policy, notes, progress)

    old_before, new_before = _eval_loss(model, old_batches, loss), _eval_loss(model, new_batches, loss)
    step()
    probed, probe_loss = _probe(model, probe_batches, loss, probe_steps, lr, weight_decay, seed)
    step()
    old_after, new_after = _eval_loss(probed, old_batches, loss), _eval_loss(probed, new_batches, loss)
    old_examples = _examples(old_batches)
    per_example = (_example_losses(model, old_examples, loss), _example_losses(probed, old_examples, loss)) if policy.verify else None
    step()
    try:
        dh = disrupted_heads(model, probed, old_batches, entropy_threshold=policy.entropy_increase_bits, z_threshold=policy.weight_z)
        ent = dh.entropy_change.tolist()
        wz = dh.weight_z.tolist()
        wd = dh.weight_distance.tolist()
    except (ValueError, RuntimeError) as e:
        notes.append(f"disrupted heads skipped: {e}")
        ent = [[0.0] * H for _ in range(L)]
        wz = [[0.0] * H for _ in range(L)]
        wd = [[0.0] * H for _ in range(L)]
    step()
    try:
        # token_norm: massive activations (a few tokens 10²–10³× the others' norm in pretrained
        # LLMs) make plain CKA read ≈ 1 on every block, so the LRCP rule could never fire
        cka_res = layerwise_cka(model, probed, old_batches, token_norm=True)
        per = dict(zip(cka_res.layers, cka_res.per_layer.tolist()))
        cka = [float(per.get(i + 1, float("nan"))) for i in range(L)]  # hidden state i+1 = block i output
    except (ValueError, RuntimeError) as e:
        notes.append(f"CKA skipped: {e}")
        cka = [float("nan")] * L
    if policy.compute_curvature:
        step()
    if policy.compute_curvature and lam_b is not None:
        lam_a = _lambda_max(probed, old_batches, loss_fn, seed, policy, notes, progress)
    for _ in stage:  # run the iterator out so the bar closes
        pass
    del probed
    return Diagnosis(
        model_type=mm.model_type, num_layers=L, n_heads=H, global_cosine=float(al.global_cosine),
        layer_cosine=_layer_cosines(al, L), head_cosine=head_cos, entropy_change=ent, weight_z=wz, weight_distance=wd,
        cka=cka, lambda_before=lam_b, lambda_after=lam_a, probe_steps=probe_steps, probe_lr=lr,
        probe_loss=probe_loss, old_loss=(old_before, old_after), new_loss=(new_before, new_after), notes=notes,
        old_example_loss=per_example,
    )


def _lambda_max(model: nn.Module, batches: Sequence[Batch], loss_fn: LossFn | None, seed: int, policy: PlanPolicy, notes: list[str], progress: bool = True) -> float | None:
    from mitigate.curvature import hessian_eigenvalues
    from mitigate.errors import AttentionKernelError

    try:
        res = hessian_eigenvalues(model, list(batches)[: policy.lambda_batches], loss_fn, k=1, seed=seed, max_iter=policy.lambda_max_iter, tol=policy.lambda_tol, progress=progress)
        return float(res.values[0])
    except (AttentionKernelError, RuntimeError, ValueError) as e:
        notes.append(f"λ_max skipped: {type(e).__name__}: {e}")
        return None


# ----------------------------------------------------------------------------- the plan


@dataclass
class Candidate:
    """One candidate plan as measured by a verification probe.

    Attributes:
        name: e.g. ``"freeze 2 + heads + LRCP"``.
        freeze_bottom: its frozen bottom blocks.
        protect: whether it includes the head freezing / LRCP of the rules.
        ewc_scale: its EWC anchor scale (``0``: none; see ``PlanPolicy.ewc_scales``).
        old_loss_increase: old-task eval loss after its probe minus before.
        new_loss_decrease: new-task eval loss before minus after its probe.
        chosen: whether :func:`plan` picked it.
    """

    name: str
    freeze_bottom: int
    protect: bool
    old_loss_increase: float
    new_loss_decrease: float
    chosen: bool = False
    ewc_scale: float = 0.0


@dataclass
class AppliedPlan:
    """What :meth:`MitigationPlan.apply` did.

    Attributes:
        optimizer: the optimizer to train with (a :class:`~mitigate.LowRankCircuitProjection`
            around yours when the plan uses LRCP, else yours).
        penalty: ``penalty() -> scalar tensor`` to add to the loss (zero when no regularizer).
        freeze_reports: the :class:`~mitigate.FreezeReport` of each freezing call.
        regularizers: the consolidated regularizer modules.
    """

    optimizer: Optimizer
    penalty: Callable[[], Tensor]
    freeze_reports: list[Any] = field(default_factory=list)
    regularizers: list[nn.Module] = field(default_factory=list)

    def undo(self) -> None:
        """Unfreeze what the plan froze (the optimizer wrapper and regularizers just stop being used)."""
        for r in reversed(self.freeze_reports):
            r.undo()


class _Penalty:
    """Sum of the regularizers' penalties; a zero scalar without any."""

    def __init__(self, regs: list[nn.Module], device: torch.device) -> None:
        self.regs, self.device = regs, device

    def __call__(self) -> Tensor:
        if not self.regs:
            return torch.zeros((), device=self.device)
        total = self.regs[0].reg() if hasattr(self.regs[0], "reg") else self.regs[0]()
        for r in self.regs[1:]:
            total = total + (r.reg() if hasattr(r, "reg") else r())
        return total


@dataclass
class MitigationPlan:
    """A readable, JSON-able, applicable mitigation plan (see the module docstring for the rules).

    Attributes:
        freeze_bottom: bottom blocks to freeze (with the embeddings when ``freeze_embeddings``).
        freeze_embeddings: freeze the embeddings with them.
        freeze_heads: ``{layer: [head, ...]}`` whose Q/K to freeze (layers above ``freeze_bottom``).
        lrcp_targets: module names protected with LRCP (on the old task's input subspaces).
        curvature: add the curvature regularizer; ``curvature_strength`` its strength.
        ewc_scale: add an EWC anchor on the old task with ``λ = ewc_scale / mean(F)`` over the
            parameters left trainable (``0``: none; chosen by the verification probes).
        forecast: forgetting forecast from the early gradient cosine.
        reasons: why, with the numbers.
        diagnosis: the measurements.
        policy: the thresholds used.
        candidates: the verified candidates (empty when ``policy.verify`` is off).
        old_batches, loss_fn: kept (by reference) so :meth:`apply` can consolidate the old task.
    """

    freeze_bottom: int
    freeze_embeddings: bool
    freeze_heads: dict[int, list[int]]
    lrcp_targets: list[str]
    curvature: bool
    curvature_strength: float
    forecast: Forecast
    reasons: list[str]
    diagnosis: Diagnosis
    policy: PlanPolicy
    candidates: list[Candidate] = field(default_factory=list)
    ewc_scale: float = 0.0
    old_batches: Sequence[Batch] = field(default_factory=list, repr=False, compare=False)
    loss_fn: LossFn | None = field(default=None, repr=False, compare=False)
    # verification only: one EWC Fisher shared by the anchor strengths probed on one structure
    _fisher_cache: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    # ------------------------------------------------------------------ views
    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-able) form, without the stored batches and loss function."""
        d = self.diagnosis
        diag = asdict(d)
        diag["probe_loss"] = list(d.probe_loss) if d.probe_loss else None
        diag["old_loss"] = list(d.old_loss) if d.old_loss else None
        diag["new_loss"] = list(d.new_loss) if d.new_loss else None
        diag["lambda_ratio"] = d.lambda_ratio
        diag.pop("old_example_loss", None)
        out = {
            "freeze_bottom": self.freeze_bottom,
            "freeze_embeddings": self.freeze_embeddings,
            "freeze_heads": {str(k): list(v) for k, v in sorted(self.freeze_heads.items())},
            "lrcp_targets": list(self.lrcp_targets),
            "curvature": self.curvature,
            "curvature_strength": self.curvature_strength,
            "ewc_scale": self.ewc_scale,
            "forecast": asdict(self.forecast),
            "reasons": list(self.reasons),
            "diagnosis": diag,
            "policy": asdict(self.policy),
            "candidates": [asdict(c) for c in self.candidates],
        }
        out = _json_clean(out)
        json.dumps(out, allow_nan=False)  # fail here, not in the user's json.dump
        return out

    def __str__(self) -> str:
        d, f = self.diagnosis, self.forecast
        fmt = lambda v: "  n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:+.2f}"  # noqa: E731
        lines = [
            f"MitigationPlan for {d.model_type} ({d.num_layers} blocks × {d.n_heads} heads); probe: "
            f"{d.probe_steps} AdamW steps at lr {d.probe_lr:g}"
            + (f", new-task loss {d.probe_loss[0]:.3f} → {d.probe_loss[1]:.3f}" if d.probe_loss else ""),
            f"  forecast forgetting {f.expected_forgetting:.2f}  [{f.low:.2f}, {f.high:.2f}] ({int(f.level * 100)}%)"
            f" at early gradient cosine {f.cosine:+.3f}",
            f"    basis: {f.basis}",
            "",
            f"  {'action':<24}{'setting'}",
            f"  {'freeze bottom blocks':<24}{self.freeze_bottom}" + (" + embeddings" if self.freeze_bottom and self.freeze_embeddings else ""),
            f"  {'freeze Q/K of heads':<24}" + (", ".join(f"L{l}: {hs}" for l, hs in sorted(self.freeze_heads.items())) or "none"),
            f"  {'LRCP':<24}" + (f"{len(self.lrcp_targets)} modules" if self.lrcp_targets else "none"),
        ]
        lines += [f"  {'':<24}{n}" for n in self.lrcp_targets]
        lines.append(f"  {'EWC anchor':<24}" + (f"scale {self.ewc_scale:g} (λ = {self.ewc_scale:g} / mean Fisher)" if self.ewc_scale else "none"))
        lam = d.lambda_ratio
        lines.append(
            f"  {'curvature regularizer':<24}" + (f"strength {self.curvature_strength:g}" if self.curvature else "no")
            + (f"  (λ_max {d.lambda_before:.3g} → {d.lambda_after:.3g}, ratio {lam:.2f})" if lam is not None else "")
        )
        lines += ["", f"  {'block':<7}{'grad cos':>9}{'CKA':>7}{'max ΔH bits':>13}{'max z':>8}  action"]
        for i in range(d.num_layers):
            act = []
            if i < self.freeze_bottom:
                act.append("frozen")
            if i in self.freeze_heads:
                act.append(f"freeze Q/K heads {self.freeze_heads[i]}")
            if any(_layer_of(n, i) for n in self.lrcp_targets):
                act.append("LRCP")
            ent = max(d.entropy_change[i]) if d.entropy_change[i] else float("nan")
            wz = max(d.weight_z[i]) if d.weight_z[i] else float("nan")
            cka = d.cka[i]
            lines.append(
                f"  {i:<7}{fmt(d.layer_cosine[i]):>9}{(f'{cka:.3f}' if math.isfinite(cka) else 'n/a'):>7}"
                f"{ent:>13.2f}{wz:>8.2f}  {', '.join(act) or '-'}"
            )
        if self.candidates:
            lines += ["", f"  {'verified candidate':<34}{'old loss +':>11}{'new loss −':>11}"]
            lines += [
                f"  {('* ' if c.chosen else '  ') + c.name:<34}{c.old_loss_increase:>+11.4f}{c.new_loss_decrease:>+11.4f}"
                for c in self.candidates
            ]
        lines += ["", "  reasons:"] + [f"    - {r}" for r in self.reasons]
        if d.notes:
            lines += ["  notes:"] + [f"    - {n}" for n in d.notes]
        return "\n".join(lines)

    # ------------------------------------------------------------------ apply
    def apply(self, model: nn.Module, optimizer: Optimizer) -> AppliedPlan:
        """Freeze, wrap and consolidate as planned, on the old task's stored batches.

        Order: freeze the bottom blocks (+ embeddings), freeze the chosen heads' Q/K, wrap the
        optimizer in :class:`~mitigate.LowRankCircuitProjection` over ``lrcp_targets`` and
        ``remember`` the old task, build and ``consolidate`` the EWC anchor (on the parameters
        left trainable; ``λ = ewc_scale / mean(F)``) and the curvature regularizer.

        Args:
            model: the model the plan was made for (same module names).
            optimizer: the optimizer you will train the new task with (over ``model``'s params).

        Returns:
            :class:`AppliedPlan` — train with ``applied.optimizer`` and add ``applied.penalty()``
            to the loss.
        """
        from mitigate.freezing import freeze_attention_qk, freeze_bottom_layers

        reports = []
        if self.freeze_bottom > 0:
            reports.append(freeze_bottom_layers(model, self.freeze_bottom, embeddings=self.freeze_embeddings))
        if self.freeze_heads:
            reports.append(freeze_attention_qk(model, heads={int(k): list(v) for k, v in self.freeze_heads.items()}))
        opt: Optimizer = optimizer
        if self.lrcp_targets:
            from mitigate.optim.lrcp import LowRankCircuitProjection

            opt = LowRankCircuitProjection(
                optimizer, model, targets=list(self.lrcp_targets), energy=self.policy.lrcp_energy,
                max_rank=self.policy.lrcp_max_rank,
            )
            opt.remember(model, self.old_batches, self.loss_fn)
        regs: list[nn.Module] = []
        if self.ewc_scale:
            from mitigate.regularizers.ewc import EWC

            # one rule with EWC(model): λ = ewc_scale / mean(F) over the parameters left trainable
            ewc = EWC(model, scale=self.ewc_scale, fisher=self.policy.ewc_fisher)  # type: ignore[arg-type]
            cache = self._fisher_cache
            estimate = ewc.consolidate(self.old_batches, self.loss_fn, fisher=None if cache is None else cache.get("fisher"))
            if cache is not None:
                cache["fisher"] = estimate
            logger.info("mitigate.plan: EWC anchor λ = %.4g (scale %g)", ewc.lambda_, self.ewc_scale)
            regs.append(ewc)
        if self.curvature:
            import mitigate

            reg = mitigate.CurvatureRegularizer(model, strength=self.curvature_strength, k=self.policy.curvature_k)
            reg.consolidate(self.old_batches, self.loss_fn)
            regs.append(reg)
        return AppliedPlan(optimizer=opt, penalty=_Penalty(regs, model_device(model)), freeze_reports=reports, regularizers=regs)


def _json_clean(v: Any) -> Any:
    """Non-finite floats become ``None`` (strict JSON); containers are recursed."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _json_clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_clean(x) for x in v]
    return v


def _layer_of(name: str, layer: int) -> bool:
    parts = name.split(".")
    return any(p == str(layer) and i > 0 for i, p in enumerate(parts))


# ----------------------------------------------------------------------------- decide


def decide(
    diagnosis: Diagnosis,
    model: nn.Module,
    policy: PlanPolicy | None = None,
    *,
    freeze_bottom: int | None = None,
    protect: bool = True,
) -> dict[str, Any]:
    """Apply the rules of :class:`PlanPolicy` to a :class:`Diagnosis` (pure: no model call but
    :func:`mitigate.model_map` for module names).

    Args:
        diagnosis: the measurements.
        model: the model (for module names).
        policy: the thresholds.
        freeze_bottom: force this many frozen bottom blocks instead of the bottom-block rules
            (used to build the candidates that :func:`plan` verifies).
        protect: ``False`` drops the head freezing and LRCP (a freeze-only candidate).

    Returns:
        ``{"freeze_bottom", "freeze_embeddings", "freeze_heads", "lrcp_targets", "curvature",
        "curvature_strength", "ewc_scale", "reasons"}`` (``ewc_scale`` is always 0 here: only
        the verification probes pick an anchor strength).
    """
    from mitigate.architectures import model_map
    from mitigate.optim.lrcp import _candidates

    p = policy or PlanPolicy()
    d = diagnosis
    L, H = d.num_layers, d.n_heads
    reasons: list[str] = []
    finite = lambda v: v is not None and isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731

    # ---- heads: disrupted or conflicting (mechanism 1)
    def flagged(zs: list[list[float]], layers: range) -> dict[tuple[int, int], tuple[float, str]]:
        out: dict[tuple[int, int], tuple[float, str]] = {}
        for l in layers:
            for h in range(H):
                ent, z, cos = d.entropy_change[l][h], zs[l][h], d.head_cosine[l][h]
                parts = []
                if finite(ent) and ent > p.entropy_increase_bits:
                    parts.append(f"attention entropy +{ent:.2f} bits > {p.entropy_increase_bits}")
                if finite(z) and z > p.weight_z:
                    parts.append(f"Q/K weight-change z {z:.2f} > {p.weight_z}")
                if finite(cos) and cos < p.head_conflict_cosine and finite(z) and z > p.conflict_z:
                    parts.append(f"Q/K gradient cosine {cos:+.2f} < {p.head_conflict_cosine} and z {z:.2f} > {p.conflict_z}")
                if parts:
                    sev = max(
                        ent / p.entropy_increase_bits if finite(ent) and p.entropy_increase_bits else 0.0,
                        z / p.weight_z if finite(z) and p.weight_z else 0.0,
                    )
                    out[(l, h)] = (sev, "; ".join(parts))
        return out

    whole = flagged(d.weight_z, range(L))

    # ---- bottom blocks (spurious forgetting)
    cap = max(0, min(L - 1, int(math.floor(p.max_freeze_bottom_fraction * L))))
    n = min(p.min_freeze_bottom, cap)
    if n:
        reasons.append(
            f"freeze the bottom {n} block(s)" + (" + embeddings" if p.freeze_embeddings else "")
            + f": task alignment lives in the bottom layers (spurious-forgetting study; policy.min_freeze_bottom={p.min_freeze_bottom})"
        )
    if freeze_bottom is not None:
        n = max(0, min(int(freeze_bottom), L - 1))
        reasons = [f"freeze the bottom {n} block(s)" + (" + embeddings" if n and p.freeze_embeddings else "")]
    elif finite(d.global_cosine) and d.global_cosine > p.similar_task_cosine and min(p.similar_task_freeze_bottom, cap) > n:
        n = min(p.similar_task_freeze_bottom, cap)
        reasons.append(f"tasks are similar (global gradient cosine {d.global_cosine:+.3f} > {p.similar_task_cosine}): freeze {n} bottom blocks (similar formats benefit from more)")
    while freeze_bottom is None and n < cap:
        frac = sum(1 for (l, _h) in whole if l == n) / H
        if frac == 0 or frac < p.bottom_head_fraction:
            break
        reasons.append(f"block {n}: {frac:.0%} of its heads disrupted (≥ {p.bottom_head_fraction:.0%}): freeze it with the bottom blocks")
        n += 1
    covered = sorted(k for k in whole if k[0] < n)
    if covered:
        reasons.append(f"heads {covered} (block, head) are flagged but inside the frozen bottom blocks")

    # ---- heads above the frozen blocks: weight z re-scored among the heads that will train
    zs = d.weight_z
    dist = [v for l in range(n, L) for v in d.weight_distance[l]]
    if n > 0 and dist and all(finite(v) for v in dist):
        t = torch.tensor(dist, dtype=torch.float64)
        std = float(t.std(unbiased=False))
        zt = ((t - t.mean()) / std if std > 0 else torch.zeros_like(t)).view(L - n, H).tolist()
        zs = [[0.0] * H for _ in range(n)] + zt
    above = flagged(zs, range(n, L))
    order = sorted(above, key=lambda k: -above[k][0])
    budget = int(math.floor(p.max_frozen_head_fraction * H * (L - n))) if protect else 0
    chosen, dropped = order[:budget], order[budget:]
    freeze_heads: dict[int, list[int]] = {}
    for l, h in sorted(chosen):
        freeze_heads.setdefault(l, []).append(h)
        reasons.append(f"freeze Q/K of head {h} in block {l}: {above[(l, h)][1]}" + (f" (z among blocks ≥ {n})" if n else ""))
    if dropped and protect:
        reasons.append(f"{len(dropped)} less severe flagged heads not frozen (cap policy.max_frozen_head_fraction={p.max_frozen_head_fraction}): {sorted(dropped)}")

    # ---- LRCP on drifting blocks (mechanism 2)
    lrcp: list[str] = []
    mm = model_map(model)
    cands = _candidates(model)
    for b in mm.blocks:
        i = b.index
        if i < n or i >= L or not protect:
            continue
        cka = d.cka[i]
        if not finite(cka) or 1.0 - cka < p.cka_drop_lrcp:
            continue
        mods = [c for pre in mm.mlp_module_names(b) for c in cands if c.startswith(pre + ".")]
        what = "FFN"
        if finite(d.global_cosine) and d.global_cosine < p.global_conflict_cosine:
            for att in mm.attention(b):
                mods += [s.module_name for s in (att.q, att.k, att.v, att.o)]
            what = "FFN + attention (strong interference)"
        mods = [m for m in dict.fromkeys(mods) if m in cands]
        if mods:
            lrcp += mods
            reasons.append(f"LRCP on block {i} {what}: CKA drop {1 - cka:.3f} ≥ {p.cka_drop_lrcp} on old-task inputs after the probe")
    lrcp = list(dict.fromkeys(lrcp))

    # ---- curvature (mechanism 3)
    ratio = d.lambda_ratio
    curvature = ratio is not None and ratio < p.lambda_ratio
    if curvature:
        reasons.append(f"curvature protection: old-task λ_max {d.lambda_before:.3g} → {d.lambda_after:.3g} (ratio {ratio:.2f} < {p.lambda_ratio}): the landscape is flattening")
    elif ratio is None and p.compute_curvature:
        reasons.append("no curvature decision: λ_max unavailable (see notes)")
    if not (freeze_heads or lrcp or curvature) and n == 0:
        reasons.append("no mechanism crossed its threshold: train as usual")
    return {
        "freeze_bottom": n,
        "freeze_embeddings": p.freeze_embeddings and (n > 0),
        "freeze_heads": freeze_heads,
        "lrcp_targets": lrcp,
        "curvature": curvature,
        "curvature_strength": p.curvature_strength if curvature else 0.0,
        "ewc_scale": 0.0,
        "reasons": reasons,
    }


#: Default probe budget of :func:`plan`, in probes of ``probe_steps`` steps: the diagnosis probe,
#: the timing step and the verification probes together take at most this many times
#: ``probe_steps`` AdamW steps (240 at the default 20: a small fraction of a new task's training).
DEFAULT_BUDGET_PROBES = 12

#: Default wall-clock budget of :func:`plan`, in seconds: nine minutes, whatever the model. A
#: small model never reaches it (a 24-block model of width 32 plans in about a minute on two CPU
#: cores); on a slow one (SmolLM2-135M on a CPU, ~7 s per probe step) it is what keeps planning
#: to minutes: λ_max is skipped when its Lanczos runs would take more than a third of it and the
#: verification probes are fitted to what is left after the diagnosis.
DEFAULT_BUDGET_S = 540.0


def plan(
    model: nn.Module,
    old_batches: Iterable[Batch],
    new_batches: Iterable[Batch],
    loss_fn: LossFn | None = None,
    *,
    probe_steps: int = 20,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    policy: PlanPolicy | None = None,
    calibration: Sequence[tuple[float, float]] | None = None,
    seed: int = 0,
    budget_steps: int | None = None,
    budget_s: float | None = DEFAULT_BUDGET_S,
    progress: bool = True,
) -> MitigationPlan:
    """Diagnose forgetting with a short probe of the new task and plan the mitigation, within a
    budget.

    Runs :func:`diagnose` (gradient alignment, a ``probe_steps``-step AdamW probe on a deep copy,
    disrupted heads, CKA drift, λ_max before/after), applies the rules of ``policy`` (see the
    module docstring), verifies the candidates they propose by probing each on a copy
    (``policy.verify``) and forecasts forgetting from the early gradient cosine
    (:func:`forecast_forgetting`). ``model`` is not modified (modes and ``.grad`` restored); the
    deep copy needs one extra model and its AdamW state in memory for the probe. The global RNG
    streams (CPU and the model's CUDA devices) are left as they were.

    **Budget.** Every AdamW step plan() takes counts: one timing step, the diagnosis probe
    (``probe_steps``) and each verification probe (``probe_steps``); their total never exceeds
    ``budget_steps``. The candidates are fitted to it up front, in this order: bottom-freeze
    depths on a coarse grid (``policy.max_depths``), EWC anchors on the best structure only
    (``ewc_on="auto"``), fewer EWC strengths (the extreme ones dropped first), then the deepest
    structures dropped — each said in the plan's reasons. Before the diagnosis one probe step is
    timed and the estimated wall time is logged (INFO, ``mitigate.planning``) with the candidate
    count. ``budget_s`` (default :data:`DEFAULT_BUDGET_S` = 540 s) bounds the wall time too:
    λ_max is not measured when its two Lanczos runs (at most ``4 · lambda_max_iter ·
    lambda_batches`` step-equivalents: an HVP costs about two steps) would take more than a third
    of it; after the diagnosis the verification probes are fitted to the time left (at the
    probe's measured step time), and a probe that would end past the budget is not started. Each
    cut is said in the plan's reasons (``plan budget: ...``).

    **Noise.** The unmitigated probe's old-task loss, per held-out old example, gives the probe's
    noise; a candidate beats a simpler one only by more than ``policy.noise_z`` standard errors
    of their paired per-example difference, else the simpler one is kept (the reasons say so).

    Args:
        model: the model as trained on the old task (eager attention for λ_max and entropies).
        old_batches: old-task batches (kept by reference for :meth:`MitigationPlan.apply`).
        new_batches: a few new-task batches for the probe and the gradient alignment.
        loss_fn: ``loss_fn(model, batch) -> scalar`` for both tasks; default ``model(**batch).loss``.
        probe_steps: AdamW steps of each probe.
        lr: probe learning rate (use the new task's).
        weight_decay: probe weight decay.
        policy: decision thresholds (:class:`PlanPolicy`).
        calibration: ``[(early cosine, forgetting), ...]`` to fit the forecast (else the prior).
        seed: seeds the probe, λ_max and the forecast bootstrap.
        budget_steps: most AdamW probe steps in all (default
            ``DEFAULT_BUDGET_PROBES · probe_steps`` = 240: 1 timing step + the diagnosis probe +
            10 verification probes). Must cover the timing step and the diagnosis probe.
        budget_s: wall-clock budget in seconds for the whole plan (default 540; ``None``: no
            time limit, only ``budget_steps``). See **Budget** above.
        progress: show a tqdm bar over the verification probes (``False`` to hide it).

    Returns:
        :class:`MitigationPlan` (``print(plan)`` for the table, ``plan.to_dict()`` for JSON,
        ``plan.apply(model, optimizer)`` to act on it).

    Raises:
        ValueError: empty batches, bad probe settings, budget or policy, a multi-stack model, or
            a bad calibration set.
    """
    import time

    policy = policy or PlanPolicy()
    if isinstance(probe_steps, bool) or not isinstance(probe_steps, int) or probe_steps < 1:
        raise ValueError(f"probe_steps={probe_steps!r} must be a positive int (a few dozen is typical)")
    if budget_steps is None:
        budget_steps = DEFAULT_BUDGET_PROBES * probe_steps
    if isinstance(budget_steps, bool) or not isinstance(budget_steps, int) or budget_steps < probe_steps + 1:
        raise ValueError(
            f"budget_steps={budget_steps!r} must be an int ≥ probe_steps + 1 = {probe_steps + 1} (one timing step and "
            f"the diagnosis probe); e.g. {DEFAULT_BUDGET_PROBES * probe_steps} for {DEFAULT_BUDGET_PROBES - 1} probes"
        )
    if budget_s is not None and not (isinstance(budget_s, (int, float)) and not isinstance(budget_s, bool) and budget_s > 0 and math.isfinite(budget_s)):
        raise ValueError(f"budget_s={budget_s!r} must be a positive number of seconds, or None for no time limit")
    old_batches = list(old_batches)
    new_batches = list(new_batches)
    if not old_batches or not new_batches:
        raise ValueError("plan() needs non-empty old_batches and new_batches (lists of batches)")
    candidates: list[Candidate] = []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=_cuda_devices(model)):  # the caller's RNG streams stay put
        loss = resolve_loss_fn(loss_fn)
        t0 = time.perf_counter()
        _probe(model, new_batches, loss, 1, lr, weight_decay, seed)  # time one probe step (on a copy)
        step_s = time.perf_counter() - t0
        n_verify = (budget_steps - 1 - probe_steps) // probe_steps if policy.verify else 0
        db = policy.diagnostic_batches or len(old_batches)
        diag_steps = probe_steps + 2 * db
        lanczos_steps = 4 * policy.lambda_max_iter * policy.lambda_batches  # two runs, an HVP ≈ 2 steps per batch
        notes: list[str] = []
        if policy.compute_curvature and budget_s is not None and step_s * lanczos_steps > budget_s / 3:
            notes.append(
                f"λ_max not measured: its two Lanczos runs (≤ {lanczos_steps} step-equivalents ≈ {step_s * lanczos_steps:.0f} s) "
                f"would take more than a third of budget_s={budget_s:g} s, so the curvature rule did not run"
            )
            policy = replace(policy, compute_curvature=False)
        if policy.compute_curvature:
            diag_steps += lanczos_steps
        if budget_s is not None and policy.verify:
            fit = int(max(0.0, budget_s - step_s * (1 + diag_steps)) // (step_s * probe_steps))
            if fit < n_verify:
                notes.append(f"{fit} verification probes of {probe_steps} steps fit in budget_s={budget_s:g} s at {step_s:.3g} s per step (budget_steps allows {n_verify})")
                n_verify = fit
        logger.info(
            "mitigate.plan: diagnosis (%d-step probe%s) + up to %d verification probes of %d steps; one probe step "
            "took %.3g s: ≈ %.0f s in all (budget %d steps%s)",
            probe_steps, ", λ_max" if policy.compute_curvature else "", n_verify, probe_steps, step_s,
            step_s * (diag_steps + n_verify * probe_steps), budget_steps,
            "" if budget_s is None else f", {budget_s:g} s",
        )
        diag = diagnose(model, old_batches, new_batches, loss_fn, probe_steps=probe_steps, lr=lr, weight_decay=weight_decay, policy=policy, seed=seed, progress=progress)
        dec = decide(diag, model, policy)
        if policy.verify:
            deadline = None if budget_s is None else start + float(budget_s)
            if deadline is not None:  # refit to the time left, at the step time the diagnosis probe measured
                per_probe = step_s * probe_steps
                fit = int(max(0.0, deadline - time.perf_counter()) // per_probe)
                if fit < n_verify:
                    notes.append(f"{fit} verification probes fit in the {max(0.0, deadline - time.perf_counter()):.0f} s left after the diagnosis")
                    n_verify = fit
            dec, candidates = _verify(
                model, diag, dec, old_batches, new_batches, loss_fn, policy, probe_steps, lr, weight_decay, seed,
                progress, max_probes=n_verify, deadline=deadline,
            )
        dec["reasons"] = [*(f"plan budget: {n}" for n in notes), *dec["reasons"]]
    forecast = forecast_forgetting(diag.global_cosine if math.isfinite(diag.global_cosine) else 0.0, calibration, seed=seed)
    logger.info("mitigate.plan: %s%s (%.1f s)", _candidate_name(dec), " + curvature" if dec["curvature"] else "", time.perf_counter() - start)
    return MitigationPlan(
        forecast=forecast, diagnosis=diag, policy=policy, candidates=candidates, old_batches=old_batches,
        loss_fn=loss_fn, **dec,
    )


def _candidate_name(dec: dict[str, Any]) -> str:
    parts = [f"freeze {dec['freeze_bottom']}" + ("+emb" if dec["freeze_embeddings"] else "")]
    if dec["freeze_heads"]:
        parts.append(f"{sum(len(v) for v in dec['freeze_heads'].values())} heads")
    if dec["lrcp_targets"]:
        parts.append(f"LRCP×{len(dec['lrcp_targets'])}")
    if dec.get("ewc_scale"):
        parts.append(f"EWC {dec['ewc_scale']:g}")
    return " + ".join(parts)


def select_candidate(
    candidates: list[Candidate],
    baseline_old_increase: float,
    baseline_new_decrease: float,
    policy: PlanPolicy,
    example_loss: Sequence[Sequence[float] | None] | None = None,
) -> int:
    """Index of the candidate :func:`plan` keeps (see ``PlanPolicy.verify``).

    Eligible: ``new_loss_decrease ≥ min_plasticity · baseline_new_decrease`` (all, when the
    baseline did not learn or none is eligible). Best ``b``: least ``old_loss_increase``; ties
    within ``verify_tolerance · |baseline_old_increase|`` go to the earliest (simplest)
    candidate. With ``example_loss`` (each candidate's per-example old-task loss after its probe,
    the same examples in the same order; ``None`` where unknown), an earlier eligible candidate
    ``j`` is also kept instead of ``b`` when ``mean(ℓ_j − ℓ_b) ≤ noise_z · SE(ℓ_j − ℓ_b)``: the
    advantage of ``b`` is within the probe's noise.

    Raises:
        ValueError: no candidates.
    """
    if not candidates:
        raise ValueError("select_candidate needs at least one candidate")
    eligible = [i for i, c in enumerate(candidates) if baseline_new_decrease <= 0 or c.new_loss_decrease >= policy.min_plasticity * baseline_new_decrease]
    if not eligible:
        eligible = list(range(len(candidates)))
    best = min(candidates[i].old_loss_increase for i in eligible)
    tol = policy.verify_tolerance * abs(baseline_old_increase)
    b = next(i for i in eligible if candidates[i].old_loss_increase <= best + tol)
    if example_loss is None or policy.noise_z == 0 or example_loss[b] is None:
        return b
    for j in eligible:
        if j >= b:
            break
        if example_loss[j] is None:
            continue
        gap, se = _paired_gap(list(example_loss[j]), list(example_loss[b]))
        if se > 0 and gap <= policy.noise_z * se:
            return j
    return b


def _depth_grid(lo: int, cap: int, max_depths: int) -> list[int]:
    """Bottom-freeze depths to probe: all of ``lo..cap`` when at most ``max_depths``, else
    ``lo``, ``cap`` and the halvings of ``cap`` (``cap/2``, ``cap/4``, …) above ``lo``, at most
    ``max_depths`` of them (``{0, L/8, L/4, L/2}`` for ``cap = L/2``)."""
    if cap - lo + 1 <= max_depths:
        return list(range(lo, cap + 1))
    grid = {lo}
    d = float(cap)
    while len(grid) < max_depths and int(d) > lo:
        grid.add(int(d))
        d /= 2
    return sorted(grid)


def _thin(scales: tuple[float, ...], k: int) -> tuple[float, ...]:
    """``k`` of ``scales``, dropping from the two ends alternately (largest first)."""
    s = list(scales)
    end = True
    while len(s) > k:
        s.pop(-1 if end else 0)
        end = not end
    return tuple(s)


def _verify(
    model: nn.Module,
    diag: Diagnosis,
    proposed: dict[str, Any],
    old_batches: list[Batch],
    new_batches: list[Batch],
    loss_fn: LossFn | None,
    policy: PlanPolicy,
    probe_steps: int,
    lr: float,
    weight_decay: float,
    seed: int,
    progress: bool = True,
    *,
    max_probes: int | None = None,
    deadline: float | None = None,
) -> tuple[dict[str, Any], list[Candidate]]:
    """Probe the candidates on copies, at most ``max_probes`` probes and until ``deadline``
    (``time.perf_counter()``), curvature left out of the probes (it is decided by its own rule),
    and keep the best one (:func:`select_candidate`, with the probe-noise refusal)."""
    import time

    loss = resolve_loss_fn(loss_fn)
    k = policy.diagnostic_batches
    old_d, new_d = old_batches[:k], new_batches[:k]
    old_examples = _examples(old_d)
    L = diag.num_layers
    cap = max(0, min(L - 1, int(math.floor(policy.max_freeze_bottom_fraction * L))))
    depths = _depth_grid(min(policy.min_freeze_bottom, cap), cap, policy.max_depths)
    budget_notes: list[str] = []
    if len(depths) < cap - min(policy.min_freeze_bottom, cap) + 1:
        budget_notes.append(f"bottom-freeze depths probed on a coarse grid {depths} (policy.max_depths={policy.max_depths})")

    def key(d: dict[str, Any]) -> tuple[Any, ...]:
        return (d["freeze_bottom"], d["freeze_embeddings"], json.dumps(d["freeze_heads"], sort_keys=True), tuple(d["lrcp_targets"]), d["ewc_scale"])

    def free(d: dict[str, Any]) -> bool:  # the unmitigated candidate: the diagnosis probe itself
        return not (d["freeze_bottom"] or d["freeze_heads"] or d["lrcp_targets"] or d["ewc_scale"])

    decs: list[dict[str, Any]] = []
    for n in depths:
        for protect in (False, True):
            dec = {**decide(diag, model, policy, freeze_bottom=n, protect=protect), "ewc_scale": 0.0}
            if all(key(dec) != key(d) for d in decs):
                decs.append(dec)
    if diag.old_loss is None or diag.new_loss is None:
        raise ValueError("verification needs the old/new losses measured by diagnose()")
    base_old = diag.old_loss[1] - diag.old_loss[0]
    base_new = diag.new_loss[0] - diag.new_loss[1]

    # ---- fit the candidates to the probe budget
    limit = len(decs) + 10**9 if max_probes is None else max_probes
    scales, ewc_on = policy.ewc_scales, policy.ewc_on
    cost = lambda ds, sc, on: sum(not free(d) for d in ds) + len(sc) * (len(ds) if on == "every" else 1)  # noqa: E731
    if ewc_on == "auto":
        ewc_on = "every" if cost(decs, scales, "every") <= limit else "best"
        if ewc_on == "best" and scales:
            budget_notes.append("EWC anchor strengths probed on the best structure only (ewc_on='auto': 'every' exceeds the budget)")
    if scales and cost(decs, scales, ewc_on) > limit:
        keep = max(1, min(len(scales), limit - cost(decs, (), ewc_on)) // (len(decs) if ewc_on == "every" else 1))
        thinned = _thin(scales, keep)
        if thinned != scales:
            budget_notes.append(f"EWC strengths {list(thinned)} of {list(scales)} (budget)")
            scales = thinned
    dropped = []
    while len(decs) > 1 and cost(decs, scales, ewc_on) > limit:
        dropped.append(_candidate_name(decs.pop()))
    if scales and cost(decs, scales, ewc_on) > limit:
        budget_notes.append(f"no EWC anchor probed (budget of {limit} probes)")
        scales = ()
    if dropped:
        budget_notes.append(f"structures {dropped[::-1]} not probed (budget of {limit} probes)")

    examples: list[list[float] | None] = []

    def measure(dec: dict[str, Any], fisher_cache: dict[str, Any] | None = None) -> Candidate:
        if free(dec):
            old_inc, new_dec = base_old, base_new  # the unmitigated probe: already measured
            examples.append(list(diag.old_example_loss[1]) if diag.old_example_loss else None)
        else:
            trial = MitigationPlan(
                forecast=forecast_forgetting(0.0), diagnosis=diag, policy=policy, old_batches=old_batches,
                loss_fn=loss_fn, _fisher_cache=fisher_cache, **{**dec, "curvature": False, "curvature_strength": 0.0},
            )
            prepare = lambda m, o, trial=trial: (lambda a: (a.optimizer, a.penalty))(trial.apply(m, o))  # noqa: E731
            probed, _ = _probe(model, new_batches, loss, probe_steps, lr, weight_decay, seed, prepare=prepare)
            old_inc = _eval_loss(probed, old_d, loss) - diag.old_loss[0]
            new_dec = diag.new_loss[0] - _eval_loss(probed, new_d, loss)
            examples.append(_example_losses(probed, old_examples, loss) if diag.old_example_loss else None)
            del probed
        return Candidate(_candidate_name(dec), dec["freeze_bottom"], bool(dec["freeze_heads"] or dec["lrcp_targets"]), old_inc, new_dec, ewc_scale=dec["ewc_scale"])

    from mitigate._utils import progress_bar

    total = cost(decs, scales, ewc_on)
    logger.info("mitigate.plan: verifying %d candidates (%d probes of %d steps)", len(decs) + len(scales) * (len(decs) if ewc_on == "every" else 1), total, probe_steps)
    timed: list[float] = []
    stopped: list[str] = []

    def run(dec: dict[str, Any], bar: Any, cache: dict[str, Any] | None = None) -> bool:
        if not free(dec) and deadline is not None and timed and time.perf_counter() + max(timed) > deadline:
            stopped.append(_candidate_name(dec))
            return False
        t0 = time.perf_counter()
        cands.append(measure(dec, cache))
        if not free(dec):
            timed.append(time.perf_counter() - t0)
            bar.update()
        return True

    with progress_bar(total=total, desc="plan: verify", enabled=progress, leave=False) as bar:
        cands: list[Candidate] = []
        probed_decs: list[dict[str, Any]] = []
        for dec in decs:
            if run(dec, bar):
                probed_decs.append(dec)
        decs = probed_decs
        # the EWC anchor strengths on top of every structure, or of the best one only
        bases = [decs[select_candidate(cands, base_old, base_new, policy, examples)]] if ewc_on == "best" else list(decs)
        for base in bases:
            cache: dict[str, Any] = {}  # the same structure and weights: one Fisher for every strength
            for scale in scales:
                dec = {**base, "ewc_scale": scale}
                if run(dec, bar, cache):
                    decs.append(dec)
    if stopped:
        budget_notes.append(f"{len(stopped)} candidates not probed: budget_s reached ({stopped})")
    strict = select_candidate(cands, base_old, base_new, policy)
    i = select_candidate(cands, base_old, base_new, policy, examples)
    cands[i].chosen = True
    chosen = dict(decs[i])
    chosen["curvature"], chosen["curvature_strength"] = proposed["curvature"], proposed["curvature_strength"]
    c = cands[i]
    reasons = [
        f"verified by probing {len(cands)} candidates ({probe_steps} steps each): '{c.name}' raises the old-task "
        f"loss by {c.old_loss_increase:+.4f} (unmitigated {base_old:+.4f}) and lowers the new-task loss by "
        f"{c.new_loss_decrease:+.4f} (unmitigated {base_new:+.4f}; required ≥ {policy.min_plasticity:.0%} of it)",
    ]
    if i != strict:
        gap, se = _paired_gap(examples[i], examples[strict])  # type: ignore[arg-type]
        reasons.append(
            f"probe noise: '{cands[strict].name}' loses {gap:.4f} less old-task loss than the simpler '{c.name}', within "
            f"{policy.noise_z:g} standard errors of the paired per-example difference (SE {se:.4f}, "
            f"{len(old_examples)} old examples): not a real difference, keeping the simpler candidate"
        )
    elif diag.old_example_loss:
        _gap, se = _paired_gap(list(diag.old_example_loss[1]), list(diag.old_example_loss[0]))
        reasons.append(
            f"probe noise: the unmitigated probe's old-task loss increase has SE {se:.4f} over {len(old_examples)} old "
            f"examples; the chosen candidate is ahead of every simpler one by more than {policy.noise_z:g} paired SE"
            if i else f"probe noise: SE {se:.4f} of the old-task loss increase over {len(old_examples)} old examples"
        )
    chosen["reasons"] = [*reasons, *(f"plan budget: {n}" for n in budget_notes), *chosen["reasons"]]
    return chosen, cands
