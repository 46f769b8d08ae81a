"""``docs/hooks.md`` is generated from ``hookspecs.py``: regenerate it and require the committed file to match."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from automodel_plugins.registry import hookspecs

TOOL = Path(__file__).resolve().parents[1] / "tools" / "hooks_doc.py"


def _load_tool():
    """``tools/hooks_doc.py``: a repository tool, not part of the package, imported by its path."""
    spec = importlib.util.spec_from_file_location("hooks_doc", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


hooks_doc = _load_tool()


def test_docs_hooks_md_is_up_to_date() -> None:
    """Fails after an edit to a hook spec until ``python tools/hooks_doc.py`` is run."""
    assert hooks_doc.DOC_PATH.read_text() == hooks_doc.render()


def test_every_spec_has_a_section_with_its_signature_and_docstring() -> None:
    text = hooks_doc.render()
    specs = hooks_doc.spec_functions()
    assert [s.__name__ for s in specs] == [
        "claim_config",
        "state_dict_adapter",
        "post_materialize",
        "forward_override",
    ]
    assert re.findall(r"^## (\w+)$", text, flags=re.M) == [s.__name__ for s in specs]
    assert "def claim_config(config: PretrainedConfig) -> Claim | Decline | None: ..." in text
    for spec in specs:
        first_line = spec.__doc__.strip().splitlines()[0].replace("``", "`")
        assert first_line in text


def test_rest_markup_becomes_markdown() -> None:
    doc = "Raise :class:`~pkg.errors.PluginError` or :func:`pkg.load`; ``x``\nspans::\n\n    a -> b\n      c\n\nAfter."
    assert hooks_doc.markdown(doc) == [
        "Raise `PluginError` or `pkg.load`; `x`",
        "spans:",
        "",
        "```text",
        "a -> b",
        "  c",
        "```",
        "",
        "After.",
    ]


def test_a_changed_spec_changes_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is not vacuous: editing a spec's docstring makes the committed file stale."""
    monkeypatch.setattr(hookspecs.post_materialize, "__doc__", "Changed.")
    assert hooks_doc.DOC_PATH.read_text() != hooks_doc.render()


def test_check_mode_exit_status(tmp_path: Path) -> None:
    stale = tmp_path / "hooks.md"
    stale.write_text("old\n")
    command = [sys.executable, str(TOOL), "--check"]
    assert subprocess.run([*command, str(stale)], capture_output=True).returncode == 1
    assert hooks_doc.main([str(stale)]) == 0  # rewrites
    assert subprocess.run([*command, str(stale)], capture_output=True).returncode == 0
