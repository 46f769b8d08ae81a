"""Hostile and unlucky inputs to the host, each built here in its real on-disk form: every one is either loaded
exactly (compared with stock transformers' own load) or refused with a typed error naming the culprit.

Covered here (the cases on a Mistral3 checkpoint live in ``tests/e2e/test_bad_input.py``): shards replaced
or rewritten while a load reads them; FP8 checkpoints the stock path would load unscaled; deeply nested JSON;
NUL bytes, directories and FIFOs where files belong; adapters and claims that misbehave; configs transformers
cannot build from; a layer count the checkpoint does not hold; files truncated after a load (``mmap=False``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

from automodel_plugins import Claim, hookimpl, repair_rotary
from automodel_plugins.adapters import StateDictAdapter, TensorSource
from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.cli import main
from automodel_plugins.errors import (
    AutomodelPluginsError,
    CheckpointError,
    ConfigError,
    ConfigMismatchError,
    CorruptCheckpointError,
    NonFiniteWeightError,
    PluginError,
    RotaryRepairError,
    SourceNotFoundError,
    UnsafeCheckpointPathError,
    UnsupportedQuantizationError,
)
from automodel_plugins.pipeline.load.load import build_model, from_pretrained
from automodel_plugins.registry import Registry
from automodel_plugins.testing.checkpoints import write_fp8_checkpoint
from automodel_plugins.testing.compare import assert_same_state_dict, load_stock
from automodel_plugins.testing.pytest_plugin import subprocess_env
from automodel_plugins.testing.tiny_models import tiny_llama_config

WEIGHTS = "model.safetensors"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


# --- a claiming plugin and a tiny FP8 Llama -----------------------------------------------------------------


def llama_plugin(**hooks: Any) -> types.SimpleNamespace:
    """A plugin serving Llama configs (rotary repaired), plus any extra ``hooks`` (plain functions)."""

    @hookimpl
    def claim_config(config: Any) -> Claim | None:
        return Claim(reason="llama, for the tests") if config.model_type == "llama" else None

    @hookimpl
    def post_materialize(model: Any, config: Any) -> None:
        repair_rotary(model)

    return types.SimpleNamespace(
        claim_config=claim_config,
        post_materialize=post_materialize,
        **{k: hookimpl(v) for k, v in hooks.items()},
    )


def registry_with(plugin: types.SimpleNamespace, name: str = "llama_test") -> Registry:
    registry = Registry()
    record = registry.register(plugin, name)
    assert record.status == "loaded", record.error
    return registry


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config()).eval()


def write_llama(directory: Path, seed: int = 0, *, header_padding: int = 0, **options: Any) -> Path:
    """A per-tensor FP8 Llama (BF16 ``lm_head`` and norms used in place); ``header_padding`` lengthens the
    header by that many bytes of metadata, so that every data offset moves."""
    write_fp8_checkpoint(llama(seed), directory, modules_to_not_convert=("lm_head",), **options)
    if header_padding:
        file = directory / WEIGHTS
        save_file(load_file(file), file, metadata={"format": "pt", "padding": "x" * header_padding})
    return directory


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Version ``a`` and a different version ``b`` (other weights, a longer header) of one checkpoint."""
    root = tmp_path_factory.mktemp("versions")
    return {"a": write_llama(root / "a", seed=0), "b": write_llama(root / "b", seed=1, header_padding=4099)}


@pytest.fixture(scope="module")
def references(pristine: dict[str, Path]) -> dict[str, LlamaForCausalLM]:
    """Stock transformers' own loads of each version: what a correct load of either gives."""
    return {name: load_stock(path) for name, path in pristine.items()}


@pytest.fixture
def ckpt(pristine: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine["a"], tmp_path / "ckpt"))


def replace_by_rename(target: Path, source: Path) -> None:
    """What a careful updater does: write a complete new file beside the old one, rename it over."""
    temporary = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)


def same_state_dict(model: torch.nn.Module, reference: torch.nn.Module) -> bool:
    try:
        assert_same_state_dict(model, reference)
    except AssertionError:
        return False
    return True


