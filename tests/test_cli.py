"""automodel-plugins list: JSON schema, table, --config claims, conflicts, broken plugins, and no torch import."""

from __future__ import annotations

import json
import subprocess
import sys

import fake_plugins.declining_claimer
import fake_plugins.generic_claimer
import fake_plugins.greedy_claimer
import fake_plugins.misspelled_hook
import fake_plugins.mistral3_claimer
import fake_plugins.no_claim
import fake_plugins.raising_claimer
import pytest
from fake_plugins import installed, source
from fake_plugins.configs import LLAMA, MISTRAL3

from automodel_plugins import __version__
from automodel_plugins.cli import main
from automodel_plugins.registry import set_registry
from automodel_plugins.testing.pytest_plugin import subprocess_env

PLUGIN_KEYS = {"name", "distribution", "version", "hooks", "status", "error"}
CLAIM_KEYS = {"plugin", "claimed", "reason", "priority"}


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def plugins(isolated_registry):
    """A registry with a specific claimer, a fallback, a plugin without claim_config, and a broken one."""
    isolated_registry.register(
        fake_plugins.mistral3_claimer, "specific", distribution="dist-specific", version="2.0"
    )
    isolated_registry.register(fake_plugins.generic_claimer, "generic")
    isolated_registry.register(fake_plugins.no_claim, "silent")
    isolated_registry.register(fake_plugins.misspelled_hook, "typo")
    return isolated_registry


# --- in process -------------------------------------------------------------------------------------------


def test_list_json_is_one_object_with_the_schema(plugins, capsys):
    assert main(["list", "--json"]) == 0
    document = _json(capsys)
    assert set(document) == {"plugins", "claims", "claimed_by"}
    assert document["claims"] == [] and document["claimed_by"] is None
    rows = {row["name"]: row for row in document["plugins"]}
    assert [row["name"] for row in document["plugins"]] == ["generic", "silent", "specific", "typo"]
    for row in document["plugins"]:
        assert set(row) == PLUGIN_KEYS
    assert rows["specific"] == {
        "name": "specific",
        "distribution": "dist-specific",
        "version": "2.0",
        "hooks": ["claim_config", "post_materialize"],
        "status": "loaded",
        "error": None,
    }
    assert rows["typo"]["status"] == "error" and "claim_confg" in rows["typo"]["error"]


