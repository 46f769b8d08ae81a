"""The load path, in one place::

    config ─> claim ─> stock class on meta ─> adapter ─> stream tensors ─> post_materialize ─> tie
           ─> forward override ─> the stock model, with a record of what was composed

``from_pretrained`` runs all of it. ``build_model`` stops before the tensors (for users who shard first), and
``load_weights`` streams into a model ``build_model`` made once it is materialized (each rank its own slices).
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from automodel_plugins.adapter import Fp8StateDictAdapter, StateDictAdapter
from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.config import config_file_exists, load_config
from automodel_plugins.errors import CheckpointError, ConfigError, PluginError
from automodel_plugins.loading import LoadReport, ensure_no_meta, model_tensors, plan_load, stream_into
from automodel_plugins.registry import ClaimVerdict, Registry, get_registry

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

COMPOSITION_ATTR = "automodel_composition"


@dataclass
class Composition:
    """What was composed onto a model: attached as ``model.automodel_composition``."""

    plugin: str | None
    plugin_version: str | None = None
    distribution: str | None = None
    claim_reason: str | None = None
    adapter: dict[str, Any] = field(default_factory=dict)
    load: LoadReport | None = None
    forward_overridden: bool = False
    dequantized_from: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def from_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    require_plugin: bool = False,
    skip_logits: bool = False,
    progress: bool | None = None,
    registry: Registry | None = None,
    **stock_kwargs: Any,
) -> PreTrainedModel:
    """Load ``path`` through the plugin that claims its config, onto the stock transformers class.

    No plugin claiming the config means the stock ``from_pretrained`` of the config's architecture (unless
    ``require_plugin``). ``dtype`` defaults to the config's (BF16 for FP8 checkpoints). ``skip_logits``: a
    forward given ``labels`` computes the loss from hidden states and returns no full logits (when the plugin
    overrides the forward). The model is returned in eval mode, like transformers does.
    """
    registry = registry or get_registry()
    config = load_config(path)
    claim = registry.winning_claim(config, require_plugin=require_plugin)
    if claim is None:
        return _stock_from_pretrained(path, config, dtype=dtype, device=device, **stock_kwargs)
    plugin = claim.plugin
    if stock_kwargs:
        raise TypeError(
            f"options {sorted(stock_kwargs)} only apply to the stock path; plugin {plugin!r} claimed this config"
        )
    dtype = resolve_dtype(config, dtype)
    device = torch.device(device)
    model = _build_on_meta(config, dtype)
    composition = _compose(registry, claim, skip_logits=skip_logits)
    with Checkpoint.open(path) as checkpoint:
        adapter = _adapter(registry, plugin, config, checkpoint)
        plan = plan_load(model_tensors(model), adapter, checkpoint)
        composition.load = stream_into(
            model, plan, checkpoint, dtype=dtype, device=device, assign=True, progress=progress
        )
        composition.adapter = adapter.describe()
    poisoned = _materialize_buffers(model, device)
    registry.call(plugin, "post_materialize", model=model, config=config)
    model.tie_weights()
    _check_buffers_filled(model, poisoned, plugin)
    ensure_no_meta(model)
    composition.dequantized_from = _drop_quantization_config(model)
    _bind_forward(registry, plugin, model, config, composition)
    setattr(model, COMPOSITION_ATTR, composition)
    return model.eval()


def build_model(
    path_or_config: str | Path | PretrainedConfig,
    *,
    dtype: torch.dtype | None = None,
    skip_logits: bool = False,
    require_plugin: bool = False,
    registry: Registry | None = None,
) -> PreTrainedModel:
    """The composed stock model on the meta device, weights not loaded: shard it, ``to_empty``, then
    :func:`load_weights`. The claiming plugin's ``post_materialize`` runs now (on meta) so that it can install
    fix-ups that fire after materialization; its forward override is bound now.
    """
    registry = registry or get_registry()
    config = path_or_config if not isinstance(path_or_config, (str, Path)) else load_config(path_or_config)
    claim = registry.winning_claim(config, require_plugin=require_plugin)
    plugin = None if claim is None else claim.plugin
    dtype = resolve_dtype(config, dtype)
    model = _build_on_meta(config, dtype)
    composition = _compose(registry, claim, skip_logits=skip_logits)
    if plugin is not None:
        registry.call(plugin, "post_materialize", model=model, config=config)
        _bind_forward(registry, plugin, model, config, composition)
    setattr(model, COMPOSITION_ATTR, composition)
    return model


def load_weights(
    model: PreTrainedModel,
    path: str | Path,
    *,
    stage: bool = False,
    progress: bool | None = None,
    registry: Registry | None = None,
) -> LoadReport:
    """Stream ``path`` into an already materialized ``model`` (plain tensors or DTensors, each rank its region).

    ``stage=True``: the model is one pipeline stage holding only some of the modules, so checkpoint tensors of
    other stages are expected to be left unread. The claiming plugin's ``post_materialize`` runs afterwards.
    """
    meta = [name for name, t in model.named_parameters() if t.is_meta]
    if meta:
        raise CheckpointError(
            f"model tensors are still on the meta device ({meta[0]}, ...): materialize them first "
            "(model.to_empty(device=...)) or use automodel_plugins.from_pretrained"
        )
    registry = registry or get_registry()
    composition: Composition | None = getattr(model, COMPOSITION_ATTR, None)
    plugin = composition.plugin if composition else registry.resolve(model.config)
    # The checkpoint's own config says how it is stored (FP8 block size, modules never converted); the
    # model's config stopped declaring a quantization once a first load dequantized it.
    checkpoint_config = load_config(path) if config_file_exists(path) else model.config
    with Checkpoint.open(path) as checkpoint:
        adapter = _adapter(registry, plugin, checkpoint_config, checkpoint)
        plan = plan_load(model_tensors(model), adapter, checkpoint, allow_unused=stage)
        device = next((t.device for t in model.parameters()), torch.device("cpu"))
        report = stream_into(
            model, plan, checkpoint, dtype=model.dtype, device=device, assign=False, progress=progress
        )
        report.unused_keys_allowed = len(checkpoint) - len({k for src in plan.values() for k in src.keys})
    if plugin is not None:
        registry.call(plugin, "post_materialize", model=model, config=model.config)
    dequantized_from = _drop_quantization_config(model)
    if composition is not None:
        composition.load, composition.adapter = report, adapter.describe()
        composition.dequantized_from = composition.dequantized_from or dequantized_from
    return report


def resolve_dtype(config: PretrainedConfig, dtype: torch.dtype | str | None) -> torch.dtype:
    """The explicit ``dtype``, else the config's floating dtype, else BF16 (what FP8 checkpoints train in)."""
    candidate = dtype if dtype is not None else getattr(config, "dtype", None)
    if isinstance(candidate, str):
        candidate = getattr(torch, candidate, None)
    if isinstance(candidate, torch.dtype) and candidate.is_floating_point and candidate.itemsize >= 2:
        return candidate
    if dtype is not None:
        raise ConfigError(None, f"dtype {dtype!r} is not a floating dtype a model can be loaded in")
    return torch.bfloat16