# --- 1. shards replaced by rename, or rewritten in place, during a load -------------------------------------


def test_reads_after_a_rename_come_from_the_file_first_opened(ckpt: Path, pristine: dict[str, Path]) -> None:
    """Header parsed, one tensor read, the file replaced by a version with a longer header: every later read
    (memory-mapped, pread, slice) still returns the first version's bytes."""
    original = load_file(pristine["a"] / WEIGHTS)
    with Checkpoint.open(ckpt) as checkpoint:
        first = checkpoint.tensor("lm_head.weight").clone()
        replace_by_rename(ckpt / WEIGHTS, pristine["b"] / WEIGHTS)
        assert torch.equal(first, original["lm_head.weight"])
        assert torch.equal(checkpoint.tensor("model.norm.weight"), original["model.norm.weight"])
        assert torch.equal(checkpoint.read(Q_PROJ).view(torch.uint8), original[Q_PROJ].view(torch.uint8))
        part = checkpoint.slice("model.embed_tokens.weight", (slice(3, 9),))
        assert torch.equal(part, original["model.embed_tokens.weight"][3:9])
        checkpoint.check_unchanged()  # a rename is not a change of the file we hold
    assert not torch.equal(load_file(ckpt / WEIGHTS)["lm_head.weight"], original["lm_head.weight"])


def test_rename_between_header_parse_and_data_read_loads_the_original(
    ckpt: Path, pristine: dict[str, Path], references: dict[str, LlamaForCausalLM]
) -> None:
    """The plugin's adapter hook runs after the headers are parsed and before any data is read: the swap
    there used to load the new file's bytes at the old header's offsets."""
    swapped = []

    def state_dict_adapter(config: Any, checkpoint: Any) -> None:
        replace_by_rename(ckpt / WEIGHTS, pristine["b"] / WEIGHTS)
        swapped.append(True)

    model = from_pretrained(ckpt, registry=registry_with(llama_plugin(state_dict_adapter=state_dict_adapter)))
    assert swapped == [True]
    assert_same_state_dict(model, references["a"])


def test_in_place_rewrite_during_a_load_is_refused(ckpt: Path) -> None:
    """Rewriting the file in place (same inode, new size) cannot be read consistently: refused, naming it."""

    def state_dict_adapter(config: Any, checkpoint: Any) -> None:
        with open(ckpt / WEIGHTS, "ab") as fh:
            fh.write(b"\0" * 64)

    with pytest.raises(CorruptCheckpointError, match="modified in place") as caught:
        from_pretrained(ckpt, registry=registry_with(llama_plugin(state_dict_adapter=state_dict_adapter)))
    assert caught.value.path == (ckpt / WEIGHTS).resolve()


def test_loads_racing_a_renaming_writer_are_never_a_mix(
    ckpt: Path, pristine: dict[str, Path], references: dict[str, LlamaForCausalLM]
) -> None:
    """A writer thread replaces the shard by rename in a loop, alternating two versions whose offsets differ,
    while loads run: each load is exactly one version (or a typed error), never a mix of the two."""
    registry = registry_with(llama_plugin())
    stop, swaps = threading.Event(), [0]

    def writer() -> None:
        while not stop.is_set():
            replace_by_rename(ckpt / WEIGHTS, pristine["ab"[swaps[0] % 2]] / WEIGHTS)
            swaps[0] += 1

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    outcomes = []
    try:
        for _ in range(12):
            try:
                model = from_pretrained(ckpt, registry=registry)
            except AutomodelPluginsError as exc:
                outcomes.append(type(exc).__name__)
                continue
            matches = [name for name, reference in references.items() if same_state_dict(model, reference)]
            outcomes.append(matches[0] if len(matches) == 1 else "MIXED")
    finally:
        stop.set()
        thread.join()
    assert swaps[0] > len(outcomes), "the writer did not run during the loads"
    assert "MIXED" not in outcomes, outcomes
    assert {"a", "b"} & set(outcomes), outcomes


