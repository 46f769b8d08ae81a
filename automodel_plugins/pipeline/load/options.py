"""transformers' ``from_pretrained`` options on the host's load path, decided once, in one table.

:data:`OPTIONS` classifies every keyword transformers 5.25's ``PreTrainedModel.from_pretrained`` takes by what
it does when a plugin claims the config (``docs/loading-options.md`` is the same table, checked against this
one by a test):

* ``supported``: the plugin path gives it transformers' meaning;
* ``accepted``: taken and without effect, as in transformers 5 (``low_cpu_mem_usage``) or because the plugin
  path already behaves so (``weights_only``: safetensors never unpickles);
* ``stock-only``: the plugin path refuses a non-default value with :class:`LoadOptionError` saying why and what
  to do instead; with no plugin claiming the config it goes to transformers unchanged;
* ``refused``: refused on both paths (``trust_remote_code=True``).

A transformers default (``None``, ``False``, ``""`` ...) is never refused: it asks for nothing. A keyword that is
no option but an attribute of the config (``output_attentions=True``) updates the config, as transformers does;
any other keyword is a :class:`LoadOptionError` (transformers would pass it to the model's ``__init__``, which
raises ``TypeError``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from automodel_plugins.errors import ConfigError, LoadOptionError
from automodel_plugins.sources.resolve import read_regular_file

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from automodel_plugins.checkpoint import Checkpoint

__all__ = [
    "OPTIONS",
    "LoadOptions",
    "OptionRule",
    "apply_config_overrides",
    "auto_dtype",
    "build_dtype",
    "load_dtype",
    "parse_load_options",
    "resolve_dtype",
]

Status = Literal["supported", "accepted", "stock-only", "refused"]
TORCH_DTYPE_DEPRECATION = "`torch_dtype` is deprecated! Use `dtype` instead!"  # transformers' own words


@dataclass(frozen=True)
class OptionRule:
    """What one option does on the plugin path (``plugin_path``: its meaning there, or why it is refused)."""

    status: Status
    plugin_path: str
    default: Any = None
    also_accepts: tuple[Any, ...] = ()
    test: str = ""

    def asks_nothing(self, value: Any) -> bool:
        """``value`` is transformers' default (or another value that changes nothing)."""
        return any(_same(value, ok) for ok in (self.default, *self.also_accepts))


def _same(value: Any, expected: Any) -> bool:
    if value is expected:
        return True
    plain = (bool, int, str, type(None))
    return type(value) is type(expected) and isinstance(value, plain) and value == expected


_HUB = "explicit parameter: a repo id's config, index and shards come through huggingface_hub's cache"
_SHARD = (
    "build_model(...), shard (fully_shard / parallelize_module), then load_weights(...): each rank reads only "
    "its own slices"
)
_OPTIONS_TEST = "tests/test_loading_options.py"

