"""Low-Rank Circuit Projection (LRCP): keep each protected linear layer's output unchanged on the
subspace its prior-task inputs live in.

For a linear map ``y = W x`` whose prior-task inputs span (mostly) an ``r``-dimensional subspace
with orthonormal basis ``U`` (``d_in × r``), any update with ``ΔW U = 0`` leaves ``W x`` unchanged
for every prior input ``x ∈ span(U)``. LRCP ("Twenty models" study, LRCP section) estimates ``U``
from the uncentred input covariance and restricts every update to the orthogonal complement::

    C = Σₜ xₜ xₜᵀ            (over non-pad tokens; streamed, memory d_in × d_in)
    C / n = V diag(σ) Vᵀ,    U = V[:, :r],  r = min{ r : Σ_{i≤r} σᵢ / Σ σ ≥ energy }
    ΔW ← ΔW (I − U Uᵀ)       nn.Linear weight (out, in):  G ← G − (G U) Uᵀ
                             HF Conv1D weight (in, out):  G ← G − U (Uᵀ G)

**Why the update, not just the gradient** (``hold="update"``, the default). Projecting ``G`` is
exact for plain SGD only. Adam divides elementwise by ``√v``, which does not commute with
right-multiplication by ``(I − UUᵀ)``, and decoupled weight decay shrinks ``W`` itself
(``W ← (1 − lr·λ) W``), which scales ``W U`` and so changes outputs on the subspace. With
``hold="update"`` the wrapper projects the gradient (so the optimizer's moments live in the
complement) *and* records ``P = W U`` before the base step and restores it afterwards::

    W ← W − (W U − P) Uᵀ     (then W U = P exactly, whatever the base optimizer did)

at a cost of two ``out × d_in × r`` products per protected weight per step. ``hold="gradient"``
is the classic gradient-only projection; with it, use ``weight_decay=0`` for the protected
weights (a warning says so when a group with ``weight_decay > 0`` holds one).

**Biases** shift the output on *all* inputs, so no projection can protect them; they are left
alone unless ``freeze_bias=True`` (their gradients are zeroed and, with ``hold="update"``, their
values restored after each step).

**LoRA** (PEFT): the adapter ``ΔW = B A`` sees the same ``x`` as the base layer, so ``A``
(``r_lora × d_in``) is projected like a weight: ``G_A ← G_A (I − UUᵀ)``. That holds ``A U`` fixed,
which keeps ``B A U`` fixed only if ``A U = 0`` or ``B`` stops moving along ``A U``. So
:meth:`remember` sets ``A ← A (I − UUᵀ)`` when ``B`` is still zero (a fresh adapter: the model's
output does not change), and otherwise also projects ``B``'s update against ``Q = orth(A U)`` in
the ``r_lora`` space (``G_B ← G_B (I − QQᵀ)``).

**Fused QKV** (GPT-2 ``c_attn``, ...): the projection acts on the input side, so it protects every
output row of the fused weight; ``qkv_rows="qk"`` restricts it to the Q and K rows (positions from
:func:`mitigate.model_map`), leaving V free.

Tasks accumulate: each :meth:`remember` merges the new subspace with the stored one
(``merge="weighted"``: SVD of ``[U_old √σ_old, U_new √σ_new]``, keeping the top directions of the
combined energy within ``max_rank``; ``"concat"``: orthonormal basis of the union).
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from mitigate._utils import LossFn, all_reduce_sum_, progress_bar
from mitigate.architectures import is_linear
from mitigate.errors import StateMismatchError, UnsupportedArchitectureError
from mitigate.optim._base import OptimizerWrapper, finite_sq_norm
from mitigate.reports import TaskEndReport

logger = logging.getLogger(__name__)

PRESETS = ("seed", "attention", "attention_qk", "mlp", "all_linear")
"""Named target sets (resolved with :func:`mitigate.model_map`):

* ``"seed"`` (default): attention Q/K/V/O of the bottom ``ceil(L/3)`` blocks plus the FFN linears of
  blocks ``≥ L//3`` — the study's finding that early-layer attention heads and mid-to-deep FFNs
  are the circuits overwritten;
* ``"attention"``: every Q/K/V/O projection; ``"attention_qk"``: Q and K only (fused QKV weights
  are then restricted to their Q/K rows); ``"mlp"``: every FFN linear; ``"all_linear"``: every
  linear layer inside the blocks.
