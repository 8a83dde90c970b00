"""Hugging Face ``Trainer`` integration: loss terms, optimizer wrappers, freezing, task boundaries.

Three lines on top of a working ``Trainer`` script::

    ewc = mitigate.EWC(model, strength=100.0)
    proj = OptimizerMitigation(mitigate.GradientProjection, mode="agem")
    trainer = MitigationTrainer(model=model, args=args, train_dataset=ds, mitigations=[ewc, proj])
    trainer.train()
    trainer.end_task(ds, max_batches=16)      # Fisher, eigenpairs, projection memory

Where each kind of mitigation acts inside ``Trainer._inner_training_loop``:

* **Loss terms** (:class:`~mitigate.EWC`, :class:`~mitigate.CurvatureRegularizer`, anything with
  ``consolidate(batches, loss_fn)`` that is called as ``term() -> scalar``) are added to the task
  loss in :meth:`MitigationTrainerMixin.compute_loss`, so their gradient rides in the same
  backward pass (and, under DDP, in the same gradient all-reduce). The total gradient per
  optimizer step is ``∇L_task + Σ_t ∇R_t`` whatever the gradient-accumulation setting: when the
  Trainer does not divide the loss by the accumulation steps (the loss is normalised by
  ``num_items_in_batch``), the penalty is divided by them instead.
* **Optimizer wrappers** (:class:`~mitigate.GradientProjection`, :class:`~mitigate.GradientClipping`,
  :class:`~mitigate.LowRankCircuitProjection`) wrap the optimizer the Trainer creates
  (:meth:`MitigationTrainerMixin.create_optimizer`) or the one passed in ``optimizers=``. The
  Trainer's order per optimizer step is::

      backward (DDP all-reduce)  →  clip_grad_norm_(max_grad_norm)  →  on_pre_optimizer_step
      →  optimizer.step()  [wrapper: transform_gradients(); base step]  →  on_optimizer_step
      →  lr_scheduler.step()  →  zero_grad  →  on_step_end

  so a wrapper projects the *clipped*, *all-reduced* gradient exactly at the
  ``on_pre_optimizer_step`` moment, before the base step. (Acting in ``on_step_end`` would be
  too late: the gradients are already zeroed there.) A projection never increases the gradient
  norm, so the clipping bound still holds after it.
* **Freezing** (:class:`Freeze`) is applied to the model before the Trainer builds its optimizer,
  so frozen parameters never enter it.

Task boundaries: :meth:`MitigationTrainerMixin.end_task` (or the standalone
:func:`consolidate_all`) consolidates every mitigation on the finished task's data. Use one
Trainer per task (a fresh learning-rate schedule) and pass the same ``mitigations`` list to each:
loss terms keep their state, and :class:`OptimizerMitigation` carries its wrapper's state (memory,
basis) into the wrapper of the next Trainer's optimizer.

Checkpoints: a wrapper's state rides in ``optimizer.pt`` (its ``state_dict()``); loss terms'
buffers are written to ``mitigate_state.pt`` in each checkpoint folder and loaded on
``trainer.train(resume_from_checkpoint=...)``, so a resumed run takes the identical next step.
"""

from __future__ import annotations

import inspect
import logging
import numbers
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from mitigate._utils import (
    LossFn,
    batch_size_of,
    model_device,
    move_batch,
    progress_enabled,
)
from mitigate.optim._base import OptimizerWrapper
from mitigate.reports import TaskEndReport

logger = logging.getLogger(__name__)

STATE_FILE = "mitigate_state.pt"
"""File name of the loss terms' state inside a Trainer checkpoint folder."""

LOG_PREFIX = "mitigate/"
"""Prefix of every key :class:`MitigationCallback` adds to the Trainer's logs."""

_STATE_FORMAT = 1
_MAX_VECTOR_LOG = 16


# ----------------------------------------------------------------------------- mitigation specs


