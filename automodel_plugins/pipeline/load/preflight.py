"""What a config and a checkpoint's headers must agree on before anything is built or handed on.

Two checks, from ``config.json`` and the safetensors headers alone (no tensor data, no model):

* :func:`check_structure`: the config must not ask for more layers than the checkpoint holds, nor another
  vocabulary or width than its token embedding. Building the stock class on meta costs time and memory in
  proportion to the module count, so ``num_hidden_layers: 1000000`` would hang a load for minutes before any
  key is compared; this check refuses it in milliseconds, for any plugin's key layout.
* :func:`check_stock_path`: no plugin claims the config, so stock transformers would load it. It scales FP8
  tensors only under a ``quantization_config`` it knows; under a missing, empty or misspelled one
  (``"FP8"``, ``"fp8 "``) it loads the raw FP8 values unscaled without a word. That is refused here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from operator import itemgetter, methodcaller
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automodel_plugins.adapters.base import key_view
from automodel_plugins.errors import CheckpointError, ConfigMismatchError, UnsupportedQuantizationError
from automodel_plugins.fp8.formats import is_fp8
from automodel_plugins.fp8.quantization import quantization_dict

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from automodel_plugins.checkpoint import Checkpoint
    from automodel_plugins.sources import CheckpointLocation, HubOptions

__all__ = ["check_headers_of", "check_layer_counts", "check_stock_path", "check_structure", "layer_lists"]

LAYER_COUNT_FIELDS = ("num_hidden_layers", "num_layers", "n_layer", "depth")
"""Config fields that count repeated blocks (text layers, vision blocks), at any nesting level."""
EMBEDDING_WIDTH_FIELDS = ("word_embed_proj_dim", "embedding_size")
"""Fields of models whose token embedding is narrower than ``hidden_size`` (OPT, ALBERT)."""
_EMBEDDING_SUFFIX = "embed_tokens.weight"
_DOTTED_EMBEDDING_SUFFIX = "." + _EMBEDDING_SUFFIX
_SHOWN = 5


# --- structure --------------------------------------------------------------------------------------------


def layer_lists(keys: list[str]) -> dict[str, set[int]]:
    """Every indexed module list in ``keys`` (``language_model.model.layers`` -> {0, 1, ...}), with the indices
    of enclosing lists written ``*`` (``model.layers.*.mlp.experts``).

    Modules are grouped by their form (digits masked), and the indices of a form whose digit segments are whole
    segments read by slicing every member at the same offsets, in C: a 235B MoE holds 37k modules of a few
    hundred forms. Other forms' modules are split one by one."""
    modules = list({key.rpartition(".")[0] for key in keys})  # a weight and its scales: one module
    lists: dict[str, set[int]] = {}
    joined = "\n".join(modules)
    if (
        _MASK in joined or joined.count("\n") != len(modules) - 1
    ):  # the mask (or the split) would be ambiguous
        _add_lists(modules, lists)
        return lists
    forms = joined.encode().translate(_MASK_DIGITS).decode().split("\n")  # UTF-8: digits are ASCII bytes only
    by_form: dict[str, list[str]] = {}
    for module, form in zip(modules, forms, strict=True):
        members = by_form.get(form)
        if members is None:
            by_form[form] = [module]
        else:
            members.append(module)
    for form, members in by_form.items():
        if _MASK not in form:
            continue
        parts = form.split(".")
        if any(_MASK in part and part.strip(_MASK) for part in parts):  # digits inside a name: not an index
            _add_lists(members, lists)
            continue
        pattern: list[str] = []
        start = 0
        for i, part in enumerate(parts):
            end = start + len(part)
            if part and not part.strip(_MASK):  # ASCII digits only: an index (not '²', which int() refuses)
                if i:
                    indices = map(int, map(itemgetter(slice(start, end)), members))
                    lists.setdefault(".".join(pattern), set()).update(indices)
                pattern.append("*")
            else:
                pattern.append(part)  # no digit in it: the same in every member
            start = end + 1
    return lists


_MASK = "\0"
_MASK_DIGITS = bytes.maketrans(b"0123456789", _MASK.encode() * 10)


