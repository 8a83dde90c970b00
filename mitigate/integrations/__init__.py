"""Integrations with training frameworks: Hugging Face ``Trainer`` (and, through it, PEFT and
Accelerate) and ``torch.distributed`` checks.

* :class:`MitigationTrainer` / :func:`with_mitigations`: ``mitigations=[...]`` on a Trainer —
  loss terms in ``compute_loss``, optimizer wrappers in ``create_optimizer``, freezing before
  training, :meth:`~MitigationTrainerMixin.end_task` at task boundaries, mitigation state in
  checkpoints.
* :class:`MitigationCallback`: mitigation statistics in the Trainer's logs.
* :func:`consolidate_all`: the task boundary for a plain PyTorch loop.
* :func:`replica_divergence` / :func:`assert_replicas_identical`: are the ranks still in sync?

See ``docs/INTEGRATIONS.md`` for the order of operations and the distributed contract.
"""

from __future__ import annotations

from mitigate.integrations.distributed import assert_replicas_identical, replica_divergence
from mitigate.integrations.trainer import (
    ConsolidationReport,
    Freeze,
    MitigationCallback,
    MitigationSet,
    MitigationTrainer,
    MitigationTrainerMixin,
    OptimizerMitigation,
    consolidate_all,
    find_wrappers,
    load_mitigation_state,
    mitigation_state_dict,
    load_mitigation_state_dict,
    save_mitigation_state,
    with_mitigations,
)

__all__ = sorted([
    "ConsolidationReport",
    "Freeze",
    "MitigationCallback",
    "MitigationSet",
    "MitigationTrainer",
    "MitigationTrainerMixin",
    "OptimizerMitigation",
    "assert_replicas_identical",
    "consolidate_all",
    "find_wrappers",
    "load_mitigation_state",
    "load_mitigation_state_dict",
    "mitigation_state_dict",
    "replica_divergence",
    "save_mitigation_state",
    "with_mitigations",
])
