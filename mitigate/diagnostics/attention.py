"""Attention-head disruption: entropy of attention patterns and Q/K weight movement per head.

The mechanistic analysis of forgetting (arXiv 2601.18699) calls a head *disrupted* when its
attention entropy rises by more than 1.8 bits, or its Q/K weight distance is an outlier above
2.5σ, and finds 15–23% of heads disrupted, mostly in lower layers. Entropy of one query row with
attention probabilities ``p``:

    H = −Σ_j p_j log₂ p_j   (bits; 0·log 0 = 0; uniform over T keys gives log₂ T).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from mitigate._utils import Batch, model_device, preserve_state
from mitigate.diagnostics._common import Result, as_batch_list, forward, model_inputs, token_mask, try_model_map
from mitigate.errors import UnsupportedArchitectureError

__all__ = ["DisruptedHeads", "attention_entropy", "disrupted_heads", "head_weight_distance"]


def _as_layers(attentions: Sequence[Tensor] | Tensor) -> list[Tensor]:
    if isinstance(attentions, Tensor):
        if attentions.dim() == 4:
            return [attentions]
        if attentions.dim() != 5:
            raise ValueError(
                f"attentions must be a tuple of (B, H, T, S) tensors or a stacked (L, B, H, T, S) tensor, "
                f"got shape {tuple(attentions.shape)}"
            )
        return list(attentions.unbind(0))
    layers = list(attentions)
    if not layers or any(a is None for a in layers):
        raise ValueError(
            "no attention probabilities (got an empty tuple or None entries): the model ran a fused "
            "attention kernel; load it with attn_implementation='eager' (or call "
            "model.set_attn_implementation('eager')) to get output_attentions"
        )
    for a in layers:
        if a.dim() != 4:
            raise ValueError(f"each layer's attentions must be (B, H, T, S), got shape {tuple(a.shape)}")
    return layers


def _entropy_sums(attentions: Sequence[Tensor] | Tensor, attention_mask: Tensor | None) -> tuple[Tensor, int, torch.dtype]:
    """Sum over valid query rows of the row entropy (bits), ``(L, H)`` float64, the number of
    valid rows, and the dtype to report in."""
    layers = _as_layers(attentions)
    b, _, t, _ = layers[0].shape
    if attention_mask is None:
        mask = torch.ones(b, t, dtype=torch.bool, device=layers[0].device)
    else:
        mask = token_mask({"attention_mask": attention_mask}, (b, t)).to(layers[0].device)
    out_dtype = torch.promote_types(layers[0].dtype, torch.float32)
    sums = []
    w = mask.to(torch.float64)  # (B, T)
    for a in layers:
        if a.shape[0] != b or a.shape[2] != t:
            raise ValueError(f"all layers need the same (B, T); got {tuple(a.shape)} after {(b, t)}")
        p = a.detach().to(out_dtype)
        ent = -torch.special.xlogy(p, p).sum(-1) / torch.log(torch.tensor(2.0, dtype=out_dtype))  # (B, H, T)
        sums.append(torch.einsum("bht,bt->h", ent.to(torch.float64), w))
    return torch.stack(sums), int(mask.sum()), out_dtype


def attention_entropy(attentions: Sequence[Tensor] | Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Mean attention entropy per layer and head, in bits.

    ``H(l, h) = mean over batch and valid query positions t of −Σ_s p[l, b, h, t, s] log₂ p[...]``,
    with ``0·log 0 = 0``. Uniform attention over ``T`` keys gives ``log₂ T``; causal rows have
    support ``t + 1``, so their mean is ``mean_t log₂(t + 1)``.

    Args:
        attentions: the ``output_attentions=True`` tuple (one ``(B, H, T, S)`` tensor per layer),
            or a stacked ``(L, B, H, T, S)`` tensor, or one layer ``(B, H, T, S)``.
        attention_mask: ``(B, T)`` mask of valid query positions (1 = real token); pad query rows
            are left out of the mean. ``None``: all rows count.

    Returns:
        ``(L, H)`` tensor in the attentions' float dtype (at least float32); accumulated in
        float64.

    Raises:
        ValueError: empty/None attentions (fused kernel: use eager attention), bad shapes, or a
            mask with no valid position.
    """
    sums, count, dtype = _entropy_sums(attentions, attention_mask)
    if count == 0:
        raise ValueError("attention_mask has no valid query position")
    return (sums / count).to(dtype)


