"""The way out: ``save_pretrained`` writes a model in the format it came in (FP8), in transformers' FP8 format, or
in its own dtype, from one process or collectively from every rank of a sharded (FSDP2, tensor-parallel) run.

The stages, each shared with ``automodel-plugins convert`` (``pipeline.convert``)::

    source (the composition's record, reopened: headers) ─> plan (keys, dtypes, shapes, scales; every rank the
    same) ─> destination (a temporary directory beside it) ─> write (each rank its own boxes; amax all-reduced)
    ─> index, generation config, config.json last ─> rename into place

See ``docs/saving.md``.
"""

from __future__ import annotations

import copy
import errno
import os
import shutil
import stat
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.checkpoint.destination import Destination, ProtectedDirectory
from automodel_plugins.checkpoint.shards import ShardPlan, default_max_shard_size, parse_shard_size
from automodel_plugins.errors import (
    CheckpointError,
    ConfigError,
    NoSourceError,
    SaveError,
    SaveOptionError,
    SaveWriteError,
    SourceChangedError,
)
from automodel_plugins.model.hf_layout import (
    linear_weights,
    resident_modules,
    saved_tensors,
    transformers_keys,
)
from automodel_plugins.pipeline.composition import SourceRecord, adapter_for, composition_of
from automodel_plugins.pipeline.save.collective import Ranks
from automodel_plugins.pipeline.save.plan import (
    ModelTensor,
    SaveFormat,
    SavePlan,
    SourceView,
    fp8_scale_name,
    plan_save,
    saved_dtype,
)
from automodel_plugins.pipeline.save.values import ModelValues, TensorValues
from automodel_plugins.pipeline.save.write import WriteResult, write_plan
from automodel_plugins.registry import Registry, get_registry
from automodel_plugins.sources import load_config
from automodel_plugins.sources.native import PARAMS_NAME

if TYPE_CHECKING:
    from torch import nn
    from transformers import GenerationConfig, PretrainedConfig, PreTrainedModel

__all__ = ["SaveReport", "save_pretrained", "write_checkpoint"]

_FORMATS_WITHOUT_SOURCE = "'fp8-tensor', 'fp8-block' (transformers' FP8 format) or 'none' (the model's dtype)"


@dataclass
class SaveReport:
    """What a save wrote.

    ``files``: every file of the checkpoint, ``bytes`` their total size. ``quantized``: FP8 weights written;
    of those, ``scales_kept`` kept every scale value from the source (byte-identical when untouched) and
    ``scales_fresh`` got at least one fresh scale (``blocks_rescaled`` counts the block-grid values made
    fresh). ``carried``: source tensors written back unchanged (static activation scales). ``unquantized``:
    tensors written in a float or integer dtype. ``bytes_written``: tensor bytes this rank wrote;
    ``bytes_written_by_rank``: every rank's, by rank.
    """

    path: Path
    quantization: str
    files: list[str] = field(default_factory=list)
    bytes: int = 0
    tensors: int = 0
    quantized: int = 0
    scales_kept: int = 0
    scales_fresh: int = 0
    blocks_rescaled: int = 0
    carried: int = 0
    unquantized: int = 0
    bytes_written: int = 0
    bytes_written_by_rank: list[int] = field(default_factory=list)
    seconds: float = 0.0


