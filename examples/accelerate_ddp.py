"""Continual fine-tuning with 🤗 Accelerate (DDP): gradient projection + EWC on every rank.

The optimizer is wrapped *before* ``accelerator.prepare`` (Accelerate then wraps the wrapper, so
``optimizer.step()`` runs the projection on the all-reduced gradients); the EWC penalty is added
to the loss before ``accelerator.backward`` (its gradient rides in DDP's all-reduce). At each
task boundary every rank consolidates on *its shard* of the task data (the prepared DataLoader
shards it); the mitigations all-reduce the Fisher and the reference gradients, so all ranks keep
identical state. The script ends by checking that every rank holds bit-identical parameters
(``assert_replicas_identical``) and exits nonzero if not.

Run (CPU, two processes; ``--cpu`` below is the script's flag, it builds ``Accelerator(cpu=True)``)::

    accelerate launch --multi_gpu --num_processes 2 examples/accelerate_ddp.py --cpu --quick
    python -m torch.distributed.run --nproc_per_node 2 examples/accelerate_ddp.py --cpu --quick
    python examples/accelerate_ddp.py --quick            # one process works too

``accelerate launch --cpu --num_processes 2`` starts a single process on CPU (multi-process CPU
in Accelerate goes through MPI); use ``--multi_gpu`` with ``--cpu`` on the script, or torchrun,
as above. On GPUs: ``accelerate launch --multi_gpu --num_processes N examples/accelerate_ddp.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset
from transformers import AutoConfig, AutoModelForCausalLM

import mitigate
from mitigate.integrations import assert_replicas_identical, consolidate_all

VOCAB, SEQ = 64, 12


def task_tokens(task: int, n: int, seed: int) -> torch.Tensor:
    """Sequences counting up by ``task + 1`` modulo ``VOCAB``; shape ``(n, SEQ)``."""
    g = torch.Generator().manual_seed(1000 * task + seed)
    return (torch.randint(VOCAB, (n, 1), generator=g) + (task + 1) * torch.arange(SEQ)) % VOCAB


def collate(rows: list[tuple[torch.Tensor]]) -> dict[str, torch.Tensor]:
    ids = torch.stack([r[0] for r in rows])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="Accelerator(cpu=True): gloo on CPU")
    ap.add_argument("--quick", action="store_true", help="CI size: 2 tasks, 10 steps each")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=8, help="per process")
    args = ap.parse_args()
    if args.quick:
        args.tasks, args.steps = 2, 10

    accelerator = Accelerator(cpu=args.cpu)
    torch.manual_seed(0)  # same initial weights on every rank
    config = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    ewc = mitigate.EWC(model, strength=50.0)  # built on the unwrapped model
    optimizer = mitigate.GradientProjection(torch.optim.AdamW(model.parameters(), lr=3e-3), mode="agem", model=model)
    model, optimizer = accelerator.prepare(model, optimizer)
    inner = accelerator.unwrap_model(model)

    n = args.steps * args.batch_size * accelerator.num_processes
    t0 = time.perf_counter()
    for task in range(args.tasks):
        loader = accelerator.prepare(DataLoader(TensorDataset(task_tokens(task, n, seed=0)),
                                                batch_size=args.batch_size, shuffle=True, collate_fn=collate))
        model.train()
        for batch in loader:
            loss = model(**batch).loss + ewc()
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        # task boundary: each rank consolidates on its shard; EWC / A-GEM all-reduce inside
        consolidate_all([ewc], inner, loader, optimizer=optimizer, max_batches=4)
        with torch.no_grad():
            inner.eval()
            held_out = collate([(t,) for t in task_tokens(task, 32, seed=1)])
            held_out = {k: v.to(accelerator.device) for k, v in held_out.items()}
            task_loss = inner(**held_out).loss.item()
        accelerator.print(f"task {task}: held-out loss {task_loss:.3f}, "
                          f"projected fraction {optimizer.optimizer.stats()['projected_fraction']:.2f}")

    status = 0
    try:
        assert_replicas_identical(inner)  # collective: every rank reaches the same verdict
        accelerator.print(f"{accelerator.num_processes} process(es): replicas identical; "
                          f"done in {time.perf_counter() - t0:.1f}s")
    except RuntimeError as err:
        print(f"[rank {accelerator.process_index}] {err}", file=sys.stderr, flush=True)
        status = 1
    finally:
        accelerator.wait_for_everyone()
        if dist.is_initialized() and dist.get_world_size() > 1:
            # Work done and every rank past the barrier: leave without running gloo's destructors
            # (process group, DDP reducer). On a loaded CPU machine they have left a rank blocked
            # in a futex forever, at interpreter exit or when this function's locals are freed.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        if dist.is_initialized():
            dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
