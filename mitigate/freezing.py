"""Freezing mitigations: bottom layers + embeddings, and attention Q/K (whole layers or single heads).

*Freeze* (Zheng et al., "Spurious Forgetting in Continual Learning of Language Models"): after the
first task, freeze the embeddings and the bottom layers; Task-0 accuracy on their Biography
benchmark rose from 11% (plain sequential fine-tuning) to 44%.

*Q/K freezing* (Mechanistic Analysis of Catastrophic Forgetting, §2.3): gradient interference
concentrates in the query/key projections; freezing attention reduced forgetting by 64%.

Whole tensors are frozen with ``requires_grad_(False)``. Slices of a tensor (one head's rows, the
Q and K rows of a fused QKV weight, LoRA ``B`` rows) cannot be frozen that way, and zeroing their
gradient is not enough: decoupled weight decay (AdamW) and momentum still move them. Slices are
therefore held exactly: a gradient hook zeroes their gradient (so moments and clipping never see
it) and a global optimizer step post-hook (``torch.optim.optimizer.register_optimizer_step_post_hook``)
copies the stored values back after every step of every ``torch.optim`` optimizer, including ones
created after the call. Frozen slices stay bit-identical.

The held values follow weight loads: they are the slice's value at the last write made outside
an optimizer step. A ``load_state_dict`` reaching the module that owns the slice (on that module
or any parent, e.g. ``Trainer``'s ``resume_from_checkpoint``, PEFT's ``load_adapter``,
safetensors ``load_model``) re-reads them through a post-hook (``assign=True`` moves the hold to
the new parameter), and a step pre-hook re-reads them when the parameter's version counter shows
an in-place write since the last restore (``param.copy_(...)``). Writes through ``param.data``
are invisible to the version counter and are undone by the next step.
"""

from __future__ import annotations

import logging
import numbers
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from mitigate.architectures import AttentionInfo, ModelMap, ProjectionSlice, model_map

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- slice holding


class _SliceHold:
    """Keeps ``param.index_select(dim, index)`` bit-identical across optimizer steps.

    The held values are the slice's value at the last write made *outside* an optimizer step:
    read when the hold is made, and read again after a ``load_state_dict`` that reaches the owning
    module (``owner``, a post-hook; with ``assign=True`` the hold moves to the new parameter) and
    before a step when the parameter's version counter shows an in-place write since the last
    restore (``param.copy_``, safetensors ``load_model``, any loader writing in place).
    """

    def __init__(
        self, param: nn.Parameter, dim: int, index: Tensor, label: str,
        owner: nn.Module | None = None, leaf: str | None = None,
    ) -> None:
        self.param_ref = weakref.ref(param)
        self.dim = dim
        self.index = index.to(param.device)
        self.label = label
        self.leaf = leaf
        self.values = param.detach().index_select(dim, self.index).clone()
        self.version = param._version  # in-place writes since this bump mean "re-read the values"
        self._hook = param.register_hook(self._zero_grad)
        self._load_hook = (
            owner.register_load_state_dict_post_hook(self._after_load)
            if owner is not None and leaf is not None else None
        )
        _REGISTRY.setdefault(id(param), []).append(self)
        _ensure_global_hook()

    def _zero_grad(self, grad: Tensor) -> Tensor:
        index = self.index if self.index.device == grad.device else self.index.to(grad.device)
        return grad.index_fill(self.dim, index, 0)

    def restore(self, param: Tensor) -> None:
        if self.index.device != param.device:
            self.index = self.index.to(param.device)
            self.values = self.values.to(param.device)
        param.index_copy_(self.dim, self.index, self.values.to(param.dtype))

    def reread(self, param: Tensor) -> None:
        """Take the slice's current value in ``param`` as the value to hold."""
        if self.index.device != param.device:
            self.index = self.index.to(param.device)
        self.values = param.detach().index_select(self.dim, self.index).clone()
        self.version = param._version

    def _after_load(self, module: nn.Module, incompatible_keys: Any) -> None:
        """``load_state_dict`` post-hook of the owning module: hold the loaded values."""
        param = module._parameters.get(self.leaf) if self.leaf is not None else None
        if param is None:
            return
        if param is not self.param_ref():  # load_state_dict(assign=True) replaced the parameter
            self._detach_from_param()
            self.param_ref = weakref.ref(param)
            self._hook = param.register_hook(self._zero_grad)
            _REGISTRY.setdefault(id(param), []).append(self)
        with torch.no_grad():
            self.reread(param)

    def _detach_from_param(self) -> None:
        self._hook.remove()
        param = self.param_ref()
        holds = _REGISTRY.get(id(param), []) if param is not None else []
        if self in holds:
            holds.remove(self)
            if not holds:
                del _REGISTRY[id(param)]

    def release(self) -> None:
        self._detach_from_param()
        if self._load_hook is not None:
            self._load_hook.remove()
            self._load_hook = None


