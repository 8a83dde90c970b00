"""Recovery probe: is a forgotten task's knowledge still there?

"Spurious forgetting" (Zheng et al., 2025) shows that much of the accuracy lost on an old task
comes back after fine-tuning on about 10 of its examples for a few steps — the task *alignment*
was lost, not the knowledge. The probe fine-tunes a deep copy on ``K`` old-task examples and
reports the old-task score before and after; the original model is not touched.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import nn

from mitigate._utils import Batch, LossFn, model_device, move_batch, preserve_state, resolve_loss_fn
from mitigate.diagnostics._common import Result, as_batch_list

__all__ = ["RecoveryResult", "recovery_probe"]

Evaluate = Callable[[nn.Module], Union[float, dict[str, float]]]
OptimizerSpec = Union[str, Callable[..., torch.optim.Optimizer]]


@dataclass
class RecoveryResult(Result):
    """Old-task score of a fine-tuned copy before and after the recovery steps.

    Attributes:
        before: score of the unchanged model (``evaluate(...)``, or its ``"accuracy"``).
        after: score after ``steps`` recovery steps.
        recovered_gain: ``after − before``.
        steps: number of optimizer steps taken.
        losses: training loss at each step.
        recovered_fraction: ``(after − before) / (reference − before)`` when a ``reference``
            score (e.g. the accuracy before forgetting) was given, else ``None``.
        before_metrics, after_metrics: the full ``evaluate`` results when they are dicts.
    """

    before: float
    after: float
    recovered_gain: float
    steps: int
    losses: list[float] = field(default_factory=list)
    recovered_fraction: float | None = None
    before_metrics: dict[str, float] = field(default_factory=dict)
    after_metrics: dict[str, float] = field(default_factory=dict)


def _score(value: float | dict[str, float]) -> tuple[float, dict[str, float]]:
    if isinstance(value, dict):
        if "accuracy" not in value:
            raise ValueError(f"evaluate returned a dict without 'accuracy': keys {sorted(value)}")
        # scalar metrics only (an evaluation may also return per-item lists, which are skipped)
        return float(value["accuracy"]), {k: float(v) for k, v in value.items() if not isinstance(v, (list, tuple))}
    return float(value), {}


def _make_optimizer(spec: OptimizerSpec, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if callable(spec):
        return spec(params, lr=lr)
    if spec == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if spec == "sgd":
        return torch.optim.SGD(params, lr=lr)
    raise ValueError(f"optimizer={spec!r} must be 'adamw', 'sgd' or a callable (params, lr=...) -> Optimizer")


def recovery_probe(
    model: nn.Module,
    examples: Sequence[Batch] | Batch,
    evaluate: Evaluate,
    *,
    steps: int = 10,
    lr: float = 1e-4,
    loss_fn: LossFn | None = None,
    optimizer: OptimizerSpec = "adamw",
    seed: int = 0,
    reference: float | None = None,
) -> RecoveryResult:
    """Fine-tune a deep copy of ``model`` on a few old-task examples and measure the recovery.

    The copy trains in train mode for ``steps`` optimizer steps, cycling through ``examples``
    (one batch per step), on the trainable parameters of ``model``. ``evaluate(copy)`` is called
    before and after. The global RNG is forked and seeded with ``seed`` (dropout is reproducible
    and the caller's RNG stream is unchanged). ``model`` itself — parameters, ``.grad``,
    train/eval flags — is left exactly as it was. Needs memory for a second copy of the model.

    Args:
        model: the model after forgetting.
        examples: batches of the old task (about K = 10 examples in all, Zheng et al. 2025).
        evaluate: ``evaluate(model) -> float`` or ``-> {"accuracy": float, ...}``.
        steps: optimizer steps (≥ 0).
        lr: learning rate.
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``.
        optimizer: ``"adamw"``, ``"sgd"`` or ``callable(params, lr=...) -> Optimizer``.
        seed: RNG seed for the probe.
        reference: optional score before forgetting, for ``recovered_fraction``.

    Returns:
        :class:`RecoveryResult`.

    Raises:
        ValueError: ``steps < 0``, ``lr <= 0``, an unknown optimizer, no examples, or an
            ``evaluate`` dict without ``"accuracy"``.
    """
    if steps < 0:
        raise ValueError(f"steps={steps!r} must be >= 0")
    if not lr > 0:
        raise ValueError(f"lr={lr!r} must be > 0")
    batches = as_batch_list(examples)
    loss_fn = resolve_loss_fn(loss_fn)
    device = model_device(model)
    devices = [device.index or 0] if device.type == "cuda" else []
    with preserve_state(model), torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        probe = copy.deepcopy(model)
    probe.zero_grad(set_to_none=True)
    trainable = [p for p in probe.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameter to fine-tune")
    opt = _make_optimizer(optimizer, trainable, lr)
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        before, before_m = _score(evaluate(probe))
        losses = []
        for step in range(steps):
            probe.train()
            batch = move_batch(batches[step % len(batches)], device)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(probe, batch)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        opt.zero_grad(set_to_none=True)
        after, after_m = _score(evaluate(probe))
    frac = None
    if reference is not None and reference != before:
        frac = (after - before) / (reference - before)
    del probe, opt
    return RecoveryResult(
        before=before,
        after=after,
        recovered_gain=after - before,
        steps=steps,
        losses=losses,
        recovered_fraction=frac,
        before_metrics=before_m,
        after_metrics=after_m,
    )