class OptimizerMitigation:
    """An optimizer wrapper to put around whatever optimizer a Trainer creates.

    Holds the wrapper class and its keyword arguments; :meth:`wrap` builds the wrapper. When the
    same spec wraps a second optimizer (the next task's Trainer), the previous wrapper's state
    (``wrapper_state_dict()``: projection memory, OGD basis, LRCP subspaces) is carried over.

    Args:
        wrapper_cls: an :class:`~mitigate.OptimizerWrapper` subclass (or any callable building one).
            When its signature has a ``model`` parameter (``GradientProjection``,
            ``LowRankCircuitProjection``) and ``kwargs`` give none, the Trainer's model is passed.
        **kwargs: keyword arguments of ``wrapper_cls`` (``mode="agem"``, ``max_norm=1.0``, ...).

    Example:
        >>> proj = OptimizerMitigation(mitigate.GradientProjection, mode="ogd")
    """

    def __init__(self, wrapper_cls: Callable[..., OptimizerWrapper], /, **kwargs: Any) -> None:
        if isinstance(wrapper_cls, Optimizer):
            raise ValueError(
                f"wrapper_cls is an optimizer instance ({type(wrapper_cls).__name__}); pass the "
                "class, or give a ready-built wrapper to the Trainer as optimizers=(wrapper, None)"
            )
        if not callable(wrapper_cls):
            raise ValueError(
                f"wrapper_cls={wrapper_cls!r} is not callable; pass the wrapper class, e.g. "
                "OptimizerMitigation(mitigate.GradientProjection, mode='agem')"
            )
        self.wrapper_cls = wrapper_cls
        self.kwargs = dict(kwargs)
        self.wrapper: OptimizerWrapper | None = None
        # how the wrapper takes the model: None (it does not), "positional" or "keyword"
        self._model_arg: str | None = None
        try:
            param = inspect.signature(wrapper_cls).parameters.get("model")
        except (TypeError, ValueError):  # builtins without a signature
            param = None
        if param is not None and "model" not in self.kwargs:
            self._model_arg = "keyword" if param.kind is param.KEYWORD_ONLY else "positional"

    def wrap(self, optimizer: Optimizer, model: nn.Module) -> OptimizerWrapper:
        """Build the wrapper around ``optimizer`` (carrying over the previous wrapper's state).

        Args:
            optimizer: the optimizer to wrap (the Trainer's, possibly already wrapped).
            model: the (unwrapped) model being trained.

        Returns:
            The new wrapper, also stored as :attr:`wrapper`.
        """
        if self._model_arg == "positional":
            w = self.wrapper_cls(optimizer, model, **self.kwargs)
        elif self._model_arg == "keyword":
            w = self.wrapper_cls(optimizer, model=model, **self.kwargs)
        else:
            w = self.wrapper_cls(optimizer, **self.kwargs)
        if self.wrapper is not None and self.wrapper is not w:
            w.load_wrapper_state_dict(self.wrapper.wrapper_state_dict())
        self.wrapper = w
        return w

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        name = getattr(self.wrapper_cls, "__name__", repr(self.wrapper_cls))
        return f"OptimizerMitigation({name}{', ' if args else ''}{args})"


@dataclass
class Freeze:
    """A freezing function to apply to the model before the optimizer is built.

    It runs in the Trainer's ``__init__``, before ``train(resume_from_checkpoint=...)`` loads the
    checkpoint's weights; slices held by :func:`mitigate.freeze_attention_qk` (single heads,
    fused QKV rows) then hold the loaded values, not the ones at ``__init__``.

    Args:
        fn: ``fn(model, *args, **kwargs) -> FreezeReport``, e.g. :func:`mitigate.freeze_bottom_layers`.
        args: positional arguments after the model.
        kwargs: keyword arguments.

    Example:
        >>> Freeze(mitigate.freeze_bottom_layers, (2,))
        >>> Freeze(mitigate.freeze_attention_qk, kwargs={"layers": [0, 1]})
    """

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    report: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ValueError(
                f"Freeze(fn={self.fn!r}): fn must be callable, e.g. mitigate.freeze_bottom_layers"
            )
        if not isinstance(self.args, tuple):
            raise ValueError(f"Freeze(args={self.args!r}): pass a tuple, e.g. args=(2,)")

    def apply(self, model: nn.Module) -> Any:
        """Freeze ``model`` in place; returns (and stores) the function's report."""
        self.report = self.fn(model, *self.args, **self.kwargs)
        return self.report


def is_loss_term(obj: Any) -> bool:
    """True for a mitigation added to the loss: a callable ``nn.Module`` with ``consolidate``."""
    return isinstance(obj, nn.Module) and callable(getattr(obj, "consolidate", None))