_REGISTRY: dict[int, list[_SliceHold]] = {}
_GLOBAL_HOOKS: Any = None


def _holds_of(p: Tensor) -> list[_SliceHold]:
    return [h for h in _REGISTRY.get(id(p), ()) if h.param_ref() is p]


def _held_params(optimizer: torch.optim.Optimizer):
    """``(p, holds)`` for every parameter of ``optimizer`` that has holds."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            holds = _holds_of(p)
            if holds:
                yield p, holds


def _follow_writes_before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Step pre-hook: a held parameter written in place since its last restore (a weight load
    that bypassed ``load_state_dict``) has new values to hold."""
    if not _REGISTRY:
        return
    with torch.no_grad():
        for p, holds in _held_params(optimizer):
            if any(h.version != p._version for h in holds):
                for hold in holds:
                    hold.reread(p)


def _restore_after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    if not _REGISTRY:
        return
    with torch.no_grad():
        for p, holds in _held_params(optimizer):
            for hold in holds:
                hold.restore(p)
            for hold in holds:  # after every restore: the step's own writes are not a load
                hold.version = p._version


def _ensure_global_hook() -> None:
    global _GLOBAL_HOOKS
    if _GLOBAL_HOOKS is None:
        _GLOBAL_HOOKS = (
            register_optimizer_step_pre_hook(_follow_writes_before_step),
            register_optimizer_step_post_hook(_restore_after_step),
        )


# ----------------------------------------------------------------------------- report


@dataclass
class FreezeReport:
    """What a freezing call did, and the model's trainable budget afterwards.

    Attributes:
        frozen: names of whole tensors frozen by this call, and ``"name[dim d: a:b, …]"``
            entries for frozen slices.
        num_frozen: scalar parameters of the model that are frozen now (whole tensors with
            ``requires_grad=False`` plus held slices), counting tied tensors once.
        num_trainable: scalar parameters that still train.
        tied: notes on tied input/output embeddings touched by the call.
        notes: other things the user should know (GQA groups, LoRA ``A`` matrices frozen, …).
    """

    frozen: list[str] = field(default_factory=list)
    num_frozen: int = 0
    num_trainable: int = 0
    tied: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _params: list[tuple[nn.Parameter, bool]] = field(default_factory=list, repr=False)
    _holds: list[_SliceHold] = field(default_factory=list, repr=False)
    _undone: bool = field(default=False, repr=False)

    @property
    def trainable_fraction(self) -> float:
        """``num_trainable / (num_trainable + num_frozen)``."""
        total = self.num_frozen + self.num_trainable
        return self.num_trainable / total if total else 0.0

    def undo(self) -> None:
        """Unfreeze exactly what this call froze (previous ``requires_grad`` flags come back,
        slice holds and their hooks are removed). Calling it twice is a no-op."""
        if self._undone:
            return
        for p, was in self._params:
            p.requires_grad_(was)
        for h in self._holds:
            h.release()
        self._undone = True

    def __str__(self) -> str:
        total = self.num_frozen + self.num_trainable
        lines = [
            f"FreezeReport: froze {len(self.frozen)} tensors/slices; "
            f"trainable {self.num_trainable:,} / {total:,} ({100 * self.trainable_fraction:.2f}%)"
        ]
        shown = self.frozen[:12]
        lines += [f"  - {n}" for n in shown]
        if len(self.frozen) > len(shown):
            lines.append(f"  … and {len(self.frozen) - len(shown)} more")
        lines += [f"  tied: {t}" for t in self.tied]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _count(model: nn.Module) -> tuple[int, int]:
    """(frozen, trainable) scalar counts; held slices count as frozen."""
    frozen = trainable = 0
    for p in model.parameters():  # deduplicates tied tensors
        if not p.requires_grad:
            frozen += p.numel()
            continue
        held = 0
        holds = _holds_of(p)
        if holds:  # union of the held rows (holds may overlap or use different dims)
            cover = torch.zeros(p.shape, dtype=torch.bool)
            for h in holds:
                cover.index_fill_(h.dim, h.index.cpu(), True)
            held = int(cover.sum())
        frozen += held
        trainable += p.numel() - held
    return frozen, trainable