def save_pretrained(
    model: PreTrainedModel,
    dest: str | Path,
    *,
    quantization: str = "source",
    block_size: int | Sequence[int] | None = None,
    modules_to_not_convert: Sequence[str] | None = None,
    max_shard_size: int | str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    fsync: bool = True,
    registry: Registry | None = None,
) -> SaveReport:
    """Save ``model`` into the directory ``dest``, as a checkpoint stock transformers (and this host) loads.

    ``quantization``: ``"source"`` (the format the weights were loaded from: key layout, FP8 dtypes, scale
    names, dtypes and shapes, activation scales and ``quantization_config`` as there), ``"fp8-tensor"`` /
    ``"fp8-block"`` (transformers' FP8 format, per tensor or per ``block_size`` block, 128x128 by default;
    ``modules_to_not_convert`` stay unquantized: default the source's list, else transformers'), or ``"none"``
    (the model's dtype, what stock ``save_pretrained`` writes). An FP8 weight keeps its source scale while its
    values still fit it, else gets a fresh one (``amax / 448``, per tensor or per block).

    A sharded model (FSDP2, tensor parallel: DTensor parameters) is saved by every rank calling this
    together: each writes only its own shards, and the files are those one process would write.
    ``max_shard_size`` defaults to transformers' own (50GB). ``dest`` must not be or lie inside the source,
    nor be a non-empty directory unless ``overwrite`` (then the old one is replaced once the new one is
    complete). ``fsync`` (default on, as ``torch.distributed.checkpoint``'s writer) makes every file durable
    before the directory is renamed into place, so a power loss cannot leave a complete-looking checkpoint of
    zeros; stock ``save_pretrained`` does not. Returns a :class:`SaveReport`.
    """
    save_format = SaveFormat.parse(
        quantization, block_size=block_size, modules_to_not_convert=modules_to_not_convert
    )
    _refuse_adapters(model)
    _refuse_meta(model)
    composition = composition_of(model)
    record = composition.source if composition is not None else None
    if record is not None and record.stage:
        raise SaveError(
            "this model is one pipeline stage (load_weights(..., stage=True)): save_pretrained writes whole "
            "models; gather the stages into one model, or save each stage's state dict yourself"
        )
    with ExitStack() as stack:
        source = _open_source(
            model, record, required=save_format.quantization == "source", registry=registry, stack=stack
        )
        tensors = saved_tensors(model)
        return write_checkpoint(
            model,
            dest,
            save_format=save_format,
            tensors=tensors,
            values=ModelValues(tensors, resident=resident_modules(model)),
            source=source,
            declared=record.quantization_config if record is not None else None,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            progress=progress,
            fsync=fsync,
            generation_config=model.generation_config if model.can_generate() else None,
            protected=[record.protected] if record is not None and record.protected is not None else [],
            native_params=_native_params(source, save_format),
        )


def _native_params(source: SourceView | None, save_format: SaveFormat) -> Path | None:
    """The source's ``params.json`` when the model came from Mistral's native form and is saved in the format
    it came in (``quantization="source"``): native in, native out. Other formats write transformers' form."""
    if source is None or save_format.quantization != "source":
        return None
    location = source.checkpoint.location
    return location.config if location is not None and location.is_native else None


def _refuse_adapters(model: nn.Module) -> None:
    """A PEFT model (or one with adapters loaded) holds the base weights and the adapters apart."""
    if getattr(model, "peft_config", None) or getattr(model, "_hf_peft_config_loaded", False):
        raise SaveError(
            "the model carries PEFT adapters: merge them first (model = model.merge_and_unload()), then "
            "save_pretrained(model, dest, quantization='source'); or save the adapters alone with "
            "model.save_pretrained(dest)"
        )


def _refuse_meta(model: nn.Module) -> None:
    """A model built on the meta device (``build_model``) and never loaded has no values to write."""
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        shown = ", ".join(left[:5]) + (f", ... ({len(left)} in all)" if len(left) > 5 else "")
        raise SaveError(
            f"{len(left)} model tensor(s) are still on the meta device ({shown}): there are no values to save. "
            "Load the weights first (load_weights(model, path), after model.to_empty(device=...) for a model "
            "from build_model), or use from_pretrained"
        )


