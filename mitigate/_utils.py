"""Shared private helpers: loss functions, parameter selection, side-effect guards,
lists of tensors as one vector, and the few ``torch.distributed`` calls the library needs.

Everything that more than one module needs lives here once.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

logger = logging.getLogger("mitigate")

Batch = Any
"""A batch as the model takes it: usually a ``dict`` of tensors for ``model(**batch)``."""

LossFn = Callable[[nn.Module, Batch], Tensor]
"""``loss_fn(model, batch) -> scalar``. ``None`` in public APIs means :func:`default_loss`."""

ParamSelector = Union[None, str, Sequence[str], Callable[[str, nn.Parameter], bool]]
"""Which parameters an operation covers.

* ``None``: every parameter with ``requires_grad=True``.
* ``str``: a regular expression, ``re.fullmatch``-ed against the parameter name.
* sequence of ``str``: exact names or dotted suffixes (``"q_proj.weight"`` matches every layer's).
* callable ``(name, param) -> bool``.
Only trainable parameters are ever selected.
"""


def default_loss(model: nn.Module, batch: Batch) -> Tensor:
    """``model(**batch).loss`` (Hugging Face convention); tuples/lists are unpacked positionally.

    Raises:
        ValueError: when the model output carries no ``loss`` (pass ``labels`` or a ``loss_fn``).
    """
    out = model(**batch) if isinstance(batch, Mapping) else model(*batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, Mapping):
        loss = out.get("loss")
    if loss is None:
        raise ValueError(
            "the model returned no `loss` for this batch; include `labels` in the batch or pass "
            "`loss_fn=lambda model, batch: ...` returning a scalar"
        )
    return loss


def resolve_loss_fn(loss_fn: LossFn | None) -> LossFn:
    """``loss_fn`` or :func:`default_loss` when ``None``."""
    return default_loss if loss_fn is None else loss_fn


def batch_size_of(batch: Batch) -> int:
    """Number of examples in a batch: leading size of its first tensor (1 if none)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    values: Iterable[Any] = batch.values() if isinstance(batch, Mapping) else batch
    for v in values:
        if isinstance(v, Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return 1


def move_batch(batch: Batch, device: torch.device | str) -> Batch:
    """Return ``batch`` with every tensor moved to ``device`` (dicts, lists and tuples recursed)."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_batch(v, device) for v in batch)
    return batch


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def select_parameters(model: nn.Module, params: ParamSelector = None) -> dict[str, nn.Parameter]:
    """Trainable named parameters of ``model`` chosen by ``params`` (see :data:`ParamSelector`).

    Tied parameters appear once, under their first name (``named_parameters()`` order).

    Raises:
        ValueError: when the selector matches no trainable parameter.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        chosen = named
    elif isinstance(params, str):
        rx = re.compile(params)
        chosen = [(n, p) for n, p in named if rx.fullmatch(n)]
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]
    else:
        wanted = list(params)
        chosen = [(n, p) for n, p in named if any(n == w or n.endswith("." + w) for w in wanted)]
    if not chosen:
        raise ValueError(
            f"params={params!r} matches no trainable parameter of {type(model).__name__}; "
            "pass None (all trainable), a regex, a list of names/suffixes, or a predicate"
        )
    return dict(chosen)


@contextlib.contextmanager
def preserve_state(model: nn.Module, *, mode: bool | None = None) -> Iterator[None]:
    """Run a block without side effects on ``model``: train/eval flags of every submodule and
    every parameter's ``.grad`` are restored on exit (also on error).

    Args:
        model: the module to guard.
        mode: set ``model.train(mode)`` inside the block (``None`` leaves it as is).
    """
    training = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    for p, _ in grads:
        p.grad = None
    try:
        if mode is not None:
            model.train(mode)
        yield
    finally:
        for m, t in training:
            m.training = t
        for p, g in grads:
            p.grad = g


@contextlib.contextmanager
def input_grad_hooks_removed(model: nn.Module) -> Iterator[None]:
    """Run a block with Hugging Face's input-embedding ``requires_grad_`` hooks taken off.

    ``gradient_checkpointing_enable()`` (and PEFT's k-bit preparation) call
    ``enable_input_require_grads()``, a forward hook on the input embeddings that calls
    ``output.requires_grad_(True)`` so that reentrant checkpointing sees a grad-requiring input.
    Under a :mod:`torch.func` transform (``grad``, ``jvp``, ``vmap``) that call raises ("You are
    attempting to call Tensor.requires_grad_() ... inside of a function being transformed"). The
    functional routines (Hessian/GGN products, per-sample gradients) do not need the hook: they
    differentiate with respect to the parameters. Each module that holds such hooks gets
    ``disable_input_require_grads()`` here and ``enable_input_require_grads()`` on exit (also on
    error), so the model leaves as it came.
    """
    owners = [m for m in model.modules() if getattr(m, "_require_grads_hooks", None) and hasattr(m, "enable_input_require_grads")]
    for m in owners:
        m.disable_input_require_grads()
    try:
        yield
    finally:
        for m in owners:
            m.enable_input_require_grads()


_PROGRESS: contextvars.ContextVar[bool] = contextvars.ContextVar("mitigate_progress", default=True)


@contextlib.contextmanager
def progress_enabled(enabled: bool) -> Iterator[None]:
    """Turn every mitigate progress bar on or off inside the block (``MitigationTrainer`` uses it
    to follow ``TrainingArguments.disable_tqdm``). A bar a call asks to hide stays hidden."""
    token = _PROGRESS.set(bool(enabled))
    try:
        yield
    finally:
        _PROGRESS.reset(token)


def progress_bar(*args: Any, enabled: bool = True, **kwargs: Any) -> Any:
    """``tqdm.auto.tqdm(*args, **kwargs)``, hidden unless ``enabled`` and bars are on
    (:func:`progress_enabled`)."""
    from tqdm.auto import tqdm

    return tqdm(*args, disable=not (enabled and _PROGRESS.get()), **kwargs)


def free_memory_bytes(device: torch.device | str) -> int | None:
    """Free memory where tensors on ``device`` live: the CUDA device's free bytes, or the host's
    available physical memory (Linux ``sysconf``); ``None`` when unknown."""
    device = torch.device(device)
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            import os

            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None
    return None


def _gb(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def note_per_sample_memory(what: str, per_sample_bytes: int, chunk: int, device: torch.device | str, *, threshold: int = 2**30) -> None:
    """Log, before a per-sample-gradient pass, how much memory one chunk holds when that is more
    than ``threshold`` bytes: WARNING with the ``chunk_size`` that fits in half the free memory
    when the chunk does not, else INFO.

    Args:
        what: the routine, for the message (e.g. ``"EWC Fisher"``).
        per_sample_bytes: one sample's gradient, ``Σ numel · itemsize`` over the parameters.
        chunk: samples per vmap call.
        device: where the gradients live.
    """
    held = per_sample_bytes * chunk
    if held <= threshold:
        return
    free = free_memory_bytes(device)
    fits = None if free is None else max(1, int(0.5 * free // max(per_sample_bytes, 1)))
    msg = (
        f"{what}: per-sample gradients of {chunk} samples × {_gb(per_sample_bytes)} each hold {_gb(held)} at once"
        + ("" if free is None else f" ({_gb(free)} free on {torch.device(device)}; chunk_size={fits} fits in half of it)")
    )
    if fits is not None and chunk > fits:
        logger.warning("%s; pass chunk_size=%d to stay within memory", msg, fits)
    else:
        logger.info("%s", msg)


# ---------------------------------------------------------------- lists of tensors as one vector


def flat_dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """Σᵢ ⟨xᵢ, yᵢ⟩ in float32 or wider (float64 stays float64)."""
    acc = None
    for x, y in zip(xs, ys, strict=True):
        dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
        d = torch.sum(x.to(dtype) * y.to(dtype))
        acc = d if acc is None else acc + d
    if acc is None:
        raise ValueError("flat_dot of empty tensor lists")
    return acc


def flat_norm(xs: Sequence[Tensor]) -> Tensor:
    """‖concat(xs)‖₂ in float32 or wider."""
    return flat_dot(xs, xs).sqrt()


def flatten(xs: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
    """Concatenate the tensors into one 1-D vector, shape ``(Σ numel,)``."""
    return torch.cat([x.reshape(-1).to(dtype or x.dtype) for x in xs])


def unflatten_like(vec: Tensor, likes: Sequence[Tensor]) -> list[Tensor]:
    """Split a 1-D ``vec`` into tensors shaped (and typed) like ``likes``."""
    out, i = [], 0
    for t in likes:
        n = t.numel()
        out.append(vec[i : i + n].view_as(t).to(t.dtype))
        i += n
    if i != vec.numel():
        raise ValueError(f"vector of {vec.numel()} values does not match tensors totalling {i}")
    return out


# ---------------------------------------------------------------- torch.distributed


def dist_ready() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_mean_(t: Tensor) -> Tensor:
    """In-place mean of ``t`` across ranks (no-op outside a process group); returns ``t``."""
    if dist_ready():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(dist.get_world_size())
    return t


def all_reduce_sum_(t: Tensor) -> Tensor:
    """In-place sum of ``t`` across ranks (no-op outside a process group); returns ``t``."""
    if dist_ready():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """In-place broadcast of ``t`` from rank ``src`` (no-op outside a process group)."""
    if dist_ready():
        dist.broadcast(t, src=src)
    return t


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), or ``t`` itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (an FSDP2-sharded parameter or gradient)."""
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


def shard_like(local: Tensor, like: Tensor) -> Tensor:
    """``local`` (this rank's shard) as a ``DTensor`` laid out like the DTensor ``like``, or
    ``local`` itself when ``like`` is a plain tensor (e.g. a gradient to hand to autograd)."""
    if not is_dtensor(like):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False,  # type: ignore[attr-defined]
                              shape=like.shape, stride=like.stride())


class ShardedByName:
    """The FSDP2-sharded ``DTensor`` of each parameter, remembered by name.

    FSDP2 swaps the root module's sharded parameters for unsharded plain tensors between its
    forward and backward; code that runs then (a penalty inside the loss, a projection before
    the backward finished) must still reach the sharded parameters the optimizer owns.
    """

    def __init__(self) -> None:
        self._by_name: dict[str, Tensor] = {}

    def get(self, name: str, p: Tensor) -> Tensor:
        """``p`` when it is sharded (remembered), else the sharded parameter last seen under
        ``name``, else ``p``."""
        if is_dtensor(p):
            self._by_name[name] = p
            return p
        return self._by_name.get(name, p)

    def known(self, name: str) -> bool:
        """Whether a sharded parameter was seen under ``name``."""
        return name in self._by_name


# ---------------------------------------------------------------- per-parameter stored state


def buffer_key(prefix: str, param_name: str) -> str:
    """Buffer name for state stored per parameter: ``prefix + name`` with ``.`` -> ``__``
    (``register_buffer`` refuses dots)."""
    return prefix + param_name.replace(".", "__")


def live_parameters(
    model: nn.Module, shapes: Mapping[str, Sequence[int]], what: str
) -> list[nn.Parameter]:
    """The model's parameters named in ``shapes`` (``named_parameters()`` names), in that order,
    after checking that each still exists with the recorded shape.

    Raises:
        StateMismatchError: naming every parameter that is missing or changed shape.
    """
    from mitigate.errors import StateMismatchError

    named = dict(model.named_parameters())
    missing = [n for n in shapes if n not in named]
    changed = [
        f"{n} {tuple(shapes[n])} -> {tuple(named[n].shape)}"
        for n in shapes
        if n in named and tuple(named[n].shape) != tuple(shapes[n])
    ]
    if missing or changed:
        parts = []
        if missing:
            parts.append(f"missing parameters {missing}")
        if changed:
            parts.append(f"parameters that changed shape {changed}")
        raise StateMismatchError(
            f"{what} no longer matches the model: " + "; ".join(parts)
            + ". Consolidate again on the current model (or restore the original architecture)."
        )
    return [named[n] for n in shapes]


def adopt_state_dict_buffers(
    module: nn.Module, state_dict: Mapping[str, Any], prefix: str, device: torch.device | None
) -> None:
    """Before ``load_state_dict``: drop ``module``'s own buffers and register one placeholder per
    tensor entry of ``state_dict`` under ``prefix`` (so a fresh module can load saved state whose
    buffers it does not have yet). Non-tensor entries and ``_extra_state`` are skipped."""
    for name in list(module._buffers):
        del module._buffers[name]
    for key, value in state_dict.items():
        if not key.startswith(prefix) or not isinstance(value, Tensor):
            continue
        rest = key[len(prefix):]
        if "." in rest or rest == "_extra_state":
            continue
        module.register_buffer(rest, torch.empty_like(value, device=device or value.device))


def reject_sharded(named: Iterable[tuple[str, Tensor]], what: str) -> None:
    """Raise when a parameter is an FSDP2-sharded DTensor (``autograd.grad`` w.r.t. it returns
    ``None``: the forward runs on all-gathered copies), instead of silently using zeros.

    Raises:
        NotImplementedError: naming ``what``, the first sharded parameter and the alternatives.
    """
    for name, p in named:
        if is_dtensor(p):
            raise NotImplementedError(
                f"{what} does not support FSDP2-sharded parameters yet ({name!r} is a DTensor); "
                "use DDP, or consolidate on an unsharded copy of the model "
                "(see docs/INTEGRATIONS.md, 'Distributed')"
            )


def sharded_state(named: Iterable[tuple[str, Tensor]], what: str) -> bool:
    """Whether the parameters are FSDP2-sharded (``DTensor``) — each rank then holds one shard of
    every flat vector built from them, and dot products need their partial sums all-reduced.

    Args:
        named: ``(name, parameter)`` pairs.
        what: the caller, for the error message.

    Returns:
        ``True`` when every parameter is a DTensor sharded over a 1-D mesh spanning the default
        process group (``fully_shard`` without HSDP), ``False`` when none is.

    Raises:
        NotImplementedError: a mix of sharded and plain parameters, or another DTensor layout
            (HSDP, tensor parallelism), naming the first offending parameter.
    """
    named = list(named)
    flags = [(n, is_dtensor(p)) for n, p in named]
    if not any(f for _, f in flags):
        return False
    plain = [n for n, f in flags if not f]
    if plain:
        raise NotImplementedError(
            f"{what}: some selected parameters are FSDP2-sharded DTensors and some are not "
            f"({plain[0]!r} is plain); shard all of them with fully_shard, or select only one kind "
            "with params=..."
        )
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    for n, p in named:
        mesh = p.device_mesh  # type: ignore[attr-defined]
        if mesh.ndim != 1 or mesh.size() != world:
            raise NotImplementedError(
                f"{what} supports FSDP2 sharding over one 1-D mesh spanning all {world} ranks; "
                f"{n!r} lives on a mesh of shape {tuple(mesh.shape)} (HSDP / tensor parallelism)"
            )
    return True


def shard_info() -> dict[str, int]:
    """``{"rank", "world_size"}`` of this process in the default process group (0 of 1 outside
    one): recorded with per-rank state (FSDP2 shards) and checked when it is loaded again."""
    if dist.is_available() and dist.is_initialized():
        return {"rank": dist.get_rank(), "world_size": dist.get_world_size()}
    return {"rank": 0, "world_size": 1}


def check_shard(saved: dict[str, int] | None, what: str) -> None:
    """Refuse per-rank state (FSDP2 shards) saved by another rank or world size.

    Args:
        saved: the :func:`shard_info` recorded with the state (``None``: unsharded state).
        what: the owner, for the message.

    Raises:
        StateMismatchError: ``saved`` differs from this process's :func:`shard_info`.
    """
    from mitigate.errors import StateMismatchError

    here = shard_info()
    if saved is not None and saved != here:
        raise StateMismatchError(
            f"{what} state holds the FSDP2 shards of rank {saved['rank']} of {saved['world_size']}, "
            f"but this is rank {here['rank']} of {here['world_size']}: "
            "load each rank's own state_dict under the same sharding"
        )


def sharded_per_sample_grads(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], Tensor],
    batch: Any,
    params: Sequence[nn.Parameter],
) -> Iterator[list[Tensor | None]]:
    """Per-sample gradients under FSDP2, for the samples of *every* rank, as this rank's shards.

    ``backward()`` under FSDP2 reduce-scatters the *mean over ranks* of the gradients into each
    parameter's sharded ``.grad``, so per-sample gradients cannot come from all ranks at once.
    The ranks take turns: for each sample ``n`` of rank ``r`` (rank order, then sample order —
    the order of the global batch when rank ``r`` holds its ``r``-th contiguous block), rank
    ``r`` back-propagates ``ℓ_n`` and every other rank a zero-weighted loss of its own first
    sample (to join FSDP's all-gathers and reduce-scatters), so the shard of ``.grad`` is
    ``∇ℓ_n / W`` (FSDP's default gradient divide factor, the world size ``W``); ``W · .grad``
    is yielded. Exact; memory stays sharded; every rank runs ``N_global`` forward/backward passes.

    Args:
        model: the FSDP2-sharded model.
        loss_fn: ``loss_fn(model, one_sample_batch) -> scalar``.
        batch: this rank's batch (tensors whose leading size is the batch size are cut per sample).
        params: sharded parameters whose gradients are yielded; their ``.grad`` is overwritten
            and finally cleared (run under :func:`preserve_state`).

    Yields:
        per global sample, ``[W · local shard of ∇ℓ_n of each parameter]`` (``None`` where unused).

    Raises:
        ValueError: on every rank, when a rank's batch is empty or any sample's loss is not finite.
    """
    from torch.utils._pytree import tree_map

    size = batch_size_of(batch)
    world, rank = dist.get_world_size(), dist.get_rank()
    counts = torch.zeros(world, dtype=torch.float64)
    counts[rank] = size
    dist.all_reduce(counts)
    if bool((counts == 0).any()):
        raise ValueError(f"per-sample gradients under FSDP2: a rank got an empty batch (samples per rank {counts.tolist()})")

    def one(i: int) -> Any:
        return tree_map(lambda t: t[i : i + 1] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == size else t, batch)

    bad = torch.zeros(1, dtype=torch.float64)
    for owner in range(world):
        for i in range(int(counts[owner])):
            mine = owner == rank
            with torch.enable_grad():
                loss = loss_fn(model, one(i if mine else 0))
                if mine:
                    bad += (~torch.isfinite(loss.detach())).sum().double()
                for p in params:
                    p.grad = None
                (loss if mine else loss * 0.0).backward()
            yield [None if p.grad is None else local_tensor(p.grad).mul(world) for p in params]
    for p in params:
        p.grad = None
    dist.all_reduce(bad)
    if bool(bad[0] > 0):
        raise ValueError(
            "non-finite per-sample loss on some rank: check the batch (a sample with no "
            "non-ignored labels gives 0/0) and the model's parameters"
        )