def _describe_rows(name: str, dim: int, rows: Tensor) -> str:
    r = rows.tolist()
    spans, start, prev = [], r[0], r[0]
    for x in r[1:] + [None]:
        if x is not None and x == prev + 1:
            prev = x
            continue
        spans.append(f"{start}:{prev + 1}")
        if x is not None:
            start = prev = x
    return f"{name}[dim {dim}: {', '.join(spans)}]"


class _Freezer:
    """Accumulates one call's freezing into a :class:`FreezeReport`."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params = dict(model.named_parameters(remove_duplicate=False))
        self.report = FreezeReport()
        self._seen: set[int] = set()

    def whole(self, name: str) -> None:
        p = self.params[name]
        if id(p) in self._seen:
            return
        self._seen.add(id(p))
        self.report._params.append((p, p.requires_grad))
        if p.requires_grad:
            p.requires_grad_(False)
        self.report.frozen.append(name)

    def rows(self, name: str, dim: int, rows: Tensor) -> None:
        p = self.params[name]
        if not p.requires_grad:  # already frozen whole (e.g. a PEFT base weight): nothing to hold
            if id(p) not in self._seen:
                self._seen.add(id(p))
                self.report.frozen.append(_describe_rows(name, dim, rows) + " (already frozen)")
            return
        if rows.numel() == p.shape[dim]:
            self.whole(name)
            return
        owner_name, _, leaf = name.rpartition(".")
        hold = _SliceHold(p, dim, rows, name, self.model.get_submodule(owner_name), leaf)
        self.report._holds.append(hold)
        self.report.frozen.append(_describe_rows(name, dim, rows))

    def finish(self) -> FreezeReport:
        self.report.num_frozen, self.report.num_trainable = _count(self.model)
        logger.info("%s", self.report)
        return self.report


def _tied_note(model: nn.Module, frozen_names: set[str]) -> list[str]:
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if not (callable(get_in) and callable(get_out)):
        return []
    try:
        inp, out = get_in(), get_out()
    except (AttributeError, NotImplementedError):
        return []
    if inp is None or out is None or getattr(out, "weight", None) is not getattr(inp, "weight", None):
        return []
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if p is inp.weight}
    if names & frozen_names or not inp.weight.requires_grad:
        return [
            "input and output embeddings are tied (" + " = ".join(sorted(names)) + "): freezing "
            "the embeddings also freezes the output head"
        ]
    return []


# ----------------------------------------------------------------------------- public API


def _is_index(x: Any) -> bool:
    """An integer index: ``int`` (or numpy integer), never ``bool``."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _index_list(value: Any) -> list[Any] | None:
    """``value`` as a list when it is a list/tuple/set/range, else ``None``."""
    return list(value) if isinstance(value, (list, tuple, set, frozenset, range)) else None


def _check_layers(layers: Any, mm: ModelMap) -> list[int]:
    """Validate ``layers=`` of :func:`freeze_attention_qk`; sorted, de-duplicated, non-negative."""
    items = _index_list(layers)
    if items is None or not items or not all(_is_index(i) for i in items):
        raise ValueError(
            f"layers={layers!r} must be a non-empty list of int layer indices, e.g. layers=[0, 1] "
            "(layers=None freezes every layer)"
        )
    n = mm.num_layers
    for i in items:
        if not -n <= i < n:
            raise ValueError(f"layers contains layer {i}, but the model has {n} layers (0..{n - 1}, or -{n}..-1)")
    return sorted({int(i) % n for i in items})