def _open_source(
    model: PreTrainedModel,
    record: SourceRecord | None,
    *,
    required: bool,
    registry: Registry | None,
    stack: ExitStack,
) -> SourceView | None:
    """The source checkpoint reopened (headers only) with the adapter a load of it uses; ``None`` when the
    model has none and the format does not need it (or it is gone and the format can do without)."""
    if record is None:
        if required:
            raise NoSourceError(
                "quantization='source' needs the checkpoint the weights were loaded from, and this model was not "
                "loaded by automodel_plugins.from_pretrained / load_weights (or was loaded through stock "
                f"transformers); pass quantization={_FORMATS_WITHOUT_SOURCE}"
            )
        return None
    changed = record.changed_files()
    if changed:
        if not required:
            return None  # fresh scales everywhere: right whatever the source now holds
        raise SourceChangedError(
            f"the source checkpoint changed since the model was loaded ({', '.join(map(str, changed[:3]))}); "
            f"pass quantization={_FORMATS_WITHOUT_SOURCE}",
            path=record.path,
        )
    try:
        checkpoint = stack.enter_context(Checkpoint.open(record.path))
        config = (
            load_config(record.path) if record.config_file is not None else _declaring(model.config, record)
        )
    except (CheckpointError, ConfigError) as exc:
        if not required:
            return None
        raise NoSourceError(f"the source checkpoint cannot be reopened: {exc}", path=record.path) from exc
    composition = composition_of(model)
    registry = registry or get_registry()
    adapter = adapter_for(registry, composition.plugin if composition else None, config, checkpoint)
    return SourceView(checkpoint, adapter, record.quantization_config)


def _declaring(config: PretrainedConfig, record: SourceRecord) -> PretrainedConfig:
    """A copy of the model's config declaring the source's quantization again (a source without a config
    beside its weights was read with the model's, which stopped declaring it once dequantized)."""
    config = copy.deepcopy(config)
    if record.quantization_config is not None:
        config.quantization_config = copy.deepcopy(record.quantization_config)
    return config


def write_checkpoint(
    model: PreTrainedModel,
    dest: str | Path,
    *,
    save_format: SaveFormat,
    tensors: Mapping[str, torch.Tensor],
    values: TensorValues,
    source: SourceView | None,
    declared: Mapping[str, Any] | None,
    max_shard_size: int | str | None,
    overwrite: bool,
    progress: bool | None,
    generation_config: GenerationConfig | None,
    fsync: bool = True,
    extra_files: Mapping[str, Path] | None = None,
    config: PretrainedConfig | None = None,
    protected: Iterable[Path | ProtectedDirectory] = (),
    label: str = "saving",
    started: float | None = None,
    native_params: Path | bytes | None = None,
    plan: SavePlan | None = None,
) -> SaveReport:
    """Plan, then write ``tensors`` of ``model`` (name -> the model's tensor, for shapes and dtypes; the bytes
    come from ``values``) into ``dest``, with ``config`` (default the model's) and ``extra_files`` (name in the
    checkpoint -> the regular file to copy there) copied in. ``source``: the source checkpoint, open;
    ``declared``: the ``quantization_config`` the weights were loaded under; ``protected``: directories the
    destination must not be, be in, or contain (besides the open source's); ``label`` the progress bar's;
    ``started``: the ``time.perf_counter()`` the work began at (for ``SaveReport.seconds``; default now).
    ``native_params``: write Mistral's native form (consolidated shard names, and this ``params.json`` (a file
    to copy, or its bytes) in place of ``config.json`` and the generation config); the plan's keys must be
    native ones. ``plan``: planned by the caller (default: from ``save_format``). Shared by ``save_pretrained`` and ``convert``; collective when distributed."""
    started = time.perf_counter() if started is None else started
    ranks = Ranks.current()
    try:
        shard_size = parse_shard_size(default_max_shard_size() if max_shard_size is None else max_shard_size)
    except ValueError as exc:
        raise SaveOptionError(str(exc)) from exc
    plan = plan if plan is not None else _plan(model, tensors, save_format, source, declared)
    if plan.partial_blocks and ranks.is_main:
        warnings.warn(
            f"{len(plan.partial_blocks)} weight(s) have sizes the block size {save_format.block_size} does not "
            f"divide (e.g. {plan.partial_blocks[0]}): their edge blocks are partial, which this host reads "
            "but stock transformers 5.x dequantizes wrongly",
            UserWarning,
            stacklevel=3,
        )
    if save_format.is_fp8_format and not plan.quantized and ranks.is_main:
        warnings.warn(
            f"quantization={save_format.quantization!r} quantizes no weight: modules_to_not_convert "
            f"{list(save_format.modules_to_not_convert or [])} (or the source's list) excludes every linear layer",
            UserWarning,
            stacklevel=3,
        )
    protected = [*protected, *([source.checkpoint.directory] if source is not None else [])]
    error: BaseException | None = None
    destination = None
    if ranks.is_main:
        try:
            destination = Destination.prepare(dest, overwrite=overwrite, protected=protected)
        except SaveError as exc:
            error = exc
    ranks.agree(error, "preparing the destination")
    shared = ranks.broadcast(
        None if destination is None else (str(destination.staging), str(destination.final))
    )
    staging, final = Path(shared[0]), Path(shared[1])
    try:
        if not staging.is_dir():
            error = SaveError(
                f"the temporary directory {staging} that rank 0 created is not visible on rank {ranks.rank}: the "
                "destination must be on a file system every rank shares"
            )
        ranks.agree(error, "sharing the temporary directory")
        result = write_plan(
            plan,
            values,
            staging,
            ranks=ranks,
            source=source.checkpoint if source is not None else None,
            max_shard_size=shard_size,
            progress=progress,
            fsync=fsync,
            label=label,
            native=native_params is not None,
        )
        written = ranks.gather(result.bytes_written)
        listing = None
        if destination is not None:
            try:
                _finish(
                    destination,
                    plan,
                    result.shards,
                    model,
                    config,
                    generation_config,
                    extra_files or {},
                    fsync,
                    native_params,
                )
                listing = sorted(
                    (file.name, file.stat().st_size) for file in final.iterdir() if file.is_file()
                )
            except OSError as exc:
                error = SaveWriteError(
                    f"finishing the checkpoint failed: {exc.strerror or exc}", path=final, errno=exc.errno
                )
            except Exception as exc:
                error = exc
        ranks.agree(error, "finishing the checkpoint")
        listing = ranks.broadcast(listing)
    except BaseException:
        if destination is not None:
            destination.abort()
        raise
    report = _report(plan, result, final, listing, written, ranks.rank)
    report.seconds = time.perf_counter() - started
    return report


