"""What is composed onto a stock model, and the calls that ask the winning plugin for each part.

Every load path (``from_pretrained``, ``build_model`` + ``load_weights``, ``inspect``) asks the same
questions through these functions, so the adapter a plugin returns (or the default, when it returns none)
and the forward it binds are checked in one place.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automodel_plugins.adapters import StateDictAdapter, TensorSource, fp8_adapter_for
from automodel_plugins.checkpoint.destination import ProtectedDirectory
from automodel_plugins.errors import AutomodelPluginsError, PluginError
from automodel_plugins.fp8.quantization import quantization_dict

if TYPE_CHECKING:
    from torch import nn
    from transformers import PretrainedConfig, PreTrainedModel

    from automodel_plugins.checkpoint import Checkpoint
    from automodel_plugins.pipeline.load.report import LoadReport
    from automodel_plugins.registry import ClaimVerdict, Registry
    from automodel_plugins.sources import CheckpointLocation

__all__ = [
    "COMPOSITION_ATTR",
    "CheckedAdapter",
    "Composition",
    "FileStamp",
    "SourceRecord",
    "adapter_for",
    "bind_forward",
    "compose",
    "composition_of",
    "drop_quantization_config",
    "record_source",
]

COMPOSITION_ATTR = "automodel_composition"


@dataclass(frozen=True)
class FileStamp:
    """A file as it was when read, to tell whether it changed since: its size, modification and status-change
    times and inode, and for a safetensors file a digest of its header (names, dtypes, shapes, offsets).

    The status-change time (``ctime``) moves with every write and cannot be set back by a user, unlike the
    modification time: a rewrite of the same size with the old ``mtime`` restored is still seen. The header
    digest sees a new header under any metadata.
    """

    path: Path
    size: int
    mtime_ns: int
    ctime_ns: int = 0
    inode: int = 0
    header_digest: str | None = None

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        info = path.stat()
        digest = _header_digest(path) if path.name.endswith(".safetensors") else None
        return cls(path, info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino, digest)

    def changed(self) -> bool:
        try:
            return FileStamp.of(self.path) != self
        except OSError:
            return True


@dataclass(frozen=True)
class SourceRecord:
    """The checkpoint a model's weights were loaded from: what ``save_pretrained(..., quantization="source")``
    writes back to (its key layout, FP8 scales, activation scales and ``quantization_config``).

    ``path`` is what the checkpoint was opened from (a directory, or the weights file, index or config named);
    ``quantization_config`` is the source ``config.json``'s own, as written there; ``adapter`` what the
    adapter described (layout, granularity, scale names); ``files`` the config and weights as they were then;
    ``protected`` the directory's real path, device and inode then: no save may write over it, whatever it
    holds now.
    """

    path: Path
    directory: Path
    config_file: Path | None
    quantization_config: dict[str, Any] | None
    adapter: dict[str, Any]
    files: tuple[FileStamp, ...]
    stage: bool = False
    protected: ProtectedDirectory | None = None

    def changed_files(self) -> list[Path]:
        """Files of the source that changed (or vanished) since the load."""
        return [stamp.path for stamp in self.files if stamp.changed()]


def _header_digest(path: Path) -> str | None:
    """SHA-256 of the file's ``8 + header length`` first bytes (``None`` when they cannot be read as such)."""
    from automodel_plugins.checkpoint.header import MAX_HEADER_BYTES

    try:  # not blocking on a FIFO put in the file's place: checked on the open file
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        prefix = os.pread(fd, 8, 0)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else MAX_HEADER_BYTES + 1
        if length > MAX_HEADER_BYTES:
            return None
        return hashlib.sha256(prefix + os.pread(fd, length, 8)).hexdigest()
    except OSError:
        return None
    finally:
        os.close(fd)


def record_source(
    location: CheckpointLocation,
    checkpoint: Checkpoint,
    adapter: StateDictAdapter,
    *,
    fallback_config: PretrainedConfig | None = None,
    stage: bool = False,
) -> SourceRecord:
    """The :class:`SourceRecord` of a load from ``checkpoint``. Its ``quantization_config`` is read from the
    source's ``config.json`` as written (``fallback_config``'s when the weights have no config beside them)."""
    config_file = location.config if location.has_config() else None
    if config_file is not None:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
        if location.is_native:  # params.json: its quantization as the translated config declares it
            from automodel_plugins.sources.native import translate_params

            raw = translate_params(raw, config_file)
        quantization = raw.get("quantization_config")
    else:
        quantization = quantization_dict(fallback_config) if fallback_config is not None else None
    files = [checkpoint.index_path, *checkpoint.files, config_file]
    return SourceRecord(
        path=location.named_weights or location.directory,
        directory=location.directory,
        config_file=config_file,
        quantization_config=None if quantization is None else json.loads(json.dumps(quantization)),
        adapter=adapter.describe(),
        # A stage's load from a hub repo leaves other stages' shards on the hub: only local files were read.
        files=tuple(FileStamp.of(path) for path in files if path is not None and path.is_file()),
        stage=stage,
        protected=ProtectedDirectory.of(location.directory),
    )


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
    fp8_resident: list[str] = field(default_factory=list)
    """Names of the layers that keep their checkpoint FP8 weight (``dequantize=False``)."""
    fp8_not_resident: list[str] = field(default_factory=list)
    """FP8 tensors a ``dequantize=False`` load still dequantized: not ``nn.Linear`` weights (fused experts)."""
    options: dict[str, Any] = field(default_factory=dict)
    source: SourceRecord | None = None
    """The checkpoint the weights came from (``None``: never loaded from one by this host)."""


