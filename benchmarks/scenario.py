"""The scenario interface every benchmark scenario implements (``biography``, ``smollm2``, ...).

A :class:`Scenario` is a starting model plus a sequence of :class:`Task` objects. The harness in
``benchmarks/compare.py`` trains the model on ``tasks[0]`` (unless ``first_task_pretrained``), then
on ``tasks[1]``, ..., evaluating every task after every task, with each registered method from
``benchmarks/methods.py`` hooked into the same loop.

Batches are dicts of CPU tensors ``input_ids`` (B, L), ``attention_mask`` (B, L) and ``labels``
(B, L; ``-100`` where no loss is taken), ready for ``model(**batch).loss``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn


class ScenarioUnavailable(RuntimeError):
    """An optional dependency of a scenario is missing; the message says what to install."""


@dataclass
class Task:
    """One task of the sequence.

    Attributes:
        name: short name used in tables (``"task0"``, ``"qa-pop1"``...).
        train: training batches (``input_ids``, ``attention_mask``, ``labels``), CPU tensors.
        evaluate: ``evaluate(model) -> {"accuracy": ..., ...}``; ``"accuracy"`` is the primary
            metric (in [0, 1]); may add ``"first_token"`` and ``"exact"``.
        probe: a few batches for diagnostics (CKA, attention entropy, λ_max, gradient alignment).
        recovery: about K=10 examples (as batches) for the recovery probe.
        tune_evaluate: the same evaluation on *tuning* items, disjoint from ``evaluate``'s test
            items (``None``: the scenario has no tuning split); hyperparameters are chosen on
            these (``benchmarks/tune.py``), results are reported on ``evaluate``'s.
    """

    name: str
    train: list[dict[str, torch.Tensor]]
    evaluate: Callable[[nn.Module], dict[str, float]]
    probe: list[dict[str, torch.Tensor]]
    recovery: list[dict[str, torch.Tensor]]
    tune_evaluate: Callable[[nn.Module], dict[str, float]] | None = None


@dataclass
class Scenario:
    """A starting model and a task sequence.

    Attributes:
        name: scenario name (``"biography"``).
        model_factory: returns a fresh copy of the starting model (eager attention), CPU fp32.
        tasks: Task 0 .. T.
        steps_per_task: optimizer steps per task (the harness cycles through ``task.train``).
        lr: AdamW learning rate.
        extra_evals: ``name -> fn(model) -> float``: general-capability retention checks.
        first_task_pretrained: ``True`` when ``model_factory()`` already has Task 0 trained.
        lora: ``peft.LoraConfig`` kwargs when the scenario fine-tunes with LoRA, else ``None``.
        notes: free text shown in the summary.
        task0_steps: training steps of Task 0 (``None``: ``steps_per_task``).
        task0_curve_every: evaluate Task 0 every this many steps during Task 1 (0 disables).
        task0_curve_steps: how many first steps of Task 1 the curve covers (``None``: all).
        weight_decay: AdamW weight decay.
        config: plain-Python description of the scenario (saved in results.json).
        cpu_threads: ``torch.set_num_threads`` on CPU when the user gives none (tiny models run
            fastest single-threaded; ``None`` keeps torch's default).
        cka_token_norm: RMS-normalise every token before the CKA diagnostic (pretrained LLMs'
            massive activations otherwise dominate it; see ``mitigate.diagnostics.layerwise_cka``).
        full_lr: learning rate for updates of *every* weight (the recovery probe fine-tunes a
            merged, all-trainable copy) when ``lr`` is an adapter rate (LoRA); ``None``: ``lr``.
    """

    name: str
    model_factory: Callable[[], nn.Module]
    tasks: list[Task]
    steps_per_task: int
    lr: float
    extra_evals: dict[str, Callable[[nn.Module], float]] = field(default_factory=dict)
    first_task_pretrained: bool = False
    lora: dict | None = None
    notes: str = ""
    task0_steps: int | None = None
    task0_curve_every: int = 10
    task0_curve_steps: int | None = 150
    weight_decay: float = 0.0
    config: dict = field(default_factory=dict)
    cpu_threads: int | None = None
    cka_token_norm: bool = False
    full_lr: float | None = None


def pad_batch(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids`` (B, L) padded with ``pad_id``, ``attention_mask`` 0 and
    ``labels`` -100 on padding, L the longest example."""
    length = max(len(ids) for ids, _ in examples)
    n = len(examples)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    labels = torch.full((n, length), -100, dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        labels[i, : len(lab)] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def batch_examples(examples: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int, pad_id: int,
                   rng=None) -> list[dict[str, torch.Tensor]]:
    """:func:`pad_batch` batches of ``batch_size`` examples in order (shuffled with ``rng``, a
    ``random.Random``, when given); the last one may be short."""
    examples = list(examples)
    if rng is not None:
        rng.shuffle(examples)
    return [pad_batch(examples[i : i + batch_size], pad_id) for i in range(0, len(examples), batch_size)]
