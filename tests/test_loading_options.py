"""transformers' ``from_pretrained`` options on the plugin path (``pipeline/load/options.py``'s table).

Every supported option is checked against stock transformers loading the same checkpoint with the same option
(the class's config, the dtype it picks, the logits), every refused one for its typed error; the table itself
against transformers' own ``from_pretrained`` (no option it reads is left unclassified) and against
``docs/loading-options.md`` (the same table).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import (
    GenerationConfig,
    LlamaForCausalLM,
    Mistral3ForConditionalGeneration,
    Qwen3VLMoeForConditionalGeneration,
)
from transformers.utils import logging as hf_logging

import automodel_plugins
from automodel_plugins.errors import LoadOptionError
from automodel_plugins.model.device_map import device_of, tensor_devices
from automodel_plugins.pipeline.load.options import OPTIONS, TORCH_DTYPE_DEPRECATION
from automodel_plugins.registry import Registry
from automodel_plugins.testing.checkpoints import write_fp8_checkpoint
from automodel_plugins.testing.compare import assert_same_logits, assert_same_state_dict
from automodel_plugins.testing.tiny_models import (
    mistral3_image_batch,
    tiny_llama_config,
    tiny_mistral3_config,
    tiny_qwen3_vl_moe_config,
)

hf_logging.disable_progress_bar()
DOC = Path(__file__).resolve().parents[1] / "docs" / "loading-options.md"


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.from_entry_points(selection="mistral3_fp8,qwen3_vl_moe_fp8")


@pytest.fixture(scope="module")
def mistral3() -> Mistral3ForConditionalGeneration:
    torch.manual_seed(0)
    return Mistral3ForConditionalGeneration(
        tiny_mistral3_config(architectures=["Mistral3ForConditionalGeneration"])
    ).eval()


@pytest.fixture(scope="module")
def fp8_path(mistral3: Mistral3ForConditionalGeneration, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per-tensor FP8 (Mistral's format), which stock transformers dequantizes exactly on CPU."""
    return write_fp8_checkpoint(mistral3, tmp_path_factory.mktemp("mistral3_fp8"))


@pytest.fixture(scope="module")
def inputs(mistral3: Mistral3ForConditionalGeneration) -> dict[str, torch.Tensor]:
    return mistral3_image_batch(mistral3.config, labels=False, dtype=torch.bfloat16)


def stock(path: Path, cls: type = Mistral3ForConditionalGeneration, **options: Any) -> Any:
    """transformers' own ``from_pretrained`` of ``path`` (quiet: its CPU dequantization notice)."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return cls.from_pretrained(str(path), local_files_only=True, **options)
    finally:
        hf_logging.set_verbosity(verbosity)


def attn_implementations(config: Any) -> list[Any]:
    return [config._attn_implementation] + [
        getattr(config, name)._attn_implementation for name in ("text_config", "vision_config")
    ]


# --- attn_implementation / experts_implementation ----------------------------------------------------------


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attn_implementation_gives_stock_config_and_logits(
    fp8_path: Path, registry: Registry, inputs: dict[str, torch.Tensor], impl: str
) -> None:
    ours = automodel_plugins.from_pretrained(fp8_path, registry=registry, attn_implementation=impl)
    expected = stock(fp8_path, attn_implementation=impl)
    assert ours.automodel_composition.plugin == "mistral3_fp8"
    assert attn_implementations(ours.config) == attn_implementations(expected.config) == [impl] * 3
    assert_same_logits(ours, expected, inputs)


def test_attn_implementation_flex_attention_as_stock(fp8_path: Path, registry: Registry) -> None:
    ours = automodel_plugins.from_pretrained(
        fp8_path, registry=registry, attn_implementation="flex_attention"
    )
    expected = stock(fp8_path, attn_implementation="flex_attention")
    assert attn_implementations(ours.config) == attn_implementations(expected.config)


def test_attn_implementation_default_is_stocks(fp8_path: Path, registry: Registry) -> None:
    ours = automodel_plugins.from_pretrained(fp8_path, registry=registry)
    assert attn_implementations(ours.config) == attn_implementations(stock(fp8_path).config)


@pytest.mark.parametrize("impl", ["flash_attention_2", "flash_attention_3", "no_such_attention"])
def test_attn_implementation_unavailable_is_refused_with_transformers_reason(
    fp8_path: Path, registry: Registry, impl: str
) -> None:
    with pytest.raises(Exception) as stock_error:
        stock(fp8_path, attn_implementation=impl)
    with pytest.raises(LoadOptionError, match=r"attn_implementation") as caught:
        automodel_plugins.from_pretrained(fp8_path, registry=registry, attn_implementation=impl)
    assert caught.value.option == "attn_implementation"
    assert str(stock_error.value)[:60] in str(caught.value)  # transformers' own reason


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Qwen3-VL-MoE in transformers' own format (save_pretrained, BF16): stock reads it exactly."""
    torch.manual_seed(0)
    model = Qwen3VLMoeForConditionalGeneration(tiny_qwen3_vl_moe_config())
    directory = tmp_path_factory.mktemp("qwen3_vl_moe")
    model.to(torch.bfloat16).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("impl", ["eager", "batched_mm", "grouped_mm"])
