"""The common base of mitigate's optimizer wrappers.

A wrapper *is* a :class:`torch.optim.Optimizer`: it shares ``param_groups``, ``state`` and
``defaults`` with the optimizer it wraps (so LR schedulers, GradScaler and Trainer see one
optimizer), rewrites ``.grad`` in place inside :meth:`step`, then calls the base step.
``state_dict()`` is the base optimizer's state dict plus one ``"mitigate"`` entry holding the
wrapper's own state (tensors and plain Python only, loadable with ``weights_only=True``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Callable

import torch
from torch.optim import Optimizer

logger = logging.getLogger(__name__)

_WRAPPER_KEY = "mitigate"


def finite_sq_norm(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Σₜ ‖t‖², finite)`` of a list of gradients, as device tensors (no host sync).

    The wrappers' non-finite guard: when ``finite`` is ``False`` (a NaN/inf element, or a norm
    that overflows, as in fp16), a wrapper passes the gradients to the base optimizer untouched
    (GradScaler then skips the step) and counts the step, instead of spreading the NaN.

    Args:
        tensors: gradients (any dtypes, one device); may be empty.

    Returns:
        The float32-or-wider squared norm (0 for an empty list) and the bool scalar ``isfinite``.
    """
    tensors = list(tensors)
    if not tensors:
        zero = torch.zeros(())
        return zero, torch.ones((), dtype=torch.bool)
    norms = torch._foreach_norm(tensors)
    dtype = torch.promote_types(norms[0].dtype, torch.float32)
    sq = torch.stack([n.to(dtype) for n in norms]).square().sum()
    return sq, torch.isfinite(sq)


class OptimizerWrapper(Optimizer):
    """Base class: wrap ``optimizer`` and transform gradients before its step.

    Subclasses implement :meth:`transform_gradients` (in place on ``p.grad``, under ``no_grad``)
    and, when they keep state, :meth:`wrapper_state_dict` / :meth:`load_wrapper_state_dict`.

    Args:
        optimizer: any ``torch.optim.Optimizer`` instance (may itself be a wrapper).

    Raises:
        TypeError: when ``optimizer`` is not a ``torch.optim.Optimizer``.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"expected a torch.optim.Optimizer instance, got {type(optimizer).__name__}; "
                "create the optimizer first, e.g. wrapper(torch.optim.AdamW(model.parameters()))"
            )
        self.optimizer = optimizer
        self.defaults = optimizer.defaults
        # Same hook bookkeeping torch.optim.Optimizer.__init__ sets up (we do not re-register params).
        self._optimizer_step_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: dict[int, Callable] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: dict[int, Callable] = OrderedDict()
        # Wrap type(self).step like Optimizer.__init__ does, so hooks registered with
        # register_step_pre_hook / register_step_post_hook on the wrapper fire.
        self._patch_step_function()
        self._warned_capturable_if_run_uncaptured = True

    # ------------------------------------------------------------------ shared with the base
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.optimizer!r})"

    # ------------------------------------------------------------------ the step
    def params_with_grad(self) -> list[torch.nn.Parameter]:
        """Parameters of all groups that currently hold a gradient, in group order."""
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    def transform_gradients(self) -> None:
        """Rewrite ``p.grad`` in place before the base step. Default: nothing."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """Transform the gradients, then take the base optimizer's step.

        Args:
            closure: optional; re-evaluates the model and returns the loss. Run once, under
                ``enable_grad``, *before* the transformation (the base step receives no closure,
                so the gradients are never recomputed after being projected).

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.transform_gradients()
        self.optimizer.step()
        return loss

    # ------------------------------------------------------------------ state
    def wrapper_state_dict(self) -> dict[str, Any]:
        """The wrapper's own state (tensors and plain Python only). Default: empty."""
        return {}

    def validate_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        """Raise if :meth:`load_wrapper_state_dict` would refuse ``state``; change nothing.

        Called by :meth:`load_state_dict` for every wrapper of the chain *before* anything is
        loaded, so a refused state dict leaves the optimizer untouched. Default: accept.
        """

    def load_wrapper_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`wrapper_state_dict` returned (already validated)."""

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """Base optimizer state dict with the wrapper state under the ``"mitigate"`` key."""
        sd = self.optimizer.state_dict()
        inner = sd.pop(_WRAPPER_KEY, None)  # the base is itself a wrapper: nest its entry
        sd[_WRAPPER_KEY] = {
            "class": type(self).__name__,
            "state": self.wrapper_state_dict(),
            "inner": inner,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Load a dict produced by :meth:`state_dict` (base and wrapper state).

        Everything is validated first — the wrapper class and state of every wrapper in the
        chain, and the base optimizer's parameter groups — so a refused dict changes nothing.

        Raises:
            ValueError: when the dict was saved by a different wrapper class, or its parameter
                groups do not match the optimizer's (as ``torch.optim.Optimizer`` words it).
            StateMismatchError: a wrapper's saved state does not fit the model.
        """
        self._validate_state_dict(state_dict)
        state_dict = dict(state_dict)
        mine = state_dict.pop(_WRAPPER_KEY, None)
        if mine is not None and mine.get("inner") is not None:
            state_dict[_WRAPPER_KEY] = mine["inner"]
        self.optimizer.load_state_dict(state_dict)
        if mine is None:
            logger.warning(
                "%s.load_state_dict: no %r entry (a plain optimizer state dict); the wrapper "
                "keeps its current state", type(self).__name__, _WRAPPER_KEY
            )
            return
        self.load_wrapper_state_dict(mine["state"])

    def _validate_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Every check :meth:`load_state_dict` makes, for this wrapper and the ones inside it."""
        mine = state_dict.get(_WRAPPER_KEY)
        if mine is not None:
            if not isinstance(mine, dict) or mine.get("class") != type(self).__name__:
                saved = mine.get("class") if isinstance(mine, dict) else mine
                raise ValueError(
                    f"state dict was saved by {saved!r}, not {type(self).__name__!r}; "
                    "load it into the same kind of wrapper"
                )
            self.validate_wrapper_state_dict(mine["state"])
        inner = dict(state_dict)
        inner.pop(_WRAPPER_KEY, None)
        if mine is not None and mine.get("inner") is not None:
            inner[_WRAPPER_KEY] = mine["inner"]
        if isinstance(self.optimizer, OptimizerWrapper):
            self.optimizer._validate_state_dict(inner)
            return
        groups, saved_groups = self.optimizer.param_groups, inner.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(groups) or any(
            len(g["params"]) != len(s.get("params", ())) for g, s in zip(groups, saved_groups)
        ):
            sizes = [len(g["params"]) for g in groups]
            saved = None if not isinstance(saved_groups, list) else [len(s.get("params", ())) for s in saved_groups]
            raise ValueError(
                f"loaded state dict has parameter groups of sizes {saved}, the optimizer {sizes}; "
                "load a state saved by an optimizer over the same parameters"
            )
