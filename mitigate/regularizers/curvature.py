"""Curvature regularizer: keep the loss landscape of earlier tasks from flattening.

Sequential fine-tuning flattens the loss landscape around earlier tasks' minima: their top
Hessian eigenvalue falls by ~75% after three later tasks and the flattening precedes behavioural
forgetting (Mechanistic Analysis of Catastrophic Forgetting in LLMs, arXiv 2601.18699, §2.6);
"if curvature regularization maintains Hessian eigenvalues within 20% of original values, this
mechanism is substantially suppressed". This module is that regularizer.

At the end of task ``t`` (:meth:`CurvatureRegularizer.consolidate`) it stores ``θ*_t``, the top-k
eigenpairs ``(λ_{t,i}, v_{t,i})`` of that task's loss Hessian (Lanczos, :mod:`mitigate.curvature`)
and a small replay memory (a few batches, on CPU). While training later tasks it returns

    curv(θ) = strength · ( w_a · Σ_t ½ Σ_i λ_{t,i} ⟨v_{t,i}, θ − θ*_t⟩²
                         + w_p · Σ_t Σ_i ((v_{t,i}ᵀ H_t(θ; s) v_{t,i} − v_{t,i}ᵀ H_t(θ*_t; s) v_{t,i}) / λ_{t,i})² )

* The **anchor** term is the low-rank Laplace approximation of task ``t``'s loss around
  ``θ*_t`` (a rank-k quadratic: cheap, every step).
* The **preservation** term evaluates the Rayleigh quotients ``v_iᵀ H_t(θ) v_i`` of the
  *current* parameters on a replay batch of task ``t`` through a differentiable Hessian-vector
  product (third-order gradient), penalising the relative change of the curvature along the
  stored eigen-directions. It is amortised: computed every ``every`` calls and multiplied by
  ``every`` on those calls, zero on the others, so its expected gradient per step is unchanged
  while costing ``1/every`` of the work. Each evaluation uses one slice ``s`` of
  ``replay_batch_size`` samples (rotating through the replay memory), and compares against that
  same slice's Rayleigh quotient at ``θ*_t``, stored at consolidation: a small slice's curvature
  differs from ``λ_{t,i}`` (measured on all the consolidation data), so comparing it with
  ``λ_{t,i}`` would make the term large at ``θ*_t`` itself and push the model away from the old
  solution. Normalising by ``λ_{t,i}`` keeps it a relative change. Under DDP the slice estimates
  are averaged across ranks (differentiably), so every rank adds the same penalty.

Only positive eigenvalues are kept (the relative preservation error divides by ``λ_i``): a
non-positive ``λ_i`` (or a numerically zero one, ``λ_i ≤ 1e-6·max|λ|``) is dropped with a warning,
and consolidation fails when none is positive.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
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
    HessianOperator,
    as_batch_list,
    hessian_eigenvalues,
    rayleigh_quotients,
    unwrap_model,
)

__all__ = ["CurvatureConfig", "CurvatureDrift", "CurvatureRegularizer"]

logger = logging.getLogger(__name__)

# eigenvalues at or below this fraction of the largest |λ| are numerically zero (dropped)
_ZERO_EIGENVALUE_RTOL = 1e-6


@dataclass
class CurvatureConfig:
    """Settings of :class:`CurvatureRegularizer` (validated on construction).

    Attributes:
        strength: overall multiplier of the penalty (≥ 0).
        k: eigenpairs stored per task (top-k of the task's loss Hessian). Default 1: λ_max, the
            quantity whose collapse marks the flattening; the preservation term costs one
            third-order product per eigenpair, so its time grows linearly in ``k``.
        params: which parameters the eigenvectors live on (``None``: all trainable; e.g.
            ``r".*self_attn\\..*"`` for attention only, or the LoRA parameters on PEFT models).
        every: the preservation term is computed every ``every`` calls (×``every``), else 0.
        replay_batches: batches of each task kept (CPU) for the preservation term; 0 disables it.
        replay_batch_size: samples per preservation evaluation, rotating through the stored
            batches (``None``: a whole stored batch). Its cost is a third-order backward, so a
            small slice keeps the amortised overhead low; one LM sample still averages the curvature
            over all its tokens, and the slices rotate so the whole memory is used over time.
        anchor_weight: ``w_a``, weight of the low-rank Laplace anchor term.
        preservation_weight: ``w_p``, weight of the eigenvalue-preservation term.
        tolerance: ``τ``, relative curvature change left unpenalised: each eigenpair contributes
            ``(|dᵢ| − τ)₊²`` with ``dᵢ = (qᵢ(θ) − qᵢ(θ*))/λᵢ``. 0 (default) is the plain squared
            relative error; 0.2 is the seed's "within 20 % of the original values".
        collapse_only: penalise only falling curvature (``(−dᵢ − τ)₊²``): the seed's mechanism is
            the flattening; a sharpening old minimum needs no restoring force.
        preservation_max_norm: clip the preservation term's gradient (Σ over tasks, unweighted,
            before ×``every``) to this L2 norm; ``None`` (default) is the exact formula. The
            term's gradient is a third-order derivative: on a small LM a single replay slice's
            ``vᵀHv`` can move by several λ within ten AdamW steps, and its gradient reach 10⁴–10⁷
            times the task gradient; Adam turns each such burst into ~√(1/(1−β₂)) lr-sized steps
            in every coordinate it dominates. The clipped term has the same value, and a gradient
            along the same direction with norm ≤ this; it costs no extra backward (the gradient is
            taken once inside ``forward`` and passed on through a linear surrogate).
        method / max_iter / tol / seed: passed to :func:`mitigate.curvature.hessian_eigenvalues`.
        eval_mode: compute eigenpairs and the preservation term with dropout off.
        dtype: storage dtype of ``θ*`` and the eigenvectors.
    """

    strength: float = 1.0
    k: int = 1
    params: ParamSelector = None
    every: int = 10
    replay_batches: int = 1
    replay_batch_size: int | None = 1
    anchor_weight: float = 1.0
    preservation_weight: float = 1.0
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
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name}={v!r} must be a finite number >= 0")

        for name in ("strength", "anchor_weight", "preservation_weight", "tolerance"):
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
        if not (isinstance(self.replay_batches, int) and self.replay_batches >= 0):
            raise ValueError(f"replay_batches={self.replay_batches!r} must be an int >= 0 (0: no replay)")
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
    """Curvature of one consolidated task now, against the stored eigenvalues.

    Attributes:
        task: task index.
        eigenvalues: ``(k,)`` stored ``λᵢ``.
        rayleigh: ``(k,)`` current ``vᵢᵀ H(θ) vᵢ`` on the task's replay memory (or given batches).
        ratio: ``rayleigh / eigenvalues`` (1 = curvature preserved; 0.25 = flattened by 75%).
    """

    task: int
    eigenvalues: Tensor
    rayleigh: Tensor
    ratio: Tensor


class CurvatureRegularizer(nn.Module):
    """Anchor + eigenvalue-preservation penalty (see the module docstring for the formula).

    ``curv()`` (``forward``) returns a differentiable scalar to add to the loss; call it once per
    optimizer step (the call count drives ``every``; pass ``step=`` to drive it yourself).

    Args:
        model: the model being fine-tuned (DDP unwrapped, eager attention for the preservation
            term). A plain reference, not a submodule: ``state_dict()`` holds only this module's
            buffers.
        strength, k, ...: see :class:`CurvatureConfig`.
        loss_fn: ``loss_fn(model, batch) -> scalar`` used on replay batches when
            :meth:`consolidate` got none (and after loading a state dict); ``None``:
            ``model(**batch).loss``.
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
        every: int = 10,
        replay_batches: int = 1,
        replay_batch_size: int | None = 1,
        anchor_weight: float = 1.0,
        preservation_weight: float = 1.0,
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
        config: CurvatureConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = config or CurvatureConfig(
            strength=strength, k=k, params=params, every=every, replay_batches=replay_batches,
            replay_batch_size=replay_batch_size, anchor_weight=anchor_weight,
            preservation_weight=preservation_weight, tolerance=tolerance,
            collapse_only=collapse_only, preservation_max_norm=preservation_max_norm, method=method, max_iter=max_iter, tol=tol,
            seed=seed, eval_mode=eval_mode, dtype=dtype,
        )
        object.__setattr__(self, "_model", unwrap_model(model))  # not a submodule
        reject_sharded(select_parameters(self._model, self.config.params).items(), "CurvatureRegularizer")
        self.loss_fn = loss_fn
        self._tasks: list[dict[str, Any]] = []  # {"shapes", "k", "replay": [{"keys", "kind"}]}
        self._loss_fns: list[LossFn | None] = []
        self._step = 0
        self._replay_cursor = 0
        self._flat: dict[int, tuple[Tensor, Tensor]] = {}  # task -> (θ* flat (n,), V flat (k, n))

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

    def eigenvectors(self, task: int = -1) -> list[dict[str, Tensor]]:
        """Stored unit eigenvectors of task ``task``: ``k`` dicts name -> tensor."""
        t = self._index(task)
        stacked = {n: self._buffers[buffer_key(f"t{t}__vectors__", n)] for n in self._tasks[t]["shapes"]}
        return [{n: v[i] for n, v in stacked.items()} for i in range(self._tasks[t]["k"])]

    def anchor(self, task: int = -1) -> dict[str, Tensor]:
        """Stored ``θ*`` of task ``task``."""
        t = self._index(task)
        return {n: self._buffers[buffer_key(f"t{t}__anchor__", n)] for n in self._tasks[t]["shapes"]}

    @torch.no_grad()
    def consolidate(self, batches: Batch | Iterable[Batch], loss_fn: LossFn | None = None) -> EigenResult:
        """End of a task: store ``θ*``, the top-k Hessian eigenpairs of the task's loss at ``θ*``
        and ``replay_batches`` batches (CPU) for the preservation term.

        Args:
            batches: one batch (dict) or an iterable of batches of the finished task.
            loss_fn: ``loss_fn(model, batch) -> scalar`` (``None``: the constructor's, else
                ``model(**batch).loss``); remembered for this task's replay batches.

        Returns:
            the :class:`~mitigate.curvature.EigenResult` (all k pairs, before dropping
            non-positive eigenvalues).

        Raises:
            ValueError: no batches, a non-finite loss, or no positive eigenvalue.
            AttentionKernelError: SDPA/flash attention (load with ``attn_implementation="eager"``).
        """
        cfg = self.config
        model = self._model
        blist = as_batch_list(batches)
        fn = loss_fn if loss_fn is not None else self.loss_fn
        device = model_device(model)
        with preserve_state(model, mode=False if cfg.eval_mode else None):
            for b in blist:
                loss = resolve_loss_fn(fn)(model, move_batch(b, device))
                if not bool(torch.isfinite(loss).all()):
                    raise ValueError(f"non-finite loss {float(loss)} on a consolidation batch")
        with torch.enable_grad():
            eig = hessian_eigenvalues(
                model, blist, fn, k=cfg.k, params=cfg.params, method=cfg.method,
                max_iter=cfg.max_iter, tol=cfg.tol, seed=cfg.seed + len(self._tasks),
                eval_mode=cfg.eval_mode,
            )
        values = eig.values
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"non-finite Hessian eigenvalues {values.tolist()}")
        # numerically zero counts as non-positive: 1/λᵢ would explode the preservation term
        floor = _ZERO_EIGENVALUE_RTOL * float(values.abs().max())
        keep = [i for i, lam in enumerate(values.tolist()) if lam > floor]
        if len(keep) < len(values):
            dropped = [values[i].item() for i in range(len(values)) if i not in keep]
            if not keep:
                raise ValueError(
                    f"no positive Hessian eigenvalue among the top {len(values)} ({values.tolist()}): "
                    "the preservation term is defined for positive curvature only; consolidate at a "
                    "(near-)minimum of the task's loss"
                )
            warnings.warn(
                f"CurvatureRegularizer: dropping non-positive eigenvalues {dropped} (the "
                "preservation term divides by λᵢ and is defined for positive curvature only)",
                stacklevel=2,
            )
        names = eig.names
        params = dict(model.named_parameters())
        t = len(self._tasks)
        dt = cfg.dtype
        self.register_buffer(f"t{t}__eigenvalues", values[keep].to(device=device, dtype=torch.float64))
        for n in names:
            p = params[n]
            self.register_buffer(buffer_key(f"t{t}__anchor__", n), p.detach().to(dt).clone())
            self.register_buffer(
                buffer_key(f"t{t}__vectors__", n),
                torch.stack([eig.vectors[i][n] for i in keep]).to(device=p.device, dtype=dt).contiguous(),
            )
        replay = []
        for j, b in enumerate(blist[: cfg.replay_batches]):
            replay.append(self._store_replay(t, j, b))
        self._tasks.append({"shapes": {n: list(params[n].shape) for n in names}, "k": len(keep), "replay": replay})
        self._loss_fns.append(fn)
        self._flat.pop(t, None)
        if replay and cfg.preservation_weight > 0:  # targets: each replay slice's own vᵢᵀH(θ*)vᵢ
            plist = live_parameters(model, self._tasks[t]["shapes"], f"curvature regularizer task {t}")
            with torch.enable_grad(), preserve_state(model):
                qref = torch.stack([self._rayleigh(t, plist, b).detach() for b in self._replay_slices(t)])
            self.register_buffer(f"t{t}__qref", qref.to(device=device, dtype=torch.float64))
        return eig

    def forward(self, step: int | None = None) -> Tensor:
        """The penalty at the live parameters (see the module docstring).

        Args:
            step: the training step deciding whether the preservation term is computed
                (``step % every == 0``); ``None`` uses (and advances) the internal call counter.

        Returns:
            0-d tensor on the model's device, differentiable w.r.t. the parameters; a zero that
            supports ``.backward()`` before any :meth:`consolidate`.

        Raises:
            StateMismatchError: a stored parameter is missing or changed shape.
        """
        cfg = self.config
        if step is None:
            step = self._step
            self._step += 1
        if not self._tasks:
            return torch.zeros((), device=model_device(self._model), requires_grad=True)
        total: Tensor | None = None
        pres: Tensor | None = None
        preserve = cfg.preservation_weight > 0 and step % cfg.every == 0
        used: dict[int, nn.Parameter] = {}
        for t in range(len(self._tasks)):
            plist = live_parameters(self._model, self._tasks[t]["shapes"], f"curvature regularizer task {t}")
            if cfg.anchor_weight > 0:
                term = self._anchor_term(t, plist) * cfg.anchor_weight
                total = term if total is None else total + term
            if preserve and self._tasks[t]["replay"]:
                term = self._preservation_term(t, plist)
                pres = term if pres is None else pres + term
                used.update((id(p), p) for p in plist)
        if pres is not None:
            if cfg.preservation_max_norm is not None:
                pres = _clip_gradient(pres, list(used.values()), cfg.preservation_max_norm)
            pres = pres * (cfg.preservation_weight * cfg.every)
            total = pres if total is None else total + pres
        if total is None:
            return torch.zeros((), device=model_device(self._model), requires_grad=True)
        return total * cfg.strength

    def anchor_term(self) -> Tensor:
        """``Σ_t ½ Σ_i λ_{t,i} ⟨v_{t,i}, θ − θ*_t⟩²`` alone (unweighted), differentiable."""
        terms = [self._anchor_term(t, live_parameters(self._model, task["shapes"], f"task {t}"))
                 for t, task in enumerate(self._tasks)]
        return torch.stack(terms).sum() if terms else torch.zeros((), device=model_device(self._model), requires_grad=True)

    def preservation_term(self, batches: Batch | Iterable[Batch] | None = None) -> Tensor:
        """``Σ_t Σ_i ((v_iᵀ H_t(θ) v_i − λ_i)/λ_i)²`` alone (unweighted, not amortised),
        differentiable; on the next replay slice of each task, or on ``batches`` (first batch)."""
        terms = []
        for t, task in enumerate(self._tasks):
            plist = live_parameters(self._model, task["shapes"], f"task {t}")
            batch = None if batches is None else as_batch_list(batches)[0]
            terms.append(self._preservation_term(t, plist, batch))
        return torch.stack(terms).sum() if terms else torch.zeros((), device=model_device(self._model), requires_grad=True)

    @torch.no_grad()
    def drift(self, batches: Batch | Iterable[Batch] | None = None, loss_fn: LossFn | None = None) -> list[CurvatureDrift]:
        """Current Rayleigh quotients ``vᵢᵀ H(θ) vᵢ`` of every task against its stored ``λᵢ``.

        Args:
            batches: batches to measure ``H`` on (all tasks); ``None``: each task's replay memory.
            loss_fn: loss for ``batches`` (``None``: each task's own).

        Returns:
            one :class:`CurvatureDrift` per task.

        Raises:
            ValueError: a task without replay memory and no ``batches``.
            StateMismatchError: a stored parameter is missing or changed shape.
        """
        out = []
        for t, task in enumerate(self._tasks):
            live_parameters(self._model, task["shapes"], f"curvature regularizer task {t}")
            blist = self._replay(t) if batches is None else as_batch_list(batches)
            if not blist:
                raise ValueError(f"task {t} has no replay memory (replay_batches=0): pass batches=")
            fn = loss_fn if loss_fn is not None else self._task_loss_fn(t)
            names = list(task["shapes"])
            with torch.enable_grad(), preserve_state(self._model, mode=False if self.config.eval_mode else None):
                op = HessianOperator(self._model, blist, fn, names)
                qs = []
                for v in self.eigenvectors(t):
                    flat = op.from_dict(v).to(op.device)
                    qs.append(torch.dot(flat, op.matvec(flat)))
            lam = self.eigenvalues(t).double().cpu()
            q = torch.stack(qs).double().cpu()
            out.append(CurvatureDrift(task=t, eigenvalues=lam, rayleigh=q, ratio=q / lam))
        return out

    # ------------------------------------------------------------------ terms
    def _flat_state(self, t: int) -> tuple[Tensor, Tensor]:
        cached = self._flat.get(t)
        if cached is None:
            names = list(self._tasks[t]["shapes"])
            anchor = torch.cat([self._buffers[buffer_key(f"t{t}__anchor__", n)].reshape(-1) for n in names])
            k = self._tasks[t]["k"]
            vecs = torch.cat([self._buffers[buffer_key(f"t{t}__vectors__", n)].reshape(k, -1) for n in names], dim=1)
            cached = self._flat[t] = (anchor, vecs)
        return cached

    def _anchor_term(self, t: int, plist: list[nn.Parameter]) -> Tensor:
        anchor, vecs = self._flat_state(t)  # (n,), (k, n)
        theta = torch.cat([p.reshape(-1) for p in plist]).to(device=anchor.device, dtype=anchor.dtype)
        c = vecs @ (theta - anchor)  # (k,) ⟨vᵢ, θ − θ*⟩
        lam = self._buffers[f"t{t}__eigenvalues"].to(device=c.device, dtype=c.dtype)
        return 0.5 * torch.dot(lam, c * c).to(plist[0].device)

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

    def _preservation_term(self, t: int, plist: list[nn.Parameter], batch: Batch | None = None) -> Tensor:
        """``Σᵢ ((qᵢ(θ) − qᵢ(θ*)) / λᵢ)²`` on the next replay slice, whose ``qᵢ(θ*)`` was stored at
        consolidation (exactly 0 at ``θ*`` whatever the slice); with explicit ``batch``, the
        target is ``λᵢ`` itself (measured on the consolidation data)."""
        lam = self._buffers[f"t{t}__eigenvalues"].to(plist[0].device)
        if batch is None:
            s, batch = self._replay_slice(t)
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
    def _store_replay(self, t: int, j: int, batch: Batch) -> dict[str, Any]:
        if isinstance(batch, Mapping):
            kind, items = "dict", list(batch.items())
        elif isinstance(batch, (tuple, list)):
            kind, items = "tuple", [(str(i), v) for i, v in enumerate(batch)]
        else:
            kind, items = "tensor", [("0", batch)]
        keys, plain = [], {}
        for key, v in items:
            if isinstance(v, Tensor):
                self.register_buffer(f"t{t}__replay{j}__{key}", v.detach().cpu().clone())
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
        """Task ``t``'s replay memory cut into consecutive slices of ``replay_batch_size``
        samples (a whole batch each when ``None``). Deterministic: the preservation targets
        stored at consolidation are indexed by these slices."""
        size_cfg = self.config.replay_batch_size
        out: list[Batch] = []
        for batch in self._replay(t):
            size = batch_size_of(batch)
            if size_cfg is None or size_cfg >= size:
                out.append(batch)
                continue
            for start in range(0, size, size_cfg):
                idx = torch.arange(start, min(start + size_cfg, size))

                def cut(v: Any, idx: Tensor = idx, size: int = size) -> Any:
                    return v[idx] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == size else v

                if isinstance(batch, Mapping):
                    out.append({k: cut(v) for k, v in batch.items()})
                elif isinstance(batch, tuple):
                    out.append(tuple(cut(v) for v in batch))
                else:
                    out.append(cut(batch))
        return out

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

    def _apply(self, fn: Any, recurse: bool = True) -> CurvatureRegularizer:  # .to(), .cuda(), .double()
        self._flat.clear()
        return super()._apply(fn, recurse)

    def get_extra_state(self) -> dict[str, Any]:
        return {"version": 1, "tasks": [dict(t) for t in self._tasks], "step": self._step,
                "replay_cursor": self._replay_cursor}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._tasks = [dict(t) for t in state["tasks"]]
        self._step = int(state["step"])
        self._replay_cursor = int(state["replay_cursor"])
        n = len(self._tasks)  # callables are not saved: keep ours, else the constructor's loss_fn
        self._loss_fns = (self._loss_fns + [None] * n)[:n]
        self._flat.clear()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):  # type: ignore[no-untyped-def]
        if prefix + "_extra_state" in state_dict:
            device = next(iter(self._buffers.values())).device if self._buffers else None
            adopt_state_dict_buffers(self, state_dict, prefix, device)
            self._flat.clear()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        c = self.config
        return f"strength={c.strength}, k={c.k}, every={c.every}, tasks={self.num_tasks}"


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
