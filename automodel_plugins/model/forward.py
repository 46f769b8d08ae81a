"""The shared fused-loss forward: a stock causal-LM forward whose loss never materializes ``[tokens, vocab]``.

A plugin's ``forward_override`` hook returns ``fused_loss_forward(type(model).forward, vocab_size=...)``; the
host binds the result on the stock instance (``types.MethodType``), so the class, ``save_pretrained``, PEFT
and ``generate`` are untouched. The returned function runs the stock base model (``self.base_model``, which
holds the vision tower too for VLMs) with the caller's arguments, then:

* with ``labels``: the loss comes from the fused linear cross-entropy over the final hidden states of every
  position and ``lm_head.weight`` (+ bias), with transformers' ``ForCausalLMLoss`` semantics (labels shifted
  inside unless ``shift_labels`` is given; ``num_items_in_batch`` divides the sum, else mean over labels);
* logits come from ``lm_head`` on the positions ``logits_to_keep`` keeps, exactly as stock, unless the
  call is labelled and ``skip_logits`` is on (the load option, or the per-call ``skip_logits=`` keyword):
  then ``logits`` is ``None`` and ``[B, S, V]`` is never allocated;
* ``hidden_states`` carries the final hidden state ``[B, S, H]`` (the input of ``lm_head``) unless the base
  model returned its own per-layer tuple (``output_hidden_states``), which is kept as is;
* a mixture-of-experts model (its stock forward takes ``output_router_logits``) gets the stock load-balancing
  loss: when the call or the text config asks for router logits, ``aux_loss`` is the stock module's
  ``load_balancing_loss_func`` of them, and a labelled call's loss adds ``router_aux_loss_coef * aux_loss``.

The fused loss reads ``lm_head.weight`` directly, so it is only right when ``lm_head`` is what that weight
says: a plain ``nn.Linear`` with no forward hooks but FSDP2's. When ``lm_head`` carries FSDP2's hooks (its own
unit, or a group with the final norm as accelerate wraps it), the loss runs as ``lm_head``'s forward, through
those hooks (``model/fsdp_head.py``): FSDP2 unshards the weight, re-unshards it for the backward and
reduce-scatters its gradient as for the stock call. A labelled call on any other head (a PEFT LoRA on
``lm_head``, a quantized or wrapped Linear, a user's hook) runs the stock forward instead, with a warning
once per model: the loss stays right and only the memory saving is lost.

See ``docs/forward-override.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import typing
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from automodel_plugins.model.fsdp_head import (
    call_as_forward,
    fsdp_output_dtype,
    has_forward_hooks,
    only_fsdp_hooks,
)
from automodel_plugins.model.placement import is_dtensor
from automodel_plugins.ops.linear_cross_entropy import linear_cross_entropy

__all__ = [
    "SKIP_LOGITS_OPTION",
    "causal_lm_fused_loss",
    "fused_loss_forward",
    "router_aux_loss_function",
    "slice_positions",
    "text_vocab_size",
    "unfusable_head_reason",
    "vlm_fused_loss_forward",
]

SKIP_LOGITS_OPTION = "skip_logits"
# Arguments of the stock forward that feed the head and the loss only; the base model never sees them.
_HEAD_ARGS = ("labels", "logits_to_keep", "shift_labels", "num_items_in_batch")
_COMPOSED_FIELDS = ("loss", "logits", "hidden_states", "aux_loss")

VocabSize = int | Callable[[Any], int]


def fused_loss_forward(
    stock_forward: Callable[..., Any],
    *,
    vocab_size: VocabSize,
    ignore_index: int = -100,
    memory_budget_bytes: int | None = None,
    output_class: type | None = None,
) -> Callable[..., Any]:
    """Build ``forward(self, *args, **kwargs)`` to bind on an instance whose class forward is ``stock_forward``.

    ``vocab_size``: the head's vocabulary size, or a function of the model's config returning it (checked
    against ``lm_head.weight`` at call time, so a tensor-parallel-sharded head fails loudly instead of
    computing a wrong loss). ``memory_budget_bytes``: the fused op's budget for one block's working
    set (its logit tiles and the hidden-state rows they read and write; for a bf16 head twice
    :func:`~automodel_plugins.ops.default_memory_budget` when ``None``, else that default). ``output_class``: the output dataclass, when the stock return annotation does not
    name exactly one ``ModelOutput`` subclass. The result wraps ``stock_forward`` (``functools.wraps``) so
    ``inspect.signature`` reports the stock signature, which ``generate`` reads.
    """
    function = getattr(stock_forward, "__func__", stock_forward)  # a bound method's signature lacks self
    signature = inspect.signature(function)
    resolved_output = output_class or stock_output_class(function)
    output_fields = frozenset(field.name for field in dataclasses.fields(resolved_output))
    router_loss = router_aux_loss_function(function)

    @functools.wraps(function)
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        skip_logits = kwargs.pop(SKIP_LOGITS_OPTION, None)
        stock_kwargs = dict(kwargs)
        return_dict = _return_dict(self, kwargs)
        call = _bind(signature, self, args, kwargs)
        head = {name: call.pop(name, None) for name in _HEAD_ARGS}
        if head["labels"] is not None:
            _check_loss_function(self)  # before the base model's forward, which it would waste
            unfusable = unfusable_head_reason(self.lm_head)
            if unfusable is not None:
                _warn_stock_loss_once(self, unfusable)
                return function(self, *args, **stock_kwargs)
        outputs = self.base_model(**call, return_dict=True)
        hidden = outputs[0]
        loss = None
        if head["labels"] is not None:

            def head_loss(final_hidden: torch.Tensor) -> torch.Tensor:
                return causal_lm_fused_loss(
                    final_hidden,
                    _lm_head(self, _vocab_size(vocab_size, self.config)),
                    head["labels"],
                    shift_labels=head["shift_labels"],
                    num_items_in_batch=head["num_items_in_batch"],
                    ignore_index=ignore_index,
                    memory_budget_bytes=memory_budget_bytes,
                )

            # FSDP2's hooks on lm_head (the only ones left here) must fire around the read of its weight.
            has_hooks = has_forward_hooks(self.lm_head)
            loss = call_as_forward(self.lm_head, head_loss, hidden) if has_hooks else head_loss(hidden)
        aux_loss = None
        if router_loss is not None and _wants_router_logits(self.config, call):
            aux_loss, coefficient = router_loss(
                self.config, outputs.router_logits, call.get("attention_mask")
            )
            if loss is not None:
                loss = loss + coefficient * aux_loss.to(loss.device)
        logits = None
        if loss is None or not _skip_logits(self, skip_logits):
            keep = 0 if head["logits_to_keep"] is None else head["logits_to_keep"]
            logits = self.lm_head(slice_positions(hidden, keep))
        output = _compose_output(
            resolved_output,
            output_fields,
            outputs,
            loss=loss,
            logits=logits,
            final_hidden=hidden,
            aux_loss=aux_loss,
        )
        return output if return_dict else output.to_tuple()

    return forward


RouterLoss = Callable[[Any, Any, Any], tuple[torch.Tensor, float]]


def router_aux_loss_function(stock_forward: Callable[..., Any]) -> RouterLoss | None:
    """For a mixture-of-experts forward (it takes ``output_router_logits``): ``(config, router_logits,
    attention_mask) -> (aux_loss, router_aux_loss_coef)`` with the stock module's own
    ``load_balancing_loss_func`` and the text config's expert counts; ``None`` for any other forward."""
    function = inspect.unwrap(stock_forward)
    if "output_router_logits" not in inspect.signature(function).parameters:
        return None
    balance = getattr(sys.modules.get(function.__module__), "load_balancing_loss_func", None)
    if balance is None:
        raise TypeError(
            f"{function.__qualname__} takes output_router_logits but its module has no load_balancing_loss_func: "
            "the fused-loss forward cannot add the router's auxiliary loss the stock forward adds"
        )

    def router_loss(config: Any, router_logits: Any, attention_mask: Any) -> tuple[torch.Tensor, float]:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None)
        aux = balance(router_logits, experts, text.num_experts_per_tok, attention_mask)
        return aux, text.router_aux_loss_coef

    return router_loss