@dataclass
class MitigationSet:
    """The mitigations of one training run, sorted by how they act.

    Attributes:
        loss_terms: name -> loss-term module (EWC, curvature), added to the loss.
        optimizer_specs: wrappers to build around the Trainer's optimizer.
        freezes: freezing applied before the optimizer is built.
    """

    loss_terms: dict[str, nn.Module] = field(default_factory=dict)
    optimizer_specs: list[OptimizerMitigation] = field(default_factory=list)
    freezes: list[Freeze] = field(default_factory=list)

    @classmethod
    def from_list(cls, mitigations: Iterable[Any] | None) -> MitigationSet:
        """Sort a user's ``mitigations=[...]`` list.

        Raises:
            ValueError: for an item that is none of: loss-term module, :class:`OptimizerMitigation`,
                :class:`Freeze`; or for a ready-built optimizer wrapper (pass it in ``optimizers=``).
        """
        out = cls()
        for m in mitigations or ():
            if isinstance(m, OptimizerMitigation):
                out.optimizer_specs.append(m)
            elif isinstance(m, Freeze):
                out.freezes.append(m)
            elif is_loss_term(m):
                out.loss_terms[_unique_name(_snake(type(m).__name__), out.loss_terms)] = m
            elif isinstance(m, Optimizer):
                raise ValueError(
                    f"{type(m).__name__} is an optimizer (wrapper) instance; give it to the Trainer as "
                    "optimizers=(wrapper, None), or list OptimizerMitigation(cls, **kwargs) here so "
                    "the Trainer's own optimizer is wrapped"
                )
            else:
                raise ValueError(
                    f"unsupported mitigation {m!r}; expected a loss term (mitigate.EWC, "
                    "mitigate.CurvatureRegularizer), OptimizerMitigation(mitigate.GradientProjection, "
                    "...) or Freeze(mitigate.freeze_bottom_layers, (n,))"
                )
        return out


# ----------------------------------------------------------------------------- helpers


def _snake(name: str) -> str:
    """``CurvatureRegularizer`` -> ``curvature_regularizer``; ``EWC`` -> ``ewc``."""
    s = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)
    return s.lower()


def _unique_name(name: str, taken: Mapping[str, Any]) -> str:
    if name not in taken:
        return name
    i = 2
    while f"{name}_{i}" in taken:
        i += 1
    return f"{name}_{i}"


def optimizer_chain(optimizer: Any) -> list[Any]:
    """The optimizer and everything it wraps, outermost first (follows ``.optimizer``).

    Sees through Accelerate's ``AcceleratedOptimizer`` and nested mitigate wrappers.
    """
    chain, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        chain.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


def find_wrappers(optimizer: Any) -> list[OptimizerWrapper]:
    """Every :class:`~mitigate.OptimizerWrapper` in ``optimizer``'s chain, outermost first."""
    return [o for o in optimizer_chain(optimizer) if isinstance(o, OptimizerWrapper)]


def scalar_stats(prefix: str, obj: Any) -> dict[str, float]:
    """Flatten a stats object (dict, dataclass, 0-d tensor or number) into ``{key: float}``.

    Vectors of up to 16 entries and lists are indexed (``key/0``, ``key/1``), larger tensors,
    strings and None are skipped; nested dicts/dataclasses/lists are joined with ``/``. One host synchronisation per tensor, so call it at logging time only.
    """
    out: dict[str, float] = {}
    if obj is None or isinstance(obj, (str, bytes)):
        return out
    if isinstance(obj, bool):
        return {prefix: float(obj)}
    if isinstance(obj, numbers.Number):
        return {prefix: float(obj)}  # type: ignore[arg-type]
    if isinstance(obj, Tensor):
        if obj.numel() == 1:
            return {prefix: float(obj.detach().reshape(()).item())}
        if obj.dim() == 1 and obj.numel() <= _MAX_VECTOR_LOG:  # e.g. k eigenvalue ratios
            return {f"{prefix}/{i}": float(x) for i, x in enumerate(obj.detach().double().cpu().tolist())}
        return out
    if is_dataclass(obj) and not isinstance(obj, type):
        obj = {f.name: getattr(obj, f.name) for f in fields(obj)}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(scalar_stats(f"{prefix}/{k}" if prefix else str(k), v))
    elif isinstance(obj, (list, tuple)):  # e.g. one CurvatureDrift per task
        for i, v in enumerate(obj):
            out.update(scalar_stats(f"{prefix}/{i}" if prefix else str(i), v))
    return out