"""


@dataclass
class LRCPConfig:
    """Configuration of :class:`LowRankCircuitProjection` (round-trips through :meth:`to_dict`).

    Attributes:
        targets: which linear modules to protect. ``None`` = ``"seed"``; a preset name from
            :data:`PRESETS`; another string = a regex ``re.fullmatch``-ed against module names; a
            list = exact module names or dotted suffixes (``"q_proj"`` matches every layer's).
        rank: fixed subspace rank per module and task (``None``: chosen by ``energy``).
        energy: smallest ``r`` with ``Σ_{i≤r} σᵢ / Σ σ ≥ energy``, in ``(0, 1]``.
        max_rank: per-module rank budget after merging tasks: an int, or a float in ``(0, 1]`` =
            fraction of the module's input dimension (default 0.5: at least half of every input
            space stays free for the new task), or ``None`` (no budget).
        merge: how successive tasks combine: ``"weighted"`` (by singular values) or ``"concat"``.
        qkv_rows: ``"all"`` or ``"qk"``: which rows of a fused QKV weight are protected.
        freeze_bias: zero the bias gradients of protected modules (and hold their values).
        hold: ``"update"`` (exact for any optimizer, see module docs) or ``"gradient"``.
        cov_dtype: accumulation dtype of the covariance (``"float64"`` or ``"float32"``).
    """

    targets: str | list[str] | None = None
    rank: int | None = None
    energy: float = 0.99
    max_rank: int | float | None = 0.5
    merge: Literal["weighted", "concat"] = "weighted"
    qkv_rows: Literal["all", "qk"] = "all"
    freeze_bias: bool = False
    hold: Literal["update", "gradient"] = "update"
    cov_dtype: Literal["float64", "float32"] = "float64"

    def __post_init__(self) -> None:
        if self.targets is not None and not isinstance(self.targets, str):
            self.targets = list(self.targets)
            if not self.targets or not all(isinstance(t, str) for t in self.targets):
                raise ValueError(
                    f"targets={self.targets!r}: pass a preset {PRESETS}, a regex string, or a "
                    "non-empty list of module names/suffixes"
                )
        if isinstance(self.targets, str) and self.targets not in PRESETS:
            try:
                re.compile(self.targets)
            except re.error as e:
                raise ValueError(f"targets={self.targets!r} is not a preset {PRESETS} nor a valid regex: {e}") from e
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank={self.rank!r} must be a positive int or None (choose by energy)")
        if not (isinstance(self.energy, (int, float)) and 0.0 < float(self.energy) <= 1.0):
            raise ValueError(f"energy={self.energy!r} must be in (0, 1], e.g. 0.99")
        mr = self.max_rank
        if mr is not None:
            if isinstance(mr, bool) or not isinstance(mr, (int, float)):
                raise ValueError(f"max_rank={mr!r} must be an int ≥ 1, a float in (0, 1], or None")
            if isinstance(mr, int) and mr < 1:
                raise ValueError(f"max_rank={mr!r} must be ≥ 1 (or a fraction in (0, 1], or None)")
            if isinstance(mr, float) and not 0.0 < mr <= 1.0:
                raise ValueError(f"max_rank={mr!r}: a float budget is a fraction of d_in in (0, 1]")
        for name, value, allowed in (
            ("merge", self.merge, ("weighted", "concat")),
            ("qkv_rows", self.qkv_rows, ("all", "qk")),
            ("hold", self.hold, ("update", "gradient")),
            ("cov_dtype", self.cov_dtype, ("float64", "float32")),
        ):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} must be one of {allowed}")

    def budget(self, d_in: int) -> int:
        """The rank budget for a module with input dimension ``d_in``."""
        if self.max_rank is None:
            return d_in
        if isinstance(self.max_rank, float):
            return max(1, int(math.floor(self.max_rank * d_in)))
        return min(int(self.max_rank), d_in)

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-able) form; ``LRCPConfig(**cfg.to_dict())`` rebuilds it."""
        return asdict(self)


@dataclass
class LRCPModuleStats:
    """What LRCP did to one module.

    Attributes:
        rank: rank of the protected input subspace (0 before :meth:`remember`).
        d_in: input dimension.
        tokens: prior-task tokens seen, summed over tasks (and ranks under DDP).
        tasks: number of :meth:`~LowRankCircuitProjection.remember` calls merged in.
        removed_last: ``‖G U‖ / ‖G‖`` at the last step (fraction of gradient norm removed).
        removed_mean: the same, averaged over the steps with finite gradients so far.
        nonfinite_skips: steps whose gradients were non-finite and passed through untouched.
    """

    rank: int
    d_in: int
    tokens: int
    tasks: int
    removed_last: float
    removed_mean: float
    nonfinite_skips: int = 0


@dataclass
class _Proj:
    """One parameter projected on the input side of a unit."""

    name: str
    param: nn.Parameter
    in_axis: int  # 1: (out, in) like nn.Linear / lora_A; 0: (in, out) like HF Conv1D
    rows: Tensor | None = None  # output positions projected (None: all)
    basis: str = "U"  # "U": the unit's subspace; "Q": the LoRA-B rank-space basis of this param


