"""What a mitigation recorded when a task ended: one report type for every ``end_task``.

Every mitigation that has to be told "this task is finished" — the loss terms
(:class:`~mitigate.EWC`, :class:`~mitigate.CurvatureRegularizer`) and the optimizer wrappers
(:class:`~mitigate.GradientProjection`, :class:`~mitigate.LowRankCircuitProjection`) — has one
verb for it, ``end_task(batches, ...)``, and returns a :class:`TaskEndReport`::

    report = ewc.end_task(old_batches)
    print(report)            # EWC: task 0 ended on 4 batches (32 samples) in 1.3 s
                             #   λ (strength): 2.4e+08 ...
    report.as_dict()         # JSON-ready
    report["fisher_mean"]    # one figure by name

The older verbs stay as they were (``EWC.consolidate`` returns the Fisher dict,
``CurvatureRegularizer.consolidate`` the :class:`~mitigate.curvature.EigenResult`,
``GradientProjection.remember`` a :class:`~mitigate.optim.projection.RememberReport`,
``LowRankCircuitProjection.remember`` the ``{module: rank}`` dict); ``end_task`` calls them and
keeps their return value in :attr:`TaskEndReport.result`. A task boundary over several
mitigations (:func:`mitigate.integrations.consolidate_all`, ``MitigationTrainer.end_task``)
returns a :class:`~mitigate.integrations.trainer.ConsolidationReport` that holds one
:class:`TaskEndReport` per mitigation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from mitigate._utils import Batch, batch_size_of

__all__ = ["TaskEndReport", "run_end_task"]


def _fmt(v: Any) -> str:
    """A figure rounded to what a summary line can carry (3 significant digits)."""
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.3g}"
    if isinstance(v, (list, tuple)):
        shown = ", ".join(_fmt(x) for x in list(v)[:8])
        return f"[{shown}{', …' if len(v) > 8 else ''}]"
    if isinstance(v, Mapping):
        items = list(v.items())
        shown = ", ".join(f"{k}: {_fmt(x)}" for k, x in items[:6])
        return f"{{{shown}{', …' if len(items) > 6 else ''}}} ({len(items)} entries)"
    return str(v)


@dataclass
class TaskEndReport:
    """What one mitigation recorded at the end of a task.

    Attributes:
        method: the mitigation (``"EWC"``, ``"CurvatureRegularizer"``, ``"GradientProjection
            (agem)"``, ``"LowRankCircuitProjection"``).
        task: index of the task that ended (0 for the first), counted by this mitigation.
        batches: batches it used (on this rank).
        samples: examples in them (on this rank).
        seconds: wall time of the call.
        details: the method's own figures (plain Python: numbers, lists, dicts), e.g. EWC's
            ``strength`` and Fisher statistics, the curvature term's ``eigenvalues``, the
            projection's ``basis_size``, LRCP's ``ranks``.
        result: what the method's older verb returns (Fisher dict, ``EigenResult``,
            ``RememberReport``, ranks dict); not in :meth:`as_dict`.
    """

    method: str
    task: int
    batches: int
    samples: int
    seconds: float
    details: dict[str, Any] = field(default_factory=dict)
    result: Any = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        head = (
            f"{self.method}: task {self.task} ended on {self.batches} batch{'es' if self.batches != 1 else ''} "
            f"({self.samples} samples) in {self.seconds:.3g} s"
        )
        width = max((len(k) for k in self.details), default=0)
        return "\n".join([head, *(f"  {k.ljust(width)}  {_fmt(v)}" for k, v in self.details.items())])

    def __getitem__(self, key: str) -> Any:
        """One figure of :attr:`details` by name."""
        try:
            return self.details[key]
        except KeyError:
            raise KeyError(f"{key!r}: this {self.method} report has {sorted(self.details)}") from None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready copy (``result`` left out)."""
        return {
            "method": self.method, "task": self.task, "batches": self.batches, "samples": self.samples,
            "seconds": self.seconds, "details": _plain(self.details),
        }


def _plain(v: Any) -> Any:
    if isinstance(v, Tensor):
        return v.tolist()
    if isinstance(v, Mapping):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def run_end_task(
    method: str,
    task: int,
    batches: Batch | Iterable[Batch],
    call: Callable[[list[Batch]], Any],
    details: Callable[[Any], dict[str, Any]],
) -> TaskEndReport:
    """Time ``call(batch_list)`` and wrap its result in a :class:`TaskEndReport`.

    Args:
        method, task: see :class:`TaskEndReport`.
        batches: one batch (a dict) or an iterable of batches (iterated once).
        call: the method's own end-of-task routine, given the list of batches.
        details: ``details(result) -> dict`` of the figures to report.
    """
    from mitigate.curvature import as_batch_list

    blist = as_batch_list(batches)
    t0 = time.perf_counter()
    result = call(blist)
    seconds = time.perf_counter() - t0
    return TaskEndReport(
        method=method, task=task, batches=len(blist), samples=sum(batch_size_of(b) for b in blist),
        seconds=seconds, details=details(result), result=result,
    )