OPTIONS: Mapping[str, OptionRule] = {
    # --- what and in which dtype ---------------------------------------------------------------------------
    "dtype": OptionRule(
        "supported",
        'a torch.dtype, its name, or "auto" (the default, as in transformers 5): config.json\'s dtype, else '
        "the index's metadata dtype, else the first floating non-FP8 tensor of the first shard; FP8 weights "
        "are dequantized to it (dequantize=False: their compute dtype)",
        test=f"{_OPTIONS_TEST}::test_dtype_auto_*",
    ),
    "torch_dtype": OptionRule(
        "supported",
        "the old name of dtype (dtype wins when both are given), with transformers' deprecation message",
        test=f"{_OPTIONS_TEST}::test_torch_dtype_alias_warns_as_transformers",
    ),
    "attn_implementation": OptionRule(
        "supported",
        'given to the stock class\'s construction as transformers does ("eager", "sdpa", "flex_attention", '
        '"flash_attention_2/3" where installed, a hub kernel, or a per-sub-config dict); '
        "model.config._attn_implementation is stock's; an unavailable one is refused with transformers' reason",
        test=f"{_OPTIONS_TEST}::test_attn_implementation_*",
    ),
    "experts_implementation": OptionRule(
        "supported",
        'given to the stock class\'s construction ("eager", "grouped_mm", "batched_mm"); FP8-resident experts '
        "(dequantize=False) always run their one-expert-at-a-time loop",
        test=f"{_OPTIONS_TEST}::test_experts_implementation_*",
    ),
    "config": OptionRule(
        "supported",
        "a PretrainedConfig used instead of the checkpoint's config.json (claimed, and checked against the "
        "headers, like it); a path is refused: pass the loaded config",
        test=f"{_OPTIONS_TEST}::test_config_object_replaces_config_json",
    ),
    # --- where ---------------------------------------------------------------------------------------------
    "device_map": OptionRule(
        "supported",
        'a device ("cpu", "cuda", "cuda:1", an index, a torch.device, {"": device}), a dict over modules, or '
        '"auto" / "balanced" / "balanced_low_0" / "sequential" (the map transformers computes, on the meta '
        "model in the load's dtype, FP8-resident layers at their FP8 size): each tensor is streamed straight "
        'to its device, and a map over several devices gets accelerate\'s hooks, as stock; "disk" and "meta" '
        "entries are refused",
        test=f"{_OPTIONS_TEST}::test_device_map_*",
    ),
    "max_memory": OptionRule(
        "supported",
        "the per-device budget of an automatic device_map",
        test=f"{_OPTIONS_TEST}::test_device_map_*",
    ),
    "low_cpu_mem_usage": OptionRule(
        "accepted",
        "the plugin path is always low-memory: built on meta, each tensor streamed to its device "
        "(transformers 5 ignores it too)",
        also_accepts=(True,),
        test=f"{_OPTIONS_TEST}::test_accepted_options_change_nothing",
    ),
    "disable_mmap": OptionRule(
        "supported",
        "True: tensors are private copies, not views of the memory-mapped shards (the same as mmap=False)",
        test=f"{_OPTIONS_TEST}::test_disable_mmap_is_mmap_false",
    ),
    # --- hub -----------------------------------------------------------------------------------------------
    "revision": OptionRule("supported", _HUB, test="tests/test_hub_download.py"),
    "cache_dir": OptionRule("supported", _HUB, test="tests/test_hub_cache.py"),
    "token": OptionRule("supported", _HUB, test="tests/test_hub_download.py"),
    "local_files_only": OptionRule("supported", _HUB, test="tests/test_hub_download.py"),
    "force_download": OptionRule(
        "stock-only",
        "downloads go through huggingface_hub's cache, checked file by file; to fetch again, delete the repo's "
        "cache entry (huggingface-cli delete-cache)",
        default=False,
    ),
    "proxies": OptionRule(
        "stock-only",
        "set HTTPS_PROXY / HTTP_PROXY in the environment: huggingface_hub's session honours them",
    ),
    "subfolder": OptionRule(
        "stock-only",
        "name the checkpoint directory itself (a local path ending in the subfolder)",
        default="",
    ),
    "variant": OptionRule(
        "stock-only", "the plugin path reads model.safetensors or the index's shards; name the weights file"
    ),
    "use_safetensors": OptionRule(
        "stock-only",
        "the plugin path reads safetensors only (True and None change nothing; False is refused)",
        also_accepts=(True,),
    ),
    "weights_only": OptionRule(
        "accepted",
        "safetensors holds no code: nothing is unpickled, whatever the value",
        default=True,
        also_accepts=(False,),
        test=f"{_OPTIONS_TEST}::test_accepted_options_change_nothing",
    ),
    "gguf_file": OptionRule("stock-only", "the plugin path reads safetensors checkpoints only"),
    # --- what is loaded --------------------------------------------------------------------------------
    "output_loading_info": OptionRule(
        "supported",
        "returns (model, info) as transformers does; the info's key lists are empty, since a missing, "
        "unexpected or mismatched tensor fails the load with a typed error instead",
        default=False,
        test=f"{_OPTIONS_TEST}::test_output_loading_info_as_transformers",
    ),
    "generation_config": OptionRule(
        "supported", "becomes model.generation_config", test=f"{_OPTIONS_TEST}::test_generation_config_is_set"
    ),
    "state_dict": OptionRule(
        "stock-only", "the plugin path streams the checkpoint's own tensors; load a state dict yourself"
    ),
    "quantization_config": OptionRule(
        "stock-only",
        "the checkpoint's own quantization_config decides how FP8 is read; dequantize=False keeps FP8 weights "
        "resident, save_pretrained(quantization=...) chooses the saved format",
    ),
    "key_mapping": OptionRule(
        "stock-only", "the claiming plugin's state_dict_adapter maps checkpoint keys to the model's names"
    ),
    "ignore_mismatched_sizes": OptionRule(
        "stock-only",
        "a tensor whose shape differs from the model's is a ShapeMismatchError: a config the headers contradict "
        "is refused before a model is built",
        default=False,
    ),
    "adapter_name": OptionRule(
        "stock-only",
        "load the adapter on the returned model: peft.PeftModel.from_pretrained(model, adapter_path)",
        default="default",
    ),
    "adapter_kwargs": OptionRule(
        "stock-only", "load the adapter on the returned model: peft.PeftModel.from_pretrained(model, ...)"
    ),
    # --- offloading and parallelism --------------------------------------------------------------------
    "offload_folder": OptionRule(
        "stock-only",
        'disk offload is not supported: give device_map/max_memory room for every module ("disk" '
        "entries are refused)",
    ),
    "offload_buffers": OptionRule(
        "stock-only", "disk and CPU offloading of buffers is not supported", default=False
    ),
    "offload_state_dict": OptionRule(
        "accepted", "ignored by transformers 5 as well", also_accepts=(True, False)
    ),
    "distributed_config": OptionRule("stock-only", _SHARD),
    "device_mesh": OptionRule("stock-only", _SHARD),
    "tp_plan": OptionRule("stock-only", _SHARD),
    "tp_size": OptionRule("stock-only", _SHARD),
    # --- code and kernels ------------------------------------------------------------------------------
    "trust_remote_code": OptionRule(
        "refused",
        "plugins serve transformers' own classes; code shipped with a checkpoint never runs (False accepted)",
        also_accepts=(False,),
        test=f"{_OPTIONS_TEST}::test_trust_remote_code_is_refused_on_both_paths",
    ),
    "use_kernels": OptionRule(
        "stock-only",
        "hub kernels replace module forwards the plugin's forward override and FP8-resident layers were "
        "written against (False and None accepted)",
        also_accepts=(False,),
    ),
    "kernel_config": OptionRule("stock-only", "see use_kernels"),
    "kernels_mode": OptionRule("stock-only", "see use_kernels"),
    "allow_all_kernels": OptionRule("stock-only", "see use_kernels", default=False),
    "fusion_config": OptionRule(
        "stock-only", "fusions replace modules the plugin's adapter and forward override were written against"
    ),
    "tqdm_class": OptionRule("stock-only", "progress= switches the host's progress bars"),
    # --- ignored by transformers 5, or internal ----------------------------------------------------------
    "mirror": OptionRule("accepted", "ignored by transformers 5 as well", also_accepts=(True, False)),
    "_fast_init": OptionRule("accepted", "ignored by transformers 5 as well", also_accepts=(True, False)),
    "from_tf": OptionRule("accepted", "ignored by transformers 5 as well", also_accepts=(True, False)),
    "from_flax": OptionRule("accepted", "ignored by transformers 5 as well", also_accepts=(True, False)),
    "_from_auto": OptionRule(
        "accepted", "transformers-internal: set by its Auto classes", also_accepts=(True, False)
    ),
    "_from_pipeline": OptionRule("accepted", "transformers-internal: set by pipeline()"),
    "_commit_hash": OptionRule(
        "accepted", "transformers-internal: the revision is resolved once, to a commit"
    ),
}