def _wants_router_logits(config: Any, call: Mapping[str, Any]) -> bool:
    """The stock rule: the call's ``output_router_logits``, else the text config's."""
    asked = call.get("output_router_logits")
    if asked is not None:
        return bool(asked)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "output_router_logits", False))


def text_vocab_size(config: Any) -> int:
    """The output vocabulary: on ``config.text_config`` for a VLM, on the config itself otherwise."""
    return getattr(config, "text_config", config).vocab_size


def vlm_fused_loss_forward(model: nn.Module) -> Callable[..., Any]:
    """:func:`fused_loss_forward` over ``model``'s stock class, the vocabulary read from ``text_config``
    (or the config itself, for a text-only model): the ``forward_override`` of a VLM plugin in one call."""
    return fused_loss_forward(type(model).forward, vocab_size=text_vocab_size)


def causal_lm_fused_loss(
    hidden: torch.Tensor,
    head: nn.Linear,
    labels: torch.Tensor,
    *,
    shift_labels: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
    memory_budget_bytes: int | None = None,
) -> torch.Tensor:
    """transformers' ``ForCausalLMLoss`` on ``head(hidden)``, computed by the fused op (an unrounded fp32 loss,
    like stock, whatever the model's dtype).

    ``labels`` are aligned with the inputs: position ``t`` predicts ``labels[t + 1]`` (the last position gets
    ``ignore_index``). ``shift_labels``, already aligned with the predictions, replaces that shift (context
    parallelism hands those in). ``num_items_in_batch`` (the label count over a whole gradient-accumulation
    batch) divides the summed loss; otherwise it is the mean over non-ignored labels (0 when all are ignored,
    where stock gives NaN). The weight is read now, inside the forward (``lm_head``'s, under its own FSDP2
    hooks), where FSDP2 has it unsharded.
    """
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.to(hidden.device)
    if num_items_in_batch is None:
        reduction, normalizer = "mean", None
    else:
        reduction = "sum"
        normalizer = (
            num_items_in_batch.to(hidden.device)
            if torch.is_tensor(num_items_in_batch)
            else num_items_in_batch
        )
    loss = linear_cross_entropy(
        hidden,
        head.weight,
        target,
        bias=head.bias,
        ignore_index=ignore_index,
        reduction=reduction,
        normalizer=normalizer,
        memory_budget_bytes=memory_budget_bytes,
        loss_dtype=torch.float32,
    )
    return loss


