"""The streaming safetensors writer and the shard planner, against safetensors' ``save_file`` and transformers'
``save_pretrained`` themselves: same bytes, same files, same index."""

from __future__ import annotations

import errno
import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from automodel_plugins.checkpoint.regions import box_runs
from automodel_plugins.checkpoint.shards import default_max_shard_size, parse_shard_size, plan_shards
from automodel_plugins.checkpoint.writer import FileLayout, SafetensorsWriter, TensorSpec, tensor_bytes
from automodel_plugins.testing.tiny_models import tiny_llama_config


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.mlp.down_proj.weight": torch.randn(6, 8, generator=g).to(torch.float8_e4m3fn),
        "model.layers.0.mlp.down_proj.weight_scale_inv": torch.tensor(0.125),
        "model.layers.1.mlp.down_proj.weight": torch.randn(4, 8, generator=g).to(torch.float8_e5m2),
        "model.embed_tokens.weight": torch.randn(5, 3, generator=g).to(torch.bfloat16),
        "lm_head.weight": torch.randn(5, 3, generator=g).to(torch.float16),
        "model.norm.weight": torch.randn(3, generator=g),
        "positions": torch.arange(7, dtype=torch.int64),
        "Zupper": torch.ones(1),
        "model.layers.10.x": torch.zeros(2, dtype=torch.float16),
        "model.layers.2.x": torch.zeros(2, dtype=torch.float16),
        "flag": torch.tensor([True, False]),
        "counts": torch.arange(3, dtype=torch.int32),
        "bytes": torch.arange(5, dtype=torch.uint8),
        "signed": torch.arange(-2, 3, dtype=torch.int8),
        "small": torch.arange(3, dtype=torch.int16),
        "grid": torch.ones(2, 3).to(torch.float8_e8m0fnu),
        "empty": torch.empty(0, 4, dtype=torch.bfloat16),
        "wide": torch.randn(2, 3, generator=g, dtype=torch.float64),
        "ünïcode": torch.ones(2),
    }


def specs_of(tensors: dict[str, torch.Tensor]) -> list[TensorSpec]:
    return [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]


def write_whole(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    layout = FileLayout.plan(specs_of(tensors), metadata)
    with SafetensorsWriter.create(path, layout) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor_bytes(tensor))


@pytest.mark.parametrize("metadata", [None, {}, {"format": "pt"}], ids=["none", "empty", "format-pt"])
def test_files_are_byte_identical_to_save_file(tmp_path: Path, metadata: dict[str, str] | None) -> None:
    base = sample_tensors()
    keys = list(base)
    for trial in range(15):
        rng = random.Random(trial)
        chosen = rng.sample(keys, rng.randint(1, len(keys)))
        tensors = {key: base[key] for key in chosen}
        save_file(tensors, tmp_path / "reference.safetensors", metadata=metadata)
        write_whole(tmp_path / f"ours{trial}.safetensors", tensors, metadata)
        reference = (tmp_path / "reference.safetensors").read_bytes()
        assert (tmp_path / f"ours{trial}.safetensors").read_bytes() == reference, chosen


def test_layout_size_is_the_file_size(tmp_path: Path) -> None:
    tensors = sample_tensors()
    layout = FileLayout.plan(specs_of(tensors), {"format": "pt"})
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    assert layout.size == (tmp_path / "reference.safetensors").stat().st_size


def random_box(rng: random.Random, shape: tuple[int, ...]) -> tuple[slice, ...]:
    dims = rng.randint(0, len(shape))
    bounds = []
    for size in shape[:dims]:
        start = rng.randint(0, size)
        bounds.append(slice(start, rng.randint(start, size)))
    return tuple(bounds)


def test_boxes_written_by_two_writers_in_any_order_make_the_same_file(tmp_path: Path) -> None:
    """Each tensor cut into row blocks and column pieces, written by a creator and an attached writer."""
    g = torch.Generator().manual_seed(1)
    tensors = {
        "a": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b": torch.randn(4, 3, 6, generator=g),
        "c": torch.randn(9, generator=g).to(torch.float8_e4m3fn),
        "d": torch.tensor(0.5),
    }
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    layout = FileLayout.plan(specs_of(tensors), {"format": "pt"})
    path = tmp_path / "ours.safetensors"
    creator = SafetensorsWriter.create(path, layout)
    other = SafetensorsWriter.attach(path, layout)
    pieces = []
    for name, tensor in tensors.items():
        if tensor.dim() == 0:
            pieces.append((name, None))
            continue
        rows = tensor.shape[0]
        cut = rows // 2
        if tensor.dim() >= 2:
            cols = tensor.shape[1]
            pieces += [(name, (slice(0, cut), slice(0, 2))), (name, (slice(0, cut), slice(2, cols)))]
        else:
            pieces.append((name, (slice(0, cut),)))
        pieces.append((name, (slice(cut, rows),)))
    random.Random(0).shuffle(pieces)
    for index, (name, region) in enumerate(pieces):
        value = tensors[name] if region is None else tensors[name][region]
        (creator if index % 2 else other).write(name, tensor_bytes(value), region)
    creator.close()
    other.close()
    assert path.read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    assert creator.bytes_written + other.bytes_written == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )


