"""Every bad input of a save gets a typed error naming the path, and nothing that loads is left behind; an
existing destination is never touched unless the new checkpoint is complete."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from mistral3_checkpoints import Checkpoints, checkpoint_tensors, tiny_model

import automodel_plugins.checkpoint.writer as writer_module
from automodel_plugins import from_pretrained, load_weights, save_pretrained
from automodel_plugins.errors import (
    AutomodelPluginsError,
    DestinationError,
    NoSourceError,
    SaveError,
    SaveOptionError,
    SaveWriteError,
    SourceChangedError,
    UnknownQuantizationError,
)
from automodel_plugins.registry import Registry


@pytest.fixture
def loaded(registry: Registry, checkpoints: Checkpoints):
    return from_pretrained(checkpoints(), registry=registry)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def assert_does_not_load(path: Path, registry: Registry) -> None:
    """Neither this host nor transformers' auto class loads it (a model class's own ``from_pretrained`` builds
    its default config when there is none: that is not loading a checkpoint)."""
    from transformers import AutoModelForImageTextToText

    with pytest.raises(AutomodelPluginsError):
        from_pretrained(path, registry=registry)
    with pytest.raises((OSError, ValueError), match=r"config\.json"):
        AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)


def existing_checkpoint(tmp_path: Path, loaded) -> Path:
    dest = tmp_path / "existing"
    save_pretrained(loaded, dest, quantization="none")
    return dest


def test_a_non_empty_destination_is_refused_without_overwrite(loaded, tmp_path: Path) -> None:
    dest = existing_checkpoint(tmp_path, loaded)
    before = snapshot(dest)
    with pytest.raises(DestinationError, match="non-empty") as caught:
        save_pretrained(loaded, dest)
    assert caught.value.path == dest.resolve()
    assert snapshot(dest) == before and leftovers(tmp_path) == []


def test_overwrite_replaces_a_checkpoint_and_an_empty_directory_is_used(loaded, tmp_path: Path) -> None:
    dest = existing_checkpoint(tmp_path, loaded)
    (dest / "stale-extra-file.txt").write_text("from before")
    report = save_pretrained(loaded, dest, overwrite=True)
    assert report.quantized == 14 and not (dest / "stale-extra-file.txt").exists()
    assert leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    save_pretrained(loaded, empty)
    assert (empty / "config.json").is_file()


@pytest.mark.parametrize("where", ["equal", "inside", "containing"])
def test_a_destination_at_the_source_is_refused(
    registry: Registry, checkpoints: Checkpoints, tmp_path: Path, where: str
) -> None:
    source = checkpoints.copy(tmp_path / "parent" / "source")
    model = from_pretrained(source, registry=registry)
    before = snapshot(source)
    dest = {"equal": source, "inside": source / "sub", "containing": tmp_path / "parent"}[where]
    with pytest.raises(DestinationError, match="source checkpoint"):
        save_pretrained(model, dest, quantization="none", overwrite=True)
    assert snapshot(source) == before and not (source / "sub").exists()


def test_an_unwritable_destination_is_refused(loaded, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(DestinationError) as caught:
        save_pretrained(loaded, blocker / "out")
    assert str(blocker) in str(caught.value)
    with pytest.raises(DestinationError, match="not a directory"):
        save_pretrained(loaded, blocker)
    if os.geteuid() == 0:
        return  # root writes anywhere: the permission case cannot be made here
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(DestinationError, match="cannot create"):
            save_pretrained(loaded, locked / "out")
    finally:
        locked.chmod(0o700)


def failing_pwrite(monkeypatch: pytest.MonkeyPatch, after: int, error: OSError) -> None:
    """``os.pwrite`` in the writer raises ``error`` from the ``after``-th call on."""
    real = os.pwrite
    calls = {"n": 0}

    def pwrite(fd: int, data, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] > after:
            raise error
        return real(fd, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", pwrite)


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_a_full_disk_halfway_leaves_nothing_and_touches_nothing(
    loaded, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    dest = existing_checkpoint(tmp_path, loaded) if existing else tmp_path / "out"
    before = snapshot(dest) if existing else None
    failing_pwrite(monkeypatch, after=20, error=OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(SaveWriteError, match="disk is full") as caught:
        save_pretrained(loaded, dest, overwrite=True)
    assert caught.value.errno == errno.ENOSPC
    assert leftovers(tmp_path) == [], "the temporary directory must be removed"
    if existing:
        assert snapshot(dest) == before
        assert checkpoint_tensors(dest)  # still the old checkpoint, loadable
    else:
        assert not dest.exists()


def test_a_crash_mid_write_leaves_a_directory_that_does_not_load(
    loaded, registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a killed process leaves: the temporary directory as it was mid-write (config.json comes last)."""
    real = os.pwrite
    crash = tmp_path / "crash"
    calls = {"n": 0}

    def pwrite(fd: int, data, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] == 10:
            staging = Path(os.readlink(f"/proc/self/fd/{fd}")).parent
            shutil.copytree(staging, crash)
        return real(fd, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", pwrite)
    save_pretrained(loaded, tmp_path / "out")
    assert crash.is_dir() and any(crash.glob("*.safetensors")) and not (crash / "config.json").exists()
    assert_does_not_load(crash, registry)


def test_an_exception_mid_write_removes_the_temporary_directory(loaded, tmp_path: Path, monkeypatch) -> None:
    import automodel_plugins.pipeline.save.write as save_write

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(save_write, "encode", boom)
    with pytest.raises(RuntimeError, match="interrupted"):
        save_pretrained(loaded, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_source_needs_a_source(tmp_path: Path) -> None:
    model = tiny_model().to(torch.bfloat16)
    with pytest.raises(NoSourceError, match=r"'fp8-tensor', 'fp8-block'.*'none'"):
        save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_source_that_changed_since_the_load_is_refused(
    registry: Registry, checkpoints: Checkpoints, tmp_path: Path
) -> None:
    source = checkpoints.copy(tmp_path / "source")
    model = from_pretrained(source, registry=registry)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"]["activation_scheme"] = "dynamic"
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(SourceChangedError, match="changed since"):
        save_pretrained(model, tmp_path / "out")
    report = save_pretrained(model, tmp_path / "fp8", quantization="fp8-tensor")
    assert report.scales_kept == 0 and report.quantized == 14  # fresh scales: the source's are not trusted
    shutil.rmtree(source)
    with pytest.raises(SourceChangedError):
        save_pretrained(model, tmp_path / "gone")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quantization": "fp8"}, "unknown quantization 'fp8'"),
        ({"quantization": "bf16"}, "unknown quantization"),
        ({"quantization": "fp8-tensor", "block_size": 64}, "block_size applies"),
        ({"quantization": "fp8-block", "block_size": 0}, "block_size must be"),
        ({"quantization": "fp8-block", "block_size": (16, 16, 16)}, "block_size must be"),
        ({"quantization": "fp8-block", "modules_to_not_convert": "lm_head"}, "list of module names"),
        ({"quantization": "none", "modules_to_not_convert": ["lm_head"]}, "applies to the fp8"),
        ({"max_shard_size": "lots"}, "max_shard_size"),
    ],
)
def test_bad_options(loaded, tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(SaveOptionError, match=match) as caught:
        save_pretrained(loaded, tmp_path / "out", **kwargs)
    assert isinstance(caught.value, ValueError)
    if kwargs.get("quantization") in ("fp8", "bf16"):
        assert isinstance(caught.value, UnknownQuantizationError)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_nan_weight_cannot_be_stored_as_fp8(loaded, tmp_path: Path) -> None:
    with torch.no_grad():
        loaded.model.language_model.layers[0].self_attn.k_proj.weight[0, 0] = float("nan")
    with pytest.raises(SaveError, match=r"k_proj.weight.*NaN"):
        save_pretrained(loaded, tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_a_pipeline_stage_is_refused(registry: Registry, checkpoints: Checkpoints, tmp_path: Path) -> None:
    from automodel_plugins import build_model

    path = checkpoints()
    model = build_model(path, registry=registry)
    model.lm_head = None
    model.to_empty(device="cpu")
    load_weights(model, path, stage=True, registry=registry)
    with pytest.raises(SaveError, match="pipeline stage"):
        save_pretrained(model, tmp_path / "out")


def test_a_disk_too_small_is_refused_before_writing(
    loaded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import automodel_plugins.pipeline.save.write as save_write

    real = save_write.shutil.disk_usage
    monkeypatch.setattr(save_write.shutil, "disk_usage", lambda path: real(path)._replace(free=1000))
    with pytest.raises(SaveWriteError, match=r"disk is full.*GiB are free") as caught:
        save_pretrained(loaded, tmp_path / "out")
    assert caught.value.errno == errno.ENOSPC
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("fsync", [True, False])
def test_every_file_is_synced_before_the_rename_unless_asked_not_to(
    loaded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    import automodel_plugins.checkpoint.destination as destination_module

    synced: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(writer_module.os, "fsync", record)
    monkeypatch.setattr(destination_module.os, "fsync", record)
    save_pretrained(loaded, tmp_path / "out", fsync=fsync, max_shard_size=60_000)
    shards = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert len(shards) > 1
    synced_names = {Path(path).name for path in synced}
    if fsync:
        assert set(shards) <= synced_names and tmp_path.name in synced_names  # the files, then the parent
    else:
        assert synced == []
