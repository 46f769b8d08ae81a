"""Load the project's pytest plugin when the package is not installed (its pytest11 entry point absent)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    from automodel_plugins.testing import pytest_plugin

    if not config.pluginmanager.is_registered(pytest_plugin):
        config.pluginmanager.register(pytest_plugin, "automodel_plugins")
