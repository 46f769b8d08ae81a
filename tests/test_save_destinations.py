"""Hostile and unlucky destinations of ``save_pretrained``: each is built here for real (a source changed since
the load, the working directory, a directory that is no checkpoint, NUL bytes, names over the file system's
limit, a mount point, what a killed save leaves, a system without ``renameat2``), and each is either written
correctly or refused with a typed error, with nothing of the user's changed.

The checkpoint is a tiny FP8 Llama in three shards (``hub_checkpoints.write_llama``) claimed by the test
plugin ``fake_plugins.llama_claimer``; a save is read back with safetensors and compared with the model.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hub_checkpoints import registry, write_llama
from safetensors.torch import load_file

import automodel_plugins.checkpoint.destination as destination_module
import automodel_plugins.checkpoint.writer as writer_module
from automodel_plugins import build_model, from_pretrained, save_pretrained
from automodel_plugins.checkpoint.destination import MARKER_NAME
from automodel_plugins.errors import DestinationError, SaveError, SaveOptionError, SourceChangedError
from automodel_plugins.registry import set_registry
from automodel_plugins.testing.pytest_plugin import subprocess_env

SHARD = "model-00002-of-00003.safetensors"


@pytest.fixture(autouse=True)
def only_the_test_plugin() -> Iterator[None]:
    """``save_pretrained`` asks the process default registry for the source's adapter: the test plugin alone."""
    previous = set_registry(registry())
    yield
    set_registry(previous)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = write_llama(tmp_path_factory.mktemp("pristine") / "source")
    (source / "tokenizer.json").write_text('{"version": "1.0"}')
    return source


@pytest.fixture
def source(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "source"))


@pytest.fixture
def model(source: Path):
    return from_pretrained(source, registry=registry())


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (relative name -> bytes)."""
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def tree(directory: Path) -> list[str]:
    """Every name under ``directory``, hidden ones included."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def saved_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def assert_saved(directory: Path, model) -> None:
    """A complete BF16 save of ``model``: every state-dict tensor, bit for bit."""
    tensors = saved_tensors(directory)
    state = model.state_dict()
    assert (directory / "config.json").is_file()
    assert set(tensors) == set(state)
    for name, value in state.items():
        assert torch.equal(tensors[name], value), name