def unfusable_head_reason(head: nn.Module) -> str | None:
    """Why the fused loss cannot stand in for ``head(hidden)``, or ``None`` when it can.

    It can when ``head`` computes exactly ``F.linear(x, head.weight, head.bias)``: an ``nn.Linear`` (or a
    subclass keeping ``nn.Linear.forward``, such as a parametrized one) with no forward hooks or pre-hooks but
    FSDP2's (which only gather the weight, unless a mixed-precision ``output_dtype`` would round the loss).
    """
    if not isinstance(head, nn.Linear):
        return f"lm_head is a {type(head).__module__}.{type(head).__qualname__}, not an nn.Linear"
    if type(head).forward is not nn.Linear.forward:
        return f"lm_head's class {type(head).__qualname__} overrides nn.Linear.forward"
    if "forward" in head.__dict__:  # accelerate's device-map hooks, a user's wrapper
        return "lm_head's forward is replaced on the instance, which the fused loss would skip"
    if has_forward_hooks(head) and not only_fsdp_hooks(head):
        return "lm_head has forward hooks, which the fused loss would skip"
    output_dtype = fsdp_output_dtype(head)
    if output_dtype is not None:
        return f"lm_head's FSDP2 MixedPrecisionPolicy casts its output to {output_dtype}, which would round the loss"
    return None


