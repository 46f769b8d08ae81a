"""Exceptions users catch. Each names the plugin, file, key or field at fault."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path


class AutomodelPluginsError(Exception):
    """Base of every error this package raises on purpose."""


# --- registry ---------------------------------------------------------------------------------------------


class PluginError(AutomodelPluginsError):
    """A plugin failed: import, validation, or an exception inside one of its hooks."""

    def __init__(self, plugin: str, hook: str | None, message: str) -> None:
        self.plugin = plugin
        self.hook = hook
        where = f"plugin {plugin!r}" + (f" in hook {hook!r}" if hook else "")
        super().__init__(f"{where}: {message}")


class UnknownPluginError(AutomodelPluginsError):
    """``AUTOMODEL_PLUGINS`` (or a caller) named a plugin that is not installed."""

    def __init__(self, names: Iterable[str], available: Iterable[str]) -> None:
        self.names = sorted(names)
        self.available = sorted(available)
        super().__init__(
            f"unknown plugin(s) {', '.join(map(repr, self.names))} in AUTOMODEL_PLUGINS; "
            f"installed: {', '.join(self.available) or '(none)'}"
        )


class AmbiguousClaimError(AutomodelPluginsError):
    """Several plugins claim the same config at the same highest priority."""

    def __init__(self, claimants: Iterable[str], priority: int) -> None:
        self.claimants = sorted(claimants)
        self.priority = priority
        super().__init__(
            f"plugins {', '.join(map(repr, self.claimants))} all claim this config at priority {priority}; "
            "select one with AUTOMODEL_PLUGINS=<name> or uninstall the others"
        )


class NoPluginClaimError(AutomodelPluginsError):
    """``require_plugin=True`` and no plugin claimed the config."""


class LoadOptionError(AutomodelPluginsError, TypeError, ValueError):
    """A transformers ``from_pretrained`` option (or a value of one) that this load cannot honour: names the
    option and says why, and what to do instead (see ``docs/loading-options.md``). A ``TypeError`` (an
    unexpected keyword) and a ``ValueError`` (a refused value) alike, so code catching either catches it."""

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        super().__init__(f"option {option}: {message}")


# --- config and checkpoint --------------------------------------------------------------------------------


class ConfigError(AutomodelPluginsError, ValueError):
    """A ``config.json`` that cannot be read or does not describe a model we can build."""

    def __init__(self, path: str | Path | None, message: str) -> None:
        self.path = None if path is None else Path(path)
        super().__init__(f"{path}: {message}" if path is not None else message)


class UnsupportedQuantizationError(ConfigError):
    """The config declares a quantization the load cannot apply: a method the claiming plugin does not handle,
    a malformed FP8 field, or (on the stock path) none at all for a checkpoint that holds FP8 tensors."""


class ConfigMismatchError(ConfigError):
    """A ``config.json`` describing a model the checkpoint does not hold (more layers than it has, another
    vocabulary or width): refused from the headers, before a model is built."""


class ExpertsImplementationError(ConfigError):
    """The model's ``experts_implementation`` is one FP8-resident experts cannot run (a CUDA kernel of stock's
    that takes dequantized weights): raised at the forward, naming it and the ones that run."""


class CheckpointError(AutomodelPluginsError, ValueError):
    """A checkpoint that cannot be loaded as it is. ``path`` and ``key`` name the culprit when known."""

    def __init__(self, message: str, *, path: str | Path | None = None, key: str | None = None) -> None:
        self.path = None if path is None else Path(path)
        self.key = key
        where = " ".join(p for p in (str(path) if path is not None else "", f"[{key}]" if key else "") if p)
        super().__init__(f"{where}: {message}" if where else message)


class SourceNotFoundError(ConfigError, CheckpointError):
    """A checkpoint (directory, weights file, index or ``config.json``) that is not there.

    One resolver decides what a path names for config loading and checkpoint reading alike, so the error is
    both a :class:`ConfigError` and a :class:`CheckpointError`: code catching either catches it.
    """

    def __init__(self, path: str | Path, message: str = "no such file or directory") -> None:
        self.path = Path(path)
        self.key = None
        Exception.__init__(self, f"{path}: {message}")


class HubError(ConfigError, CheckpointError):
    """A checkpoint named by a Hugging Face Hub repo id that cannot be had: names the repo, revision and file.

    Both a :class:`ConfigError` and a :class:`CheckpointError`, like a missing local path, since a repo id
    stands wherever a checkpoint path does. The message always says what to do about it.
    """

    def __init__(
        self, repo_id: str, message: str, *, revision: str | None = None, filename: str | None = None
    ) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.filename = filename
        self.path = None
        self.key = None
        at = f"@{revision}" if revision else ""
        where = f"hub repo {repo_id!r}{at}" + (f" file {filename!r}" if filename else "")
        Exception.__init__(self, f"{where}: {message}")


class HubRepoNotFoundError(HubError, SourceNotFoundError):
    """Neither a local path nor a hub repo this caller can see (unknown, or private without a valid token)."""


class HubRevisionNotFoundError(HubError, SourceNotFoundError):
    """The repo exists but has no such branch, tag or commit."""


class HubFileNotFoundError(HubError):
    """The repo (at this revision) lacks a file the load needs: its ``config.json``, or any weights we read."""


class HubAccessError(HubError):
    """A gated (or private) repo whose files need a token with access: none was given, or it lacks access."""


class HubOfflineError(HubError, SourceNotFoundError):
    """Downloads are off (``HF_HUB_OFFLINE=1``, ``local_files_only=True``) or the hub cannot be reached, and
    the cache lacks what the load needs."""


class HubDownloadError(HubError):
    """Any other failure to fetch a file (a server error, a truncated body, a download past its deadline, a
    download another rank made that failed)."""


class UnsafeHubAnswerError(HubDownloadError):
    """The hub (or a mirror) answered something this package refuses to act on: a commit that is not 40 hex
    digits (or not the one asked for), an ``ETag`` that is not a plain token, a body longer than announced.
    huggingface_hub names cache paths after these answers, so they are refused before anything is written."""


class HubDiskSpaceError(HubDownloadError):
    """A file the hub announces (with the load's other files still to download) does not fit in the free space
    of the cache's filesystem: refused before its body is fetched, rather than filling the disk."""

    announced: int | None = None
    free: int | None = None


class HubGuardUnavailableError(HubError):
    """The installed huggingface_hub lacks what this package checks a hub's answers through (its client factory,
    its Xet switch): downloads are refused rather than made unchecked."""


class CorruptCheckpointError(CheckpointError):
    """A safetensors file that is truncated, has a malformed header, or an index that does not parse."""


class UnsafeCheckpointPathError(CheckpointError):
    """An index entry that resolves outside the checkpoint directory."""


class MissingKeysError(CheckpointError):
    """Model tensors the checkpoint does not provide."""

    def __init__(self, keys: Iterable[str], *, path: str | Path | None = None) -> None:
        self.keys = sorted(keys)
        super().__init__(
            f"{len(self.keys)} model tensor(s) missing from the checkpoint: {_listing(self.keys)}", path=path
        )


class UnexpectedKeysError(CheckpointError):
    """Checkpoint tensors that no model tensor consumes."""

    def __init__(self, keys: Iterable[str], *, path: str | Path | None = None) -> None:
        self.keys = sorted(keys)
        super().__init__(
            f"{len(self.keys)} checkpoint tensor(s) the model does not use: {_listing(self.keys)}", path=path
        )


class ShapeMismatchError(CheckpointError):
    """A checkpoint tensor whose shape differs from the model's."""


class DtypeMismatchError(CheckpointError):
    """A checkpoint tensor whose dtype cannot be loaded into the model's tensor."""


class ScaleError(CheckpointError):
    """An FP8 weight without a scale, or a scale that is not finite and positive or does not fit the weight."""


class NotQuantizedError(CheckpointError):
    """``dequantize=False`` asked to keep FP8 weights resident, but the checkpoint has no FP8 linear weight."""


class NonFiniteWeightError(CheckpointError):
    """A weight whose loaded values would hold NaN or inf: an FP8 NaN code, or a value times its scale that
    overflows the dtype the model loads in."""


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# --- training ---------------------------------------------------------------------------------------------


class FrozenFp8WeightError(AutomodelPluginsError, RuntimeError):
    """Gradients were asked of an FP8-resident weight, which holds the checkpoint's FP8 codes and stays frozen."""


class TensorParallelError(AutomodelPluginsError, ValueError):
    """A tensor-parallel layout an FP8-resident layer cannot run (a placement other than a row or column split
    on one mesh dim, or an input not laid out as that split needs); names the layer and the layout."""


class ExpertParallelError(AutomodelPluginsError, ValueError):
    """An expert-parallel layout the experts cannot take (an expert count the EP degree does not divide, a
    module already placed, a mesh that is not 1-D); names the experts module and the sizes."""


class ExpertTensorParallelError(ExpertParallelError, TensorParallelError):
    """An expert tensor-parallel split the experts cannot take (an intermediate size the TP degree does not
    divide into whole scale blocks, LoRA on the experts, dequantized experts); names the module or tensor."""


class LayoutError(AutomodelPluginsError, ValueError):
    """A parallel layout the memory plan cannot take (``--layout fsdp=8,tp=2``): names the degree at fault."""


class FrozenFp8BaseWarning(UserWarning):
    """An optimizer step on an FP8-resident model (``dequantize=False``) none of whose FP8 layers carries a
    trainable adapter: the step can train only what is not FP8 (embeddings, norms, the head)."""


class TrainerOptionError(AutomodelPluginsError, ValueError):
    """A trainer option the fused loss does not implement (``automodel_plugins.integrations.trl.SFTTrainer``); names it."""


# --- model fix-ups ----------------------------------------------------------------------------------------


class RotaryRepairError(AutomodelPluginsError):
    """A rotary module whose buffers cannot be recomputed; names the module and its class."""


# --- saving -----------------------------------------------------------------------------------------------


class SaveError(AutomodelPluginsError):
    """A save (``save_pretrained``, ``convert``) that cannot be done as asked. ``path`` names the destination
    or the source at fault when known; nothing that loads as a checkpoint is left behind."""

    def __init__(self, message: str, *, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        super().__init__(f"{path}: {message}" if path is not None else message)


class SaveOptionError(SaveError, ValueError):
    """A save option that is not valid (a block size, a shard size, a module list)."""


class UnknownQuantizationError(SaveOptionError):
    """A ``quantization`` (or ``--to``) value that is not one of the formats a save writes."""


class NoNativeLayoutError(SaveOptionError):
    """Mistral's native form (``params.json``, ``consolidated*.safetensors``) asked of a model that has none (not
    a Mistral3-family model), or of a config with a field the native ``params.json`` cannot say (named)."""


class NoSourceError(SaveError):
    """``quantization="source"`` for a model that was not loaded from a checkpoint (or whose source is gone)."""


class SourceChangedError(SaveError):
    """The source checkpoint's files changed since the model was loaded from them."""


class DestinationError(SaveError):
    """A destination that cannot receive a checkpoint: inside the source, non-empty, a file, or unwritable."""


class SaveWriteError(SaveError):
    """Writing failed part way (a full disk, an I/O error, a rank that failed); ``errno`` as the OS reported it."""

    def __init__(self, message: str, *, path: str | Path | None = None, errno: int | None = None) -> None:
        self.errno = errno
        super().__init__(message, path=path)


# --- how advice names an option ---------------------------------------------------------------------------
# An error's advice names an option as the Python argument (``revision=``) from Python, as the flag
# (``--revision``) from the command line, so users are told what to type where they are. The CLI runs its
# commands under :func:`cli_spelling`; messages built meanwhile (also in worker threads started with a copy of
# the context) spell options through :func:`option`.

_CLI: ContextVar[bool] = ContextVar("automodel_plugins_cli_spelling", default=False)

OPTION_FLAGS = {
    "revision": "--revision",
    "cache_dir": "--cache-dir",
    "local_files_only": "--local-files-only",
}
"""Python arguments and the CLI flags that set them (a token has no flag: ``HF_TOKEN`` or ``hf auth login``)."""


def in_cli() -> bool:
    """Whether the current call came from the command line."""
    return _CLI.get()


def option(name: str, value: str | None = None) -> str:
    """``name`` as the caller spells it: ``revision=`` / ``local_files_only=True`` in Python, ``--revision`` /
    ``--local-files-only`` on the command line (``value`` is shown in Python only; flags take it after them)."""
    if in_cli() and name in OPTION_FLAGS:
        return OPTION_FLAGS[name]
    return f"{name}={value if value is not None else ''}"


@contextmanager
def cli_spelling() -> Iterator[None]:
    """Spell options as CLI flags in the messages built inside."""
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


class StockSaveRefusedError(SaveError):
    """A stock ``model.save_pretrained`` that would write a checkpoint whose ``quantization_config`` does not
    describe its tensors (an FP8-resident model loaded from compressed-tensors that holds FP8-resident fused
    experts, which have no compressed-tensors form transformers loads). Names the destination; nothing is
    written."""
