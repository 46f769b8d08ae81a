"""The split ``Fp8Linear`` in one process: a shard of the codes dequantized with the whole block grid (a shard
starting inside a scale block, rows processed in chunks) against slices of the whole dequantized weight, and
torch's ``ColwiseParallel`` / ``RowwiseParallel`` on a fake 2-rank process group (rank 1's output against the
stock ``F.linear`` on rank 1's rows / columns). The real 2-rank runs: ``tests/distributed/test_fp8_tensor_parallel.py``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch.nn import functional as F

from automodel_plugins.errors import TensorParallelError
from automodel_plugins.fp8.decode import dequantize
from automodel_plugins.fp8.encode import quantize
from automodel_plugins.model.fp8_linear import Fp8Linear
from automodel_plugins.model.fp8_resident import DequantLayout, fp8_matmul
from automodel_plugins.model.placement import write_local

BLOCK = (16, 16)
OUT, IN = 72, 67  # rank 1 of 2: rows 36:72 (block 2 is rows 32:48) or columns 34:67 (block 2 is 32:48)


def weight() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    codes, scale = quantize(torch.randn(OUT, IN), block_size=BLOCK, scale_dtype=torch.float32)
    return codes, scale, dequantize(codes, scale, dtype=torch.float32, block_size=BLOCK)


@pytest.mark.parametrize("rows_per_chunk", [OUT, 5])
@pytest.mark.parametrize("region", [(slice(36, 72), slice(0, IN)), (slice(0, OUT), slice(34, IN))])
def test_a_shard_starting_inside_a_block_equals_the_same_slice_of_the_whole_weight(
    rows_per_chunk, region
) -> None:
    codes, scale, whole = weight()
    layout = DequantLayout(
        codes.dtype, BLOCK, torch.float32, rows_per_chunk, (region[0].start, region[1].start)
    )
    x = torch.randn(3, region[1].stop - region[1].start, requires_grad=True)
    out = fp8_matmul(x, codes[region].view(torch.uint8), scale, None, layout)
    reference_x = x.detach().clone().requires_grad_(True)
    reference = F.linear(reference_x, whole[region])
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)
    out.sum().backward()
    reference.sum().backward()
    torch.testing.assert_close(x.grad, reference_x.grad, rtol=0, atol=1e-5)


@contextlib.contextmanager
def fake_rank(rank: int, world: int) -> Iterator[object]:
    """This process as ``rank`` of a fake ``world``-rank group (collectives are no-ops), with a 1-D mesh."""
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=rank, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def layer(codes: torch.Tensor, scale: torch.Tensor) -> Fp8Linear:
    return Fp8Linear.from_fp8(codes, scale, block_size=BLOCK, compute_dtype=torch.float32)


def test_colwise_and_rowwise_parallel_split_the_codes_and_compute_rank_1s_part() -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    codes, scale, whole = weight()
    x = torch.randn(2, 3, IN)
    with fake_rank(1, 2) as mesh:
        # The fake group's scatter is a no-op: each shard is written as the loader writes it (write_local).
        colwise = parallelize_module(layer(codes, scale), mesh, ColwiseParallel())
        write_local(colwise.weight, codes[36:].view(torch.uint8))
        assert colwise.weight.to_local().shape == (36, IN) and colwise.weight.dtype == torch.uint8
        assert not colwise.weight.requires_grad
        torch.testing.assert_close(colwise(x), F.linear(x, whole[36:]), rtol=0, atol=1e-5)
        rowwise = parallelize_module(layer(codes, scale), mesh, RowwiseParallel())
        write_local(rowwise.weight, codes[:, 34:].view(torch.uint8))
        assert rowwise.weight.to_local().shape == (OUT, 33)
        # The fake group's all-reduce is a no-op: rank 1's partial sum is what comes back.
        torch.testing.assert_close(
            rowwise(x[..., 34:]), F.linear(x[..., 34:], whole[:, 34:]), rtol=0, atol=1e-5
        )


def test_a_split_layer_without_the_styles_input_layout_or_on_another_placement_is_refused() -> None:
    from torch.distributed.tensor import DTensor, Partial, Shard

    codes, scale, _ = weight()
    with fake_rank(0, 2) as mesh:
        split = layer(codes, scale)
        split.weight = torch.nn.Parameter(
            DTensor.from_local(codes[:36].view(torch.uint8), mesh, [Shard(0)], run_check=False),
            requires_grad=False,
        )
        with pytest.raises(TensorParallelError, match="needs its input as a DTensor placed"):
            split(torch.randn(3, IN))  # no ColwiseParallel hooks: a plain input
        partial = layer(codes, scale)
        partial.weight = torch.nn.Parameter(
            DTensor.from_local(codes.view(torch.uint8), mesh, [Partial()], run_check=False),
            requires_grad=False,
        )
        with pytest.raises(TensorParallelError, match=r"72 x 67.*placed \(Partial"):
            partial(torch.randn(3, IN))
