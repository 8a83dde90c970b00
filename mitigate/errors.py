"""Exceptions raised by mitigate. All are ``ValueError`` subclasses so existing handlers keep working."""

from __future__ import annotations


class UnsupportedArchitectureError(ValueError):
    """The model's architecture is not in the architecture table and generic discovery failed.

    The message names the ``model_type`` and the override arguments of
    :func:`mitigate.model_map` (``blocks=``, ``q=``, ``k=``, ``v=``, ``o=``, ``qkv=``,
    ``embeddings=``) that describe the model by hand.
    """


class StateMismatchError(ValueError):
    """Stored state (memory, basis, Fisher, anchors, subspaces) no longer matches the model:
    parameters were added, removed or reshaped since it was recorded. The message names them."""


class AttentionKernelError(RuntimeError):
    """The model's attention kernel has no double-backward / forward-mode AD (SDPA or flash on
    CPU), so Hessian-vector products cannot be taken. Load the model with
    ``attn_implementation="eager"`` (or call ``model.set_attn_implementation("eager")``)."""
