"""Mitigation state as safetensors: tensors as tensors, each ``_extra_state`` (a plain dict) as JSON
in the file's metadata.

``torch.save(obj.state_dict())`` works too (and loads with ``weights_only=True``); safetensors is
for users whose checkpoints must contain no pickle at all. Works for any ``nn.Module`` whose
``state_dict()`` holds tensors plus JSON-compatible ``_extra_state`` entries: :class:`~mitigate.EWC`
and :class:`~mitigate.CurvatureRegularizer`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from torch import Tensor, nn

__all__ = ["load_state", "save_state"]

_KEY = "mitigate.extra_state"


def save_state(obj: nn.Module, path: str | os.PathLike[str]) -> None:
    """Write ``obj.state_dict()`` to a safetensors file.

    Args:
        obj: the mitigation module (e.g. ``EWC``, ``CurvatureRegularizer``).
        path: the file to write.

    Raises:
        ValueError: an entry is neither a tensor nor JSON-serialisable extra state.
    """
    from safetensors.torch import save_file

    tensors: dict[str, Tensor] = {}
    extra: dict[str, Any] = {}
    for key, value in obj.state_dict().items():
        if isinstance(value, Tensor):
            tensors[key] = value.detach().contiguous()
        else:
            extra[key] = value
    try:
        meta = json.dumps(extra, allow_nan=True)
    except TypeError as err:
        raise ValueError(
            f"{type(obj).__name__}'s extra state is not JSON-serialisable ({err}); save it with "
            "torch.save(obj.state_dict(), path) instead"
        ) from err
    save_file(tensors, os.fspath(path), metadata={_KEY: meta})


def load_state(obj: nn.Module, path: str | os.PathLike[str]) -> None:
    """Load a file written by :func:`save_state` into ``obj`` (``obj.load_state_dict``).

    Args:
        obj: a module of the same kind as the one saved.
        path: the safetensors file.

    Raises:
        ValueError: the file was not written by :func:`save_state` (no mitigate metadata).
        StateMismatchError: raised by ``obj.load_state_dict`` for a state of another kind.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _KEY not in meta:
        raise ValueError(f"{os.fspath(path)!r} has no {_KEY!r} metadata: write it with mitigate.save_state(obj, path)")
    state: dict[str, Any] = dict(load_file(os.fspath(path)))
    state.update(json.loads(meta[_KEY]))
    obj.load_state_dict(state)
