"""Load the project's pytest plugin when the package is not installed (its pytest11 entry point absent), and
keep every test off the network: the Hugging Face Hub is offline unless a test takes the ``fake_hub`` fixture
(a stand-in server on 127.0.0.1)."""

from __future__ import annotations

import os

import pytest

# For subprocesses (the CLI, torchrun) and for huggingface_hub if it is imported after this point.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


def pytest_configure(config: pytest.Config) -> None:
    from automodel_plugins.testing import pytest_plugin

    if not config.pluginmanager.is_registered(pytest_plugin):
        config.pluginmanager.register(pytest_plugin, "automodel_plugins")


@pytest.fixture(autouse=True, scope="session")
def _no_hub_network() -> None:
    """huggingface_hub reads its environment once, at import, which may have happened already."""
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    constants.HF_HUB_DISABLE_TELEMETRY = True