def test_experts_implementation_gives_stock_config_and_logits(
    moe_path: Path, registry: Registry, impl: str
) -> None:
    ours = automodel_plugins.from_pretrained(moe_path, registry=registry, experts_implementation=impl)
    expected = stock(moe_path, Qwen3VLMoeForConditionalGeneration, experts_implementation=impl)
    assert ours.automodel_composition.plugin == "qwen3_vl_moe_fp8"
    got = (ours.config._experts_implementation, ours.config.text_config._experts_implementation)
    assert got == (
        expected.config._experts_implementation,
        expected.config.text_config._experts_implementation,
    )
    assert ours.config.text_config._experts_implementation == impl
    ids = torch.randint(0, 190, (2, 12), generator=torch.Generator().manual_seed(3))  # below the vision ids
    assert_same_logits(ours, expected, {"input_ids": ids})


def test_experts_implementation_unknown_is_refused(moe_path: Path, registry: Registry) -> None:
    with pytest.raises(LoadOptionError, match=r"experts_implementation.*not supported"):
        automodel_plugins.from_pretrained(moe_path, registry=registry, experts_implementation="no_such")


# --- dtype, torch_dtype -------------------------------------------------------------------------------------


def test_dtype_auto_with_config_dtype_is_stocks(fp8_path: Path, registry: Registry) -> None:
    for dtype in ("auto", None):
        ours = automodel_plugins.from_pretrained(fp8_path, registry=registry, dtype=dtype)
        assert ours.dtype == stock(fp8_path, dtype="auto").dtype == torch.bfloat16


@pytest.mark.parametrize(("shards", "picked"), [(1, torch.float16), (2, torch.float32)])
def test_dtype_auto_without_config_dtype_is_the_first_floating_weight_as_stock(
    mistral3: Mistral3ForConditionalGeneration,
    tmp_path: Path,
    registry: Registry,
    shards: int,
    picked: torch.dtype,
) -> None:
    """No dtype in config.json: transformers takes the first floating, non-FP8 tensor (keys sorted) of the
    first shard: ``lm_head.weight`` (float16) in one file; in two, the first shard starts with a float32
    activation scale, so float32. The old fallback was BF16 either way."""
    path = write_fp8_checkpoint(mistral3, tmp_path / "ckpt", dtype=torch.float16, shards=shards)
    config = json.loads((path / "config.json").read_text())
    for holder in (config, config["text_config"], config["vision_config"]):
        holder.pop("dtype", None)
        holder.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(config))
    expected = stock(path, dtype="auto")
    ours = automodel_plugins.from_pretrained(path, registry=registry, dtype="auto")
    assert ours.dtype == expected.dtype == picked
    assert_same_state_dict(ours, expected)


def test_torch_dtype_alias_warns_as_transformers(fp8_path: Path, registry: Registry) -> None:
    def messages(load: Any) -> list[str]:
        logging.Logger.warning_once.cache_clear()  # transformers says it once a process
        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append  # type: ignore[method-assign]
        logger = logging.getLogger("transformers")
        logger.addHandler(handler)
        try:
            model = load()
        finally:
            logger.removeHandler(handler)
        assert model.dtype == torch.float32
        return [r.getMessage() for r in records if "torch_dtype" in r.getMessage()]

    ours = messages(
        lambda: automodel_plugins.from_pretrained(fp8_path, registry=registry, torch_dtype=torch.float32)
    )
    # transformers says it from its Auto classes (the model classes' own from_pretrained is silent)
    theirs = messages(
        lambda: transformers.AutoModelForImageTextToText.from_pretrained(
            str(fp8_path), torch_dtype=torch.float32
        )
    )
    assert ours == theirs == [TORCH_DTYPE_DEPRECATION]
    both = automodel_plugins.from_pretrained(
        fp8_path, registry=registry, torch_dtype=torch.float32, dtype=torch.float16
    )
    assert (
        both.dtype == stock(fp8_path, torch_dtype=torch.float32, dtype=torch.float16).dtype == torch.float16
    )