def _add_lists(modules: Iterable[str], lists: dict[str, set[int]]) -> None:
    """:func:`layer_lists` of ``modules``, module by module, into ``lists``."""
    for module in modules:
        pattern: list[str] = []
        for i, part in enumerate(module.split(".")):
            digit = part.isascii() and part.isdigit()  # not '²', which int() refuses
            if digit and i:
                lists.setdefault(".".join(pattern), set()).add(int(part))
            pattern.append("*" if digit else part)


def _layer_counts(data: Any, where: str = "", depth: int = 0) -> Iterator[tuple[str, int]]:
    """``(dotted field, value)`` for each layer-count field of the config dict and its sub-configs."""
    if not isinstance(data, dict) or depth > 4:
        return
    for name, value in data.items():
        field = f"{where}.{name}" if where else name
        if name in LAYER_COUNT_FIELDS and isinstance(value, int) and not isinstance(value, bool):
            yield field, value
        elif isinstance(value, dict):
            yield from _layer_counts(value, field, depth + 1)


def check_structure(config: PretrainedConfig, checkpoint: Checkpoint) -> None:
    """Refuse a config that asks for more layers than any layer list of the checkpoint holds, or a token
    embedding of another shape than the checkpoint's: :class:`ConfigMismatchError` naming ``config.json``,
    the field and what the headers hold. Reads headers only; builds nothing.
    """
    check_layer_counts(config, checkpoint.keys(), checkpoint.config_path)
    _check_embedding(config, checkpoint)
    _check_key_digits(checkpoint)


def check_layer_counts(config: PretrainedConfig, keys: list[str], config_path: Path) -> None:
    """The layer-count half of :func:`check_structure`, from tensor key names alone (an index suffices).

    The host loads each model tensor from one checkpoint tensor, so a model of ``L`` layers needs a list of at
    least ``L`` indexed entries (or, in a checkpoint without any indexed list, ``L`` tensors at all).
    """
    lists = layer_lists(keys)
    longest = max(lists, key=lambda prefix: len(lists[prefix]), default=None)
    available = len(lists[longest]) if longest is not None else len(keys)
    for field, wanted in _layer_counts(config.to_dict()):
        if wanted > available:
            held = (
                ", ".join(
                    f"{prefix}: {len(lists[prefix])}"
                    for prefix in sorted(lists, key=lambda p: -len(lists[p]))[:_SHOWN]
                )
                if lists
                else f"no indexed layer list, {len(keys)} tensors"
            )
            raise ConfigMismatchError(
                config_path,
                f"{field} is {wanted}, but the checkpoint holds at most {available} layers ({held}): "
                "config and checkpoint disagree",
            )


def _check_key_digits(checkpoint: Checkpoint) -> None:
    """Refuse a tensor key with a segment of non-ASCII digits (``layers.²``): ``str.isdigit`` takes it for a
    list index and ``int`` refuses it, so transformers' loader would fail on it with a raw ``ValueError``."""
    keys = checkpoint.keys()
    if all(map(str.isascii, keys)):  # no non-ASCII digit anywhere
        return
    for module in {key.rpartition(".")[0] for key in keys}:
        odd = next((p for p in module.split(".") if p.isdigit() and not p.isascii()), None)
        if odd is not None:
            key = next(k for k in keys if k.startswith(f"{module}."))
            raise CheckpointError(
                f"segment {odd!r} of this key is made of non-ASCII digits: no module list is indexed so",
                path=checkpoint.directory,
                key=key,
            )