def _collect_entropy(model: nn.Module, batches: list[Batch]) -> Tensor:
    """Mean entropy ``(L, H)`` float64 over all valid query rows of all batches."""
    total, count = None, 0
    for batch in batches:
        inputs = model_inputs(batch, model_device(model))
        out = forward(model, inputs, output_attentions=True)
        att = getattr(out, "attentions", None)
        if not att or any(a is None for a in att):
            raise ValueError(
                f"{type(model).__name__} returned no attentions with output_attentions=True; load it with "
                "attn_implementation='eager' (or call model.set_attn_implementation('eager'))"
            )
        s, c, _ = _entropy_sums(att, inputs.get("attention_mask"))
        total = s if total is None else total + s
        count += c
    if total is None or count == 0:
        raise ValueError("no valid query positions in the batches")
    return total / count


def head_weight_distance(model_before: nn.Module, model_after: nn.Module) -> Tensor:
    """Per-head squared Q/K weight distance ``‖ΔW_q,h‖² + ‖ΔW_k,g(h)‖²``, shape ``(L, H)``.

    Rows per head come from the ``mitigate.model_map`` index slices (fused QKV weights are
    sliced; biases included); ``g(h)`` is the K/V group of query head ``h`` (GQA/MQA). Uses each
    block's first (self-)attention module. PEFT models must be merged first.

    Raises:
        UnsupportedArchitectureError: a model has no architecture map.
        ValueError: the two models do not have the same layout.
    """
    maps = []
    for m in (model_before, model_after):
        mm = try_model_map(m)
        if mm is None:
            raise UnsupportedArchitectureError(
                f"{type(m).__name__}: per-head weight distances need mitigate.model_map to know the heads"
            )
        maps.append(mm)
    mb, ma = maps
    if len(mb.blocks) != len(ma.blocks):
        raise ValueError(f"models have {len(mb.blocks)} and {len(ma.blocks)} blocks")
    pb, pa = dict(model_before.named_parameters()), dict(model_after.named_parameters())
    rows = []
    with torch.no_grad():
        for blk_b, blk_a in zip(mb.blocks, ma.blocks):
            att_b, att_a = mb.attention(blk_b)[0], ma.attention(blk_a)[0]
            if att_b.q.num_heads != att_a.q.num_heads:
                raise ValueError(f"block {blk_b.name}: {att_b.q.num_heads} vs {att_a.q.num_heads} heads")

            def sq(sl_b: Any, sl_a: Any, h: int) -> float:
                total = 0.0
                for nb, na, dim in ((sl_b.param_name, sl_a.param_name, sl_b.dim), (sl_b.bias_name, sl_a.bias_name, 0)):
                    if nb is None or na is None:
                        continue
                    wb, wa = pb[nb], pa[na]
                    idx = sl_b.index[h].to(wb.device)
                    diff = wa.detach().to(wb.device).index_select(dim, idx).double() - wb.detach().index_select(dim, idx).double()
                    total += float(diff.square().sum())
                return total

            k_dist = [sq(att_b.k, att_a.k, g) for g in range(att_b.k.num_heads)]
            rows.append([sq(att_b.q, att_a.q, h) + k_dist[att_b.kv_head_of(h)] for h in range(att_b.q.num_heads)])
    return torch.tensor(rows, dtype=torch.float64)


@dataclass
class DisruptedHeads(Result):
    """Heads whose attention pattern or Q/K weights moved abnormally between two models.

    Attributes:
        mask: ``(L, H)`` bool, ``True`` for disrupted heads.
        entropy_before: ``(L, H)`` mean attention entropy (bits) before.
        entropy_after: ``(L, H)`` after.
        entropy_change: ``(L, H)`` after − before.
        weight_distance: ``(L, H)`` ``‖ΔW_q,h‖² + ‖ΔW_k,g(h)‖²``.
        weight_z: ``(L, H)`` z-score of ``weight_distance`` across all heads of the model.
        fraction: fraction of disrupted heads (seed: 0.15–0.23).
        fraction_per_layer: ``(L,)``.
        entropy_threshold, z_threshold: the thresholds used.
        reference: ``"heads"`` (z across the model's own heads) or ``"null"`` (z against a
            control model's head distances, see :func:`disrupted_heads`).
        lower_fraction: fraction of disrupted heads in the lower half of the layers
            (``⌈L/2⌉`` blocks; the seed's "15–23 % of heads in lower layers").
    """

    mask: Tensor
    entropy_before: Tensor
    entropy_after: Tensor
    entropy_change: Tensor
    weight_distance: Tensor
    weight_z: Tensor
    fraction: float
    fraction_per_layer: Tensor
    entropy_threshold: float
    z_threshold: float
    reference: str = "heads"
    lower_fraction: float = 0.0


