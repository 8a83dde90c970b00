"""Machinery shared by the diagnostics: batches in, hidden states out, streaming second moments,
and the split of a model's parameters into named pieces (groups, layers, heads).

Private: the public functions live in the concept modules of :mod:`mitigate.diagnostics`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Union

import torch
from torch import Tensor, nn

from mitigate._utils import Batch, model_device, move_batch
from mitigate.errors import UnsupportedArchitectureError

logger = logging.getLogger("mitigate.diagnostics")

LayerKey = Union[int, str]
"""Layer index of a block; ``"stack.index"`` (``"encoder.block.3"``) for multi-stack models."""

_NOT_MODEL_INPUTS = ("labels",)


# ----------------------------------------------------------------------------- batches


def as_batch_list(batches: Iterable[Batch] | Batch) -> list[Batch]:
    """A re-iterable list of batches; a single dict batch becomes ``[batch]``.

    Raises:
        ValueError: when there is no batch at all.
    """
    out = [batches] if isinstance(batches, Mapping) else list(batches)
    if not out:
        raise ValueError("got no batches; pass a non-empty list of dict batches (input_ids, attention_mask)")
    return out


def model_inputs(batch: Batch, device: torch.device) -> dict[str, Any]:
    """The batch as ``model(**inputs)`` keywords on ``device``, without ``labels`` (no loss needed).

    Raises:
        ValueError: for batches that are not dicts.
    """
    if not isinstance(batch, Mapping):
        raise ValueError(
            f"diagnostics need dict batches (input_ids, attention_mask, ...), got {type(batch).__name__}"
        )
    return {k: move_batch(v, device) for k, v in batch.items() if k not in _NOT_MODEL_INPUTS}


def token_mask(inputs: Mapping[str, Any], shape: tuple[int, int]) -> Tensor:
    """Boolean ``(B, T)`` mask of real (non-pad) tokens: ``attention_mask`` or all ``True``."""
    mask = inputs.get("attention_mask")
    if mask is None:
        ref = inputs.get("input_ids")
        device = ref.device if isinstance(ref, Tensor) else torch.device("cpu")
        return torch.ones(shape, dtype=torch.bool, device=device)
    mask = mask.bool()
    if mask.dim() != 2:
        raise ValueError(f"attention_mask must be (B, T), got shape {tuple(mask.shape)}")
    if tuple(mask.shape) != tuple(shape):
        if mask.shape[0] == shape[0] and mask.shape[1] >= shape[1]:
            return mask[:, -shape[1] :]  # queries are the last positions (cached prefixes)
        raise ValueError(f"attention_mask of shape {tuple(mask.shape)} does not match tokens {tuple(shape)}")
    return mask


def forward(model: nn.Module, inputs: Mapping[str, Any], **flags: Any) -> Any:
    """``model(**inputs, **flags)`` without a KV cache when the model has one."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", None) is not None:
        flags.setdefault("use_cache", False)
    return model(**inputs, **flags)


def hidden_states(model: nn.Module, batch: Batch) -> tuple[tuple[Tensor, ...], Tensor]:
    """Hidden states of every layer for one batch, and the ``(B, T)`` token mask.

    Returns:
        ``(hidden_states, mask)``: the ``output_hidden_states=True`` tuple (embeddings first,
        each ``(B, T, d)``) and the boolean mask of non-pad tokens.

    Raises:
        ValueError: when the model returns no ``hidden_states``.
    """
    inputs = model_inputs(batch, model_device(model))
    out = forward(model, inputs, output_hidden_states=True)
    hs = getattr(out, "hidden_states", None)
    if not hs:
        raise ValueError(
            f"{type(model).__name__} returned no hidden_states with output_hidden_states=True; "
            "layer-wise diagnostics need a decoder-only or encoder-only Hugging Face model"
        )
    return tuple(hs), token_mask(inputs, tuple(hs[0].shape[:2]))


