"""Are the data-parallel replicas still identical? A check for DDP / Accelerate runs.

Every rank of a DDP run must hold the same parameters after every step; a mitigation that
estimates something from its rank's data shard without all-reducing it (a Fisher, a reference
gradient, an eigenvector) makes the ranks drift apart silently. :func:`replica_divergence`
measures the drift, :func:`assert_replicas_identical` turns it into an error naming the parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mitigate._utils import dist_ready

__all__ = ["assert_replicas_identical", "replica_divergence"]


def _named(obj: nn.Module | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    if isinstance(obj, nn.Module):
        obj = obj.named_parameters()
    elif isinstance(obj, Mapping):
        obj = obj.items()
    out = []
    for name, t in obj:
        if hasattr(t, "device_mesh"):  # DTensor (FSDP2): sharded, not replicated
            continue
        out.append((name, t.detach()))
    return out


@torch.no_grad()
def replica_divergence(obj: nn.Module | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> dict[str, float]:
    """Per tensor, the largest spread ``max_rank(x) − min_rank(x)`` over ranks, elementwise max.

    Zero for every tensor means all ranks hold bit-identical values. Collective: every rank must
    call it with the same tensor names in the same order. Outside a process group of more than
    one process every spread is 0. DTensor (FSDP2-sharded) parameters are skipped: they are
    sharded, not replicated.

    Args:
        obj: a module (its ``named_parameters()``), a ``{name: tensor}`` mapping or ``(name, tensor)`` pairs.

    Returns:
        ``{name: spread}`` as Python floats (NaN where a rank holds NaN).
    """
    named = _named(obj)
    if not dist_ready():
        return {n: 0.0 for n, _ in named}
    spreads = []
    for _, t in named:
        t32 = t.float()
        t_max, t_min = t32.clone(), t32.clone()
        dist.all_reduce(t_max, op=dist.ReduceOp.MAX)
        dist.all_reduce(t_min, op=dist.ReduceOp.MIN)
        spreads.append((t_max - t_min).max() if t32.numel() else t32.new_zeros(()))
    values = torch.stack(spreads).tolist() if spreads else []
    return {n: float(v) for (n, _), v in zip(named, values)}


def assert_replicas_identical(obj: nn.Module | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
                              *, atol: float = 0.0) -> None:
    """Raise unless every rank holds the same values (spread ``<= atol``) for every tensor.

    Args:
        obj: see :func:`replica_divergence`.
        atol: tolerated spread; ``0.0`` demands bit-identical replicas (what DDP guarantees).

    Raises:
        ValueError: when ``atol`` is negative.
        RuntimeError: naming the parameters whose replicas differ and by how much.
    """
    if atol < 0:
        raise ValueError(f"atol={atol!r} must be >= 0")
    spread = replica_divergence(obj)
    bad = {n: s for n, s in spread.items() if not s <= atol}
    if bad:
        worst = sorted(bad.items(), key=lambda kv: -kv[1] if kv[1] == kv[1] else float("-inf"))[:5]
        raise RuntimeError(
            f"{len(bad)} tensor(s) differ across ranks (atol={atol}); largest spreads: "
            + ", ".join(f"{n}={s:.3e}" for n, s in worst)
            + ". A mitigation estimated state from its rank's shard without all-reducing it."
        )