def _check_heads(heads: Any, mm: ModelMap) -> dict[int, list[int]]:
    """Validate ``heads=`` of :func:`freeze_attention_qk` (nothing is changed on the model).

    Returns:
        ``{layer: sorted heads}`` with non-negative layer indices. Keys naming the same layer
        (``0`` and ``-num_layers``) are merged: their heads are united.
    """
    example = "e.g. heads={0: [1, 3]} (layer 0, query heads 1 and 3)"
    if not isinstance(heads, Mapping) or not heads:
        raise ValueError(f"heads={heads!r} must be a non-empty dict {{layer: [head, ...]}}, {example}")
    n, nh = mm.num_layers, mm.n_heads
    by_layer: dict[int, set[int]] = {}
    for layer, hs in heads.items():
        if not _is_index(layer):
            raise ValueError(f"heads has key {layer!r}; keys must be int layer indices, {example}")
        if not -n <= layer < n:
            raise ValueError(
                f"heads has layer {layer}, but the model has {n} layers (0..{n - 1}, or -{n}..-1)"
            )
        items = _index_list(hs)
        if items is None or not items:
            raise ValueError(
                f"heads[{layer}]={hs!r} must be a non-empty list of int head indices, {example}"
            )
        bad = [h for h in items if not (_is_index(h) and 0 <= h < nh)]
        if bad:
            raise ValueError(
                f"heads[{layer}] has {bad}; heads must be ints in 0..{nh - 1} (the model has {nh} "
                f"query heads per layer), {example}"
            )
        by_layer.setdefault(int(layer) % n, set()).update(int(h) for h in items)
    return {i: sorted(hs) for i, hs in sorted(by_layer.items())}


