"""The placements that split PEFT's expert LoRA factors by expert (``expert_parallel.lora_factor_placements``), in
one process playing rank 1 of 2 (torch's fake process group; ``distribute_tensor(..., src_data_rank=None)`` slices
locally, no communication): the local part of each factor is exactly the rank's experts' rows as PEFT reads the
factors (``lora_A [r * E, in]`` as ``[E, r, in]``, ``lora_B [out, r * E]`` as ``[out, r, E]``: its
``get_delta_weight`` einsum), a plain ``Shard(1)`` of ``lora_B`` would not be, and the memory plan's element count
(``placement.shard_numel``) is the local size. The whole flow on 2 and 4 gloo ranks:
``tests/distributed/test_ep_lora_shard.py``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from automodel_plugins.model.expert_parallel import lora_factor_placements
from automodel_plugins.model.placement import shard_numel

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover - torch built without distributed
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from torch.distributed.tensor import Replicate, Shard, distribute_tensor  # noqa: E402

RANK, WORLD = 1, 2


@contextlib.contextmanager
def fake_rank(rank: int, world: int) -> Iterator[None]:
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def peft_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, experts: int) -> torch.Tensor:
    """PEFT's ``ParamWrapper.get_delta_weight`` for an ``[E, out, in]`` tensor (scaling 1)."""
    weight_a = lora_a.reshape(experts, -1, lora_a.shape[-1])
    weight_b = lora_b.reshape(lora_b.shape[0], -1, experts)
    return torch.einsum("o r e, e r i -> e o i", weight_b, weight_a)


@pytest.mark.parametrize(("r", "experts", "out", "inp"), [(3, 4, 5, 6), (4, 8, 7, 3), (1, 2, 4, 4)])
def test_each_rank_holds_exactly_its_experts_factors(r: int, experts: int, out: int, inp: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    g = torch.Generator().manual_seed(r * experts)
    lora_a, lora_b = torch.randn(r * experts, inp, generator=g), torch.randn(out, r * experts, generator=g)
    mine = slice(RANK * experts // WORLD, (RANK + 1) * experts // WORLD)
    place_a, place_b = lora_factor_placements(r)
    with fake_rank(RANK, WORLD):
        mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("ep",))
        local_a = distribute_tensor(lora_a, mesh, [place_a], src_data_rank=None).to_local()
        local_b = distribute_tensor(lora_b, mesh, [place_b], src_data_rank=None).to_local()
        plain_b = distribute_tensor(lora_b, mesh, [Shard(1)], src_data_rank=None).to_local()
    # the rank's experts' deltas, from its local factors read as PEFT reads whole ones
    want = peft_delta(lora_a, lora_b, experts)[mine]
    assert torch.equal(peft_delta(local_a, local_b, experts // WORLD), want)
    if r > 1:  # a plain column split gives every expert's columns of some ranks k instead
        assert not torch.equal(peft_delta(local_a, plain_b, experts // WORLD), want)
    for shape, placement, local in (
        (lora_a.shape, place_a, local_a),
        (lora_b.shape, place_b, local_b),
    ):
        placements = [Replicate(), placement, Replicate()]
        assert shard_numel(tuple(shape), (1, WORLD, 1), (0, RANK, 0), placements) == local.numel()