# --- 2. FP8 tensors under a quantization_config the stock path ignores --------------------------------------


@pytest.mark.parametrize(
    ("quantization", "field"),
    [
        ({"quant_method": "FP8"}, "quant_method 'FP8'"),
        ({"quant_method": "fp8 "}, "quant_method 'fp8 '"),
        ({"quant_method": "bogus"}, "quant_method 'bogus'"),
        ({}, "has no quant_method"),
        (None, "quantization_config is missing"),
    ],
    ids=["FP8", "fp8-space", "bogus", "empty", "missing"],
)
def test_stock_path_refuses_fp8_tensors_it_would_not_scale(
    ckpt: Path, isolated_registry: Registry, quantization: dict | None, field: str
) -> None:
    """No plugin claims: stock transformers loads these with q_proj up to 448 instead of ~0.1, silently."""
    config = json.loads((ckpt / "config.json").read_text())
    if quantization is None:
        del config["quantization_config"]
    else:
        config["quantization_config"] = quantization
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedQuantizationError) as caught:
        from_pretrained(ckpt, registry=isolated_registry)
    message = str(caught.value)
    assert (
        caught.value.path == ckpt.resolve() / "config.json" and str(ckpt.resolve() / "config.json") in message
    )
    assert field in message and "14 FP8 tensor(s) (model.layers.0.mlp.down_proj.weight, " in message
    # inspect raises what the load raises; list --config shows it as a problem (exit 2, one line, no traceback)
    for command in (["inspect", str(ckpt)], ["list", "--config", str(ckpt)]):
        assert main(command) == 2


def test_cli_shows_the_unscaled_fp8_problem_in_one_line(
    ckpt: Path, isolated_registry: Registry, capsys
) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "FP8"
    (ckpt / "config.json").write_text(json.dumps(config))
    assert main(["list", "--config", str(ckpt)]) == 2
    out, err = capsys.readouterr()
    assert "claimed by: (none, and stock transformers cannot load it: see the error)" in out
    assert err.count("\n") == 1 and "quant_method 'FP8'" in err and "Traceback" not in err
    assert main(["inspect", str(ckpt), "--json"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "config.json" in err


def test_stock_path_still_loads_a_well_declared_fp8_checkpoint(
    ckpt: Path, isolated_registry: Registry, references: dict[str, LlamaForCausalLM]
) -> None:
    assert_same_state_dict(from_pretrained(ckpt, registry=isolated_registry), references["a"])


# --- 5. a config asking for more layers than the checkpoint holds -------------------------------------------


@pytest.mark.parametrize("claimed", [True, False], ids=["plugin", "stock"])
def test_huge_layer_count_fails_before_anything_is_built(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch, isolated_registry: Registry, claimed: bool
) -> None:
    """1e6 layers used to build for minutes (>4 GB) on meta before any key was compared."""
    config = json.loads((ckpt / "config.json").read_text())
    config["num_hidden_layers"] = 10**6
    (ckpt / "config.json").write_text(json.dumps(config))

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a model was built before the config was checked against the headers")

    monkeypatch.setattr("automodel_plugins.pipeline.load.load.build_on_meta", never)
    monkeypatch.setattr("automodel_plugins.pipeline.load.load.stock_class", never)
    registry = registry_with(llama_plugin()) if claimed else isolated_registry
    with pytest.raises(ConfigMismatchError, match=r"num_hidden_layers is 1000000") as caught:
        from_pretrained(ckpt, registry=registry)
    assert "model.layers: 2" in str(caught.value) and str(ckpt.resolve() / "config.json") in str(caught.value)
    with pytest.raises(ConfigMismatchError, match="num_hidden_layers"):
        build_model(ckpt, registry=registry)


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("vocab_size", 10**12, "vocab_size is 1000000000000"), ("hidden_size", 128, "hidden_size is 128")],
)
def test_embedding_shape_against_the_config(ckpt: Path, field: str, value: int, match: str) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config[field] = value
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigMismatchError, match=match) as caught:
        from_pretrained(ckpt, registry=registry_with(llama_plugin()))
    assert "model.embed_tokens.weight" in str(caught.value)


