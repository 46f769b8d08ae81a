"""Every reader of the state dict sees an FP8-resident compressed-tensors model in compressed-tensors' names and
shapes (``weight_scale`` ``[1]`` / ``[out, 1]`` / the grid, ``input_scale`` ``[1]``), and every writer back into it
is taken: ``torch.distributed.checkpoint`` (``get_model_state_dict`` / ``dcp.save`` / ``dcp.load`` /
``set_model_state_dict``, sharded and full, in place), FSDP2 (one gloo rank, in-process; two ranks:
tests/distributed/test_ct_state_dict.py), ``requantize_state_dict``, tensor parallelism's plain scales, and a
``.to()`` cast. Each round trip is checked against the source checkpoint's own tensors (read with safetensors).

Before the fix the keys were transformers' (``weight_scale_inv``, ``activation_scale``, 0-d), which the
compressed-tensors config the model keeps does not name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from mistral3_checkpoints import (
    checkpoint_tensors,
    edit_tensors,
    legacy_name,
    tiny_model,
    write_checkpoint,
)
from test_compressed_tensors_hf import fp8_block
from test_compressed_tensors_stock_save import FORMS  # the same three forms, written the same way
from test_fsdp_save_config import single_rank_mesh

import automodel_plugins
from automodel_plugins.model.fp8_linear import Fp8Linear, fp8_linear_modules

__all__ = ["single_rank_mesh"]  # the fixture, used here

F32 = torch.float32
PLUGIN = "mistral3_fp8"


@pytest.fixture(autouse=True)
def only_this_plugin(plugin_registry: Any) -> None:
    plugin_registry(PLUGIN)


def write_compressed_tensors(directory: Path, form: str) -> Path:
    """A tiny Mistral3 compressed-tensors checkpoint in ``form`` as llm-compressor writes it (per-tensor scales
    ``[1]``)."""
    spec, block = FORMS[form]
    path = write_checkpoint(tiny_model(spec.model), directory, spec)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = fp8_block(block)
    (path / "config.json").write_text(json.dumps(config))
    if block is None:
        edit_tensors(
            path,
            lambda tensors: tensors.update(
                {k: v.reshape(1) for k, v in tensors.items() if k.endswith(("weight_scale", "input_scale"))}
            ),
        )
    return path


@pytest.fixture(scope="module", params=sorted(FORMS))
def source(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_compressed_tensors(tmp_path_factory.mktemp(request.param) / "ct", request.param)


def resident(path: Path) -> Any:
    return automodel_plugins.from_pretrained(path, dtype=F32, dequantize=False)


def scrambled(path: Path) -> Any:
    """A resident model of ``path`` whose scales and codes are all changed: a load must set every one."""
    model = resident(path)
    with torch.no_grad():
        for layer in fp8_linear_modules(model).values():
            layer.weight_scale_inv.mul_(3)
            layer.weight.zero_()
            if layer.activation_scale is not None:
                layer.activation_scale.mul_(5)
    return model


def assert_holds_the_source(model: torch.nn.Module, path: Path) -> None:
    """Every FP8 code and scale of the source, under its runtime name, in ``model.state_dict()`` (scales as
    stored there: same shape, values exact in fp32)."""
    state, stored = model.state_dict(), checkpoint_tensors(path)
    runtime = {legacy_name(name): name for name in state}
    checked = 0
    for key, value in stored.items():
        if value.dtype == torch.float8_e4m3fn or key.endswith(("weight_scale", "input_scale")):
            got = state[runtime[key]]
            assert tuple(got.shape) == tuple(value.shape), key
            assert (
                torch.equal(got.reshape(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8))
                if (value.dtype == torch.float8_e4m3fn)
                else torch.equal(got, value.float())
            ), key
            checked += 1
    assert checked > 0


def test_dcp_save_and_load_one_process(source: Path, tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = get_model_state_dict(resident(source))
    assert any(key.endswith(".weight_scale") for key in state)
    dcp.save(state, checkpoint_id=tmp_path / "dcp")
    model = scrambled(source)
    again = get_model_state_dict(model)
    dcp.load(again, checkpoint_id=tmp_path / "dcp")
    set_model_state_dict(model, again)
    assert_holds_the_source(model, source)
    model = scrambled(source)  # in place: dcp.load into model.state_dict() itself (views of the buffers)
    dcp.load(model.state_dict(), checkpoint_id=tmp_path / "dcp")
    assert_holds_the_source(model, source)


def test_full_state_dict_set_and_requantize(source: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    full = resident(source).state_dict()
    model = scrambled(source)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
    assert_holds_the_source(model, source)
    # dequantized weights and the source scales (under the names state_dict() shows) back through
    # requantize_state_dict: the source's codes and scales again, byte for byte
    dequantized = automodel_plugins.from_pretrained(source, dtype=torch.bfloat16).state_dict()
    scales = {key: value for key, value in full.items() if key.endswith(("weight_scale", "input_scale"))}
    model = scrambled(source)
    requantized = automodel_plugins.requantize_state_dict(model, {**dequantized, **scales})
    assert not any(key.endswith(("weight_scale_inv", "activation_scale")) for key in requantized)
    result = model.load_state_dict(requantized, strict=True)
    assert not result.unexpected_keys and not result.missing_keys
    assert_holds_the_source(model, source)


def test_fsdp2_dcp_round_trip(source: Path, tmp_path: Path, single_rank_mesh: Any) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        set_model_state_dict,
    )
    from torch.distributed.fsdp import fully_shard

    def sharded(model: Any) -> Any:
        for layer in model.model.language_model.layers:
            fully_shard(layer, mesh=single_rank_mesh)
        fully_shard(model, mesh=single_rank_mesh)
        return model

    state = get_model_state_dict(sharded(resident(source)))
    scale_keys = [key for key in state if key.endswith(("weight_scale", "input_scale"))]
    assert scale_keys and not any(key.endswith(("weight_scale_inv", "activation_scale")) for key in state)
    dcp.save(state, checkpoint_id=tmp_path / "dcp")
    model = sharded(scrambled(source))
    again = get_model_state_dict(model)
    dcp.load(again, checkpoint_id=tmp_path / "dcp")
    set_model_state_dict(model, again)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    unsharded = resident(source)
    unsharded.load_state_dict(full, strict=True)
    assert_holds_the_source(unsharded, source)


def test_a_cast_keeps_the_names_and_the_views(source: Path) -> None:
    model = resident(source).to(torch.bfloat16)
    layer = model.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(layer, Fp8Linear) and layer.compute_dtype == torch.bfloat16
    state = model.state_dict()
    key = "model.language_model.layers.0.self_attn.q_proj.weight_scale"
    assert state[key].dtype == F32 and state[key].data_ptr() == layer.weight_scale_inv.data_ptr()
    assert_holds_the_source(model, source)
