"""torchrun worker for tests/test_projection_ddp.py (gloo, CPU, 2 ranks).

For A-GEM, OGD and clipping: each rank trains a DDP-wrapped MLP on its shard of every global
batch (task A, ``remember()``, task B), then

1. all ranks must hold bit-identical parameters (all-gathered and compared), and
2. they must equal (float tolerance) a single-process run on the full global batches.

The single-process reference runs on every rank at once (its collectives then average equal
values, so it is a plain single-process computation); rank 0's copy is the one compared.
Also: OGD ``remember`` with a different number of batches per rank (issue 15 item 5).
Exits nonzero on any mismatch. Run: torchrun --nproc_per_node=2 projection_worker.py
"""

from __future__ import annotations

import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import mitigate

warnings.filterwarnings("ignore", message="GradientProjection")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))


def mse(model: nn.Module, batch: dict) -> torch.Tensor:
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()


def global_batches(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(8, 4, generator=g), "y": torch.randn(8, 2, generator=g)} for _ in range(n)]


def shard(batches: list[dict], rank: int, world: int) -> list[dict]:
    return [{k: v.chunk(world)[rank] for k, v in b.items()} for b in batches]


METHODS = {
    "agem": lambda opt: mitigate.GradientProjection(opt, mode="agem", loss_fn=mse, ref_batches=2, ref_every=2),
    "ogd": lambda opt: mitigate.GradientProjection(opt, mode="ogd", loss_fn=mse, directions_per_task=4),
    "ogd_tensor_qr": lambda opt: mitigate.GradientProjection(
        opt, mode="ogd", loss_fn=mse, directions_per_task=4, granularity="tensor", orthogonalization="qr"
    ),
    "clipping": lambda opt: mitigate.GradientClipping(opt, max_norm=0.05),
}


def run(method: str, task_a: list[dict], task_b: list[dict], distributed: bool) -> nn.Module:
    model = mlp()
    net = DDP(model) if distributed else model
    opt = METHODS[method](torch.optim.AdamW(net.parameters(), lr=1e-2))
    for phase, data in (("a", task_a), ("b", task_b)):
        for b in data:
            opt.zero_grad()
            mse(net, b).backward()
            opt.step()
        if phase == "a" and hasattr(opt, "remember"):
            opt.remember(net, data)
    return model


def unequal_ogd_counts(rank: int, world: int, counts: tuple[int, ...]) -> list[str]:
    """Issue 15 item 5: ranks passing different numbers of ``remember`` batches used to abort
    inside gloo ("collective mismatch"). Row i of the new directions is now the mean over the
    ranks that have a batch i; check that the basis spans exactly those rows on every rank."""
    model = mlp()
    net = DDP(model)
    opt = mitigate.GradientProjection(torch.optim.SGD(net.parameters(), lr=0.1), mode="ogd", loss_fn=mse)
    data = global_batches(max(counts), 7)
    mine = shard(data, rank, world)[:counts[rank]]
    report = opt.remember(net, mine)
    params = list(model.parameters())
    rows = []  # expected: per batch index, the mean of the ranks' shard gradients that exist
    for i in range(max(counts)):
        have = [r for r in range(world) if counts[r] > i]
        g = sum(torch.cat([x.reshape(-1) for x in torch.autograd.grad(
            mse(model, shard([data[i]], r, world)[0]), params)]) for r in have) / len(have)
        rows.append(g)
    expected = torch.stack(rows)
    basis = opt.basis
    residual = (expected - (expected @ basis.T) @ basis).norm(dim=1) / expected.norm(dim=1)
    out = []
    if report.added != max(counts) or float(residual.max()) > 1e-5:
        out.append(f"unequal counts {counts}: added {report.added}, residual {residual.tolist()}")
    gathered = [torch.empty_like(basis) for _ in range(world)]
    dist.all_gather(gathered, basis.contiguous())
    if not all(torch.equal(gathered[0], b) for b in gathered):
        out.append(f"unequal counts {counts}: ranks hold different bases")
    return out


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    task_a, task_b = global_batches(3, 0), global_batches(4, 1)
    failures = []
    for method in METHODS:
        mine = flat(run(method, shard(task_a, rank, world), shard(task_b, rank, world), True))
        gathered = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(gathered, mine)
        if not all(torch.equal(gathered[0], g) for g in gathered):
            failures.append(f"{method}: ranks differ")
        reference = flat(run(method, task_a, task_b, False))
        if not torch.allclose(mine, reference, rtol=1e-4, atol=1e-5):
            err = (mine - reference).abs().max().item()
            failures.append(f"{method}: differs from single-process run (max abs {err:.2e})")
        moved = (reference - flat(mlp())).abs().max().item()
        if moved < 1e-3:
            failures.append(f"{method}: parameters did not move")
    for counts in ((3, 2), (2, 0)):
        failures += unequal_ogd_counts(rank, world, counts)
    flag = torch.tensor([len(failures)])
    dist.all_reduce(flag)
    if failures:
        print(f"rank {rank}: " + "; ".join(failures), file=sys.stderr)
    elif rank == 0:
        print("DDP-PROJECTION-OK", flush=True)
    dist.barrier()  # no rank tears gloo down while another is still in a collective
    dist.destroy_process_group()
    return 1 if int(flag) else 0


if __name__ == "__main__":
    from _common import exit_now

    exit_now(main())