def unwrap_output(out: Any) -> Tensor:
    """First tensor of a module output (routers return ``(logits, scores, indices)``)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(f"cannot find a tensor in module output of type {type(out).__name__}")


# ----------------------------------------------------------------------------- second moments


class Moments:
    """Streaming first and second moments of paired features ``X (n, d1)``, ``Y (n, d2)`` in
    float64: ``XᵀX``, ``YᵀY``, optionally ``XᵀY``, column sums and the count.

    Memory is ``O(d1² + d2² + d1·d2)``, independent of the number of rows streamed.
    """

    def __init__(self, cross: bool = True) -> None:
        self.cross = cross
        self.xx: Tensor | None = None
        self.yy: Tensor | None = None
        self.xy: Tensor | None = None
        self.sx: Tensor | None = None
        self.sy: Tensor | None = None
        self.n = 0

    def update(self, x: Tensor, y: Tensor) -> None:
        """Add rows ``x (m, d1)`` and ``y (m, d2)`` (same ``m``)."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y need the same number of rows, got {x.shape[0]} and {y.shape[0]}")
        x, y = x.detach().to(torch.float64), y.detach().to(torch.float64)
        if self.xx is None:
            self.xx = x.new_zeros(x.shape[1], x.shape[1])
            self.yy = y.new_zeros(y.shape[1], y.shape[1])
            self.sx, self.sy = x.new_zeros(x.shape[1]), y.new_zeros(y.shape[1])
            if self.cross:
                self.xy = x.new_zeros(x.shape[1], y.shape[1])
        y = y.to(x.device)
        self.xx.addmm_(x.T, x)
        self.yy.addmm_(y.T, y)
        if self.xy is not None:
            self.xy.addmm_(x.T, y)
        self.sx.add_(x.sum(0))
        self.sy.add_(y.sum(0))
        self.n += int(x.shape[0])

    def centered(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(XcᵀXc, YcᵀYc, XcᵀYc)`` of the column-centred features: ``XᵀX − sₓsₓᵀ/n`` etc.

        Raises:
            ValueError: when nothing was streamed.
        """
        if self.xx is None or self.n == 0:
            raise ValueError("no tokens were streamed (empty batches or all positions masked)")
        n = float(self.n)
        xx = self.xx - torch.outer(self.sx, self.sx) / n
        yy = self.yy - torch.outer(self.sy, self.sy) / n
        xy = None if self.xy is None else self.xy - torch.outer(self.sx, self.sy) / n
        return xx, yy, xy


# ----------------------------------------------------------------------------- maths


def cosine(dot: float, norm_a_sq: float, norm_b_sq: float) -> float:
    """``dot / (‖a‖ ‖b‖)``; NaN when either vector is zero (the angle is undefined)."""
    den = math.sqrt(norm_a_sq) * math.sqrt(norm_b_sq)
    if den == 0.0 or not math.isfinite(den):
        return float("nan")
    return max(-1.0, min(1.0, dot / den))


# ----------------------------------------------------------------------------- parameter pieces


def try_model_map(model: nn.Module) -> Any | None:
    """:func:`mitigate.model_map` of ``model``, or ``None`` (logged) for unsupported models."""
    from mitigate.architectures import model_map

    try:
        return model_map(model)
    except UnsupportedArchitectureError as err:
        logger.warning("no architecture map for %s (%s); group/head breakdowns are skipped", type(model).__name__, err)
        return None


def layer_key(stack: str | None, index: int | None, multi_stack: bool) -> LayerKey | None:
    """Key of a layer: its index, or ``"stack.index"`` when the model has several stacks."""
    if index is None:
        return None
    return f"{stack}.{index}" if multi_stack else int(index)


@dataclass(frozen=True)
class Piece:
    """A named piece of one parameter: the whole tensor, or the positions ``index`` along ``dim``.

    Attributes:
        name: full parameter name.
        group: module group (``q``, ``k``, ``v``, ``o``, ``ffn``, ``router``, ``embed``, ``norm``,
            ``head``, ``other``; fused QKV weights are split into ``q``/``k``/``v`` pieces).
        layer: layer key or ``None`` outside the blocks.
        dim: axis that ``index`` selects along (``None``: the whole tensor).
        index: flat positions along ``dim``.
    """

    name: str
    group: str
    layer: LayerKey | None
    dim: int | None = None
    index: Tensor | None = None

    def take(self, t: Tensor) -> Tensor:
        """The piece of a tensor shaped like the parameter."""
        if self.index is None:
            return t
        return t.index_select(self.dim, self.index.to(t.device))


@dataclass
class HeadPieces:
    """Per-head pieces of one attention module (the first, self-attention, of a block).

    Attributes:
        q: per query head, the pieces of its Q rows (weight and bias).
        k: per K/V head, the pieces of its K rows.
        kv_of: ``kv_of[h]``: the K/V head that query head ``h`` uses (GQA grouping).
    """

    q: list[list[Piece]]
    k: list[list[Piece]]
    kv_of: list[int]


@dataclass
class ParamLayout:
    """The parameters of a model cut into group pieces and attention-head pieces."""

    pieces: list[Piece]
    heads: dict[LayerKey, HeadPieces]
    mapped: bool


def _proj_pieces(sl: Any, letter: str, layer: LayerKey | None, rows: Tensor, names: set[str]) -> list[Piece]:
    out = []
    if sl.param_name in names:
        out.append(Piece(sl.param_name, letter, layer, sl.dim, rows))
    if sl.bias_name is not None and sl.bias_name in names:
        out.append(Piece(sl.bias_name, letter, layer, 0, rows))
    for _, lora_b in sl.lora:  # PEFT lora_B (out, r): its rows are the projection's outputs
        if lora_b in names:
            out.append(Piece(lora_b, letter, layer, 0, rows))
    return out


def param_layout(model: nn.Module, names: Sequence[str], mm: Any | None = None) -> ParamLayout:
    """Cut the parameters ``names`` of ``model`` into pieces by group, layer and head.

    Groups come from ``model_map(model).param_groups()``; a fused QKV weight (group ``qkv``, e.g.
    GPT-2's ``Conv1D`` ``c_attn``) is split into its Q, K and V rows with the
    :class:`~mitigate.architectures.AttentionInfo` index slices, and so are its bias and PEFT
    ``lora_B`` rows (a fused ``lora_A`` is shared by Q, K and V and stays in ``qkv``). Per-head pieces
    are the Q rows of each query head and the K rows of each K/V head of each block's first
    attention module. Models without a map get one ``other`` piece per parameter.
    """
    names_set = set(names)
    mm = try_model_map(model) if mm is None else mm
    if mm is None:
        return ParamLayout([Piece(n, "other", None) for n in names], {}, mapped=False)
    groups = mm.param_groups()
    multi = len(mm.stacks) > 1
    fused: dict[str, list[Piece]] = {}
    heads: dict[LayerKey, HeadPieces] = {}
    for block in mm.blocks:
        lk = layer_key(block.stack, block.index, multi)
        for i, att in enumerate(mm.attention(block)):
            for letter in ("q", "k", "v"):
                sl = getattr(att, letter)
                if sl.fused:
                    for p in _proj_pieces(sl, letter, lk, sl.rows(), names_set):
                        fused.setdefault(p.name, []).append(p)
            if i == 0:
                q = [_proj_pieces(att.q, "q", lk, att.q.index[h], names_set) for h in range(att.q.num_heads)]
                k = [_proj_pieces(att.k, "k", lk, att.k.index[h], names_set) for h in range(att.k.num_heads)]
                if any(q) or any(k):
                    heads[lk] = HeadPieces(q, k, [att.kv_head_of(h) for h in range(att.q.num_heads)])
    pieces: list[Piece] = []
    for name in names:
        pg = groups.get(name)
        if pg is None:
            pieces.append(Piece(name, "other", None))
        elif pg.group == "qkv" and name in fused:
            pieces.extend(fused[name])
        else:
            pieces.append(Piece(name, pg.group, layer_key(pg.stack, pg.layer, multi)))
    return ParamLayout(pieces, heads, mapped=True)


def layer_key_str(key: Any) -> str:
    """JSON key for a ``(group, layer)`` or layer key: ``"q/3"``, ``"3"``."""
    if isinstance(key, tuple):
        return "/".join(str(k) for k in key)
    return str(key)


def plain(x: Any) -> Any:
    """Plain-Python copy: tensors to (nested) lists, dict keys to strings (tuples as
    ``"a/b"``), tuples to lists, nested dataclass results through their ``to_dict``."""
    if isinstance(x, Tensor):
        return x.tolist()
    if isinstance(x, Result):
        return x.to_dict()
    if isinstance(x, Mapping):
        return {layer_key_str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x


class Result:
    """Base of the diagnostics' result dataclasses: :meth:`to_dict` gives a plain-Python copy
    of every field (tensors as lists)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python (JSON-ready) copy of the fields; ``(group, layer)`` keys become
        ``"group/layer"`` strings."""
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}  # type: ignore[arg-type]
