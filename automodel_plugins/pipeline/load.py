"""The load path, in one place::

    resolve ─> config ─> claim ─> headers vs config ─> stock class on meta ─> adapter ─> plan ─> stream tensors
            ─> post_materialize ─> tie ─> forward override ─> the stock model, with a record of what was composed

``from_pretrained`` runs all of it. ``build_model`` stops before the tensors (for users who shard first), and
``load_weights`` streams into a model ``build_model`` made once it is materialized (each rank its own slices).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.errors import CheckpointError, ConfigError, PluginError, RotaryRepairError
from automodel_plugins.model.forward import SKIP_LOGITS_OPTION
from automodel_plugins.model.rotary import rope_suspects
from automodel_plugins.model.stock import build_on_meta, stock_class
from automodel_plugins.model.tensors import (
    ensure_materialized,
    model_tensors,
    non_finite_buffers,
    poison_meta_buffers,
    unrecomputed_buffers,
)
from automodel_plugins.pipeline.composition import (
    COMPOSITION_ATTR,
    Composition,
    adapter_for,
    bind_forward,
    compose,
    composition_of,
    drop_quantization_config,
)
from automodel_plugins.pipeline.plan import plan_load
from automodel_plugins.pipeline.preflight import check_headers_of, check_stock_path, check_structure
from automodel_plugins.pipeline.stream import LoadReport, stream_into
from automodel_plugins.registry import Registry, get_registry
from automodel_plugins.sources import INDEX_NAME, SAFETENSORS_NAME, load_config, resolve

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["build_model", "from_pretrained", "load_weights", "resolve_dtype"]


def from_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    require_plugin: bool = False,
    skip_logits: bool = False,
    mmap: bool = True,
    progress: bool | None = None,
    registry: Registry | None = None,
    **stock_kwargs: Any,
) -> PreTrainedModel:
    """Load ``path`` through the plugin that claims its config, onto the stock transformers class.

    No plugin claiming the config means the stock ``from_pretrained`` of the config's architecture (unless
    ``require_plugin``), but never for a checkpoint holding FP8 tensors the stock loader would not scale. ``dtype``
    defaults to the config's (BF16 for FP8 checkpoints). ``skip_logits``: a forward given ``labels`` computes the
    loss from hidden states and returns no full logits (when the plugin overrides the forward). The model is
    returned in eval mode, like transformers does.

    ``mmap``: tensors stored in the dtype they load in (BF16 embeddings, norms, ``lm_head``) are, by default,
    views of the memory-mapped shard files: no copy, and pages shared with the page cache. The model then
    depends on those files staying as they are: replacing a file by renaming a new one over it is safe (the
    mapping keeps the old file), but truncating or rewriting it in place makes the next touch of an affected
    tensor kill the process with ``SIGBUS`` (stock transformers' memory-mapped loads behave the same).
    ``mmap=False`` copies those tensors into private memory instead (more resident memory, no dependence on
    the files), for checkpoints on storage that may change under a running job.
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
    with Checkpoint.open(path) as checkpoint:
        check_structure(config, checkpoint)
        model = build_on_meta(config, dtype)
        composition = compose(registry, claim, **{SKIP_LOGITS_OPTION: skip_logits, "mmap": mmap})
        adapter = adapter_for(registry, plugin, config, checkpoint)
        plan = plan_load(model_tensors(model), adapter, checkpoint)
        composition.load = stream_into(model, plan, checkpoint, device=device, progress=progress, mmap=mmap)
        composition.adapter = adapter.describe()
    poisoned = poison_meta_buffers(model, device)
    registry.call(plugin, "post_materialize", model=model, config=config)
    model.tie_weights()
    _check_buffers_recomputed(model, poisoned, plugin)
    ensure_materialized(model)
    composition.dequantized_from = drop_quantization_config(model)
    bind_forward(registry, plugin, model, config, composition)
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
    fix-ups that fire after materialization; its forward override is bound now. Given a path with weights, the
    config is first checked against their headers (a layer count the checkpoint does not hold fails here, not
    after minutes of building).
    """
    registry = registry or get_registry()
    if isinstance(path_or_config, (str, Path)):
        config = load_config(path_or_config)
        check_headers_of(path_or_config, config, stock=False)
    else:
        config = path_or_config
    claim = registry.winning_claim(config, require_plugin=require_plugin)
    model = build_on_meta(config, resolve_dtype(config, dtype))
    composition = compose(registry, claim, **{SKIP_LOGITS_OPTION: skip_logits})
    if claim is not None:
        registry.call(claim.plugin, "post_materialize", model=model, config=config)
        bind_forward(registry, claim.plugin, model, config, composition)
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
    ensure_materialized(
        model, hint=" (materialize them first with model.to_empty(device=...), or use from_pretrained)"
    )
    registry = registry or get_registry()
    composition = composition_of(model)
    plugin = composition.plugin if composition else registry.resolve(model.config)
    # The checkpoint's own config says how it is stored (FP8 block size, modules never converted); the
    # model's config stopped declaring a quantization once a first load dequantized it.
    location = resolve(path)
    checkpoint_config = load_config(path) if location.has_config() else model.config
    with Checkpoint.open(path) as checkpoint:
        adapter = adapter_for(registry, plugin, checkpoint_config, checkpoint)
        plan = plan_load(model_tensors(model), adapter, checkpoint, allow_unused=stage)
        report = stream_into(model, plan, checkpoint, progress=progress)
    if plugin is not None:
        registry.call(plugin, "post_materialize", model=model, config=model.config)
    dequantized_from = drop_quantization_config(model)
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


def _stock_from_pretrained(
    path: str | Path,
    config: PretrainedConfig,
    *,
    dtype: torch.dtype | None,
    device: str | torch.device,
    **kwargs: Any,
) -> PreTrainedModel:
    """No plugin claimed the config: transformers' own loader, locally, without remote code.

    transformers loads a directory's own weights, so a path naming another weights file is refused rather
    than silently swapped for the directory's. The headers are checked first: against the config's structure,
    and for FP8 tensors the stock loader would load unscaled (:func:`check_stock_path`).
    """
    location = resolve(path)
    named = location.named_weights
    if named is not None and named.name not in (SAFETENSORS_NAME, INDEX_NAME):
        raise CheckpointError(
            "no plugin claims this config and stock transformers loads only a directory's model.safetensors "
            "or its index: pass the directory",
            path=named,
        )
    with Checkpoint.open(path) as checkpoint:
        check_structure(config, checkpoint)
        check_stock_path(config, checkpoint)
    model = stock_class(config).from_pretrained(
        str(location.directory),
        config=config,
        dtype=dtype or "auto",
        device_map=str(device),
        local_files_only=True,
        **kwargs,
    )
    setattr(
        model,
        COMPOSITION_ATTR,
        Composition(plugin=None, claim_reason="no plugin claimed the config: stock path"),
    )
    return model


def _check_buffers_recomputed(model: PreTrainedModel, poisoned: list[str], plugin: str) -> None:
    """Every buffer the checkpoint could not provide must have been recomputed, and rotary frequencies must
    be finite (a partial NaN is a config producing bad values, not a buffer left alone)."""
    left = unrecomputed_buffers(model, poisoned)
    if left:
        raise PluginError(
            plugin,
            "post_materialize",
            f"non-persistent buffer(s) {', '.join(left)} were not recomputed after loading; the model would run "
            "on uninitialized values",
        )
    bad = non_finite_buffers(model, poisoned, suffix="inv_freq")
    if bad:
        module = model.get_submodule(bad[0].rpartition(".")[0])
        raise RotaryRepairError(
            f"rotary buffer(s) {', '.join(bad)} hold NaN or inf after post_materialize; "
            f"{rope_suspects(getattr(module, 'config', None))}"
        )
