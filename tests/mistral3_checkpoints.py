"""Tiny Mistral3 VLMs, the checkpoints the tests load (generated once per session), and the comparisons: the
fixtures of the host's end-to-end tests (``tests/e2e``) and of the Mistral3 plugin's own tests.

The reference for every load is stock transformers reading the same directory
(``Mistral3ForConditionalGeneration.from_pretrained``, which dequantizes FP8 on CPU), or an FP8 dequant
written out here independently of the host. Key layouts are spelled out here from the reference notes,
not imported from the plugin, so a wrong rename in the plugin cannot hide behind the same rename here.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Mistral3Config, Mistral3ForConditionalGeneration
from transformers.utils import logging as hf_logging

from automodel_plugins.registry import Registry
from automodel_plugins.testing.checkpoints import write_fp8_checkpoint
from automodel_plugins.testing.compare import assert_same_state_dict
from automodel_plugins.testing.tiny_models import (
    MINISTRAL3_ROPE_PARAMETERS,
    mistral3_image_batch,
    tiny_mistral3_config,
)

PLUGIN = "mistral3_fp8"
NOT_CONVERTED = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
TEXT_ROTARY = "model.language_model.rotary_emb"
VISION_ROTARY = "model.vision_tower.patch_positional_embedding"
# runtime prefix -> legacy (nested) prefix, as Ministral 3 / Devstral checkpoints store them.
LEGACY_PREFIXES = (
    ("lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)

hf_logging.disable_progress_bar()


# --- models -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The shape of a tiny Mistral3 VLM; ``text_type`` ``mistral`` is a Mistral Small 3.x style text model."""

    tie: bool = False
    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    text_type: str = "ministral3"


ODD = ModelSpec(hidden=72, intermediate=136)
"""Sizes that are not multiples of 16 or 32: block scales get partial edge blocks on both axes."""


def tiny_config(spec: ModelSpec = ModelSpec()) -> Mistral3Config:
    """A Ministral3 (yarn + llama-4 scaling, as the real ones) or Mistral text model under a one-layer Pixtral."""
    return tiny_mistral3_config(
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        text_model_type=spec.text_type,
        rope_parameters=MINISTRAL3_ROPE_PARAMETERS if spec.text_type == "ministral3" else None,
        tie_word_embeddings=spec.tie,
        architectures=["Mistral3ForConditionalGeneration"],
    )


def tiny_model(spec: ModelSpec = ModelSpec()) -> Mistral3ForConditionalGeneration:
    """A freshly initialized fp32 model, the same weights for the same spec."""
    torch.manual_seed(0)
    return Mistral3ForConditionalGeneration(tiny_config(spec)).eval()


# --- checkpoints ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointSpec:
    """One on-disk format of a tiny model. ``quantized=False``: a BF16 checkpoint without quantization_config."""

    model: ModelSpec = ModelSpec()
    layout: str = "legacy"
    quantized: bool = True
    block_size: tuple[int, int] | None = None
    scale_name: str = "weight_scale_inv"
    activation_scale_name: str | None = "activation_scale"
    scale_dtype: torch.dtype = torch.float32
    shards: int = 1
    modules_to_not_convert: tuple[str, ...] = NOT_CONVERTED
    fp8_modules_skipped: tuple[str, ...] | None = None
    """Modules written in BF16 when they differ from what the config declares (None: the same)."""

    def but(self, **changes: Any) -> CheckpointSpec:
        return dataclasses.replace(self, **changes)


def legacy_name(name: str) -> str:
    """The legacy on-disk key of a runtime state-dict name."""
    for runtime, legacy in LEGACY_PREFIXES:
        if name.startswith(runtime):
            return legacy + name[len(runtime) :]
    return name


def _linear_weights(model: torch.nn.Module, skipped: tuple[str, ...]) -> set[str]:
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and not any(name == s or name.startswith(s + ".") for s in skipped)
    }


def write_checkpoint(model: Mistral3ForConditionalGeneration, directory: Path, spec: CheckpointSpec) -> Path:
    """Write ``model`` in the format ``spec`` describes."""
    skipped = spec.modules_to_not_convert if spec.fp8_modules_skipped is None else spec.fp8_modules_skipped
    fp8_names = _linear_weights(model, skipped) if spec.quantized else set()
    write_fp8_checkpoint(
        model,
        directory,
        block_size=spec.block_size,
        scale_name=spec.scale_name,
        activation_scale_name=spec.activation_scale_name,
        scale_dtype=spec.scale_dtype,
        rename=legacy_name if spec.layout == "legacy" else None,
        modules_to_not_convert=spec.modules_to_not_convert,
        quantized=fp8_names.__contains__,
        shards=spec.shards,
    )
    if not spec.quantized:
        edit_config(directory, lambda config: config.pop("quantization_config"))
    return directory