@torch.no_grad()
def disrupted_heads(
    model_before: nn.Module,
    model_after: nn.Module,
    batches: Iterable[Batch] | Batch,
    *,
    entropy_threshold: float = 1.8,
    z_threshold: float = 2.5,
    null_model: nn.Module | None = None,
) -> DisruptedHeads:
    """Find attention heads disrupted by fine-tuning (arXiv 2601.18699, mechanism 1).

    A head ``(l, h)`` is disrupted when ``H_after − H_before > entropy_threshold`` bits (mean
    attention entropy over the valid query rows of ``batches``), **or** when the z-score of its
    Q/K weight distance ``d = ‖ΔW_q,h‖² + ‖ΔW_k,g(h)‖²`` exceeds ``z_threshold``. The z-score
    is taken against a reference distribution:

    * ``null_model=None``: across all heads of the model, ``z = (d − mean d) / std d``
      (population std; 0 when all distances are equal). By Cantelli's inequality at most
      ``1 / (1 + z_threshold²)`` of the heads can exceed it (13.8 % at 2.5σ), so the seed's
      15–23 % is out of reach by construction.
    * ``null_model`` given — a *control* run that changed the model without the interference
      in question, e.g. the model trained as long again on the old task itself: the distances
      ``d⁰`` of its heads from ``model_before`` are the null, ``z = (d − mean d⁰) / std d⁰``,
      and any share of heads (up to all) can exceed it.

    Both models run in eval mode with ``output_attentions=True`` (eager attention needed); modes
    and ``.grad`` are restored.

    Args:
        model_before: the model before fine-tuning.
        model_after: after (same architecture; merge PEFT adapters first).
        batches: dict batches (``input_ids``, ``attention_mask``).
        entropy_threshold: entropy increase in bits (seed: 1.8).
        z_threshold: weight-distance z-score (seed: 2.5σ).
        null_model: the control model whose head distances from ``model_before`` are the null
            (same architecture; ``None``: z across the heads themselves).

    Returns:
        :class:`DisruptedHeads`.

    Raises:
        ValueError: attentions unavailable (SDPA/flash kernel: use ``attn_implementation="eager"``),
            or models of different shapes.
        UnsupportedArchitectureError: no architecture map for the models.
    """
    batches = as_batch_list(batches)
    with preserve_state(model_before, mode=False), preserve_state(model_after, mode=False):
        ent_b = _collect_entropy(model_before, batches)
        ent_a = _collect_entropy(model_after, batches)
    dist = head_weight_distance(model_before, model_after)
    if ent_b.shape != ent_a.shape or ent_b.shape != dist.shape:
        raise ValueError(
            f"entropy shapes {tuple(ent_b.shape)}/{tuple(ent_a.shape)} and per-head weight distances "
            f"{tuple(dist.shape)} disagree: the attentions do not match the model map's blocks"
        )
    null = dist if null_model is None else head_weight_distance(model_before, null_model)
    if null.shape != dist.shape:
        raise ValueError(f"null_model has head distances of shape {tuple(null.shape)}, the models "
                         f"{tuple(dist.shape)}: pass a control of the same architecture")
    std = null.std(unbiased=False)
    if float(std) > 0:
        z = (dist - null.mean()) / std
    elif null_model is None:
        z = torch.zeros_like(dist)
    else:  # a null without spread: any head that moved more than it is infinitely far out
        z = torch.where(dist > null.mean(), torch.inf, torch.zeros_like(dist)).to(dist.dtype)
    change = ent_a - ent_b
    mask = (change > entropy_threshold) | (z > z_threshold)
    lower = mask[: (mask.shape[0] + 1) // 2]
    return DisruptedHeads(
        mask=mask,
        entropy_before=ent_b,
        entropy_after=ent_a,
        entropy_change=change,
        weight_distance=dist,
        weight_z=z,
        fraction=float(mask.double().mean()),
        fraction_per_layer=mask.double().mean(1),
        entropy_threshold=float(entropy_threshold),
        z_threshold=float(z_threshold),
        reference="heads" if null_model is None else "null",
        lower_fraction=float(lower.double().mean()),
    )