def test_list_table_has_the_columns_rows_and_errors(plugins, capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    header, *lines = out.splitlines()
    assert header.split() == ["NAME", "DISTRIBUTION", "VERSION", "STATUS", "HOOKS"]
    specific = next(line for line in lines if line.startswith("specific "))
    assert specific.split() == [
        "specific",
        "dist-specific",
        "2.0",
        "loaded",
        "claim_config,",
        "post_materialize",
    ]
    assert "errors:" in lines
    assert any("'typo'" in line and "claim_confg" in line for line in lines[lines.index("errors:") :])


def test_list_config_directory_names_the_winner(plugins, write_model_config, capsys):
    assert main(["list", "--json", "--config", str(write_model_config(MISTRAL3))]) == 0
    document = _json(capsys)
    assert document["claimed_by"] == "specific"
    claims = {row["plugin"]: row for row in document["claims"]}
    assert set(claims) == {"generic", "silent", "specific"}
    for row in document["claims"]:
        assert set(row) == CLAIM_KEYS
    assert claims["specific"] == {
        "plugin": "specific",
        "claimed": True,
        "reason": "Mistral3 with a ministral3 text backbone",
        "priority": 10,
    }
    assert claims["silent"]["claimed"] is False


def test_list_config_file_path_table_shows_verdicts_and_winner(plugins, write_model_config, capsys):
    config = write_model_config(LLAMA) / "config.json"
    assert main(["list", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(
        i for i, line in enumerate(lines) if line.split() == ["PLUGIN", "VERDICT", "PRIORITY", "REASON"]
    )
    verdicts = {line.split()[0]: line.split()[1:3] for line in lines[start + 1 : start + 4]}
    assert verdicts == {
        "generic": ["claimed", "0"],
        "silent": ["declined", "-"],
        "specific": ["declined", "-"],
    }
    assert lines[-1] == "claimed by: generic"


def test_list_config_shows_a_declining_plugins_reason(isolated_registry, write_model_config, capsys):
    isolated_registry.register(fake_plugins.declining_claimer, "no")
    config = str(write_model_config(LLAMA))
    assert main(["list", "--config", config]) == 0
    out = capsys.readouterr().out
    assert "no      declined  -         llama is served by stock transformers" in out.splitlines()
    assert out.splitlines()[-1] == "claimed by: (none: stock transformers)"
    assert main(["list", "--json", "--config", config]) == 0
    assert _json(capsys)["claims"] == [
        {
            "plugin": "no",
            "claimed": False,
            "reason": "llama is served by stock transformers",
            "priority": None,
        }
    ]


def test_conflict_prints_claimed_by_null_and_exits_2(isolated_registry, write_model_config, capsys):
    isolated_registry.register(fake_plugins.greedy_claimer, "greedy")
    isolated_registry.register(fake_plugins.mistral3_claimer, "specific")
    assert main(["list", "--json", "--config", str(write_model_config(MISTRAL3))]) == 2
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert document["claimed_by"] is None
    assert [row["claimed"] for row in document["claims"]] == [True, True]
    assert "'greedy'" in captured.err and "'specific'" in captured.err


def test_claim_error_is_shown_in_its_row_and_exits_2(isolated_registry, write_model_config, capsys):
    isolated_registry.register(fake_plugins.raising_claimer, "bad")
    isolated_registry.register(fake_plugins.generic_claimer, "generic")
    assert main(["list", "--json", "--config", str(write_model_config(LLAMA))]) == 2
    captured = capsys.readouterr()
    document = json.loads(captured.out)
    assert document["claimed_by"] is None
    bad, generic = document["claims"]
    assert bad["error"] == "RuntimeError: boom while reading the config"
    assert "error" not in generic
    assert "'bad'" in captured.err and "claim_config" in captured.err


def test_claim_error_in_table_mode(isolated_registry, write_model_config, capsys):
    isolated_registry.register(fake_plugins.raising_claimer, "bad")
    assert main(["list", "--config", str(write_model_config(LLAMA))]) == 2
    out = capsys.readouterr().out
    assert any(line.split()[:2] == ["bad", "error"] and "RuntimeError" in line for line in out.splitlines())
    assert "claimed by: (undecided" in out


def test_no_claim_gives_claimed_by_null_and_exit_0(plugins, write_model_config, capsys):
    plugins.unregister("generic")
    assert main(["list", "--json", "--config", str(write_model_config(LLAMA))]) == 0
    assert _json(capsys)["claimed_by"] is None


def test_bad_config_exits_2_with_the_config_error(plugins, tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    assert main(["list", "--json", "--config", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(tmp_path / "config.json") in captured.err and "malformed JSON" in captured.err


def test_unknown_selected_plugin_exits_2(monkeypatch, capsys):
    monkeypatch.setenv("AUTOMODEL_PLUGINS", "surely_not_installed_plugin")
    previous = set_registry(None)
    try:
        assert main(["list"]) == 2
    finally:
        set_registry(previous)
    assert "surely_not_installed_plugin" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"automodel-plugins {__version__}"


# --- subprocess -------------------------------------------------------------------------------------------


@pytest.fixture
def fake_site(fake_distribution):
    """A good plugin and one whose import raises, installed as two distributions."""
    fake_distribution(
        "automodel-plugins-cli-good",
        version="3.1.4",
        entry_points={"cli_good": "cli_good_mod"},
        modules={"cli_good_mod": source("mistral3_claimer")},
    )
    return fake_distribution(
        "automodel-plugins-cli-broken",
        entry_points={"cli_broken": "cli_broken_mod"},
        modules={"cli_broken_mod": source("import_error")},
    )


def test_subprocess_list_shows_other_distributions_and_broken_plugins_exit_0(fake_site, run_cli):
    result = run_cli(
        "list", "--json", env={"AUTOMODEL_PLUGINS": "cli_good,cli_broken"}, pythonpath=[fake_site]
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    rows = {row["name"]: row for row in document["plugins"]}
    assert list(rows) == ["cli_broken", "cli_good"]
    assert rows["cli_good"]["distribution"] == "automodel-plugins-cli-good"
    assert rows["cli_good"]["version"] == "3.1.4"
    assert rows["cli_good"]["status"] == "loaded"
    assert rows["cli_broken"]["status"] == "error"
    assert "fancy_kernels" in rows["cli_broken"]["error"]


def test_subprocess_list_config_names_the_winner(fake_site, run_cli, write_model_config):
    config = write_model_config(MISTRAL3)
    result = run_cli(
        "list", "--config", str(config), env={"AUTOMODEL_PLUGINS": "cli_good"}, pythonpath=[fake_site]
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "claimed by: cli_good"


def test_subprocess_unknown_selection_exits_2(fake_site, run_cli):
    result = run_cli("list", env={"AUTOMODEL_PLUGINS": "cli_good,cli_nope"}, pythonpath=[fake_site])
    assert result.returncode == 2
    assert "cli_nope" in result.stderr and result.stdout == ""


NO_TORCH_CHECK = """
import sys
from automodel_plugins.cli import main
from automodel_plugins.registry import get_registry
get_registry()
code = main(["list", "--json"])
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
raise SystemExit(code)
"""


@pytest.mark.parametrize("selection", ["cli_good,cli_broken", None], ids=["fake-plugins", "all-installed"])
def test_list_imports_neither_torch_nor_transformers(fake_site, selection):
    env = subprocess_env({"AUTOMODEL_PLUGINS": selection}, [fake_site])
    result = subprocess.run([sys.executable, "-c", NO_TORCH_CHECK], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "HEAVY=\n" in result.stderr, result.stderr
    assert "cli_good" in {row["name"] for row in json.loads(result.stdout)["plugins"]}


@pytest.mark.skipif(
    not installed("automodel-plugins-mistral3-fp8"),
    reason="distribution automodel-plugins-mistral3-fp8 is not installed (pip install -e plugins/mistral3_fp8)",
)
def test_installed_mistral3_fp8_is_listed_with_claim_config(run_cli):
    result = run_cli("list", "--json", env={"AUTOMODEL_PLUGINS": None})
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["plugins"]}
    assert "mistral3_fp8" in rows, rows
    assert rows["mistral3_fp8"]["status"] == "loaded", rows["mistral3_fp8"]["error"]
    assert "claim_config" in rows["mistral3_fp8"]["hooks"]
