"""Continual fine-tuning in a plain PyTorch loop: freeze + gradient projection + EWC.

A tiny Llama (built from a config, random weights) learns three synthetic next-token tasks one
after another ("count up by 1", "by 2", "by 3" modulo the vocabulary). Three mitigations, each
one line where it belongs in the loop:

* ``mitigate.freeze_bottom_layers(model, 1)`` before training (embeddings and block 0 stay put);
* ``mitigate.GradientProjection(AdamW(...), mode="agem")`` as the optimizer: each step's
  gradient loses its component that would increase the loss on the replay memory;
* ``mitigate.EWC(model, strength=...)`` added to the loss: ``loss = task_loss + ewc()``.

At each task boundary ``consolidate_all`` records the finished task in both (EWC Fisher and
anchors, A-GEM replay memory). The script prints the loss on every task after every task, for
the mitigated run and an unmitigated baseline, and the average forgetting of each.

Run (CPU, well under a minute)::

    python examples/plain_pytorch_loop.py --quick
    python examples/plain_pytorch_loop.py --steps 200 --tasks 4
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import mitigate
from mitigate.integrations import consolidate_all


@dataclass
class Config:
    tasks: int = 3
    steps: int = 60  # optimizer steps per task
    batch_size: int = 16
    seq_len: int = 12
    vocab: int = 64
    hidden: int = 32
    lr: float = 3e-3
    ewc_strength: float = 50.0
    freeze_layers: int = 1
    memory_batches: int = 4  # batches per task kept for A-GEM / used for the Fisher
    seed: int = 0


def task_batch(task: int, n: int, cfg: Config, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Sequences counting up by ``task + 1`` modulo the vocabulary: ``(n, seq_len)`` token ids."""
    start = torch.randint(cfg.vocab, (n, 1), generator=generator)
    ids = (start + (task + 1) * torch.arange(cfg.seq_len)) % cfg.vocab
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def build_model(cfg: Config) -> torch.nn.Module:
    config = AutoConfig.for_model(
        "llama", vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(cfg.seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


@torch.no_grad()
def evaluate(model: torch.nn.Module, cfg: Config) -> list[float]:
    """Loss on a fixed held-out batch of every task."""
    model.eval()
    out = []
    for t in range(cfg.tasks):
        batch = task_batch(t, 64, cfg, torch.Generator().manual_seed(10_000 + t))
        out.append(float(model(**batch).loss))
    model.train()
    return out


def run(cfg: Config, *, mitigated: bool) -> list[list[float]]:
    """Train the tasks in sequence; returns ``losses[after_task][on_task]``."""
    model = build_model(cfg)
    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    if mitigated:
        mitigate.freeze_bottom_layers(model, cfg.freeze_layers)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    ewc = None
    if mitigated:
        optimizer = mitigate.GradientProjection(optimizer, mode="agem", model=model)
        ewc = mitigate.EWC(model, strength=cfg.ewc_strength)
    history = []
    model.train()
    for task in range(cfg.tasks):
        for _ in range(cfg.steps):
            loss = model(**task_batch(task, cfg.batch_size, cfg, data_gen)).loss
            if ewc is not None:
                loss = loss + ewc()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        if mitigated:  # task boundary: Fisher + anchors for EWC, replay memory for A-GEM
            batches = [task_batch(task, cfg.batch_size, cfg, data_gen) for _ in range(cfg.memory_batches)]
            consolidate_all([ewc], model, batches, optimizer=optimizer)
        history.append(evaluate(model, cfg))
    return history


def forgetting(history: list[list[float]]) -> float:
    """Mean over earlier tasks of (final loss − loss right after learning the task)."""
    n = len(history)
    if n < 2:
        return 0.0
    return sum(history[-1][t] - history[t][t] for t in range(n - 1)) / (n - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: 2 tasks, 15 steps each")
    ap.add_argument("--tasks", type=int, default=Config.tasks)
    ap.add_argument("--steps", type=int, default=Config.steps)
    ap.add_argument("--ewc-strength", type=float, default=Config.ewc_strength)
    ap.add_argument("--seed", type=int, default=Config.seed)
    a = ap.parse_args()
    cfg = Config(tasks=a.tasks, steps=a.steps, ewc_strength=a.ewc_strength, seed=a.seed)
    if a.quick:
        cfg.tasks, cfg.steps = 2, 15
    t0 = time.perf_counter()
    results = {"baseline": run(cfg, mitigated=False), "mitigated": run(cfg, mitigated=True)}
    for name, hist in results.items():
        print(f"\n{name}: loss on task j (columns) after training task i (rows)")
        for i, row in enumerate(hist):
            print(f"  after task {i}: " + "  ".join(f"{x:6.3f}" for x in row))
        print(f"  average forgetting: {forgetting(hist):+.4f}")
    print(f"\ndone in {time.perf_counter() - t0:.1f}s")


if __name__ == "__main__":
    main()