def _take_batches(data: Iterable[Any], max_batches: int | None, device: torch.device) -> list[Any]:
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches={max_batches!r} must be a positive int or None (all batches)")
    batches = list(islice(iter(data), max_batches))
    if not batches:
        raise ValueError("the task data yielded no batch; pass a non-empty dataset or DataLoader")
    return [move_batch(b, device) for b in batches]


def _is_dataset(data: Any) -> bool:
    """A ``datasets.Dataset`` or map-style torch ``Dataset`` (examples, not batches)."""
    if isinstance(data, torch.utils.data.DataLoader):
        return False
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        return True
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is optional
        return False
    return isinstance(data, (datasets.Dataset, datasets.IterableDataset))


def _pure_forward(term: nn.Module) -> bool:
    """Whether ``term()`` may be called just to read the penalty: the term says so
    (``pure_forward``), or its ``forward`` takes no arguments. (``CurvatureRegularizer.forward(step=None)`` advances a schedule counter: calling it
    at logging time would change which training steps compute the preservation term.)"""
    declared = getattr(term, "pure_forward", None)  # e.g. EWC: ewc() without a batch only reads
    if declared is not None:
        return bool(declared)
    try:
        return not inspect.signature(term.forward).parameters
    except (TypeError, ValueError):
        return False


def _call_with_optional_loss_fn(fn: Callable[..., Any], *args: Any, loss_fn: LossFn | None) -> Any:
    if loss_fn is None:
        return fn(*args)
    return fn(*args, loss_fn=loss_fn)


# ----------------------------------------------------------------------------- consolidation


@dataclass
class ConsolidationReport:
    """What a task boundary did, over every mitigation (the ``end_task`` report family, see
    :mod:`mitigate.reports`).

    Attributes:
        num_batches: batches used (on this rank).
        num_examples: examples in them (on this rank).
        consolidated: names of the mitigations that consolidated, in order.
        seconds: wall time.
        reports: one :class:`~mitigate.reports.TaskEndReport` per mitigation that has
            ``end_task`` (custom terms with only ``consolidate``/``remember`` add none).
    """

    num_batches: int
    num_examples: int
    consolidated: list[str]
    seconds: float
    reports: list[TaskEndReport] = field(default_factory=list)

    def __str__(self) -> str:
        head = (
            f"task ended: {len(self.consolidated)} mitigation(s) {self.consolidated} on {self.num_batches} batches "
            f"({self.num_examples} examples) in {self.seconds:.3g} s"
        )
        return "\n".join([head, *("  " + line for r in self.reports for line in str(r).splitlines())])

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return {
            "num_batches": self.num_batches, "num_examples": self.num_examples, "consolidated": list(self.consolidated),
            "seconds": self.seconds, "reports": [r.as_dict() for r in self.reports],
        }


def consolidate_all(
    mitigations: Iterable[Any] | MitigationSet,
    model: nn.Module,
    data: Iterable[Any],
    *,
    optimizer: Optimizer | None = None,
    max_batches: int | None = None,
    loss_fn: LossFn | None = None,
) -> ConsolidationReport:
    """Close a task: consolidate every mitigation on the finished task's data.

    Loss terms run ``term.consolidate(batches, loss_fn)`` (EWC: Fisher and anchors; curvature:
    top Hessian eigenpairs). Optimizer wrappers (found in ``optimizer``'s chain and in the
    :class:`OptimizerMitigation` specs) run ``wrapper.remember(model, batches, loss_fn)`` (A-GEM
    memory, OGD basis, LRCP subspaces). The same list of batches serves every mitigation.

    Under DDP each rank passes its own shard of the task data; the mitigations all-reduce what
    they estimate (Fisher, reference gradients, HVPs) so every rank ends with identical state.

    Args:
        mitigations: a ``mitigations=[...]`` list or a :class:`MitigationSet`.
        model: the trained model, *unwrapped* (not the DDP wrapper): consolidation runs its own
            forward/backward passes and must not trigger DDP's gradient hooks.
        data: a DataLoader or any iterable of batches (``model(**batch)`` dicts).
        optimizer: the optimizer in use (wrappers inside it are consolidated too).
        max_batches: use at most this many batches (per rank); ``None`` uses all.
        loss_fn: ``loss_fn(model, batch) -> scalar``; ``None`` means ``model(**batch).loss``.

    Returns:
        A :class:`ConsolidationReport`.

    Raises:
        ValueError: for ``max_batches < 1`` or empty data.
    """
    t0 = time.perf_counter()
    mset = mitigations if isinstance(mitigations, MitigationSet) else MitigationSet.from_list(mitigations)
    batches = _take_batches(data, max_batches, model_device(model))
    done: list[str] = []
    reports: list[TaskEndReport] = []
    for name, term in mset.loss_terms.items():
        if callable(getattr(term, "end_task", None)):
            reports.append(term.end_task(batches, loss_fn=loss_fn))
        else:
            _call_with_optional_loss_fn(term.consolidate, batches, loss_fn=loss_fn)
        done.append(name)
    wrappers = find_wrappers(optimizer) if optimizer is not None else []
    for spec in mset.optimizer_specs:
        if spec.wrapper is not None and all(spec.wrapper is not w for w in wrappers):
            wrappers.append(spec.wrapper)
    for w in wrappers:
        remember = getattr(w, "remember", None)
        if callable(getattr(w, "end_task", None)):
            reports.append(w.end_task(batches, model=model, loss_fn=loss_fn))
            done.append(_snake(type(w).__name__))
        elif callable(remember):
            _call_with_optional_loss_fn(remember, model, batches, loss_fn=loss_fn)
            done.append(_snake(type(w).__name__))
    n = sum(batch_size_of(b) for b in batches)
    report = ConsolidationReport(len(batches), n, done, time.perf_counter() - t0, reports)
    logger.info("consolidated %s on %d batches (%d examples) in %.2fs", done, len(batches), n, report.seconds)
    return report