def siblings(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --- the source checkpoint, whatever state it is in -----------------------------------------------------------


@pytest.mark.parametrize("change", ["touched-config", "removed-shard", "moved"])
def test_the_source_is_never_replaced_whatever_happened_to_it(
    model, source: Path, tmp_path: Path, change: str
) -> None:
    """The source changed since the load (so it cannot be reopened as the same checkpoint): a save onto it is
    still refused, naming both paths, and every file it holds stays byte-identical."""
    target = source
    if change == "touched-config":
        os.utime(source / "config.json")
    elif change == "removed-shard":
        (source / SHARD).unlink()
    else:  # renamed since the load: found by device and inode
        target = source.rename(tmp_path / "renamed")
    before = snapshot(target)
    for dest in (target, target / "inside"):
        with pytest.raises(DestinationError, match="source checkpoint") as caught:
            save_pretrained(model, dest, overwrite=True, quantization="none")
        assert str(source) in str(caught.value) and str(dest) in str(caught.value)
    assert snapshot(target) == before
    assert siblings(tmp_path) == []


def test_a_destination_that_now_holds_the_source_is_refused(model, source: Path, tmp_path: Path) -> None:
    """An old checkpoint directory the source was moved into since the load: replacing it would delete it."""
    old = tmp_path / "old"
    save_pretrained(model, old, quantization="none")
    moved = source.rename(old / "moved-source")
    before = snapshot(old)
    with pytest.raises(DestinationError, match=r"contains the source checkpoint .*device and inode"):
        save_pretrained(model, old, overwrite=True, quantization="none")
    assert snapshot(old) == before and moved.is_dir()


# --- the working directory and other directories that are no checkpoint ----------------------------------------


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project directory, the working directory: a training script and its data."""
    work = tmp_path / "project"
    (work / "data").mkdir(parents=True)
    (work / "train.py").write_text("print('training')\n")
    (work / "data" / "rows.jsonl").write_text("{}\n")
    monkeypatch.chdir(work)
    return work


@pytest.mark.parametrize("dest", ["", " ", Path("")], ids=["empty", "blank", "Path-empty"])
def test_an_empty_destination_is_refused(model, workdir: Path, dest) -> None:
    before = snapshot(workdir)
    match = "empty" if isinstance(dest, str) else "not a checkpoint"  # Path("") is Path("."): the next test
    with pytest.raises(DestinationError, match=match):
        save_pretrained(model, dest, overwrite=True, quantization="none")
    assert snapshot(workdir) == before and tree(workdir) == ["data", "data/rows.jsonl", "train.py"]
    assert siblings(workdir.parent) == []


def test_overwrite_refuses_a_directory_that_is_no_checkpoint_naming_what_it_holds(
    model, workdir: Path, tmp_path: Path
) -> None:
    before = snapshot(workdir)
    with pytest.raises(DestinationError, match=r"not a checkpoint.*holds: data/, train\.py") as caught:
        save_pretrained(model, ".", overwrite=True, quantization="none")
    assert caught.value.path == workdir
    # a config alone, or weights alone, is no checkpoint either; many entries are counted, not all listed
    for i in range(7):
        (workdir / f"notes-{i}.txt").write_text("mine")
    (workdir / "config.json").write_text("{}")
    with pytest.raises(DestinationError, match=r"holds: config\.json, data/, notes-0\.txt, .*\(10 entries\)"):
        save_pretrained(model, workdir, overwrite=True, quantization="none")
    assert set(snapshot(workdir)) == set(before) | {"config.json"} | {f"notes-{i}.txt" for i in range(7)}
    assert siblings(tmp_path) == []


def test_a_directory_that_appears_during_the_write_is_not_replaced_unless_a_checkpoint(
    model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination was free when the save began; a project directory appeared there while it wrote."""
    dest = tmp_path / "out"
    real = os.pwrite

    def pwrite(fd: int, data, offset: int) -> int:
        if not dest.exists():
            dest.mkdir()
            (dest / "train.py").write_text("print('training')\n")
        return real(fd, data, offset)

    monkeypatch.setattr(writer_module.os, "pwrite", pwrite)
    with pytest.raises(DestinationError, match=r"not a checkpoint.*holds: train\.py"):
        save_pretrained(model, dest, overwrite=True, quantization="none")
    assert tree(dest) == ["train.py"] and siblings(tmp_path) == []


def test_overwrite_still_replaces_a_checkpoint(model, tmp_path: Path) -> None:
    """What overwrite is for: a directory holding a config and safetensors weights (params.json counts too)."""
    dest = tmp_path / "ckpt"
    save_pretrained(model, dest, quantization="none")
    (dest / "config.json").rename(dest / "params.json")
    save_pretrained(model, dest, overwrite=True, quantization="none")
    assert_saved(dest, model)
    assert not (dest / "params.json").exists() and siblings(tmp_path) == []


# --- names the file system cannot hold --------------------------------------------------------------------------


def test_a_nul_byte_is_refused(model, tmp_path: Path) -> None:
    before = tree(tmp_path)
    for dest in (str(tmp_path / "out\0put"), tmp_path / "out\0put" / "ckpt"):
        with pytest.raises(DestinationError, match="NUL byte"):
            save_pretrained(model, dest, quantization="none")
    assert tree(tmp_path) == before


def test_a_name_over_the_limit_is_refused_and_one_that_fits_is_saved(model, tmp_path: Path) -> None:
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    with pytest.raises(DestinationError, match=rf"name of {limit + 1} bytes.*limit of {limit} bytes"):
        save_pretrained(model, tmp_path / ("x" * (limit + 1)), quantization="none")
    with pytest.raises(DestinationError, match="name of"):
        save_pretrained(model, tmp_path / ("é" * (limit // 2 + 1)) / "out", quantization="none")
    assert tree(tmp_path) == ["source", *(f"source/{n}" for n in sorted(os.listdir(tmp_path / "source")))]
    # A name that fits, whose temporary sibling ".NAME.tmp-XXXXXXXX" would not: the sibling's name is shortened.
    for name in ("y" * limit, "y" * (limit - 8), "é" * (limit // 2)):
        save_pretrained(model, tmp_path / name, quantization="none")
        assert_saved(tmp_path / name, model)
        assert siblings(tmp_path) == []
        save_pretrained(model, tmp_path / name, quantization="none", overwrite=True)  # and its ".old-" one
        assert_saved(tmp_path / name, model)
        assert siblings(tmp_path) == []


def test_the_shortened_sibling_names_fit_and_stay_the_same() -> None:
    limit = 255
    for name in ("a", "b" * 200, "c" * 255, "é" * 127):
        for kind in (".tmp-", ".old-"):
            prefix = destination_module.sibling_prefix(name, kind, limit)
            assert len(os.fsencode(prefix)) + 8 <= limit and prefix.endswith(kind)
            assert prefix == destination_module.sibling_prefix(name, kind, limit)
    assert destination_module.sibling_prefix("b" * 250, ".tmp-") != destination_module.sibling_prefix(
        "b" * 249 + "c", ".tmp-"
    )


# --- options and models that cannot be saved -------------------------------------------------------------------


@pytest.mark.parametrize("block_size", [3.5, float("nan"), -16, 0, (16, 2.5), "64", True, (16,)])
def test_a_block_size_that_is_no_positive_int_is_refused(model, tmp_path: Path, block_size) -> None:
    with pytest.raises(SaveOptionError, match=r"block_size must be a positive int"):
        save_pretrained(model, tmp_path / "out", quantization="fp8-block", block_size=block_size)
    assert tree(tmp_path) == ["source", *(f"source/{n}" for n in sorted(os.listdir(tmp_path / "source")))]


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ([""], r"modules_to_not_convert\[0\] is the empty name ''"),
        (["lm_head", "  "], r"modules_to_not_convert\[1\] is the empty name '  '"),
        (["lm_head", "layers.(0"], r"modules_to_not_convert\[1\] 'layers.\(0' is not a valid pattern"),
        ([None], r"modules_to_not_convert\[0\] is None, not a module name"),
    ],
)
def test_modules_to_not_convert_entries_that_match_everything_or_nothing_are_refused(
    model, tmp_path: Path, entries: list, match: str
) -> None:
    with pytest.raises(SaveOptionError, match=match):
        save_pretrained(model, tmp_path / "out", quantization="fp8-tensor", modules_to_not_convert=entries)
    assert not (tmp_path / "out").exists() and siblings(tmp_path) == []


def test_a_pattern_that_excludes_every_linear_layer_says_so(model, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="quantizes no weight"):
        report = save_pretrained(
            model, tmp_path / "out", quantization="fp8-tensor", modules_to_not_convert=[".*"]
        )
    assert report.quantized == 0


def test_a_model_still_on_the_meta_device_is_refused(source: Path, tmp_path: Path) -> None:
    model = build_model(source, registry=registry())
    with pytest.raises(
        SaveError, match=r"still on the meta device \(model\.embed_tokens\.weight.*load_weights"
    ):
        save_pretrained(model, tmp_path / "out", quantization="none")
    assert not (tmp_path / "out").exists() and siblings(tmp_path) == []


# --- a mount point ----------------------------------------------------------------------------------------------


def test_a_mount_point_is_refused_before_anything_is_written(
    model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renaming onto a mount point fails with EBUSY, which used to come after the whole write. Tests cannot mount:
    the device number the check reads is what is faked."""
    dest = tmp_path / "mounted"
    save_pretrained(model, dest, quantization="none")
    before = snapshot(dest)
    real = destination_module._device
    monkeypatch.setattr(destination_module, "_device", lambda path: real(path) + (Path(path) == dest))
    for overwrite in (False, True):
        with pytest.raises(DestinationError, match="mount point"):
            save_pretrained(model, dest, overwrite=overwrite, quantization="none")
    assert snapshot(dest) == before and siblings(tmp_path) == []
    (dest / "sub").mkdir()  # saving inside it is fine
    save_pretrained(model, dest / "sub" / "ckpt", quantization="none")
    assert_saved(dest / "sub" / "ckpt", model)


# --- what a killed save leaves, cleaned by the next save of the same destination ----------------------------------


def killed_save(dest: Path, *, at: str, overwrite: bool = False) -> None:
    """Run a save of a tiny model into ``dest`` in a child process killed (``os._exit``) part way: ``at``
    ``"write"`` (the 3rd tensor write) or ``"rename"`` (between the two renames of a replacement without
    ``renameat2``)."""
    script = textwrap.dedent(
        f"""
        import os, torch
        from transformers import LlamaForCausalLM
        import automodel_plugins.checkpoint.destination as destination
        import automodel_plugins.checkpoint.writer as writer
        from automodel_plugins import save_pretrained
        from automodel_plugins.testing.tiny_models import tiny_llama_config

        torch.manual_seed(1)
        model = LlamaForCausalLM(tiny_llama_config())
        calls = {{"n": 0}}
        if {at!r} == "write":
            real = os.pwrite
            def pwrite(fd, data, offset):
                calls["n"] += 1
                if calls["n"] == 3:
                    os._exit(9)
                return real(fd, data, offset)
            writer.os.pwrite = pwrite
        else:
            destination._exchange = lambda first, second: False
            real_replace = os.replace
            def replace(first, second):
                if ".tmp-" in os.path.basename(first) and str(second) == {str(dest)!r}:
                    os._exit(9)  # the new checkpoint's rename into place: the old one is aside already
                return real_replace(first, second)
            destination.os.replace = replace
        save_pretrained(model, {str(dest)!r}, quantization="none", overwrite={overwrite!r})
        raise SystemExit("not killed")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 9, done.stderr


def test_a_killed_save_leaves_a_marked_sibling_that_the_next_save_removes(model, tmp_path: Path) -> None:
    dest = tmp_path / "out"
    killed_save(dest, at="write")
    (left,) = siblings(tmp_path)
    assert left.startswith(".out.tmp-") and (tmp_path / left / MARKER_NAME).is_file()
    assert any((tmp_path / left).glob("*.safetensors")) and not dest.exists()
    # a look-alike without the marker (someone else's), and a marked one of a live process, are kept
    foreign = tmp_path / ".out.tmp-abcdefgh"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("mine")
    live = tmp_path / ".out.tmp-live0000"
    live.mkdir()
    marker = {"destination": "out", "role": "staging", "pid": os.getpid(), "host": socket.gethostname()}
    (live / MARKER_NAME).write_text(json.dumps(marker))
    save_pretrained(model, dest, quantization="none")
    assert_saved(dest, model)
    assert siblings(tmp_path) == [".out.tmp-abcdefgh", ".out.tmp-live0000"]
    assert (foreign / "precious.txt").read_text() == "mine" and not (dest / MARKER_NAME).exists()


def test_a_sibling_left_on_another_host_is_kept_with_a_warning(model, tmp_path: Path) -> None:
    other = tmp_path / ".out.tmp-elsewhr1"
    other.mkdir()
    marker = {"destination": "out", "role": "staging", "pid": 1, "host": "another-host.invalid"}
    (other / MARKER_NAME).write_text(json.dumps(marker))
    with pytest.warns(UserWarning, match="another-host.invalid"):
        save_pretrained(model, tmp_path / "out", quantization="none")
    assert other.is_dir()


def test_without_renameat2_a_replacement_killed_between_its_renames_is_restored_by_the_next_save(
    model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``renameat2`` the old checkpoint is renamed aside, then the new one into place: a kill between
    leaves no destination. The next save of it renames the old one back first (then replaces it as asked)."""
    dest = tmp_path / "out"
    save_pretrained(model, dest, quantization="none")
    before = snapshot(dest)
    killed_save(dest, at="rename", overwrite=True)
    assert not dest.exists()
    names = siblings(tmp_path)
    assert [n[:9] for n in names] == [".out.old-", ".out.tmp-"], names
    assert snapshot(tmp_path / names[0]) == {
        **before,
        MARKER_NAME: (tmp_path / names[0] / MARKER_NAME).read_bytes(),
    }
    monkeypatch.setattr(destination_module, "_exchange", lambda first, second: False)
    with pytest.warns(UserWarning, match="renamed back"), pytest.raises(DestinationError, match="non-empty"):
        save_pretrained(model, dest, quantization="none")  # no overwrite: the restored checkpoint stays
    assert snapshot(dest) == before and siblings(tmp_path) == []
    save_pretrained(model, dest, quantization="none", overwrite=True)  # the fallback path, to the end
    assert_saved(dest, model)
    assert siblings(tmp_path) == []


def test_without_renameat2_a_failed_second_rename_puts_the_old_checkpoint_back(
    model, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "out"
    save_pretrained(model, dest, quantization="none")
    before = snapshot(dest)
    monkeypatch.setattr(destination_module, "_exchange", lambda first, second: False)
    real = os.replace

    def replace(first, second) -> None:
        if ".tmp-" in Path(first).name and Path(second) == dest:  # the new one into place
            raise OSError(5, "Input/output error")
        real(first, second)

    monkeypatch.setattr(destination_module.os, "replace", replace)
    with pytest.raises(SaveError, match="cannot move the finished checkpoint"):
        save_pretrained(model, dest, quantization="none", overwrite=True)
    assert snapshot(dest) == before and siblings(tmp_path) == []


# --- the source-change check --------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["data", "header"])
def test_a_same_size_rewrite_of_the_source_with_its_mtime_restored_is_seen(
    model, source: Path, tmp_path: Path, where: str
) -> None:
    """A shard rewritten in place, same size, modification time put back: ``"source"`` would copy the new bytes
    (scales, activation scales) and follow the new header as if they were what the model was loaded from.
    The data case is seen by the status-change time (which a user cannot set back), the header case also by
    the header's digest."""
    shard = source / SHARD
    stat = shard.stat()
    data = bytearray(shard.read_bytes())
    if where == "data":
        data[-1] ^= 0x01  # the last byte of the last tensor's data
    else:
        at = data.index(b"model.layers.")
        data[at : at + 13] = b"model.layerz."  # a key renamed, same length: still a valid header
    for _ in range(100_000):  # until the file system's clock has moved past the stamp's
        with open(shard, "r+b") as handle:
            handle.write(data)
        if shard.stat().st_ctime_ns != stat.st_ctime_ns:
            break
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (shard.stat().st_size, shard.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    with pytest.raises(SourceChangedError, match=SHARD):
        save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
