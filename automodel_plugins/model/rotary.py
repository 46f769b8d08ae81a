"""Restore rotary-embedding buffers that meta-device init and ``to_empty()`` leave as garbage.

Rotary modules compute ``inv_freq`` / ``original_inv_freq`` (and the float ``attention_scaling``) in
``__init__`` and register them as non-persistent buffers, so no checkpoint carries them. A model built on
``torch.device("meta")`` and materialized with ``to_empty()`` (FSDP2's usual path) runs with uninitialized
frequencies and trains to a near-random loss without any error. This module finds such modules by what they
are, recomputes their buffers bit-identically to a freshly constructed module, and arms each rotary module to
repair itself again whenever its tensors are re-created (``to_empty``, ``.to``) and at its first forward, so it
also works per pipeline stage and under ``torch.compile`` without a graph break.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from automodel_plugins.errors import RotaryRepairError

__all__ = [
    "find_rotary_modules",
    "install_rotary_repair_hooks",
    "is_rotary_module",
    "recompute_rotary_buffers",
    "repair_rotary",
    "rope_suspects",
]

_INV_FREQ = "inv_freq"
# Python attributes a rotary ``__init__`` derives from the config; copied so the module matches a fresh one.
_STATE_ATTRS = ("max_seq_len_cached", "original_max_seq_len")
_SCALING_SUFFIX = "attention_scaling"
# Constructor parameters that do not describe the rotary table itself.
_SKIPPED_PARAMS = frozenset({"self", "device", "dtype"})
# Set on a rotary module once its buffers have been recomputed; a compiled first forward trusts it.
_REPAIRED = "_automodel_rotary_repaired"


# --- detection --------------------------------------------------------------------------------------------


def _rotary_buffer_names(module: nn.Module) -> list[str]:
    """Non-persistent buffers holding frequencies: ``inv_freq``, ``original_inv_freq``, ``<layer_type>_inv_freq``."""
    return [
        name
        for name, buf in module._buffers.items()
        if buf is not None
        and name in module._non_persistent_buffers_set
        and (name == _INV_FREQ or name.endswith("_" + _INV_FREQ))
    ]


def _on_meta(module: nn.Module) -> bool:
    """Still unmaterialized: there is nothing to write into yet."""
    return any(module._buffers[n].is_meta for n in _rotary_buffer_names(module))  # type: ignore[union-attr]


def _has_rope_init(module: nn.Module) -> bool:
    """A config-driven rotary: ``rope_type``, a ``rope_init_fn`` or a ``compute_*_rope_parameters`` method."""
    if hasattr(module, "rope_type") or callable(getattr(module, "rope_init_fn", None)):
        return True
    return any(
        name.startswith("compute_") and name.endswith("_rope_parameters") and callable(getattr(module, name))
        for name in dir(type(module))
    )


def is_rotary_module(module: nn.Module) -> bool:
    """True for a module with a non-persistent ``inv_freq`` buffer and a way to recompute it.

    Detection looks at what the module holds, not at its path or class name, so renamed classes across
    transformers releases (``PixtralRotaryEmbedding`` -> ``PixtralVisionRotaryEmbedding``) are still found.
    Per-layer-type tables (``sliding_attention_inv_freq``, Gemma 3 style) count as well. A way to recompute is
    a ``config`` with a rope init route, or constructor arguments that can all be read back off the module
    (Qwen3-VL's vision rotary ``(dim, theta)`` in transformers <= 5.16).
    """
    if not _rotary_buffer_names(module):
        return False
    if getattr(module, "config", None) is not None and _has_rope_init(module):
        return True
    try:
        _constructor_kwargs(module)
    except RotaryRepairError:
        return False
    return True


def find_rotary_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` for every rotary module in ``model`` (itself included), in module order."""
    return [(name, module) for name, module in model.named_modules() if is_rotary_module(module)]


# --- recomputation ----------------------------------------------------------------------------------------


def _describe(module: nn.Module, name: str) -> str:
    cls = type(module)
    return f"rotary module {name or '<root>'!r} ({cls.__module__}.{cls.__qualname__})"


def _constructor_kwargs(module: nn.Module, name: str = "") -> dict[str, Any]:
    """Arguments that rebuild ``module``: its ``config``, and any other parameter read off a same-named attribute.

    ``device`` is left to its default (CPU) on purpose: older releases took ``(config, device=None)``.
    A parameter without a default that the module does not expose makes the module unrebuildable.
    """
    try:
        params = inspect.signature(type(module).__init__).parameters.values()
    except (TypeError, ValueError) as exc:
        raise RotaryRepairError(f"{_describe(module, name)}: cannot inspect its __init__: {exc}") from exc
    kwargs: dict[str, Any] = {}
    for param in params:
        if param.name in _SKIPPED_PARAMS or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        value = getattr(module, param.name, inspect.Parameter.empty)
        if value is not inspect.Parameter.empty and value is not None:
            kwargs[param.name] = value
        elif param.default is inspect.Parameter.empty:
            raise RotaryRepairError(
                f"{_describe(module, name)}: cannot recompute its buffers: __init__ needs {param.name!r}, "
                "which the module does not expose"
            )
    return kwargs


@contextlib.contextmanager
def _fp32_cpu_defaults() -> Iterator[None]:
    """Build like a plain ``Model(config)`` would: on CPU, fp32 default dtype, grad mode and inference mode off.

    Callers may be inside ``torch.device("meta")``, a bf16 default dtype or ``inference_mode()``.
    """
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.inference_mode(False), torch.no_grad(), torch.device("cpu"):
            yield
    finally:
        torch.set_default_dtype(previous)


def _fresh_module(module: nn.Module, name: str) -> nn.Module:
    """A new instance of ``type(module)`` built on CPU from the same constructor arguments."""
    kwargs = _constructor_kwargs(module, name)
    try:
        with _fp32_cpu_defaults():
            fresh = type(module)(**kwargs)
    except Exception as exc:
        raise RotaryRepairError(
            f"{_describe(module, name)}: rebuilding it from {sorted(kwargs)} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return fresh


def _reference_buffers(module: nn.Module, fresh: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The fresh module's values for each of ``module``'s frequency buffers; all must exist, be real fp32 and
    finite (NaN or inf frequencies come from the config, and would run silently wrong)."""
    reference: dict[str, torch.Tensor] = {}
    for buffer_name in _rotary_buffer_names(module):
        value = fresh._buffers.get(buffer_name)
        if value is None or value.is_meta or not value.is_floating_point():
            raise RotaryRepairError(
                f"{_describe(module, name)}: a freshly built instance has no usable {buffer_name!r} buffer"
            )
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise RotaryRepairError(
                f"{_describe(module, name)}: its config gives {bad} NaN/inf value(s) of {value.numel()} in "
                f"{buffer_name!r}; {rope_suspects(getattr(module, 'config', None))}"
            )
        reference[buffer_name] = value.to(torch.float32)
    for attr, scaling in vars(fresh).items():
        if attr.endswith(_SCALING_SUFFIX) and isinstance(scaling, float) and not math.isfinite(scaling):
            raise RotaryRepairError(
                f"{_describe(module, name)}: its config gives {attr} = {scaling}; "
                f"{rope_suspects(getattr(module, 'config', None))}"
            )
    return reference


def rope_suspects(config: Any) -> str:
    """The rotary fields of ``config`` that can produce NaN/inf frequencies (zero, negative or non-finite
    numbers), named by their path in the config, else all of its rotary parameters."""
    if config is None:
        return "the module has no config to blame"
    owner = type(config).__name__
    tables: dict[str, Any] = {}
    parameters = getattr(config, "rope_parameters", None)
    if isinstance(parameters, dict):
        nested = parameters and all(isinstance(v, dict) for v in parameters.values())
        tables = (
            {f"rope_parameters.{k}": v for k, v in parameters.items()}
            if nested
            else {"rope_parameters": parameters}
        )
    theta = getattr(config, "rope_theta", None)
    if theta is not None:
        tables.setdefault("", {})["rope_theta"] = theta
    suspects = [
        f"{where + '.' if where else ''}{key} = {value!r}"
        for where, table in tables.items()
        for key, value in table.items()
        if isinstance(value, (int, float))
        and not isinstance(value, bool)
        and (not math.isfinite(value) or value <= 0)
    ]
    if suspects:
        return f"check {', '.join(suspects)} in its config ({owner})"
    return f"check the rotary parameters of its config ({owner}): {tables or 'none found'}"


def _write_buffer(module: nn.Module, buffer_name: str, value: torch.Tensor) -> None:
    """Copy into the live buffer (keeps its identity); replace it when its dtype or shape no longer fits."""
    current = module._buffers[buffer_name]
    if (
        current is not None
        and current.dtype == torch.float32
        and current.shape == value.shape
        and not current.is_inference()  # e.g. ``.to(device)`` under inference_mode: not writable outside it
    ):
        current.copy_(value)
    else:
        device = value.device if current is None else current.device
        module._buffers[buffer_name] = value.to(device=device, copy=True)


def _copy_state_attrs(module: nn.Module, fresh: nn.Module) -> None:
    """``attention_scaling`` (and ``<layer_type>_attention_scaling``) plus the cached sequence lengths."""
    for attr, value in vars(fresh).items():
        if attr in _STATE_ATTRS or attr.endswith(_SCALING_SUFFIX):
            setattr(module, attr, value)


def recompute_rotary_buffers(module: nn.Module, *, name: str = "") -> None:
    """Make ``module``'s frequency buffers and ``attention_scaling`` bit-identical to a fresh instance's, in fp32.

    Values are computed on CPU in fp32 (as a plain ``Model(config)`` does) and then copied into the
    buffers on their current device. Hooks, the ``training`` flag and the buffer tensors themselves are kept,
    except that a buffer cast away from fp32 (``model.to(torch.bfloat16)``) is replaced by an fp32 one.
    Raises ``RotaryRepairError`` when the module cannot be rebuilt or its buffers are still on ``meta``.
    """
    names = _rotary_buffer_names(module)
    if not names:
        raise RotaryRepairError(
            f"{_describe(module, name)}: has no non-persistent inv_freq buffer to recompute"
        )
    if _on_meta(module):
        raise RotaryRepairError(
            f"{_describe(module, name)}: buffers are still on the meta device; materialize the model "
            "(to_empty) first, or use install_rotary_repair_hooks"
        )
    fresh = _fresh_module(module, name)
    reference = _reference_buffers(module, fresh, name)
    with torch.inference_mode(False), torch.no_grad():
        for buffer_name, value in reference.items():
            _write_buffer(module, buffer_name, value)
    _copy_state_attrs(module, fresh)
    setattr(module, _REPAIRED, True)


# --- deferred repair --------------------------------------------------------------------------------------


def _materialized(module: nn.Module) -> bool:
    """Real storage to write into: neither ``meta`` nor a fake tensor (a tracer's ``_apply``)."""
    from torch._subclasses.fake_tensor import FakeTensor

    buffers = [module._buffers[n] for n in _rotary_buffer_names(module)]
    return not any(b.is_meta or isinstance(b, FakeTensor) for b in buffers)  # type: ignore[union-attr]


class _RepairAfterApply:
    """A rotary module's own ``_apply``: the class's (``to_empty``, ``.to``, ``.cuda``, dtype casts all go
    through it), then a recompute of the buffers it re-created.

    ``to_empty`` is what leaves garbage (FSDP2's materialization, or a second one after loading), so repairing
    there, outside any forward, keeps the repair out of what ``torch.compile`` traces. A callable object held
    in the module's ``__dict__`` (``nn.Module._apply`` calls ``child._apply(fn)``, so the instance attribute
    is what runs); it holds the module so that ``deepcopy`` and pickling carry it to the copy.
    """

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module = module
        self.name = name

    def __call__(self, fn: Any, recurse: bool = True) -> nn.Module:
        result = type(self.module)._apply(self.module, fn, recurse)
        if _materialized(self.module):
            recompute_rotary_buffers(self.module, name=self.name)
        return result


class _RotaryRepairHook:
    """One-shot forward pre-hook: repair the module on its first real call, then unregister itself.

    A callable object (not a closure) so that it can find and remove itself from the module it is called on,
    even on a ``deepcopy`` of the model, and so that hooked models still pickle. Under ``torch.compile`` it
    does nothing once the module has been recomputed (at load, or by ``to_empty`` / ``.to``): dynamo then
    traces a plain attribute check instead of the recompute and the hook removal, which break the graph.
    """

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if torch.compiler.is_compiling() and getattr(module, _REPAIRED, False):
            return
        if _on_meta(module):
            return  # a shape-only pass on meta: stay armed for the forward after to_empty()
        recompute_rotary_buffers(module, name=self.name)
        for hook_id, hook in list(module._forward_pre_hooks.items()):
            if hook is self:
                del module._forward_pre_hooks[hook_id]


def _has_repair_hook(module: nn.Module) -> bool:
    return any(isinstance(hook, _RotaryRepairHook) for hook in module._forward_pre_hooks.values())


def install_rotary_repair_hooks(model: nn.Module) -> int:
    """Arm every rotary module to repair itself: after each ``_apply`` that re-creates its tensors
    (``to_empty``, ``.to``, ``.cuda``, casts), and with a one-shot pre-hook at its first forward.

    The hook sits on the rotary module itself, so it fires when only a sub-module runs (a pipeline stage, a
    direct ``language_model(inputs_embeds=...)`` call) and not just through the outer forward. It runs before
    the user's pre-hooks, leaves them in place and raises ``RotaryRepairError`` if recomputation fails.
    The ``_apply`` repair makes a model materialized with ``to_empty`` right before any forward, eager or
    compiled; the hook covers buffers materialized some other way (assigned into ``_buffers``).
    Idempotent: a module already armed is not armed twice. Returns the number of rotary modules armed.
    """
    hooked = 0
    for name, module in find_rotary_modules(model):
        if not _has_repair_hook(module):
            module.register_forward_pre_hook(_RotaryRepairHook(name), prepend=True)
        if not isinstance(vars(module).get("_apply"), _RepairAfterApply):
            module._apply = _RepairAfterApply(module, name)  # type: ignore[method-assign]
        if not hasattr(module, _REPAIRED):
            setattr(module, _REPAIRED, False)
        hooked += 1
    return hooked


def repair_rotary(model: nn.Module) -> int:
    """Recompute now every rotary module whose buffers are real, and arm all of them (see
    :func:`install_rotary_repair_hooks`).

    The arming covers modules still on ``meta`` and a later ``to_empty()`` (e.g. FSDP2 materialization after
    loading). Returns the number of rotary modules found.
    """
    found = find_rotary_modules(model)
    for name, module in found:
        if not _on_meta(module):
            recompute_rotary_buffers(module, name=name)
    install_rotary_repair_hooks(model)
    return len(found)
