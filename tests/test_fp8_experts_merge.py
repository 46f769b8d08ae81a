"""Merging a LoRA delta into ``Fp8Experts`` codes (``model.fp8_experts_merge``) on one rank's shard, in one
process: torch's fake process group lets this process play rank 1 of 2 (collectives are no-ops). With the codes
``Shard(0)`` (rank 1 holds experts 2-3 of 4), exactly those experts are re-quantized, each from its own global
index's delta and scale; codes sharded by rows refuse with ``NotImplementedError`` naming the tensor. Without
sharding, ``restore_merged`` gives the codes and scales back bit for bit."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from automodel_plugins.model.fp8_experts import Fp8Experts
from automodel_plugins.model.fp8_experts_merge import merge_expert_delta, restore_merged
from automodel_plugins.testing.tiny_models import tiny_qwen3_vl_moe_config

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover - torch built without distributed
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from torch.distributed.tensor import DTensor, Shard  # noqa: E402

BLOCK = (8, 8)
EXPERTS, HIDDEN, INTERMEDIATE = 4, 16, 8


@contextlib.contextmanager
def fake_rank(rank: int, world: int) -> Iterator[None]:
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def experts() -> Fp8Experts:
    """4 experts of random codes (finite e4m3 values) and random block scales, fp32 compute."""
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextExperts

    config = tiny_qwen3_vl_moe_config().text_config
    config.num_experts, config.hidden_size, config.moe_intermediate_size = EXPERTS, HIDDEN, INTERMEDIATE
    module = Fp8Experts.replacing(
        Qwen3VLMoeTextExperts(config), block_size=BLOCK, fp8_dtype=torch.float8_e4m3fn, device="cpu"
    )
    g = torch.Generator().manual_seed(0)
    for name, shape in module.shapes.items():
        values = (torch.randn(shape, generator=g) * 100).to(torch.float8_e4m3fn)
        grid = torch.rand(module.scale(name).shape, generator=g) + 0.01
        module.load_fp8(name, values, grid)
    return module.to(torch.float32)


def delta_of(expert: int) -> torch.Tensor:
    """A delta that moves every value of ``expert`` (a different one per expert)."""
    rows, cols = 2 * INTERMEDIATE, HIDDEN
    return torch.full((rows, cols), 0.5 + expert)


def test_each_rank_re_quantizes_the_experts_of_its_shard() -> None:
    from torch.distributed.device_mesh import init_device_mesh

    whole = experts()
    reference = experts()
    merge_expert_delta(reference, "gate_up_proj", delta_of)  # one process: every expert
    with fake_rank(1, 2):
        mesh = init_device_mesh("cpu", (2,))
        local = whole.gate_up_proj.data[2:].clone()
        whole.gate_up_proj = torch.nn.Parameter(
            DTensor.from_local(local, mesh, [Shard(0)], run_check=False), requires_grad=False
        )
        before = whole.scale("gate_up_proj").clone()
        record = merge_expert_delta(whole, "gate_up_proj", delta_of)
        held = whole.gate_up_proj.to_local()
    assert record.local_experts == (0, 1) and record.moved == (2, 3)  # local indices, global experts
    assert torch.equal(held, reference.gate_up_proj.data[2:])
    scale = whole.scale("gate_up_proj")
    assert torch.equal(scale[2:], reference.scale("gate_up_proj")[2:])
    assert torch.equal(scale[:2], before[:2])  # the other rank's cells arrive through the all-reduce


def test_codes_sharded_by_rows_refuse_naming_the_tensor() -> None:
    from torch.distributed.device_mesh import init_device_mesh

    module = experts()
    with fake_rank(1, 2):
        mesh = init_device_mesh("cpu", (2,))
        local = module.gate_up_proj.data[:, INTERMEDIATE:].clone()
        module.gate_up_proj = torch.nn.Parameter(
            DTensor.from_local(local, mesh, [Shard(1)], run_check=False), requires_grad=False
        )
        with pytest.raises(NotImplementedError, match=r"gate_up_proj: .* whole experts"):
            merge_expert_delta(module, "gate_up_proj", delta_of, key="gate_up_proj")


def test_restore_gives_back_the_codes_and_scales() -> None:
    module = experts()
    codes, scale = module.gate_up_proj.data.clone(), module.scale("gate_up_proj").clone()
    record = merge_expert_delta(module, "gate_up_proj", lambda e: delta_of(e) * (e != 1))
    assert record.moved == (0, 2, 3)  # a zero delta leaves expert 1 as it was
    assert torch.equal(module.gate_up_proj.data[1], codes[1]) and torch.equal(
        module.scale("gate_up_proj")[1], scale[1]
    )
    assert not torch.equal(module.gate_up_proj.data[0], codes[0])
    restore_merged(module, record)
    assert torch.equal(module.gate_up_proj.data, codes) and torch.equal(module.scale("gate_up_proj"), scale)
