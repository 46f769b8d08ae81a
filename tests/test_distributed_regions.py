"""Which region of a global tensor a rank holds, checked in one process.

``shard_region`` is pure and is checked against ``torch.chunk`` and for exact tiling; ``local_region`` on real
DTensors uses torch's fake process group, which lets one process play any rank of a 4-rank 2-D mesh, and is
checked against torch's own ``compute_local_shape_and_global_offset``. The last test loads a tiny block-FP8
checkpoint into such DTensors, rank by rank, through the real loader.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from automodel_plugins.errors import CheckpointError
from automodel_plugins.model.placement import local_region, shard_region, write_local

dist = pytest.importorskip("torch.distributed")
if not dist.is_available():  # pragma: no cover - torch built without distributed
    pytest.skip("torch.distributed is not available", allow_module_level=True)

from torch.distributed.tensor import DTensor, Partial, Replicate, Shard  # noqa: E402
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset  # noqa: E402
from torch.distributed.tensor.placement_types import _StridedShard  # noqa: E402


@contextlib.contextmanager
def fake_rank(rank: int, world: int) -> Iterator[None]:
    """This process as ``rank`` of a ``world``-rank fake process group (collectives are no-ops).

    DTensor caches sharding propagation by mesh *shape*, so a process playing rank after rank would get
    output specs carrying an earlier rank's mesh: the cache is cleared for each rank.
    """
    fake_pg = pytest.importorskip("torch.testing._internal.distributed.fake_pg")
    DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
    clear_native_cache = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if clear_native_cache is not None:
        clear_native_cache()
    dist.init_process_group("fake", store=fake_pg.FakeStore(), rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def dtensor(
    shape: tuple[int, ...], mesh, placements, *, device: str = "meta", dtype: torch.dtype = torch.float32
) -> DTensor:
    """A DTensor of global ``shape`` whose local shard is as torch lays it out on this rank."""
    local_shape, _ = compute_local_shape_and_global_offset(shape, mesh, placements)
    stride = tuple(math.prod(shape[d + 1 :]) for d in range(len(shape)))
    local = torch.zeros(local_shape, device=device, dtype=dtype)
    return DTensor.from_local(
        local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride
    )


def torch_region(tensor: DTensor) -> tuple[slice, ...]:
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))


def as_full(region: tuple[slice, ...] | None, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, n) for n in shape) if region is None else region


# --- the pure region ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 5, 7, 36, 72, 251])
@pytest.mark.parametrize("parts", [1, 2, 3, 4])
@pytest.mark.parametrize("dim", [0, 1])
def test_one_mesh_dim_matches_torch_chunk(size: int, parts: int, dim: int) -> None:
    shape = (size, 3) if dim == 0 else (3, size)
    chunks = torch.arange(size).chunk(parts)
    for index in range(parts):
        region = shard_region(shape, (parts,), (index,), [Shard(dim)])
        expected = chunks[index].tolist() if index < len(chunks) else []
        assert list(range(size))[region[dim]] == expected
        assert region[1 - dim] == slice(0, 3)


TWO_D_LAYOUTS = [
    [Shard(0), Shard(1)],
    [Shard(1), Shard(0)],
    [Shard(0), Shard(0)],
    [Replicate(), Shard(0)],
    [Shard(1), Replicate()],
    [Replicate(), Replicate()],
]
STRIDED_LAYOUTS = [  # FSDP2 (mesh dim 0) over tensor parallelism (mesh dim 1) on the same tensor dim
    [_StridedShard(0, split_factor=2), Shard(0)],
    [_StridedShard(1, split_factor=2), Shard(1)],
]


@pytest.mark.parametrize("placements", TWO_D_LAYOUTS, ids=repr)
@pytest.mark.parametrize("mesh_shape", [(2, 2), (2, 3), (3, 2)])
@pytest.mark.parametrize("shape", [(7, 5), (72, 67), (1, 4), (13, 2)])
def test_regions_tile_the_tensor(placements, mesh_shape: tuple[int, int], shape: tuple[int, int]) -> None:
    """Every element is held by exactly as many ranks as the layout replicates it over."""
    replicas = math.prod(n for n, p in zip(mesh_shape, placements, strict=True) if isinstance(p, Replicate))
    held = torch.zeros(shape, dtype=torch.int64)
    for coordinate in itertools.product(*map(range, mesh_shape)):
        held[shard_region(shape, mesh_shape, coordinate, placements)] += 1
    assert torch.all(held == replicas)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("mesh_shape", [(2, 2), (3, 2), (2, 3)])
@pytest.mark.parametrize("size", [12, 72])
def test_fsdp_over_tp_region_is_the_fsdp_chunk_of_the_tp_chunk(
    dim: int, mesh_shape: tuple[int, int], size: int
) -> None:
    dp, tp = mesh_shape
    shape = (size, 5) if dim == 0 else (5, size)
    placements = [_StridedShard(dim, split_factor=tp), Shard(dim)]
    for d, t in itertools.product(range(dp), range(tp)):
        expected = torch.arange(size).chunk(tp)[t].chunk(dp)[d].tolist()
        region = shard_region(shape, mesh_shape, (d, t), placements)
        assert list(range(size))[region[dim]] == expected


def test_strided_layout_that_is_not_one_region_is_refused() -> None:
    # 13 rows, TP 2 then FSDP 3: by DTensor's _StridedShard rule, coordinate (2, 0) holds rows 6 and 11.
    placements = [_StridedShard(0, split_factor=2), Shard(0)]
    with pytest.raises(CheckpointError, match="not one region"):
        shard_region((13, 2), (3, 2), (2, 0), placements)


def test_strided_shard_without_its_tp_shard_is_refused() -> None:
    # Alone, rank 0 of a _StridedShard(0, split_factor=2) holds rows 0-1 and 4-5 of 8: two regions.
    with pytest.raises(CheckpointError, match="not one region"):
        shard_region((8, 4), (2,), (0,), [_StridedShard(0, split_factor=2)])


def test_partial_is_refused() -> None:
    with pytest.raises(CheckpointError, match="Partial"):
        shard_region((8, 4), (2,), (0,), [Partial()])


def test_mismatched_lengths_are_a_value_error() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        shard_region((8, 4), (2, 2), (0,), [Shard(0)])


# --- local_region on DTensors (fake process group) ---------------------------------------------------------


def test_plain_tensor_has_no_region() -> None:
    assert local_region(torch.zeros(3, 4)) is None


@pytest.mark.parametrize("placements", TWO_D_LAYOUTS + STRIDED_LAYOUTS, ids=repr)
@pytest.mark.parametrize("shape", [(7, 5), (72, 67), (1, 4)])
def test_local_region_matches_torch(placements, shape: tuple[int, int]) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    for rank in range(4):
        with fake_rank(rank, 4):
            tensor = dtensor(shape, init_device_mesh("cpu", (2, 2)), placements)
            region = as_full(local_region(tensor), shape)
            assert region == torch_region(tensor)
            assert tuple(s.stop - s.start for s in region) == tuple(tensor.to_local().shape)


def test_whole_tensor_is_no_region() -> None:
    from torch.distributed.device_mesh import init_device_mesh

    with fake_rank(1, 2):
        mesh = init_device_mesh("cpu", (2,))
        assert local_region(dtensor((6, 4), mesh, [Replicate()])) is None
        assert local_region(dtensor((6, 4), mesh, [Shard(0)])) == (slice(3, 6), slice(0, 4))


def test_rank_outside_the_mesh_holds_an_empty_region() -> None:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import distribute_tensor

    with fake_rank(3, 4):
        tensor = distribute_tensor(torch.empty(6, 2, device="meta"), DeviceMesh("cpu", [0, 1]), [Shard(0)])
        region = local_region(tensor)
        assert region is not None and all(s.stop == s.start for s in region)
        write_local(tensor, torch.empty(0, 0))  # nothing to write, and no error


def test_write_local_fills_the_shard_and_checks_its_shape() -> None:
    from torch.distributed.device_mesh import init_device_mesh

    with fake_rank(1, 2):
        tensor = dtensor((5, 3), init_device_mesh("cpu", (2,)), [Shard(0)], device="cpu")
        value = torch.arange(6, dtype=torch.float32).reshape(2, 3)
        write_local(tensor, value)
        assert torch.equal(tensor.to_local(), value)
        with pytest.raises(CheckpointError, match="does not match"):
            write_local(tensor, torch.zeros(3, 3))


# --- the loader into 2-D-mesh DTensors, one rank at a time -------------------------------------------------

LOAD_LAYOUTS = [
    [Shard(0), Shard(1)],
    [Shard(1), Shard(0)],
    [Replicate(), Shard(0)],
    [_StridedShard(0, split_factor=2), Shard(0)],
    [Shard(0), Shard(0)],
]


@pytest.fixture(scope="module")
def block_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from distributed import _tiny

    directory = tmp_path_factory.mktemp("block-fp8")
    return _tiny.write_checkpoint(directory, block_size=_tiny.BLOCK, tie_word_embeddings=False)


def _distribute(model: torch.nn.Module, mesh) -> dict[str, list]:
    """Every parameter as a meta DTensor on ``mesh``; 2-D ones cycle through ``LOAD_LAYOUTS``."""
    placements: dict[str, list] = {}
    for index, (name, param) in enumerate(list(model.named_parameters())):
        layout = LOAD_LAYOUTS[index % len(LOAD_LAYOUTS)] if param.dim() == 2 else [Shard(0), Replicate()]
        module_name, _, leaf = name.rpartition(".")
        value = dtensor(tuple(param.shape), mesh, layout, dtype=param.dtype)
        model.get_submodule(module_name)._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
        placements[name] = layout
    return placements


def _expected_reads(model: torch.nn.Module, checkpoint_dir: Path) -> list:
    """Per parameter: its key over torch's region for this rank, plus the whole scale of an FP8 weight."""
    from distributed import _checks, _tiny

    from automodel_plugins.checkpoint import Checkpoint

    reads = []
    with Checkpoint.open(checkpoint_dir) as checkpoint:
        for name, param in model.named_parameters():
            key = _tiny.legacy_rename(name)
            region = [[s.start, s.stop] for s in torch_region(param)]
            reads.append((key, None if region == [[0, n] for n in param.shape] else region))
            if checkpoint.info(key).dtype == torch.float8_e4m3fn:
                reads.append((key.removesuffix("weight") + "weight_scale_inv", None))
    return _checks.sorted_reads(reads)


def test_block_fp8_load_into_2d_mesh_shards(block_checkpoint: Path, isolated_registry) -> None:
    """Each of 4 ranks of a (2, 2) mesh gets exactly its region of every tensor, and reads only that."""
    import automodel_plugins_mistral3_fp8.plugin as plugin
    from distributed import _checks
    from torch.distributed.device_mesh import init_device_mesh

    import automodel_plugins

    isolated_registry.register(plugin, name="mistral3_fp8")
    reference = automodel_plugins.from_pretrained(block_checkpoint).state_dict()
    for rank in range(4):
        with fake_rank(rank, 4):
            model = automodel_plugins.build_model(block_checkpoint)
            _distribute(model, init_device_mesh("cpu", (2, 2)))
            model.to_empty(device="cpu")
            with _checks.record_reads() as reads:
                report = automodel_plugins.load_weights(model, block_checkpoint)
            for name, param in model.named_parameters():
                assert torch.equal(param.to_local(), reference[name][torch_region(param)]), (rank, name)
            assert _checks.sorted_reads(reads) == _expected_reads(model, block_checkpoint)
            assert report.dequantized == 28