def test_dtype_dict_is_refused(fp8_path: Path, registry: Registry) -> None:
    with pytest.raises(LoadOptionError, match=r"dtype"):
        automodel_plugins.from_pretrained(fp8_path, registry=registry, dtype={"": torch.float32})


# --- device_map ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device_map",
    ["cpu", {"": "cpu"}, torch.device("cpu"), {"model": "cpu", "lm_head": "cpu"}, "auto", "sequential"],
    ids=["str", "all", "torch-device", "two-modules", "auto", "sequential"],
)
def test_device_map_on_cpu_loads_as_stock(
    fp8_path: Path, registry: Registry, inputs: dict[str, torch.Tensor], device_map: Any
) -> None:
    ours = automodel_plugins.from_pretrained(fp8_path, registry=registry, device_map=device_map)
    expected = stock(fp8_path, device_map=device_map)
    assert {t.device.type for t in ours.state_dict().values()} == {"cpu"}
    assert getattr(ours, "hf_device_map", None) == getattr(expected, "hf_device_map", None)
    assert_same_logits(ours, expected, inputs)


def test_device_map_auto_is_computed_on_the_meta_model_in_the_load_dtype(
    fp8_path: Path, registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The map is transformers' own computation, on the meta model (no tensor loaded yet) in the load's dtype,
    with FP8-resident layers already at their FP8 size."""
    from transformers.integrations import accelerate as hf_accelerate

    seen: list[tuple[set[str], set[torch.dtype], set[str]]] = []
    original = hf_accelerate._get_device_map

    def spy(model: Any, device_map: Any, max_memory: Any, quantizer: Any) -> Any:
        tensors = list(model.parameters())
        kinds = {type(module).__name__ for module in model.modules()}
        seen.append(({t.device.type for t in tensors}, {t.dtype for t in tensors}, kinds))
        return original(model, device_map, max_memory, quantizer)

    monkeypatch.setattr(hf_accelerate, "_get_device_map", spy)
    automodel_plugins.from_pretrained(fp8_path, registry=registry, device_map="auto", dtype=torch.float16)
    automodel_plugins.from_pretrained(fp8_path, registry=registry, device_map="auto", dequantize=False)
    (devices, dtypes, _), (resident_devices, _, kinds) = seen
    assert devices == resident_devices == {"meta"} and dtypes == {torch.float16}
    assert "Fp8Linear" in kinds


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_map_cuda_without_cuda_is_a_clear_error(fp8_path: Path, registry: Registry) -> None:
    for device_map in ("cuda", {"": "cuda:0"}, {"model": "cpu", "lm_head": 0}):
        with pytest.raises(LoadOptionError, match=r"no (cuda|accelerator) device"):
            automodel_plugins.from_pretrained(fp8_path, registry=registry, device_map=device_map)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"device_map": {"": "meta"}}, "'meta'.*build_model"),
        ({"device_map": {"lm_head": "disk", "": "cpu"}}, "'lm_head'.*'disk'.*not supported"),
        ({"device_map": "auto", "max_memory": {"cpu": 100_000}}, "offloads module .* to disk"),
        ({"device_map": "everywhere"}, "not a device"),
        ({"device_map": "cpu", "device": "cpu"}, "not both"),
        ({"max_memory": {"cpu": "1GiB"}}, "automatic device_map"),
        ({"offload_folder": "/tmp/offload"}, "disk offload"),
    ],
)
def test_device_map_refusals(fp8_path: Path, registry: Registry, options: dict[str, Any], match: str) -> None:
    with pytest.raises(LoadOptionError, match=match):
        automodel_plugins.from_pretrained(fp8_path, registry=registry, **options)


def test_device_map_routes_each_tensor_to_its_modules_device() -> None:
    """The per-tensor routing of a map over modules (no device needed): the longest enclosing module wins,
    a name is matched on module boundaries, and what no entry covers goes to the CPU as in transformers."""
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    device_map = {"model.language_model": cuda0, "model.language_model.layers.1": cuda1, "lm_head": cuda1}
    devices = tensor_devices(
        device_map,
        [
            "model.language_model.layers.0.mlp.up_proj.weight",
            "model.language_model.layers.1.mlp.up_proj.weight",
            "model.language_model.layers.10.mlp.up_proj.weight",
            "lm_head.weight",
            "model.vision_tower.ln_pre.weight",
        ],
    )
    assert list(devices.values()) == [cuda0, cuda1, cuda0, cuda1, torch.device("cpu")]
    assert device_of({"": cuda1, "lm_head": cuda0}, "lm_head_extra.weight") == cuda1


# --- the rest of the table --------------------------------------------------------------------------------


def test_accepted_options_change_nothing(fp8_path: Path, registry: Registry) -> None:
    plain = automodel_plugins.from_pretrained(fp8_path, registry=registry)
    accepted = {
        name: True
        for name, rule in OPTIONS.items()
        if rule.status == "accepted" and rule.asks_nothing(True) and name != "weights_only"
    }
    assert {"low_cpu_mem_usage", "mirror", "from_tf"} <= set(accepted)
    model = automodel_plugins.from_pretrained(
        fp8_path, registry=registry, weights_only=False, trust_remote_code=False, **accepted
    )
    assert_same_state_dict(model, plain)


def test_trust_remote_code_is_refused_on_both_paths(
    fp8_path: Path, tmp_path: Path, registry: Registry
) -> None:
    llama = LlamaForCausalLM(tiny_llama_config())
    llama.save_pretrained(tmp_path / "llama")  # no plugin claims a Llama: the stock path
    for path in (fp8_path, tmp_path / "llama"):
        with pytest.raises(LoadOptionError, match=r"trust_remote_code.*never runs") as caught:
            automodel_plugins.from_pretrained(path, registry=registry, trust_remote_code=True)
        assert caught.value.option == "trust_remote_code"


@pytest.mark.parametrize("name", sorted(n for n, rule in OPTIONS.items() if rule.status == "stock-only"))
def test_stock_only_options_are_refused_naming_option_and_plugin(
    fp8_path: Path, registry: Registry, name: str
) -> None:
    with pytest.raises(LoadOptionError) as caught:
        automodel_plugins.from_pretrained(fp8_path, registry=registry, **{name: "something"})
    assert caught.value.option == name
    assert "'mistral3_fp8'" in str(caught.value) and OPTIONS[name].plugin_path in str(caught.value)


def test_stock_only_options_at_their_default_are_accepted(fp8_path: Path, registry: Registry) -> None:
    defaults = {name: rule.default for name, rule in OPTIONS.items() if rule.status == "stock-only"}
    model = automodel_plugins.from_pretrained(fp8_path, registry=registry, **defaults)
    assert model.automodel_composition.plugin == "mistral3_fp8"


def test_config_attributes_update_the_config_as_transformers(fp8_path: Path, registry: Registry) -> None:
    ours = automodel_plugins.from_pretrained(fp8_path, registry=registry, output_hidden_states=True)
    assert (
        ours.config.output_hidden_states
        is stock(fp8_path, output_hidden_states=True).config.output_hidden_states
    )
    assert ours.config.output_hidden_states is True
    with pytest.raises(TypeError):
        stock(fp8_path, no_such_option=1)
    with pytest.raises(LoadOptionError, match=r"no_such_option.*Mistral3Config"):
        automodel_plugins.from_pretrained(fp8_path, registry=registry, no_such_option=1)


def test_config_object_replaces_config_json(fp8_path: Path, registry: Registry) -> None:
    config = automodel_plugins.load_config(fp8_path)
    config.text_config.rms_norm_eps = 1e-3
    ours = automodel_plugins.from_pretrained(fp8_path, registry=registry, config=config)
    assert ours.config.text_config.rms_norm_eps == 1e-3
    assert config.text_config.rms_norm_eps == 1e-3  # the caller's config is not the model's
    with pytest.raises(LoadOptionError, match=r"config.*PretrainedConfig"):
        automodel_plugins.from_pretrained(fp8_path, registry=registry, config=str(fp8_path))


def test_output_loading_info_as_transformers(fp8_path: Path, registry: Registry) -> None:
    model, info = automodel_plugins.from_pretrained(fp8_path, registry=registry, output_loading_info=True)
    _, expected = stock(fp8_path, output_loading_info=True)
    assert isinstance(model, Mistral3ForConditionalGeneration)
    assert (
        info
        == expected
        == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    )


def test_generation_config_is_set(fp8_path: Path, registry: Registry) -> None:
    generation = GenerationConfig(max_new_tokens=7, do_sample=False)
    model = automodel_plugins.from_pretrained(fp8_path, registry=registry, generation_config=generation)
    assert model.generation_config.max_new_tokens == 7


def test_disable_mmap_is_mmap_false(fp8_path: Path, tmp_path: Path, registry: Registry) -> None:
    """``disable_mmap=True``: no tensor depends on the mapped shard (the same as ``mmap=False``), so the
    model survives the file being truncated after the load."""
    copy = Path(shutil.copytree(fp8_path, tmp_path / "copy"))
    model = automodel_plugins.from_pretrained(copy, registry=registry, disable_mmap=True)
    assert model.automodel_composition.options["mmap"] is False
    assert automodel_plugins.from_pretrained(copy, registry=registry).automodel_composition.options["mmap"]
    os.truncate(copy / "model.safetensors", 8)
    assert_same_state_dict(model, automodel_plugins.from_pretrained(fp8_path, registry=registry))


def test_build_model_takes_the_options_that_shape_the_model(fp8_path: Path, registry: Registry) -> None:
    model = automodel_plugins.build_model(
        fp8_path,
        registry=registry,
        attn_implementation="eager",
        torch_dtype="float32",
        low_cpu_mem_usage=True,
    )
    assert model.config._attn_implementation == "eager" and model.dtype == torch.float32
    assert all(t.is_meta for t in model.parameters())
    with pytest.raises(LoadOptionError, match=r"device_map.*build_model"):
        automodel_plugins.build_model(fp8_path, registry=registry, device_map="cpu")


def test_stock_path_takes_torch_dtype_and_device_map(tmp_path: Path, registry: Registry) -> None:
    """No plugin claims a Llama: the options go to transformers as given (torch_dtype used to lose to the
    host's dtype="auto", and device_map collided with the host's own)."""
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16).save_pretrained(tmp_path)
    model = automodel_plugins.from_pretrained(
        tmp_path, registry=registry, torch_dtype=torch.float32, device_map="cpu"
    )
    assert model.automodel_composition.plugin is None
    assert model.dtype == stock(tmp_path, LlamaForCausalLM, torch_dtype=torch.float32).dtype == torch.float32


# --- the table: complete for transformers, and the same in the docs ------------------------------------------


def transformers_options() -> set[str]:
    """Every keyword transformers' ``PreTrainedModel.from_pretrained`` reads: its signature, what it pops from
    ``kwargs``, and what it looks up in them."""
    method = transformers.PreTrainedModel.from_pretrained
    signature = {
        name
        for name, p in inspect.signature(method).parameters.items()
        if p.kind is p.KEYWORD_ONLY or (p.kind is p.POSITIONAL_OR_KEYWORD and name not in ("cls",))
    } - {"pretrained_model_name_or_path"}
    source = inspect.getsource(method)
    popped = set(re.findall(r'kwargs\.pop\("(\w+)"', source))
    looked_up = set(re.findall(r'"(\w+)" in kwargs', source))
    ignored = next(m for m in re.findall(r"for name in \[([^\]]*)\]", source) if "low_cpu_mem_usage" in m)
    listed = {name.strip().strip('"') for name in ignored.split(",")}
    return signature | popped | looked_up | listed


def test_every_transformers_option_is_classified() -> None:
    options = transformers_options()
    assert {"attn_implementation", "device_map", "low_cpu_mem_usage", "trust_remote_code"} <= options
    assert sorted(options - set(OPTIONS)) == []


def doc_table() -> dict[str, str]:
    rows = re.findall(r"^\| `([\w]+)` \| (supported|accepted|stock-only|refused) \|", DOC.read_text(), re.M)
    return dict(rows)


def test_the_docs_table_is_the_code_table() -> None:
    assert doc_table() == {name: rule.status for name, rule in OPTIONS.items()}