def slice_positions(hidden: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The positions of ``[B, S, H]`` that stock keeps for logits (transformers' ``slice_logits_to_keep``).

    An int ``N`` keeps the last ``N`` positions (0 keeps all); a 1-D tensor keeps those positions in every
    row; a 2-D int tensor ``[B, K]`` keeps per-row positions; a 2-D bool mask keeps its ``True`` positions,
    flattened to ``[N_true, H]``. Kept here rather than imported so the semantics hold across transformers 5.x.
    """
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.ndim == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden[logits_to_keep]
        return torch.take_along_dim(hidden, logits_to_keep[..., None], dim=1)
    if isinstance(logits_to_keep, int):
        return hidden[:, slice(-logits_to_keep, None), :]
    return hidden[:, logits_to_keep, :]


def stock_output_class(stock_forward: Callable[..., Any]) -> type:
    """The single ``ModelOutput`` subclass named by the stock forward's return annotation (``tuple | X``)."""
    from transformers.utils import ModelOutput

    unwrapped = inspect.unwrap(stock_forward)
    annotation = inspect.signature(unwrapped).return_annotation
    if isinstance(annotation, str):
        annotation = eval(annotation, unwrapped.__globals__)  # a postponed annotation of the stock module
    members = typing.get_args(annotation) or (annotation,)
    classes = [t for t in members if isinstance(t, type) and issubclass(t, ModelOutput)]
    if len(classes) != 1:
        raise TypeError(
            f"cannot tell the output class of {unwrapped.__qualname__} from its return annotation "
            f"{annotation!r}; pass output_class= to fused_loss_forward"
        )
    return classes[0]


# --- helpers ----------------------------------------------------------------------------------------------


def _return_dict(model: nn.Module, kwargs: dict[str, Any]) -> bool:
    """``can_return_tuple``'s rule: an explicit ``return_dict`` wins over ``config.return_dict`` (default True)."""
    default = getattr(getattr(model, "config", None), "return_dict", True)
    passed = kwargs.pop("return_dict", None)
    chosen = default if passed is None else passed
    return True if chosen is None else bool(chosen)


def _bind(
    signature: inspect.Signature, model: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> dict[str, Any]:
    """Name every argument the caller passed (positional ones by the stock signature), ``**kwargs`` flattened.

    Arguments left at their default are not passed on: the base model applies the same defaults (and its own
    config-driven ones, such as ``use_cache``).
    """
    bound = signature.bind(model, *args, **kwargs)
    call: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:  # the first is self
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            call.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise TypeError(f"forward takes no extra positional arguments, got {len(value)}")
        else:
            call[name] = value
    return call


def _vocab_size(vocab_size: VocabSize, config: Any) -> int:
    """The builder's vocabulary size, resolving a function of the config at call time."""
    return int(vocab_size(config) if callable(vocab_size) else vocab_size)


def _lm_head(model: nn.Module, vocab_size: int) -> nn.Linear:
    """``model.lm_head``, checked to hold the full ``[V, H]`` head as a plain tensor."""
    head = model.lm_head
    weight = head.weight
    if is_dtensor(weight):
        raise RuntimeError(
            "lm_head.weight is a DTensor at forward time (tensor-parallel): the fused loss needs the full head; "
            "replicate lm_head, or shard it with FSDP2 (fully_shard), whose hooks gather it for the forward"
        )
    if weight.dim() != 2 or weight.shape[0] != vocab_size:
        raise RuntimeError(
            f"lm_head.weight has shape {tuple(weight.shape)}; the fused loss needs the full [vocab={vocab_size}, "
            "hidden] head"
        )
    return head


def _warn_stock_loss_once(model: nn.Module, reason: str) -> None:
    """One warning per model and reason: the loss falls back to stock, with its ``[B, S, V]`` logits."""
    warned: set[str] = model.__dict__.setdefault("_automodel_stock_loss_warned", set())
    if reason in warned:
        return
    warned.add(reason)
    warnings.warn(
        f"{reason}: this labelled call computes the loss with the stock forward (full logits) instead of the "
        "fused linear cross-entropy, so that the loss matches what lm_head computes",
        UserWarning,
        stacklevel=3,
    )


def _check_loss_function(model: nn.Module) -> None:
    """Refuse a user-set ``model.loss_function``: this forward would silently not call it."""
    if getattr(model, "_loss_function", None) is not None:
        raise RuntimeError(
            "model.loss_function was replaced, but this forward computes the causal-LM loss itself with the fused "
            "linear cross-entropy; delete the replacement or load the model without the forward override"
        )


def _skip_logits(model: nn.Module, per_call: bool | None) -> bool:
    """The per-call ``skip_logits=`` if given, else the load option on ``model.automodel_composition``."""
    if per_call is not None:
        return bool(per_call)
    options: Mapping[str, Any] = getattr(getattr(model, "automodel_composition", None), "options", None) or {}
    return bool(options.get(SKIP_LOGITS_OPTION, False))


def _compose_output(
    output_class: type,
    names: frozenset[str],
    outputs: Any,
    *,
    loss: torch.Tensor | None,
    logits: torch.Tensor | None,
    final_hidden: torch.Tensor,
    aux_loss: torch.Tensor | None = None,
) -> Any:
    """The stock output: loss and logits (and a MoE's ``aux_loss``), every base-model field the class shares,
    and the hidden states. ``names`` are the output class's fields, read once when the forward is built;
    the base model's fields are its set keys (a ``ModelOutput`` keeps only those not ``None``), since
    ``dataclasses.fields`` inside the call would break a ``torch.compile`` graph."""
    values: dict[str, Any] = {"loss": loss, "logits": logits, "aux_loss": aux_loss}
    for name in outputs.keys():  # noqa: SIM118 - a ModelOutput, not a plain dict
        if name in names and name not in _COMPOSED_FIELDS:
            values[name] = outputs[name]
    if "hidden_states" in names:
        layers = getattr(outputs, "hidden_states", None)
        values["hidden_states"] = layers if layers is not None else final_hidden
    return output_class(**{k: v for k, v in values.items() if k in names})
