"""Checkpoint reader: layouts, zero-copy reads, sliced reads, and every way a checkpoint can be broken."""

from __future__ import annotations

import gc
import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import automodel_plugins.checkpoint as checkpoint_package
import automodel_plugins.sources as sources_package
from automodel_plugins.checkpoint import Checkpoint, TensorInfo
from automodel_plugins.errors import CheckpointError, CorruptCheckpointError, UnsafeCheckpointPathError

# --- helpers ---------------------------------------------------------------------------------------------


def read_header(file: Path) -> dict:
    """Independent header parse (8-byte little-endian length + JSON)."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header.pop("__metadata__", None)
    return header


def write_raw(file: Path, header_text: str, data: bytes) -> None:
    """A hand-built safetensors file, for headers save_file would never write."""
    encoded = header_text.encode()
    file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def patch_header(file: Path, old: str, new: str) -> None:
    """Replace text inside the header in place (same length, so offsets stay put)."""
    assert len(old) == len(new)
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = raw[8 : 8 + length].decode()
    assert old in header
    file.write_bytes(raw[:8] + header.replace(old, new, 1).encode() + raw[8 + length :])


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.q.weight": torch.randn(8, 8, generator=g).to(torch.float8_e4m3fn),
        "model.layers.0.q.weight_scale_inv": torch.tensor(0.5),
        "model.layers.0.norm.weight": torch.randn(8, generator=g),
        "model.layers.1.q.weight": torch.randn(8, 8, generator=g).to(torch.float8_e4m3fn),
        "model.layers.1.q.weight_scale_inv": torch.tensor(0.25),
        "model.positions": torch.arange(10, dtype=torch.int64),
        "model.mask": torch.tensor([True, False, True]),
        "lm_head.weight": torch.randn(16, 8, generator=g, dtype=torch.float64).half(),
    }


def write_sharded(directory: Path, tensors: dict[str, torch.Tensor], n_shards: int = 3) -> dict[str, str]:
    """Split ``tensors`` round-robin over shards and write the index; returns the weight_map."""
    directory.mkdir(parents=True, exist_ok=True)
    names = [f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors" for i in range(n_shards)]
    weight_map: dict[str, str] = {}
    shards: list[dict[str, torch.Tensor]] = [{} for _ in names]
    for i, (key, value) in enumerate(tensors.items()):
        shards[i % n_shards][key] = value
        weight_map[key] = names[i % n_shards]
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, directory / name)
    write_index(directory, weight_map)
    return weight_map


def write_index(directory: Path, weight_map: dict, text: str | None = None) -> Path:
    index = directory / "model.safetensors.index.json"
    index.write_text(text if text is not None else json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def assert_bit_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))


def rss_bytes() -> tuple[int, int]:
    """(resident, anonymous resident) from /proc/self/statm: anonymous = resident - shared (file-backed)."""
    fields = Path("/proc/self/statm").read_text().split()
    page = os.sysconf("SC_PAGE_SIZE")
    resident, shared = int(fields[1]) * page, int(fields[2]) * page
    return resident, resident - shared


# --- layouts ---------------------------------------------------------------------------------------------


def test_single_file(tmp_path):
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    with Checkpoint.open(tmp_path) as ckpt:
        assert ckpt.directory == tmp_path.resolve()
        assert ckpt.files == ((tmp_path / "model.safetensors").resolve(),)
        assert ckpt.config_path == tmp_path.resolve() / "config.json"
        assert len(ckpt) == len(tensors) and set(ckpt.keys()) == set(tensors)
        header = read_header(tmp_path / "model.safetensors")
        assert ckpt.keys() == sorted(header, key=lambda k: header[k]["data_offsets"][0])
        for key, expected in tensors.items():
            assert key in ckpt
            info = ckpt.info(key)
            assert info == TensorInfo(
                key=key,
                dtype=expected.dtype,
                shape=tuple(expected.shape),
                file=ckpt.files[0],
                nbytes=expected.numel() * expected.element_size(),
            )
            assert_bit_equal(ckpt.tensor(key), expected)
        assert ckpt.total_nbytes() == sum(t.numel() * t.element_size() for t in tensors.values())
        assert "nope" not in ckpt and 3 not in ckpt


def test_open_file_path_directly(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "weights.safetensors")
    ckpt = Checkpoint.open(tmp_path / "weights.safetensors")
    assert ckpt.directory == tmp_path.resolve() and ckpt.keys() == ["a"]
    assert torch.equal(ckpt.tensor("a"), torch.ones(2))


def test_sharded_with_index(tmp_path):
    tensors = sample_tensors()
    weight_map = write_sharded(tmp_path, tensors, n_shards=3)
    with Checkpoint.open(tmp_path) as ckpt:
        names = sorted(set(weight_map.values()))
        assert ckpt.files == tuple((tmp_path / n).resolve() for n in names)
        expected_order = []
        for name in names:
            header = read_header(tmp_path / name)
            expected_order += sorted(header, key=lambda k, h=header: h[k]["data_offsets"][0])
        assert ckpt.keys() == expected_order
        for key, expected in tensors.items():
            assert ckpt.info(key).file == (tmp_path / weight_map[key]).resolve()
            assert_bit_equal(ckpt.tensor(key), expected)
    # The index file itself may be given, too.
    assert Checkpoint.open(tmp_path / "model.safetensors.index.json").keys() == expected_order


def test_index_wins_over_stray_files_and_model_safetensors_is_preferred(tmp_path):
    save_file({"native": torch.zeros(1)}, tmp_path / "consolidated.safetensors")
    save_file({"hf": torch.ones(1)}, tmp_path / "model.safetensors")
    assert Checkpoint.open(tmp_path).keys() == ["hf"]
    write_sharded(tmp_path, {"x": torch.ones(2), "y": torch.zeros(2)}, n_shards=2)
    assert sorted(Checkpoint.open(tmp_path).keys()) == ["x", "y"]


def test_directory_without_safetensors(tmp_path):
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors") as err:
        Checkpoint.open(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_several_files_without_index(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "a.safetensors")
    save_file({"b": torch.ones(1)}, tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"a\.safetensors, b\.safetensors"):
        Checkpoint.open(tmp_path)


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        Checkpoint.open(tmp_path / "nowhere")


# --- zero copy, slices, accounting -----------------------------------------------------------------------


def test_tensor_is_memory_mapped_not_copied(tmp_path):
    n = 25_000_000  # 100 MB of float32
    save_file(
        {"big": torch.arange(n, dtype=torch.float32), "small": torch.ones(3)}, tmp_path / "model.safetensors"
    )
    gc.collect()
    ckpt = Checkpoint.open(tmp_path)
    resident0, anon0 = rss_bytes()
    big = ckpt.tensor("big")
    resident1, _ = rss_bytes()
    assert resident1 - resident0 < 8 << 20, "tensor() read the data instead of mapping it"
    total = big.sum(dtype=torch.float64)  # touches every page
    _, anon2 = rss_bytes()
    assert anon2 - anon0 < 8 << 20, "touching the tensor filled anonymous memory: it is a copy"
    expected = torch.arange(n, dtype=torch.float32)
    assert total == expected.sum(dtype=torch.float64)
    assert torch.equal(big, expected)
    assert ckpt.bytes_read == 4 * n
    ckpt.close()
    assert big[12345].item() == 12345.0  # tensors handed out stay valid after close()


def test_slice_reads_region_and_counts_bytes(tmp_path):
    full = torch.randn(40, 24, 3)
    save_file({"w": full, "f8": full[:, :, 0].to(torch.float8_e4m3fn)}, tmp_path / "model.safetensors")
    ckpt = Checkpoint.open(tmp_path)
    assert ckpt.bytes_read == 0
    part = ckpt.slice("w", (slice(5, 17), slice(3, 10)))
    assert torch.equal(part, full[5:17, 3:10])
    assert ckpt.bytes_read == 12 * 7 * 3 * 4
    rows = ckpt.slice("w", (slice(30, None),))
    assert torch.equal(rows, full[30:])
    assert ckpt.bytes_read == 12 * 7 * 3 * 4 + 10 * 24 * 3 * 4
    before = ckpt.bytes_read
    assert torch.equal(ckpt.slice("w", (slice(-4, -1),)), full[-4:-1])
    assert ckpt.bytes_read - before == 3 * 24 * 3 * 4
    assert_bit_equal(ckpt.slice("f8", (slice(1, 9), slice(2, 5))), full[1:9, 2:5, 0].to(torch.float8_e4m3fn))
    before = ckpt.bytes_read
    assert ckpt.slice("w", (slice(8, 8),)).shape == (0, 24, 3)
    assert ckpt.bytes_read == before
    ckpt.tensor("w")
    assert ckpt.bytes_read == before + full.numel() * 4
    # read(): the whole tensor without a region, a slice with one.
    assert torch.equal(ckpt.read("w"), full)
    assert torch.equal(ckpt.read("w", (slice(2, 4),)), full[2:4])
    assert ckpt.bytes_read == before + 2 * full.numel() * 4 + 2 * 24 * 3 * 4


def test_slice_rejects_steps_and_extra_dims(tmp_path):
    save_file({"w": torch.zeros(4, 4)}, tmp_path / "model.safetensors")
    ckpt = Checkpoint.open(tmp_path)
    with pytest.raises(ValueError, match="step"):
        ckpt.slice("w", (slice(0, 4, 2),))
    with pytest.raises(ValueError, match="3 slices"):
        ckpt.slice("w", (slice(None), slice(None), slice(None)))
    assert ckpt.bytes_read == 0


@pytest.mark.parametrize(
    ("dtype", "st_name"),
    [("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("float8_e8m0fnu", "F8_E8M0")],
)
def test_fp8_round_trip_is_bit_exact(tmp_path, dtype, st_name):
    if not hasattr(torch, dtype):
        pytest.skip(f"torch has no {dtype}")
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    fp8 = every_byte.view(getattr(torch, dtype))
    save_file({"w": fp8}, tmp_path / "model.safetensors")
    assert read_header(tmp_path / "model.safetensors")["w"]["dtype"] == st_name
    ckpt = Checkpoint.open(tmp_path)
    assert ckpt.info("w").dtype == fp8.dtype
    assert torch.equal(ckpt.tensor("w").view(torch.uint8), every_byte)
    assert torch.equal(ckpt.slice("w", (slice(3, 7),)).view(torch.uint8), every_byte[3:7])


def test_unknown_key_lookups(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "model.safetensors")
    ckpt = Checkpoint.open(tmp_path)
    for call in (ckpt.info, ckpt.tensor, lambda k: ckpt.slice(k, (slice(0, 1),))):
        with pytest.raises(CheckpointError, match=r"\[missing\.weight\]: no tensor 'missing.weight'"):
            call("missing.weight")


def test_closed_checkpoint_refuses_reads(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "model.safetensors")
    ckpt = Checkpoint.open(tmp_path)
    ckpt.tensor("a")
    ckpt.close()
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.tensor("a")
    assert ckpt.info("a").shape == (1,)


# --- corrupt files ---------------------------------------------------------------------------------------


def test_truncated_shard(tmp_path):
    write_sharded(tmp_path, sample_tensors(), n_shards=3)
    shard = tmp_path / "model-00002-of-00003.safetensors"
    header = read_header(shard)
    last_key = max(header, key=lambda k: header[k]["data_offsets"][1])
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(CorruptCheckpointError, match="truncated") as err:
        Checkpoint.open(tmp_path)
    assert shard.name in str(err.value) and f"[{last_key}]" in str(err.value)


def test_garbage_header(tmp_path):
    save_file({"a": torch.ones(4)}, tmp_path / "model.safetensors")
    raw = (tmp_path / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    (tmp_path / "model.safetensors").write_bytes(
        raw[:8] + b"\xff{not json" + b"!" * (length - 10) + raw[8 + length :]
    )
    with pytest.raises(CorruptCheckpointError, match="not valid JSON") as err:
        Checkpoint.open(tmp_path)
    assert "model.safetensors" in str(err.value)


def test_header_length_beyond_file(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(4)}, file)
    raw = file.read_bytes()
    file.write_bytes(struct.pack("<Q", len(raw) * 10) + raw[8:])
    with pytest.raises(CorruptCheckpointError, match="exceeds the file size") as err:
        Checkpoint.open(tmp_path)
    assert str(file.resolve()) in str(err.value)


def test_file_too_short(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(CorruptCheckpointError, match="too short"):
        Checkpoint.open(tmp_path)


def test_unknown_dtype(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"w.weight": torch.ones(4)}, file)
    patch_header(file, '"F32"', '"Q32"')
    with pytest.raises(CorruptCheckpointError, match="unknown dtype 'Q32'") as err:
        Checkpoint.open(tmp_path)
    assert "[w.weight]" in str(err.value) and "model.safetensors" in str(err.value)


def test_offsets_not_matching_shape(tmp_path):
    file = tmp_path / "model.safetensors"
    save_file({"w.weight": torch.ones(4, 4)}, file)
    patch_header(file, "[4,4]", "[4,5]")
    with pytest.raises(CorruptCheckpointError, match="needs 80") as err:
        Checkpoint.open(tmp_path)
    assert "[w.weight]" in str(err.value)


def test_duplicate_key_inside_header(tmp_path):
    header = '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}'
    write_raw(tmp_path / "model.safetensors", header, b"\x01\x02")
    with pytest.raises(CorruptCheckpointError, match="duplicate key 'a'"):
        Checkpoint.open(tmp_path)


def test_overlapping_and_trailing_data(tmp_path):
    overlap = '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}'
    write_raw(tmp_path / "model.safetensors", overlap, b"\x00" * 3)
    with pytest.raises(CorruptCheckpointError, match="overlaps") as err:
        Checkpoint.open(tmp_path)
    assert "[b]" in str(err.value)
    write_raw(
        tmp_path / "model.safetensors", '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"\x00" * 5
    )
    with pytest.raises(CorruptCheckpointError, match="3 trailing bytes"):
        Checkpoint.open(tmp_path)


def test_key_duplicated_across_shards(tmp_path):
    save_file({"a": torch.ones(1), "b": torch.ones(1)}, tmp_path / "s1.safetensors")
    save_file({"a": torch.zeros(1)}, tmp_path / "s2.safetensors")
    write_index(tmp_path, {"a": "s1.safetensors", "b": "s2.safetensors"})
    with pytest.raises(CorruptCheckpointError, match="also stored in") as err:
        Checkpoint.open(tmp_path)
    assert "[a]" in str(err.value) and "s2.safetensors" in str(err.value)


# --- index problems --------------------------------------------------------------------------------------


def test_index_malformed_json(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "model-1.safetensors")
    index = write_index(tmp_path, {}, text='{"weight_map": {"a": "model-1.safetensors",')
    with pytest.raises(CorruptCheckpointError, match="index is not valid JSON") as err:
        Checkpoint.open(tmp_path)
    assert str(index) in str(err.value)


@pytest.mark.parametrize("body", [{"metadata": {}}, {"weight_map": []}, [1, 2], {"weight_map": {"a": 3}}])
def test_index_bad_weight_map(tmp_path, body):
    save_file({"a": torch.ones(1)}, tmp_path / "model-1.safetensors")
    write_index(tmp_path, {}, text=json.dumps(body))
    with pytest.raises(CorruptCheckpointError, match=r"model\.safetensors\.index\.json"):
        Checkpoint.open(tmp_path)


def _outside_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    directory = tmp_path / "ckpt"
    directory.mkdir()
    save_file({"a": torch.ones(1)}, directory / "model-1.safetensors")
    outside = tmp_path / "outside.safetensors"
    save_file({"evil": torch.ones(1)}, outside)
    return directory, outside


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "symlinked_dir"])
def test_index_entry_outside_directory(tmp_path, kind):
    directory, outside = _outside_checkpoint(tmp_path)
    if kind == "dotdot":
        entry = "../outside.safetensors"
    elif kind == "absolute":
        entry = str(outside)
    elif kind == "symlink":
        entry = "link.safetensors"
        (directory / entry).symlink_to(outside)
    else:
        (directory / "sub").symlink_to(tmp_path, target_is_directory=True)
        entry = "sub/outside.safetensors"
    index = write_index(directory, {"a": "model-1.safetensors", "evil": entry})
    with pytest.raises(UnsafeCheckpointPathError) as err:
        Checkpoint.open(directory)
    message = str(err.value)
    assert repr(entry) in message and str(index) in message and "[evil]" in message


def test_symlink_inside_directory_is_fine(tmp_path):
    (tmp_path / "real").mkdir()
    save_file({"a": torch.ones(1)}, tmp_path / "real" / "model-1.safetensors")
    (tmp_path / "link-1.safetensors").symlink_to(tmp_path / "real" / "model-1.safetensors")
    write_index(tmp_path, {"a": "link-1.safetensors"})
    ckpt = Checkpoint.open(tmp_path)
    # Named as the index names it (the link is followed only to check where it leads), and readable.
    assert ckpt.files == (tmp_path.resolve() / "link-1.safetensors",)
    assert torch.equal(ckpt.tensor("a"), torch.ones(1))


def test_hugging_face_cache_snapshot_links_into_blobs(tmp_path):
    repo = tmp_path / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    save_file({"a": torch.ones(2)}, repo / "blobs" / "deadbeef")
    (snapshot / "model-00001-of-00001.safetensors").symlink_to("../../blobs/deadbeef")
    write_index(snapshot, {"a": "model-00001-of-00001.safetensors"})
    ckpt = Checkpoint.open(snapshot)
    assert torch.equal(ckpt.tensor("a"), torch.ones(2))
    # ...but a snapshot link leaving the repository's blob store is still refused.
    (snapshot / "model-00001-of-00001.safetensors").unlink()
    (snapshot / "model-00001-of-00001.safetensors").symlink_to(_outside_checkpoint(tmp_path)[1])
    with pytest.raises(UnsafeCheckpointPathError):
        Checkpoint.open(snapshot)


def test_missing_shard(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "model-1.safetensors")
    write_index(tmp_path, {"a": "model-1.safetensors", "b": "model-2.safetensors"})
    with pytest.raises(CheckpointError, match="does not exist") as err:
        Checkpoint.open(tmp_path)
    assert type(err.value) is CheckpointError
    assert "model-2.safetensors" in str(err.value)


def test_index_lists_key_the_shard_lacks(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "model-1.safetensors")
    write_index(tmp_path, {"a": "model-1.safetensors", "ghost": "model-1.safetensors"})
    with pytest.raises(CorruptCheckpointError, match="header lacks it") as err:
        Checkpoint.open(tmp_path)
    assert "[ghost]" in str(err.value) and "model-1.safetensors" in str(err.value)


def test_shard_holds_key_the_index_omits(tmp_path):
    save_file({"a": torch.ones(1), "extra": torch.ones(1)}, tmp_path / "model-1.safetensors")
    write_index(tmp_path, {"a": "model-1.safetensors"})
    with pytest.raises(CorruptCheckpointError, match="does not map it here") as err:
        Checkpoint.open(tmp_path)
    assert "[extra]" in str(err.value) and "model-1.safetensors" in str(err.value)


def test_index_maps_key_to_the_wrong_shard(tmp_path):
    save_file({"a": torch.ones(1)}, tmp_path / "model-1.safetensors")
    save_file({"b": torch.ones(1)}, tmp_path / "model-2.safetensors")
    write_index(tmp_path, {"a": "model-2.safetensors", "b": "model-1.safetensors"})
    with pytest.raises(CorruptCheckpointError, match=r"found in model-2\.safetensors") as err:
        Checkpoint.open(tmp_path)
    assert "model-1.safetensors [b]" in str(err.value)


# --- nothing is ever unpickled ---------------------------------------------------------------------------


class _Tripwire:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["TRIPWIRE"]),))


def test_pickles_in_directory_are_never_loaded(tmp_path, monkeypatch):
    tripwire = tmp_path / "tripwire"
    monkeypatch.setenv("TRIPWIRE", str(tripwire))
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(_Tripwire()))
    with pytest.raises(CheckpointError):
        Checkpoint.open(tmp_path)
    assert not tripwire.exists()
    for package in (checkpoint_package, sources_package):
        for module in Path(package.__file__).parent.glob("*.py"):
            source = module.read_text()
            assert "torch.load" not in source and "import pickle" not in source, module