# ----------------------------------------------------------------------------- state files


def mitigation_state_dict(mitigations: Iterable[Any] | MitigationSet) -> dict[str, Any]:
    """The loss terms' state (``{name: term.state_dict()}``), tensors and plain Python only.

    Optimizer wrappers are not included: their state rides in the optimizer's ``state_dict()``.
    """
    mset = mitigations if isinstance(mitigations, MitigationSet) else MitigationSet.from_list(mitigations)
    return {
        "format": _STATE_FORMAT,
        "loss_terms": {name: term.state_dict() for name, term in mset.loss_terms.items()},
    }


def load_mitigation_state_dict(mitigations: Iterable[Any] | MitigationSet, state: Mapping[str, Any]) -> None:
    """Restore what :func:`mitigation_state_dict` returned into the same mitigations.

    Raises:
        ValueError: when the saved loss terms differ from the given ones (names are compared).
    """
    mset = mitigations if isinstance(mitigations, MitigationSet) else MitigationSet.from_list(mitigations)
    saved = state.get("loss_terms", {})
    if set(saved) != set(mset.loss_terms):
        raise ValueError(
            f"mitigation state holds loss terms {sorted(saved)} but the trainer has "
            f"{sorted(mset.loss_terms)}; pass the same mitigations=[...] as the run that saved it"
        )
    for name, term in mset.loss_terms.items():
        term.load_state_dict(saved[name])


def save_mitigation_state(directory: str | os.PathLike[str], mitigations: Iterable[Any] | MitigationSet) -> str:
    """Write :func:`mitigation_state_dict` to ``directory/mitigate_state.pt``; returns the path."""
    path = os.path.join(os.fspath(directory), STATE_FILE)
    torch.save(mitigation_state_dict(mitigations), path)
    return path


def load_mitigation_state(directory: str | os.PathLike[str], mitigations: Iterable[Any] | MitigationSet) -> bool:
    """Load ``directory/mitigate_state.pt`` (``weights_only=True``) if present.

    Returns:
        True when a state file was found and loaded.
    """
    path = os.path.join(os.fspath(directory), STATE_FILE)
    if not os.path.isfile(path):
        return False
    state = torch.load(path, map_location="cpu", weights_only=True)
    load_mitigation_state_dict(mitigations, state)
    return True


# ----------------------------------------------------------------------------- callback


