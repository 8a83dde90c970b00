"""Weight-space trajectory: how far each part of the model has moved from a reference point.

For a piece ``S`` of the parameters (all, a module group, a layer) and reference ``θ*``:

    d_S(θ) = ‖θ[S] − θ*[S]‖₂ / ‖θ*[S]‖₂

(the "weight-space trajectory tracking" of the twenty-models study; groups as in
``mitigate.model_map``, fused QKV weights split into Q/K/V rows).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from mitigate._utils import ParamSelector, select_parameters
from mitigate.diagnostics._common import LayerKey, param_layout
from mitigate.errors import StateMismatchError

__all__ = ["WeightTrajectory"]


class WeightTrajectory:
    """Record the relative distance of a model's parameters from a reference over training.

    Each :meth:`record` appends ``{"step", "global", "per_group", "per_layer"}`` to
    :attr:`history`, where every value is ``‖θ[S] − θ*[S]‖ / ‖θ*[S]‖`` (NaN when the reference
    piece is zero). ``per_layer`` is keyed by layer (all groups of the block together).

    Args:
        model: the model to follow.
        reference: ``θ*`` — ``None`` (snapshot of the current parameters), another model of the
            same architecture, or a mapping ``{parameter name: tensor}``.
        params: which trainable parameters (default all trainable).
        device: where the reference snapshot is kept (default: next to each parameter; pass
            ``"cpu"`` to spare accelerator memory).

    Raises:
        StateMismatchError: the reference lacks parameters or has other shapes (names them).
    """

    def __init__(
        self,
        model: nn.Module,
        reference: nn.Module | Mapping[str, Tensor] | None = None,
        *,
        params: ParamSelector = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.model = model
        self._named = select_parameters(model, params)
        if reference is None:
            ref = {n: p for n, p in self._named.items()}
        elif isinstance(reference, nn.Module):
            ref = dict(reference.named_parameters())
        else:
            ref = dict(reference)
        missing = [n for n in self._named if n not in ref]
        shapes = [n for n in self._named if n in ref and tuple(ref[n].shape) != tuple(self._named[n].shape)]
        if missing or shapes:
            raise StateMismatchError(
                f"reference does not match the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"shape mismatch {shapes[:5]}{'...' if len(shapes) > 5 else ''}"
            )
        self.reference: dict[str, Tensor] = {
            n: ref[n].detach().to(device or p.device, copy=True) for n, p in self._named.items()
        }
        layout = param_layout(model, list(self._named))
        self._pieces = layout.pieces
        self.history: list[dict[str, Any]] = []

    @torch.no_grad()
    def distances(self) -> dict[str, Any]:
        """Current relative distances ``{"global", "per_group", "per_layer"}`` (not recorded)."""
        diff_sq: dict[Any, float] = {}
        ref_sq: dict[Any, float] = {}

        def add(key: Any, d: float, r: float) -> None:
            diff_sq[key] = diff_sq.get(key, 0.0) + d
            ref_sq[key] = ref_sq.get(key, 0.0) + r

        for piece in self._pieces:
            cur = piece.take(self._named[piece.name].detach()).double()
            ref = piece.take(self.reference[piece.name]).to(cur.device).double()
            d, r = float((cur - ref).square().sum()), float(ref.square().sum())
            add(("global",), d, r)
            add(("group", piece.group), d, r)
            if piece.layer is not None:
                add(("layer", piece.layer), d, r)

        def rel(key: Any) -> float:
            return math.sqrt(diff_sq[key]) / math.sqrt(ref_sq[key]) if ref_sq[key] > 0 else float("nan")

        per_group = {k[1]: rel(k) for k in diff_sq if k[0] == "group"}
        per_layer: dict[LayerKey, float] = {k[1]: rel(k) for k in diff_sq if k[0] == "layer"}
        return {"global": rel(("global",)), "per_group": per_group, "per_layer": per_layer}

    def record(self, step: int) -> dict[str, Any]:
        """Append the current distances for training step ``step`` to :attr:`history` and return
        the entry."""
        entry = {"step": int(step), **self.distances()}
        self.history.append(entry)
        return entry

    def to_dict(self) -> dict[str, Any]:
        """History as plain Python (layer keys as strings)."""
        return {
            "history": [
                {**e, "per_layer": {str(k): v for k, v in e["per_layer"].items()}} for e in self.history
            ]
        }
