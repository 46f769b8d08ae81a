"""compressed-tensors' ``quantization_config`` (what llm-compressor writes) read as the FP8 settings the host
applies: the ``quant_method: fp8`` dict of transformers' ``FineGrainedFP8Config``.

One home for both places the format appears: an HF ``config.json`` (``quant_method: "compressed-tensors"``) and
Mistral's native ``params.json`` (Mistral Large 3). The host reads one FP8 group targeting ``Linear``: float
8-bit (E4M3) weights, static and symmetric, scaled per tensor (``strategy: tensor``), per output channel
(``strategy: channel``, llm-compressor's FP8_DYNAMIC: a ``[out, 1]`` scale, read as a block grid whose blocks are
one row by :data:`WHOLE_ROW` columns, so all block-FP8 machinery applies) or per block (``strategy: block`` +
``block_structure``, FP8_BLOCK), stored compressed (``format: float-quantized``). Their ``weight_scale``
(Mistral's ``qscale_weight``) is multiplied like ``weight_scale_inv``; static input scales (``input_scale``) are
accounted for and dropped, dynamic ones need none. Everything else compressed-tensors can describe (integer or
4-bit weights, NVFP4, per-group scales, dynamic or asymmetric weights, activation-only schemes, quantized
outputs or KV cache, sparsity, transforms, several groups) is an :class:`UnsupportedQuantizationError` naming
the field, never a load that guesses.

The ``ignore`` list names modules in the naming of whoever quantized them (native names in a ``params.json``),
so turning it into ``modules_to_not_convert`` is the caller's (``ignore`` argument); :func:`hf_ignore` is the
rule for a ``config.json``. Imports neither torch nor transformers: claims run it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from automodel_plugins.errors import ConfigError, UnsupportedQuantizationError

__all__ = ["METHOD", "PER_CHANNEL_BLOCK", "WHOLE_ROW", "hf_ignore", "translate_compressed_tensors"]

METHOD = "compressed-tensors"
WHOLE_ROW = 2**31 - 1
"""Columns of a per-channel scale's block: more than any row has, so each row's one scale covers all of it
(the grid of an ``[out, in]`` weight is ``[out, 1]``, compressed-tensors' per-channel ``weight_scale``)."""
PER_CHANNEL_BLOCK = (1, WHOLE_ROW)

_KNOWN = {
    "config_groups",
    "format",
    "global_compression_ratio",
    "ignore",
    "kv_cache_scheme",
    "quant_method",
    "quantization_status",
    "sparsity_config",
    "transform_config",
    "version",
}
_FP8_WEIGHTS = {"type": "float", "num_bits": 8, "symmetric": True, "dynamic": False}
"""What static FP8 (E4M3) weights say; any other value is another scheme."""

IgnoreMapper = Callable[[list[Any], "Where"], list[str]]


class Where:
    """The file and the dict's place in it, for errors: ``field`` is ``quantization_config`` in both files."""

    def __init__(self, path: str | Path | None, field: str = "quantization_config") -> None:
        self.path, self.field = path, field

    def unsupported(self, field: str, message: str) -> UnsupportedQuantizationError:
        return UnsupportedQuantizationError(self.path, f"field {field!r}: {message}")

    def malformed(self, field: str, message: str) -> ConfigError:
        return ConfigError(self.path, f"field {field!r}: {message}")


def translate_compressed_tensors(
    section: Any, *, path: str | Path | None, ignore: IgnoreMapper | None = None
) -> dict[str, Any]:
    """The ``quant_method: fp8`` dict a compressed-tensors ``section`` describes (see the module docstring).

    ``path`` names the file in errors; ``ignore`` maps the ``ignore`` list to ``modules_to_not_convert``
    (default :func:`hf_ignore`). Raises :class:`UnsupportedQuantizationError` for a scheme the host cannot
    apply and :class:`ConfigError` for a dict that is not shaped as compressed-tensors writes it.
    """
    at = Where(path)
    field = at.field
    if not isinstance(section, dict):
        raise at.malformed(field, f"must be an object, got {section!r}")
    unknown = sorted(set(section) - _KNOWN)
    if unknown:
        raise at.malformed(f"{field}.{unknown[0]}", "unknown field")
    if section.get("quant_method") != METHOD:
        raise at.unsupported(f"{field}.quant_method", f"{section.get('quant_method')!r}: only {METHOD!r}")
    if section.get("format") not in (None, "float-quantized"):
        raise at.unsupported(f"{field}.format", f"{section['format']!r}: only float-quantized is read")
    if section.get("quantization_status", "compressed") != "compressed":
        raise at.unsupported(
            f"{field}.quantization_status",
            f"{section['quantization_status']!r}: weights are not stored compressed",
        )
    if section.get("kv_cache_scheme") is not None:
        raise at.unsupported(f"{field}.kv_cache_scheme", "a quantized KV cache is not applied")
    for empty in ("sparsity_config", "transform_config"):
        if section.get(empty):
            raise at.unsupported(f"{field}.{empty}", "not applied by the host")
    groups = section.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise at.unsupported(f"{field}.config_groups", "exactly one group is read")
    ((name, group),) = groups.items()
    where = f"{field}.config_groups.{name}"
    if not isinstance(group, dict):
        raise at.malformed(where, "must be an object")
    if group.get("targets") != ["Linear"]:
        raise at.unsupported(f"{where}.targets", f"{group.get('targets')!r}: only ['Linear'] is read")
    if group.get("format") not in (None, "float-quantized"):
        raise at.unsupported(f"{where}.format", f"{group['format']!r}: only float-quantized is read")
    if group.get("output_activations") is not None:
        raise at.unsupported(f"{where}.output_activations", "quantized outputs are not applied")
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise at.unsupported(f"{where}.weights", "missing: nothing says how the weights are stored")
    for key, value in _FP8_WEIGHTS.items():
        if weights.get(key) != value:
            raise at.unsupported(
                f"{where}.weights.{key}", f"{weights.get(key)!r}: only {value!r} (static FP8 E4M3) is read"
            )
    strategy = weights.get("strategy")
    if strategy == "block":
        block = weights.get("block_structure")
        if not (
            isinstance(block, list)
            and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
        ):
            raise at.unsupported(f"{where}.weights.block_structure", f"{block!r}: expected [rows, columns]")
        block_size: list[int] | None = list(block)
    elif strategy == "tensor":
        block_size = None
    elif strategy == "channel":
        block_size = list(PER_CHANNEL_BLOCK)
    else:
        raise at.unsupported(
            f"{where}.weights.strategy", f"{strategy!r}: only 'block', 'channel' and 'tensor' scales are read"
        )
    activations = group.get("input_activations")
    if activations is not None and not isinstance(activations, dict):
        raise at.malformed(f"{where}.input_activations", f"must be an object, got {activations!r}")
    scheme = "dynamic" if activations is None or activations.get("dynamic") is True else "static"
    listed = section.get("ignore") or []
    if not isinstance(listed, list):
        raise at.malformed(f"{field}.ignore", f"must be a list, got {listed!r}")
    return {
        "quant_method": "fp8",
        "activation_scheme": scheme,
        "weight_block_size": block_size,
        "modules_to_not_convert": (ignore or hf_ignore)(listed, at),
    }


def hf_ignore(listed: list[Any], at: Where) -> list[str]:
    """A ``config.json``'s ``ignore`` -> ``modules_to_not_convert``: module names carried over as they are (a
    module listed must hold no FP8 tensor; the adapter checks it), ``re:`` patterns checked to compile and
    left to the tensors' dtypes (a module they match is stored unquantized, which is what decides)."""
    names = []
    for position, entry in enumerate(listed):
        if not isinstance(entry, str) or not entry.strip():
            raise at.malformed(
                f"{at.field}.ignore[{position}]", f"{entry!r} is not a module name or re: pattern"
            )
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as exc:
                raise at.malformed(
                    f"{at.field}.ignore[{position}]", f"{entry!r} does not compile: {exc}"
                ) from exc
            continue
        names.append(entry)
    return names
