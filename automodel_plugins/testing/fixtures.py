"""pytest fixtures of the plugin author's kit: checkpoints written into temporary directories, and a registry
of chosen installed plugins.

Loaded by ``automodel_plugins.testing.pytest_plugin`` (the ``pytest11`` entry point), so every pytest run
imports this module: torch and transformers are imported inside the fixtures, never here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from automodel_plugins.registry import Registry

__all__ = ["fp8_checkpoint_factory", "plugin_registry", "unquantized_checkpoint_factory"]

CheckpointFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def fp8_checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    """``make(model, name="fp8", **options) -> Path``: :func:`~automodel_plugins.testing.checkpoints.write_fp8_checkpoint`
    into a fresh temporary directory (session-scoped, so module-scoped fixtures may build checkpoints once).

    Options are ``write_fp8_checkpoint``'s: ``block_size=(128, 128)``, ``scale_dtype=torch.bfloat16``,
    ``activation_scale_name=None`` (dynamic activations), ``modules_to_not_convert``, ``shards``,
    ``quantization_extra={"activation_scheme": "dynamic", "fmt": "e4m3"}``, ...
    """

    def make(model: Any, name: str = "fp8", **options: Any) -> Path:
        from automodel_plugins.testing.checkpoints import write_fp8_checkpoint

        return write_fp8_checkpoint(model, tmp_path_factory.mktemp(name), **options)

    return make


@pytest.fixture(scope="session")
def unquantized_checkpoint_factory(tmp_path_factory: pytest.TempPathFactory) -> CheckpointFactory:
    """``make(model, name="bf16", dtype=torch.bfloat16) -> Path``: the model's ``save_pretrained`` in ``dtype``
    (the model itself is left as it was)."""

    def make(model: Any, name: str = "bf16", dtype: Any = None) -> Path:
        import copy

        import torch

        directory = tmp_path_factory.mktemp(name)
        copy.deepcopy(model).to(dtype or torch.bfloat16).save_pretrained(directory)
        return directory

    return make


@pytest.fixture
def plugin_registry() -> Iterator[Callable[..., Registry]]:
    """``plugin_registry("my_plugin", ...) -> Registry``: only those installed plugins (by entry-point name),
    made the process default for this test, so a load does not depend on what else is installed.

    The previous default comes back after the test.
    """
    from automodel_plugins.registry import Registry, set_registry

    previous: list[Registry | None] = []

    def make(*names: str) -> Registry:
        registry = Registry.from_entry_points(selection=",".join(names))
        previous.append(set_registry(registry))
        return registry

    yield make
    if previous:
        set_registry(previous[0])