# --- 6. malformed JSON, NUL bytes, and raw exceptions -------------------------------------------------------


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_header_json(ckpt: Path) -> None:
    header = ('{"x": ' + deep_json(100_000) + "}").encode()
    (ckpt / WEIGHTS).write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(CorruptCheckpointError, match="nested too deeply") as caught:
        Checkpoint.open(ckpt)
    assert caught.value.path == (ckpt / WEIGHTS).resolve()


def test_deeply_nested_index_json(ckpt: Path) -> None:
    (ckpt / "model.safetensors.index.json").write_text('{"weight_map": ' + deep_json(100_000) + "}")
    with pytest.raises(CorruptCheckpointError, match="nested too deeply") as caught:
        Checkpoint.open(ckpt)
    assert caught.value.path.name == "model.safetensors.index.json"


@pytest.mark.parametrize("depth", [40, 100_000], ids=["deeper-than-any-config", "past-the-recursion-limit"])
def test_deeply_nested_config_json(ckpt: Path, depth: int) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    text = json.dumps(config)[:-1] + ', "deep": ' + deep_json(depth) + "}"
    (ckpt / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="nested") as caught:
        from_pretrained(ckpt, registry=registry_with(llama_plugin()))
    assert caught.value.path == ckpt.resolve() / "config.json"


