"""Gradient projection against forgetting: A-GEM, OGD and PCGrad as an optimizer wrapper.

:class:`GradientProjection` wraps any ``torch.optim.Optimizer`` and rewrites the accumulated
gradient inside ``step()`` before the base optimizer sees it. Three rules, one per ``mode``:

* ``"agem"`` — Averaged GEM (Chaudhry et al. 2019, *Efficient Lifelong Learning with A-GEM*).
  A replay memory of earlier tasks' batches gives a reference gradient ``g_ref`` at the current
  parameters; when the update conflicts with it the conflicting component is removed::

      g̃ = g − (g·g_ref / g_ref·g_ref) g_ref   if g·g_ref < 0,   else g̃ = g.

* ``"ogd"`` — Orthogonal Gradient Descent (Farajtabar et al. 2020). ``remember()`` stores an
  orthonormal basis ``U = [u₁ … u_k]`` of earlier tasks' gradient directions; every step moves
  in the orthogonal complement::

      g̃ = g − Σᵢ (g·uᵢ) uᵢ.

* ``"pcgrad"`` — Projecting Conflicting Gradients (Yu et al. 2020, *Gradient Surgery for
  Multi-Task Learning*). For objectives with gradients ``g₁ … g_n``, each ``gᵢ`` is projected
  off every *original* ``gⱼ`` it conflicts with, the ``j`` taken in random order, then summed::

      gᵢ ← gᵢ − (gᵢ·gⱼ / ‖gⱼ‖²) gⱼ   if gᵢ·gⱼ < 0;      g̃ = Σᵢ gᵢ.

  Two ways to use it: ``proj.pcgrad_backward([loss_task, loss_replay])`` instead of
  ``loss.backward()`` (combined gradient written to ``.grad``, accumulates like ``backward``),
  or — working bare under ``Trainer`` — ``remember()`` earlier tasks and let ``step()`` add a
  replay objective: ``g̃ = PCGrad(g_task, g_replay)`` with ``g_replay`` a memory gradient.

**The update, not only the gradient** (``hold="update"``, the default). Each rule above acts on
the gradient before the base optimizer; Adam's ``√v̂`` scaling and decoupled weight decay then
move ``θ`` along the protected directions anyway (|UΔθ|/|Δθ| of 0.05–0.10 measured under
AdamW). With ``hold="update"`` the same rule is applied once more to the base step's final
update ``Δθ = θ_after − θ_before`` (:meth:`GradientProjection.step` gives the formulas), at the
cost of one copy of the selected parameters during ``step()``; ``hold="gradient"`` is the
papers' gradient-only rule. ``ogd_basis="gt_logit"`` stores Farajtabar et al.'s ground-truth-logit
gradients instead of loss gradients.

The vector space is the selected trainable parameters (``params=``) that the wrapped optimizer
owns, flattened in ``named_parameters()`` order; ``granularity="tensor"`` applies the rule to each
parameter tensor separately instead. Arithmetic is float32 (float64 stays float64); a step does
no host synchronisation (statistics are accumulated on the device).

Faults: a non-finite gradient (fp16 overflow) is passed to the base optimizer untouched and
counted; ``step()`` with nothing remembered is a no-op (one warning); an OGD basis recorded for
other parameter names or shapes, or an agem/pcgrad memory for other shapes, raises
:class:`~mitigate.errors.StateMismatchError`. The agem/pcgrad memory holds batches: it follows
parameters frozen or unfrozen since (a next task's ``Freeze``), the cached reference by name.

Modes and side effects: memory gradients (agem/pcgrad, at step time) are taken in the model's
current train/eval mode; OGD directions (at ``remember()``) in eval mode. Neither changes the
model's mode or any ``.grad`` (gradients come from ``torch.autograd.grad``, or under FSDP2
``backward()``, inside :func:`~mitigate._utils.preserve_state`).

Checkpoints: ``state_dict()`` holds the base optimizer's state and the wrapper's memory (CPU
tensors), basis, cached reference gradient, generator state and counters — plain tensors and
Python, loadable with ``torch.load(weights_only=True)``. To resume, build the wrapper again with
``model=`` (and ``loss_fn=``), then ``load_state_dict``: the next step is bit-identical.

Distributed (DDP): ``step()`` sees already all-reduced gradients. ``remember()`` averages the
OGD directions over ranks (each rank passes its shard of the same batches); A-GEM/PCGrad
average the memory gradient over ranks at step time, so every rank takes the same step (ranks
keep their own shard's batches in memory). OGD ``remember()`` with fewer batches on some ranks
averages direction i over the ranks that have a batch i (FSDP2: same count on every rank).
``pcgrad_backward`` averages the per-objective gradients itself: run its forward under
``model.no_sync()``.

FSDP2 (``fully_shard``, every selected parameter a ``DTensor`` sharded over one 1-D mesh): each
rank works on its shard of every flat vector. Memory / remembered gradients come from
``loss.backward()`` (``torch.autograd.grad`` w.r.t. a sharded parameter returns ``None``), which
FSDP reduce-scatters — averaged over ranks, so each rank's shard of its data gives the shard of
the global-batch gradient; the user's ``.grad`` is saved and restored around it. Every dot
product and norm is a local partial sum all-reduced (``reduce=`` of the pure functions); the OGD
orthonormalisation is Gram–Schmidt with all-reduced inner products (both ``orthogonalization``
choices), and ``directions="sample"`` takes the exact per-sample gradient of every rank's samples
(:func:`~mitigate._utils.sharded_per_sample_grads`). The basis and the cached reference gradient
are this rank's shard: ``state_dict()`` is per rank (it records rank and world size and refuses
to load on another rank). ``pcgrad_backward`` runs one ``backward()`` per loss (no ``no_sync``).
A model with some selected parameters sharded and others plain raises ``NotImplementedError``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import grad, vmap
from torch.optim import Optimizer
from torch.utils._pytree import tree_map

from mitigate._utils import (
    Batch,
    LossFn,
    ParamSelector,
    ShardedByName,
    all_reduce_mean_,
    all_reduce_sum_,
    batch_size_of,
    check_shard,
    dist_ready,
    input_grad_hooks_removed,
    is_dtensor,
    local_tensor,
    move_batch,
    preserve_state,
    progress_bar,
    resolve_loss_fn,
    select_parameters,
    shard_info,
    shard_like,
    sharded_per_sample_grads,
    sharded_state,
)
from mitigate.curvature import functional_loss, unwrap_model
from mitigate.errors import StateMismatchError
from mitigate.optim._base import OptimizerWrapper, finite_sq_norm
from mitigate.reports import TaskEndReport

logger = logging.getLogger(__name__)

Mode = Literal["agem", "ogd", "pcgrad"]
_MODES = ("agem", "ogd", "pcgrad")
_GRANULARITIES = ("global", "tensor")
_DIRECTIONS = ("batch", "sample")
_ORTHO = ("gram_schmidt", "qr")
_HOLDS = ("gradient", "update")
_OGD_BASES = ("loss", "gt_logit")
_TINY = 1e-30  # denominator floor: ‖g_ref‖² of zero never divides

Reduce = Callable[[Tensor], Tensor]  # in-place sum over ranks of partial (shard-local) dot products


_CONVERT_CHUNK = 16384  # columns per float32 conversion of a low-precision basis (fits L2)


def _reduced(x: Tensor, reduce: Reduce | None) -> Tensor:
    """``x`` summed over ranks by ``reduce`` (a fresh tensor is reduced in place), or ``x``."""
    return x if reduce is None else reduce(x)


# ====================================================================== configuration


@dataclass
class ProjectionConfig:
    """Options of :class:`GradientProjection` (every constructor keyword lands here).

    Attributes:
        mode: ``"agem"``, ``"ogd"`` or ``"pcgrad"`` (see the module docstring).
        granularity: ``"global"`` projects the flattened vector of all selected parameters;
            ``"tensor"`` applies the rule to each parameter tensor on its own.
        memory_size: agem/pcgrad — most batches kept in the replay memory (reservoir sampling
            over every batch ever remembered, all tasks together).
        ref_batches: agem/pcgrad — memory batches averaged into one reference gradient
            (default 4: A-GEM's reference batch is much larger than the training batch, 256 vs
            10 in the paper; on the fact-recall testbed 4 batches of 16 kept 28–99 % of the old
            task where 1 kept 24–67 %, each extra batch costs one forward + backward per step).
        ref_every: agem/pcgrad — recompute the reference gradient every N steps and reuse it in
            between (1 = every step, the paper's rule).
        seed: seeds the wrapper's own ``torch.Generator`` (reservoir, memory sampling, PCGrad
            order); its state is saved in ``state_dict()``.
        directions: ogd — one direction per remembered ``"batch"`` (mean-loss gradient) or per
            ``"sample"`` (per-example gradients via ``torch.func.vmap``).
        directions_per_task: ogd — at most this many new directions per ``remember()``.
        orthogonalization: ogd — ``"gram_schmidt"`` (modified, re-orthogonalised twice) or
            ``"qr"`` (Householder QR of the new directions after projecting out the old ones).
        basis_dtype: ogd — storage dtype of the basis (``"float32"``, ``"bfloat16"``, ...).
            Projection arithmetic is float32 regardless.
        basis_device: ogd — where the basis is stored (``None``: the parameters' device;
            ``"cpu"`` saves accelerator memory at the cost of a copy per step).
        max_basis: ogd — cap on the total number of basis vectors (see ``on_full``).
        on_full: ogd — what a ``remember()`` does when the new directions do not fit in
            ``max_basis``: ``"compress"`` keeps the ``max_basis`` leading singular directions of
            the energy-weighted old basis and the task's gradients together (each task brings
            unit energy; the basis stores every direction's energy — see
            :func:`_compress_basis`), so every task keeps its leading directions; ``"drop"``
            keeps the old basis and drops the new directions with a warning (later tasks get no
            protection).
        tol: ogd — a new direction whose norm after removing the existing basis is below
            ``tol`` × its original norm is linearly dependent and is dropped.
        hold: ``"gradient"`` projects only the gradient, before the base optimizer; ``"update"``
            also projects the base optimizer's *final* update ``Δθ = θ_after − θ_before``
            (preconditioning and weight decay included) after its step, so the protected
            directions hold under Adam (see :meth:`GradientProjection.step`). Costs one copy of
            the selected parameters per step. Default ``"update"`` (as LRCP's ``hold``): on the
            fact-recall testbed it kept as much or more of the old task for A-GEM (29 → 67 %
            on a LoRA run, see ``tests/test_defaults_projection.py``).
        ogd_basis: ogd — what a direction is the gradient of: ``"loss"`` (the task loss, per
            batch or per sample) or ``"gt_logit"`` (Farajtabar et al. 2020's OGD-GTL: the
            ground-truth logit ``z_y(x)`` at every labelled position, one direction per
            position; needs dict batches with ``"labels"`` and a model returning logits, or an
            output with ``.logits``, for the other entries; ``loss_fn`` is not used).
    """

    mode: Mode = "agem"
    granularity: Literal["global", "tensor"] = "global"
    memory_size: int = 64
    ref_batches: int = 4  # the paper's reference batch is large (256 vs 10); 1 kept 24–47 % here
    ref_every: int = 1
    seed: int = 0
    directions: Literal["batch", "sample"] = "batch"
    directions_per_task: int = 16
    orthogonalization: Literal["gram_schmidt", "qr"] = "gram_schmidt"
    basis_dtype: str = "float32"
    basis_device: str | None = None
    max_basis: int = 256
    on_full: Literal["compress", "drop"] = "compress"
    tol: float = 1e-5
    hold: Literal["gradient", "update"] = "update"
    ogd_basis: Literal["loss", "gt_logit"] = "loss"

    def __post_init__(self) -> None:
        def choice(name: str, allowed: tuple[str, ...]) -> None:
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {allowed}")

        choice("mode", _MODES)
        choice("granularity", _GRANULARITIES)
        choice("directions", _DIRECTIONS)
        choice("orthogonalization", _ORTHO)
        choice("on_full", ("compress", "drop"))
        choice("hold", _HOLDS)
        choice("ogd_basis", _OGD_BASES)
        for name in ("memory_size", "ref_batches", "ref_every", "directions_per_task", "max_basis"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r} must be an integer")
        if not (isinstance(self.tol, (int, float)) and 0.0 <= float(self.tol) < 1.0):
            raise ValueError(f"tol={self.tol!r} must be a float in [0, 1)")
        if isinstance(self.basis_dtype, torch.dtype):
            self.basis_dtype = str(self.basis_dtype).removeprefix("torch.")
        dtype = getattr(torch, str(self.basis_dtype), None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(
                f"basis_dtype={self.basis_dtype!r} is not a floating torch dtype; "
                "use e.g. 'float32' or 'bfloat16'"
            )
        if self.basis_device is not None:
            if isinstance(self.basis_device, torch.device):
                self.basis_device = str(self.basis_device)
            try:
                torch.device(self.basis_device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"basis_device={self.basis_device!r} is not a device: {exc}") from None

    @property
    def torch_basis_dtype(self) -> torch.dtype:
        return getattr(torch, self.basis_dtype)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (JSON and ``weights_only`` friendly)."""
        return dataclasses.asdict(self)


@dataclass
class RememberReport:
    """What :meth:`GradientProjection.remember` recorded.

    Attributes:
        task: index of the task just remembered (0 for the first).
        added: batches inserted into the memory (agem/pcgrad) or basis vectors added (ogd).
        memory_batches: batches now held in the replay memory.
        basis_size: vectors now in the OGD basis.
        dropped_energy: ogd — fraction of the remembered gradients' energy (every task counts
            1) that the basis stopped covering in this call (compression or ``on_full="drop"``).
    """

    task: int
    added: int
    memory_batches: int
    basis_size: int
    dropped_energy: float = 0.0


# ====================================================================== the math (pure functions)


def _segment_dots(a: Tensor, b: Tensor, sizes: Sequence[int]) -> Tensor:
    """Per-segment dot products of two flat vectors, shape ``(len(sizes),)``."""
    return torch.stack([torch.dot(x, y) for x, y in zip(a.split(sizes), b.split(sizes))])


@functools.lru_cache(maxsize=32)
def _counts(sizes: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.tensor(sizes, device=device)


def _expand(coef: Tensor, sizes: Sequence[int], total: int) -> Tensor:
    """Repeat per-segment values over their segments, shape ``(total,)`` (no host sync)."""
    return torch.repeat_interleave(coef, _counts(tuple(sizes), coef.device), output_size=total)


@dataclass
class ProjectionResult:
    """One projected gradient with its bookkeeping (all tensors, on the gradient's device).

    Attributes:
        grad: the projected flat gradient ``g̃``, shape ``(D,)`` (``None`` when projected in place).
        projected: bool scalar, whether anything was removed.
        cosine: scalar; agem: cos(g, g_ref); ogd: ‖Uᵀg‖/‖g‖; pcgrad: mean pairwise cosine.
        removed: scalar ‖g − g̃‖ (for pcgrad ‖Σgᵢ − g̃‖).
        finite: bool scalar; ``False`` means the input was non-finite and ``grad`` is the input.
    """

    grad: Tensor | None
    projected: Tensor
    cosine: Tensor
    removed: Tensor
    finite: Tensor


def agem_project(
    g: Tensor, g_ref: Tensor, sizes: Sequence[int] | None = None, reduce: Reduce | None = None
) -> ProjectionResult:
    """A-GEM projection (Chaudhry et al. 2019, eq. 11)::

        g̃ = g − (g·g_ref / g_ref·g_ref) g_ref   if g·g_ref < 0,   else g.

    Args:
        g: flat gradient, shape ``(D,)``.
        g_ref: flat reference gradient, shape ``(D,)``, finite.
        sizes: segment sizes summing to ``D`` for per-tensor projection (``None``: global).
        reduce: sums partial dot products over ranks in place when ``g`` and ``g_ref`` are this
            rank's shards of the vectors (FSDP2: :func:`~mitigate._utils.all_reduce_sum_`);
            ``None``: the vectors are whole.

    Returns:
        :class:`ProjectionResult`. A non-finite ``g`` comes back unchanged (``finite=False``);
        a non-conflicting one bit-identical.
    """
    gg = _reduced(torch.dot(g, g), reduce)
    finite = torch.isfinite(gg)
    if sizes is None:
        dot, rr = _reduced(torch.stack([torch.dot(g, g_ref), torch.dot(g_ref, g_ref)]), reduce).unbind()
        conflict = (dot < 0) & finite & (rr > 0)
        coef = torch.where(conflict, dot / rr.clamp_min(_TINY), torch.zeros_like(dot))
        out = torch.addcmul(g, g_ref, -coef)  # one fused pass: g − coef·g_ref
        removed = coef.abs() * rr.sqrt()
        cos_dot, cos_rr = dot, rr
    else:
        dots, rrs = _reduced(torch.stack([_segment_dots(g, g_ref, sizes), _segment_dots(g_ref, g_ref, sizes)]),
                             reduce).unbind()
        conflict = (dots < 0) & finite & (rrs > 0)
        coef = torch.where(conflict, dots / rrs.clamp_min(_TINY), torch.zeros_like(dots))
        out = torch.addcmul(g, _expand(coef, sizes, g.numel()), g_ref, value=-1.0)
        removed = (coef * coef * rrs).sum().sqrt()
        cos_dot, cos_rr = dots.sum(), rrs.sum()
    cosine = cos_dot / (gg * cos_rr).sqrt().clamp_min(_TINY)
    return ProjectionResult(out, conflict.any(), cosine, removed, finite)


def ogd_project(
    g: Tensor, basis: Tensor, sizes: Sequence[int] | None = None, reduce: Reduce | None = None
) -> ProjectionResult:
    """OGD projection onto the orthogonal complement of ``span(basis)`` (Farajtabar et al. 2020)::

        g̃ = g − Uᵀ(U g) = g − Σᵢ (g·uᵢ) uᵢ.

    Two passes over ``U`` (``c = U g``, then a fused ``addmv``); ``removed = ‖U g‖``.

    Args:
        g: flat gradient, shape ``(D,)``.
        basis: ``U``, shape ``(k, D)``, orthonormal rows (per segment when ``sizes`` is given;
            all-zero rows allowed), same dtype and device as ``g``.
        sizes: segment sizes for per-tensor projection (``None``: global).
        reduce: sums partial dot products over ranks when ``g`` and the columns of ``basis`` are
            this rank's shard (FSDP2); ``None``: whole vectors.

    Returns:
        :class:`ProjectionResult`. A non-finite ``g`` comes back unchanged.
    """
    gg = _reduced(torch.dot(g, g), reduce)
    finite = torch.isfinite(gg)
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    if sizes is None:
        c = torch.where(finite, _reduced(basis @ g, reduce), zero)  # (k,)
        out = torch.addmv(g, basis.t(), c, alpha=-1)  # (D,)
        captured = c.norm()
    else:
        pairs = list(zip(basis.split(sizes, dim=1), g.split(sizes)))
        coefs = [u @ x for u, x in pairs]  # per segment (k,)
        if reduce is not None and coefs:
            coefs = list(_reduced(torch.stack(coefs), reduce).unbind())
        parts, cap = [], []
        for (u, x), c in zip(pairs, coefs):
            c = torch.where(finite, c, zero)
            parts.append(torch.addmv(x, u.t(), c, alpha=-1))
            cap.append(torch.dot(c, c))
        out = torch.cat(parts)
        captured = torch.stack(cap).sum().sqrt()
    cosine = captured / gg.sqrt().clamp_min(_TINY)
    projected = finite if basis.shape[0] > 0 else torch.zeros_like(finite)
    return ProjectionResult(out, projected, cosine, captured, finite)


def ogd_project_(
    grads: Sequence[Tensor],
    basis: Tensor,
    sizes: Sequence[int],
    per_tensor: bool = False,
    blocks: Sequence[Tensor] | None = None,
) -> ProjectionResult:
    """:func:`ogd_project` in place on a list of float32 gradient tensors (no flat copy).

    ``g̃ = g − Uᵀ(U g)`` with ``U g = Σₚ Uₚ gₚ`` accumulated over column blocks ``Uₚ`` of the
    basis (strided views, one ``addmv`` each), then ``gₚ ← gₚ − Uₚᵀ c`` in place. A basis stored
    in another dtype (e.g. bfloat16) is converted to float32 in column chunks of
    ``_CONVERT_CHUNK`` elements per row, so the float32 copy is never materialised whole.

    Args:
        grads: contiguous float32 gradients, same device as ``basis``; ``sizes[i] = numel``.
        basis: ``U``, shape ``(k, Σ sizes)``, any floating dtype (arithmetic in float32).
        sizes: element counts of ``grads``.
        per_tensor: project each tensor on its own block (``granularity="tensor"``).
        blocks: ``basis.split(sizes, dim=1)``, when the caller keeps them across steps (building
            the 2·len(sizes) views costs as much as a tenth of the projection on small models).

    Returns:
        :class:`ProjectionResult` with ``grad=None`` (the gradients were updated in place).
    """
    if blocks is None:
        blocks = basis.split(list(sizes), dim=1)
    flat = [x.view(-1) for x in grads]
    dtype = flat[0].dtype if flat else torch.float32
    gg, finite = finite_sq_norm(flat)
    zero = torch.zeros((), dtype=dtype, device=basis.device)
    k = basis.shape[0]

    def coef(u: Tensor, x: Tensor, out: Tensor) -> Tensor:  # out += u @ x
        if u.dtype == x.dtype:
            return out.addmv_(u, x)
        for s in range(0, x.numel(), _CONVERT_CHUNK):
            out.addmv_(u[:, s:s + _CONVERT_CHUNK].to(x.dtype), x[s:s + _CONVERT_CHUNK])
        return out

    def remove(u: Tensor, x: Tensor, c: Tensor) -> None:  # x -= uᵀ c
        if u.dtype == x.dtype:
            x.addmv_(u.t(), c, alpha=-1)
            return
        for s in range(0, x.numel(), _CONVERT_CHUNK):
            x[s:s + _CONVERT_CHUNK].addmv_(u[:, s:s + _CONVERT_CHUNK].to(x.dtype).t(), c, alpha=-1)

    if per_tensor:
        cs = [torch.where(finite, coef(u, x, torch.zeros(k, dtype=dtype, device=x.device)), zero)
              for u, x in zip(blocks, flat)]
        for u, x, c in zip(blocks, flat, cs):
            remove(u, x, c)
        captured = torch.stack([torch.dot(c, c) for c in cs]).sum().sqrt()
    else:
        c = torch.zeros(k, dtype=dtype, device=basis.device)
        for u, x in zip(blocks, flat):
            coef(u, x, c)  # c = U g, block by block
        c = torch.where(finite, c, zero)
        for u, x in zip(blocks, flat):
            remove(u, x, c)
        captured = c.norm()
    projected = finite if k > 0 else torch.zeros_like(finite)
    return ProjectionResult(None, projected, captured / gg.sqrt().clamp_min(_TINY), captured, finite)


def pcgrad_combine(
    grads: Sequence[Tensor],
    generator: torch.Generator | None = None,
    sizes: Sequence[int] | None = None,
    fallback: Sequence[float] | None = None,
    reduce: Reduce | None = None,
) -> ProjectionResult:
    """PCGrad (Yu et al. 2020, Alg. 1): project each gradient off the *original* gradients it
    conflicts with, in random order, then sum::

        gᵢ ← gᵢ − (gᵢ·gⱼ / ‖gⱼ‖²) gⱼ   if gᵢ·gⱼ < 0   (j ≠ i, random order);   g̃ = Σᵢ gᵢ.

    Every projected ``gᵢ`` stays in ``span(g₁ … g_n)``, so the surgery runs on the n×n Gram
    matrix and a coefficient matrix ``C`` (``gᵢ = Σₖ Cᵢₖ gₖ``, ``gᵢ·gⱼ = (C G)ᵢⱼ``); the
    vectors are read once for the Gram matrix and once for ``g̃ = Σₖ (Σᵢ Cᵢₖ) gₖ``.

    Args:
        grads: the n per-objective flat gradients, each shape ``(D,)`` (or an ``(n, D)`` tensor).
        generator: CPU generator for the random order (``None``: the global RNG).
        sizes: segment sizes for per-tensor projection (``None``: global).
        fallback: weights of the objectives returned when an input is non-finite (default:
            all ones, the plain sum; ``[1, 0, …]`` returns the first gradient untouched).
        reduce: sums the partial Gram matrix over ranks when the gradients are this rank's
            shards (FSDP2); ``None``: whole vectors.

    Returns:
        :class:`ProjectionResult`; ``grad`` is ``g̃``, ``removed`` is ‖Σgᵢ − g̃‖, ``cosine``
        the mean pairwise cosine of the original gradients.
    """
    gs = list(grads)
    n, total = len(gs), gs[0].numel()
    dev = gs[0].device
    segs = [[x] for x in gs] if sizes is None else [list(x.split(sizes)) for x in gs]
    n_seg = len(segs[0])
    gram = torch.empty(n_seg, n, n, dtype=gs[0].dtype, device=dev)  # (S, n, n)
    for i in range(n):
        for j in range(i, n):
            d = torch.stack([torch.dot(a, b) for a, b in zip(segs[i], segs[j])])
            gram[:, i, j] = d
            gram[:, j, i] = d
    gram = _reduced(gram, reduce)
    finite = torch.isfinite(gram).all()
    diag = gram.diagonal(dim1=1, dim2=2)  # (S, n) = ‖gⱼ‖² per segment
    coef = torch.eye(n, dtype=gram.dtype, device=dev).repeat(n_seg, 1, 1)  # C[s, i, k]
    zero = torch.zeros((), dtype=gram.dtype, device=dev)
    any_conflict = torch.zeros((), dtype=torch.bool, device=dev)
    for i in range(n):
        for j in torch.randperm(n, generator=generator).tolist():
            if j == i:
                continue
            d = (coef[:, i, :] * gram[:, :, j]).sum(-1)  # (S,) current gᵢ · gⱼ
            conflict = (d < 0) & finite & (diag[:, j] > 0)
            coef[:, i, j] -= torch.where(conflict, d / diag[:, j].clamp_min(_TINY), zero)
            any_conflict = any_conflict | conflict.any()
    w = coef.sum(1)  # (S, n): g̃ = Σₖ w[:, k] gₖ
    keep = torch.ones(n, dtype=gram.dtype, device=dev) if fallback is None else torch.tensor(
        list(fallback), dtype=gram.dtype, device=dev)
    w = torch.where(finite, w, keep)
    if sizes is None:
        out = gs[0] * w[0, 0]
        for k in range(1, n):
            out.addcmul_(gs[k], w[0, k])
    else:
        out = gs[0] * _expand(w[:, 0], sizes, total)
        for k in range(1, n):
            out.addcmul_(gs[k], _expand(w[:, k], sizes, total))
    v = 1.0 - w  # Σgᵢ − g̃ = Σₖ vₖ gₖ, its squared norm vᵀ G v per segment
    removed = torch.einsum("sk,skl,sl->", v, gram, v).clamp_min(0).sqrt()
    g_all = gram.sum(0)
    iu = torch.triu_indices(n, n, 1, device=dev)
    norms = g_all.diagonal().clamp_min(0).sqrt()
    cos = g_all[iu[0], iu[1]] / (norms[iu[0]] * norms[iu[1]]).clamp_min(_TINY)
    cosine = cos.mean() if n > 1 else torch.ones((), device=dev)
    return ProjectionResult(out, any_conflict, cosine, torch.where(finite, removed, zero), finite)


def _orthonormalize(
    basis: Tensor | None,
    new: Tensor,
    method: str,
    tol: float,
    sizes: Sequence[int] | None,
    reduce: Reduce | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Orthonormalise the rows of ``new`` (m, D) against ``basis`` (k, D) and each other.

    Global: dependent rows (relative residual ≤ ``tol``) are dropped. Per segment (``sizes``):
    each segment is orthonormalised on its own; dependent segments become zero, rows that are
    zero everywhere are dropped.

    Unsharded, ``new`` is overwritten in place (the accepted rows are a view of it): beyond
    ``new`` itself only ``(m, k)`` coefficient matrices are allocated.

    With ``reduce`` (FSDP2: the columns are this rank's shard of the vectors) every inner product
    is a partial sum over the local columns, summed over ranks by ``reduce``; both methods then
    run classical Gram–Schmidt with re-orthogonalisation (CGS2: ``x ← x − Qᵀ(Q x)`` twice, one
    all-reduce of ``Q x`` per pass), so every rank takes the same accept/drop decisions.

    Returns:
        ``(rows, coords)``: the accepted rows ``F``, shape ``(m', D)``, and per segment (one in
        global mode) the float64 CPU coordinates ``C`` (m, k + m') of the input rows in the
        orthonormal system ``[basis; F]``: ``newᵢ = Cᵢ,:ₖ basis + Cᵢ,ₖ: F`` up to the residuals
        dropped below ``tol`` (the input of :func:`_compress_basis`).
    """
    k = 0 if basis is None else basis.shape[0]
    if reduce is not None:  # FSDP2: not in place; coordinates from all-reduced inner products
        if sizes is None:
            rows = _orthonormalize_sharded(basis, new, tol, keep_rows=False, reduce=reduce)
        else:
            old = basis.split(sizes, dim=1) if basis is not None else [None] * len(sizes)
            rows = torch.cat([_orthonormalize_sharded(b, v, tol, keep_rows=True, reduce=reduce)
                              for b, v in zip(old, new.split(sizes, dim=1))], dim=1)
            rows = rows[_reduced(rows.abs().sum(1), reduce) > 0]
        segs = [new.shape[1]] if sizes is None else list(sizes)
        full = rows if basis is None else torch.cat([basis, rows])
        coords = [_reduced(x @ q.T, reduce).double().cpu()
                  for x, q in zip(new.split(segs, dim=1), full.split(segs, dim=1))]
        return rows, coords
    if sizes is None:
        rows, coef = _orthonormalize_block(basis, new, method, tol, keep_rows=False)
        return rows, [coef]
    old = basis.split(sizes, dim=1) if basis is not None else [None] * len(sizes)
    coefs = [_orthonormalize_block(b, v, method, tol, keep_rows=True)[1]
             for b, v in zip(old, new.split(sizes, dim=1))]
    idx = (new.norm(dim=1) > 0).nonzero().flatten().tolist()
    for j, i in enumerate(idx):  # compact the kept rows to the front, in place
        if j != i:
            new[j].copy_(new[i])
    cols = torch.tensor([*range(k), *(k + i for i in idx)], dtype=torch.long)
    return new[:len(idx)], [c[:, cols] for c in coefs]


def _orthonormalize_block(
    basis: Tensor | None, new: Tensor, method: str, tol: float, *, keep_rows: bool,
) -> tuple[Tensor, Tensor]:
    """One column block of :func:`_orthonormalize`, in place on ``new`` (m, d) (may be a column
    view): CGS2 against ``basis`` (``v ← v − (v Uᵀ) U`` twice, fused ``addmm_``), then QR or
    CGS2 among the rows. Accepted rows are compacted to the front (``keep_rows=False``) or kept
    at their position with rejected rows zeroed. Returns the rows and their coordinates."""
    m = new.shape[0]
    k = 0 if basis is None else basis.shape[0]
    coef = torch.zeros(m, k + m, dtype=torch.float64)
    norms0 = new.norm(dim=1)
    v = new
    if k:
        for _ in range(2):  # "twice is enough" (Kahan–Parlett)
            c = v @ basis.T  # (m, k)
            coef[:, :k] += c.double().cpu()
            v.addmm_(c, basis, alpha=-1)
    if method == "qr" and m <= v.shape[1]:
        q, r = torch.linalg.qr(v.T, mode="reduced")  # (d, m), (m, m)
        diag = r.diagonal()
        if bool(((diag.abs() > tol * norms0) & (norms0 > 0)).all()):
            sign = torch.where(diag < 0, -1.0, 1.0)  # row i ~ +v_i direction
            v.copy_((q * sign).T)
            coef[:, k:] = (r * sign[:, None]).T.double().cpu()  # vᵢ = Σⱼ sⱼ rⱼᵢ (sⱼ qⱼ)
            return v, coef
        # rank deficient: Householder columns for dependent rows are arbitrary -> Gram–Schmidt
    kept = 0
    for i in range(m):
        x = v[i]
        lim = i if keep_rows else kept  # earlier rows: accepted ones (rejected are zero)
        if lim:
            q = v[:lim]
            for _ in range(2):
                c = q @ x
                coef[i, k:k + lim] += c.double().cpu()
                x.addmv_(q.T, c, alpha=-1)
        n = x.norm()
        if bool(n > tol * norms0[i]) and bool(norms0[i] > 0):
            pos = i if keep_rows else kept
            if pos != i:
                v[pos].copy_(x)
            v[pos].div_(n)
            coef[i, k + pos] = float(n)
            kept += 1
        elif keep_rows:
            x.zero_()
    n_rows = m if keep_rows else kept
    return v[:n_rows], coef[:, :k + n_rows]


def _accepted_rows(out: Tensor, accepted: Tensor, keep_rows: bool) -> Tensor:
    """The accepted rows of ``out``, or (``keep_rows``) all rows with the rejected ones zeroed."""
    mask = accepted.to(out.device)
    return torch.where(mask[:, None], out, torch.zeros_like(out)) if keep_rows else out[mask]


def _orthonormalize_sharded(
    basis: Tensor | None, new: Tensor, tol: float, *, keep_rows: bool, reduce: Reduce
) -> Tensor:
    """:func:`_orthonormalize_block` on column shards: CGS2 with all-reduced inner products.

    Row ``i`` becomes ``x = vᵢ − Qᵀ(Q vᵢ)`` (twice) with ``Q`` the old basis and the rows kept so
    far, then ``x / ‖x‖`` if ``‖x‖ > tol ‖vᵢ‖`` (``‖·‖²`` all-reduced). Same result as the
    unsharded Gram–Schmidt / QR up to rounding.
    """
    m = new.shape[0]
    norms0 = reduce((new * new).sum(1)).sqrt()  # (m,) global norms
    old = basis if basis is not None and basis.shape[0] > 0 else new[:0]
    out = torch.zeros_like(new)
    accepted = torch.zeros(m, dtype=torch.bool)
    kept: list[int] = []
    for i in range(m):
        q = torch.cat([old, out[kept]])  # (r, D_local)
        x = new[i]
        if q.shape[0]:
            for _ in range(2):  # "twice is enough" (Kahan–Parlett)
                x = x - reduce(q @ x) @ q
        n = reduce(torch.dot(x, x).reshape(1)).sqrt()[0]
        if bool(n > tol * norms0[i]) and bool(norms0[i] > 0):
            out[i] = x / n
            kept.append(i)
            accepted[i] = True
    return _accepted_rows(out, accepted, keep_rows)


def _compress_basis(
    basis: Tensor | None,
    energy: Tensor,
    fresh: Tensor,
    coords: Sequence[Tensor],
    sizes: Sequence[int] | None,
    cap: int,
) -> tuple[Tensor, Tensor, float]:
    """Keep the ``cap`` leading singular directions of the old basis and a task's gradients
    together (the OGD basis compression when ``max_basis`` is reached).

    Per segment (one in global mode) the old directions enter weighted by their energies and
    the task's gradients by their coordinates ``C`` in ``B = [basis; fresh]``::

        M = [diag(√e) 0; C]  (k + m, k + m'),   M = A S Vᵀ,   U' = Vᵀ₍:cap₎ B,   e' = S²₍:cap₎

    so ``U'`` spans the best rank-``cap`` approximation of the energy-weighted old directions
    plus the gradients (Eckart–Young: the gradients' residual energy outside ``span U'`` is at
    most ``Σ_dropped S²``), and its rows are orthonormal to rounding (``V`` orthogonal, ``B``
    orthonormal). Only the small ``M`` is decomposed (float64).

    Args:
        basis: ``U`` (k, D), or ``None``; fresh: ``F`` (m', D), orthonormal to ``U``.
        energy: ``e`` (k, S) float64, the energy of each old direction per segment.
        coords: per segment ``C`` (m, k + m') float64 (see :func:`_orthonormalize`).
        sizes: segment sizes (``None``: global); cap: rows to keep.

    Returns:
        ``(U', e', dropped)``: the new basis (≤ cap, D), its energies (≤ cap, S), and the
        fraction of the total energy ``Σ S²`` left out.
    """
    k = 0 if basis is None else basis.shape[0]
    segs = [fresh.shape[1]] if sizes is None else list(sizes)
    ubs = basis.split(segs, dim=1) if k else [None] * len(segs)
    out = torch.zeros(cap, fresh.shape[1], dtype=fresh.dtype, device=fresh.device)
    e_new = torch.zeros(cap, len(segs), dtype=torch.float64)
    dropped = total = 0.0
    n_rows = 0
    for s, (ub, fb, ob, c) in enumerate(zip(ubs, fresh.split(segs, dim=1), out.split(segs, dim=1), coords)):
        top = torch.zeros(k, c.shape[1], dtype=torch.float64)
        top[:, :k] = torch.diag(energy[:, s].clamp_min(0).sqrt())
        _, sv, vh = torch.linalg.svd(torch.cat([top, c]), full_matrices=False)
        sq = sv.square()
        r = min(cap, int((sv > sv[0] * 1e-12).sum())) if sv.numel() and bool(sv[0] > 0) else 0
        total += float(sq.sum())
        dropped += float(sq[r:].sum())
        w = vh[:r].to(device=fresh.device, dtype=fresh.dtype)
        if k:
            ob[:r].addmm_(w[:, :k], ub)
        ob[:r].addmm_(w[:, k:], fb)
        e_new[:r, s] = sq[:r]
        n_rows = max(n_rows, r)
    return out[:n_rows], e_new[:n_rows], dropped / total if total > 0 else 0.0


# ====================================================================== the wrapper


class GradientProjection(OptimizerWrapper):
    """Optimizer wrapper projecting gradients against forgetting (A-GEM, OGD, PCGrad).

    Use in any loop (three lines)::

        opt = mitigate.GradientProjection(torch.optim.AdamW(model.parameters()), mode="agem")
        ...train task 1...
        opt.remember(model, task1_batches)      # after each finished task
        ...train task 2 with opt as usual (backward, opt.step(), opt.zero_grad())...

    It *is* the optimizer: LR schedulers, ``GradScaler.step(opt)`` (projection sees unscaled
    gradients), gradient accumulation (projection once, on the accumulated gradient) and
    ``Trainer(optimizers=(opt, sched))`` work unchanged; ``step()`` needs no closure.

    Args:
        optimizer: the base optimizer.
        mode: ``"agem"``, ``"ogd"`` or ``"pcgrad"``.
        model: the model; needed at step time by agem/pcgrad (the memory gradient). Defaults to
            the model of the last :meth:`remember`. A DDP wrapper is unwrapped.
        params: which trainable parameters to project (:data:`~mitigate._utils.ParamSelector`,
            e.g. ``r".*(q_proj|k_proj).*"``); others keep their gradient. Only parameters owned
            by ``optimizer`` count.
        loss_fn: ``loss_fn(model, batch) -> scalar`` for memory batches; ``None`` is
            ``model(**batch).loss``. Not saved in ``state_dict`` (pass it again on resume).
        config: a :class:`ProjectionConfig`; keyword arguments override its fields.
        **options: fields of :class:`ProjectionConfig` (``ref_every``, ``memory_size``, ...).

    Raises:
        ValueError: an invalid option (message names the value).
        TypeError: ``optimizer`` is not an optimizer.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        mode: Mode | None = None,
        *,
        model: nn.Module | None = None,
        params: ParamSelector = None,
        loss_fn: LossFn | None = None,
        config: ProjectionConfig | None = None,
        **options: Any,
    ) -> None:
        super().__init__(optimizer)
        fields = {f.name for f in dataclasses.fields(ProjectionConfig)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; valid options: {sorted(fields)}")
        if mode is not None:
            options["mode"] = mode
        base = config if config is not None else ProjectionConfig()
        self.config = dataclasses.replace(base, **options)
        self._params_selector = params
        self._model: nn.Module | None = unwrap_model(model) if model is not None else None
        self._loss_fn = loss_fn
        self._generator = torch.Generator().manual_seed(self.config.seed)
        # remembered state
        self._signature: dict[str, tuple[int, ...]] | None = None
        self._memory: list[Batch] = []
        self._seen = 0
        self._tasks = 0
        self._basis: Tensor | None = None  # (k, D) in basis_dtype on basis_device
        self._energy: Tensor | None = None  # (k, S) float64 CPU: energy of each direction per segment
        self._views: tuple[Tensor, tuple[int, ...], tuple[Tensor, ...]] | None = None  # split cache
        self._ref: Tensor | None = None  # cached flat memory gradient (D,), float32
        self._ref_age = 0
        # statistics (running sums, device tensors; no per-step lists)
        self._steps = 0
        self._acc: dict[str, Tensor] = {}
        self._pcgrad_pending = False
        self._warned_idle = False
        # FSDP2: the selected parameters are DTensors, flat vectors are this rank's shard
        self._sharded = False
        self._sharded_params = ShardedByName()
        if self._model is not None and any(is_dtensor(p) for p in self._model.parameters()):
            self._named(self._model)  # records the sharded parameters while they are sharded

    # ------------------------------------------------------------------ parameters

    def _named(self, model: nn.Module | None) -> list[tuple[str, nn.Parameter]]:
        """Selected trainable parameters owned by the optimizer, in model order."""
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        if model is None:
            if self._params_selector is not None:
                raise ValueError("params= needs the model: pass model= or call remember(model, ...)")
            return [(f"param{i}", p) for i, p in enumerate(
                p for g in self.param_groups for p in g["params"] if p.requires_grad)]
        named = []
        for n, p in select_parameters(model, self._params_selector).items():
            # FSDP2 keeps the root's parameters unsharded between forward and backward: the
            # optimizer (and the state here) own the sharded ones
            p = p if id(p) in owned else self._sharded_params.get(n, p)
            if id(p) in owned:
                named.append((n, self._sharded_params.get(n, p)))
        return named

    def _bind(self, model: nn.Module | None) -> list[tuple[str, nn.Parameter]]:
        """:meth:`_named`, checked against the recorded signature and for emptiness."""
        named = self._named(model)
        self._sharded = sharded_state(named, "GradientProjection")
        self._check_signature(named)
        if not named:
            raise ValueError(
                f"params={self._params_selector!r} selects no parameter that the wrapped "
                "optimizer owns; build the optimizer over the model's trainable parameters"
            )
        return named

    def _check_signature(
        self, named: list[tuple[str, nn.Parameter]], saved: dict[str, tuple[int, ...]] | None = None
    ) -> None:
        """Raise ``StateMismatchError`` if ``saved`` (default: the bound signature) does not fit
        ``named``. A-GEM/PCGrad accept frozen/unfrozen parameters; the bound state then follows
        them (only when checking the bound signature: a state being validated is not loaded yet,
        and :meth:`_bind` follows after the load)."""
        current = {n: tuple(p.shape) for n, p in named}
        saved = self._signature if saved is None else saved
        if saved is None or current == saved:
            return
        missing = [n for n in saved if n not in current]
        added = [n for n in current if n not in saved]
        reshaped = [f"{n} {list(saved[n])}->{list(current[n])}"
                    for n in saved if n in current and saved[n] != current[n]]
        if self.config.mode != "ogd" and not reshaped:  # frozen/unfrozen parameters: the memory holds batches
            if saved is self._signature:
                self._follow_parameters(current)
            return
        order = list(saved) != [n for n in current if n in saved]
        raise StateMismatchError(
            "GradientProjection memory/basis was recorded for other parameters: "
            f"missing={missing}, added={added}, reshaped={reshaped}"
            + (", order changed" if order else "")
            + "; rebuild the wrapper (or remember() again) for the changed model"
        )

    def _follow_parameters(self, current: dict[str, tuple[int, ...]]) -> None:
        """agem/pcgrad, after parameters were frozen or unfrozen (same shapes where names match).

        The replay memory holds batches, valid for any parameter set, and carries over. The cached
        reference gradient is per parameter: its segments are kept by name, or it is recomputed
        at the next step when a parameter is new (or the vector is an FSDP2 shard).

        Args:
            current: name -> shape of the parameters selected now, in model order.
        """
        saved = self._signature
        assert saved is not None
        if self._ref is not None:
            sizes = [torch.Size(shape).numel() for shape in saved.values()]
            if self._sharded or any(n not in saved for n in current) or self._ref.numel() != sum(sizes):
                self._ref = None
            else:
                parts = dict(zip(saved, self._ref.split(sizes)))
                self._ref = torch.cat([parts[n] for n in current])
        logger.info(
            "GradientProjection(mode=%r): the selected parameters changed (%d -> %d tensors); the "
            "replay memory carries over", self.config.mode, len(saved), len(current),
        )
        self._signature = dict(current)

    # ------------------------------------------------------------------ remember

    def end_task(self, batches: Batch | Iterable[Batch], *, model: nn.Module | None = None, loss_fn: LossFn | None = None) -> TaskEndReport:
        """The task is finished: add it to the replay memory (agem/pcgrad) or the basis (ogd)
        (:meth:`remember`).

        The one verb every mitigation shares (see :mod:`mitigate.reports`); ``remember`` stays
        as it was.

        Args:
            batches: the finished task's batches (one dict or an iterable; DDP: each rank its
                shard, same count).
            model: the model as trained on the task; ``None``: the ``model=`` given at
                construction.
            loss_fn: as :meth:`remember`.

        Returns:
            :class:`~mitigate.reports.TaskEndReport` with :class:`RememberReport`'s figures
            (``added``, ``memory_batches``, ``basis_size``, ``dropped_energy``); ``.result`` is
            the :class:`RememberReport`.

        Raises:
            ValueError: no ``model`` here or at construction; as :meth:`remember`.
        """
        from mitigate.reports import run_end_task

        if model is None:
            model = self._model
        if model is None:
            raise ValueError(
                "GradientProjection.end_task needs the model: pass end_task(batches, model=model), or build the "
                "wrapper with GradientProjection(optimizer, mode, model=model)"
            )
        task = self._tasks

        def details(rep: RememberReport) -> dict[str, Any]:
            d = dataclasses.asdict(rep)
            d.pop("task")
            return d

        return run_end_task(f"GradientProjection ({self.config.mode})", task, batches, lambda b: self.remember(model, b, loss_fn), details)

    def remember(
        self, model: nn.Module, batches: Iterable[Batch], loss_fn: LossFn | None = None
    ) -> RememberReport:
        """Record a finished task.

        agem/pcgrad: every batch enters the replay memory by reservoir sampling (Vitter's
        algorithm R over all batches ever remembered), stored detached on CPU. ogd: up to
        ``directions_per_task`` gradients of the task loss (per batch, or per sample) at the
        current parameters — computed in eval mode, averaged over DDP ranks — are
        orthonormalised against the basis and appended; past ``max_basis`` the basis is compressed
        (``on_full``).

        Args:
            model: the model as trained on the task (PEFT / DDP wrappers are fine).
            batches: iterable of batches (a DataLoader); DDP: each rank its shard, same count.
            loss_fn: ``loss_fn(model, batch) -> scalar``; ``None`` keeps the constructor's,
                or ``model(**batch).loss``.

        Returns:
            :class:`RememberReport`.

        Raises:
            StateMismatchError: the model's selected parameters differ from those recorded.
            ValueError: ``batches`` is empty; agem/pcgrad: a batch that enters the memory has a
                non-finite loss (e.g. every label is -100) or holds a value that cannot be saved
                with ``weights_only=True`` (the message names the batch index); ogd: non-finite
                task gradients. Nothing is recorded when it raises.
        """
        model = unwrap_model(model)
        named = self._bind(model)
        dropped = 0.0
        if not isinstance(batches, Mapping):  # a bar over the batches (shown after 2 s)
            batches = progress_bar(batches, desc=f"{self.config.mode} remember", unit="batch", delay=2.0, leave=False)
        if self.config.mode == "ogd":
            self._model = model
            if loss_fn is not None:
                self._loss_fn = loss_fn
            self._signature = {n: tuple(p.shape) for n, p in named}
            added, dropped = self._remember_directions(named, batches)
        else:
            added = self._remember_batches(model, named, batches, self._loss_fn if loss_fn is None else loss_fn)
            self._model = model
            if loss_fn is not None:
                self._loss_fn = loss_fn
            self._signature = {n: tuple(p.shape) for n, p in named}
            self._ref = None  # the memory changed: recompute the reference next step
        report = RememberReport(self._tasks, added, len(self._memory), self.basis_size, dropped)
        self._tasks += 1
        logger.info("GradientProjection.remember: %s", report)
        return report

    def _remember_batches(
        self, model: nn.Module, named: list[tuple[str, nn.Parameter]], batches: Iterable[Batch],
        loss_fn: LossFn | None,
    ) -> int:
        """Reservoir sampling into a copy of the memory, committed only when every batch that
        enters it is storable and has a finite loss (checked by one ``no_grad`` forward each)."""
        memory, seen = list(self._memory), self._seen
        generator = torch.Generator().set_state(self._generator.get_state())
        device = named[0][1].device
        fn = resolve_loss_fn(loss_fn)
        added = n = 0
        for i, batch in enumerate(batches):
            n += 1
            seen += 1
            if len(memory) < self.config.memory_size:
                slot = len(memory)
            else:
                slot = int(torch.randint(seen, (1,), generator=generator))
                if slot >= self.config.memory_size:
                    continue
            stored = _memory_batch(batch, i)
            with preserve_state(model), torch.no_grad():
                loss = fn(model, move_batch(stored, device))
            if not bool(torch.isfinite(loss).all()):
                raise ValueError(
                    f"remember(): batch {i} has a non-finite loss ({float(loss.float().reshape(-1)[0])}), "
                    "so its reference gradient would be non-finite (e.g. every label is -100: nothing "
                    "to predict); leave such batches out or fix their labels"
                )
            if slot == len(memory):
                memory.append(stored)
            else:
                memory[slot] = stored
            added += 1
        if n == 0:
            raise ValueError("remember() got no batches; pass the finished task's batches (a non-empty iterable)")
        self._memory, self._seen = memory, seen
        self._generator.set_state(generator.get_state())
        return added

    def _remember_directions(
        self, named: list[tuple[str, nn.Parameter]], batches: Iterable[Batch]
    ) -> tuple[int, float]:
        """OGD: compute up to ``directions_per_task`` gradient rows into one preallocated
        (m, D) buffer, average them over DDP ranks, orthonormalise them in place against the
        basis and append them — or, when ``max_basis`` is reached, compress (see
        :func:`_compress_basis`). Returns ``(directions added, energy fraction dropped)``."""
        cfg = self.config
        model = self._model
        assert model is not None
        loss_fn = resolve_loss_fn(self._loss_fn)
        params = [p for _, p in named]
        likes = [_local(p) for p in params]
        device = params[0].device
        want = cfg.directions_per_task
        total = sum(x.numel() for x in likes)
        buf: Tensor | None = None  # (want, D): the only full-size allocation besides the basis
        m = 0

        def put(row: Tensor) -> None:
            nonlocal buf, m
            if buf is None:
                buf = torch.zeros(want, row.numel(), dtype=row.dtype, device=row.device)
            buf[m].copy_(row)
            m += 1

        with preserve_state(model, mode=False), torch.enable_grad():
            for batch in batches:
                if m >= want:
                    break
                batch = move_batch(batch, device)
                if cfg.ogd_basis == "gt_logit":
                    if self._sharded:
                        raise NotImplementedError("ogd_basis='gt_logit' under FSDP2; use ogd_basis='loss'")
                    rows = _gt_logit_rows(model, params, batch, want - m)
                elif self._sharded:  # FSDP2: through backward(), reduce-scattered into the shards
                    rows = _backward_flat(model, loss_fn, params, batch, per_sample=cfg.directions == "sample")
                elif cfg.directions == "batch":
                    grads = torch.autograd.grad(loss_fn(model, batch), params, allow_unused=True)
                    if buf is None:
                        buf = torch.zeros(want, total, dtype=torch.promote_types(likes[0].dtype, torch.float32),
                                          device=device)
                    for dst, g in zip(buf[m].split([x.numel() for x in likes]), grads):
                        dst.copy_(g.reshape(-1)) if g is not None else dst.zero_()
                    m += 1
                    continue
                else:
                    rows = _per_sample_flat(model, loss_fn, named, batch)
                for row in rows:
                    if m < want:
                        put(row)
        m_all, equal = self._agree_on_count(m, device)
        if m_all == 0:
            raise ValueError("remember() got no batches; pass the finished task's batches")
        if buf is None:  # DDP: this rank had no batch, the others did (it contributes zeros)
            buf = torch.zeros(want, total, device=device)
        new = buf[:m_all]  # (m, D) float32; FSDP2: (m, D_local), this rank's shard
        if not self._sharded:  # FSDP2's reduce-scatter has averaged over ranks already
            if equal:
                all_reduce_mean_(new)  # DDP: every rank's shard of the data -> the global-batch gradient
            else:  # unequal counts: row i is the mean over the ranks that have a row i
                have = (torch.arange(m_all, device=device) < m).to(new.dtype)
                all_reduce_sum_(new)
                all_reduce_sum_(have)
                new.div_(have.clamp_min(1)[:, None])
        # row by row: a whole (m, D) bool mask would cost a quarter of the buffer
        bad = torch.stack([(~torch.isfinite(row)).any() for row in new]).sum().float().reshape(1)
        if bool(_reduced(bad, self._reduce)[0] > 0):
            raise ValueError("remember(): non-finite task gradients; check the loss / dtype")
        sizes = self._sizes(named) if cfg.granularity == "tensor" else None
        n_seg = 1 if sizes is None else len(sizes)
        k = self.basis_size
        old = None if self._basis is None else self._basis.to(device, new.dtype)
        fresh, coords = _orthonormalize(old, new, cfg.orthogonalization, cfg.tol, sizes, self._reduce)
        coords = [c / c.norm().clamp_min(1e-300) for c in coords]  # every task brings unit energy
        energy = self._energy
        if energy is None or tuple(energy.shape) != (k, n_seg):
            energy = torch.ones(k, n_seg, dtype=torch.float64)  # a state saved without energies
        gained = torch.stack([c.square().sum(0) for c in coords], dim=1)  # (k + m', S)
        store = self._basis_device(device)
        dropped = 0.0
        if k + fresh.shape[0] <= cfg.max_basis:
            fresh = fresh.to(store, cfg.torch_basis_dtype)
            if self._basis is not None:
                self._basis = torch.cat([self._basis, fresh])
            else:  # a view of the buffer: keep only the accepted rows' storage
                self._basis = fresh if fresh.shape[0] == want else fresh.clone()
            self._energy = torch.cat([energy + gained[:k], gained[k:]])
            added = int(fresh.shape[0])
        elif cfg.on_full == "drop":
            room = cfg.max_basis - k
            dropped = float(gained[k + room:].sum() / (energy.sum() + gained.sum()).clamp_min(1e-300))
            warnings.warn(
                f"GradientProjection: OGD basis is full (max_basis={cfg.max_basis}, on_full='drop'); "
                f"dropping {fresh.shape[0] - room} of {fresh.shape[0]} new directions "
                f"({dropped:.1%} of the remembered gradient energy): later tasks are not protected "
                "(on_full='compress' keeps the leading directions of old and new together)",
                stacklevel=3,
            )
            fresh = fresh[:room].to(store, cfg.torch_basis_dtype)
            self._basis = fresh if self._basis is None else torch.cat([self._basis, fresh])
            self._energy = torch.cat([energy + gained[:k], gained[k:k + room]])
            added = int(fresh.shape[0])
        else:
            rows, self._energy, dropped = _compress_basis(old, energy, fresh, coords, sizes, cfg.max_basis)
            del old
            self._basis = rows.to(store, cfg.torch_basis_dtype)
            self._views = None
            added = int(fresh.shape[0])
            logger.info(
                "GradientProjection: OGD basis full (max_basis=%d): compressed %d old + %d new "
                "directions to the %d leading ones (%.2f%% of the energy dropped)",
                cfg.max_basis, k, fresh.shape[0], self.basis_size, 100 * dropped,
            )
        if fresh.shape[0] == 0:
            warnings.warn(
                f"GradientProjection(mode='ogd').remember(): no new direction (all {new.shape[0]} "
                "task gradients are zero or already in the basis, e.g. a task fit exactly); "
                "this task adds no protection",
                stacklevel=3,
            )
        return added, dropped

    def _agree_on_count(self, m: int, device: torch.device) -> tuple[int, bool]:
        """The largest per-rank row count and whether all ranks have it (DDP: all-reduced, so
        every rank takes the same branch and reduces as many rows; ranks short of batches
        contribute zero rows). FSDP2 runs collectives inside every batch's ``backward()``, so
        there every rank must pass the same number of batches (unchanged)."""
        if self._sharded or not dist_ready():
            return m, True
        t = torch.tensor([m, -m], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        hi, lo = int(t[0]), -int(t[1])
        return hi, hi == lo

    def _basis_device(self, device: torch.device) -> torch.device:
        return torch.device(self.config.basis_device) if self.config.basis_device else device

    @staticmethod
    def _sizes(named: list[tuple[str, nn.Parameter]]) -> list[int]:
        """Element counts of the flat vector's segments: this rank's shard under FSDP2."""
        return [_local(p).numel() for _, p in named]

    @property
    def _reduce(self) -> Reduce | None:
        """Sums partial dot products over ranks when flat vectors are shards (FSDP2)."""
        return all_reduce_sum_ if self._sharded else None

    @property
    def basis_size(self) -> int:
        """Number of vectors in the OGD basis."""
        return 0 if self._basis is None else int(self._basis.shape[0])

    @property
    def basis(self) -> Tensor | None:
        """The OGD basis ``U``, shape ``(k, D)`` (rows orthonormal; per tensor in tensor mode)."""
        return self._basis

    @property
    def memory(self) -> list[Batch]:
        """The replay memory (agem/pcgrad): batches stored detached on CPU."""
        return self._memory

    @property
    def parameter_names(self) -> list[str]:
        """Names of the parameters the memory/basis was recorded for (empty before remember)."""
        return [] if self._signature is None else list(self._signature)

    # ------------------------------------------------------------------ pcgrad_backward

    def pcgrad_backward(self, losses: Sequence[Tensor]) -> None:
        """PCGrad instead of ``sum(losses).backward()`` (Yu et al. 2020).

        Per-objective gradients come from ``torch.autograd.grad``; the selected parameters get
        the PCGrad combination, other trainable parameters the plain sum. The result is added
        to ``.grad`` (so gradient accumulation works), and the next ``step()`` does not add a
        replay objective on top. Under DDP run the forward under ``model.no_sync()``: the
        per-objective gradients are averaged over ranks here.

        Args:
            losses: scalar losses, one per objective (e.g. ``[loss_task, loss_replay]``).

        Raises:
            ValueError: fewer than one loss, or not in ``mode="pcgrad"``.
        """
        if self.config.mode != "pcgrad":
            raise ValueError(f"pcgrad_backward needs mode='pcgrad', this wrapper has mode={self.config.mode!r}")
        losses = list(losses)
        if not losses:
            raise ValueError("pcgrad_backward got no losses")
        named = self._bind(self._model)
        selected = {id(p) for _, p in named}
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        likes = [_local(p) for p in params]
        if self._sharded:
            per = _per_objective_backward(losses, params)
        else:
            with torch.enable_grad():
                per = [torch.autograd.grad(loss, params, retain_graph=i < len(losses) - 1,
                                           allow_unused=True) for i, loss in enumerate(losses)]
        flat = torch.stack([_flat(g, likes) for g in per])  # (n, P) over all trainable params
        if not self._sharded:  # FSDP2's reduce-scatter has averaged over ranks already
            all_reduce_mean_(flat)
        sizes_all = [x.numel() for x in likes]
        sel_idx = [i for i, p in enumerate(params) if id(p) in selected]
        segs = flat.split(sizes_all, dim=1)
        sel = torch.cat([segs[i] for i in sel_idx], dim=1)
        sizes = [sizes_all[i] for i in sel_idx] if self.config.granularity == "tensor" else None
        with torch.no_grad():
            res = pcgrad_combine(list(sel), self._generator, sizes, reduce=self._reduce)
            self._record(res)
            combined_sel = res.grad.split([sizes_all[i] for i in sel_idx])
            out = list(flat.sum(0).split(sizes_all))
            for k, i in enumerate(sel_idx):
                out[i] = combined_sel[k]
            for p, x, g in zip(params, likes, out):
                g = g.view_as(x).to(x.dtype)
                if p.grad is None:
                    p.grad = shard_like(g.clone(), p)
                else:
                    local_tensor(p.grad).add_(g)
        self._pcgrad_pending = True

    # ------------------------------------------------------------------ the step

    def _idle(self) -> bool:
        if self.config.mode == "ogd":
            idle = self._basis is None or self._basis.shape[0] == 0
        elif self.config.mode == "pcgrad" and self._pcgrad_pending:
            return True  # gradients already combined by pcgrad_backward
        else:
            idle = not self._memory
        if not idle and self._model is None:
            raise ValueError(
                "GradientProjection holds remembered state but no model: pass model= to the "
                "constructor (e.g. when resuming from a state dict) or call remember(model, ...)"
            )
        return idle

    # ------------------------------------------------------------------ holding the update

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """Project the gradients, take the base step, then (``hold="update"``) project its update.

        Projecting the gradient is exact for plain SGD only: Adam divides elementwise by
        ``√v̂``, which does not commute with the projection, and decoupled weight decay moves
        ``θ`` along ``−θ``, so the actual update leaks into the protected directions
        (|UΔθ|/|Δθ| of 0.05–0.10 measured on a language model with AdamW). With
        ``hold="update"`` the update ``Δθ = θ_after − θ_before`` of the base step is projected
        as well, with the same rule as the gradient:

        * ogd: ``θ ← θ_after − Uᵀ(U Δθ)``, i.e. ``θ − θ_before = (I − UᵀU) Δθ`` and
          ``⟨uᵢ, θ − θ_before⟩ = 0`` up to float rounding (per tensor with
          ``granularity="tensor"``).
        * agem / pcgrad (``g_ref``: this step's memory gradient): the first-order change of the
          memory loss is ``⟨g_ref, Δθ⟩``; if it is positive (the step would increase the memory
          loss), ``θ ← θ_after − (⟨Δθ, g_ref⟩ / ‖g_ref‖²) g_ref``, so that ``⟨g_ref, θ −
          θ_before⟩ = 0``; else ``θ`` is left bit-identical. This is A-GEM's rule applied to the
          descent direction ``d = −Δθ`` instead of the gradient (``d·g_ref < 0`` → remove the
          component along ``g_ref``).

        Cost: one copy of the selected parameters (``θ_before``, in their dtype) held during the
        step, a transient float32 flat update, and one more projection. The optimizer's
        moments are those of the projected gradient; nothing extra enters ``state_dict()``, so
        resuming stays bit-identical. A non-finite update is left as the base step made it.

        Args:
            closure: optional; run once before the projection (see :class:`OptimizerWrapper`).

        Returns:
            The closure's loss, or ``None``.
        """
        held = self._hold_begin()
        loss = super().step(closure)
        self._hold_end(held)
        return loss

    def _hold_begin(self) -> tuple[list[nn.Parameter], list[Tensor]] | None:
        """``hold="update"``: the selected parameters and a copy of their values (this rank's
        shards under FSDP2), taken before the base step; ``None`` when nothing is held."""
        if self.config.hold != "update" or self._idle():
            return None
        params = [p for _, p in self._bind(self._model)]
        return params, [_local(p).detach().clone() for p in params]

    def _hold_end(self, held: tuple[list[nn.Parameter], list[Tensor]] | None) -> None:
        """Project the base step's update ``Δθ`` (see :meth:`step`) and write ``θ`` back."""
        if held is None:
            return
        params, before = held
        likes = [_local(p) for p in params]
        if not any(p.grad is not None for p in params):
            return  # transform_gradients did nothing and nothing was to be held
        delta = _flat([x.detach() - b for x, b in zip(likes, before)], likes)  # (D,) float32+
        sizes = self._sizes([(str(i), p) for i, p in enumerate(params)]) \
            if self.config.granularity == "tensor" else None
        if self.config.mode == "ogd":
            assert self._basis is not None
            res = ogd_project(delta, self._basis.to(delta.device, delta.dtype), sizes, self._reduce)
            removed = delta - res.grad
        else:
            if self._ref is None:
                return
            ref = self._ref.to(delta.device, delta.dtype)
            res = agem_project(-delta, ref, sizes, self._reduce)  # d = −Δθ, A-GEM's rule on d
            removed = res.grad + delta  # Δθ − Δθ̃ = −(d − d̃)
        finite = res.finite
        removed = torch.where(finite, removed, torch.zeros_like(removed))
        dd = _reduced(torch.dot(delta, delta), self._reduce)
        leak = torch.where(finite, res.removed / dd.sqrt().clamp_min(_TINY), torch.zeros_like(dd))
        for k, v in (("held", finite.float()), ("update_leak", leak.float())):
            self._acc[k] = v.detach() if k not in self._acc else self._acc[k] + v.to(self._acc[k].device)
        # θ ← θ_after − (Δθ − Δθ̃); an exact zero where nothing was removed leaves θ bit-identical
        parts = removed.split([x.numel() for x in likes])
        torch._foreach_sub_(likes, [r.view_as(x).to(x.dtype) for x, r in zip(likes, parts)])

    def transform_gradients(self) -> None:
        """Project ``.grad`` in place (called by ``step()`` under ``no_grad``)."""
        self._steps += 1
        if self._idle():
            if not (self.config.mode == "pcgrad" and self._pcgrad_pending) and not self._warned_idle:
                if self._tasks:  # OGD: remember() ran but kept no direction
                    why = (f"remember() ran {self._tasks} time(s) but the OGD basis is empty: every "
                           "remembered gradient was zero (a task already fit exactly) or dependent; "
                           "nothing to project against, taking the plain base step")
                else:
                    why = ("step() before any remember(): nothing to project against, taking the "
                           "plain base step (call remember(model, batches) after each finished task)")
                warnings.warn(
                    f"GradientProjection(mode={self.config.mode!r}): {why}",
                    stacklevel=5,  # transform_gradients < step < no_grad < step hooks < caller
                )
                self._warned_idle = True
            self._pcgrad_pending = False
            return
        named = self._bind(self._model)
        if all(p.grad is None for _, p in named):
            return
        params = [p for _, p in named]
        # FSDP2: this rank's shards (views: writing them writes the sharded .grad); else themselves
        likes = [_local(p) for p in params]
        grads = [None if p.grad is None else local_tensor(p.grad) for p in params]
        sizes = self._sizes(named) if self.config.granularity == "tensor" else None
        mode = self.config.mode
        if mode == "ogd":
            assert self._basis is not None
            total = sum(x.numel() for x in likes)
            if self._basis.shape[1] != total:
                raise StateMismatchError(
                    f"OGD basis has {self._basis.shape[1]} columns but the selected parameters "
                    f"have {total} elements" + (" on this rank (FSDP2 shard)" if self._sharded else "")
                )
            basis = self._basis
            if not self._sharded and all(
                    x is not None and x.dtype == torch.float32 and x.device == basis.device
                    and x.is_contiguous() for x in grads):
                # fast path: no flat copy, projected in place tensor by tensor
                sz = tuple(self._sizes(named))
                if self._views is None or self._views[0] is not basis or self._views[1] != sz:
                    self._views = (basis, sz, basis.split(list(sz), dim=1))
                self._record(ogd_project_(grads, basis, sz, per_tensor=sizes is not None,
                                          blocks=self._views[2]))
                return
            g = _flat(grads, likes)
            res = ogd_project(g, basis.to(g.device, g.dtype, non_blocking=True), sizes, self._reduce)
        else:
            g = _flat(grads, likes)
            ref = self._reference(named, g)
            if mode == "agem":
                res = agem_project(g, ref, sizes, self._reduce)
            else:
                res = pcgrad_combine([g, ref], self._generator, sizes, fallback=(1.0, 0.0),
                                     reduce=self._reduce)
        self._record(res)
        _write_back(grads, likes, res.grad)

    def _reference(self, named: list[tuple[str, nn.Parameter]], g: Tensor) -> Tensor:
        """Memory gradient at the current parameters, cached for ``ref_every`` steps."""
        if self._ref is not None and self._ref_age < self.config.ref_every:
            self._ref_age += 1
            if self._ref.device != g.device or self._ref.dtype != g.dtype:
                self._ref = self._ref.to(g.device, g.dtype)
            return self._ref
        model = self._model
        assert model is not None
        loss_fn = resolve_loss_fn(self._loss_fn)
        params = [p for _, p in named]
        idx = torch.randint(len(self._memory), (self.config.ref_batches,), generator=self._generator)
        ref = torch.zeros_like(g)
        with preserve_state(model), torch.enable_grad():
            for i in idx.tolist():
                batch = move_batch(self._memory[i], g.device)
                if self._sharded:  # FSDP2: backward() reduce-scatters (averages over ranks)
                    ref += _backward_flat(model, loss_fn, params, batch)[0]
                    continue
                loss = loss_fn(model, batch)
                ref += _flat(torch.autograd.grad(loss, params, allow_unused=True), params)
        ref /= len(idx)
        if not self._sharded:
            all_reduce_mean_(ref)  # DDP: same reference on every rank
        ok = torch.isfinite(_reduced(torch.dot(ref, ref), self._reduce))
        if not bool(ok):  # one host sync per reference (a forward and backward already ran)
            warnings.warn(
                f"GradientProjection(mode={self.config.mode!r}): the memory gradient is non-finite "
                f"at step {self._steps} (memory batches {idx.tolist()}), so this step is not projected; "
                "check the memory batches' loss and the dtype (fp16 overflow: use bfloat16/float32)",
                RuntimeWarning, stacklevel=6,
            )
        ref = torch.where(ok, ref, torch.zeros_like(ref))  # a non-finite reference disables it
        self._ref, self._ref_age = ref, 1
        return ref

    # ------------------------------------------------------------------ statistics

    def _record(self, res: ProjectionResult) -> None:
        with torch.no_grad():
            fin = res.finite
            zero = torch.zeros((), device=res.finite.device)
            upd = {
                "active": fin.float(),
                "projected": (res.projected & fin).float(),
                "cosine": torch.where(fin, res.cosine.float(), zero),
                "removed": torch.where(fin, res.removed.float(), zero),
                "nonfinite": (~fin).float(),
            }
            for k, v in upd.items():
                self._acc[k] = v.detach() if k not in self._acc else self._acc[k] + v.to(self._acc[k].device)

    def stats(self) -> dict[str, float | int]:
        """Running statistics, cheap to log every step (one host sync here, none in ``step``).

        Returns:
            ``steps`` (calls of ``step()``), ``projected_fraction`` (projections that removed a
            component / projections evaluated, i.e. steps after the first ``remember()``, or
            ``pcgrad_backward`` calls), ``mean_cosine`` (agem: cos(g, g_ref); ogd: ‖Uᵀg‖/‖g‖;
            pcgrad: cos between objectives — mean over projected-against steps),
            ``mean_norm_removed`` (mean ‖g − g̃‖ over those steps), ``nonfinite_skips``,
            ``memory_batches``, ``basis_size``, ``tasks``, ``mean_update_leak`` (``hold="update"``:
            mean over held steps of ‖Δθ − Δθ̃‖/‖Δθ‖, the share of the base optimizer's update
            that left the allowed set — ogd: ‖UΔθ‖/‖Δθ‖ — and was removed; 0 otherwise).
        """
        vals = {k: float(v) for k, v in self._acc.items()}
        active = vals.get("active", 0.0)
        evaluated = active + vals.get("nonfinite", 0.0)
        return {
            "steps": self._steps,
            "projected_fraction": vals.get("projected", 0.0) / evaluated if evaluated else 0.0,
            "mean_cosine": vals.get("cosine", 0.0) / active if active else 0.0,
            "mean_norm_removed": vals.get("removed", 0.0) / active if active else 0.0,
            "nonfinite_skips": int(vals.get("nonfinite", 0.0)),
            "memory_batches": len(self._memory),
            "basis_size": self.basis_size,
            "tasks": self._tasks,
            "mean_update_leak": vals.get("update_leak", 0.0) / vals["held"] if vals.get("held") else 0.0,
        }

    # ------------------------------------------------------------------ state

    def wrapper_state_dict(self) -> dict[str, Any]:
        """Memory, basis, cached reference, generator, counters (tensors + plain Python)."""
        sig = self._signature
        return {
            "config": self.config.to_dict(),
            "signature": None if sig is None else {"names": list(sig), "shapes": [list(s) for s in sig.values()]},
            "memory": list(self._memory),
            "seen": self._seen,
            "tasks": self._tasks,
            "basis": None if self._basis is None else self._basis.detach().cpu().clone(),
            "energy": None if self._energy is None else self._energy.clone(),
            "ref": None if self._ref is None else self._ref.detach().cpu().clone(),
            "ref_age": self._ref_age,
            "generator": self._generator.get_state(),
            "steps": self._steps,
            "acc": {k: v.detach().cpu().clone() for k, v in self._acc.items()},
            "pcgrad_pending": self._pcgrad_pending,
            "warned_idle": self._warned_idle,
            # FSDP2: basis / ref are this rank's shard, the state is per rank
            "shard": shard_info() if self._sharded else None,
        }

    def validate_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        """Check a :meth:`wrapper_state_dict` output against this wrapper; change nothing.

        Raises:
            ValueError: the state was saved in another ``mode`` or is not a GradientProjection state.
            StateMismatchError: the recorded parameters no longer match the bound model.
        """
        missing = [k for k in ("config", "signature", "memory", "basis", "generator") if k not in state]
        if missing:
            raise ValueError(f"not a GradientProjection state: keys {missing} missing")
        saved_mode = state["config"]["mode"]
        if saved_mode != self.config.mode:
            raise ValueError(
                f"state was saved with mode={saved_mode!r}, this wrapper has mode={self.config.mode!r}; "
                f"build GradientProjection(opt, mode={saved_mode!r}) to load it"
            )
        check_shard(state.get("shard"), "GradientProjection")
        sig = state["signature"]
        if self._model is not None and sig is not None:
            saved = {n: tuple(s) for n, s in zip(sig["names"], sig["shapes"])}
            self._check_signature(self._named(self._model), saved)

    def load_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`wrapper_state_dict` output, after :meth:`validate_wrapper_state_dict`
        (which raises before anything changes)."""
        self.validate_wrapper_state_dict(state)
        sig = state["signature"]
        self._signature = None if sig is None else {n: tuple(s) for n, s in zip(sig["names"], sig["shapes"])}
        self._memory = [_to_cpu(b) for b in state["memory"]]  # even if a loader moved them
        self._seen, self._tasks = int(state["seen"]), int(state["tasks"])
        basis = state["basis"]
        if basis is not None:
            dev = self._basis_device(_param_device(self))
            basis = basis.to(dev, self.config.torch_basis_dtype)
        self._basis = basis
        self._views = None
        energy = state.get("energy")  # absent in states saved before compression existed
        self._energy = None if energy is None else energy.to("cpu", torch.float64)
        ref = state["ref"]
        self._ref = None if ref is None else ref.to(_param_device(self))
        self._ref_age = int(state["ref_age"])
        self._generator.set_state(state["generator"].cpu())
        self._steps = int(state["steps"])
        self._acc = {k: v.to(_param_device(self)) for k, v in state["acc"].items()}
        self._pcgrad_pending = bool(state["pcgrad_pending"])
        self._warned_idle = bool(state["warned_idle"])
        if self._model is not None and self._signature is not None:
            self._bind(self._model)


# ====================================================================== helpers


def _param_device(opt: Optimizer) -> torch.device:
    for g in opt.param_groups:
        for p in g["params"]:
            return p.device
    return torch.device("cpu")


def _flat(grads: Sequence[Tensor | None], likes: Sequence[Tensor]) -> Tensor:
    """Concatenate gradients into one float32+ vector; ``None`` counts as zeros. Shape ``(D,)``."""
    dtype = torch.promote_types(likes[0].dtype, torch.float32)
    parts = [
        (g.reshape(-1) if g is not None else torch.zeros(p.numel(), device=p.device)).to(dtype)
        for g, p in zip(grads, likes)
    ]
    return torch.cat(parts)


def _write_back(grads: Sequence[Tensor | None], likes: Sequence[Tensor], flat: Tensor) -> None:
    """Copy the flat vector into the existing gradients ``grads`` (the ``.grad`` tensors, or their
    local shards under FSDP2), segmented like ``likes``; ``None`` entries stay ``None``."""
    pairs = [(g, x) for g, x in zip(grads, flat.split([p.numel() for p in likes])) if g is not None]
    dst = [g for g, _ in pairs]
    src = [x.view_as(g).to(g.dtype) for g, x in pairs]
    torch._foreach_copy_(dst, src)


def _local(t: Tensor) -> Tensor:
    """This rank's shard of an FSDP2 ``DTensor`` (detached, a view of its storage), or ``t``."""
    return local_tensor(t.detach()) if is_dtensor(t) else t


def _backward_flat(
    model: nn.Module, loss_fn: LossFn, params: Sequence[nn.Parameter], batch: Batch,
    *, per_sample: bool = False,
) -> list[Tensor]:
    """Flat gradients of ``loss_fn(model, batch)`` through ``loss.backward()`` — the FSDP2 way:
    ``torch.autograd.grad`` w.r.t. the sharded ``DTensor`` parameters returns ``None`` (the
    forward runs on all-gathered copies), while ``backward()`` reduce-scatters the gradient into
    each parameter's sharded ``.grad``, averaged over ranks (every rank passes its shard of the
    data, so the result is the gradient of the global batch).

    One row per batch, or per sample of the global batch (every rank's samples, in rank order,
    via :func:`~mitigate._utils.sharded_per_sample_grads`). Rows are this rank's shard, shape
    ``(D_local,)``. Overwrites and finally clears ``.grad`` of ``params``: call under
    :func:`~mitigate._utils.preserve_state`.
    """
    likes = [_local(p) for p in params]
    if per_sample:
        return [_flat(grads, likes) for grads in sharded_per_sample_grads(model, loss_fn, batch, params)]
    for p in params:
        p.grad = None
    loss_fn(model, batch).backward()
    row = _flat([None if p.grad is None else local_tensor(p.grad) for p in params], likes)
    for p in params:
        p.grad = None
    return [row]


def _per_objective_backward(losses: Sequence[Tensor], params: Sequence[nn.Parameter]) -> list[list[Tensor | None]]:
    """FSDP2: the gradient of each loss through its own ``backward()`` (reduce-scattered, i.e.
    averaged over ranks), as this rank's shards; the parameters' ``.grad`` is restored."""
    saved = [p.grad for p in params]
    per: list[list[Tensor | None]] = []
    try:
        with torch.enable_grad():
            for i, loss in enumerate(losses):
                for p in params:
                    p.grad = None
                loss.backward(retain_graph=i < len(losses) - 1)
                per.append([None if p.grad is None else local_tensor(p.grad) for p in params])
    finally:
        for p, g in zip(params, saved):
            p.grad = g
    return per


_PLAIN = (bool, int, float, str, type(None))  # leaves torch.load(weights_only=True) accepts


def _memory_batch(batch: Batch, index: int, path: str = "") -> Batch:
    """Detached CPU copy of a memory batch that ``torch.load(weights_only=True)`` can read back:
    tensors copied, array-likes (numpy arrays and scalars) converted, Mappings made plain dicts,
    lists/tuples recursed, ``bool/int/float/str/None`` kept.

    Raises:
        ValueError: any other value (naming the batch ``index`` and the key path).
    """
    if isinstance(batch, Tensor):
        return batch.detach().to("cpu", copy=True)
    if isinstance(batch, _PLAIN):
        return batch
    if isinstance(batch, Mapping):
        return {k: _memory_batch(v, index, f"{path}[{k!r}]") for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):
        return type(batch)(_memory_batch(v, index, f"{path}[{i}]") for i, v in enumerate(batch))
    if type(batch).__module__ == "numpy":
        if type(batch).__name__ != "ndarray" and getattr(batch, "ndim", None) == 0:
            return batch.item()  # a numpy scalar -> the Python number
        try:
            return torch.as_tensor(batch).clone()
        except (TypeError, RuntimeError) as exc:
            raise ValueError(
                f"remember(): batch {index}{path} is a numpy array of dtype {batch.dtype} that "
                f"cannot become a tensor ({exc}); pass numeric arrays or tensors"
            ) from None
    raise ValueError(
        f"remember(): batch {index}{path} holds a {type(batch).__name__}, which the replay memory "
        "cannot save loadably with torch.load(weights_only=True); pass tensors, numpy arrays or "
        "plain bool/int/float/str values (dicts, lists and tuples of them)"
    )


def _to_cpu(batch: Batch) -> Batch:
    """Detached CPU copy of a batch (Mappings become plain dicts: ``weights_only``-loadable)."""
    return tree_map(lambda t: t.detach().to("cpu", copy=True) if isinstance(t, Tensor) else t,
                    move_batch(batch, "cpu"))


def _per_sample_flat(
    model: nn.Module, loss_fn: LossFn, named: list[tuple[str, nn.Parameter]], batch: Batch
) -> list[Tensor]:
    """Per-example flat gradients of ``batch``: ``torch.func.vmap(grad(...))``, falling back to a
    loop over one-example batches where the model's forward cannot be vmapped."""
    params = [p for _, p in named]
    n = batch_size_of(batch)
    try:
        f = functional_loss(model, loss_fn)  # f(params, batch) -> scalar, via functional_call
        detached = {k: p.detach() for k, p in named}

        def loss_one(ps: dict[str, Tensor], sample: Batch) -> Tensor:
            return f(ps, tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, sample))

        in_dims = tree_map(lambda t: 0 if isinstance(t, Tensor) and t.dim() > 0 else None, batch)
        with input_grad_hooks_removed(model):  # gradient checkpointing's input hook breaks vmap
            g = vmap(grad(loss_one), in_dims=(None, in_dims), randomness="different")(detached, batch)
        flat = torch.cat([g[k].reshape(n, -1).float() for k, _ in named], dim=1)
        return list(flat.unbind(0))
    except Exception as exc:  # noqa: BLE001 - vmap coverage varies across models
        logger.debug("per-sample gradients via vmap failed (%s); looping over examples", exc)
    rows = []
    for i in range(n):
        one = tree_map(lambda t: t[i : i + 1] if isinstance(t, Tensor) and t.dim() > 0 else t, batch)
        rows.append(_flat(torch.autograd.grad(loss_fn(model, one), params, allow_unused=True), params))
    return rows


def _gt_logit_rows(model: nn.Module, params: Sequence[nn.Parameter], batch: Batch, limit: int) -> list[Tensor]:
    """OGD-GTL directions (Farajtabar et al. 2020, sec. 3): ``∇_θ z_y(x)``, the gradient of the
    ground-truth logit, one flat row per labelled position, at most ``limit`` (in batch order).

    Causal LM (``logits`` ``(B, T, V)``, ``labels`` ``(B, T)``): position ``t`` predicts
    ``labels[:, t + 1]`` (the shift of ``model(**batch).loss``), positions labelled ``-100`` are
    skipped. Classifier (``logits`` ``(B, C)``, ``labels`` ``(B,)``): one row per sample.

    Raises:
        ValueError: the batch has no ``"labels"``, the model output no ``.logits``, or their
            shapes fit neither case.
    """
    if not isinstance(batch, Mapping) or "labels" not in batch:
        raise ValueError("ogd_basis='gt_logit' needs dict batches with a 'labels' entry "
                         "(or use ogd_basis='loss' with a loss_fn)")
    labels = batch["labels"]
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    logits = out if isinstance(out, Tensor) else getattr(out, "logits", None)
    if not isinstance(logits, Tensor):
        raise ValueError(f"ogd_basis='gt_logit' needs a model returning logits or an output with .logits, "
                         f"got {type(out).__name__}")
    if logits.dim() == 3 and labels.dim() == 2 and logits.shape[:2] == labels.shape:
        logits, labels = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    elif not (logits.dim() == 2 and labels.dim() == 1 and logits.shape[0] == labels.shape[0]):
        raise ValueError(f"ogd_basis='gt_logit': logits of shape {list(logits.shape)} do not fit "
                         f"labels of shape {list(labels.shape)}; expected (B, T, V) with (B, T) or (B, C) with (B,)")
    mask = labels != -100
    z = logits[mask].gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)[:limit]  # (m,) ground-truth logits
    return [_flat(torch.autograd.grad(z[i], params, retain_graph=i < z.numel() - 1, allow_unused=True), params)
            for i in range(z.numel())]