def test_box_runs_cover_exactly_the_box() -> None:
    """Every element of a random box, by offset, in the box's own order: against a flat index tensor."""
    rng = random.Random(2)
    for _ in range(200):
        shape = tuple(rng.randint(1, 5) for _ in range(rng.randint(1, 4)))
        bounds = random_box(rng, shape)
        index = torch.arange(torch.Size(shape).numel()).reshape(shape)
        expected = index[bounds].reshape(-1).tolist()
        run, offsets = box_runs(shape, bounds)
        got = [offset + i for offset in offsets for i in range(run)]
        if not expected:
            continue
        assert got == expected, (shape, bounds)


def test_a_box_of_the_wrong_size_is_refused(tmp_path: Path) -> None:
    layout = FileLayout.plan([TensorSpec("w", torch.float32, (4, 4))])
    with (
        SafetensorsWriter.create(tmp_path / "f.safetensors", layout) as writer,
        pytest.raises(ValueError, match="bytes given"),
    ):
        writer.write("w", b"\0" * 12, (slice(0, 1),))


def test_create_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "f.safetensors"
    path.write_bytes(b"keep")
    with pytest.raises(FileExistsError):
        SafetensorsWriter.create(path, FileLayout.plan([TensorSpec("w", torch.float32, (1,))]))
    assert path.read_bytes() == b"keep"


def test_a_full_disk_propagates_as_oserror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import automodel_plugins.checkpoint.writer as writer_module

    layout = FileLayout.plan([TensorSpec("w", torch.float32, (8,))])
    writer = SafetensorsWriter.create(tmp_path / "f.safetensors", layout)

    def full(fd: int, data: memoryview, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer_module.os, "pwrite", full)
    with pytest.raises(OSError) as caught:
        writer.write("w", tensor_bytes(torch.ones(8)))
    assert caught.value.errno == errno.ENOSPC
    writer.close(sync=False)


# --- shards and the index --------------------------------------------------------------------------------


@pytest.mark.parametrize("max_shard_size", ["50GB", 40_000, 12_000, "9KB", 1_000])
def test_shards_and_index_are_what_save_pretrained_writes(tmp_path: Path, max_shard_size: int | str) -> None:
    """A tiny Llama saved by transformers, and the same tensors planned and written here: same files, bytes
    and index (``1_000``: every tensor bigger than a shard gets a file of its own)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=96)).to(torch.bfloat16)
    stock = tmp_path / "stock"
    model.save_pretrained(stock, max_shard_size=max_shard_size)
    state = model.state_dict()
    plan = plan_shards(specs_of(state), max_shard_size)
    stock_files = sorted(p.name for p in stock.glob("*.safetensors"))
    assert sorted(plan.files) == stock_files
    for name, specs in plan.files.items():
        write_whole(tmp_path / name, {spec.name: state[spec.name] for spec in specs}, {"format": "pt"})
        assert (tmp_path / name).read_bytes() == (stock / name).read_bytes(), name
    index = plan.index_text(model.num_parameters())
    stock_index = stock / plan.index_name
    if len(stock_files) == 1:
        assert index is None and not stock_index.exists()
    else:
        assert index == stock_index.read_text()


def test_shard_sizes_parse_like_huggingface_hub() -> None:
    assert parse_shard_size("5GB") == 5 * 10**9
    assert parse_shard_size(" 1.5 mb") == 1_500_000
    assert parse_shard_size(123) == 123
    assert default_max_shard_size() == "50GB"
    for bad in ("5GiB", "lots", "", 0, -1, True, 1.5):
        with pytest.raises(ValueError, match="max_shard_size"):
            parse_shard_size(bad)  # type: ignore[arg-type]


def test_index_json_parses_back(tmp_path: Path) -> None:
    specs = [TensorSpec(f"t{i}", torch.float32, (100,)) for i in range(4)]
    plan = plan_shards(specs, 800)
    data = json.loads(plan.index_text(400))
    assert data["metadata"] == {"total_parameters": 400, "total_size": 1600}
    assert set(data["weight_map"].values()) == set(plan.files) and len(plan.files) == 2


# --- who writes what: the tiling check --------------------------------------------------------------------


def test_the_tiling_check_accepts_exact_tilings_and_refuses_gaps_and_overlaps() -> None:
    from automodel_plugins.errors import SaveError
    from automodel_plugins.pipeline.save.plan import PlannedWrite
    from automodel_plugins.pipeline.save.write import check_tiling

    planned = PlannedWrite("w", "w", torch.float32, (200, 130))

    def rows(n: int) -> list:
        edges = [round(200 * i / n) for i in range(n + 1)]
        return [((a, b), (0, 130)) for a, b in itertools.pairwise(edges)]

    grid = [((r0, r1), (c0, c1)) for (r0, r1), _ in rows(10) for c0, c1 in ((0, 65), (65, 130))]
    for boxes in (rows(1), rows(7), rows(100), grid, [((0, 200), (0, 130))]):
        check_tiling(planned, boxes)
    for boxes in (rows(7)[1:], rows(100)[:-1], [*rows(100)[:-1], ((197, 200), (0, 130))]):
        with pytest.raises(SaveError, match="exactly once"):
            check_tiling(planned, boxes)
    for count in (7, 100):  # the right total, but one row held twice and the last never
        boxes = rows(count)
        (a0, a1), cols = boxes[3]
        (z0, z1), _ = boxes[-1]
        boxes[3], boxes[-1] = ((a0, a1 + 1), cols), ((z0, z1 - 1), cols)
        with pytest.raises(SaveError, match="exactly once"):
            check_tiling(planned, boxes)