def _plan(
    model: PreTrainedModel,
    tensors: Mapping[str, torch.Tensor],
    save_format: SaveFormat,
    source: SourceView | None,
    declared: Mapping[str, Any] | None,
) -> SavePlan:
    """The save plan of ``tensors`` in the order ``save_pretrained`` writes them (headers only)."""
    from transformers.quantizers.base import get_keys_to_not_convert

    names = list(tensors)
    linears = linear_weights(model)
    resident = resident_modules(model)  # valued in their compute dtype, not as their uint8 codes
    meta = {
        name: ModelTensor(
            tuple(tensor.shape),
            resident[name].compute_dtype if name in resident else tensor.dtype,
            linears.get(name),
        )
        for name, tensor in tensors.items()
    }
    shapes = {name: m.shape for name, m in meta.items()}
    if save_format.is_fp8_format:
        shapes.update({fp8_scale_name(name): () for name in names if name in linears})
    hf_keys = None
    try:
        hf_keys = transformers_keys(model, list(shapes), shapes)
    except SaveError:
        if save_format.quantization != "source":
            raise
    ordered = [name for name in hf_keys if name in meta] if hf_keys else list(names)
    return plan_save(
        {name: meta[name] for name in ordered},
        save_format,
        hf_keys=hf_keys,
        source=source,
        declared=declared,
        default_not_converted=get_keys_to_not_convert(model) if save_format.is_fp8_format else (),
    )


