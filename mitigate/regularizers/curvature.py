"""Curvature regularizer: keep the loss landscape of earlier tasks — their curvature and the
function it describes — while later tasks are learned.

Sequential fine-tuning flattens the loss landscape around earlier tasks' minima: their top
Hessian eigenvalue falls by ~75% after three later tasks and the flattening precedes behavioural
forgetting (Mechanistic Analysis of Catastrophic Forgetting in LLMs, arXiv 2601.18699, §2.6);
"if curvature regularization maintains Hessian eigenvalues within 20% of original values, this
mechanism is substantially suppressed". This module is that regularizer, in a form that measured
to reduce forgetting.

At the end of task ``t`` (:meth:`CurvatureRegularizer.consolidate`) it stores ``θ*_t``, the top-k
eigenpairs ``(λ_{t,i}, v_{t,i})`` of that task's Gauss-Newton matrix ``G_t = Jᵀ H_out J``
(positive semi-definite; :class:`mitigate.curvature.GGNOperator`, Lanczos), a replay memory of
``replay_samples`` of its inputs and the model's output distribution on them,
``p_θ*(·|x)`` at the supervised positions. While training later tasks it returns

    curv(θ) = w_r · Σ_t KL_t(θ) + strength · Σ_t ( w_a · ½ Σ_i λ_{t,i} ⟨v_{t,i}, θ − θ*_t⟩²  +  w_p · P_t(θ) )

    KL_t(θ) = (1/N) Σ_{x ∈ slice, positions j} KL( p_θ*_t(·|x)_j ‖ p_θ(·|x)_j )

* **Function-space anchor** ``KL_t`` (default weight ``w_r = replay_weight = 1``): the KL
  divergence from the finished task's predictions to the current ones on a rotating slice of
  ``replay_batch_size`` stored inputs (one per step). The slices of all finished tasks share one
  forward and backward per step (stacked into one padded batch), and
  :meth:`CurvatureRegularizer.with_replay` appends them to the training batch itself, so the KL
  term is read off the training forward (``reg(outputs=out)``) with no pass of its own. Its
  Hessian at ``θ*_t`` is exactly the Gauss-Newton matrix of the stored inputs
  (``∇²_θ KL|θ* = Jᵀ (diag p − ppᵀ) J``), so it is the full-rank curvature anchor, and unlike the
  quadratic it stays valid far from ``θ*``: on a memorised task the quadratic model predicted a
  loss rise 45× smaller than the real one (issue 13). **Scale rule:** KL is in nats per supervised
  position, the unit of the token-mean cross-entropy the task loss is, so ``w_r`` is a ratio to
  the task loss and needs no rescaling per model. Measured on ``tests/fact_recall.py`` (seed 0,
  4 replay samples per step, with the testbed's earlier 150-step LoRA phase): the old-task accuracy kept was nearly flat in ``w_r`` (LoRA
  gpt2-w48-d3: 74 % at 1, 78 % at 3; llama-w32-d2: 68 % at 1 and 3) while the new task's fell
  (gpt2 LoRA: 77 % at 1, 73 % at 3, 60 % at 10 with 8 per step; plain AdamW 77 %), hence 1.
* **Curvature anchor** (weight ``strength · w_a``): the rank-k Laplace quadratic along the top GGN
  eigenvectors. **Scale rule:** the quadratic is the second-order Taylor model of the old task's
  loss itself, so ``strength = 1`` is that loss's own scale (nats). On a memorised task it is
  small (its curvature is ``~p(1−p) → 0``), which is why the KL term carries the default.
* **Preservation** ``P_t`` (option, ``preservation_weight``, default 0): the relative change of
  the Rayleigh quotients ``v_iᵀ H_t(θ; s) v_i`` on a replay slice, against the same slice's value
  at ``θ*`` (third-order gradient, computed every ``every`` calls ×``every``). Off by default
  because the measurements say it does not help: its gradient is third-order and its target noise
  (a one-sample Rayleigh quotient swung from −8λ to +7.6λ within tens of steps; gradient norms
  3e3–6e4 against a task gradient of ~8), the stored vectors go stale (a 0.05 random perturbation
  moved vᵀHv from 23.8 to 1.3), and with the benchmark's clipped setting the old task kept 19 %
  against plain AdamW's 34 % (issue 13). It remains for reproducing the seed's method.

The papers' absolute setting (the earlier default of this class): ``replay_weight=0,
curvature="hessian", preservation_weight=1, replay_batch_size=1`` with ``strength`` the absolute
multiplier.

:meth:`CurvatureRegularizer.drift` re-estimates the old tasks' *true* current top eigenvalues (a
fresh warm-started Lanczos on the replay memory), against the same quantity at ``θ*``, so the
seed's "within 20 % of the original values" can be checked.

Storage: ``θ*`` and the eigenvectors once each, as flat ``(n,)`` and ``(k, n)`` buffers (the
per-parameter views :meth:`~CurvatureRegularizer.anchor` / :meth:`~CurvatureRegularizer.eigenvectors`
share their memory); the replay memory: the stored input tensors and the ``(N, C)`` float32
log-probabilities of their ``N`` supervised positions (``N × C × 4`` bytes: 32 samples with one
answer token each over a 50k vocabulary is 6.4 MB; long supervised sequences multiply it).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mitigate._utils import (
    Batch,
    LossFn,
    ParamSelector,
    adopt_state_dict_buffers,
    batch_size_of,
    buffer_key,
    dist_ready,
    live_parameters,
    model_device,
    move_batch,
    preserve_state,
    reject_sharded,
    resolve_loss_fn,
    select_parameters,
)
from mitigate.curvature import (
    EigenResult,
    LogitsFn,
    as_batch_list,
    hessian_eigenvalues,
    make_operator,
    rayleigh_quotients,
    shifted_label_positions,
    supervised_logits,
    unwrap_model,
)
from mitigate.reports import TaskEndReport

__all__ = ["CurvatureConfig", "CurvatureDrift", "CurvatureRegularizer"]

logger = logging.getLogger(__name__)

# eigenvalues at or below this fraction of the largest |λ| are numerically zero (dropped)
_ZERO_EIGENVALUE_RTOL = 1e-6

# version of the saved state: 2 stores θ* and the eigenvectors flat (1: one buffer per parameter)
_STATE_VERSION = 2


@dataclass
class CurvatureConfig:
    """Settings of :class:`CurvatureRegularizer` (validated on construction).

    Attributes:
        strength: multiplier of the curvature terms (anchor and preservation), ≥ 0; 1 is the old
            task's own loss scale (the quadratic is its Taylor model).
        k: eigenpairs stored per task (top-k of the task's curvature). Default 1: λ_max.
        params: which parameters the eigenvectors live on (``None``: all trainable; e.g.
            ``r".*self_attn\\..*"`` for attention only, or the LoRA parameters on PEFT models).
        curvature: ``"ggn"`` (default): the Gauss-Newton matrix of the supervised logits' softmax
            cross-entropy, positive semi-definite, so every eigenvalue is ≥ 0 and the anchor a
            true quadratic bowl; ``"hessian"``: the loss Hessian (may be indefinite; what the
            preservation term measures and the seed's λ_max).
        replay_weight: ``w_r``, weight of the KL function-space anchor (nats, like the task
            loss); 0 disables it.
        replay_samples: inputs of each task kept for the KL term, the preservation term and
            :meth:`CurvatureRegularizer.drift` (the first samples of the consolidation batches);
            0 keeps none.
        replay_batch_size: stored samples per step (a rotating slice) for the KL and preservation
            terms; ``None``: a whole stored batch. Its cost is one forward and backward on the
            slices of all finished tasks together per step, or, with
            :meth:`CurvatureRegularizer.with_replay`, those rows added to the training batch's
            forward. Measured on the testbed's tiny models (batch 16 of 4 tokens, 1 CPU thread,
            interleaved medians), ``reg()`` alone: 1.90× (llama-w32-d2) and 1.83× (llama-w64-d4)
            a plain AdamW step — per-forward overhead dominates there, so a slice of 4 costs
            nearly a whole batch; ``with_replay`` removes that second pass.
        every: the preservation term is computed every ``every`` calls (×``every``), else 0.
        anchor_weight: ``w_a``, weight of the low-rank Laplace anchor term.
        preservation_weight: ``w_p``, weight of the eigenvalue-preservation term (default 0:
            measured not to help, see the module docstring).
        tolerance: ``τ``, relative curvature change left unpenalised by the preservation term:
            each eigenpair contributes ``(|dᵢ| − τ)₊²`` with ``dᵢ = (qᵢ(θ) − qᵢ(θ*))/λᵢ``.
        collapse_only: penalise only falling curvature (``(−dᵢ − τ)₊²``).
        preservation_max_norm: clip the preservation term's gradient (Σ over tasks, unweighted,
            before ×``every``) to this L2 norm; ``None``: the exact formula. The clipped term has
            the same value and a gradient along the same direction with norm ≤ this.
        method / max_iter / tol / seed: passed to :func:`mitigate.curvature.hessian_eigenvalues`.
        eval_mode: compute eigenpairs, the replay terms and the teacher distribution with dropout
            off.
        dtype: storage dtype of ``θ*`` and the eigenvectors.
    """

    strength: float = 1.0
    k: int = 1
    params: ParamSelector = None
    curvature: Literal["ggn", "hessian"] = "ggn"
    replay_weight: float = 1.0
    replay_samples: int = 32
    replay_batch_size: int | None = 4
    every: int = 10
    anchor_weight: float = 1.0
    preservation_weight: float = 0.0
    tolerance: float = 0.0
    collapse_only: bool = False
    preservation_max_norm: float | None = None
    method: Literal["lanczos", "power"] = "lanczos"
    max_iter: int = 100
    tol: float = 1e-3
    seed: int = 0
    eval_mode: bool = True
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        def nonneg(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}={v!r} must be a finite number >= 0")

        for name in ("strength", "anchor_weight", "preservation_weight", "tolerance", "replay_weight"):
            nonneg(name)
        if not isinstance(self.collapse_only, bool):
            raise ValueError(f"collapse_only={self.collapse_only!r} must be a bool")
        m = self.preservation_max_norm
        if m is not None and not (isinstance(m, (int, float)) and math.isfinite(m) and m > 0):
            raise ValueError(f"preservation_max_norm={m!r} must be None or a finite number > 0")
        for name in ("k", "every", "max_iter"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"{name}={v!r} must be a positive int")
        if self.curvature not in ("ggn", "hessian"):
            raise ValueError(f"curvature={self.curvature!r} must be 'ggn' or 'hessian'")
        if not (isinstance(self.replay_samples, int) and self.replay_samples >= 0):
            raise ValueError(f"replay_samples={self.replay_samples!r} must be an int >= 0 (0: no replay memory)")
        if self.replay_batch_size is not None and not (
            isinstance(self.replay_batch_size, int) and self.replay_batch_size >= 1
        ):
            raise ValueError(f"replay_batch_size={self.replay_batch_size!r} must be None or a positive int")
        if self.method not in ("lanczos", "power"):
            raise ValueError(f"method={self.method!r} must be 'lanczos' or 'power'")
        if not (isinstance(self.tol, (int, float)) and self.tol > 0):
            raise ValueError(f"tol={self.tol!r} must be > 0")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an int")
        if not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ValueError(f"dtype={self.dtype!r} must be a floating torch.dtype")


@dataclass
class CurvatureDrift:
    """Curvature of one consolidated task now, against the same measurement at ``θ*``.

    Attributes:
        task: task index.
        reference: ``(k,)`` top eigenvalues of the task's curvature (the configured kind) on the
            replay memory at ``θ*`` (the stored eigenvalues; with explicit ``batches``, the same).
        current: ``(k,)`` top eigenvalues on the same batches now (a fresh Lanczos, warm-started
            from the stored top eigenvector).
        ratio: ``current / reference`` (1 = curvature preserved; 0.25 = flattened by 75 %; the
            seed asks for ``|ratio − 1| ≤ 0.2``).
        eigenvalues: ``(k,)`` stored ``λᵢ``.
        rayleigh: ``(k,)`` ``vᵢᵀ C(θ) vᵢ`` along the *stored* vectors now (``C`` the configured
            curvature); these go stale as θ moves, which is why ``ratio`` uses ``current``.
    """

    task: int
    reference: Tensor
    current: Tensor
    ratio: Tensor
    eigenvalues: Tensor
    rayleigh: Tensor


class CurvatureRegularizer(nn.Module):
    """KL function-space anchor + GGN curvature anchor (+ optional eigenvalue preservation) on
    earlier tasks; see the module docstring for the formula and the scale rules.

    ``curv()`` (``forward``) returns a differentiable scalar to add to the loss; call it once per
    optimizer step (the call count rotates the replay slices and drives ``every``).

    Example::

        reg = CurvatureRegularizer(model)
        reg.consolidate(task0_batches)        # end of task 0
        loss = model(**batch).loss + reg()    # every step of task 1

        batch = reg.with_replay(batch)        # or: one forward for both terms
        out = model(**batch)
        loss = out.loss + reg(outputs=out)

    Args:
        model: the model being fine-tuned (DDP unwrapped, eager attention). A plain reference,
            not a submodule: ``state_dict()`` holds only this module's buffers.
        strength, k, ...: see :class:`CurvatureConfig`.
        loss_fn: ``loss_fn(model, batch) -> scalar`` for the Hessian (``curvature="hessian"``) and
            the preservation term; ``None``: ``model(**batch).loss``.
        logits_fn: ``logits_fn(model, batch) -> (N, C)`` logits of the supervised positions, for
            the GGN and the KL term; ``None``: :func:`mitigate.curvature.supervised_logits` (Hugging
            Face models: the positions whose shifted label is not -100).
        config: a ready :class:`CurvatureConfig` instead of the keyword arguments.

    Raises:
        ValueError: invalid settings.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        strength: float = 1.0,
        k: int = 1,
        params: ParamSelector = None,
        curvature: Literal["ggn", "hessian"] = "ggn",
        replay_weight: float = 1.0,
        replay_samples: int = 32,
        replay_batch_size: int | None = 4,
        every: int = 10,
        anchor_weight: float = 1.0,
        preservation_weight: float = 0.0,
        tolerance: float = 0.0,
        collapse_only: bool = False,
        preservation_max_norm: float | None = None,
        method: Literal["lanczos", "power"] = "lanczos",
        max_iter: int = 100,
        tol: float = 1e-3,
        seed: int = 0,
        eval_mode: bool = True,
        dtype: torch.dtype = torch.float32,
        loss_fn: LossFn | None = None,
        logits_fn: LogitsFn | None = None,
        config: CurvatureConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or CurvatureConfig(
            strength=strength, k=k, params=params, curvature=curvature, replay_weight=replay_weight,
            replay_samples=replay_samples, replay_batch_size=replay_batch_size, every=every,
            anchor_weight=anchor_weight, preservation_weight=preservation_weight, tolerance=tolerance,
            collapse_only=collapse_only, preservation_max_norm=preservation_max_norm, method=method,
            max_iter=max_iter, tol=tol, seed=seed, eval_mode=eval_mode, dtype=dtype,
        )
        object.__setattr__(self, "_model", unwrap_model(model))  # not a submodule
        reject_sharded(select_parameters(self._model, self.config.params).items(), "CurvatureRegularizer")
        self.loss_fn = loss_fn
        self.logits_fn = logits_fn
        # per task: {"shapes", "k", "replay": [batch specs], "slice": samples per slice}
        self._tasks: list[dict[str, Any]] = []
        self._loss_fns: list[LossFn | None] = []
        self._step = 0
        self._replay_cursor = 0
        self._pending: dict[str, Any] | None = None  # what with_replay() appended this step

    # ------------------------------------------------------------------ public
    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def num_tasks(self) -> int:
        return len(self._tasks)

    def eigenvalues(self, task: int = -1) -> Tensor:
        """Stored ``(k,)`` eigenvalues of task ``task``."""
        return self._buffers[f"t{self._index(task)}__eigenvalues"]

    def _split(self, t: int, flat: Tensor) -> dict[str, Tensor]:
        """Views of a flat ``(..., n)`` tensor per parameter (no copy)."""
        shapes = self._tasks[t]["shapes"]
        sizes = [math.prod(s) for s in shapes.values()]
        lead = flat.shape[:-1]
        return {n: part.view(*lead, *s) for (n, s), part in zip(shapes.items(), flat.split(sizes, dim=-1))}

    def eigenvectors(self, task: int = -1) -> list[dict[str, Tensor]]:
        """Stored unit eigenvectors of task ``task``: ``k`` dicts name -> tensor (views of the
        one stored ``(k, n)`` buffer)."""
        t = self._index(task)
        vecs = self._buffers[f"t{t}__vectors"]
        return [self._split(t, vecs[i]) for i in range(vecs.shape[0])]

    def anchor(self, task: int = -1) -> dict[str, Tensor]:
        """Stored ``θ*`` of task ``task`` (views of the one stored ``(n,)`` buffer)."""
        t = self._index(task)
        return self._split(t, self._buffers[f"t{t}__anchor"])

    def end_task(self, batches: Batch | Iterable[Batch], *, loss_fn: LossFn | None = None, model: nn.Module | None = None) -> TaskEndReport:
        """The task is finished: store ``θ*``, the replay inputs and the top curvature eigenpairs
        (:meth:`consolidate`).

        The one verb every mitigation shares (see :mod:`mitigate.reports`); ``consolidate``
        stays as it was.

        Args:
            batches: the finished task's batches (one dict or an iterable).
            loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``.
            model: accepted for a signature shared with the optimizer wrappers; must be this
                regularizer's model (or ``None``).

        Returns:
            :class:`~mitigate.reports.TaskEndReport` with the kept ``eigenvalues``, ``k``,
            whether Lanczos ``converged`` and the ``replay_inputs`` stored; ``.result`` is
            :meth:`consolidate`'s :class:`~mitigate.curvature.EigenResult`.

        Raises:
            ValueError: ``model`` is not this regularizer's model; as :meth:`consolidate`.
        """
        from mitigate.regularizers.ewc import _check_own_model
        from mitigate.reports import run_end_task

        _check_own_model(self._model, model, "CurvatureRegularizer")
        task = len(self._tasks)

        def details(eig: EigenResult) -> dict[str, Any]:
            t = self._tasks[-1]
            return {
                "eigenvalues": [float(v) for v in self._buffers[f"t{task}__eigenvalues"].tolist()],
                "k": int(t["k"]), "converged": bool(eig.converged), "hvp_iterations": int(eig.iterations),
                "replay_inputs": sum(batch_size_of(b) for b in self._replay(task)),
            }

        return run_end_task("CurvatureRegularizer", task, batches, lambda b: self.consolidate(b, loss_fn), details)

    @torch.no_grad()
    def consolidate(self, batches: Batch | Iterable[Batch], loss_fn: LossFn | None = None) -> EigenResult:
        """End of a task: store ``θ*``, the replay memory (the first ``replay_samples`` inputs,
        on the model's device) with the model's log-probabilities on them, and the top-k
        eigenpairs of the task's curvature at ``θ*`` estimated on the replay memory (so the cost
        is bounded by ``replay_samples``, however many batches are passed; ``replay_samples=0``:
        on all the batches). The eigenvalues are also :meth:`drift`'s reference.

        Args:
            batches: one batch (dict) or an iterable of batches of the finished task.
            loss_fn: ``loss_fn(model, batch) -> scalar`` (``None``: the constructor's, else
                ``model(**batch).loss``); remembered for this task.

        Returns:
            the :class:`~mitigate.curvature.EigenResult` (all k pairs, before dropping
            non-positive eigenvalues).

        Raises:
            ValueError: no batches, a non-finite loss, no positive eigenvalue, a batch the KL term
                cannot read (pass ``logits_fn=`` or ``replay_weight=0``); nothing is stored then.
            AttentionKernelError: SDPA/flash attention (load with ``attn_implementation="eager"``).
        """
        cfg = self.config
        model = self._model
        blist = as_batch_list(batches)
        fn = loss_fn if loss_fn is not None else self.loss_fn
        device = model_device(model)
        mode = False if cfg.eval_mode else None
        with preserve_state(model, mode=mode):
            for b in blist:
                loss = resolve_loss_fn(fn)(model, move_batch(b, device))
                if not bool(torch.isfinite(loss).all()):
                    raise ValueError(f"non-finite loss {float(loss)} on a consolidation batch")
        replay = self._take_replay(blist, cfg.replay_samples)
        slices = self._slices(replay, cfg.replay_batch_size)
        teachers: list[Tensor] = []
        if slices and cfg.replay_weight > 0:
            with preserve_state(model, mode=mode):
                for b in slices:
                    try:
                        z = self._logits(move_batch(b, device))
                    except (TypeError, ValueError, AttributeError) as err:
                        raise ValueError(
                            f"the KL replay term needs the model's logits on the stored batches, and "
                            f"logits_fn(model, batch) failed ({type(err).__name__}: {err}); pass "
                            "logits_fn=(model, batch) -> (N, C) logits, or replay_weight=0"
                        ) from err
                    teachers.append(F.log_softmax(z.detach().to(torch.promote_types(z.dtype, torch.float32)), dim=-1))
        with torch.enable_grad():  # on the replay memory: a cost bounded by replay_samples
            eig = hessian_eigenvalues(
                model, replay or blist, fn, k=cfg.k, params=cfg.params, method=cfg.method,
                max_iter=cfg.max_iter, tol=cfg.tol, eval_mode=cfg.eval_mode, curvature=cfg.curvature,
                logits_fn=self.logits_fn, seed=cfg.seed + len(self._tasks), check_multiplicity=cfg.k > 1)
        values = eig.values
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"non-finite curvature eigenvalues {values.tolist()}")
        # numerically zero counts as non-positive: 1/λᵢ would explode the preservation term
        floor = _ZERO_EIGENVALUE_RTOL * float(values.abs().max())
        keep = [i for i, lam in enumerate(values.tolist()) if lam > floor]
        if len(keep) < len(values):
            dropped = [values[i].item() for i in range(len(values)) if i not in keep]
            if not keep:
                raise ValueError(
                    f"no positive {'Hessian' if cfg.curvature == 'hessian' else 'Gauss-Newton'} eigenvalue among the top {len(values)} ({values.tolist()}): "
                    "the curvature terms are defined for positive curvature only; consolidate at a "
                    "(near-)minimum of the task's loss"
                )
            warnings.warn(
                f"CurvatureRegularizer: dropping non-positive eigenvalues {dropped} (the "
                "preservation term divides by λᵢ and is defined for positive curvature only)",
                stacklevel=2,
            )
        reference = values[keep]  # measured on the replay memory: what drift() measures again
        # ---- nothing was stored so far; from here on nothing can fail
        names = eig.names
        params = dict(model.named_parameters())
        t = len(self._tasks)
        dt = cfg.dtype
        self.register_buffer(f"t{t}__eigenvalues", values[keep].to(device=device, dtype=torch.float64))
        self.register_buffer(f"t{t}__reference", reference.to(device=device, dtype=torch.float64))
        self.register_buffer(f"t{t}__anchor", torch.cat([params[n].detach().reshape(-1).to(dt) for n in names]))
        vec = torch.stack([torch.cat([eig.vectors[i][n].reshape(-1) for n in names]) for i in keep])
        self.register_buffer(f"t{t}__vectors", vec.to(device=self._buffers[f"t{t}__anchor"].device, dtype=dt))
        specs = [self._store_replay(t, j, b) for j, b in enumerate(replay)]
        for s, lp in enumerate(teachers):
            self.register_buffer(f"t{t}__teacher{s}", lp.to(device))
        self._tasks.append({"shapes": {n: list(params[n].shape) for n in names}, "k": len(keep), "replay": specs,
                            "slice": cfg.replay_batch_size, "teachers": len(teachers)})
        self._loss_fns.append(fn)
        if specs and cfg.preservation_weight > 0:  # targets: each replay slice's own vᵢᵀH(θ*)vᵢ
            plist = live_parameters(model, self._tasks[t]["shapes"], f"curvature regularizer task {t}")
            with torch.enable_grad(), preserve_state(model):
                qref = torch.stack([self._rayleigh(t, plist, b).detach() for b in self._replay_slices(t)])
            self.register_buffer(f"t{t}__qref", qref.to(device=device, dtype=torch.float64))
        return eig

    def with_replay(self, batch: Batch) -> dict[str, Tensor]:
        """``batch`` with this step's replay rows of every consolidated task appended, so the KL
        term needs no forward pass of its own: pass the model's output on the returned batch to
        the next call, ``reg(outputs=out)``::

            batch = reg.with_replay(batch)          # + 4 stored old-task rows per task
            out = model(**batch)
            loss = out.loss + reg(outputs=out)      # KL read off the appended rows' logits

        The appended rows carry ``labels = -100`` everywhere, so a Hugging Face ``out.loss`` (the
        mean over supervised tokens) is the task loss of ``batch`` alone; rows are right-padded
        to a common length with ``attention_mask = 0`` (one of ones is added to ``batch`` if it
        has none). One forward and backward over ``B + R`` rows instead of two passes: on the
        benchmark's tiny models, where each pass has a fixed overhead, this is what brings the
        KL term's cost down. Unlike ``reg()`` alone, the replay rows then run in the model's
        training mode (dropout on, if the model has any).

        Args:
            batch: the training batch, a dict of ``(B, T)`` tensors with ``input_ids`` and
                ``labels`` (``attention_mask`` optional, no other keys).

        Returns:
            the extended batch (``batch`` itself when nothing is stored or ``replay_weight=0``).

        Raises:
            ValueError: a custom ``logits_fn`` (only the Hugging Face causal-LM positions are
                read off the output), a batch or replay memory that is not such a dict; nothing
                is changed then.
        """
        self._pending = None
        parts = self._current_slices(self._replay_cursor) if self.config.replay_weight > 0 else []
        if not parts:
            return batch
        if self.logits_fn is not None:
            raise ValueError("with_replay() reads the Hugging Face causal-LM positions off the output; "
                             "with a custom logits_fn call reg() without it")
        if not isinstance(batch, Mapping) or "labels" not in batch or "input_ids" not in batch:
            raise ValueError(f"with_replay() needs a dict batch with input_ids and labels, got "
                             f"{sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__}; call reg() without it")
        device = batch["input_ids"].device
        def with_mask(b: Mapping[str, Tensor]) -> dict[str, Tensor]:
            b = dict(b)
            b.setdefault("attention_mask", torch.ones_like(b["input_ids"]))
            return b
        task_rows = with_mask(batch)
        replay_rows, labels = [], []
        for t, (s, b) in parts:
            if not isinstance(b, Mapping) or not isinstance(b.get("labels"), Tensor):
                raise ValueError(f"task {t}'s replay memory holds no dict batches with labels; call reg() "
                                 "without with_replay()")
            b = with_mask(move_batch(b, device))
            labels.append(b["labels"])
            replay_rows.append({**b, "labels": torch.full_like(b["labels"], -100)})
        stacked = _stack_padded([task_rows, *replay_rows])
        if stacked is None:
            raise ValueError(f"with_replay() cannot stack the batch (keys {sorted(batch)}) with the replay "
                             "rows: only input_ids, attention_mask and labels of (B, T) tensors of the same "
                             "dtypes; call reg() without it")
        width = stacked["input_ids"].shape[1]
        first_row = offset = task_rows["input_ids"].shape[0]
        index, rows = [], []
        for (t, (s, _)), lab in zip(parts, labels):
            lab = F.pad(lab, (0, width - lab.shape[1]), value=-100)
            sup = shifted_label_positions(lab)
            index.append(sup + (offset - first_row) * (width - 1))  # in logits[first_row:, :-1]
            rows.append(int(sup.numel()))
            offset += lab.shape[0]
            teacher = self._buffers[f"t{t}__teacher{s}"]
            if teacher.shape[0] != rows[-1]:
                raise ValueError(f"task {t}: {rows[-1]} supervised positions on replay slice {s}, "
                                 f"{teacher.shape[0]} stored: the replay memory changed since consolidate()")
        self._pending = {"cursor": self._replay_cursor, "shape": (offset, width), "index": torch.cat(index),
                         "rows": rows, "parts": parts, "first_row": first_row}
        return stacked

    def _current_slices(self, slice_index: int) -> list[tuple[int, tuple[int, Batch]]]:
        """``(task, (slice, batch))`` of every task with a KL teacher, at ``slice_index``."""
        out = []
        for t, task in enumerate(self._tasks):
            if task.get("teachers"):
                s = slice_index % task["teachers"]
                out.append((t, (s, self._replay_slices(t)[s])))
        return out

    def _kl_from_outputs(self, outputs: Any, slice_index: int) -> list[Tensor]:
        pending, self._pending = self._pending, None
        if pending is None and not self._current_slices(slice_index):
            return []  # no task has a KL teacher: with_replay() returned the batch as it was
        if pending is None or pending["cursor"] != slice_index:
            raise ValueError("reg(outputs=...) reads the replay rows that with_replay() appended to this "
                             "step's batch: call batch = reg.with_replay(batch) before model(**batch)")
        logits = outputs if isinstance(outputs, Tensor) else getattr(outputs, "logits", None)
        if not isinstance(logits, Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != pending["shape"]:
            got = None if not isinstance(logits, Tensor) else tuple(logits.shape)
            raise ValueError(f"reg(outputs=...): logits of shape {got}, expected (B, T) = {pending['shape']} "
                             "of the batch with_replay() returned (B, T, V); pass model(**that_batch)")
        first = pending["first_row"]  # only the replay rows' logits are flattened (no copy of the task's)
        z = logits[first:, :-1].reshape(-1, logits.shape[-1]).index_select(0, pending["index"].to(logits.device))
        return [self._kl(t, zt, self._buffers[f"t{t}__teacher{s}"])
                for (t, (s, _)), zt in zip(pending["parts"], z.split(pending["rows"]))]

    def forward(self, step: int | None = None, outputs: Any = None) -> Tensor:
        """The penalty at the live parameters (see the module docstring).

        Args:
            step: the training step deciding whether the preservation term is computed
                (``step % every == 0``); ``None`` uses (and advances) the internal call counter.
            outputs: the model's output on the batch :meth:`with_replay` returned this step
                (anything with ``.logits``, or the logits): the KL term is read off its replay
                rows instead of a forward pass of its own. ``None``: the usual separate pass.

        Returns:
            0-d tensor on the model's device, differentiable w.r.t. the parameters; a zero that
            supports ``.backward()`` before any :meth:`consolidate`.

        Raises:
            StateMismatchError: a stored parameter is missing or changed shape.
        """
        cfg = self.config
        if outputs is None and self._pending is not None:
            self._pending = None
            raise ValueError("with_replay() appended replay rows to this step's batch: pass the model's "
                             "output on it, reg(outputs=model(**batch))")
        if step is None:
            step = self._step
            self._step += 1
        if not self._tasks:
            return torch.zeros((), device=model_device(self._model), requires_grad=True)
        terms: list[Tensor] = []
        pres: Tensor | None = None
        preserve = cfg.preservation_weight > 0 and cfg.strength > 0 and step % cfg.every == 0
        used: dict[int, nn.Parameter] = {}
        slice_index = self._replay_cursor
        self._replay_cursor += 1
        if cfg.replay_weight > 0:
            kls = self._kl_terms(slice_index) if outputs is None else self._kl_from_outputs(outputs, slice_index)
            terms.extend(kl * cfg.replay_weight for kl in kls)
        elif outputs is not None:
            self._pending = None
        flat: dict[tuple[int, ...], Tensor] = {}
        for t in range(len(self._tasks)):
            plist = live_parameters(self._model, self._tasks[t]["shapes"], f"curvature regularizer task {t}")
            if cfg.anchor_weight > 0 and cfg.strength > 0:
                terms.append(self._anchor_term(t, plist, flat) * (cfg.anchor_weight * cfg.strength))
            if preserve and self._tasks[t]["replay"]:
                term = self._preservation_term(t, plist, slice_index=slice_index)
                pres = term if pres is None else pres + term
                used.update((id(p), p) for p in plist)
        if pres is not None:
            if cfg.preservation_max_norm is not None:
                pres = _clip_gradient(pres, list(used.values()), cfg.preservation_max_norm)
            terms.append(pres * (cfg.preservation_weight * cfg.every * cfg.strength))
        if not terms:
            return torch.zeros((), device=model_device(self._model), requires_grad=True)
        device = model_device(self._model)
        return torch.stack([x.to(device=device, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype)
                            for x in terms]).sum()

    def anchor_term(self) -> Tensor:
        """``Σ_t ½ Σ_i λ_{t,i} ⟨v_{t,i}, θ − θ*_t⟩²`` alone (unweighted), differentiable."""
        terms = [self._anchor_term(t, live_parameters(self._model, task["shapes"], f"task {t}"))
                 for t, task in enumerate(self._tasks)]
        return torch.stack(terms).sum() if terms else torch.zeros((), device=model_device(self._model), requires_grad=True)

    def kl_term(self) -> Tensor:
        """``Σ_t KL_t(θ)`` alone (unweighted), on every stored slice of each task (mean over the
        slices), differentiable; zero without replay memory."""
        terms = []
        for t, task in enumerate(self._tasks):
            live_parameters(self._model, task["shapes"], f"task {t}")
            n = task.get("teachers", 0)
            if n:
                terms.append(torch.stack([self._kl_term(t, s) for s in range(n)]).mean())
        return torch.stack(terms).sum() if terms else torch.zeros((), device=model_device(self._model), requires_grad=True)

    def preservation_term(self, batches: Batch | Iterable[Batch] | None = None) -> Tensor:
        """``Σ_t Σ_i ((v_iᵀ H_t(θ) v_i − λ_i)/λ_i)²`` alone (unweighted, not amortised),
        differentiable; on the next replay slice of each task, or on ``batches`` (first batch)."""
        terms = []
        slice_index = self._replay_cursor
        self._replay_cursor += 1
        for t, task in enumerate(self._tasks):
            plist = live_parameters(self._model, task["shapes"], f"task {t}")
            batch = None if batches is None else as_batch_list(batches)[0]
            terms.append(self._preservation_term(t, plist, batch, slice_index=slice_index))
        return torch.stack(terms).sum() if terms else torch.zeros((), device=model_device(self._model), requires_grad=True)

    @torch.no_grad()
    def drift(self, batches: Batch | Iterable[Batch] | None = None, loss_fn: LossFn | None = None,
              *, max_iter: int | None = None) -> list[CurvatureDrift]:
        """The old tasks' true current top eigenvalues against the same measurement at ``θ*``.

        For each task a fresh Lanczos (the configured curvature, ``k`` pairs, warm-started from
        the stored top eigenvector) on its replay memory, or on ``batches``; ``ratio =
        current / reference``. With the replay memory the reference was measured at
        consolidation on the same inputs; with ``batches`` there is no such reference and the
        stored eigenvalues (all the consolidation data) stand in.

        Args:
            batches: batches to measure on (all tasks); ``None``: each task's replay memory.
            loss_fn: loss for ``batches`` (``None``: each task's own).
            max_iter: Lanczos basis cap (``None``: the config's).

        Returns:
            one :class:`CurvatureDrift` per task.

        Raises:
            ValueError: a task without replay memory and no ``batches``.
            StateMismatchError: a stored parameter is missing or changed shape.
        """
        cfg = self.config
        out = []
        for t, task in enumerate(self._tasks):
            live_parameters(self._model, task["shapes"], f"curvature regularizer task {t}")
            blist = self._replay(t) if batches is None else as_batch_list(batches)
            if not blist:
                raise ValueError(f"task {t} has no replay memory (replay_samples=0): pass batches=")
            fn = loss_fn if loss_fn is not None else self._task_loss_fn(t)
            names = list(task["shapes"])
            vecs = self.eigenvectors(t)
            with torch.enable_grad():
                res = hessian_eigenvalues(
                    self._model, blist, fn, k=task["k"], params=lambda n, p: n in task["shapes"],
                    max_iter=max_iter or cfg.max_iter, tol=cfg.tol, seed=cfg.seed + t, eval_mode=cfg.eval_mode,
                    curvature=cfg.curvature, logits_fn=self.logits_fn, start=vecs[0], check_multiplicity=False)
                with preserve_state(self._model, mode=False if cfg.eval_mode else None):
                    op = make_operator(self._model, blist, fn, lambda n, p: n in task["shapes"],
                                       curvature=cfg.curvature, logits_fn=self.logits_fn)
                    if op.names != names:
                        raise ValueError(f"task {t}: parameter order changed ({op.names[:3]}… vs {names[:3]}…)")
                    qs = [torch.dot(f, op.matvec(f)) for f in (op.from_dict(v).to(op.device) for v in vecs)]
            ref = self._buffers[f"t{t}__reference"].double().cpu() if batches is None else self.eigenvalues(t).double().cpu()
            cur = res.values.double().cpu()
            out.append(CurvatureDrift(task=t, reference=ref, current=cur, ratio=cur / ref,
                                      eigenvalues=self.eigenvalues(t).double().cpu(),
                                      rayleigh=torch.stack(qs).double().cpu()))
        return out

    # ------------------------------------------------------------------ terms
    def _logits(self, batch: Batch) -> Tensor:
        return (self.logits_fn or supervised_logits)(self._model, batch)

    def _anchor_term(self, t: int, plist: list[nn.Parameter], flat: dict[tuple[int, ...], Tensor] | None = None
                     ) -> Tensor:
        """``½ Σᵢ λᵢ ⟨vᵢ, θ − θ*⟩²`` of task ``t``; ``flat`` caches the flattened ``θ`` per
        parameter list, so tasks on the same parameters concatenate them once per step."""
        anchor, vecs = self._buffers[f"t{t}__anchor"], self._buffers[f"t{t}__vectors"]  # (n,), (k, n)
        key = tuple(id(p) for p in plist)
        theta = None if flat is None else flat.get(key)
        if theta is None:
            theta = torch.cat([p.reshape(-1) for p in plist])
            if flat is not None:
                flat[key] = theta
        theta = theta.to(device=anchor.device, dtype=anchor.dtype)
        c = vecs @ (theta - anchor)  # (k,) ⟨vᵢ, θ − θ*⟩
        lam = self._buffers[f"t{t}__eigenvalues"].to(device=c.device, dtype=c.dtype)
        return 0.5 * torch.dot(lam, c * c).to(plist[0].device)

    def _replay_logits(self, batch: Batch) -> Tensor:
        """The supervised logits of a replay batch, with dropout off when ``eval_mode``."""
        model = self._model
        training = [(m, m.training) for m in model.modules()]
        try:
            if self.config.eval_mode:
                model.eval()
            return self._logits(batch)
        finally:
            for m, flag in training:
                m.training = flag

    @staticmethod
    def _kl(t: int, z: Tensor, teacher: Tensor) -> Tensor:
        logp = F.log_softmax(z.to(teacher.dtype), dim=-1)
        if logp.shape != teacher.shape:
            raise ValueError(f"task {t}: logits of shape {tuple(logp.shape)} on a replay slice, stored "
                             f"{tuple(teacher.shape)}: the model's output changed since consolidate()")
        return F.kl_div(logp, teacher, log_target=True, reduction="sum") / max(teacher.shape[0], 1)

    def _kl_term(self, t: int, slice_index: int) -> Tensor:
        """``(1/N) Σⱼ KL(p_θ*(·|x)ⱼ ‖ p_θ(·|x)ⱼ)`` on replay slice ``slice_index mod S`` of task ``t``."""
        task = self._tasks[t]
        s = slice_index % task["teachers"]
        teacher = self._buffers[f"t{t}__teacher{s}"]  # (N, C) log p_θ*
        batch = move_batch(self._replay_slices(t)[s], teacher.device)
        return self._kl(t, self._replay_logits(batch), teacher)

    def _kl_terms(self, slice_index: int) -> list[Tensor]:
        """Every consolidated task's KL term on its slice ``slice_index``, from **one** forward
        pass: the tasks' slices are stacked into one batch (right-padded with
        ``attention_mask = 0`` and ``labels = -100``, see :func:`_stack_padded`) and the
        ``(N, C)`` supervised logits are split back by each task's stored row count (with the
        default ``logits_fn`` and labelled ``(B, T)`` rows only; otherwise one forward each). The values
        are those of one forward per task up to float rounding (a causal or masked model's real
        positions do not see the padding); the cost is one extra forward and backward per step
        however many tasks are stored. Batches that cannot be stacked (not dicts, other keys, no
        ``attention_mask`` with unequal lengths) take one forward each."""
        parts = [(t, self._buffers[f"t{t}__teacher{s}"], b) for t, (s, b) in self._current_slices(slice_index)]
        if not parts:
            return []
        device = parts[0][1].device
        # stacking pads rows, which only the default logits_fn on labelled causal-LM rows ignores
        # (a classifier pools at the last non-pad token; a custom logits_fn may read any position)
        stackable = len(parts) > 1 and self.logits_fn is None and all(
            isinstance(b, Mapping) and isinstance(b.get("labels"), Tensor) and b["labels"].dim() == 2
            for _, _, b in parts)
        stacked = _stack_padded([b for _, _, b in parts]) if stackable else None
        if stacked is not None:
            z = self._replay_logits(move_batch(stacked, device))
            rows = [teacher.shape[0] for _, teacher, _ in parts]
            if z.dim() == 2 and z.shape[0] == sum(rows):
                return [self._kl(t, zt, teacher) for (t, teacher, _), zt in zip(parts, z.split(rows))]
        return [self._kl(t, self._replay_logits(move_batch(b, device)), teacher) for t, teacher, b in parts]

    def _rayleigh(self, t: int, plist: list[nn.Parameter], batch: Batch) -> Tensor:
        """``(k,)`` differentiable ``vᵢᵀ H_t(θ; batch) vᵢ``, averaged across DDP ranks."""
        batch = move_batch(batch, plist[0].device)
        vecs = [[v[n].to(p.device) for n, p in zip(self._tasks[t]["shapes"], plist)] for v in self.eigenvectors(t)]
        model = self._model
        training = [(m, m.training) for m in model.modules()]
        try:
            if self.config.eval_mode:
                model.eval()
            q = rayleigh_quotients(model, batch, vecs, self._task_loss_fn(t), plist)
        finally:
            for m, flag in training:
                m.training = flag
        if dist_ready():
            # each rank holds its own shard of the replay memory: average the estimates with a
            # differentiable all-reduce so every rank penalises the same global quantity (DDP then
            # averages identical penalty gradients: the single-process result)
            import torch.distributed.nn.functional as dist_fn

            q = dist_fn.all_reduce(q) / torch.distributed.get_world_size()
        return q

    def _preservation_term(self, t: int, plist: list[nn.Parameter], batch: Batch | None = None,
                           *, slice_index: int = 0) -> Tensor:
        """``Σᵢ ((qᵢ(θ) − qᵢ(θ*)) / λᵢ)²`` on replay slice ``slice_index``, whose ``qᵢ(θ*)`` was
        stored at consolidation (exactly 0 at ``θ*`` whatever the slice); with explicit ``batch``,
        the target is ``λᵢ`` itself (measured on the consolidation data)."""
        lam = self._buffers[f"t{t}__eigenvalues"].to(plist[0].device)
        if batch is None:
            slices = self._replay_slices(t)
            s = slice_index % len(slices)
            batch = slices[s]
            target = self._buffers[f"t{t}__qref"][s].to(device=lam.device, dtype=lam.dtype)
        else:
            target = lam
        q = self._rayleigh(t, plist, batch)
        rel = (q.to(lam.dtype) - target) / lam  # dᵢ
        cfg = self.config
        if cfg.collapse_only:
            rel = torch.clamp(-rel - cfg.tolerance, min=0.0)
        elif cfg.tolerance > 0:
            rel = torch.clamp(rel.abs() - cfg.tolerance, min=0.0)
        return (rel * rel).sum().to(plist[0].dtype if plist[0].dtype.is_floating_point else torch.float32)

    # ------------------------------------------------------------------ replay memory
    @staticmethod
    def _take_replay(blist: list[Batch], samples: int) -> list[Batch]:
        """The first ``samples`` samples of ``blist`` (whole batches, the last one cut)."""
        out: list[Batch] = []
        left = samples
        for b in blist:
            if left <= 0:
                break
            size = batch_size_of(b)
            out.append(b if size <= left else _cut(b, torch.arange(left), size))
            left -= min(size, left)
        return out

    @staticmethod
    def _slices(replay: list[Batch], size_cfg: int | None) -> list[Batch]:
        """``replay`` cut into consecutive slices of ``size_cfg`` samples (a whole batch each when
        ``None``). Deterministic: what is stored per slice is indexed by these slices."""
        out: list[Batch] = []
        for batch in replay:
            size = batch_size_of(batch)
            if size_cfg is None or size_cfg >= size:
                out.append(batch)
                continue
            for start in range(0, size, size_cfg):
                out.append(_cut(batch, torch.arange(start, min(start + size_cfg, size)), size))
        return out

    def _store_replay(self, t: int, j: int, batch: Batch) -> dict[str, Any]:
        if isinstance(batch, Mapping):
            kind, items = "dict", list(batch.items())
        elif isinstance(batch, (tuple, list)):
            kind, items = "tuple", [(str(i), v) for i, v in enumerate(batch)]
        else:
            kind, items = "tensor", [("0", batch)]
        keys, plain = [], {}
        device = model_device(self._model)
        for key, v in items:
            if isinstance(v, Tensor):
                self.register_buffer(f"t{t}__replay{j}__{key}", v.detach().to(device).clone())
                keys.append(key)
            elif v is None or isinstance(v, (bool, int, float, str)):
                plain[key] = v
            else:
                raise ValueError(f"replay batch entry {key!r} of type {type(v).__name__} cannot be stored")
        return {"kind": kind, "keys": keys, "plain": plain, "order": [k for k, _ in items]}

    def _replay(self, t: int) -> list[Batch]:
        out = []
        for j, spec in enumerate(self._tasks[t]["replay"]):
            vals = {k: self._buffers[f"t{t}__replay{j}__{k}"] for k in spec["keys"]} | spec["plain"]
            ordered = [(k, vals[k]) for k in spec["order"]]
            if spec["kind"] == "dict":
                out.append(dict(ordered))
            elif spec["kind"] == "tuple":
                out.append(tuple(v for _, v in ordered))
            else:
                out.append(ordered[0][1])
        return out

    def _replay_slices(self, t: int) -> list[Batch]:
        """Task ``t``'s replay memory cut into the slices it was stored with."""
        return self._slices(self._replay(t), self._tasks[t].get("slice", self.config.replay_batch_size))

    def _replay_slice(self, t: int) -> tuple[int, Batch]:
        """``(slice index, slice)``: the next replay slice of task ``t`` (rotating)."""
        slices = self._replay_slices(t)
        s = self._replay_cursor % len(slices)
        self._replay_cursor += 1
        return s, slices[s]

    # ------------------------------------------------------------------ state
    def _index(self, task: int) -> int:
        if not self._tasks:
            raise ValueError("nothing consolidated yet: call consolidate(batches) first")
        return range(len(self._tasks))[task]

    def _task_loss_fn(self, t: int) -> LossFn | None:
        fn = self._loss_fns[t] if t < len(self._loss_fns) else None
        return fn if fn is not None else self.loss_fn

    def get_extra_state(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "tasks": [dict(t) for t in self._tasks], "step": self._step,
                "replay_cursor": self._replay_cursor}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._pending = None  # a step begun by with_replay() does not survive a load
        self._tasks = [dict(t) for t in state["tasks"]]
        self._step = int(state["step"])
        self._replay_cursor = int(state["replay_cursor"])
        n = len(self._tasks)  # callables are not saved: keep ours, else the constructor's loss_fn
        self._loss_fns = (self._loss_fns + [None] * n)[:n]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[no-untyped-def]
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, Mapping) and "tasks" in extra:
            if int(extra.get("version", 1)) < 2:
                state_dict = _upgrade_v1(state_dict, prefix, extra)
            device = next(iter(self._buffers.values())).device if self._buffers else None
            adopt_state_dict_buffers(self, state_dict, prefix, device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        c = self.config
        return (f"curvature={c.curvature!r}, strength={c.strength}, k={c.k}, replay_weight={c.replay_weight}, "
                f"replay_samples={c.replay_samples}, tasks={self.num_tasks}")


def _cut(batch: Batch, idx: Tensor, size: int) -> Batch:
    """Rows ``idx`` of every tensor of ``batch`` whose first dimension is the batch size."""
    def cut(v: Any) -> Any:
        return v[idx.to(v.device)] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == size else v

    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(cut(v) for v in batch)
    return cut(batch)


def _upgrade_v1(state_dict: Mapping[str, Any], prefix: str, extra: Mapping[str, Any]) -> dict[str, Any]:
    """A version-1 state (one ``θ*`` / eigenvector buffer per parameter, no KL teachers, no drift
    reference) as version 2: the per-parameter buffers concatenated into the flat ones, the stored
    eigenvalues as the drift reference. Returns a new dict (the caller's is not changed)."""
    out = dict(state_dict)
    tasks = []
    for t, task in enumerate(extra["tasks"]):
        names = list(task["shapes"])
        anchors = [out.pop(prefix + buffer_key(f"t{t}__anchor__", n)) for n in names]
        k = int(task["k"])
        vecs = [out.pop(prefix + buffer_key(f"t{t}__vectors__", n)).reshape(k, -1) for n in names]
        out[prefix + f"t{t}__anchor"] = torch.cat([a.reshape(-1) for a in anchors])
        out[prefix + f"t{t}__vectors"] = torch.cat(vecs, dim=1)
        out[prefix + f"t{t}__reference"] = out[prefix + f"t{t}__eigenvalues"].clone()
        tasks.append({**task, "teachers": 0})  # slices: the loading module's replay_batch_size, as in v1
    out[prefix + "_extra_state"] = {**extra, "version": _STATE_VERSION, "tasks": tasks}
    return out


_PAD_VALUES = {"input_ids": 0, "attention_mask": 0, "labels": -100}


def _stack_padded(batches: list[Batch]) -> dict[str, Tensor] | None:
    """Dict batches of ``(B_i, T_i)`` tensors with the same keys in any order (of ``input_ids``,
    ``attention_mask``, ``labels``; the first batch's order is kept) stacked along the rows into one ``(Σ B_i, max T_i)`` batch,
    each right-padded with ``input_ids = 0``, ``attention_mask = 0`` and ``labels = -100``;
    ``None`` when they cannot be: not dicts, other or unequal keys, other shapes or dtypes, or
    unequal lengths without an ``attention_mask`` to hide the padding."""
    if not all(isinstance(b, Mapping) for b in batches):
        return None
    keys = list(batches[0])
    if not keys or any(set(b) != set(keys) for b in batches) or not set(keys) <= set(_PAD_VALUES):
        return None
    tensors = [[b[k] for k in keys] for b in batches]
    if not all(isinstance(v, Tensor) and v.dim() == 2 for row in tensors for v in row):
        return None
    lengths = {v.shape[1] for row in tensors for v in row}
    if any(len({v.shape[0] for v in row}) != 1 or len({v.shape[1] for v in row}) != 1 for row in tensors):
        return None
    if any(len({row[i].dtype for row in tensors}) != 1 for i in range(len(keys))):
        return None
    if len(lengths) > 1 and "attention_mask" not in keys:
        return None
    width = max(lengths)
    return {k: torch.cat([F.pad(row[i], (0, width - row[i].shape[1]), value=_PAD_VALUES[k]) for row in tensors])
            for i, k in enumerate(keys)}


def _clip_gradient(value: Tensor, params: list[nn.Parameter], max_norm: float) -> Tensor:
    """``value`` with its gradient w.r.t. ``params`` clipped to L2 norm ``max_norm``.

    Returns ``value.detach() + (L − L.detach())`` with ``L = Σ_p ⟨p, ĝ_p⟩``, ``ĝ = g·min(1,
    max_norm/‖g‖)`` and ``g = ∂value/∂params`` (taken here, once; ``value``'s graph is freed): the
    same value, gradient ``ĝ``. A non-finite ``g`` gives a zero gradient. Outside ``enable_grad``
    (or when ``value`` has no graph) ``value`` is returned as is.
    """
    if not (torch.is_grad_enabled() and value.requires_grad):
        return value
    grads = torch.autograd.grad(value, params, allow_unused=True)
    pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
    if not pairs:
        return value.detach().requires_grad_()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.promote_types(g.dtype, torch.float32)) for _, g in pairs]))
    scale = torch.where(torch.isfinite(norm), (max_norm / (norm + 1e-12)).clamp(max=1.0), torch.zeros_like(norm))
    lin = sum((p * (g * scale.to(g.dtype))).sum() for p, g in pairs)
    return value.detach() + (lin - lin.detach()).to(value.dtype)