@dataclass
class _Unit:
    """One protected module: hook target, projected params, stored subspace."""

    name: str
    module: nn.Module = field(repr=False)
    d_in: int
    projs: list[_Proj]
    bias: nn.Parameter | None = None
    lora: list[tuple[_Proj, _Proj]] = field(default_factory=list)  # (A, B) per adapter
    U: Tensor | None = None  # (d_in, r) float32
    sigma: Tensor | None = None  # (r,) eigenvalues of C / n (float64)
    tokens: int = 0
    tasks: int = 0


def _is_lora(mod: nn.Module) -> bool:
    return (
        isinstance(getattr(mod, "lora_A", None), nn.ModuleDict)
        and isinstance(getattr(mod, "base_layer", None), nn.Module)
    )


def _base_linear(mod: nn.Module) -> nn.Module:
    while _is_lora(mod):
        mod = mod.base_layer
    return mod


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Linear-like modules: ``nn.Linear``, HF ``Conv1D`` and PEFT LoRA wrappers (their inner
    ``base_layer`` / ``lora_A`` / ``lora_B`` are parts of the wrapper, not candidates)."""
    out: dict[str, nn.Module] = {}
    lora_prefixes: list[str] = []
    for name, mod in model.named_modules():
        if any(name.startswith(p + ".") for p in lora_prefixes):
            continue
        if _is_lora(mod) and is_linear(_base_linear(mod)):
            out[name] = mod
            lora_prefixes.append(name)
        elif is_linear(mod):
            out[name] = mod
    return out


def _orthonormal_columns(M: Tensor, rel_tol: float = 1e-10) -> tuple[Tensor, Tensor]:
    """SVD of ``M`` (d, k): left singular vectors with non-negligible singular values, and those
    singular values (descending)."""
    if M.shape[1] == 0:
        return M, M.new_zeros(0)
    V, S, _ = torch.linalg.svd(M, full_matrices=False)
    keep = S > rel_tol * max(float(S[0]), 1e-300) * max(M.shape)
    return V[:, keep], S[keep]


def select_rank(sigma: Tensor, *, energy: float, rank: int | None, budget: int) -> int:
    """Rank of the protected subspace from the eigenvalues ``sigma`` (descending).

    ``r = rank`` if given, else the smallest ``r`` with ``Σ_{i≤r} σᵢ / Σ σ ≥ energy``; never more than
    ``budget`` nor than the number of numerically non-zero eigenvalues.

    Args:
        sigma: ``(d,)`` non-negative eigenvalues, descending.
        energy: energy threshold in ``(0, 1]``.
        rank: fixed rank or ``None``.
        budget: rank cap.

    Returns:
        ``r`` in ``[0, min(budget, d)]``.
    """
    sigma = sigma.clamp_min(0)
    if sigma.numel() == 0 or float(sigma[0]) <= 0:
        return 0
    nonzero = int((sigma > sigma[0] * 1e-12 * sigma.numel()).sum())
    if rank is not None:
        r = rank
    else:
        frac = torch.cumsum(sigma, 0) / sigma.sum()
        r = int((frac < energy - 1e-12).sum()) + 1
    return max(0, min(r, budget, nonzero))


class LowRankCircuitProjection(OptimizerWrapper):
    """Wrap an optimizer so protected modules keep their outputs on prior-task input subspaces.

    Usage::

        opt = mitigate.LowRankCircuitProjection(torch.optim.AdamW(model.parameters(), lr=1e-4), model)
        opt.remember(model, task0_batches)     # after training task 0
        ... train task 1 with opt.step() as usual ...

    Args:
        optimizer: the optimizer to wrap (may itself be a wrapper).
        model: the model whose parameters ``optimizer`` updates (a PEFT / DDP wrapper is fine).
        targets, rank, energy, max_rank, merge, qkv_rows, freeze_bias, hold, cov_dtype: see
            :class:`LRCPConfig`.
        config: a full :class:`LRCPConfig` instead of the keywords.

    Raises:
        ValueError: bad configuration, or ``targets`` matches no linear module (the message lists
            some candidate names).
        UnsupportedArchitectureError: a preset was asked for a model :func:`mitigate.model_map`
            cannot describe (pass explicit module names instead).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        model: nn.Module,
        *,
        targets: str | Sequence[str] | None = None,
        rank: int | None = None,
        energy: float = 0.99,
        max_rank: int | float | None = 0.5,
        merge: Literal["weighted", "concat"] = "weighted",
        qkv_rows: Literal["all", "qk"] = "all",
        freeze_bias: bool = False,
        hold: Literal["update", "gradient"] = "update",
        cov_dtype: Literal["float64", "float32"] = "float64",
        config: LRCPConfig | None = None,
    ) -> None:
        super().__init__(optimizer)
        if config is None:
            config = LRCPConfig(
                targets=list(targets) if targets is not None and not isinstance(targets, str) else targets,
                rank=rank, energy=energy, max_rank=max_rank, merge=merge, qkv_rows=qkv_rows,
                freeze_bias=freeze_bias, hold=hold, cov_dtype=cov_dtype,
            )
        self.config = config
        self.model = model
        self._units: dict[str, _Unit] = self._resolve_units(self._unwrap(model))
        self._steps = 0
        self._removed_frac_sum: dict[str, float] = {n: 0.0 for n in self._units}
        self._last: dict[str, tuple[Tensor, Tensor]] = {}
        self._held: list[tuple[_Proj, Tensor, Tensor]] = []
        self._held_bias: list[tuple[nn.Parameter, Tensor]] = []
        self._held_finite: Tensor | None = None  # this step's gradients were finite (device bool)
        self._nonfinite: Tensor | float = 0.0  # steps passed through untouched (device count)
        self._lora_q: dict[str, Tensor] = {}
        self._warned_decay = False

    # ------------------------------------------------------------------ target resolution
    @staticmethod
    def _unwrap(model: nn.Module) -> nn.Module:
        ddp = (nn.parallel.DistributedDataParallel, nn.DataParallel)
        return model.module if isinstance(model, ddp) else model

    @property
    def targets(self) -> list[str]:
        """Full names of the protected modules (like PEFT's ``inspect_matched_modules``)."""
        return list(self._units)

    def _preset_names(self, model: nn.Module, preset: str, cands: dict[str, nn.Module]) -> tuple[list[str], set[str]]:
        """Module names of a preset and the set of fused QKV modules restricted to Q/K rows."""
        from mitigate.architectures import model_map

        mm = model_map(model)
        L = mm.num_layers
        names: list[str] = []
        qk_only: set[str] = set()

        def add(n: str) -> None:
            if n in cands and n not in names:
                names.append(n)

        for b in mm.blocks:
            attn_on = preset in ("attention", "attention_qk", "all_linear") or (
                preset == "seed" and b.index < max(1, math.ceil(L / 3))
            )
            mlp_on = preset in ("mlp", "all_linear") or (preset == "seed" and b.index >= L // 3)
            if attn_on:
                for att in mm.attention(b):
                    slices = (att.q, att.k) if preset == "attention_qk" else (att.q, att.k, att.v, att.o)
                    for sl in slices:
                        add(sl.module_name)
                    if preset == "attention_qk" and att.q.fused:
                        qk_only.add(att.q.module_name)
            if mlp_on:
                for prefix in mm.mlp_module_names(b):
                    for n in cands:
                        if n.startswith(prefix + "."):
                            add(n)
            if preset == "all_linear":
                for n in cands:
                    if n.startswith(b.name + "."):
                        add(n)
        return names, qk_only

    def _fused_rows(self, model: nn.Module) -> dict[str, Tensor]:
        """Fused QKV module name -> sorted Q/K positions along its output axis."""
        from mitigate.architectures import model_map

        out: dict[str, Tensor] = {}
        mm = model_map(model)
        for b in mm.blocks:
            for att in mm.attention(b):
                if att.q.fused:
                    out[att.q.module_name] = torch.cat([att.q.rows(), att.k.rows()]).sort().values
        return out

    def _resolve_units(self, model: nn.Module, config: LRCPConfig | None = None) -> dict[str, _Unit]:
        cfg = self.config if config is None else config
        cands = _candidates(model)
        qk_only: set[str] = set()
        tg = "seed" if cfg.targets is None else cfg.targets
        if isinstance(tg, str) and tg in PRESETS:
            names, qk_only = self._preset_names(model, tg, cands)
        elif isinstance(tg, str):
            rx = re.compile(tg)
            names = [n for n in cands if rx.fullmatch(n)]
        else:
            names = [n for n in cands if any(n == t or n.endswith("." + t) for t in tg)]
        if not names:
            some = ", ".join(list(cands)[:8])
            raise ValueError(
                f"targets={tg!r} matched no linear module of {type(model).__name__}; module names "
                f"look like: {some} — pass a preset {PRESETS}, a regex, or a list of names/suffixes"
            )
        fused: dict[str, Tensor] = {}
        if cfg.qkv_rows == "qk" or qk_only:
            try:
                fused = self._fused_rows(model)
            except UnsupportedArchitectureError as e:
                raise ValueError(
                    f"qkv_rows='qk' needs the Q/K row positions from mitigate.model_map, which "
                    f"failed: {e}"
                ) from e
        named_params = dict(model.named_parameters())
        pname = {id(p): n for n, p in named_params.items()}
        units: dict[str, _Unit] = {}
        for n in names:
            mod = cands[n]
            base = _base_linear(mod)
            conv1d = type(base).__name__ == "Conv1D"
            d_in = int(base.weight.shape[0] if conv1d else base.weight.shape[1])
            rows = None
            if n in fused and (cfg.qkv_rows == "qk" or n in qk_only):
                rows = fused[n].to(base.weight.device)
            projs = [_Proj(pname.get(id(base.weight), f"{n}.weight"), base.weight, 0 if conv1d else 1, rows)]
            lora: list[tuple[_Proj, _Proj]] = []
            if _is_lora(mod):
                if rows is not None:
                    logger.info("LRCP: %s is a LoRA-wrapped fused QKV; its adapters are protected on all rows", n)
                for adapter, a_mod in mod.lora_A.items():
                    b_mod = mod.lora_B[adapter]
                    if not (isinstance(a_mod, nn.Linear) and isinstance(b_mod, nn.Linear)):
                        logger.warning("LRCP: adapter %r of %s is not a Linear LoRA pair; not protected", adapter, n)
                        continue
                    pa = _Proj(pname.get(id(a_mod.weight), f"{n}.lora_A.{adapter}.weight"), a_mod.weight, 1)
                    pb = _Proj(pname.get(id(b_mod.weight), f"{n}.lora_B.{adapter}.weight"), b_mod.weight, 1, basis="Q")
                    lora.append((pa, pb))
            bias = getattr(base, "bias", None)
            units[n] = _Unit(name=n, module=mod, d_in=d_in, projs=projs, bias=bias if isinstance(bias, nn.Parameter) else None, lora=lora)
        return units

    # ------------------------------------------------------------------ remember
    def end_task(self, batches: Any, *, model: nn.Module | None = None, loss_fn: LossFn | None = None) -> TaskEndReport:
        """The task is finished: record every protected module's input subspace (:meth:`remember`).

        The one verb every mitigation shares (see :mod:`mitigate.reports`); ``remember`` stays
        as it was.

        Args:
            batches: the finished task's batches (one dict or an iterable).
            model: ``None``: the model given at construction.
            loss_fn: as :meth:`remember`.

        Returns:
            :class:`~mitigate.reports.TaskEndReport` with ``modules``, ``total_rank``,
            ``min_rank`` / ``max_rank`` and the per-module ``ranks``; ``.result`` is the
            ``{module: rank}`` dict.
        """
        from mitigate.reports import run_end_task

        task = max((u.tasks for u in self._units.values()), default=0)

        def details(ranks: dict[str, int]) -> dict[str, Any]:
            vals = list(ranks.values())
            return {"modules": len(vals), "total_rank": sum(vals), "min_rank": min(vals, default=0), "max_rank": max(vals, default=0), "ranks": dict(ranks)}

        return run_end_task("LowRankCircuitProjection", task, batches, lambda b: self.remember(model, b, loss_fn), details)

    @torch.no_grad()
    def remember(
        self,
        model: nn.Module | None,
        batches: Iterable[Any],
        loss_fn: LossFn | None = None,
    ) -> dict[str, int]:
        """Record the prior task's input subspace of every protected module and merge it in.

        Streams ``C = Σ x xᵀ`` over the non-pad tokens of ``batches`` (``attention_mask`` when the
        batch has one) with forward pre-hooks, in eval mode, under ``no_grad``; all-reduces ``C``
        and the token counts across DDP ranks; takes the eigendecomposition of ``C / n`` and keeps
        ``U`` (rank from ``energy`` or ``rank``, capped by ``max_rank``); merges with earlier tasks.
        Train/eval flags and ``.grad`` are left as found.

        Args:
            model: the model (``None``: the one given at construction). Must be the same modules.
            batches: prior-task batches; dicts go through ``model(**batch)``.
            loss_fn: optional ``loss_fn(model, batch)`` used only to run the forward pass (for
                models that need a custom call); its value is ignored.

        Returns:
            ``{module name: rank}`` after merging.

        Raises:
            ValueError: no token reached a protected module (empty ``batches``, or a target never
                called in the forward), or ``rank`` exceeds a module's input dimension.
        """
        from mitigate._utils import preserve_state

        model = self.model if model is None else model
        inner = self._unwrap(model)
        cfg = self.config
        for u in self._units.values():
            if cfg.rank is not None and cfg.rank > u.d_in:
                raise ValueError(
                    f"rank={cfg.rank} exceeds the input dimension d_in={u.d_in} of {u.name!r}; "
                    f"use rank ≤ {u.d_in} or rank=None with energy="
                )
        modules = dict(inner.named_modules())
        missing = [n for n in self._units if modules.get(n) is not self._units[n].module]
        if missing:
            raise StateMismatchError(
                f"remember() got a model whose modules {missing[:5]} are not the ones this wrapper "
                "was built on; pass the same model instance"
            )
        dtype = torch.float64 if cfg.cov_dtype == "float64" else torch.float32
        cov: dict[str, Tensor] = {}
        count: dict[str, int] = {n: 0 for n in self._units}
        mask_box: list[Tensor | None] = [None]

        def make_hook(name: str, d_in: int):
            def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
                x = args[0] if args else next(iter(kwargs.values()), None)
                if not isinstance(x, Tensor) or x.shape[-1] != d_in:
                    return
                mask = mask_box[0]
                if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                    X = x[mask.to(x.device).bool()]
                else:
                    X = x.reshape(-1, d_in)
                X = X.to(dtype)
                if name not in cov:
                    cov[name] = torch.zeros(d_in, d_in, dtype=dtype, device=x.device)
                cov[name].addmm_(X.T, X)
                count[name] += int(X.shape[0])

            return hook

        handles = [
            u.module.register_forward_pre_hook(make_hook(n, u.d_in), with_kwargs=True)
            for n, u in self._units.items()
        ]
        n_batches = 0
        try:
            with preserve_state(inner, mode=False):
                for batch in progress_bar(batches, desc="LRCP remember", unit="batch", delay=2.0, leave=False):
                    n_batches += 1
                    mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
                    mask_box[0] = mask if isinstance(mask, Tensor) else None
                    if loss_fn is not None:
                        loss_fn(model, batch)
                    elif isinstance(batch, Mapping):
                        model(**batch)
                    else:
                        model(*batch) if isinstance(batch, (list, tuple)) else model(batch)
        finally:
            for h in handles:
                h.remove()
        if n_batches == 0:
            raise ValueError("remember() got no batches; pass the prior task's batches (a non-empty iterable)")
        # DDP: every rank contributes its tokens (sum); ranks without a module's tokens send zeros.
        first = next(iter(self._units.values())).projs[0].param.device  # NCCL needs device tensors
        counts = torch.tensor([count[n] for n in self._units], dtype=torch.float64, device=first)
        all_reduce_sum_(counts)
        for i, (n, u) in enumerate(self._units.items()):
            if n not in cov:
                cov[n] = torch.zeros(u.d_in, u.d_in, dtype=dtype, device=u.projs[0].param.device)
            all_reduce_sum_(cov[n])
            count[n] = int(counts[i])
        if all(c == 0 for c in count.values()):
            raise ValueError(
                f"no activations captured: none of the {len(self._units)} protected modules "
                f"(e.g. {self.targets[:3]}) received a token from {n_batches} batch(es); check that "
                "the batches are non-empty and that the targets are used in the forward pass"
            )
        ranks: dict[str, int] = {}
        for n, u in self._units.items():
            if count[n] == 0:
                logger.warning("LRCP.remember: module %s received no tokens; its subspace is unchanged", n)
                ranks[n] = 0 if u.U is None else int(u.U.shape[1])
                continue
            C = cov.pop(n).double() / count[n]
            evals, evecs = torch.linalg.eigh(C)  # ascending
            evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
            budget = cfg.budget(u.d_in)
            r = select_rank(evals, energy=float(cfg.energy), rank=cfg.rank, budget=budget)
            self._merge(u, evecs[:, :r], evals[:r], budget)
            u.tokens += count[n]
            u.tasks += 1
            ranks[n] = int(u.U.shape[1]) if u.U is not None else 0
        self._prepare_lora()
        logger.info("LRCP.remember: ranks %s", ranks)
        return ranks

    def _merge(self, u: _Unit, V: Tensor, s: Tensor, budget: int) -> None:
        """Merge a new subspace ``V`` (d, r) with eigenvalues ``s`` into ``u`` (see module docs)."""
        dev = u.projs[0].param.device
        V, s = V.double().to(dev), s.double().to(dev)
        if u.U is None or u.U.shape[1] == 0:
            U, sig = V, s
        elif self.config.merge == "weighted":
            M = torch.cat([u.U.double() * u.sigma.sqrt(), V * s.sqrt()], dim=1)
            U, S = _orthonormal_columns(M)
            sig = S.square()
        else:
            U, S = _orthonormal_columns(torch.cat([u.U.double(), V], dim=1))
            sig = S.square()
        U, sig = U[:, :budget], sig[:budget]
        if U.shape[1]:
            # one more QR pass: orthonormal to float64 round-off before the float32 cast
            U = torch.linalg.qr(U).Q
        u.U = U.float().contiguous()
        u.sigma = sig.contiguous()

    def _prepare_lora(self) -> None:
        """Zero ``A U`` for fresh adapters (``B = 0``), else record ``Q = orth(A U)`` for ``B``."""
        for u in self._units.values():
            if u.U is None or not u.lora:
                continue
            U = u.U
            for pa, pb in u.lora:
                A, B = pa.param, pb.param
                AU = A.float() @ U  # (r_lora, r)
                if bool((B == 0).all()):
                    A.sub_((AU @ U.T).to(A.dtype))
                    self._lora_q.pop(pb.name, None)
                else:
                    Q, _ = _orthonormal_columns(AU.double(), rel_tol=1e-6)
                    if Q.shape[1]:
                        self._lora_q[pb.name] = Q.float().contiguous()
                    else:
                        self._lora_q.pop(pb.name, None)

    # ------------------------------------------------------------------ the step
    def _basis(self, u: _Unit, p: _Proj) -> Tensor | None:
        return u.U if p.basis == "U" else self._lora_q.get(p.name)

    def _projected(self) -> Iterable[tuple[_Unit, _Proj, Tensor]]:
        """(unit, projected param, basis) for every param that has a basis and a gradient."""
        for u in self._units.values():
            if u.U is None or u.U.shape[1] == 0:
                continue
            for p in [*u.projs, *(x for pair in u.lora for x in pair)]:
                if p.param.grad is None:
                    continue
                basis = self._basis(u, p)
                if basis is not None and basis.shape[1]:
                    yield u, p, basis

    @staticmethod
    def _as_out_in(t: Tensor, p: _Proj) -> Tensor:
        """View ``t`` as (out, in) (a transpose view for Conv1D)."""
        return t if p.in_axis == 1 else t.t()

    def transform_gradients(self) -> None:
        """``G ← G − (G U) Uᵀ`` on every protected weight (in (out, in) orientation), zero the
        bias gradients with ``freeze_bias``, and (``hold="update"``) record ``P = W U``.

        Non-finite gradients (any NaN/inf among the projected ones, e.g. fp16 overflow) pass to
        the base optimizer untouched, as in :class:`~mitigate.GradientProjection` (the
        projection would spread one NaN element over a whole row); the step is counted in
        ``nonfinite_skips`` and left out of ``removed_mean``, and ``W U`` is not restored."""
        self._held, self._held_bias = [], []
        if self.config.hold == "gradient" and not self._warned_decay:
            self._warn_decay()
        sums: dict[str, list[Tensor]] = {}
        projected = list(self._projected())
        _, finite = finite_sq_norm([p.param.grad for _, p, _ in projected])
        if projected:
            finite = finite.to(projected[0][1].param.grad.device)
        self._held_finite = finite
        for u, p, basis in projected:
            G = self._as_out_in(p.param.grad, p)
            Gs = G if p.rows is None else G[p.rows]
            GU = torch.where(finite, Gs.float() @ basis, 0.0)  # (out_sel, r); 0: pass untouched
            removed = (GU @ basis.T).to(G.dtype)
            if p.rows is None:
                G.sub_(removed)
            else:
                G[p.rows] = Gs - removed
            if p.basis == "U":
                acc = sums.setdefault(u.name, [GU.new_zeros(()), GU.new_zeros(())])
                acc[0] += GU.square().sum()
                acc[1] += p.param.grad.float().square().sum() + GU.square().sum()  # ‖G_before‖² (Pythagoras)
            if self.config.hold == "update":
                W = self._as_out_in(p.param.detach(), p)
                Ws = W if p.rows is None else W[p.rows]
                self._held.append((p, basis, Ws.float() @ basis))
        if self.config.freeze_bias:
            for u in self._units.values():
                if u.U is not None and u.bias is not None:
                    if u.bias.grad is not None:
                        u.bias.grad.zero_()
                    if self.config.hold == "update":
                        self._held_bias.append((u.bias, u.bias.detach().clone()))
        self._last = {n: (v[0], v[1]) for n, v in sums.items()}
        for n, (rem, tot) in self._last.items():
            frac = torch.where(finite, (rem / tot.clamp_min(1e-30)).sqrt(), 0.0)
            self._removed_frac_sum[n] = self._removed_frac_sum.get(n, 0.0) + frac  # tensor, no sync
        self._nonfinite = self._nonfinite + (~finite).float()
        self._steps += 1

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        """Project the gradients, take the base step, then (``hold="update"``) restore ``W U``.

        Args:
            closure: optional; run once before the projection (see :class:`OptimizerWrapper`).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = super().step(closure)
        finite = self._held_finite
        for p, basis, P in self._held:
            W = self._as_out_in(p.param.data, p)
            Ws = W if p.rows is None else W[p.rows]
            D = torch.where(finite, Ws.float() @ basis - P, 0.0)  # non-finite step: not restored
            if p.rows is None:
                W.sub_((D @ basis.T).to(W.dtype))
            else:
                W[p.rows] = Ws - (D @ basis.T).to(W.dtype)
        for b, value in self._held_bias:
            b.data.copy_(value)
        self._held, self._held_bias = [], []
        return loss

    def _warn_decay(self) -> None:
        protected = {id(p.param) for u in self._units.values() for p in [*u.projs, *(x for pr in u.lora for x in pr)]}
        for i, g in enumerate(self.param_groups):
            if g.get("weight_decay", 0) and any(id(p) in protected for p in g["params"]):
                warnings.warn(
                    f"LowRankCircuitProjection(hold='gradient'): param group {i} has weight_decay="
                    f"{g['weight_decay']} and holds protected weights; decoupled weight decay shrinks W "
                    "and changes its outputs on the protected subspace. Use hold='update' (default) or "
                    "put the protected weights in a group with weight_decay=0.",
                    stacklevel=3,
                )
                break
        self._warned_decay = True

    # ------------------------------------------------------------------ inspection
    def subspace(self, name: str) -> Tensor | None:
        """The orthonormal basis ``U`` (d_in, r) stored for module ``name`` (``None`` before remember)."""
        return self._units[name].U

    def stats(self) -> dict[str, LRCPModuleStats]:
        """Per protected module: rank, tokens, tasks, and the fraction of gradient norm removed."""
        out = {}
        nonfinite = int(float(self._nonfinite))
        for n, u in self._units.items():
            last = self._last.get(n)
            removed_last = float((last[0] / last[1].clamp_min(1e-30)).sqrt()) if last is not None else 0.0
            s = self._removed_frac_sum.get(n, 0.0)
            finite_steps = self._steps - nonfinite
            removed_mean = float(s) / finite_steps if finite_steps else 0.0
            out[n] = LRCPModuleStats(
                rank=0 if u.U is None else int(u.U.shape[1]), d_in=u.d_in, tokens=u.tokens,
                tasks=u.tasks, removed_last=removed_last, removed_mean=removed_mean,
                nonfinite_skips=nonfinite,
            )
        return out

    # ------------------------------------------------------------------ state
    def wrapper_state_dict(self) -> dict[str, Any]:
        """Config, per-module ``U``/``σ``/token and task counts, LoRA ``Q`` bases and step stats."""
        return {
            "config": self.config.to_dict(),
            "modules": {
                n: {
                    "U": u.U.clone() if u.U is not None else None,
                    "sigma": u.sigma.clone() if u.sigma is not None else None,
                    "d_in": u.d_in,
                    "tokens": u.tokens,
                    "tasks": u.tasks,
                }
                for n, u in self._units.items()
            },
            "lora_q": {k: v.clone() for k, v in self._lora_q.items()},
            "steps": self._steps,
            "removed_sum": {n: float(v) for n, v in self._removed_frac_sum.items()},
            "nonfinite": float(self._nonfinite),
        }

    def _units_for(self, state: dict[str, Any]) -> tuple[LRCPConfig, dict[str, _Unit]]:
        """The saved config and the units it resolves to on this model, checked against the
        saved modules (nothing is changed)."""
        if not isinstance(state, dict) or "config" not in state or "modules" not in state:
            raise ValueError("not a LowRankCircuitProjection state (keys 'config'/'modules' missing)")
        saved_cfg = LRCPConfig(**state["config"])
        units = self._units if saved_cfg == self.config else self._resolve_units(self._unwrap(self.model), saved_cfg)
        saved = state["modules"]
        missing = sorted(set(saved) - set(units))
        extra = sorted(set(units) - set(saved))
        bad = [n for n in saved if n in units and int(saved[n]["d_in"]) != units[n].d_in]
        if missing or extra or bad:
            raise StateMismatchError(
                f"LRCP state does not match the model: saved modules missing from it {missing[:5]}, "
                f"protected modules absent from the state {extra[:5]}, input sizes changed {bad[:5]}"
            )
        return saved_cfg, units

    def validate_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        """Check a :meth:`wrapper_state_dict` output against the model; change nothing.

        Raises:
            ValueError: not an LRCP state, or its config is invalid.
            StateMismatchError: a saved module is missing from the model or has another ``d_in``.
        """
        self._units_for(state)

    def load_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`wrapper_state_dict`'s output (the saved config replaces the current one).

        Raises:
            StateMismatchError: a saved module is missing from the model or has another ``d_in``.
        """
        saved_cfg, units = self._units_for(state)
        if saved_cfg != self.config:
            logger.warning("LRCP.load_state_dict: adopting the saved config %s (was %s)", saved_cfg, self.config)
            self.config = saved_cfg
            self._units = units
        saved = state["modules"]
        for n, s in saved.items():
            u = self._units[n]
            dev = u.projs[0].param.device
            u.U = s["U"].to(dev) if s["U"] is not None else None
            u.sigma = s["sigma"].to(dev) if s["sigma"] is not None else None
            u.tokens, u.tasks = int(s["tokens"]), int(s["tasks"])
        self._lora_q = {k: v.to(self._lora_device(k)) for k, v in state.get("lora_q", {}).items()}
        self._steps = int(state.get("steps", 0))
        self._removed_frac_sum = {n: float(v) for n, v in state.get("removed_sum", {}).items()}
        self._nonfinite = float(state.get("nonfinite", 0.0))
        self._last = {}

    def _lora_device(self, param_name: str) -> torch.device:
        for u in self._units.values():
            for _, pb in u.lora:
                if pb.name == param_name:
                    return pb.param.device
        raise StateMismatchError(f"LRCP state has a LoRA basis for {param_name!r}, which the model lacks")