# Options the host reads itself on the plugin path (the others there are accepted or refused).
_PLUGIN_PATH = frozenset(
    {
        "dtype",
        "torch_dtype",
        "attn_implementation",
        "experts_implementation",
        "config",
        "device_map",
        "max_memory",
        "disable_mmap",
        "output_loading_info",
        "generation_config",
    }
)
# What ``build_model`` (the model on meta, nothing loaded) can take: the options that shape the built model.
BUILD_OPTIONS = frozenset({"dtype", "torch_dtype", "attn_implementation", "experts_implementation"})


@dataclass
class LoadOptions:
    """transformers' options of one call, sorted: what the plugin path reads, and the call as stock gets it."""

    dtype: torch.dtype | str | None = None
    build: dict[str, Any] = field(default_factory=dict)
    """``attn_implementation`` / ``experts_implementation`` as given: keywords of the class's construction."""
    device_map: Any = None
    max_memory: Mapping[Any, Any] | None = None
    mmap: bool | None = None
    output_loading_info: bool = False
    generation_config: Any = None
    config: PretrainedConfig | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    """Keywords that are no option: config attributes to update (checked once the config is known)."""
    stock_only: dict[str, Any] = field(default_factory=dict)
    """Options given with a value other than transformers' default that only the stock path honours."""
    stock: dict[str, Any] = field(default_factory=dict)
    """Every transformers option given (``torch_dtype`` folded into ``dtype``), for the stock path."""

    def check_plugin_path(self, plugin: str) -> None:
        """Refuse what only the stock path honours, naming the plugin that claimed the config."""
        for name, value in self.stock_only.items():
            raise LoadOptionError(
                name,
                f"{value!r} is not supported when a plugin loads the checkpoint (plugin {plugin!r} claims this "
                f"config): {OPTIONS[name].plugin_path}",
            )