def _check_embedding(config: PretrainedConfig, checkpoint: Checkpoint) -> None:
    """The text model's ``vocab_size`` (and width) against its ``embed_tokens.weight`` in the headers."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    if not isinstance(vocab, int):
        return
    width = next((getattr(text, f) for f in EMBEDDING_WIDTH_FIELDS if getattr(text, f, None)), None)
    width = width or getattr(text, "hidden_size", None)
    embeddings = {
        key: checkpoint.info(key).shape
        for key in filter(methodcaller("endswith", _EMBEDDING_SUFFIX), key_view(checkpoint))  # in C
        if key == _EMBEDDING_SUFFIX or key.endswith(_DOTTED_EMBEDDING_SUFFIX)
    }
    if not embeddings:
        return
    prefix = "text_config." if text is not config else ""
    if not any(shape and shape[0] == vocab for shape in embeddings.values()):
        key, shape = next(iter(embeddings.items()))
        raise ConfigMismatchError(
            checkpoint.config_path,
            f"{prefix}vocab_size is {vocab}, but the checkpoint's {key} has {shape[0] if shape else 0} rows "
            f"(shape {tuple(shape)})",
        )
    if isinstance(width, int) and not any(
        len(shape) == 2 and shape == (vocab, width) for shape in embeddings.values()
    ):
        key, shape = next((k, s) for k, s in embeddings.items() if s and s[0] == vocab)
        raise ConfigMismatchError(
            checkpoint.config_path,
            f"{prefix}hidden_size is {width}, but the checkpoint's {key} is {tuple(shape)}",
        )


# --- the stock path ---------------------------------------------------------------------------------------


def _stock_quantization_methods() -> frozenset[str]:
    """The ``quant_method`` values transformers has a quantizer for (it ignores any other)."""
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING

    return frozenset(AUTO_QUANTIZATION_CONFIG_MAPPING)


def check_stock_path(config: PretrainedConfig, checkpoint: Checkpoint) -> None:
    """Refuse handing to stock transformers a checkpoint whose headers hold FP8 tensors under a
    ``quantization_config`` that is missing, not an object, or names no method transformers knows:
    :class:`UnsupportedQuantizationError` naming ``config.json``, the field and the FP8 tensors found.

    A method transformers knows (``fp8``, ``compressed-tensors``, ``fbgemm_fp8``, ...) is its quantizer's to
    apply and to validate; anything else it ignores, and the FP8 values would load without their scales.
    """
    fp8 = sorted(key for key in checkpoint if is_fp8(checkpoint.info(key).dtype))
    if not fp8:
        return
    path: Path = checkpoint.config_path
    quantization = quantization_dict(config, path=path)
    method = None if quantization is None else quantization.get("quant_method")
    if isinstance(method, str) and method in _stock_quantization_methods():
        return
    if quantization is None:
        declared = "quantization_config is missing"
    elif "quant_method" not in quantization:
        declared = f"quantization_config has no quant_method ({quantization!r})"
    else:
        declared = f"quantization_config.quant_method {method!r} is no quantization method transformers knows"
    shown = ", ".join(fp8[:_SHOWN]) + (f", ... ({len(fp8) - _SHOWN} more)" if len(fp8) > _SHOWN else "")
    raise UnsupportedQuantizationError(
        path,
        f"{declared}, but the checkpoint holds {len(fp8)} FP8 tensor(s) ({shown}): no plugin claims this "
        "config, and stock transformers would load them unscaled. Fix the config (quant_method 'fp8' for "
        "FP8 weights with weight_scale_inv scales) or install a plugin that serves it",
    )


def check_headers_of(
    path: str | Path | CheckpointLocation,
    config: PretrainedConfig,
    *,
    stock: bool,
    options: HubOptions | None = None,
) -> None:
    """:func:`check_structure` (and :func:`check_stock_path` when ``stock``: nobody claimed the config) on the
    weights of the checkpoint ``path`` names; nothing when it has none (a directory holding only a config).

    Headers only, never a download. For a hub repo about to be loaded (``stock=False``) only what its index's
    key names tell (:func:`check_layer_counts`): the rest is checked once the shards are in the cache, so a
    load still downloads nothing but the files it needs; with ``stock`` the shards' headers are read with range
    requests (``options`` for a repo id).
    """
    from automodel_plugins.checkpoint import Checkpoint
    from automodel_plugins.checkpoint.index import shard_names
    from automodel_plugins.errors import CheckpointError
    from automodel_plugins.sources import resolve

    location = resolve(path, options)
    try:
        weights = location.weights()
    except CheckpointError:
        return
    if location.is_remote and not stock:
        if weights.index is not None:
            keys = [key for keys in shard_names(weights.index).values() for key in keys]
            check_layer_counts(config, sorted(keys), location.config)
        return
    with Checkpoint.open(location, download=False) as checkpoint:
        check_structure(config, checkpoint)
        if stock:
            check_stock_path(config, checkpoint)
