"""Running the fused loss as ``lm_head``'s forward when ``lm_head`` carries FSDP2's hooks.

Layouts a user reaches with ``fully_shard`` give ``lm_head`` FSDP2 hooks of its own: accelerate 1.16's
``fsdp2_prepare_model`` wraps ``[final_norm, lm_head]`` as one group (``reshard_after_forward=False``; on a VLM
whose final norm is not a direct child of the base model, ``lm_head`` alone), and ``fully_shard(model.lm_head)``
makes it a unit of its own. Those hooks unshard the head's weight before its forward, register the autograd
hooks that re-unshard it before its backward and reduce-scatter its gradient after, and reshard it after the
forward when asked. The fused loss reads ``lm_head.weight`` instead of calling ``lm_head``, so it must run
*as* ``lm_head``'s forward for those hooks to fire exactly as for the stock ``lm_head(hidden)`` call:
:func:`call_as_forward` does that. Hooks of any other kind (a user's, a quantizer's) may change what the head
computes, so the fused loss does not stand in for them (:func:`only_fsdp_hooks` tells them apart).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["call_as_forward", "fsdp_output_dtype", "has_forward_hooks", "only_fsdp_hooks"]


def has_forward_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _fsdp_state(module: nn.Module) -> Any | None:
    """The FSDP2 state managing ``module`` (its own unit or a group it belongs to), or ``None``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch built without distributed
        return None
    return module._get_fsdp_state() if isinstance(module, FSDPModule) else None


def only_fsdp_hooks(module: nn.Module) -> bool:
    """Whether every forward hook and pre-hook on ``module`` is FSDP2's own (``fully_shard`` of it, alone or in a
    group): a bound method of its FSDP state, or the group wrapper around one (``functools.wraps``)."""
    state = _fsdp_state(module)
    if state is None:
        return False
    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    return all(_bound_to(hook) is state for hook in hooks)


def _bound_to(hook: Callable[..., Any]) -> Any | None:
    """The object ``hook`` is a bound method of, looking through ``functools.wraps`` wrappers (FSDP2's group
    hooks wrap its bound methods; its methods are themselves wrapped, so ``inspect.unwrap`` would go too far)."""
    seen = 0
    while hook is not None and seen < 16:
        owner = getattr(hook, "__self__", None)
        if owner is not None:
            return owner
        hook, seen = getattr(hook, "__wrapped__", None), seen + 1
    return None


def fsdp_output_dtype(module: nn.Module) -> Any | None:
    """The ``MixedPrecisionPolicy.output_dtype`` FSDP2 casts ``module``'s output to, if any."""
    state = _fsdp_state(module)
    policy = getattr(state, "_mp_policy", None)
    return getattr(policy, "output_dtype", None)


def call_as_forward(module: nn.Module, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` called as ``module``'s forward, through ``module.__call__`` and so through every hook
    on it, in the order torch runs them; ``function`` receives the arguments the pre-hooks return (FSDP2 wraps
    them to reduce-scatter the gradient after the backward).

    The instance attribute ``forward`` shadows the class's for this one call only, as ``nn.Module.__call__``
    looks it up on the instance.
    """
    if "forward" in module.__dict__:
        raise RuntimeError(
            f"{type(module).__qualname__} has a forward bound on the instance; cannot stand in for it"
        )
    module.forward = function
    try:
        return module(*args)
    finally:
        del module.forward
