"""The hub from the command line: errors name the CLI's flags (``--revision``, ``--cache-dir``,
``--local-files-only``), not Python arguments; a mistyped path with no network says that no such local path
exists either; and ``python -m automodel_plugins.testing.fake_hub DIR`` serves checkpoints to a real load."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hub_checkpoints import registry, write_llama

import automodel_plugins
from automodel_plugins.cli import EXIT_USER_ERROR, main
from automodel_plugins.errors import HubOfflineError, HubRevisionNotFoundError
from automodel_plugins.testing.compare import assert_same_state_dict
from automodel_plugins.testing.fake_hub import FakeHub, endpoint_patched
from automodel_plugins.testing.pytest_plugin import subprocess_env


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("cli") / "ckpt")


@pytest.fixture
def hub(fake_hub: FakeHub, checkpoint: Path) -> FakeHub:
    fake_hub.add_directory("cli/public", checkpoint)
    fake_hub.add_directory("cli/gated", checkpoint, gated=True, tokens={"hf_good"})
    fake_hub.reset_counters()
    return fake_hub


def cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("automodel-plugins: error: ")
    return err


def test_an_unknown_revision_names_the_flag(hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    err = cli_error(capsys, "inspect", "cli/public", "--revision", "v9")
    assert "pass an existing one as --revision" in err and "revision=" not in err
    # from Python, the same error names the argument
    with pytest.raises(HubRevisionNotFoundError, match="pass an existing one as revision="):
        automodel_plugins.load_config("cli/public", revision="v9")


def test_downloads_off_name_the_flags(hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    err = cli_error(capsys, "list", "--config", "cli/public", "--local-files-only")
    assert "downloads are off (--local-files-only)" in err and "pass --cache-dir" in err
    assert "local_files_only=" not in err and "cache_dir=" not in err
    with pytest.raises(HubOfflineError, match=r"local_files_only=True.*pass cache_dir="):
        automodel_plugins.load_config("cli/public", local_files_only=True)


def test_a_gated_repo_says_how_to_give_the_cli_a_token(
    hub: FakeHub, capsys: pytest.CaptureFixture[str]
) -> None:
    err = cli_error(capsys, "inspect", "cli/gated")
    assert "set HF_TOKEN or run `hf auth login`" in err and "token=" not in err


def test_a_revision_that_names_a_path_from_the_cli(hub: FakeHub, capsys: pytest.CaptureFixture[str]) -> None:
    err = cli_error(capsys, "inspect", "cli/public", "--revision", "../../x")
    assert "revision '../../x' cannot name a branch, tag or commit: it contains '..'" in err
    assert hub.requests == []


@pytest.mark.parametrize("how", ["offline", "unreachable"])
def test_a_mistyped_path_without_network_says_no_such_path_either(
    hub: FakeHub,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    how: str,
) -> None:
    """``my-checkpont`` (a typo of a directory here) is also a valid repo id; with no network the error says
    both what the cache lacks and that no such local path exists."""
    from huggingface_hub import constants, hf_api

    (tmp_path / "my-checkpoint").mkdir()
    monkeypatch.chdir(tmp_path)
    if how == "offline":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:
        closed = "http://127.0.0.1:9"  # the discard port: nothing listens
        monkeypatch.setattr(constants, "ENDPOINT", closed)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", closed + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(hf_api.api, "endpoint", closed)
    err = cli_error(capsys, "inspect", "my-checkpont")
    assert f"nor is there a local path 'my-checkpont' in {tmp_path}" in err
    assert "check the spelling" in err


# --- python -m automodel_plugins.testing.fake_hub DIR ----------------------------------------------------------


def test_the_stand_in_hub_serves_a_directory_of_checkpoints(
    fake_hub: FakeHub, checkpoint: Path, tmp_path: Path
) -> None:
    """Started as a user would, on a free port; a load through it equals the load of the directory."""
    served = tmp_path / "served"
    write_llama(served / "org" / "tiny", seed=1)
    write_llama(served / "solo", seed=2)
    command = [sys.executable, "-m", "automodel_plugins.testing.fake_hub", str(served), "--port", "0"]
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        first = process.stdout.readline()
        assert first.startswith("fake hub serving 2 repo(s) at http://127.0.0.1:"), first
        url = first.split(" at ")[1].split()[0]
        lines = [process.stdout.readline().strip() for _ in range(3)]
        assert lines[0].startswith("org/tiny  <- ") and lines[1].startswith("solo  <- ")
        assert lines[2] == f"export HF_ENDPOINT={url} HF_HUB_DISABLE_XET=1"
        with endpoint_patched(url):
            for repo_id in ("org/tiny", "solo"):
                model = automodel_plugins.from_pretrained(repo_id, registry=registry())
                reference = automodel_plugins.from_pretrained(served / repo_id, registry=registry())
                assert_same_state_dict(model, reference)
        assert fake_hub.requests == []  # the session's own stand-in hub was not asked
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
        process.stdout.close()
    assert process.returncode == 0


def test_the_stand_in_hub_serves_one_checkpoint_by_its_name(checkpoint: Path) -> None:
    from automodel_plugins.testing.fake_hub import checkpoint_repos

    assert checkpoint_repos(checkpoint) == {checkpoint.name: checkpoint}


def test_the_stand_in_hub_refuses_a_directory_without_checkpoints(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "automodel_plugins.testing.fake_hub", str(tmp_path)]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no checkpoint (a directory with a config.json)" in done.stderr