def write_index(directory: Path, weight_map: dict[str, str]) -> None:
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def test_nul_byte_in_a_weight_map_name(ckpt: Path) -> None:
    keys = list(load_file(ckpt / WEIGHTS))
    write_index(ckpt, {**dict.fromkeys(keys, WEIGHTS), keys[0]: "model\0.safetensors"})
    with pytest.raises(UnsafeCheckpointPathError, match="NUL byte") as caught:
        Checkpoint.open(ckpt)
    assert caught.value.key == keys[0] and caught.value.path.name == "model.safetensors.index.json"


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 0}}, "rope_parameters.rope_theta"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": -10000.0}}, "rope_parameters.rope_theta"),
        ({"rope_parameters": {"rope_type": "wobbly", "rope_theta": 10000.0}}, "rope_parameters.rope_type"),
        (
            {"rope_parameters": {"rope_type": "linear", "factor": 0, "rope_theta": 1e4}},
            "rope_parameters.factor",
        ),
        ({"num_attention_heads": 0}, "num_attention_heads"),
        ({"hidden_size": -64}, "hidden_size"),
        ({"intermediate_size": 0}, "intermediate_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"vocab_size": True}, "vocab_size"),
    ],
    ids=[
        "rope-theta-0",
        "rope-theta-negative",
        "unknown-rope-type",
        "rope-factor-0",
        "0-heads",
        "negative-width",
        "0-intermediate",
        "heads-not-divisible",
        "bool-size",
    ],
)
def test_config_values_no_model_can_be_built_with(
    ckpt: Path, edit: dict, field: str, isolated_registry: Registry, capsys: pytest.CaptureFixture
) -> None:
    """transformers raised ValueError (math domain error), KeyError, ZeroDivisionError or RuntimeError for
    these, or (factor 0) loaded NaN rotary frequencies; refused before transformers sees them."""
    config = json.loads((ckpt / "config.json").read_text())
    config.update(edit)
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as caught:
        from_pretrained(ckpt, registry=registry_with(llama_plugin()))
    assert field in str(caught.value) and caught.value.path == ckpt.resolve() / "config.json"
    assert main(["inspect", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err


def test_architectures_naming_another_model(ckpt: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config["architectures"] = ["Mistral3ForConditionalGeneration"]
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="architectures names Mistral3ForConditionalGeneration") as caught:
        from_pretrained(ckpt, registry=registry_with(llama_plugin()))
    assert "'llama'" in str(caught.value) and caught.value.path == ckpt.resolve() / "config.json"


def test_nul_byte_in_the_path_itself(isolated_registry: Registry) -> None:
    with pytest.raises(SourceNotFoundError, match="NUL byte"):
        from_pretrained("/tmp/model\0dir", registry=isolated_registry)


# --- 3. values a conversion would break -----------------------------------------------------------------------


def test_a_cast_that_overflows_the_load_dtype_is_refused(ckpt: Path) -> None:
    """An F32 norm holding 1e5 fits BF16 but not FP16 (65504): loading in FP16 must not give inf."""
    tensors = load_file(ckpt / WEIGHTS)
    norm = tensors["model.norm.weight"].float()
    norm[3] = 1e5
    tensors["model.norm.weight"] = norm
    save_file(tensors, ckpt / WEIGHTS, metadata={"format": "pt"})
    registry = registry_with(llama_plugin())
    assert from_pretrained(ckpt, registry=registry).model.norm.weight[3].item() == 99840.0  # BF16 rounding
    with pytest.raises(
        NonFiniteWeightError, match=r"stored value 100000.0 at \(3,\) overflows torch.float16"
    ) as caught:
        from_pretrained(ckpt, registry=registry, dtype=torch.float16)
    assert caught.value.key == "model.norm.weight"


def test_rotary_buffers_a_plugin_leaves_non_finite_are_refused(ckpt: Path) -> None:
    """The host's own check after post_materialize, for a plugin that recomputes rotary tables its own way."""

    @hookimpl
    def post_materialize(model: Any, config: Any) -> None:
        repair_rotary(model)
        model.model.rotary_emb.inv_freq[1] = float("inf")

    plugin = llama_plugin()
    plugin.post_materialize = post_materialize
    with pytest.raises(RotaryRepairError, match=r"model\.rotary_emb\.inv_freq hold NaN or inf") as caught:
        from_pretrained(ckpt, registry=registry_with(plugin))
    assert "rope_parameters" in str(caught.value)


# --- 6. plugins that misbehave ------------------------------------------------------------------------------


class ShakyAdapter(StateDictAdapter):
    """Keeps names as they are, except that asked about q_proj it raises ``answer`` or answers with it."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def from_hf(self, name: str) -> TensorSource:
        if name != Q_PROJ:
            return TensorSource(name)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def to_hf(self, name: str) -> str:
        return name


@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (KeyError("no such layer"), r"from_hf\('model.layers.0.self_attn.q_proj.weight'\) raised KeyError"),
        ("model.layers.0.self_attn.q_proj.weight", r"returned str, not a TensorSource"),
        (None, r"returned NoneType, not a TensorSource"),
        (TensorSource(Q_PROJ, scale_key=7), r"key and scale_key must be strings"),
    ],
    ids=["raises", "a-string", "none", "malformed-source"],
)
def test_an_adapter_that_raises_or_answers_wrongly_names_the_plugin(
    ckpt: Path, answer: Any, match: str
) -> None:
    registry = registry_with(
        llama_plugin(state_dict_adapter=lambda config, checkpoint: ShakyAdapter(answer)), name="shaky"
    )
    with pytest.raises(PluginError, match=match) as caught:
        from_pretrained(ckpt, registry=registry)
    assert caught.value.plugin == "shaky" and caught.value.hook == "state_dict_adapter"


EXITING_CLAIMER = """
from automodel_plugins import hookimpl

@hookimpl
def claim_config(config):
    raise SystemExit(3)
"""


@pytest.mark.parametrize("command", ["list", "inspect"])
def test_claim_raising_system_exit_is_exit_2_with_one_line(
    ckpt: Path, fake_distribution: Any, run_cli: Any, command: str
) -> None:
    """A claim_config calling sys.exit used to end the CLI with exit 3 and nothing printed."""
    site = fake_distribution(
        "automodel-plugins-exiting",
        entry_points={"exiting": "exiting_mod"},
        modules={"exiting_mod": EXITING_CLAIMER},
    )
    args = ["list", "--config", str(ckpt)] if command == "list" else ["inspect", str(ckpt)]
    result = run_cli(*args, env={"AUTOMODEL_PLUGINS": "exiting"}, pythonpath=[site])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1
    assert "plugin 'exiting'" in result.stderr and "SystemExit: 3" in result.stderr


# --- 8. what a path names: directories and FIFOs where files belong ----------------------------------------


def sharded(ckpt: Path) -> str:
    """Turn ``ckpt`` into an index naming one shard; returns the shard's name."""
    name = "model-00001-of-00001.safetensors"
    keys = list(load_file(ckpt / WEIGHTS))
    (ckpt / WEIGHTS).rename(ckpt / name)
    write_index(ckpt, dict.fromkeys(keys, name))
    return name


@pytest.mark.parametrize(("kind", "said"), [("directory", "is a directory"), ("fifo", "is a FIFO")])
def test_a_shard_that_is_no_file_says_what_it_is(ckpt: Path, kind: str, said: str) -> None:
    """Used to say "does not exist" (and a FIFO opened for reading blocks forever)."""
    name = sharded(ckpt)
    (ckpt / name).unlink()
    os.mkdir(ckpt / name) if kind == "directory" else os.mkfifo(ckpt / name)
    with pytest.raises(CheckpointError, match=said) as caught:
        Checkpoint.open(ckpt)
    assert name in str(caught.value)


@pytest.mark.parametrize("name", [WEIGHTS, "config.json", "model.safetensors.index.json"])
def test_a_fifo_in_a_files_place_never_blocks(ckpt: Path, name: str) -> None:
    (ckpt / name).unlink(missing_ok=True)
    os.mkfifo(ckpt / name)
    with pytest.raises(AutomodelPluginsError, match="is a FIFO"):
        from_pretrained(ckpt, registry=registry_with(llama_plugin()))


def test_weights_file_that_is_a_directory(ckpt: Path) -> None:
    (ckpt / WEIGHTS).unlink()
    (ckpt / WEIGHTS).mkdir()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is a directory"):
        Checkpoint.open(ckpt)


# --- 9. files truncated after a load: mmap=False ------------------------------------------------------------


def test_mmap_false_survives_the_files_being_truncated(
    ckpt: Path, references: dict[str, LlamaForCausalLM]
) -> None:
    model = from_pretrained(ckpt, registry=registry_with(llama_plugin()), mmap=False)
    assert model.automodel_composition.options["mmap"] is False
    os.truncate(ckpt / WEIGHTS, 8)
    assert_same_state_dict(model, references["a"])  # touches lm_head and every other tensor


TRUNCATE_AFTER_LOAD = """
import os, sys, types
from automodel_plugins import Claim, hookimpl, repair_rotary
from automodel_plugins.adapters import StateDictAdapter, TensorSource
from automodel_plugins.pipeline.load.load import from_pretrained
from automodel_plugins.registry import Registry

registry = Registry()
registry.register(types.SimpleNamespace(
    claim_config=hookimpl(lambda config: Claim(reason="test")),
    post_materialize=hookimpl(lambda model, config: repair_rotary(model)),
), "llama_test")
path, mmap = sys.argv[1], sys.argv[2] == "mmap"
model = from_pretrained(path, registry=registry, mmap=mmap)
os.truncate(os.path.join(path, "model.safetensors"), 8)
print(float(model.lm_head.weight.float().sum()), flush=True)
"""


@pytest.mark.parametrize("mode", ["mmap", "copy"])
def test_truncating_a_mapped_shard_after_the_load(
    ckpt: Path, references: dict[str, LlamaForCausalLM], mode: str
) -> None:
    """What docs/bad-input.md documents: the default (memory-mapped) load dies with SIGBUS on the next touch of
    a truncated shard's tensor, like stock transformers; mmap=False does not depend on the file."""
    result = subprocess.run(
        [sys.executable, "-c", TRUNCATE_AFTER_LOAD, str(ckpt), mode],
        env=subprocess_env({"AUTOMODEL_PLUGINS_PROGRESS": "0"}),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if mode == "mmap":
        assert result.returncode == -signal.SIGBUS, result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert float(result.stdout) == float(references["a"].lm_head.weight.detach().float().sum())
