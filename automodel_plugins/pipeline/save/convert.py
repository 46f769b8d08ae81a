"""``automodel-plugins convert``: rewrite a checkpoint in another format, streaming, never a whole tensor in memory.

The checkpoint is read exactly as ``from_pretrained`` would read it (the claiming plugin's adapter, the load
plan, ``read_value``: FP8 dequantized with its scale), a chunk of rows at a time, and written through the same
plan and writer as ``save_pretrained``. So ``--to bf16`` gives the very tensors ``from_pretrained(SRC)`` holds,
in the files stock ``save_pretrained`` would write for them; ``--to fp8-tensor`` / ``--to fp8-block`` give
transformers' FP8 format, keeping the source's scales wherever it already had that granularity (then the FP8
bytes are the source's). The model is only built on the meta device, for its names, shapes and modules.

The checkpoint's other files (tokenizer, processor and chat-template files, ``generation_config.json``) are
copied beside the new weights; other weight files (``*.safetensors``, ``*.bin`` ...) are not. A link among them
that leads outside the checkpoint (a ``tokenizer_config.json`` pointing at the hub token, say) is refused with
:class:`~automodel_plugins.errors.UnsafeCheckpointPathError`, as the index refuses such a shard: the copy would
put that file in the new checkpoint, ready to be shared.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.checkpoint.index import link_leads_outside
from automodel_plugins.errors import SaveOptionError, UnknownQuantizationError, UnsafeCheckpointPathError
from automodel_plugins.fp8.quantization import quantization_dict
from automodel_plugins.model.hf_layout import linear_weights, saved_tensors
from automodel_plugins.model.stock import build_on_meta
from automodel_plugins.model.tensors import model_tensors
from automodel_plugins.pipeline.composition import adapter_for
from automodel_plugins.pipeline.load.plan import plan_load
from automodel_plugins.pipeline.save.native import (
    NativeLayout,
    check_native_adapter,
    native_params_bytes,
    plan_native,
)
from automodel_plugins.pipeline.save.plan import ModelTensor, SaveFormat, SourceView
from automodel_plugins.pipeline.save.save import SaveReport, write_checkpoint
from automodel_plugins.pipeline.save.values import CheckpointValues
from automodel_plugins.registry import Registry, get_registry
from automodel_plugins.sources import CONFIG_NAME, CheckpointLocation, HubOptions, load_config, resolve

__all__ = ["CONVERT_FORMATS", "convert_checkpoint"]

CONVERT_FORMATS = {"bf16": "none", "fp8-tensor": "fp8-tensor", "fp8-block": "fp8-block"}
"""``--to`` value -> the save format it writes."""

_GENERATION_CONFIG = "generation_config.json"
_MISTRAL_NATIVE_CONFIG = "params.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".index.json")


def convert_checkpoint(
    source: str | Path,
    dest: str | Path,
    *,
    to: str,
    layout: str = "hf",
    block_size: int | Sequence[int] | None = None,
    modules_to_not_convert: Sequence[str] | None = None,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    fsync: bool = True,
    registry: Registry | None = None,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    token: str | bool | None = None,
    local_files_only: bool | None = None,
) -> SaveReport:
    """Convert the checkpoint ``source`` into ``dest`` as ``to`` (``"bf16"``, ``"fp8-tensor"``, ``"fp8-block"``).

    ``source`` is a checkpoint directory (or its weights file, index or config) or a hub repo id (with
    transformers' ``revision``, ``cache_dir``, ``token``, ``local_files_only``: only the config, the index, the
    shards it names and the repo's other top-level ``.json`` files, such as the tokenizer's, are downloaded).
    Options as :func:`automodel_plugins.save_pretrained`'s. ``layout``: ``"hf"`` (transformers' form, whatever
    the source's), or ``"native"`` (Mistral's native form, from either form: ``params.json`` declaring what
    ``to`` writes, ``consolidated*.safetensors`` with native names and scales; see
    :mod:`automodel_plugins.pipeline.save.native`). Returns its :class:`SaveReport` (``seconds``: the
    whole conversion, from resolving ``source`` on).
    """
    started = time.perf_counter()
    if to not in CONVERT_FORMATS:
        raise UnknownQuantizationError(
            f"unknown target format {to!r}: pass one of {', '.join(map(repr, CONVERT_FORMATS))}"
        )
    if layout not in ("hf", "native"):
        raise SaveOptionError(f"unknown layout {layout!r} (--layout): pass 'hf' or 'native'")
    save_format = SaveFormat.parse(
        CONVERT_FORMATS[to], block_size=block_size, modules_to_not_convert=modules_to_not_convert
    )
    registry = registry or get_registry()
    options = HubOptions(
        revision=revision,
        cache_dir=cache_dir,
        token=token,
        local_files_only=local_files_only,
        progress=progress,
    )
    location = resolve(source, options)
    config = load_config(location)
    native = layout == "native"
    params = (
        native_params_bytes(
            config, save_format, source_params=location.config if location.is_native else None
        )
        if native
        else None
    )
    claim = registry.winning_claim(config)
    plugin = claim.plugin if claim else None
    model = build_on_meta(config, torch.bfloat16)
    with Checkpoint.open(location) as checkpoint:
        adapter = adapter_for(registry, plugin, config, checkpoint)
        plan = plan_load(model_tensors(model), adapter, checkpoint)
        declared = quantization_dict(config)
        source_view = SourceView(checkpoint, adapter, declared)
        if "quantization_config" in vars(model.config):
            del model.config.quantization_config  # the values are plain floats once read
        extra = _extra_files(location)
        tensors = saved_tensors(model)
        native_plan = None
        if native:
            extra.pop(_GENERATION_CONFIG, None)  # the native form has none
            target = (
                adapter
                if location.is_native
                else adapter_for(registry, plugin, config, NativeLayout(location.directory))
            )
            check_native_adapter(target, config, plugin)
            native_plan = plan_native(
                model_tensors_for_save(model, tensors),
                target,
                save_format,
                source=source_view,
                text_prefix="model.language_model." if config.model_type == "mistral3" else "model.",
                mla=config.get_text_config().model_type == "mistral4",
            )
        has_generation_config = _GENERATION_CONFIG in extra
        return write_checkpoint(
            model,
            dest,
            save_format=save_format,
            tensors=tensors,
            values=CheckpointValues(checkpoint, plan),
            source=source_view,
            declared=declared,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            progress=progress,
            fsync=fsync,
            generation_config=None
            if native or has_generation_config or not model.can_generate()
            else model.generation_config,
            extra_files=extra,
            label="converting",
            started=started,
            native_params=params,
            plan=native_plan,
        )


def model_tensors_for_save(
    model: torch.nn.Module, tensors: Mapping[str, torch.Tensor]
) -> dict[str, ModelTensor]:
    """Shape, dtype and linear module of each tensor to write (the meta model's)."""
    linears = linear_weights(model)
    return {name: ModelTensor(tuple(t.shape), t.dtype, linears.get(name)) for name, t in tensors.items()}


def _extra_files(location: CheckpointLocation) -> dict[str, Path]:
    """The checkpoint's own files that are neither weights nor its index nor ``config.json``: each name, and
    the regular file it is once links are followed (checked to stay inside the checkpoint).

    From a hub repo, its other top-level ``.json`` files (tokenizer, generation and processor configs): the
    hub source never fetches anything else (no code, no pickles; ``chat_template.jinja`` or a SentencePiece
    ``tokenizer.model`` stay on the hub).
    """
    if location.is_remote:
        listed = location.repo_files() or {}
        names = sorted(name for name in listed if "/" not in name and name.endswith(".json") and _extra(name))
        location.fetch(names)
        files = [location.file(name) for name in names]
    else:
        files = sorted(file for file in location.directory.iterdir() if file.is_file() and _extra(file.name))
    extra = {}
    for file in files:
        outside = link_leads_outside(location.directory, file)
        if outside is not None:
            raise UnsafeCheckpointPathError(
                f"{file.name} is a link to {outside}, outside the checkpoint directory {location.directory}: "
                "convert copies only the checkpoint's own files (copy that file into the checkpoint, or remove "
                "the link)",
                path=file,
            )
        extra[file.name] = file.resolve()
    return extra


def _extra(name: str) -> bool:
    """Not hidden, not the config, not weights, and not ``params.json``: Mistral's native config describes
    ``consolidated.safetensors``, which a conversion does not write."""
    return (
        not name.startswith(".")
        and name not in (CONFIG_NAME, _MISTRAL_NATIVE_CONFIG)
        and not name.endswith(_WEIGHT_SUFFIXES)
    )
