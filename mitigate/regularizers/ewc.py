"""Elastic Weight Consolidation (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in
neural networks"), with the online variant of Schwarz et al. 2018 ("Progress & Compress").

After task ``t`` the diagonal Fisher ``F_t`` is estimated at ``θ*_t`` and the penalty

    ewc(θ) = (λ/2) Σ_t Σ_i F_{t,i} (θ_i − θ*_{t,i})²

is added to the loss of later tasks.

**Strength: calibrated per task on the next task (the default).** ``EWC(model)`` gives every
finished task ``t`` its own

    λ_t = balance · mean(g²) / mean(F_t)²        (balance = 3e-3)

where ``F_t`` is that task's Fisher and ``g`` the *next* task's minibatch loss gradient at
``θ*_t``, measured on the first ``calibration_batches`` (4) batches that ``ewc(batch)`` gets after
the consolidation (:meth:`EWC.calibrate` fixes it on batches you choose); both means run over the
elements of the selected parameters, and the gradient is evaluated at the stored anchor with
``torch.func.functional_call`` (the live parameters are not touched; one extra forward and
backward per measured batch, in eval mode, so a ``GradScaler`` or the loss scaling of gradient
accumulation in your loop does not change it). The batch *size* does: ``mean(g²)`` includes the
gradient noise ``tr(Σ)/B``, so ``λ_t`` grows as the calibration batches shrink (about 2× from 8 to
2 rows per batch on the tests' tiny model). Under DDP the gradient is the global batch's (averaged
over ranks before squaring); under gradient accumulation each micro-batch is one calibration
batch, so pass the batches you would call a step's batch, or call :meth:`EWC.calibrate` on them. Equivalently ``λ_t = scale_t / mean(F_t)`` with ``scale_t = balance · mean(g²) /
mean(F_t)``: the penalty is stiffer the harder the new task pulls against how little the old
task's per-sample gradients moved at its optimum. The penalty is ``½ Σ_t λ_t Σ_i F_{t,i} (θ_i −
θ*_{t,i})²``.

*Why.* A fixed strength relative to the Fisher, ``λ = scale / mean(F̄)``, does not transfer
(``benchmarks/ewc_scales.py``, docs/BENCHMARKS.md): the scale that keeps the most of the old task
at ≥ 90 % of the new task spans five decades, 10–1000 for full fine-tuning of the unit tests'
memorised fact-recall models and 0.01 on the biography benchmark, where ``scale=100`` stops the
new task (6 % against 85 %). The ratio ``mean(g²) / mean(F_t)`` (2e4–3e4 on the fact-recall
models, 2–5 on biography) tracks the good scale. It must be *per task*: one λ for the summed
Fisher ``F̄`` fell ~1000× once Task 1's Fisher (taken while that task was half-learned, 15× Task
0's mean) entered ``mean(F̄)²``, and Task 0 was left unprotected (+1.9 [+0.2, +3.5] points on the
benchmark's test seeds 3–7). ``balance`` was chosen on fact-recall seed 0 (three shapes) and
biography tuning seeds 1000–1001 (1e-2 kept more but cost 15–17 % of the new task there; 1e-3
kept 3–5 points).

*What it did on data that chose nothing.* Biography, test seeds 3–7 (``compare.py --methods
seq,ewc --tuned none --seed-base 3 --seeds 5``): Task 0 **+12.8 [+7.0, +18.6]** points over seq at
94 % of seq's new-task gain (new task −4.6 [−7.4, −1.7]), 1.10× seq's step; the scale the
benchmark tuned (0.01) kept +7.4. Fact-recall seeds 5–6, full fine-tuning: +57, +60 (llama-w32),
−1, +24 (gpt2-w48), +18, +16 (llama-w64) points, every cell at ≥ 100 % of AdamW's new task
(``scale=100``: +38 on average, 4 of 6 cells keep the new task). ``ewc()`` without a batch while
a task waits warns once and uses ``λ_t = 100 / mean(F_t)``.

Other strengths: ``scale=`` gives the fixed relative rule ``λ = scale / mean(F̄)`` over the stored
Fisher (``strength_mode == "relative"``, :func:`relative_strength`, which ``mitigate.plan`` uses
for its EWC anchor; needed with ``online_decay``); ``strength=`` the papers' absolute λ
(``"absolute"``), as in Kirkpatrick et al. Under FSDP2 the calibration gradient is taken at the
current parameters (``functional_call`` does not evaluate a sharded model at another point).

**LoRA is not solved by this Fisher** (EWC warns): the anchor sits at ``B = 0`` where
``∂L/∂A = 0``, so ``F_A = 0`` and ``F_B`` is measured along the initial ``A``. On the fact-recall
testbed (seed 0, 300 LoRA steps) the calibrated default keeps the old task but stops the new one
(new-task accuracy 6 / 21 / 0 % against AdamW's 96 / 88 / 100 % on llama-w32-d2 / gpt2-w48-d3 /
llama-w64-d4; ``scale=100``: 35 / 10 / 42 %). A prototype that anchors the merged update
``ΔW = s·BA`` with the base weight's Fisher (``Σ F_W ⊙ ΔW²``, λ = 1 / mean F_W) kept 64 % / 77 %
on llama-w32-d2, still short of 90 % of AdamW's new task; not in the library. Use
``CurvatureRegularizer`` or ``GradientProjection(mode="pcgrad")`` for adapters.

**Tasks merge exactly.** By default the per-task quadratics are stored as one pair (calibrated
mode: each ``F_t`` weighted by its ``λ_t`` once that is fixed, so ``F̄ = Σ_t λ_t F_t`` and the
newest task waits beside it until its λ is measured):
``Σ_t F_t (θ − θ*_t)² = F̄ (θ − θ̄)² + c`` with ``F̄ = Σ_t F_t``,
``θ̄ = Σ_t F_t θ*_t / F̄`` (``θ*`` of the newest task where ``F̄ = 0``) and the constant
``c = Σ_t Σ_i F_{t,i} (θ*_{t,i} − θ̄_i)²`` (kept, so the value equals the per-task sum), so the
state and the penalty's cost do not grow with the number of tasks. ``keep_tasks=True`` stores
one pair per task instead (``fisher(t)`` / ``anchor(t)`` per task). Online mode
(``online_decay=γ``) keeps one pair, ``F ← γ F_old + F_new`` and ``θ* ← θ*_new``.

Usage (three lines in a training loop)::

    ewc = mitigate.EWC(model)
    ...                                       # train task 0
    ewc.consolidate(task0_batches)            # F and θ* for task 0
    loss = model(**batch).loss + ewc(batch)   # while training task 1 (its first batches set λ_0)

Fisher estimators (``fisher=``):

* ``"empirical"`` (default): ``F = (1/N) Σ_n (∇ℓ_n(θ))²`` over *samples* ``n``, where ``ℓ_n`` is
  the loss of sample ``n`` alone (for a Hugging Face causal LM: the model's token-mean
  cross-entropy over that sample's non-ignored labels). Per-sample gradients are vectorised with
  ``torch.func.vmap(grad(...))`` over the batch dimension; a loop of ``autograd.grad`` per
  sample is the fallback when vmap fails (ops without batching rules, data-dependent control flow).
* ``"true"``: as above, but each sample's labels are *drawn from the model's own predictive
  distribution* ``y ~ softmax(logits)`` (the Fisher information proper). The loss is rebuilt from
  logits, so ``loss_fn`` is not used: pass ``logits_fn(model, batch) -> logits`` to the
  constructor if ``model(**batch_without_labels).logits`` does not fit. Logits ``(B, T, V)`` are
  a causal LM: the label at position ``t+1`` is drawn from the logits at ``t`` for every position
  whose original label is not ``-100`` (or, without ``labels``, whose ``attention_mask`` is 1),
  and ``ℓ_n`` is the token-mean cross-entropy of sample ``n`` over those positions. Logits
  ``(B, C)`` are a classifier: one label per sample.
* ``"batch"``: ``F = Σ_b n_b (∇L_b(θ))² / Σ_b n_b`` with ``L_b`` the minibatch-mean loss: the
  common, biased shortcut (it squares a mean of gradients, so it shrinks with batch size); kept
  for comparison.

Per-sample gradients are taken ``chunk_size`` samples at a time (default 8), so the gradients
held at once are ``chunk_size × (number of selected parameters)`` floats whatever the batch size
(whole-batch vmap of 16 SmolLM2-135M samples reached 8.9 GB). A consolidation that runs longer
than 2 s shows a tqdm bar over its batches (``progress=False`` turns it off).

State lives in registered buffers (``t{task}__fisher__{param}`` and ``t{task}__anchor__{param}``,
dots replaced by ``__``) plus a plain-Python, JSON-compatible ``_extra_state`` (names, shapes,
task count, the strength, its mode and the resulting λ), so ``state_dict()`` round-trips through
``torch.load(weights_only=True)``, :func:`mitigate.save_state` writes it as safetensors, and
``.to(device)`` moves it. Loading a state adopts its strength and mode (the penalty it was
trained with) and warns when they differ from this instance's configuration. The model is *not* a submodule. PEFT models store their trainable (adapter) parameters only.
Under DDP the Fisher sums and sample counts are summed over ranks, so every rank stores the same
``F``.

Under FSDP2 (``fully_shard``; every selected parameter a ``DTensor`` on one 1-D mesh) each rank
stores its own shard of ``F`` and ``θ*`` (the ``state_dict()`` is per rank; it records rank and
world size and refuses to load on another rank). Gradients come from ``backward()``, which FSDP
reduce-scatters as the mean over ranks, so the per-sample estimators let the ranks take turns
(:func:`~mitigate._utils.sharded_per_sample_grads`): each sample of each rank gets its exact
gradient and ``F = (1/N) Σ_n (∇ℓ_n)²`` is over all ``N`` samples of all ranks, as in one
process (every rank then runs ``N`` forward/backward passes). ``"batch"`` squares the gradient
of the *global* batch. ``ewc()`` returns the global penalty on every rank (partial sums
all-reduced — call it on every rank) and adds ``λ F ⊙ (θ − θ*)`` straight into each sharded
``.grad``, outside FSDP's averaging, so the update equals the single-process one.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, vmap

from mitigate._utils import (
    Batch,
    LossFn,
    ParamSelector,
    ShardedByName,
    adopt_state_dict_buffers,
    all_reduce_sum_,
    batch_size_of,
    buffer_key,
    check_shard,
    dist_ready,
    input_grad_hooks_removed,
    is_dtensor,
    live_parameters,
    local_tensor,
    model_device,
    move_batch,
    note_per_sample_memory,
    preserve_state,
    progress_bar,
    resolve_loss_fn,
    select_parameters,
    shard_info,
    shard_like,
    sharded_per_sample_grads,
    sharded_state,
)
from mitigate.curvature import as_batch_list, functional_loss, unwrap_model
from mitigate.errors import StateMismatchError
from mitigate.reports import TaskEndReport

__all__ = ["EWC", "EWCConfig", "relative_strength"]

logger = logging.getLogger(__name__)

FisherKind = Literal["empirical", "true", "batch"]
StrengthMode = Literal["calibrated", "relative", "absolute"]

#: λ_t = _FALLBACK_SCALE / mean(F_t) while a calibrated EWC waits for a batch it was not given
_FALLBACK_SCALE = 100.0
LogitsFn = Callable[[nn.Module, Batch], Tensor]


@dataclass
class EWCConfig:
    """Settings of :class:`EWC` (validated on construction).

    Attributes:
        strength: the papers' absolute λ in ``(λ/2) Σ F (θ − θ*)²`` (≥ 0); ``None`` (default):
            calibrated per task, or relative with ``scale``.
        scale: ``None`` (default: calibrated), or the fixed relative strength
            ``λ = scale / mean(F̄)`` (> 0; see :func:`relative_strength`): 100 kept +38 points on
            full fine-tuning of the fact-recall test shapes but lost the new task in 2 of 6 cells
            and on biography (0.01 there).
        balance: the calibrated ``λ_t = balance · mean(g²) / mean(F_t)²`` (> 0; default 3e-3;
            see the module doc for how it was chosen and what it kept).
        calibration_batches: how many of the next task's first batches given to ``ewc(batch)``
            measure ``mean(g²)`` (≥ 1).
        fisher: ``"empirical"`` (per-sample squared gradients), ``"true"`` (labels sampled from
            the model), or ``"batch"`` (squared minibatch gradients, biased).
        online_decay: ``None`` keeps one ``(F, θ*)`` per task; a γ in ``(0, 1]`` keeps one pair,
            ``F ← γ F_old + F_new`` (online EWC, Schwarz et al. 2018).
        params: which parameters (``None``: all trainable, i.e. only adapters on PEFT models).
        dtype: storage dtype of ``F`` and ``θ*`` (float32 keeps small Fisher entries; the
            penalty is computed in it).
        device: storage device (``None``: the parameters' device).
        eval_mode: estimate the Fisher with dropout off (train/eval flags are restored).
        chunk_size: samples per vmap call for per-sample gradients (``None``: the whole batch
            at once; memory grows with the batch).
        seed: seed of the label sampling for ``fisher="true"``.
        keep_tasks: store one ``(F_t, θ*_t)`` pair per task instead of the exactly merged pair
            (not with ``online_decay``).
        progress: show a tqdm bar over the batches of a consolidation that runs longer than 2 s.
    """

    strength: float | None = None
    scale: float | None = None
    balance: float = 3e-3
    calibration_batches: int = 4
    fisher: FisherKind = "empirical"
    online_decay: float | None = None
    params: ParamSelector = None
    dtype: torch.dtype = torch.float32
    device: str | torch.device | None = None
    eval_mode: bool = True
    chunk_size: int | None = 8
    seed: int = 0
    keep_tasks: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.strength is not None and not (
            isinstance(self.strength, (int, float)) and not isinstance(self.strength, bool)
            and math.isfinite(self.strength) and self.strength >= 0
        ):
            raise ValueError(f"strength={self.strength!r} must be None (scale-free: λ = scale / mean F) or a finite float >= 0")
        if self.scale is not None and not (isinstance(self.scale, (int, float)) and not isinstance(self.scale, bool)
                                           and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale={self.scale!r} must be None (λ calibrated on the next task) or a finite "
                             "float > 0 (λ = scale / mean F), e.g. 100.0")
        if self.strength is not None and self.scale is not None:
            raise ValueError(f"strength={self.strength!r} and scale={self.scale!r} both given: pass strength= for the "
                             "papers' absolute λ or scale= for λ = scale / mean(F), not both")
        if not (isinstance(self.balance, (int, float)) and not isinstance(self.balance, bool)
                and math.isfinite(self.balance) and self.balance > 0):
            raise ValueError(f"balance={self.balance!r} must be a finite float > 0 "
                             "(λ_t = balance · mean(g²) / mean(F_t)²), e.g. 3e-3")
        if isinstance(self.calibration_batches, bool) or not isinstance(self.calibration_batches, int) \
                or self.calibration_batches < 1:
            raise ValueError(f"calibration_batches={self.calibration_batches!r} must be an int >= 1")
        if not isinstance(self.keep_tasks, bool):
            raise ValueError(f"keep_tasks={self.keep_tasks!r} must be a bool")
        if self.keep_tasks and self.online_decay is not None:
            raise ValueError("keep_tasks=True stores one pair per task, online_decay keeps a single decayed pair: pass one of them")
        if not isinstance(self.progress, bool):
            raise ValueError(f"progress={self.progress!r} must be a bool")
        if self.fisher not in ("empirical", "true", "batch"):
            raise ValueError(f"fisher={self.fisher!r} must be 'empirical', 'true' or 'batch'")
        if self.online_decay is not None and not (
            isinstance(self.online_decay, (int, float)) and 0 < self.online_decay <= 1
        ):
            raise ValueError(
                f"online_decay={self.online_decay!r} must be None (one Fisher per task) or in (0, 1]"
            )
        if self.online_decay is not None and self.strength is None and self.scale is None:
            raise ValueError(f"online_decay={self.online_decay!r} keeps one decayed pair, the default calibrated "
                             "strength a λ per task: pass scale= (e.g. 100.0, λ = scale / mean F) or strength= with it")
        if not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ValueError(f"dtype={self.dtype!r} must be a floating torch.dtype, e.g. torch.float32")
        if self.chunk_size is not None and not (isinstance(self.chunk_size, int) and self.chunk_size >= 1):
            raise ValueError(f"chunk_size={self.chunk_size!r} must be None or a positive int")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an int")

    @property
    def strength_mode(self) -> StrengthMode:
        """``"absolute"`` when ``strength`` is given (λ = strength), ``"relative"`` when ``scale``
        is (λ = scale / mean F̄), else ``"calibrated"`` (the default: λ_t = balance · mean(g²) /
        mean(F_t)² per task)."""
        if self.strength is not None:
            return "absolute"
        return "relative" if self.scale is not None else "calibrated"


def relative_strength(scale: float, fisher: Iterable[Tensor], count: int | None = None) -> float:
    """The scale-free EWC strength ``λ = scale / mean(F)``: ``scale · N / Σ_i F_i`` over the
    ``N`` entries of the diagonal Fisher tensors ``fisher``.

    Args:
        scale: the strength relative to the mean Fisher (> 0).
        fisher: the diagonal Fisher tensors (any shapes; summed in float64).
        count: ``N`` if not the total number of entries of ``fisher`` (e.g. summed over shards).

    Returns:
        λ as a float.

    Raises:
        ValueError: the Fisher sums to zero (or is not finite), so no relative λ exists.
    """
    tensors = list(fisher)
    total = sum(float(f.double().sum()) for f in tensors)
    n = sum(f.numel() for f in tensors) if count is None else count
    if not (math.isfinite(total) and total > 0 and n > 0):
        raise ValueError(
            f"the Fisher is zero on every selected parameter (Σ F = {total!r} over {n} entries), so "
            "λ = scale / mean(F) is undefined: do the batches have labels, and do the selected "
            "parameters affect the loss? Pass strength=... for an absolute λ"
        )
    return scale * n / total


class _DiagonalQuadratic(torch.autograd.Function):
    """``½ Σ_j Σ F_j ⊙ (θ_j − θ*_j)²`` with gradient ``F_j ⊙ (θ_j − θ*_j)``, on lists of tensors
    with ``torch._foreach`` ops (no concatenation, one saved tensor per parameter).

    FSDP2 (``sharded=True``): the parameters are ``DTensor`` shards and ``F``, ``θ*`` this rank's
    shards of them. The value is the local partial sum all-reduced over ranks (the global
    penalty, the same on every rank); the gradient of each shard is the local
    ``F ⊙ (θ − θ*)``, returned as a ``DTensor`` so autograd accumulates it straight into the
    sharded ``.grad``. It does not pass through FSDP's reduce-scatter: not averaged over ranks,
    exactly the single-process gradient of the penalty, added to the averaged task gradient.
    """

    @staticmethod
    def forward(ctx: Any, fisher: list[Tensor], anchor: list[Tensor], sharded: bool, *params: Tensor) -> Tensor:  # type: ignore[override]
        dtype = anchor[0].dtype
        local = [local_tensor(p.detach()) for p in params] if sharded else [p.detach() for p in params]
        theta = [p.to(device=a.device, dtype=dtype) for p, a in zip(local, anchor)]
        diff = torch._foreach_sub(theta, anchor)
        fd = torch._foreach_mul(diff, fisher)
        sums = [torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(fd, diff)]  # ⟨F d, d⟩
        ctx.save_for_backward(*fd)
        ctx.param_meta = [(p.dtype, p.device) for p in local]
        ctx.shard_likes = list(params) if sharded else None  # the DTensors the gradients mirror
        value = torch.stack(sums).sum().mul(0.5)
        if sharded and dist.is_initialized():
            dist.all_reduce(value, op=dist.ReduceOp.SUM)  # Σ over shards: the global penalty
        return value.to(local[0].device)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        fd = ctx.saved_tensors
        grads = torch._foreach_mul(list(fd), grad_out.to(fd[0].device))
        out = [g.to(device=dev, dtype=dt) for g, (dt, dev) in zip(grads, ctx.param_meta)]
        if ctx.shard_likes is not None:
            out = [shard_like(g, p) for g, p in zip(out, ctx.shard_likes)]
        return (None, None, None, *out)


def _default_logits(model: nn.Module, batch: Batch) -> Tensor:
    if isinstance(batch, Mapping):
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    else:
        out = model(*batch)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, Tensor):
        raise ValueError("fisher='true' needs logits: pass logits_fn=lambda model, batch: ... to EWC")
    return logits


def _split_sample_dims(batch: Batch, size: int) -> Any:
    """vmap ``in_dims`` for a batch: 0 for tensors whose leading size is the batch size."""
    def dim(v: Any) -> int | None:
        return 0 if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == size else None

    if isinstance(batch, Mapping):
        return {k: dim(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(dim(v) for v in batch)
    return dim(batch)


def _sample(batch: Batch, i: int, size: int) -> Batch:
    """Sample ``i`` of a batch, keeping a batch dimension of 1."""
    return _rows(batch, i, i + 1, size)


def _rows(batch: Batch, lo: int, hi: int, size: int) -> Batch:
    """Samples ``lo:hi`` of a batch (tensors whose leading size is the batch size are cut)."""
    def cut(v: Any) -> Any:
        return v[lo:hi] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == size else v

    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(cut(v) for v in batch)
    return cut(batch)


def _unsqueeze_sample(sample: Batch, dims: Any) -> Batch:
    """Inside vmap: give the per-sample tensors their batch dimension of 1 back."""
    if isinstance(sample, Mapping):
        return {k: v.unsqueeze(0) if dims[k] == 0 else v for k, v in sample.items()}
    if isinstance(sample, (list, tuple)):
        return type(sample)(v.unsqueeze(0) if d == 0 else v for v, d in zip(sample, dims))
    return sample.unsqueeze(0) if dims == 0 else sample


_SAMPLED = "__mitigate_sampled_labels__"
_NO_SAMPLES = (
    "no sample has a label to estimate the Fisher from (with fisher='true' a sample whose labels "
    "are all -100 is left out of N): give the batches non-ignored labels"
)


def _masked_samples(labels: Tensor) -> int:
    """Samples of a ``fisher="true"`` batch with no drawn label (all ``-100``): zero gradient, not
    counted in ``N``. Classifier labels ``(B,)`` are never masked."""
    if labels.dim() < 2:
        return 0
    return int((~(labels[:, 1:] != -100).flatten(1).any(1)).sum())


def _true_fisher_loss(logits_fn: LogitsFn) -> LossFn:
    """Loss of a batch carrying sampled labels under ``_SAMPLED``: token-mean (causal LM, shifted)
    or per-sample (classifier) cross-entropy, computed from ``logits_fn``."""

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        labels = batch[_SAMPLED]
        inputs = {k: v for k, v in batch.items() if k != _SAMPLED}
        logits = logits_fn(model, inputs).float()
        if logits.dim() == 3:
            lg, y = logits[:, :-1], labels[:, 1:]
            nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="sum")
            return nll / (y != -100).sum().clamp_min(1)
        return F.cross_entropy(logits, labels)

    return loss


def _sample_labels(logits: Tensor, batch: Mapping[str, Any], gen: torch.Generator) -> Tensor:
    """Labels drawn from ``softmax(logits)`` (on CPU, from ``gen``), shaped like the targets."""
    probs = torch.softmax(logits.detach().double().cpu(), dim=-1)
    draws = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).reshape(probs.shape[:-1])
    if logits.dim() == 2:
        return draws.to(logits.device)
    # causal LM: position t's logits predict token t+1
    b, t = draws.shape
    if "labels" in batch and isinstance(batch["labels"], Tensor):
        valid = batch["labels"].cpu() != -100
    elif "attention_mask" in batch and isinstance(batch["attention_mask"], Tensor):
        valid = batch["attention_mask"].cpu().bool()
    else:
        valid = torch.ones(b, t, dtype=torch.bool)
    labels = torch.full((b, t), -100, dtype=torch.long)
    labels[:, 1:] = torch.where(valid[:, 1:], draws[:, :-1], torch.tensor(-100))
    return labels.to(logits.device)


class EWC(nn.Module):
    """Elastic Weight Consolidation penalty, an ``nn.Module``: ``ewc()`` returns
    ``(λ/2) Σ_t Σ_i F_{t,i} (θ_i − θ*_{t,i})²`` (differentiable w.r.t. the live parameters), with
    a λ per finished task calibrated on the next task's first batches by default (``λ_t =
    balance · mean(g²) / mean(F_t)²``; pass the batch: ``ewc(batch)``), ``λ = scale / mean(F̄)``
    with ``scale=``, or ``λ = strength`` when given.

    Args:
        model: the model being fine-tuned (DDP is unwrapped; PEFT: trainable parameters only).
            Kept as a plain reference, not a submodule: ``state_dict()`` holds only EWC's state.
        strength: absolute λ (``None``: calibrated, or relative with ``scale=``), see
            :class:`EWCConfig` (as are the other keyword arguments).
        logits_fn: ``logits_fn(model, batch) -> logits`` for ``fisher="true"``; default
            ``model(**batch_without_labels).logits``.
        config: a ready :class:`EWCConfig` instead of the keyword arguments.

    Raises:
        ValueError: invalid settings (see :class:`EWCConfig`).
    """

    #: ``ewc()`` without a batch reads the penalty and changes nothing (the trainer's logging may call it)
    pure_forward = True

    def __init__(
        self,
        model: nn.Module,
        *,
        strength: float | None = None,
        scale: float | None = None,
        balance: float = 3e-3,
        calibration_batches: int = 4,
        fisher: FisherKind = "empirical",
        online_decay: float | None = None,
        params: ParamSelector = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device | None = None,
        eval_mode: bool = True,
        chunk_size: int | None = 8,
        seed: int = 0,
        keep_tasks: bool = False,
        progress: bool = True,
        logits_fn: LogitsFn | None = None,
        config: EWCConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or EWCConfig(
            strength=strength, scale=scale, balance=balance, calibration_batches=calibration_batches, fisher=fisher,
            online_decay=online_decay, params=params, dtype=dtype,
            device=device, eval_mode=eval_mode, chunk_size=chunk_size, seed=seed, keep_tasks=keep_tasks,
            progress=progress,
        )
        object.__setattr__(self, "_model", unwrap_model(model))  # not a submodule
        self.logits_fn: LogitsFn = logits_fn or _default_logits
        self._tasks: list[dict[str, Any]] = []  # per stored pair: {"shapes": {name: shape}}
        self._consolidations = 0
        self._lambda: float | None = self.config.strength  # relative mode: set by consolidate()
        # calibrated mode: mean(F_t) of the newest task, and λ_t per stored pair (None: the newest
        # pair waits for the next task's first batches, see pending_calibration)
        self._fisher_mean: float | None = None
        self._pair_lambdas: list[float | None] = []
        self._cal = [0.0, 0.0, 0]  # calibrated: Σ rows·mean(g²), Σ rows, batches measured for the pending task
        self._task_lambdas: list[float] = []  # calibrated: every fixed λ_t, in task order
        self._warned_pending = False
        self._warned_lora = False
        self._const = 0.0  # c of the merged pair: Σ_t F_t (θ*_t − θ̄)², so the value is the per-task sum
        self._vmap_failed = False
        # FSDP2: name -> sharded (DTensor) parameter, and {rank, world_size} once the stored
        # F / θ* are this rank's shards (the state is then per rank)
        self._sharded_params = ShardedByName()
        self._shard: dict[str, int] | None = None
        # FSDP2: every sharded parameter, recorded while sharded (a calibration keeps their .grad)
        self._fsdp_params = [p for p in self._model.parameters() if is_dtensor(p)]
        if self._fsdp_params:
            self._selected()  # records the sharded parameters while they are sharded

    # ------------------------------------------------------------------ public
    @property
    def model(self) -> nn.Module:
        """The model the penalty anchors (not a submodule)."""
        return self._model

    @property
    def lambda_(self) -> float | None:
        """The λ in use: ``strength``, or ``scale / mean(F̄)`` after a consolidation (``None``
        before one in scale-free mode); calibrated: the newest task's ``λ_t`` (while it is being
        measured, its running value; ``None`` before the first batch measured)."""
        if self.config.strength_mode == "calibrated":
            if self.pending_calibration:
                return self._running_lambda() if self._cal[1] > 0 else None
            return self._task_lambdas[-1] if self._task_lambdas else None
        return self._lambda

    @property
    def task_lambdas(self) -> list[float]:
        """Calibrated mode: ``λ_t`` of every finished task whose λ is fixed, in order (the
        merged pair stores ``Σ_t λ_t F_t``); empty otherwise."""
        return list(self._task_lambdas)

    @property
    def strength_mode(self) -> StrengthMode:
        """``"calibrated"`` (the default: λ_t from the next task's first batches),
        ``"relative"`` (λ = scale / mean F̄) or ``"absolute"`` (λ = strength)."""
        return self.config.strength_mode

    @property
    def num_tasks(self) -> int:
        """Number of consolidations so far (in online mode the stored pairs stay at one)."""
        return self._consolidations

    def fisher(self, task: int = -1) -> dict[str, Tensor]:
        """Stored diagonal Fisher of pair ``task`` (merged or online mode: the only one, ``F̄``), name -> tensor."""
        return self._task_tensors(task, "fisher")

    def anchor(self, task: int = -1) -> dict[str, Tensor]:
        """Stored anchor ``θ*`` of pair ``task`` (merged mode: the Fisher-weighted ``θ̄``), name -> tensor."""
        return self._task_tensors(task, "anchor")

    @torch.no_grad()
    def estimate_fisher(self, batches: Batch | Iterable[Batch], loss_fn: LossFn | None = None) -> dict[str, Tensor]:
        """The diagonal Fisher at the current parameters (nothing stored); see the module doc
        for the three estimators.

        Args:
            batches: one batch (dict) or an iterable of batches.
            loss_fn: ``loss_fn(model, batch) -> scalar`` (``None``: ``model(**batch).loss``);
                for ``"empirical"`` it is applied to one sample at a time (batch dimension 1).
                Not used by ``fisher="true"`` (pass ``logits_fn`` to the constructor).

        Returns:
            name -> Fisher tensor (storage dtype/device); under FSDP2 this rank's shard of it.

        Raises:
            ValueError: no batches, a non-finite loss, ``loss_fn`` with ``fisher="true"``, or (with
                ``fisher="true"``) no sample with a non-ignored label: such samples are left out
                of ``N``.
        """
        cfg = self.config
        if cfg.fisher == "true" and loss_fn is not None:
            raise ValueError(
                "fisher='true' draws labels from the model's logits and rebuilds the loss from them, "
                "so loss_fn is not used; pass logits_fn=... to EWC(...) instead"
            )
        model = self._model
        blist = as_batch_list(batches)
        device = model_device(model)
        with preserve_state(model, mode=False if cfg.eval_mode else None):
            named, sharded = self._selected()
            # FSDP2: Σ over this rank's shard of every parameter (local shapes)
            sums = {n: torch.zeros(local_tensor(p.detach()).shape, dtype=torch.float64 if cfg.dtype == torch.float64 else torch.float32,
                                   device=p.device) for n, p in named.items()}
            count = 0.0
            gen = torch.Generator().manual_seed(cfg.seed + self._consolidations)
            if cfg.fisher != "batch" and not sharded and blist:
                per_sample = sum(p.numel() * p.element_size() for p in named.values())
                note_per_sample_memory("EWC Fisher", per_sample, min(cfg.chunk_size or batch_size_of(blist[0]), batch_size_of(blist[0])), device)
            bar = progress_bar(blist, desc="EWC Fisher", unit="batch", delay=2.0, leave=False, enabled=cfg.progress)
            for batch in bar:
                batch = move_batch(batch, device)
                if cfg.fisher == "batch":
                    accumulate = self._accumulate_batch_sharded if sharded else self._accumulate_batch
                    count += accumulate(named, batch, resolve_loss_fn(loss_fn), sums)
                    continue
                fn = resolve_loss_fn(loss_fn)
                if cfg.fisher == "true":
                    logits = self.logits_fn(model, batch)
                    batch = {**batch, _SAMPLED: _sample_labels(logits, batch, gen)}
                    fn = _true_fisher_loss(self.logits_fn)
                if sharded:
                    count += self._accumulate_per_sample_sharded(named, batch, fn, sums)
                else:
                    count += self._accumulate_per_sample(named, batch, fn, sums)
                if cfg.fisher == "true":  # a sample with no label to draw has a zero gradient: not a sample
                    masked = _masked_samples(batch[_SAMPLED])
                    if sharded and dist.is_initialized():
                        t = torch.tensor([float(masked)], dtype=torch.float64, device=device)
                        dist.all_reduce(t)
                        masked = int(t.item())
                    count -= masked
            if sharded and count <= 0:
                raise ValueError(_NO_SAMPLES)
            if sharded:  # every rank holds its shard of Σ over all ranks' samples; count is global
                return {n: (s / count).to(dtype=cfg.dtype, device=cfg.device if cfg.device is not None else s.device)
                        for n, s in sums.items()}
            flat = torch.cat([s.reshape(-1) for s in sums.values()] + [torch.tensor([count], dtype=next(iter(sums.values())).dtype, device=next(iter(sums.values())).device)])
            all_reduce_sum_(flat)
            total = float(flat[-1])
            if total <= 0:
                raise ValueError(_NO_SAMPLES)
            out, i = {}, 0
            for n, s in sums.items():
                out[n] = (flat[i : i + s.numel()].view_as(s) / total).to(
                    dtype=cfg.dtype, device=cfg.device if cfg.device is not None else s.device
                )
                i += s.numel()
        return out

    def end_task(self, batches: Batch | Iterable[Batch], *, loss_fn: LossFn | None = None, model: nn.Module | None = None) -> TaskEndReport:
        """The task is finished: estimate its Fisher and anchor ``θ*`` (:meth:`consolidate`).

        The one verb every mitigation shares (see :mod:`mitigate.reports`); ``consolidate``
        stays as it was.

        Args:
            batches: the finished task's batches (one dict or an iterable).
            loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``.
            model: accepted for a signature shared with the optimizer wrappers; must be this
                EWC's model (or ``None``).

        Returns:
            :class:`~mitigate.reports.TaskEndReport` with ``strength`` (the λ in use; in the
            calibrated mode a note that it is set on the next task's first batch), the new
            Fisher's ``fisher_mean`` / ``fisher_max`` over ``parameters`` entries, and
            ``stored_pairs``; ``.result`` is :meth:`consolidate`'s Fisher dict.

        Raises:
            ValueError: ``model`` is not this EWC's model; as :meth:`consolidate`.
        """
        from mitigate.reports import run_end_task

        _check_own_model(self.model, model, "EWC")
        task = self._consolidations

        def details(fisher: dict[str, Tensor]) -> dict[str, Any]:
            n = sum(f.numel() for f in fisher.values())
            total = sum(float(f.double().sum()) for f in fisher.values())
            peak = max((float(f.max()) for f in fisher.values() if f.numel()), default=0.0)
            strength: Any = self.lambda_
            if self.pending_calibration:  # calibrated mode: λ_t is set on the next task's first batches
                strength = f"set on the next task's first {self.config.calibration_batches} batches"
            return {"strength": strength, "fisher_mean": total / max(n, 1), "fisher_max": peak, "parameters": n, "stored_pairs": len(self._tasks)}

        return run_end_task("EWC", task, batches, lambda b: self.consolidate(b, loss_fn), details)

    @torch.no_grad()
    def consolidate(
        self, batches: Batch | Iterable[Batch], loss_fn: LossFn | None = None, *, fisher: Mapping[str, Tensor] | None = None
    ) -> dict[str, Tensor]:
        """End of a task: estimate the Fisher at the current parameters and anchor ``θ*`` there.

        By default the new pair merges exactly into the stored one (``F̄ ← F̄ + F``,
        ``θ̄ ← (F̄_old θ̄_old + F θ*) / F̄``, see the module doc); ``keep_tasks=True`` appends a
        pair ``(F_t, θ*_t)``; online mode replaces the pair with ``(γ F_old + F_new, θ*_new)``.
        With ``scale=`` λ is then set to ``scale / mean(F̄)`` over the stored Fisher; in the
        calibrated mode (default) the new pair is stored beside the others and its ``λ_t`` waits
        for the next task's first batches (:attr:`pending_calibration`; ``ewc()`` without a batch
        uses ``100 / mean(F_t)`` until then); a task that was never calibrated is fixed at its
        running value (or that fallback) by the next consolidation.

        Args:
            batches / loss_fn: as :meth:`estimate_fisher`.
            fisher: a Fisher estimate to store instead of estimating one (``batches`` and
                ``loss_fn`` are then unused): the return value of an earlier
                :meth:`estimate_fisher` or :meth:`consolidate` at the same parameters, e.g. to
                anchor several strengths on one estimate. Its names and shapes must be exactly
                the selected parameters'.

        Returns:
            the new task's Fisher estimate (before online decay), name -> tensor.

        Raises:
            ValueError: no batches or a non-finite loss; a ``fisher`` whose names or shapes are
                not the selected parameters'; a calibrated or relative mode with a Fisher that is zero
                everywhere (nothing is stored then).
            StateMismatchError: online mode, when parameters changed shape since the last pair.
        """
        cfg = self.config
        named, sharded = self._selected()
        if fisher is None:
            fisher = self.estimate_fisher(batches, loss_fn)
        else:
            want = {n: tuple(local_tensor(p.detach()).shape) for n, p in named.items()}
            got = {n: tuple(f.shape) for n, f in fisher.items()}
            if got != want:
                raise ValueError(
                    f"fisher= does not match the selected parameters: missing {sorted(set(want) - set(got))}, "
                    f"extra {sorted(set(got) - set(want))}, reshaped "
                    f"{[n for n in want.keys() & got.keys() if want[n] != got[n]]}; pass an estimate from this EWC's "
                    "estimate_fisher() at the same parameters"
                )
            fisher = dict(fisher)
        shard = shard_info() if sharded else None
        if self._tasks and self._shard != shard:
            raise StateMismatchError(
                f"EWC holds F and θ* consolidated with FSDP2 shard {self._shard} (None: unsharded), "
                f"but the model's selected parameters now give {shard}; use a fresh EWC"
            )
        self._shard = shard
        anchor = {n: local_tensor(named[n].detach()).to(dtype=cfg.dtype, device=fisher[n].device).clone() for n in fisher}
        shapes = {n: list(named[n].shape) for n in fisher}  # global shapes (a DTensor's .shape)
        const = self._const
        if cfg.strength_mode == "calibrated":  # the new pair waits on its own for its λ_t
            inv_mean = self._relative_lambda([fisher], sharded, 1.0)  # raises on an all-zero Fisher
            if self.pending_calibration:  # the previous task was never calibrated: fix it as it stands
                self._fix_pending(self._running_lambda())
            self._store(fisher, anchor, shapes)
            self._pair_lambdas.append(None)
            self._fisher_mean, self._cal = 1.0 / inv_mean, [0.0, 0.0, 0]
            self._warned_pending = False  # warn again for this task if it gets no batch
            self._consolidations += 1
            self._warn_lora(named)
            return fisher
        if not cfg.keep_tasks and self._tasks:
            old = self._tasks[0]["shapes"]
            live_parameters(self._model, old, "the stored EWC Fisher")
            old_f, old_a = self.fisher(0), self.anchor(0)
            merged, new_anchor = dict(fisher), dict(anchor)
            if cfg.online_decay is not None:
                for n, f_old in old_f.items():
                    merged[n] = f_old.to(fisher[n].device) * cfg.online_decay + fisher[n] if n in fisher else f_old * cfg.online_decay
                    if n not in anchor:
                        new_anchor[n] = old_a[n].clone()
                const = 0.0
            else:
                const, merged, new_anchor = _merge_pairs(old_f, old_a, fisher, anchor, const, cfg.dtype)
            shapes = {**{n: list(s) for n, s in old.items()}, **shapes}
            pairs = [(merged, new_anchor)]
        else:
            pairs = [(self.fisher(t), self.anchor(t)) for t in range(len(self._tasks))] + [(fisher, anchor)]
        lam = float(cfg.strength) if cfg.strength is not None else \
            self._relative_lambda([p[0] for p in pairs], sharded, float(cfg.scale))  # type: ignore[arg-type]
        # validated: now change the stored state
        if not cfg.keep_tasks and self._tasks:
            self._drop_task_buffers(0)
            self._tasks = []
            self._store(*pairs[0], shapes)
        else:
            self._store(fisher, anchor, shapes)
        self._const = const
        self._lambda = lam
        self._consolidations += 1
        if cfg.strength is None:
            self._warn_lora(named)
        return fisher

    def _warn_lora(self, named: Mapping[str, Any]) -> None:
        if not self._warned_lora and any("lora_" in n for n in named):
            warnings.warn(
                "EWC on LoRA adapters: the Fisher of a fresh adapter is zero for lora_A (B = 0) and taken along the "
                "initial A for lora_B; on the LoRA fact-recall testbed (seeds 5-6) the default calibrated λ let the "
                "new task reach >= 90 % of plain AdamW's accuracy in 1 of 6 cells (scale=100: 0 of 6). Prefer "
                "CurvatureRegularizer(model) or GradientProjection(opt, mode='pcgrad', model=model) for adapters, "
                "or a lower scale=", stacklevel=2)
            self._warned_lora = True

    def _relative_lambda(self, pairs: list[dict[str, Tensor]], sharded: bool, scale: float) -> float:
        """``scale / mean(F̄)`` over the elements of the stored parameters, ``F̄ = Σ`` pairs
        (FSDP2: sums and element counts over all ranks' shards)."""
        total: dict[str, Tensor] = {}
        for f in pairs:
            for n, v in f.items():
                total[n] = v.double() if n not in total else total[n] + v.double().to(total[n].device)
        if sharded and dist.is_initialized():
            dev = next(iter(total.values())).device
            stat = torch.tensor([sum(float(v.sum()) for v in total.values()), float(sum(v.numel() for v in total.values()))],
                                dtype=torch.float64, device=dev)
            dist.all_reduce(stat)
            return relative_strength(scale, [stat[:1]], count=int(stat[1].item()))
        return relative_strength(scale, total.values())

    def calibrate(self, batches: Batch | Iterable[Batch], loss_fn: LossFn | None = None) -> float:
        """Fix the newest task's λ from the next task's gradient (calibrated mode, the default):
        ``λ_t = balance · mean(g²) / mean(F_t)²``.

        ``mean(g²)`` is the mean over the selected parameters' elements of the squared minibatch
        gradient of the new task's loss at the anchor ``θ*_t`` (FSDP2: at the current
        parameters), in eval mode, averaged over ``batches`` and
        any batches ``ewc(batch)`` has already measured for this task (weighted by batch size;
        under DDP over every rank's batches; under FSDP2 the gradient of the global batch);
        ``mean(F_t)`` is the mean of the Fisher of the task consolidated last. Every finished task
        keeps its own ``λ_t``, fixed here (merged storage: ``F̄ = Σ_t λ_t F_t``). ``ewc(batch)``
        measures the first ``calibration_batches`` batches after each :meth:`consolidate` and then
        fixes ``λ_t`` itself; call this to fix it now, on other data.

        Args:
            batches: one batch (dict) or an iterable of batches of the *new* task.
            loss_fn: ``loss_fn(model, batch) -> scalar`` (``None``: ``model(**batch).loss``).

        Returns:
            the newest task's λ.

        Raises:
            ValueError: not in the calibrated mode, nothing waits for a calibration (nothing
                consolidated, or this task's λ is already fixed), no batches, a non-finite loss,
                or a gradient that is zero on every selected parameter (nothing changes then).
        """
        self._check_calibration()
        blist = as_batch_list(batches)
        if not blist:
            raise ValueError("calibrate() got no batches: pass one or more batches of the new task")
        lam = self._calibration_update(blist, loss_fn)
        if lam is None:
            raise ValueError("calibrate(): no usable batch (the loss was not finite on every batch given, e.g. no "
                             "labels) and none measured before; pass batches of the new task with labels")
        self._fix_pending(lam)
        return lam

    def _check_calibration(self) -> None:
        cfg = self.config
        if cfg.strength_mode != "calibrated":
            raise ValueError(f"calibrate() sets λ in the calibrated mode (no strength= or scale=); this EWC has "
                             f"{cfg.strength_mode} strength {cfg.strength if cfg.strength is not None else cfg.scale}")
        if not self.pending_calibration or self._fisher_mean is None:
            raise ValueError("no task waits for a calibration: call consolidate(old_task_batches) first (each "
                             "task's λ is calibrated once, on the batches after its consolidation)")

    def _calibration_update(self, blist: list[Batch], loss_fn: LossFn | None) -> float | None:
        """Add ``blist``'s squared gradients to this task's running ``mean(g²)``; the λ it gives
        (``None`` while no usable batch was measured: a batch whose loss is not finite on some
        rank, e.g. one with every label ``-100``, is skipped on every rank and not counted).

        Always in eval mode (no dropout; Hugging Face models then skip gradient checkpointing,
        whose recomputation would use the live parameters instead of ``θ*_t``).

        Raises:
            ValueError: the usable batches' gradient is zero on every selected parameter.
        """
        model = self._model
        device = model_device(model)
        weighted = rows = 0.0
        used = 0
        with preserve_state(model, mode=False):
            named, sharded = self._selected()
            if sharded:
                # the sharded estimator clears .grad: keep every FSDP-managed parameter's (the
                # root's too, whose live parameters are unsharded copies between forward and backward)
                saved = [(p, p.grad) for p in self._fsdp_params]
                sums = {n: torch.zeros(local_tensor(p.detach()).shape, dtype=torch.float32, device=p.device)
                        for n, p in named.items()}
                count = 0.0
                try:
                    for batch in blist:
                        try:  # at the current parameters: FSDP2 cannot evaluate at θ*_t
                            count += self._accumulate_batch_sharded(named, move_batch(batch, device),
                                                                    resolve_loss_fn(loss_fn), sums)
                            used += 1
                        except ValueError as err:  # non-finite on some rank: every rank raised alike
                            logger.info("EWC calibration: batch skipped (%s)", err)
                finally:
                    for p, g in saved:
                        p.grad = g
                total = sum(float(v.double().sum()) for v in sums.values())
                stat = torch.tensor([total, float(sum(v.numel() for v in sums.values()))], dtype=torch.float64,
                                    device=device)
                if dist.is_initialized():
                    dist.all_reduce(stat)
                weighted, rows = (float(stat[0]) / float(stat[1]), count) if count > 0 else (0.0, 0.0)
            else:
                for batch in blist:
                    part, n_b = self._batch_grad_sq_at_anchor(named, move_batch(batch, device), loss_fn)
                    if n_b > 0:
                        weighted, rows, used = weighted + part, rows + n_b, used + 1
                    else:
                        logger.info("EWC calibration: a batch with a non-finite loss (e.g. no label) was skipped")
        if self._cal[1] + rows <= 0:
            return None
        g2 = (self._cal[0] + weighted) / (self._cal[1] + rows)
        if not (math.isfinite(g2) and g2 > 0):
            raise ValueError(f"the new task's gradient is zero (or not finite: mean g² = {g2!r}) on every selected "
                             "parameter, so λ = balance · mean(g²) / mean(F_t)² is undefined: do the batches have "
                             "labels, and do the selected parameters affect the loss? Pass scale= or strength=")
        self._cal = [self._cal[0] + weighted, self._cal[1] + rows, self._cal[2] + used]
        lam = self._running_lambda()
        logger.info("EWC calibration (%d batches): mean(g²) = %.3e, mean(F_t) = %.3e, λ_t = %.3e (= %.3g / mean(F_t))",
                    int(self._cal[2]), g2, self._fisher_mean, lam, lam * self._fisher_mean)  # type: ignore[operator]
        return lam

    def _batch_grad_sq_at_anchor(self, named: dict[str, nn.Parameter], batch: Batch,
                                 loss_fn: LossFn | None) -> tuple[float, float]:
        """``(n_b · mean_i (∂_i L_b(θ*_t))², n_b)``: the new batch's loss gradient at the newest
        task's anchor ``θ*_t`` (``torch.func.functional_call``; the live parameters are not
        touched), squared and averaged over the selected elements, weighted by the batch size.
        Under DDP the gradient is averaged over ranks before it is squared (the global batch's
        gradient, as DDP's backward gives it) and ``n_b`` is the global batch size, so every rank
        gets the same values. ``(0, 0)`` on every rank when the loss is not finite on any."""
        anchor = self.anchor(-1)
        at = {n: anchor[n].to(dtype=p.dtype, device=p.device).detach().requires_grad_(True) if n in anchor
              else p.detach().requires_grad_(True) for n, p in named.items()}
        n_b = float(batch_size_of(batch))
        with torch.enable_grad():
            loss = functional_loss(self._model, loss_fn)(at, batch)
        bad = not bool(torch.isfinite(loss.detach()).all())
        ddp = dist_ready()
        if ddp:
            flag = torch.tensor([float(bad), n_b], dtype=torch.float64, device=loss.device)
            dist.all_reduce(flag)
            bad, n_b = bool(flag[0] > 0), float(flag[1])
        if bad:
            return 0.0, 0.0
        grads = torch.autograd.grad(loss, list(at.values()), allow_unused=True)
        world = dist.get_world_size() if ddp else 1
        sq = torch.zeros((), dtype=torch.float64, device=loss.device)
        numel = 0
        for g, p in zip(grads, at.values()):
            numel += p.numel()
            if g is None:  # not in the graph, on every rank alike
                continue
            if g.dtype not in (torch.float32, torch.float64):
                g = g.float()  # half precision: reduce and square in float32
            if ddp:
                dist.all_reduce(g)  # a fresh autograd output, reduced in place
                g.div_(world)
            sq += g.double().square().sum()
        return n_b * float(sq) / max(numel, 1), n_b

    def _running_lambda(self) -> float:
        """The pending task's λ now: from the batches measured so far, else ``scale / mean(F_t)``."""
        if self._cal[1] > 0:
            return self.config.balance * (self._cal[0] / self._cal[1]) / self._fisher_mean ** 2  # type: ignore[operator]
        return _FALLBACK_SCALE / self._fisher_mean  # type: ignore[operator]

    def _fix_pending(self, lam: float) -> None:
        """Fix the newest pair's λ; merged storage folds it into pair 0 as ``λ_t F_t``."""
        self._pair_lambdas[-1] = lam
        self._task_lambdas.append(lam)
        self._cal = [0.0, 0.0, 0]
        if self.config.keep_tasks or len(self._tasks) < 2:
            return
        l0, lt = self._pair_lambdas[0], lam
        f0 = {n: f * l0 for n, f in self.fisher(0).items()}
        ft = {n: f * lt for n, f in self.fisher(1).items()}
        const, merged, anchor = _merge_pairs(f0, self.anchor(0), ft, self.anchor(1), self._const * l0, self.config.dtype)
        shapes = {**self._tasks[0]["shapes"], **self._tasks[1]["shapes"]}
        self._drop_task_buffers(1)
        self._drop_task_buffers(0)
        self._tasks = []
        self._store(merged, anchor, shapes)
        self._const, self._pair_lambdas = const, [1.0]

    @property
    def pending_calibration(self) -> bool:
        """Whether the newest task's λ waits for the next task's first batches (calibrated mode,
        after a :meth:`consolidate` and before its calibration is complete)."""
        return bool(self._pair_lambdas) and self._pair_lambdas[-1] is None

    def forward(self, batch: Batch | None = None, loss_fn: LossFn | None = None) -> Tensor:
        """The penalty ``(λ/2) Σ_t Σ_i F_{t,i} (θ_i − θ*_{t,i})²`` at the live parameters
        (merged storage: ``(λ/2) (Σ_i F̄_i (θ_i − θ̄_i)² + c)``, the same value and gradient).

        Args:
            batch: the current batch of the new task. In the calibrated mode (default) the first
                ``calibration_batches`` calls after a :meth:`consolidate` measure the finished
                task's ``λ_t`` on it (one extra forward and backward each, at ``θ*_t``); later
                calls and the other modes ignore it. Without one, a task waiting for its λ uses
                ``100 / mean(F_t)`` and EWC warns once.
            loss_fn: the loss for that calibration (``None``: ``model(**batch).loss``).

        Returns:
            0-d tensor on the model's device, differentiable w.r.t. the parameters (a zero that
            supports ``.backward()`` before any :meth:`consolidate`).

        FSDP2: ``F`` and ``θ*`` are this rank's shards; the value is all-reduced (the global
        penalty on every rank, so call it on every rank, like the forward) and the gradient goes
        straight into the sharded ``.grad`` (see :class:`_DiagonalQuadratic`).

        Raises:
            StateMismatchError: a stored parameter is missing or changed shape (FSDP2: or its
                local shard no longer matches the stored one).
        """
        if not self._tasks:
            return torch.zeros((), device=model_device(self._model), requires_grad=True)
        calibrated = self.config.strength_mode == "calibrated"
        if self.pending_calibration and batch is not None and self._cal[2] < self.config.calibration_batches:
            lam_t = self._calibration_update([batch], loss_fn)
            if lam_t is not None and self._cal[2] >= self.config.calibration_batches:
                self._fix_pending(lam_t)
        elif self.pending_calibration and batch is None and self._cal[2] == 0 and not self._warned_pending:
            warnings.warn(
                "EWC(model) sets each task's λ from the next task's gradient: pass the batch, "
                "loss + ewc(batch), or call ewc.calibrate(batch) once per task; until then λ = "
                f"{_FALLBACK_SCALE:g} / mean(F_t)", stacklevel=2)
            self._warned_pending = True
        total: Tensor | None = None
        sharded = self._shard is not None
        for t, task in enumerate(self._tasks):
            params = live_parameters(self._model, task["shapes"], f"EWC task {t}")
            names = list(task["shapes"])
            fisher = [self._buffers[buffer_key(f"t{t}__fisher__", n)] for n in names]
            anchor = [self._buffers[buffer_key(f"t{t}__anchor__", n)] for n in names]
            if sharded:
                params = self._sharded_live(names, params, fisher)
            val = _DiagonalQuadratic.apply(fisher, anchor, sharded, *params)
            if calibrated:  # each pair its own λ_t (the pending one: its running value)
                lam_t = self._pair_lambdas[t]
                val = val * (self._running_lambda() if lam_t is None else lam_t)
            total = val if total is None else total + val
        assert total is not None
        if calibrated:
            return total + 0.5 * self._const * self._pair_lambdas[0] if self._const else total  # type: ignore[operator]
        assert self._lambda is not None
        if self._const:
            total = total + 0.5 * self._const
        return total * self._lambda

    # ------------------------------------------------------------------ FSDP2
    def _selected(self) -> tuple[dict[str, nn.Parameter], bool]:
        """Selected parameters (FSDP2: the sharded ones) and whether they are sharded."""
        named = select_parameters(self._model, self.config.params)
        # FSDP2 keeps the root's parameters unsharded between forward and backward
        named = {n: self._sharded_params.get(n, p) for n, p in named.items()}
        return named, sharded_state(named.items(), "EWC")

    def _sharded_live(self, names: list[str], params: list[nn.Parameter], fisher: list[Tensor]) -> list[nn.Parameter]:
        """The sharded parameters behind ``params`` (by name), checked against the stored shards."""
        out = []
        for n, p in zip(names, params):
            if not is_dtensor(p) and not self._sharded_params.known(n):  # FSDP2's unsharded copy
                raise RuntimeError(
                    f"EWC: {n!r} is not sharded right now (FSDP2 keeps the root module's "
                    "parameters unsharded between its forward and backward) and EWC has not "
                    "seen it sharded yet: build EWC(model) after fully_shard, or call ewc() "
                    "before the model's forward once"
                )
            out.append(self._sharded_params.get(n, p))
        local = [tuple(local_tensor(p.detach()).shape) for p in out]
        bad = [f"{n} {tuple(f.shape)} -> {s}" for n, f, s in zip(names, fisher, local) if tuple(f.shape) != s]
        if bad:
            raise StateMismatchError(
                f"EWC holds FSDP2 shards that do not match this rank's shards of the parameters: {bad}; "
                "load each rank's own state_dict under the same sharding, or consolidate again"
            )
        return out

    def _accumulate_per_sample_sharded(self, named: dict[str, nn.Parameter], batch: Batch, fn: LossFn, sums: dict[str, Tensor]) -> float:
        """FSDP2 per-sample Fisher: ``Σ_n (∇ℓ_n)²`` over the samples of *every* rank, on this
        rank's shard, from :func:`~mitigate._utils.sharded_per_sample_grads` (the ranks take
        turns, so each sample's gradient is exact; ``N_global`` passes on every rank).

        Returns:
            the number of samples over all ranks.
        """
        n = 0
        for grads in sharded_per_sample_grads(self._model, fn, batch, list(named.values())):
            n += 1
            for s, g in zip(sums.values(), grads):
                if g is not None:
                    s.add_(g.to(s.dtype).square())
        return float(n)

    def _accumulate_batch_sharded(self, named: dict[str, nn.Parameter], batch: Batch, fn: LossFn, sums: dict[str, Tensor]) -> float:
        """FSDP2 ``fisher="batch"``: the gradient of the *global* batch (every rank's shard of it;
        ``backward()`` reduce-scatters the mean over ranks), squared and weighted by the global
        batch size — the single-process estimate on the global batch. Returns that size."""
        plist = list(named.values())
        with torch.enable_grad():
            loss = fn(self._model, batch)
            stat = torch.tensor([float(batch_size_of(batch)), float(not bool(torch.isfinite(loss.detach()).all()))],
                                dtype=torch.float64, device=loss.device)  # NCCL reduces device tensors only
            dist.all_reduce(stat)
            if bool(stat[1] > 0):  # on every rank alike
                raise ValueError("non-finite batch loss on some rank while estimating the Fisher: "
                                 "check the batches and the model's parameters")
            for p in plist:
                p.grad = None
            loss.backward()
        n_b = float(stat[0])
        for s, p in zip(sums.values(), plist):
            if p.grad is not None:
                s.add_(local_tensor(p.grad).to(s.dtype).square(), alpha=n_b)
            p.grad = None
        return n_b

    # ------------------------------------------------------------------ estimation
    def _accumulate_batch(self, named: dict[str, nn.Parameter], batch: Batch, fn: LossFn, sums: dict[str, Tensor]) -> float:
        n_b = float(batch_size_of(batch))
        with torch.enable_grad():
            loss = fn(self._model, batch)
            _check_finite(loss)
            grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
        for (n, s), g in zip(sums.items(), grads):
            if g is not None:
                s.add_(g.to(s.dtype).square(), alpha=n_b)
        return n_b

    def _accumulate_per_sample(self, named: dict[str, nn.Parameter], batch: Batch, fn: LossFn, sums: dict[str, Tensor]) -> float:
        size = batch_size_of(batch)
        if not self._vmap_failed:
            try:
                with input_grad_hooks_removed(self._model):  # gradient checkpointing's hook breaks vmap
                    self._per_sample_vmap(named, batch, fn, sums, size)
                return float(size)
            except ValueError:
                raise
            except Exception as err:  # ops without batching rules, data-dependent control flow
                self._vmap_failed = True
                logger.info("vmap per-sample gradients failed (%s: %s); looping over samples",
                            type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        plist = list(named.values())
        with torch.enable_grad():
            for i in range(size):
                loss = fn(self._model, _sample(batch, i, size))
                _check_finite(loss)
                grads = torch.autograd.grad(loss, plist, allow_unused=True)
                for s, g in zip(sums.values(), grads):
                    if g is not None:
                        s.add_(g.to(s.dtype).square())
        return float(size)

    def _per_sample_vmap(self, named: dict[str, nn.Parameter], batch: Batch, fn: LossFn, sums: dict[str, Tensor], size: int) -> None:
        """``Σ_n g_n²`` over the batch, ``chunk_size`` samples per vmap call (the per-sample
        gradients of one chunk, ``chunk × Σ|θ|`` floats, are the largest thing held)."""
        g = functional_loss(self._model, fn)
        dims = _split_sample_dims(batch, size)
        primals = {n: p.detach() for n, p in named.items()}

        def one(params: dict[str, Tensor], sample: Batch) -> tuple[Tensor, Tensor]:
            loss = g(params, _unsqueeze_sample(sample, dims))
            return loss, loss.detach()

        per_sample = vmap(grad(one, has_aux=True), in_dims=(None, dims))
        step = self.config.chunk_size or size
        for lo in range(0, size, step):
            chunk = _rows(batch, lo, min(lo + step, size), size)
            with torch.enable_grad():
                grads, losses = per_sample(primals, chunk)
            _check_finite(losses)
            for n, s in sums.items():
                s.add_(grads[n].to(s.dtype).square().sum(0))
            del grads

    # ------------------------------------------------------------------ storage
    def _store(self, fisher: dict[str, Tensor], anchor: dict[str, Tensor], shapes: dict[str, list[int]]) -> None:
        t = len(self._tasks)
        for n in fisher:
            self.register_buffer(buffer_key(f"t{t}__fisher__", n), fisher[n].contiguous())
            self.register_buffer(buffer_key(f"t{t}__anchor__", n), anchor[n].contiguous())
        self._tasks.append({"shapes": {n: list(shapes[n]) for n in fisher}})

    def _drop_task_buffers(self, t: int) -> None:
        for n in self._tasks[t]["shapes"]:
            del self._buffers[buffer_key(f"t{t}__fisher__", n)]
            del self._buffers[buffer_key(f"t{t}__anchor__", n)]

    def _task_tensors(self, task: int, kind: str) -> dict[str, Tensor]:
        if not self._tasks:
            raise ValueError("nothing consolidated yet: call consolidate(batches) first")
        t = range(len(self._tasks))[task]
        return {n: self._buffers[buffer_key(f"t{t}__{kind}__", n)] for n in self._tasks[t]["shapes"]}

    def get_extra_state(self) -> dict[str, Any]:
        """JSON-compatible state: stored shapes, counts, shard, and the strength (``strength``:
        λ in absolute mode, ``scale`` in relative mode, ``balance`` in calibrated mode), its
        ``strength_mode``, the λ in use, the merged pair's constant, and (calibrated) the stored
        Fisher's mean and whether λ still waits for the new task's batch."""
        cfg = self.config
        value = {"absolute": cfg.strength, "relative": cfg.scale, "calibrated": cfg.balance}[cfg.strength_mode]
        return {"version": 2, "tasks": [{"shapes": dict(t["shapes"])} for t in self._tasks],
                "consolidations": self._consolidations,
                "shard": None if self._shard is None else dict(self._shard),
                "strength_mode": cfg.strength_mode,
                "strength": float(value),  # type: ignore[arg-type]
                "fisher_mean": self._fisher_mean,
                "pair_lambdas": list(self._pair_lambdas), "task_lambdas": list(self._task_lambdas),
                "calibration": list(self._cal),
                "lambda": self._lambda, "const": self._const, "keep_tasks": cfg.keep_tasks,
                "online_decay": cfg.online_decay}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Adopt a saved state; its strength and mode replace this instance's (with a warning
        when they differ): the stored λ is the one the penalty was trained with. A version-1
        state (no strength stored) keeps this instance's absolute ``strength`` (1.0, the
        version-1 default, if none was given) and warns."""
        _check_ewc_state(state)
        shard = state.get("shard")
        check_shard(shard, "EWC")
        cfg = self.config
        if "strength_mode" in state:
            mode, value = state["strength_mode"], float(state["strength"])
            mine = float({"absolute": cfg.strength, "relative": cfg.scale, "calibrated": cfg.balance}[cfg.strength_mode])  # type: ignore[arg-type]
            # the storage the state was built with: its online decay and per-task pairs (see _check_ewc_state)
            online, keep = _saved_storage(state, cfg)
            new_cfg = EWCConfig(**{**vars(cfg), "strength": value if mode == "absolute" else None,
                                   "scale": value if mode == "relative" else None,
                                   "balance": value if mode == "calibrated" else cfg.balance,
                                   "online_decay": online, "keep_tasks": keep})
            if mode != cfg.strength_mode or value != mine:
                warnings.warn(
                    f"EWC state was saved with {mode} strength {value:g}, this EWC has {cfg.strength_mode} "
                    f"strength {mine:g}: using the saved one (pass the same strength=/scale=/balance= to silence this)",
                    stacklevel=3,
                )
            if (online, keep) != (cfg.online_decay, cfg.keep_tasks):
                warnings.warn(f"EWC state was saved with online_decay={online}, keep_tasks={keep}; this EWC has "
                              f"online_decay={cfg.online_decay}, keep_tasks={cfg.keep_tasks}: using the saved storage",
                              stacklevel=3)
            self.config = new_cfg
            self._lambda = None if state.get("lambda") is None else float(state["lambda"])
            self._const = float(state.get("const", 0.0))
            fmean = state.get("fisher_mean")
            self._fisher_mean = None if fmean is None else float(fmean)
            self._pair_lambdas = [None if v is None else float(v) for v in state.get("pair_lambdas", [])]
            self._task_lambdas = [float(v) for v in state.get("task_lambdas", [])]
            cal = state.get("calibration", [0.0, 0.0, 0])
            self._cal = [float(cal[0]), float(cal[1]), int(cal[2])]
        else:  # version 1: absolute λ, not stored; per-task pairs
            strength = 1.0 if cfg.strength is None else float(cfg.strength)
            warnings.warn(f"EWC state (version 1) carries no strength: using absolute strength {strength:g}", stacklevel=3)
            self.config = EWCConfig(**{**vars(cfg), "strength": strength, "scale": None,
                                       "keep_tasks": cfg.online_decay is None and len(state["tasks"]) > 1})
            self._fisher_mean, self._pair_lambdas, self._task_lambdas = None, [], []
            self._lambda, self._const = strength, 0.0
        self._tasks = [{"shapes": {n: list(s) for n, s in t["shapes"].items()}} for t in state["tasks"]]
        self._consolidations = int(state["consolidations"])
        self._shard = None if shard is None else dict(shard)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[no-untyped-def]
        if prefix + "_extra_state" in state_dict:
            _check_ewc_state(state_dict[prefix + "_extra_state"])  # before any buffer is replaced
            device = next(iter(self._buffers.values())).device if self._buffers else None
            adopt_state_dict_buffers(self, state_dict, prefix, device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        c = self.config
        strength = {"absolute": f"strength={c.strength}", "relative": f"scale={c.scale} (λ={self._lambda})",
                    "calibrated": f"balance={c.balance} (λ={self.lambda_}{', pending' if self.pending_calibration else ''})"}[c.strength_mode]
        return (f"{strength}, fisher={c.fisher!r}, online_decay={c.online_decay}, "
                f"tasks={self.num_tasks}")


def _check_ewc_state(state: Any) -> None:
    """Refuse a state that is not an EWC state (e.g. a CurvatureRegularizer's) by name.

    Raises:
        StateMismatchError: ``state`` lacks EWC's ``tasks`` / ``consolidations`` entries.
    """
    keys = sorted(state) if isinstance(state, Mapping) else None
    if keys is None or "tasks" not in keys or "consolidations" not in keys:
        what = f"a dict with keys {keys}" if keys is not None else f"a {type(state).__name__}"
        raise StateMismatchError(
            f"not an EWC state: got {what}, expected keys 'tasks' and 'consolidations' (from EWC.state_dict()); "
            "load a CurvatureRegularizer's state into a CurvatureRegularizer"
        )
    if "strength_mode" not in state:
        return
    pairs, mode = len(state["tasks"]), state["strength_mode"]
    online, keep = _saved_storage(state, None)
    if mode == "calibrated" and len(state.get("pair_lambdas", [])) != pairs:
        raise StateMismatchError(f"calibrated EWC state with {pairs} pairs but {len(state.get('pair_lambdas', []))} "
                                 "pair λs: the state is damaged")
    limit = pairs if keep else (2 if mode == "calibrated" else 1)  # merged: one pair (+ one waiting for its λ)
    if pairs > limit:
        raise StateMismatchError(f"EWC state with {pairs} pairs but merged storage (keep_tasks={keep}, "
                                 f"online_decay={online}) holds at most {limit}: the state is damaged")


def _saved_storage(state: Mapping[str, Any], cfg: EWCConfig | None) -> tuple[float | None, bool]:
    """``(online_decay, keep_tasks)`` of a version-2 state: its own, falling back to ``cfg``'s
    (or the defaults) for states that did not store them; the calibrated mode never decays."""
    online = state.get("online_decay", None if cfg is None else cfg.online_decay)
    if state.get("strength_mode") == "calibrated":
        online = None
    online = None if online is None else float(online)
    keep = bool(state.get("keep_tasks", False if cfg is None else cfg.keep_tasks)) and online is None
    return online, keep


def _merge_pairs(
    f_old: Mapping[str, Tensor], a_old: Mapping[str, Tensor], f_new: Mapping[str, Tensor], a_new: Mapping[str, Tensor],
    const: float, dtype: torch.dtype,
) -> tuple[float, dict[str, Tensor], dict[str, Tensor]]:
    """Merge two diagonal quadratics exactly: ``F_o (θ − a_o)² + F_n (θ − a_n)² = F̄ (θ − θ̄)² + c``.

    ``F̄ = F_o + F_n``, ``θ̄ = (F_o a_o + F_n a_n) / F̄`` (``a_n`` where ``F̄ = 0``) and
    ``c = Σ F_o (a_o − θ̄)² + F_n (a_n − θ̄)²`` (added to ``const``), computed in float64 in the
    stable form (no difference of large squares). Names in only one pair are copied.

    Returns:
        (the new constant, F̄, θ̄) with the tensors in ``dtype``.
    """
    fisher: dict[str, Tensor] = {}
    anchor: dict[str, Tensor] = {}
    c = const
    for n in {**f_old, **f_new}:
        if n not in f_new:
            fisher[n], anchor[n] = f_old[n].clone(), a_old[n].clone()
            continue
        if n not in f_old:
            fisher[n], anchor[n] = f_new[n], a_new[n]
            continue
        dev = f_new[n].device
        fo, ao = f_old[n].to(dev).double(), a_old[n].to(dev).double()
        fn, an = f_new[n].double(), a_new[n].double()
        fbar = fo + fn
        safe = torch.where(fbar > 0, fbar, torch.ones_like(fbar))
        theta = torch.where(fbar > 0, (fo * ao + fn * an) / safe, an)
        c += float((fo * (ao - theta).square() + fn * (an - theta).square()).sum())
        fisher[n], anchor[n] = fbar.to(dtype), theta.to(dtype)
    return c, fisher, anchor


def _check_finite(loss: Tensor) -> None:
    if not bool(torch.isfinite(loss.detach()).all()):
        raise ValueError(
            f"non-finite loss ({loss.detach().flatten()[:8].tolist()}) while estimating the Fisher: "
            "check the batch (a sample with no non-ignored labels gives 0/0) and the model's parameters"
        )


def _check_own_model(own: nn.Module, given: nn.Module | None, what: str) -> None:
    """``end_task(model=...)`` on a loss term: the term already holds its model."""
    if given is not None and given is not own:
        raise ValueError(
            f"{what}.end_task(model=...) got a different model from the one this {what} was built on; "
            f"a loss term ends a task on its own model: call end_task(batches) (or build a new {what})"
        )