def _build_on_meta(config: PretrainedConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The stock class of ``config`` with every tensor on meta: nothing allocated, nothing initialized."""
    model_class = _stock_class(config)
    with torch.device("meta"):
        return model_class._from_config(config, dtype=dtype)


def _stock_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type):
            return cls
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        if type(config) in auto._model_mapping:
            return auto._model_mapping[type(config)]
    raise ConfigError(
        None, f"no transformers class for model_type {config.model_type!r} (config.architectures is empty)"
    )


def _stock_from_pretrained(
    path: str | Path,
    config: PretrainedConfig,
    *,
    dtype: torch.dtype | None,
    device: str | torch.device,
    **kwargs: Any,
) -> PreTrainedModel:
    """No plugin claimed the config: transformers' own loader, locally, without remote code."""
    model = _stock_class(config).from_pretrained(
        path, config=config, dtype=dtype or "auto", device_map=str(device), local_files_only=True, **kwargs
    )
    setattr(
        model,
        COMPOSITION_ATTR,
        Composition(plugin=None, claim_reason="no plugin claimed the config: stock path"),
    )
    return model


def _compose(registry: Registry, claim: ClaimVerdict | None, *, skip_logits: bool) -> Composition:
    plugin = None if claim is None else claim.plugin
    return Composition(
        plugin=plugin,
        plugin_version=registry.version(plugin) if plugin else None,
        distribution=registry.distribution(plugin) if plugin else None,
        claim_reason=claim.reason if claim else None,
        options={"skip_logits": skip_logits},
    )


def _adapter(
    registry: Registry, plugin: str | None, config: PretrainedConfig, checkpoint: Checkpoint
) -> StateDictAdapter:
    adapter = (
        registry.call(plugin, "state_dict_adapter", config=config, checkpoint=checkpoint) if plugin else None
    )
    if adapter is None:
        return Fp8StateDictAdapter(checkpoint)
    if not isinstance(adapter, StateDictAdapter):
        raise PluginError(
            plugin, "state_dict_adapter", f"returned {type(adapter).__name__}, not a StateDictAdapter"
        )
    return adapter


def _bind_forward(
    registry: Registry,
    plugin: str,
    model: PreTrainedModel,
    config: PretrainedConfig,
    composition: Composition,
) -> None:
    forward = registry.call(plugin, "forward_override", model=model, config=config)
    if forward is None:
        return
    if not callable(forward):
        raise PluginError(
            plugin, "forward_override", f"returned {type(forward).__name__}, which is not callable"
        )
    model.forward = types.MethodType(forward, model)
    composition.forward_overridden = True


def _poison(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    fill = math.nan if tensor.dtype.is_floating_point else torch.iinfo(tensor.dtype).min
    return torch.full(tensor.shape, fill, dtype=tensor.dtype, device=device)


def _is_poisoned(tensor: torch.Tensor) -> bool:
    if tensor.numel() == 0:
        return False
    if tensor.dtype.is_floating_point:
        return bool(torch.isnan(tensor).all())
    return bool((tensor == torch.iinfo(tensor.dtype).min).all())


def _materialize_buffers(model: nn.Module, device: torch.device) -> list[str]:
    """Give buffers still on meta (non-persistent: never in a checkpoint) a poison value, to be recomputed.

    NaN (or the integer minimum) rather than uninitialized memory, so that a buffer nobody recomputed is
    caught by :func:`_check_buffers_filled` instead of running silently wrong.
    """
    poisoned = []
    for module_name, module in model.named_modules():
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = _poison(buffer, device)
                poisoned.append(f"{module_name}.{name}" if module_name else name)
    return poisoned


def _check_buffers_filled(model: nn.Module, poisoned: list[str], plugin: str) -> None:
    left = [name for name in poisoned if _is_poisoned(model.get_buffer(name))]
    if left:
        raise PluginError(
            plugin,
            "post_materialize",
            f"non-persistent buffer(s) {', '.join(left)} were not recomputed after loading; the model would run "
            "on uninitialized values",
        )


def _drop_quantization_config(model: nn.Module) -> str | None:
    """The weights are plain floats now: stop the config declaring a quantization, so that
    ``save_pretrained`` writes a checkpoint stock transformers loads as it is."""
    config = model.config
    quantization = getattr(config, "quantization_config", None)
    if quantization is None:
        return None
    method = (
        quantization.get("quant_method")
        if isinstance(quantization, dict)
        else getattr(quantization, "quant_method", None)
    )
    del config.quantization_config
    return str(method)