def compose(registry: Registry, claim: ClaimVerdict | None, **options: Any) -> Composition:
    """The record of a model composed by ``claim``'s plugin (``None``: no plugin), with the load options."""
    plugin = None if claim is None else claim.plugin
    return Composition(
        plugin=plugin,
        plugin_version=registry.version(plugin) if plugin else None,
        distribution=registry.distribution(plugin) if plugin else None,
        claim_reason=claim.reason if claim else None,
        options=dict(options),
    )


def composition_of(model: nn.Module) -> Composition | None:
    """The model's composition record, or ``None`` for a model the host did not compose."""
    return getattr(model, COMPOSITION_ATTR, None)


def adapter_for(
    registry: Registry, plugin: str | None, config: PretrainedConfig, checkpoint: Checkpoint
) -> StateDictAdapter:
    """The plugin's ``state_dict_adapter`` answer (wrapped in a :class:`CheckedAdapter`), else the host's
    default: :func:`fp8_adapter_for`, which reads the config's ``quantization_config`` (block size, modules
    never converted) and keeps names as they are, so a plugin whose checkpoints need nothing special implements
    no adapter at all."""
    adapter = (
        registry.call(plugin, "state_dict_adapter", config=config, checkpoint=checkpoint) if plugin else None
    )
    if adapter is None:
        return fp8_adapter_for(config, checkpoint)
    if not isinstance(adapter, StateDictAdapter):
        raise PluginError(
            plugin, "state_dict_adapter", f"returned {type(adapter).__name__}, not a StateDictAdapter"
        )
    return CheckedAdapter(plugin, adapter)


class CheckedAdapter(StateDictAdapter):
    """A plugin's adapter whose every answer is checked: an exception inside it, or a ``from_hf`` answer that
    is no well-formed :class:`TensorSource`, is a :class:`PluginError` naming the plugin (the host's own typed
    errors pass through, with a note naming the plugin), never a raw exception from deep inside planning."""

    hook = "state_dict_adapter"

    def __init__(self, plugin: str, adapter: StateDictAdapter) -> None:
        self.plugin = plugin
        self.adapter = adapter

    def from_hf(self, name: str) -> TensorSource:
        return self._ask("from_hf", name, check=_malformed)

    def to_hf(self, name: str) -> str:
        return self._ask(
            "to_hf", name, check=lambda key: None if isinstance(key, str) else _not_a(key, "str")
        )

    def describe(self) -> dict[str, Any]:
        return self._ask(
            "describe", check=lambda info: None if isinstance(info, dict) else _not_a(info, "dict")
        )

    def _ask(self, method: str, *args: Any, check: Callable[[Any], str | None]) -> Any:
        """Call the adapter's ``method``; its exception, or what ``check`` finds wrong with its answer, becomes a
        PluginError naming the plugin."""
        call = f"its adapter's {method}({', '.join(map(repr, args))})"
        try:
            answer = getattr(self.adapter, method)(*args)
        except AutomodelPluginsError as exc:
            if not isinstance(exc, PluginError):
                exc.add_note(f"raised by the adapter of plugin {self.plugin!r} ({method})")
            raise
        except Exception as exc:
            raise PluginError(self.plugin, self.hook, f"{call} raised {type(exc).__name__}: {exc}") from exc
        problem = check(answer)
        if problem:
            raise PluginError(self.plugin, self.hook, f"{call} returned {problem}")
        return answer


def _not_a(value: Any, expected: str) -> str:
    return f"{type(value).__name__}, not a {expected}"


def _malformed(source: Any) -> str | None:
    """What is wrong with a ``from_hf`` answer, or None for a well-formed TensorSource."""
    if not isinstance(source, TensorSource):
        return _not_a(source, "TensorSource")
    if not isinstance(source.key, str) or not (source.scale_key is None or isinstance(source.scale_key, str)):
        return f"{source!r}: key and scale_key must be strings"
    block = source.block_size
    if block is not None and not (
        isinstance(block, tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)
    ):
        return f"{source!r}: block_size must be None or two positive ints"
    if not isinstance(source.dropped_keys, tuple) or not all(isinstance(k, str) for k in source.dropped_keys):
        return f"{source!r}: dropped_keys must be a tuple of strings"
    return None


def bind_forward(
    registry: Registry,
    plugin: str,
    model: PreTrainedModel,
    config: PretrainedConfig,
    composition: Composition,
) -> None:
    """Bind the plugin's ``forward_override`` answer as ``model.forward`` on this instance (class untouched)."""
    forward = registry.call(plugin, "forward_override", model=model, config=config)
    if forward is None:
        return
    if not callable(forward):
        raise PluginError(
            plugin, "forward_override", f"returned {type(forward).__name__}, which is not callable"
        )
    model.forward = types.MethodType(forward, model)
    composition.forward_overridden = True


def drop_quantization_config(model: nn.Module) -> str | None:
    """The weights are plain floats now: stop the config declaring a quantization, so that
    ``save_pretrained`` writes a checkpoint stock transformers loads as it is. Returns the method dropped."""
    config = model.config
    quantization = quantization_dict(config)
    if quantization is None:
        return None
    del config.quantization_config
    return str(quantization.get("quant_method"))
