"""Mixture-of-experts routing drift between two models (Mixtral-style top-k routers).

For each MoE layer and non-pad token with router distributions ``p = softmax(z_before)`` and
``q = softmax(z_after)``:

    KL(p ‖ q) = Σ_e p_e (log p_e − log q_e),

averaged over tokens, and the fraction of tokens whose top-k expert set changed ("routing gate
drift" of the twenty-models study).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mitigate._utils import Batch, model_device, preserve_state
from mitigate.diagnostics._common import Result, as_batch_list, forward, model_inputs, token_mask, try_model_map, unwrap_output

__all__ = ["RouterDrift", "router_drift"]


@dataclass
class RouterDrift(Result):
    """Routing drift per MoE layer.

    Attributes:
        kl_per_layer: ``(L,)`` mean ``KL(p_before ‖ p_after)`` (nats) over non-pad tokens.
        changed_topk_fraction: ``(L,)`` fraction of tokens whose top-k expert set changed.
        layers: block index of each entry.
        top_k: the ``k`` used (``config.num_experts_per_tok``).
        n_tokens: number of tokens compared per layer.
    """

    kl_per_layer: Tensor
    changed_topk_fraction: Tensor
    layers: list[int]
    top_k: int
    n_tokens: int


def _top_k_of(model: nn.Module, routers: list[tuple[Any, str]]) -> int:
    for cfg in (getattr(model, "config", None),):
        for attr in ("num_experts_per_tok", "moe_top_k", "top_k"):
            value = getattr(cfg, attr, None)
            if isinstance(value, int) and value > 0:
                return value
    modules = dict(model.named_modules())
    for _, name in routers:
        value = getattr(modules[name], "top_k", None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(f"cannot find the router top-k of {type(model).__name__} (config.num_experts_per_tok)")


def _router_logits(model: nn.Module, routers: list[tuple[Any, str]], batch: Batch) -> tuple[list[Tensor], Tensor]:
    """Router logits ``(B·T, E)`` of each MoE layer for one batch, and the flat token mask."""
    modules = dict(model.named_modules())
    captured: list[Tensor | None] = [None] * len(routers)
    handles = []
    for i, (_, name) in enumerate(routers):

        def hook(_mod: nn.Module, _inp: Any, out: Any, i: int = i) -> None:
            captured[i] = unwrap_output(out).detach()

        handles.append(modules[name].register_forward_hook(hook))
    try:
        inputs = model_inputs(batch, model_device(model))
        forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    ids = inputs.get("input_ids")
    if ids is None:
        raise ValueError("router_drift needs batches with input_ids")
    mask = token_mask(inputs, tuple(ids.shape[:2])).reshape(-1)
    out = []
    for (blk, name), z in zip(routers, captured):
        if z is None:
            raise ValueError(f"router {name!r} did not run in the forward pass")
        z = z.reshape(-1, z.shape[-1])
        if z.shape[0] != mask.numel():
            raise ValueError(f"router {name!r} saw {z.shape[0]} tokens, the batch has {mask.numel()}")
        out.append(z)
    return out, mask


@torch.no_grad()
def router_drift(model_before: nn.Module, model_after: nn.Module, batches: Iterable[Batch] | Batch) -> RouterDrift:
    """Drift of MoE routing between two models on the same tokens.

    Router logits are captured with forward hooks on ``mitigate.model_map(model).router_modules()``
    (Mixtral ``block_sparse_moe.gate``/``mlp.gate``). Per layer, over non-pad tokens:
    mean ``KL(softmax(z_b) ‖ softmax(z_a))`` (float64, nats) and the fraction of tokens whose
    top-k expert set (``k = config.num_experts_per_tok``) differs. Eval mode; modes and ``.grad``
    restored.

    Args:
        model_before: the model before fine-tuning.
        model_after: after (same architecture).
        batches: dict batches (``input_ids``, ``attention_mask``).

    Returns:
        :class:`RouterDrift`.

    Raises:
        ValueError: the model has no MoE routers, the two models differ in router layout, or no
            token is valid.
    """
    routers = []
    for m in (model_before, model_after):
        mm = try_model_map(m)
        r = mm.router_modules() if mm is not None else []
        if not r:
            raise ValueError(f"{type(m).__name__} has no MoE router modules (router_drift is for Mixtral-style models)")
        routers.append(r)
    if len(routers[0]) != len(routers[1]):
        raise ValueError(f"the models have {len(routers[0])} and {len(routers[1])} MoE layers")
    k = _top_k_of(model_before, routers[0])
    n_layers = len(routers[0])
    kl = torch.zeros(n_layers, dtype=torch.float64)
    changed = torch.zeros(n_layers, dtype=torch.float64)
    n_tokens = 0
    with preserve_state(model_before, mode=False), preserve_state(model_after, mode=False):
        for batch in as_batch_list(batches):
            zb, mask = _router_logits(model_before, routers[0], batch)
            za, _ = _router_logits(model_after, routers[1], batch)
            for i, (b, a) in enumerate(zip(zb, za)):
                m = mask.to(b.device)
                lb = torch.log_softmax(b[m].double(), -1)
                la = torch.log_softmax(a.to(b.device)[m].double(), -1)
                kl[i] += float((lb.exp() * (lb - la)).sum())
                sel_b = torch.zeros_like(lb, dtype=torch.bool).scatter_(1, lb.topk(k, -1).indices, True)
                sel_a = torch.zeros_like(la, dtype=torch.bool).scatter_(1, la.topk(k, -1).indices, True)
                changed[i] += float((sel_b != sel_a).any(-1).sum())
            n_tokens += int(mask.sum())
    if n_tokens == 0:
        raise ValueError("no valid (non-pad) tokens in the batches")
    return RouterDrift(
        kl_per_layer=kl / n_tokens,
        changed_topk_fraction=changed / n_tokens,
        layers=[blk.index for blk, _ in routers[0]],
        top_k=k,
        n_tokens=n_tokens,
    )