def parse_load_options(kwargs: Mapping[str, Any], *, build_only: bool = False) -> LoadOptions:
    """Sort ``kwargs`` (transformers' keyword options) by :data:`OPTIONS`; refuse what no path honours.

    ``build_only``: the call is ``build_model`` (a meta model, nothing loaded), which takes only
    :data:`BUILD_OPTIONS` and the accepted ones.
    """
    options = LoadOptions()
    kwargs = dict(kwargs)
    if "torch_dtype" in kwargs:
        torch_dtype = kwargs.pop("torch_dtype")
        if torch_dtype is not None:
            _transformers_logger().warning_once(TORCH_DTYPE_DEPRECATION)
            if kwargs.get("dtype") is None:
                kwargs["dtype"] = torch_dtype
    for name, value in kwargs.items():
        rule = OPTIONS.get(name)
        if rule is None:
            options.overrides[name] = value
            continue
        if rule.status == "refused" and not rule.asks_nothing(value):
            raise LoadOptionError(name, f"{value!r} is refused: {rule.plugin_path}")
        if (
            build_only
            and name not in BUILD_OPTIONS
            and rule.status != "accepted"
            and not rule.asks_nothing(value)
        ):
            raise LoadOptionError(
                name, "build_model builds the model on meta and loads nothing; pass it to from_pretrained"
            )
        options.stock[name] = value
        if rule.status == "stock-only" and not rule.asks_nothing(value):
            options.stock_only[name] = value
        elif name in _PLUGIN_PATH:
            _take(options, name, value)
    return options


def _take(options: LoadOptions, name: str, value: Any) -> None:
    if name == "dtype":
        options.dtype = _dtype_option(value)
    elif name in ("attn_implementation", "experts_implementation"):
        options.build[name] = value
    elif name == "config":
        options.config = _config_option(value)
    elif name == "device_map":
        options.device_map = value
    elif name == "max_memory":
        options.max_memory = value
    elif name == "disable_mmap":
        options.mmap = None if value is None else not value
    elif name == "output_loading_info":
        options.output_loading_info = bool(value)
    elif name == "generation_config":
        options.generation_config = value


