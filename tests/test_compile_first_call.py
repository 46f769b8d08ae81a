"""``torch.compile`` from a loaded model's very first call: no graph break from the rotary repair, the same
logits, loss and gradients as eager, and rotary buffers equal to a freshly built stock model's.

Before, every rotary module carried a one-shot forward pre-hook after loading, and dynamo traced it on the
first compiled call: the recompute (``torch.device`` context, building a module, ``int(tensor)``) and the hook
removing itself broke the graph 8 times on the tiny Mistral3 below. Now the buffers are recomputed at load
and again by each rotary module's ``_apply`` (``to_empty``, ``.to``), which dynamo never traces, and the hook
reduces to an attribute check under compile.

The fused loss is a custom op and the forward override reads its output class's fields when it is built (issue
21.6), so every break counts here, theirs included.
"""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from mistral3_checkpoints import TEXT_ROTARY, VISION_ROTARY
from torch import nn
from torch._dynamo.backends.debugging import ExplainWithBackend
from transformers import Mistral3ForConditionalGeneration, MistralConfig, MistralForCausalLM

import automodel_plugins
from automodel_plugins.model.rotary import repair_rotary
from automodel_plugins.testing.tiny_models import TINY_TEXT_SIZES, mistral3_image_batch, tiny_mistral3_config

peft = pytest.importorskip("peft")

F32 = torch.float32
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def checkpoint(fp8_checkpoint_factory: Any) -> Path:
    torch.manual_seed(0)
    return fp8_checkpoint_factory(Mistral3ForConditionalGeneration(tiny_mistral3_config()), name="mistral3")


def load(checkpoint: Path, registry: Any, *, resident: bool) -> nn.Module:
    """Dequantized, or FP8-resident with PEFT LoRA on every linear of the text model."""
    model = automodel_plugins.from_pretrained(
        checkpoint, dtype=F32, dequantize=not resident, registry=registry
    )
    if not resident:
        return model
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    return peft.get_peft_model(model, config)


def text_batch() -> dict[str, torch.Tensor]:
    batch = mistral3_image_batch(tiny_mistral3_config(), batch=2, seq=15, image_rows=0)
    return {key: batch[key] for key in ("input_ids", "attention_mask", "labels")}