class MitigationCallback(TrainerCallback):
    """Logs mitigation statistics through the Trainer's logging (``on_log``).

    Keys added to ``logs`` (and to the matching ``state.log_history`` entry), all prefixed
    ``mitigate/``:

    * ``<wrapper>/<stat>`` for every scalar in each optimizer wrapper's ``stats()`` (projection
      rate, conflicts, clip rate, ...), wrappers found in the optimizer the Trainer passes;
    * ``<term>_penalty``: each loss term's last penalty value (recorded by
      :class:`MitigationTrainerMixin`; with a plain Trainer it is evaluated at logging time for
      terms whose ``forward`` takes no argument, e.g. EWC);
    * ``<term>_drift/...``: ``term.drift()`` for terms that have it (curvature drift), when
      ``log_drift`` (costs Hessian-vector products at each logging step).

    Args:
        loss_terms: loss terms to report (a :class:`MitigationTrainer` fills this in).
        log_drift: evaluate ``drift()`` of the loss terms at each log.
    """

    def __init__(self, loss_terms: Mapping[str, nn.Module] | Sequence[nn.Module] | None = None,
                 *, log_drift: bool = True) -> None:
        if loss_terms is None:
            self.loss_terms: dict[str, nn.Module] = {}
        elif isinstance(loss_terms, Mapping):
            self.loss_terms = dict(loss_terms)
        else:
            self.loss_terms = MitigationSet.from_list(loss_terms).loss_terms
        self.log_drift = log_drift
        self.last_penalties: dict[str, Tensor] = {}
        self.last_consolidation: ConsolidationReport | None = None
        self._drift_failed: set[str] = set()

    def record_penalty(self, name: str, value: Tensor) -> None:
        """Remember a loss term's latest value (detached; no host sync until logging)."""
        self.last_penalties[name] = value.detach()

    def collect(self, optimizer: Any = None) -> dict[str, float]:
        """The statistics to log now (see class docstring)."""
        out: dict[str, float] = {}
        for w in find_wrappers(optimizer):
            stats = getattr(w, "stats", None)
            if callable(stats):
                out.update(scalar_stats(LOG_PREFIX + _snake(type(w).__name__), stats()))
        for name, term in self.loss_terms.items():
            value = self.last_penalties.get(name)
            if value is None and _pure_forward(term) and not getattr(term, "pending_calibration", False):
                with torch.enable_grad():  # some penalties differentiate internally
                    value = term().detach()
            if value is not None:
                out.update(scalar_stats(f"{LOG_PREFIX}{name}_penalty", value))
            drift = getattr(term, "drift", None)
            if self.log_drift and callable(drift) and name not in self._drift_failed:
                try:
                    out.update(scalar_stats(f"{LOG_PREFIX}{name}_drift", drift()))
                except ValueError as err:  # e.g. no replay memory to measure on
                    self._drift_failed.add(name)
                    logger.warning("not logging %s drift: %s", name, err)
        return out

    def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: D102 - TrainerCallback API
        if logs is None or "loss" not in logs and not any(k.startswith("train_") for k in logs):
            return  # evaluation / prediction logs: training statistics do not belong there
        stats = self.collect(kwargs.get("optimizer"))
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)

    def on_task_end(self, args, state, control, report: ConsolidationReport | None = None, **kwargs):
        """Called by :meth:`MitigationTrainerMixin.end_task` after consolidation."""
        self.last_consolidation = report
        self.last_penalties.clear()


# ----------------------------------------------------------------------------- trainer