class Checkpoints:
    """Session cache of generated checkpoints and of the models they were written from (never mutate those)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._paths: dict[CheckpointSpec, Path] = {}
        self._models: dict[ModelSpec, Mistral3ForConditionalGeneration] = {}

    def __call__(self, spec: CheckpointSpec = CheckpointSpec(), **changes: Any) -> Path:
        spec = spec.but(**changes)
        if spec not in self._paths:
            directory = self.root / f"ckpt{len(self._paths)}"
            self._paths[spec] = write_checkpoint(self.model(spec.model), directory, spec)
        return self._paths[spec]

    def model(self, spec: ModelSpec = ModelSpec()) -> Mistral3ForConditionalGeneration:
        if spec not in self._models:
            self._models[spec] = tiny_model(spec)
        return self._models[spec]

    def copy(self, destination: Path, spec: CheckpointSpec = CheckpointSpec(), **changes: Any) -> Path:
        """A private copy, for a test that damages it."""
        return Path(shutil.copytree(self(spec, **changes), destination))


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Checkpoints:
    return Checkpoints(tmp_path_factory.mktemp("mistral3_checkpoints"))


@pytest.fixture(scope="session")
def registry() -> Registry:
    """The installed plugin, loaded through its entry point, and nothing else that may be installed."""
    registry = Registry.from_entry_points(PLUGIN)
    (record,) = registry.plugins()
    assert record.status == "loaded", record.error
    return registry


# --- editing checkpoints ----------------------------------------------------------------------------------


def edit_config(directory: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Apply ``edit`` to ``config.json`` in place."""
    file = directory / "config.json"
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config, indent=2))


def edit_tensors(directory: Path, edit: Callable[[dict[str, torch.Tensor]], Any]) -> None:
    """Apply ``edit`` to each shard's tensors (a dict, edited in place) and rewrite the index to match."""
    weight_map: dict[str, str] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors = load_file(file)
        edit(tensors)
        save_file({k: v.contiguous() for k, v in tensors.items()}, file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file.name))
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = weight_map
        index.write_text(json.dumps(data))


def checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, read with safetensors itself."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
    return tensors


# --- loading and comparing --------------------------------------------------------------------------------


def stock_load(path: Path, **kwargs: Any) -> Mistral3ForConditionalGeneration:
    """transformers' own loader (dequantizes FP8 on CPU)."""
    return Mistral3ForConditionalGeneration.from_pretrained(path, **kwargs).eval()


def assert_same_weights(got: torch.nn.Module, expected: torch.nn.Module) -> None:
    """Same state-dict keys, dtypes and bits, and the same (non-persistent) rotary buffers."""
    assert_same_state_dict(got, expected)
    rotary_got, rotary_expected = rotary_state(got), rotary_state(expected)
    for name, value in rotary_expected.items():
        same = (
            torch.equal(rotary_got[name], value)
            if isinstance(value, torch.Tensor)
            else rotary_got[name] == value
        )
        assert same, name


def image_inputs(dtype: torch.dtype = torch.bfloat16, seq_len: int = 16) -> dict[str, torch.Tensor]:
    """One sequence holding one 32x48 image: 6 image tokens (patch 8, spatial merge 2)."""
    return mistral3_image_batch(tiny_config(), batch=1, seq=seq_len, labels=False, dtype=dtype)


@torch.no_grad()
def logits(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return model(**image_inputs(dtype)).logits


def rotary_state(model: torch.nn.Module) -> dict[str, Any]:
    """Text and vision rotary buffers (and ``attention_scaling``) by qualified name."""
    state: dict[str, Any] = {}
    for path in (TEXT_ROTARY, VISION_ROTARY):
        module = model.get_submodule(path)
        for name in ("inv_freq", "original_inv_freq"):
            state[f"{path}.{name}"] = module.get_buffer(name)
        state[f"{path}.attention_scaling"] = module.attention_scaling
    return state


def assert_rotary_fresh(model: torch.nn.Module) -> None:
    """Bit-identical to a model built plainly from the same config, in fp32."""
    fresh = Mistral3ForConditionalGeneration(model.config)
    expected, got = rotary_state(fresh), rotary_state(model)
    for name, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert got[name].dtype == torch.float32, name
            assert torch.equal(got[name], value), name
        else:
            assert got[name] == value and type(got[name]) is type(value), name


@pytest.fixture
def no_tensor_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail any attempt to read tensor data through the host's Checkpoint."""
    from automodel_plugins.checkpoint import Checkpoint

    def refuse(self: Checkpoint, key: str, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError(f"tensor data read: {key}")

    for method in ("read", "tensor", "slice"):
        monkeypatch.setattr(Checkpoint, method, refuse)
    yield