def freeze_bottom_layers(
    model: nn.Module, num_layers: int, *, embeddings: bool = True, arch: ModelMap | None = None
) -> FreezeReport:
    """Freeze the token/position embeddings and the first ``num_layers`` transformer blocks.

    The *Freeze* method of "Spurious Forgetting in Continual Learning of Language Models": call it
    after the first task, then fine-tune as usual. For encoder-decoder models the first
    ``num_layers`` blocks of every stack are frozen. Tied input/output embeddings are reported in
    ``FreezeReport.tied`` (freezing one freezes both).

    Args:
        model: a Hugging Face (or PEFT-wrapped) model.
        num_layers: how many bottom blocks to freeze, ``0 <= num_layers <= num_layers_of_model``.
        embeddings: also freeze the input embeddings (the paper freezes them).
        arch: a :func:`~mitigate.model_map` result for models outside the table.

    Returns:
        A :class:`FreezeReport`; ``report.undo()`` unfreezes.

    Raises:
        ValueError: ``num_layers`` negative, not an int, or larger than the number of blocks.
        UnsupportedArchitectureError: the architecture cannot be mapped.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"num_layers={num_layers!r} must be a non-negative int")
    mm = arch or model_map(model)
    if num_layers > mm.num_layers:
        raise ValueError(
            f"num_layers={num_layers} exceeds the model's {mm.num_layers} blocks; pass at most {mm.num_layers}"
        )
    fz = _Freezer(model)
    prefixes = [b.name for b in mm.blocks if b.index < num_layers]
    if embeddings:
        prefixes += mm.embedding_names
    for name in fz.params:
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            fz.whole(name)
    fz.report.tied = _tied_note(model, set(fz.report.frozen))
    return fz.finish()


def freeze_attention_qk(
    model: nn.Module,
    *,
    layers: list[int] | None = None,
    heads: dict[int, list[int]] | None = None,
    arch: ModelMap | None = None,
) -> FreezeReport:
    """Freeze the query and key projections (weights and biases) of chosen layers or heads.

    V, O, FFN and norms keep training. Separate projections are frozen whole
    (``requires_grad=False``); fused QKV weights and single heads are frozen row by row and held
    bit-identical under any ``torch.optim`` optimizer (see the module docstring). With grouped-query
    attention, freezing query head ``h`` freezes the K head of its group (which the other query
    heads of that group share); the report says so. On PEFT models the LoRA adapters of the frozen
    projections are frozen: whole adapters for whole projections; for slices, the ``B`` rows of
    the slice and the whole ``A`` matrix (``ΔW_slice = B_slice A`` stays fixed only if ``A`` does).

    Args:
        model: a Hugging Face (or PEFT-wrapped) model.
        layers: block indices (per stack; negative counts from the top); all when ``None``.
        heads: ``{layer: [head, ...]}`` to freeze only those query heads (and their K heads).
            Keys are layer indices (negative counts from the top), values non-empty lists (or
            tuples, sets) of query-head indices ``0..num_heads-1``. Two keys naming the same
            layer (``0`` and ``-num_layers``) are merged: the union of their heads is frozen.
            Mutually exclusive with ``layers``.
        arch: a :func:`~mitigate.model_map` result for models outside the table.

    Returns:
        A :class:`FreezeReport`; ``report.undo()`` unfreezes.

    Raises:
        ValueError: both ``layers`` and ``heads`` given; ``layers`` not a non-empty list of int
            layer indices; ``heads`` not a non-empty dict of int layer -> non-empty list of int
            heads; a layer or head out of range; a ``bool`` where an index belongs. The message
            names the bad value; it is raised before anything on the model changes.
        UnsupportedArchitectureError: the architecture cannot be mapped.
    """
    if layers is not None and heads is not None:
        raise ValueError("pass either layers= (whole layers) or heads= ({layer: [head, ...]}), not both")
    mm = arch or model_map(model)
    by_layer: dict[int, list[int]] | None = None
    if heads is not None:
        by_layer = _check_heads(heads, mm)
        chosen = list(by_layer)
    else:
        chosen = list(range(mm.num_layers)) if layers is None else _check_layers(layers, mm)
    fz = _Freezer(model)
    try:
        _freeze_qk(fz, mm, chosen, by_layer)
    except BaseException:
        fz.report.undo()  # all or nothing: a failure part-way leaves the model as it was
        raise
    return fz.finish()


def _freeze_qk(fz: _Freezer, mm: ModelMap, chosen: list[int], by_layer: dict[int, list[int]] | None) -> None:
    """The body of :func:`freeze_attention_qk` once its arguments are validated."""
    gqa_noted = False
    for block in mm.blocks_at(chosen):
        for att in mm.attention(block):
            head_list = None if by_layer is None else by_layer[block.index]
            _freeze_projection(fz, att.q, head_list)
            kv_heads = None if head_list is None else sorted({att.kv_head_of(h) for h in head_list})
            _freeze_projection(fz, att.k, kv_heads)
            if kv_heads is not None and att.k.num_heads < att.q.num_heads and not gqa_noted:
                fz.report.notes.append(
                    "grouped-query attention: freezing a query head freezes the K head of its group, "
                    "shared with the group's other query heads"
                )
                gqa_noted = True
    if any("lora_A" in n for n in fz.report.frozen) and (by_layer is not None or _any_fused(mm)):
        fz.report.notes.append(
            "LoRA adapters on sliced projections: their B rows and whole A matrix are frozen"
        )


def _any_fused(mm: ModelMap) -> bool:
    return any(a.q.fused for a in mm.attention(mm.blocks[0]))


def _freeze_projection(fz: _Freezer, sl: ProjectionSlice, heads: list[int] | None) -> None:
    """Freeze one projection's rows (``heads``) or all of it, with its bias and LoRA adapters."""
    whole = heads is None and not sl.fused
    if whole:
        fz.whole(sl.param_name)
        if sl.bias_name:
            fz.whole(sl.bias_name)
        for a, b in sl.lora:
            fz.whole(a)
            fz.whole(b)
        return
    rows = sl.rows(heads)
    fz.rows(sl.param_name, sl.dim, rows)
    if sl.bias_name:
        fz.rows(sl.bias_name, 0, rows)
    for a, b in sl.lora:
        fz.whole(a)
        fz.rows(b, 0, rows)  # lora_B weight is (out_features, r) for Linear and Conv1D bases


__all__ = ["AttentionInfo", "FreezeReport", "freeze_attention_qk", "freeze_bottom_layers"]