def _dtype_option(value: Any) -> torch.dtype | str | None:
    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    raise LoadOptionError(
        "dtype",
        f"{value!r}: give a torch.dtype, its name or 'auto' (a per-sub-config dict, deprecated in transformers, "
        "is not supported)",
    )


def _config_option(value: Any) -> PretrainedConfig | None:
    from transformers import PretrainedConfig

    if value is None or isinstance(value, PretrainedConfig):
        return copy.deepcopy(value)
    raise LoadOptionError(
        "config", f"{value!r}: pass a PretrainedConfig (AutoConfig.from_pretrained(...)), not a path"
    )


def apply_config_overrides(config: PretrainedConfig, overrides: Mapping[str, Any]) -> None:
    """Set each keyword that is an attribute of ``config`` on it, as transformers' ``from_pretrained`` does; any
    other keyword is an error (transformers would hand it to the model's ``__init__``, which raises)."""
    unknown = sorted(name for name in overrides if not hasattr(config, name))
    if unknown:
        raise LoadOptionError(
            unknown[0],
            f"unexpected keyword argument(s) {unknown}: neither a from_pretrained option nor an attribute of "
            f"{type(config).__name__} (see docs/loading-options.md)",
        )
    for name, value in overrides.items():
        setattr(config, name, value)


def auto_dtype(config: PretrainedConfig, checkpoint: Checkpoint) -> torch.dtype:
    """The dtype transformers' ``dtype="auto"`` picks: the config's ``dtype`` (``torch_dtype``), else the index's
    metadata ``dtype``, else the first floating tensor of the first shard (keys in sorted order) that is not
    FP8 or FP4; BF16 when there is none (transformers would take an FP8 or integer dtype, and fail)."""
    if getattr(config, "dtype", None) is not None:
        return resolve_dtype(config, None)
    named = _index_dtype(checkpoint)
    if named is not None:
        return named
    first = checkpoint.files[0]
    for key in sorted(k for k in checkpoint if checkpoint.info(k).file == first):
        dtype = checkpoint.info(key).dtype
        if dtype.is_floating_point and dtype.itemsize >= 2:
            return dtype
    return torch.bfloat16


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


def load_dtype(
    config: PretrainedConfig, dtype: torch.dtype | str | None, checkpoint: Checkpoint
) -> torch.dtype:
    """``dtype``, or for None and ``"auto"`` the checkpoint's dtype as transformers' ``"auto"`` decides it."""
    return (
        auto_dtype(config, checkpoint) if dtype is None or dtype == "auto" else resolve_dtype(config, dtype)
    )


def build_dtype(config: PretrainedConfig, dtype: torch.dtype | str | None, location: Any) -> torch.dtype:
    """As :func:`load_dtype` for a model built before its checkpoint is opened: the headers of ``location``
    (a :class:`~automodel_plugins.sources.CheckpointLocation`, or None for a bare config) are read only when
    the config names no dtype."""
    from automodel_plugins.checkpoint import Checkpoint

    explicit = dtype is not None and dtype != "auto"
    if explicit or location is None or getattr(config, "dtype", None) is not None:
        return resolve_dtype(config, dtype if explicit else None)
    with Checkpoint.open(location, download=False) as checkpoint:
        return auto_dtype(config, checkpoint)


def _index_dtype(checkpoint: Checkpoint) -> torch.dtype | None:
    if checkpoint.index_path is None:
        return None
    try:
        metadata = json.loads(read_regular_file(checkpoint.index_path)).get("metadata") or {}
    except (OSError, ValueError, AttributeError):
        return None  # the index was read and checked already; a metadata block is optional
    named = getattr(torch, str(metadata.get("dtype", "")), None) if isinstance(metadata, dict) else None
    return named if isinstance(named, torch.dtype) and named.is_floating_point else None


def _transformers_logger() -> Any:
    from transformers.utils import logging

    return logging.get_logger("transformers.modeling_utils")
