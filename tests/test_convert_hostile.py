"""``automodel-plugins convert`` given hostile sources and destinations: a tokenizer file that links outside the
source, ``--overwrite`` onto a directory that is no checkpoint or onto the source; and what it reports (its
whole wall time, its progress bar's label).

The checkpoint is a tiny FP8 Llama in three shards (``hub_checkpoints.write_llama``), claimed by the test plugin
``fake_plugins.llama_claimer`` made the process default for the CLI.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hub_checkpoints import registry, write_llama

import automodel_plugins.pipeline.save.convert as convert_module
import automodel_plugins.pipeline.save.write as save_write
from automodel_plugins import from_pretrained, save_pretrained
from automodel_plugins.cli import main
from automodel_plugins.errors import SaveWriteError, UnsafeCheckpointPathError
from automodel_plugins.pipeline.save.convert import convert_checkpoint
from automodel_plugins.registry import set_registry

SECRET = b"hf_THIS_IS_THE_USERS_HUB_TOKEN"


@pytest.fixture(autouse=True)
def only_the_test_plugin() -> Iterator[None]:
    previous = set_registry(registry())
    yield
    set_registry(previous)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("pristine") / "source")


@pytest.fixture
def source(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "source"))


def convert(*args: object) -> int:
    return main(["convert", *map(str, args), "--no-progress"])


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()
    }


def holds(directory: Path, content: bytes) -> list[str]:
    """Files under ``directory`` (links followed) whose bytes contain ``content``."""
    return [str(p) for p in directory.rglob("*") if p.is_file() and content in p.read_bytes()]


# --- extra files that link outside the source ----------------------------------------------------------------


def test_a_tokenizer_file_linking_outside_the_source_is_refused_and_never_copied(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "home" / ".cache" / "huggingface" / "token"
    token.parent.mkdir(parents=True)
    token.write_bytes(SECRET)
    (source / "tokenizer_config.json").symlink_to(token)
    for dest in (tmp_path / "out", tmp_path / "out-cli"):
        with pytest.raises(
            UnsafeCheckpointPathError, match=r"tokenizer_config\.json is a link to .*token, outside"
        ) as caught:
            convert_checkpoint(source, dest, to="bf16", progress=False)
        assert caught.value.path == source / "tokenizer_config.json"
        assert convert(source, dest, "--to", "fp8-tensor") == 2
        assert "outside the checkpoint directory" in capsys.readouterr().err
    assert sorted(holds(tmp_path, SECRET)) == sorted([str(token), str(source / "tokenizer_config.json")])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home", "source"]


def test_links_that_stay_inside_the_source_are_copied_as_their_files(source: Path, tmp_path: Path) -> None:
    (source / "tokenizer-real.json").write_text('{"real": true}')
    (source / "tokenizer_config.json").symlink_to("tokenizer-real.json")
    report = convert_checkpoint(source, tmp_path / "out", to="bf16", progress=False)
    copied = tmp_path / "out" / "tokenizer_config.json"
    assert not copied.is_symlink() and copied.read_text() == '{"real": true}'
    assert "tokenizer_config.json" in report.files


def test_a_link_swapped_to_outside_after_the_check_is_not_followed(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file copied is the one checked (its real path, opened without following links), not whatever the
    link names by the time the weights are written."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    (source / "tokenizer-real.json").write_text('{"real": true}')
    link = source / "tokenizer_config.json"
    link.symlink_to("tokenizer-real.json")
    real_extra = convert_module._extra_files

    def extra_then_swap(location):
        found = real_extra(location)
        link.unlink()
        link.symlink_to(secret)
        (source / "tokenizer-real.json").unlink()
        (source / "tokenizer-real.json").symlink_to(secret)
        return found

    monkeypatch.setattr(convert_module, "_extra_files", extra_then_swap)
    with pytest.raises(SaveWriteError, match=r"cannot copy tokenizer-real\.json") as caught:
        convert_checkpoint(source, tmp_path / "out", to="bf16", progress=False)
    assert caught.value.path == source / "tokenizer-real.json"
    assert not (tmp_path / "out").exists()
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --- destinations -------------------------------------------------------------------------------------------------


def test_overwrite_onto_a_directory_that_is_no_checkpoint_exits_2_and_touches_nothing(
    source: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "project"
    work.mkdir()
    (work / "train.py").write_text("print('training')\n")
    before = snapshot(work)
    assert convert(source, work, "--to", "bf16", "--overwrite") == 2
    assert re.search(r"not a checkpoint.*holds: train\.py", capsys.readouterr().err)
    monkeypatch.chdir(work)
    assert convert(source, "", "--to", "bf16", "--overwrite") == 2
    assert "is empty" in capsys.readouterr().err
    assert convert(source, ".", "--to", "bf16", "--overwrite") == 2
    assert snapshot(work) == before and sorted(os.listdir(tmp_path)) == ["project", "source"]


def test_overwrite_onto_the_source_is_refused(source: Path, tmp_path: Path, capsys) -> None:
    before = snapshot(source)
    assert convert(source, source, "--to", "bf16", "--overwrite") == 2
    assert "is the source checkpoint" in capsys.readouterr().err
    assert snapshot(source) == before


# --- what convert reports -----------------------------------------------------------------------------------------


def test_the_progress_bar_says_converting(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    labels: list[str] = []
    real = save_write.progress_bar

    def record(items, *, enabled, desc, **kwargs):
        labels.append(desc)
        return real(items, enabled=False, desc=desc, **kwargs)

    monkeypatch.setattr(save_write, "progress_bar", record)
    convert_checkpoint(source, tmp_path / "converted", to="bf16")
    save_pretrained(from_pretrained(source, registry=registry()), tmp_path / "saved")
    assert [label.split()[0] for label in labels] == ["converting", "saving"]


def test_the_reported_time_covers_the_whole_command(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A clock that jumps 1000 s while the model is built on the meta device (before any write): the report and
    the CLI's line count it, as they count everything from the command's start."""
    offset = {"s": 0.0}
    real_clock, real_boot_clock = time.perf_counter, time.clock_gettime
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + offset["s"])
    monkeypatch.setattr(time, "clock_gettime", lambda clock: real_boot_clock(clock) + offset["s"])
    real_build = convert_module.build_on_meta

    def slow_build(*args, **kwargs):
        offset["s"] += 1000.0
        return real_build(*args, **kwargs)

    monkeypatch.setattr(convert_module, "build_on_meta", slow_build)
    report = convert_checkpoint(source, tmp_path / "api", to="bf16", progress=False)
    assert report.seconds >= 1000.0
    assert convert(source, tmp_path / "cli", "--to", "bf16") == 0
    printed = float(re.search(r"in ([0-9.]+) s", capsys.readouterr().out).group(1))
    assert printed >= 1000.0