def loss_of(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The causal-LM loss from the returned logits, without the fused loss."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def graph_breaks(explain: ExplainWithBackend) -> list[str]:
    """Every graph break, as its reason and where it happened."""
    return [
        f"{reason.reason.splitlines()[0]} at "
        + (f"{reason.user_stack[-1].filename}:{reason.user_stack[-1].lineno}" if reason.user_stack else "?")
        for reason in explain.break_reasons
    ]


def compiled_first_call(model: nn.Module, call: Callable[[nn.Module], Any]) -> tuple[Any, list[str]]:
    """``call(torch.compile(model))`` on a model never called before, and the breaks it had."""
    explain = ExplainWithBackend("aot_eager")
    result = call(torch.compile(model, backend=explain))
    return result, graph_breaks(explain)


# --- a loaded model: dequantized, and FP8-resident + LoRA --------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("resident", [False, True], ids=["dequantized", "resident-lora"])
def test_first_compiled_forward_has_no_break_and_equals_eager(
    checkpoint: Path, plugin_registry: Any, resident: bool
) -> None:
    model = load(checkpoint, plugin_registry("mistral3_fp8"), resident=resident)
    eager = copy.deepcopy(model)
    inputs = {k: v for k, v in text_batch().items() if k != "labels"}

    with torch.no_grad():
        got, breaks = compiled_first_call(model, lambda compiled: compiled(**inputs).logits)
        expected = eager(**inputs).logits

    assert breaks == []
    assert torch.equal(got, expected)
    assert_fresh(model.get_base_model() if resident else model, BOTH)


@pytest.mark.slow
@pytest.mark.parametrize("resident", [False, True], ids=["dequantized", "resident-lora"])
def test_first_compiled_step_has_no_break_and_equals_eager(
    checkpoint: Path, plugin_registry: Any, resident: bool
) -> None:
    """Forward and backward of ``F.cross_entropy`` over the returned logits (AOTAutograd traces both; with
    ``aot_eager`` the traced aten graph runs as is, so eager's loss and gradients come out bit for bit)."""
    model = load(checkpoint, plugin_registry("mistral3_fp8"), resident=resident)
    eager = copy.deepcopy(model)
    batch = text_batch()
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def step(module: nn.Module) -> torch.Tensor:
        loss = loss_of(module(**inputs).logits, batch["labels"])
        loss.backward()
        return loss.detach()

    loss, breaks = compiled_first_call(model, step)
    expected = step(eager)

    assert breaks == []
    assert torch.equal(loss, expected)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    want = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
    assert sorted(grads) == sorted(want)
    text = {n for n, _ in eager.named_parameters() if not n.startswith(("model.vision", "model.multi_modal"))}
    assert len(want) == 2 * 14 if resident else set(want) == text  # a text batch: no image-side gradients
    for name, grad in want.items():
        assert torch.equal(grads[name], grad), name


# --- the rotary buffers at a compiled first call, however the model was materialized -----------------------


def _fill(module: nn.Module, value: float) -> nn.Module:
    """``to_empty(device="cpu")`` made deterministic: the same ``_apply`` path, ``value`` instead of whatever
    the memory held."""
    return module._apply(lambda t: torch.full_like(t, value, device="cpu"))


def _from_pretrained(checkpoint: Path, registry: Any) -> nn.Module:
    return automodel_plugins.from_pretrained(checkpoint, dtype=F32, registry=registry)


def _built_then_loaded_by_the_user(checkpoint: Path, registry: Any) -> nn.Module:
    """FSDP2's order with the user's own loader: ``build_model`` on meta, ``to_empty``, ``load_state_dict``
    (not ``load_weights``, so no ``post_materialize`` once the buffers are real)."""
    model = _fill(automodel_plugins.build_model(checkpoint, dtype=F32, registry=registry), 0.5)
    model.load_state_dict(_from_pretrained(checkpoint, registry).state_dict())
    return model


def _rematerialized_after_load(checkpoint: Path, registry: Any) -> nn.Module:
    """A second materialization after loading (``to_empty`` on the rotary modules)."""
    model = _from_pretrained(checkpoint, registry)
    for path in (TEXT_ROTARY, VISION_ROTARY):
        _fill(model.get_submodule(path), 0.5)
    return model


def _assigned_past_apply(checkpoint: Path, registry: Any) -> nn.Module:
    """Made real without ``_apply``, as accelerate's ``set_module_tensor_to_device`` does: the weights by
    ``load_state_dict(assign=True)``, the non-persistent buffers assigned into ``_buffers``. Only the
    first-forward hook sees that: under compile it still repairs, at the price of graph breaks."""
    model = automodel_plugins.build_model(checkpoint, dtype=F32, registry=registry)
    model.load_state_dict(_from_pretrained(checkpoint, registry).state_dict(), assign=True)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.full(buffer.shape, 0.5, dtype=buffer.dtype)
    return model


def assert_fresh(model: nn.Module, paths: tuple[str, ...]) -> None:
    """The rotary buffers and ``attention_scaling`` at ``paths`` equal those of a stock model built plainly
    from the same config (fp32, bit for bit)."""
    fresh = Mistral3ForConditionalGeneration(model.config)
    for path in paths:
        got, want = model.get_submodule(path), fresh.get_submodule(path)
        for name in ("inv_freq", "original_inv_freq"):
            assert got.get_buffer(name).dtype == F32, f"{path}.{name}"
            assert torch.equal(got.get_buffer(name), want.get_buffer(name)), f"{path}.{name}"
        assert got.attention_scaling == want.attention_scaling, path


BOTH = (TEXT_ROTARY, VISION_ROTARY)
MATERIALIZED = {  # how -> (make, rotary modules right after the first call, graph breaks in model/rotary.py?)
    "build-to_empty-load_state_dict": (_built_then_loaded_by_the_user, BOTH, False),
    "to_empty-after-load": (_rematerialized_after_load, BOTH, False),
    # a text batch: only the text rotary runs, so only its hook has fired
    "assigned-past-_apply": (_assigned_past_apply, (TEXT_ROTARY,), True),
}


@pytest.mark.slow
@pytest.mark.parametrize("how", sorted(MATERIALIZED))
def test_rotary_buffers_are_right_at_a_compiled_first_call(
    checkpoint: Path, plugin_registry: Any, how: str
) -> None:
    """Rotary buffers against a stock model built from the same config, logits against the loaded model's."""
    make, repaired, breaks_expected = MATERIALIZED[how]
    registry = plugin_registry("mistral3_fp8")
    model = make(checkpoint, registry).eval()
    reference = _from_pretrained(checkpoint, registry).eval()
    inputs = {k: v for k, v in text_batch().items() if k != "labels"}
    explain = ExplainWithBackend("eager")

    with torch.no_grad():
        got = torch.compile(model, backend=explain)(**inputs).logits
        expected = reference(**inputs).logits

    assert_fresh(model, repaired)
    assert torch.equal(got, expected)
    in_rotary = [r for r in graph_breaks(explain) if "model/rotary.py" in r]
    assert bool(in_rotary) is breaks_expected, in_rotary


# --- the _apply arming, eagerly (a tiny Mistral text model: no checkpoint, no compile) ----------------------


def _mistral() -> tuple[nn.Module, nn.Module]:
    """An armed model built on meta and materialized, and the plainly built reference."""
    config = MistralConfig(**TINY_TEXT_SIZES, tie_word_embeddings=False)
    torch.manual_seed(0)
    reference = MistralForCausalLM(config)
    with torch.device("meta"):
        model = MistralForCausalLM(config)
    assert repair_rotary(model) == 1
    _fill(model, 0.5)
    model.load_state_dict(reference.state_dict())
    return model, reference


def test_to_empty_after_the_first_forward_is_repaired() -> None:
    """Was a documented gap: the one-shot hook was gone by then."""
    model, reference = _mistral()
    ids = torch.arange(9).unsqueeze(0)
    model(input_ids=ids)
    _fill(model.model.rotary_emb, math.nan)
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_the_arming_follows_a_deepcopy_and_a_pickle() -> None:
    model, reference = _mistral()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        _fill(clone.model.rotary_emb, math.nan)
        assert torch.equal(clone.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
        assert model.model.rotary_emb._apply.module is model.model.rotary_emb
        assert clone.model.rotary_emb._apply.module is clone.model.rotary_emb


def test_a_cast_and_to_empty_under_inference_mode_keep_fp32_frequencies() -> None:
    """``to_empty`` under ``inference_mode`` makes inference tensors, which cannot be written in place outside
    it: they are replaced."""
    model, reference = _mistral()
    rotary = model.model.rotary_emb
    with torch.inference_mode():
        model.to(torch.bfloat16)
        assert rotary.inv_freq.dtype == F32
        rotary.to_empty(device="cpu")
    assert rotary.inv_freq.dtype == F32 and not rotary.inv_freq.is_inference()
    assert torch.equal(rotary.inv_freq, reference.model.rotary_emb.inv_freq)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
