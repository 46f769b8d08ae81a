"""The load path, in one place::

    resolve ─> config ─> claim ─> headers vs config ─> stock class on meta ─> adapter ─> plan ─> stream tensors
            ─> post_materialize ─> tie ─> forward override ─> the stock model, with a record of what was composed

``from_pretrained`` runs all of it. ``build_model`` stops before the tensors (for users who shard first), and
``load_weights`` streams into a model ``build_model`` made once it is materialized (each rank its own slices).
``dequantize=False`` keeps the checkpoint's FP8 linear weights and fused MoE experts FP8 (see
``docs/fp8-resident.md``): after planning, those modules become :class:`~automodel_plugins.model.fp8_linear.
Fp8Linear` and :class:`~automodel_plugins.model.fp8_experts.Fp8Experts` on meta, and the stream fills them with
the stored FP8 bytes and scales.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.errors import (
    CheckpointError,
    ConfigError,
    LoadOptionError,
    NoPluginClaimError,
    PluginError,
    RotaryRepairError,
)
from automodel_plugins.model import fp8_peft_hook
from automodel_plugins.model.compressed_tensors_state import show_compressed_tensors_names
from automodel_plugins.model.device_map import Placement, dispatch, normalize_device_map
from automodel_plugins.model.forward import SKIP_LOGITS_OPTION
from automodel_plugins.model.fp8_training_check import watch_resident_training
from automodel_plugins.model.rotary import rope_suspects
from automodel_plugins.model.stock import auto_target, build_on_meta, stock_class
from automodel_plugins.model.stock_save_guard import guard_stock_save
from automodel_plugins.model.tensors import (
    ensure_materialized,
    model_tensors,
    non_finite_buffers,
    poison_meta_buffers,
    stock_names,
    unrecomputed_buffers,
    unwrap_peft,
)
from automodel_plugins.pipeline.composition import (
    COMPOSITION_ATTR,
    Composition,
    adapter_for,
    bind_forward,
    compose,
    composition_of,
    drop_quantization_config,
    record_source,
)
from automodel_plugins.pipeline.load.options import (
    apply_config_overrides,
    build_dtype,
    load_dtype,
    parse_load_options,
    resolve_dtype,
)
from automodel_plugins.pipeline.load.plan import LoadPlan, plan_load
from automodel_plugins.pipeline.load.preflight import check_headers_of, check_stock_path, check_structure
from automodel_plugins.pipeline.load.report import LoadReport
from automodel_plugins.pipeline.load.resident import (
    SIBLING_NOTE,
    loadable_tensors,
    make_fp8_resident,
    plan_resident,
    resident_weights,
)
from automodel_plugins.pipeline.load.stream import stream_into
from automodel_plugins.registry import Registry, get_registry
from automodel_plugins.sources import (
    INDEX_NAME,
    SAFETENSORS_NAME,
    CheckpointLocation,
    HubLocation,
    HubOptions,
    config_path_of,
    load_config,
    resolve,
)
from automodel_plugins.sources.hub_guard import watching

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

    from automodel_plugins.adapters import StateDictAdapter

__all__ = ["build_model", "from_pretrained", "load_weights", "resolve_dtype"]


def from_pretrained(
    path: str | Path | CheckpointLocation,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    dequantize: bool = True,
    require_plugin: bool = False,
    skip_logits: bool = False,
    mmap: bool = True,
    progress: bool | None = None,
    registry: Registry | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
    collective: bool = True,
    auto_class: type | None = None,
    **options: Any,
) -> PreTrainedModel | tuple[PreTrainedModel, dict[str, Any]]:
    """Load ``path`` (a checkpoint directory or file, or a hub repo id) through the plugin that claims its
    config, onto the stock transformers class.

    No plugin claiming the config means the stock ``from_pretrained`` of the config's architecture (unless
    ``require_plugin``), but never for a checkpoint holding FP8 tensors the stock loader would not scale.
    ``dtype`` (default ``"auto"``, as in transformers 5: the config's, else the checkpoint's first floating
    non-FP8 tensor's) is the dtype of every float tensor, and the compute dtype of FP8-resident layers.
    ``dequantize=False``: the checkpoint's FP8 linear weights stay FP8 (frozen :class:`~automodel_plugins.model.fp8_linear.Fp8Linear` layers, 1 byte a parameter plus their
    scales), dequantized one layer at a time in the forward, and so do block-FP8 fused MoE experts
    (:class:`~automodel_plugins.model.fp8_experts.Fp8Experts`, one expert's matrix at a time); an unquantized checkpoint raises
    :class:`~automodel_plugins.errors.NotQuantizedError`. ``skip_logits``: a forward given ``labels`` computes
    the loss from hidden states and returns no full logits (when the plugin overrides the forward).
    ``progress`` switches the bars (downloads and loading; default: at a terminal). ``revision``,
    ``cache_dir``, ``token`` and ``local_files_only`` are transformers' options for a repo id: only its
    ``config.json``, index and the shards the index names are downloaded. Under ``torch.distributed`` a repo
    id is loaded collectively: one rank per machine downloads while the others wait, so every rank must call
    this; ``collective=False`` makes this call download on its own instead (a load on some ranks only). The
    model is returned in eval mode, like transformers does.

    ``options`` are transformers' ``from_pretrained`` keywords (``attn_implementation``, ``device_map``,
    ``torch_dtype``, ...): each is honoured with transformers' meaning or refused with a
    :class:`~automodel_plugins.errors.LoadOptionError` saying why, as
    :data:`~automodel_plugins.pipeline.load.options.OPTIONS` (``docs/loading-options.md``) decides. ``device``
    is the same as ``device_map=device``; a ``device_map`` streams each tensor straight to its device.
    ``auto_class``: the transformers Auto class this call stands for (what the Auto doors of
    :mod:`automodel_plugins.pipeline.load.auto` pass): with no plugin claiming the config, it loads the
    checkpoint; with one, the class it maps the config to must be the plugin's (or that class's base model,
    which is returned).

    ``mmap``: tensors stored in the dtype they load in (BF16 embeddings, norms, ``lm_head``) are, by default,
    views of the memory-mapped shard files: no copy, and pages shared with the page cache. The model then
    depends on those files staying as they are: replacing a file by renaming a new one over it is safe (the
    mapping keeps the old file), but truncating or rewriting it in place makes the next touch of an affected
    tensor kill the process with ``SIGBUS`` (stock transformers' memory-mapped loads behave the same).
    ``mmap=False`` copies those tensors into private memory instead (more resident memory, no dependence on
    the files), for checkpoints on storage that may change under a running job.
    """
    registry = registry or get_registry()
    given = parse_load_options({**options, **({} if dtype is None else {"dtype": dtype})})
    if device is not None and given.device_map is not None:
        raise LoadOptionError("device_map", f"give device or device_map, not both (device={device!r})")
    hub = HubOptions(
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        progress=progress,
        collective=collective,
    )
    location = resolve(path, hub)
    config = given.config or load_config(location)
    apply_config_overrides(config, given.overrides)
    claim = registry.winning_claim(config, require_plugin=require_plugin)
    if claim is None:
        if not dequantize:
            raise NoPluginClaimError(
                f"{path}: dequantize=False needs the host's loader, and no plugin claims this config "
                "(stock transformers would load it); install or select a plugin that serves it"
            )
        return _stock_from_pretrained(location, config, device=device, model_class=auto_class, **given.stock)
    plugin = claim.plugin
    given.check_plugin_path(plugin)
    target = None if auto_class is None else auto_target(auto_class, config)
    device_map = normalize_device_map(device if given.device_map is None else given.device_map)
    mmap = mmap and given.mmap is not False
    if location.is_remote:  # before any download: a config its headers contradict fails now
        check_headers_of(location, config, stock=False)
    with Checkpoint.open(location) as checkpoint:
        check_structure(config, checkpoint)
        dtype = load_dtype(config, given.dtype, checkpoint)
        model = build_on_meta(config, dtype, **given.build)
        base_only = target is not None and _base_only(model, target, auto_class, plugin)
        flags = {SKIP_LOGITS_OPTION: skip_logits, "mmap": mmap, "dequantize": dequantize}
        composition = compose(registry, claim, **flags)
        adapter = adapter_for(registry, plugin, config, checkpoint)
        plan = _plan_build(model, adapter, checkpoint, dequantize=dequantize, composition=composition)
        placement = Placement.of(model, device_map, given.max_memory)  # FP8-resident layers at their size
        composition.load = stream_into(
            model,
            plan,
            checkpoint,
            device=placement.default,
            progress=progress,
            mmap=mmap,
            devices=placement.tensors(plan),
        )
        composition.adapter = adapter.describe()
        composition.source = record_source(location, checkpoint, adapter)
    poisoned = poison_meta_buffers(model, placement.device_of)
    registry.call(plugin, "post_materialize", model=model, config=config)
    model.tie_weights()
    _check_buffers_recomputed(model, poisoned, plugin)
    ensure_materialized(model)
    if not composition.fp8_resident:
        composition.dequantized_from = drop_quantization_config(model)
    if given.generation_config is not None:
        model.generation_config = given.generation_config
    bind_forward(registry, plugin, model, config, composition)
    setattr(model, COMPOSITION_ATTR, composition)
    model.eval()
    if placement.device_map is not None:
        dispatch(model, placement.device_map)
    if base_only:
        # AutoModel: the stock base model, as transformers' AutoModel gives it; its tensor names are not the
        # checkpoint model's, so it carries no source record to save "as it came" from
        model = model.base_model
        setattr(model, COMPOSITION_ATTR, dataclasses.replace(composition, source=None))
    if given.output_loading_info:
        return model, _loading_info()
    return model


def build_model(
    path_or_config: str | Path | CheckpointLocation | PretrainedConfig,
    *,
    dtype: torch.dtype | str | None = None,
    dequantize: bool = True,
    skip_logits: bool = False,
    require_plugin: bool = False,
    registry: Registry | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
    progress: bool | None = None,
    collective: bool = True,
    **options: Any,
) -> PreTrainedModel:
    """The composed stock model on the meta device, weights not loaded: shard it, ``to_empty``, then
    :func:`load_weights`. The claiming plugin's ``post_materialize`` runs now (on meta) so that it can install
    fix-ups that fire after materialization; its forward override is bound now. A hub repo id fetches only its
    ``config.json`` (the hub options, ``progress`` and ``collective`` as in :func:`from_pretrained`). Given a path with weights, the config is
    first checked against their headers (a layer count the checkpoint does not hold fails here, not after
    minutes of building; a repo's headers are read with range requests).

    ``dequantize=False`` (needs the checkpoint path: which weights stay FP8 is read from its headers) builds
    the FP8-resident layers now, so that sharding splits their FP8 codes, and each rank later reads only its
    slice of them.

    ``options``: transformers' options that shape the built model (``attn_implementation``,
    ``experts_implementation``, ``torch_dtype``, config attributes) and the accepted ones, as in
    :func:`from_pretrained`; those about loading (``device_map``, ...) are a
    :class:`~automodel_plugins.errors.LoadOptionError`. ``dtype="auto"`` (or None) is the config's dtype, else,
    given a path, the checkpoint's as :func:`from_pretrained` decides it.
    """
    registry = registry or get_registry()
    given = parse_load_options({**options, **({} if dtype is None else {"dtype": dtype})}, build_only=True)
    location = None
    if isinstance(path_or_config, (str, Path, CheckpointLocation)):
        hub = HubOptions(
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            local_files_only=local_files_only,
            progress=progress,
            collective=collective,
        )
        location = resolve(path_or_config, hub)
        config = load_config(location)
        apply_config_overrides(config, given.overrides)
        check_headers_of(location, config, stock=False)
    else:
        config = path_or_config
        apply_config_overrides(config, given.overrides)
    if not dequantize and location is None:
        raise TypeError(
            "build_model(..., dequantize=False) needs the checkpoint path, not a config: which linear weights "
            "stay FP8 is read from the checkpoint's headers"
        )
    claim = registry.winning_claim(config, require_plugin=require_plugin)
    if claim is not None:
        given.check_plugin_path(claim.plugin)
    model = build_on_meta(config, build_dtype(config, given.dtype, location), **given.build)
    composition = compose(registry, claim, **{SKIP_LOGITS_OPTION: skip_logits}, dequantize=dequantize)
    if not dequantize:
        with Checkpoint.open(location, download=False) as checkpoint:
            adapter = adapter_for(registry, claim.plugin if claim else None, config, checkpoint)
            _plan_build(model, adapter, checkpoint, dequantize=False, composition=composition)
    if claim is not None:
        registry.call(claim.plugin, "post_materialize", model=model, config=config)
        bind_forward(registry, claim.plugin, model, config, composition)
    setattr(model, COMPOSITION_ATTR, composition)
    return model


def load_weights(
    model: PreTrainedModel,
    path: str | Path | CheckpointLocation,
    *,
    stage: bool = False,
    progress: bool | None = None,
    registry: Registry | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
    collective: bool = True,
) -> LoadReport:
    """Stream ``path`` into an already materialized ``model`` (plain tensors or DTensors, each rank its region).

    ``model`` may be wrapped by PEFT (``get_peft_model`` before ``fully_shard``, so that FSDP2 shards the
    adapters too): the base layers inside LoRA layers are loaded under their stock names, and the adapters,
    which no checkpoint of the model holds, are left as they are (initialize them after ``to_empty``).
    ``stage=True``: the model is one pipeline stage holding only some of the modules, so checkpoint tensors of
    other stages are expected to be left unread; from a hub repo, only the shard files holding this stage's
    tensors are downloaded (the plan is made from the others' headers). The claiming plugin's
    ``post_materialize`` runs afterwards. Hub options and ``collective`` as in :func:`from_pretrained`: under
    ``torch.distributed``, every rank must call this for a repo id unless ``collective=False``.
    """
    ensure_materialized(
        model, hint=" (materialize them first with model.to_empty(device=...), or use from_pretrained)"
    )
    registry = registry or get_registry()
    model = unwrap_peft(model)
    names = stock_names(model)
    composition = composition_of(model)
    plugin = composition.plugin if composition else registry.resolve(model.config)
    # The checkpoint's own config says how it is stored (FP8 block size, modules never converted); the
    # model's config stopped declaring a quantization once a first load dequantized it.
    options = HubOptions(
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        progress=progress,
        collective=collective,
    )
    location = resolve(path, options)
    checkpoint_config = load_config(location) if location.has_config() else model.config
    with Checkpoint.open(location, download=not stage) as checkpoint:
        adapter = adapter_for(registry, plugin, checkpoint_config, checkpoint)
        model_names = {name: stock for stock, name in names.items()}
        plan = plan_load(
            loadable_tensors(model, names),
            adapter,
            checkpoint,
            allow_unused=stage,
            require_fp8={model_names[name] for name in resident_weights(model)},
        )
        if stage:  # only now is it known which shard files this stage reads
            location.fetch(sorted({checkpoint.info(key).file.name for key in plan.read_keys()}))
        report = stream_into(model, plan, checkpoint, progress=progress, names=names)
        source = record_source(location, checkpoint, adapter, fallback_config=checkpoint_config, stage=stage)
    if plugin is not None:
        registry.call(plugin, "post_materialize", model=model, config=model.config)
    dequantized_from = None if resident_weights(model) else drop_quantization_config(model)
    if composition is None:
        composition = Composition(plugin=plugin)
        setattr(model, COMPOSITION_ATTR, composition)
    composition.load, composition.adapter, composition.source = report, adapter.describe(), source
    composition.dequantized_from = composition.dequantized_from or dequantized_from
    return report


def _plan_build(
    model: PreTrainedModel,
    adapter: StateDictAdapter,
    checkpoint: Checkpoint,
    *,
    dequantize: bool,
    composition: Composition,
) -> LoadPlan:
    """Plan a load into the meta model; with ``dequantize=False`` also make its FP8 layers and experts resident
    (and say which FP8 tensors are still dequantized, and why)."""
    if dequantize:
        return plan_load(model_tensors(model), adapter, checkpoint)
    plan = plan_resident(model, model_tensors(model), adapter, checkpoint)
    if not dequantize:
        composition.fp8_resident = make_fp8_resident(model, plan, checkpoint)
        show_compressed_tensors_names(model)  # state_dict() in the format config.json declares
        guard_stock_save(model)  # FP8 experts under a compressed-tensors config have no such form
        watch_resident_training(model)  # warns at an optimizer step that can train no FP8 layer
        fp8_peft_hook.install()  # PEFT's own merge over these layers
        composition.fp8_not_resident = [name for name, p in plan.items() if p.action == "dequantized"]
        _warn_not_resident(composition.fp8_not_resident, plan)
    return plan


def _warn_not_resident(names: list[str], plan: LoadPlan) -> None:
    """``dequantize=False`` keeps nn.Linear weights and fitting fused experts FP8; other FP8 tensors (an
    embedding, experts whose pieces are not block-aligned) are dequantized as usual, which the caller, who
    asked for FP8 memory, must hear about, with the reason."""
    if not names:
        return
    dequantized = sum(plan[name].numel for name in names)
    total = sum(planned.numel for planned in plan.values())
    first = plan[names[0]]
    notes = list(dict.fromkeys(plan[name].note for name in names if plan[name].note))
    notes.sort(key=lambda note: note.endswith(SIBLING_NOTE))  # the causes first
    why = notes[0] + (f" (and {len(notes) - 1} other reason(s))" if len(notes) > 1 else "") if notes else ""
    warnings.warn(
        f"dequantize=False: {len(names)} FP8 tensor(s) cannot stay FP8 ({names[0]}"
        f"{', ...' if len(names) > 1 else ''}; {dequantized / max(total, 1):.0%} of the parameters) and are "
        f"dequantized to {first.dtype}: {why or 'only nn.Linear weights and fused MoE experts stay FP8'}; "
        "see model.automodel_composition.fp8_not_resident",
        UserWarning,
        stacklevel=4,
    )


def _base_only(model: PreTrainedModel, target: type, auto_class: type, plugin: str) -> bool:
    """Whether ``auto_class`` asks for the base model of the class the plugin loads (``AutoModel``); a class
    that is neither is refused before any tensor is read."""
    if isinstance(model, target):
        return False
    if type(model.base_model) is target:
        return True
    raise ConfigError(
        config_path_of(model.config),
        f"{auto_class.__name__} maps this config to {target.__name__}, but plugin {plugin!r} loads it as "
        f"{type(model).__name__}: use automodel_plugins.from_pretrained, or transformers' {auto_class.__name__} "
        "with AUTOMODEL_PLUGINS='' (no plugin)",
    )


def _loading_info() -> dict[str, Any]:
    """What ``output_loading_info=True`` returns beside the model, in transformers' form: nothing missing,
    unexpected or mismatched, since each of those fails the plugin path's load with a typed error."""
    return {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}


def _stock_from_pretrained(
    location: CheckpointLocation,
    config: PretrainedConfig,
    *,
    device: str | torch.device | None,
    model_class: type | None = None,
    **kwargs: Any,
) -> PreTrainedModel | tuple[PreTrainedModel, dict[str, Any]]:
    """No plugin claimed the config: transformers' own loader, without remote code; a repo id goes to it with
    the hub options (pinned to the commit the config came from).

    transformers loads a directory's own weights, so a path naming another weights file is refused rather
    than silently swapped for the directory's. The headers are checked first: against the config's structure,
    and for FP8 tensors the stock loader would load unscaled (:func:`check_stock_path`).
    """
    kwargs.pop("config", None)  # already ``config``, with the keyword overrides applied
    if kwargs.get("dtype") is None:
        kwargs["dtype"] = "auto"
    if kwargs.get("device_map") is None:
        kwargs["device_map"] = str(device or "cpu")
    if isinstance(location, HubLocation):
        source = location.repo_id
        kwargs.update(
            revision=location.commit,
            cache_dir=location.options.cache_dir,
            token=location.options.token,
            local_files_only=location.offline,
        )
    else:
        source = str(location.directory)
        kwargs.update(local_files_only=True)
    named = location.named_weights
    if named is not None and named.name not in (SAFETENSORS_NAME, INDEX_NAME):
        raise CheckpointError(
            "no plugin claims this config and stock transformers loads only a directory's model.safetensors "
            "or its index: pass the directory",
            path=named,
        )
    with Checkpoint.open(location, download=False) as checkpoint:  # headers first, before any weights
        check_structure(config, checkpoint)
        check_stock_path(config, checkpoint)
        weights = [file.relative_to(location.directory).as_posix() for file in checkpoint.files]
    guard = contextlib.nullcontext()
    if isinstance(location, HubLocation):
        # fetched through the checks on the hub's answers (and its per-file deadline); transformers then finds
        # them in the cache at the commit without a request, and what else it fetches is checked the same way
        location.fetch(weights)
        guard = watching(location.repo_id, location.options.revision, None, location.commit)
    with guard:
        loaded = (model_class or stock_class(config)).from_pretrained(source, config=config, **kwargs)
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    setattr(
        model,
        COMPOSITION_ATTR,
        Composition(plugin=None, claim_reason="no plugin claimed the config: stock path"),
    )
    return loaded


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