class MitigationTrainerMixin:
    """Adds mitigations to a ``transformers.Trainer`` subclass (use :func:`with_mitigations`).

    Args:
        mitigations: loss terms (``mitigate.EWC``, ``mitigate.CurvatureRegularizer``),
            :class:`OptimizerMitigation` and :class:`Freeze` items, in any order. Optimizer
            wrappers are applied in list order, the first innermost.
        mitigation_loss_fn: ``loss_fn(model, batch)`` for consolidation in :meth:`end_task`
            (``None``: ``model(**batch).loss``).
        log_drift: passed to the :class:`MitigationCallback` this trainer installs.
        fuse_replay: let a :class:`~mitigate.CurvatureRegularizer` append its replay rows to each
            training batch (``with_replay``) and read its KL term off that forward, instead of a
            forward of its own per step (the replay rows then run in training mode; batches with
            keys other than ``input_ids``/``attention_mask``/``labels`` fall back to ``term()``).
        *args, **kwargs: the Trainer's own arguments (``optimizers=(wrapper, None)`` works too).
    """

    def __init__(self, *args: Any, mitigations: Iterable[Any] | None = None,
                 mitigation_loss_fn: LossFn | None = None, log_drift: bool = True, fuse_replay: bool = True,
                 **kwargs: Any) -> None:
        self.mitigations = MitigationSet.from_list(mitigations)
        self.mitigation_loss_fn = mitigation_loss_fn
        self.fuse_replay = fuse_replay
        self._fuse_refused = False
        model = kwargs.get("model", args[0] if args else None)
        if self.mitigations.freezes:
            if model is None:
                raise ValueError("Freeze(...) needs the model at construction; pass model=...")
            for f in self.mitigations.freezes:
                f.apply(model)
        super().__init__(*args, **kwargs)
        self.mitigation_callback = MitigationCallback(self.mitigations.loss_terms, log_drift=log_drift)
        # first, so that reporting integrations and the progress printer see the added keys
        self.callback_handler.callbacks.insert(0, self.mitigation_callback)
        self.tasks_completed = 0
        for term in self.mitigations.loss_terms.values():
            term.to(self.args.device)

    # ------------------------------------------------------------------ optimizer
    def create_optimizer(self, model: nn.Module | None = None):  # type: ignore[override]
        """The Trainer's optimizer (or the one given in ``optimizers=``), wrapped by each
        :class:`OptimizerMitigation` in list order. Idempotent."""
        optimizer = super().create_optimizer(*(() if model is None else (model,)))  # type: ignore[misc]
        optimizer = self.optimizer if self.optimizer is not None else optimizer
        chain = optimizer_chain(optimizer)
        target = self.model if model is None else model
        for spec in self.mitigations.optimizer_specs:
            if spec.wrapper is None or all(spec.wrapper is not o for o in chain):
                optimizer = spec.wrap(optimizer, target)
                chain = optimizer_chain(optimizer)
        self.optimizer = optimizer
        return optimizer

    # ------------------------------------------------------------------ loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
        """Task loss plus every loss term's penalty (training mode only; evaluation losses are
        the task loss alone). See the module docstring for the gradient-accumulation scaling."""
        original = dict(inputs) if isinstance(inputs, Mapping) else inputs  # Trainer may pop "labels" from inputs
        fused = self._replay_term(inputs) if model.training else None
        if fused is not None:
            inputs = fused[1]
        result = super().compute_loss(  # type: ignore[misc]
            model, inputs, return_outputs=return_outputs or fused is not None, num_items_in_batch=num_items_in_batch
        )
        if not self.mitigations.loss_terms or not model.training:
            return result
        loss, outputs = result if return_outputs or fused is not None else (result, None)
        ga_steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        scale = 1.0 / ga_steps if self._loss_scaled_for_ga(num_items_in_batch) else 1.0
        for name, term in self.mitigations.loss_terms.items():
            if fused is not None and term is fused[0]:
                penalty = self._fused_penalty(term, outputs)
            elif getattr(term, "pending_calibration", False):  # EWC(model): λ_t from the task's first batches
                penalty = term(original, self.mitigation_loss_fn)
            else:
                penalty = term()
            self.mitigation_callback.record_penalty(name, penalty)
            loss = loss + penalty * scale if scale != 1.0 else loss + penalty
        return (loss, outputs) if return_outputs else loss

    def _replay_term(self, inputs: Any) -> tuple[Any, Any] | None:
        """``(term, inputs with its replay rows)`` for the first loss term that can read its
        penalty off the training forward (``with_replay``, :class:`~mitigate.CurvatureRegularizer`)
        when ``fuse_replay`` is on and the batch can carry the rows; else ``None`` (the term then
        runs its own forward, as ``term()``), logged once at INFO with the reason."""
        if not self.fuse_replay or self.args.n_gpu > 1:  # DataParallel could hand a replica only replay rows
            return None
        for term in self.mitigations.loss_terms.values():
            if callable(getattr(term, "with_replay", None)):
                try:
                    extended = term.with_replay(inputs)
                except ValueError as err:
                    if not self._fuse_refused:
                        logger.info("replay rows not fused into the training batch: %s", err)
                        self._fuse_refused = True
                    return None
                return (term, extended) if extended is not inputs else None
        return None

    def _fused_penalty(self, term: Any, outputs: Any) -> Any:
        """``term(outputs=outputs)``; when the output carries no usable logits (``return_dict=False``,
        fused-loss kernels that drop them), ``term()`` with its own forward instead, and fusing
        stops for the rest of this trainer's life (logged once)."""
        try:
            return term(outputs=outputs)
        except ValueError as err:
            logger.info("replay rows could not be read off the training output (%s): the loss term "
                        "runs its own forward from now on (fuse_replay off)", err)
            self.fuse_replay = False
            return term()

    def _loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Whether ``training_step`` will *not* divide the loss by the accumulation steps
        (mirrors ``Trainer.training_step``)."""
        flag = getattr(self, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool(
            (getattr(self, "model_accepts_loss_kwargs", False) and num_items_in_batch is not None)
            or getattr(self, "compute_loss_func", None) is not None
        )

    # ------------------------------------------------------------------ task boundary
    def end_task(self, data: Any, *, max_batches: int | None = None, loss_fn: LossFn | None = None) -> ConsolidationReport:
        """Consolidate every mitigation on the finished task (call after ``train()``).

        Args:
            data: a ``datasets.Dataset`` / torch ``Dataset`` (batched like evaluation data: the
                eval batch size, the data collator, unused columns removed, sharded over ranks)
                or a ready DataLoader / iterable of batches (used as is; under DDP give each rank
                its shard).
            max_batches: per-rank batch limit (``None``: all).
            loss_fn: overrides ``mitigation_loss_fn`` for this call.

        Progress bars of long consolidations (Fisher, Lanczos, LRCP/projection memories) show
        unless ``TrainingArguments(disable_tqdm=True)``.

        Returns:
            A :class:`ConsolidationReport` (``print`` it: one block per mitigation); callbacks with
            an ``on_task_end`` method receive it.
        """
        if self.optimizer is None and any(s.wrapper is None for s in self.mitigations.optimizer_specs):  # type: ignore[attr-defined]
            self.create_optimizer()  # a task boundary before any train(): build the wrappers to remember into
        loader: Iterable[Any] = self.get_eval_dataloader(data) if _is_dataset(data) else data  # type: ignore[attr-defined]
        # progress bars follow transformers' switch: TrainingArguments(disable_tqdm=True) hides them
        with progress_enabled(not getattr(self.args, "disable_tqdm", False)):  # type: ignore[attr-defined]
            report = consolidate_all(
                self.mitigations,
                self.model,  # type: ignore[attr-defined]
                loader,
                optimizer=self.optimizer,  # type: ignore[attr-defined]
                max_batches=max_batches,
                loss_fn=loss_fn if loss_fn is not None else self.mitigation_loss_fn,
            )
        self.tasks_completed += 1
        handler = self.callback_handler  # type: ignore[attr-defined]
        for cb in handler.callbacks:
            hook = getattr(cb, "on_task_end", None)
            if callable(hook):
                hook(self.args, self.state, self.control, report=report,  # type: ignore[attr-defined]
                     model=self.model, optimizer=self.optimizer)  # type: ignore[attr-defined]
        return report

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, model, trial):  # type: ignore[override]
        super()._save_checkpoint(model, trial)  # type: ignore[misc]
        if self.mitigations.loss_terms and self.args.should_save:  # type: ignore[attr-defined]
            run_dir = self._get_output_dir(trial=trial)  # type: ignore[attr-defined]
            folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")  # type: ignore[attr-defined]
            if os.path.isdir(folder):
                save_mitigation_state(folder, self.mitigations)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):  # type: ignore[override]
        super()._load_from_checkpoint(resume_from_checkpoint, model)  # type: ignore[misc]
        if self.mitigations.loss_terms:
            if load_mitigation_state(resume_from_checkpoint, self.mitigations):
                for term in self.mitigations.loss_terms.values():
                    term.to(self.args.device)  # type: ignore[attr-defined]
            else:
                logger.warning(
                    "no %s in %s: the loss terms keep their current state", STATE_FILE, resume_from_checkpoint
                )


def with_mitigations(trainer_cls: type[Trainer]) -> type[Trainer]:
    """``trainer_cls`` with :class:`MitigationTrainerMixin` mixed in (e.g. TRL's ``SFTTrainer``).

    Args:
        trainer_cls: a ``transformers.Trainer`` subclass.

    Returns:
        A subclass named ``Mitigation<trainer_cls.__name__>`` taking ``mitigations=[...]``.

    Raises:
        ValueError: when ``trainer_cls`` is not a ``Trainer`` subclass.
    """
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise ValueError(f"with_mitigations({trainer_cls!r}): expected a transformers.Trainer subclass")
    if issubclass(trainer_cls, MitigationTrainerMixin):
        return trainer_cls
    return type(f"Mitigation{trainer_cls.__name__}", (MitigationTrainerMixin, trainer_cls), {})


class MitigationTrainer(MitigationTrainerMixin, Trainer):
    """``transformers.Trainer`` with ``mitigations=[...]`` (see :class:`MitigationTrainerMixin`)."""