def _finish(
    destination: Destination,
    plan: SavePlan,
    shards: ShardPlan,
    model: PreTrainedModel,
    config: PretrainedConfig | None,
    generation_config: GenerationConfig | None,
    extra_files: Mapping[str, Path],
    fsync: bool,
    native_params: Path | bytes | None = None,
) -> None:
    """Rank 0, once every tensor is written: the index, the extra files, the generation config, then
    ``config.json`` (last: a directory without it never loads), and the rename into place. Native form:
    ``params.json`` copied last instead, and no generation config (Mistral's native form has none)."""
    staging = destination.staging
    index = shards.index_text(_total_parameters(model, plan))
    if index is not None:
        (staging / shards.index_name).write_text(index, encoding="utf-8")
    for name, file in extra_files.items():
        _copy_regular(file, staging / name)
    if isinstance(native_params, bytes):
        (staging / PARAMS_NAME).write_bytes(native_params)
    elif native_params is not None:
        _copy_regular(native_params, staging / PARAMS_NAME)
    if native_params is not None:
        destination.commit(sync=fsync)
        return
    if generation_config is not None:
        generation_config.save_pretrained(staging)
    _config_to_save(config or model.config, model, plan).save_pretrained(staging)
    destination.commit(sync=fsync)


def _copy_regular(source: Path, target: Path) -> None:
    """Copy the regular file ``source`` (never through a link: one put in its place since it was checked is
    refused) to the new file ``target``."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as reader:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            with open(target, "xb") as writer:
                shutil.copyfileobj(reader, writer)
    except OSError as exc:
        raise SaveWriteError(
            f"cannot copy {source.name} into the checkpoint: {exc.strerror or exc} (it is no longer the regular "
            "file that was checked)",
            path=source,
            errno=exc.errno,
        ) from exc


def _total_parameters(model: PreTrainedModel, plan: SavePlan) -> int:
    """``num_parameters()``, plus the FP8 scales (parameters of transformers' FP8 modules), as transformers
    counts them for a quantized model."""
    scales = sum(int(torch.Size(p.scale.shape).numel()) for p in plan.quantized)
    carried = sum(int(torch.Size(spec.shape).numel()) for p in plan.tensors for spec in p.carried)
    return model.num_parameters() + scales + carried


def _config_to_save(config: PretrainedConfig, model: PreTrainedModel, plan: SavePlan) -> PretrainedConfig:
    """A copy of the config as ``save_pretrained`` records it (``dtype``, ``architectures``), declaring the
    plan's ``quantization_config`` (or none).

    ``dtype`` names what the files hold (:func:`~automodel_plugins.pipeline.save.plan.saved_dtype`), at the top
    and in every sub-config that names one: ``"source"`` writes the source's dtypes, so an fp32 model from a
    bfloat16 checkpoint is saved as bfloat16, and ``from_pretrained(dtype="auto")`` (which reads the top-level
    ``dtype`` and sets it on every sub-config) must load it as such, as it loads the source."""
    config = copy.deepcopy(config)
    written = str(saved_dtype(plan) or model.dtype).split(".")[1]
    config.dtype = written
    for name in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, name, None)
        if sub is not None and getattr(sub, "dtype", None) is not None:
            sub.dtype = written
    config.architectures = [type(model).__name__.removeprefix("FSDP")]
    if "quantization_config" in vars(config):
        del config.quantization_config
    if plan.quantization_config is not None:
        config.quantization_config = copy.deepcopy(plan.quantization_config)
    return config


def _report(
    plan: SavePlan,
    result: WriteResult,
    path: Path,
    listing: list[tuple[str, int]],
    written: list[int],
    rank: int,
) -> SaveReport:
    report = SaveReport(
        path=path,
        quantization=plan.format.quantization,
        files=[name for name, _ in listing],
        bytes=sum(size for _, size in listing),
        tensors=len(plan.specs()),
        quantized=len(plan.quantized),
        carried=sum(len(p.carried) for p in plan.tensors),
        unquantized=len(plan.tensors) - len(plan.quantized),
        bytes_written=written[rank],
        bytes_written_by_rank=written,
    )
    for planned in plan.quantized:
        choice = result.scales[planned.key]
        report.scales_kept += choice.all_kept
        report.scales_fresh += not choice.all_kept
        if planned.scale.block_size is not None:
            report.blocks_rescaled += choice.fresh
    return report
