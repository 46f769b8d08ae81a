"""The four hooks a plugin may implement. Each is a documented spec; plugins implement any subset.

Order of a load (see ``automodel_plugins/pipeline/load/load.py``)::

    config ─> claim_config (every plugin) ─> stock class on meta ─> state_dict_adapter (winner)
           ─> stream tensors through the adapter ─> post_materialize (winner) ─> tie weights
           ─> forward_override (winner) ─> the stock model, returned

Only ``claim_config`` is asked of every plugin. The other three are asked of the plugin whose claim won, and
of no other, so two plugins never half-compose one model. An unexpected exception raised inside any hook
reaches the caller as :class:`~automodel_plugins.errors.PluginError` naming the plugin and the hook; the host's
own typed errors raised by its helpers (``CheckpointError``, ``ScaleError``, ``UnsupportedQuantizationError``,
...) pass through as they are, since they already name the file, key or field at fault.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from automodel_plugins.registry.markers import hookspec

if TYPE_CHECKING:
    from collections.abc import Callable

    from transformers import PretrainedConfig, PreTrainedModel

    from automodel_plugins.adapters import StateDictAdapter
    from automodel_plugins.checkpoint import Checkpoint
    from automodel_plugins.registry.claims import Claim, Decline


@hookspec
def claim_config(config: PretrainedConfig) -> Claim | Decline | None:
    """Say whether this plugin serves ``config``.

    Called on every loaded plugin. Return a :class:`~automodel_plugins.Claim` (a reason, and a priority that
    defaults to 0), a :class:`~automodel_plugins.Decline` (a reason it is not served, shown by ``list
    --config`` and in the error of a load that requires a plugin), or ``None`` (a decline without a reason,
    for configs far from this plugin's family). The highest priority wins; two claims at the same highest
    priority raise :class:`~automodel_plugins.errors.AmbiguousClaimError`. Must be cheap and side-effect
    free: ``list --config`` asks it of every installed plugin.

    A plugin that raises here is reported with the exception (``list --config``) or makes the load fail;
    it is never taken as a silent "no".
    """


@hookspec
def state_dict_adapter(config: PretrainedConfig, checkpoint: Checkpoint) -> StateDictAdapter | None:
    """Return the adapter that says where each model tensor lives in this checkpoint and how it is stored.

    For each tensor of the model (a ``state_dict`` name of the stock class) the host asks the adapter's
    ``from_hf`` for its :class:`~automodel_plugins.adapters.TensorSource`: the data key, an FP8 scale key and
    block size, and keys consumed but dropped (static activation scales); or, for a tensor assembled from
    several checkpoint tensors (a MoE layer's fused experts from one FP8 tensor per expert) or from a transposed
    one, its :class:`~automodel_plugins.adapters.Piece` list, each piece a key, the box of the tensor it fills
    and its own scale (``TensorSource.assembled``; ``Fp8StateDictAdapter.assembled`` finds the scales). The host
    then streams one tensor (or one rank's slice of it, of each piece only the part it overlaps) at a time,
    fails on checkpoint keys no model tensor accounted for, and runs the same mapping backwards to save.
    ``to_hf`` maps a model name to the key it has in this checkpoint's layout. ``checkpoint`` exposes keys,
    dtypes and shapes without reading tensor data, so the adapter can detect the on-disk layout.

    Return ``None`` (or leave the hook out) for the host's default,
    :func:`~automodel_plugins.adapters.fp8_adapter_for`: checkpoint keys equal to the model's names, FP8
    weights scaled as the config's ``quantization_config`` says (per-tensor or block scales,
    ``modules_to_not_convert``).
    """


@hookspec
def post_materialize(model: PreTrainedModel, config: PretrainedConfig) -> None:
    """Fix the model up once its tensors are real: recompute non-persistent buffers, re-tie weights.

    Called after the weights are loaded (``from_pretrained``, ``load_weights``) and once by ``build_model``
    while the model is still on the meta device, where a plugin installs fix-ups that run later (for example
    a one-shot forward pre-hook on each rotary module).
    """


@hookspec
def forward_override(model: PreTrainedModel, config: PretrainedConfig) -> Callable[..., Any] | None:
    """Return a function to bind as ``model.forward`` on this instance, or ``None`` to keep the stock one.

    The function takes ``self`` first, like the stock method, and keeps its signature; the model's class is
    not changed, so ``save_pretrained``, ``generate`` and PEFT keep working. Load options reach it through
    ``model.automodel_composition``.
    """
