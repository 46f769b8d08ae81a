"""The author kit's pytest fixtures, for testing plugins and the host without depending on what is installed.

Registered as the ``pytest11`` entry point ``automodel_plugins``, so every test session has them:

* registries: ``isolated_registry`` (empty), ``plugin_registry`` (only the named installed plugins);
* installed plugins and the CLI: ``fake_distribution``, ``run_cli``;
* inputs: ``write_model_config``, ``fp8_checkpoint_factory``, ``unquantized_checkpoint_factory``.

Imports stay inside the fixtures: every pytest run in an environment with this package installed imports this
module, so it must stay light (no torch).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from automodel_plugins.registry import Registry

FakeDistribution = Callable[..., Path]
RunCli = Callable[..., "subprocess.CompletedProcess[str]"]
CheckpointFactory = Callable[..., Path]


@pytest.fixture
def isolated_registry() -> Iterator[Registry]:
    """An empty registry installed as the process default for one test; the previous default comes back after.

    Register throwaway plugins with ``isolated_registry.register(obj, name="x")``; no entry point leaks in.
    """
    from automodel_plugins.registry import Registry, set_registry

    registry = Registry()
    previous = set_registry(registry)
    try:
        yield registry
    finally:
        set_registry(previous)


@pytest.fixture
def fake_distribution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDistribution]:
    """A factory that "installs" a distribution into a temporary directory on ``sys.path``.

    ``fake_distribution(name, version="1.0", entry_points={"plugin": "module"}, modules={"module": source})``
    writes ``<name>-<version>.dist-info/`` (``METADATA``, ``entry_points.txt``) and the module files, and returns
    the directory, so a subprocess can see the same distributions through ``PYTHONPATH``. The modules it wrote
    are dropped from ``sys.modules`` after the test.
    """
    site = tmp_path / "fake-site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    written: list[str] = []

    def make(
        name: str,
        *,
        version: str = "1.0",
        entry_points: Mapping[str, str] | None = None,
        modules: Mapping[str, str] | None = None,
        group: str = "automodel_plugins",
    ) -> Path:
        for module, source in (modules or {}).items():
            _write_module(site, module, source)
            written.append(module)
        _write_dist_info(site, name, version, {group: dict(entry_points or {})})
        importlib.invalidate_caches()
        return site

    yield make
    for module in written:
        for loaded in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
            del sys.modules[loaded]


def _write_module(site: Path, module: str, source: str) -> None:
    *packages, leaf = module.split(".")
    folder = site.joinpath(*packages)
    folder.mkdir(parents=True, exist_ok=True)
    for depth in range(1, len(packages) + 1):
        init = site.joinpath(*packages[:depth], "__init__.py")
        if not init.exists():
            init.write_text("")
    (folder / f"{leaf}.py").write_text(source)


def _write_dist_info(site: Path, name: str, version: str, groups: Mapping[str, Mapping[str, str]]) -> None:
    info = site / f"{re.sub(r'[-_.]+', '_', name)}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    sections = [
        f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in groups.items()
    ]
    (info / "entry_points.txt").write_text("\n".join(sections))


@pytest.fixture
def run_cli() -> RunCli:
    """Run ``python -m automodel_plugins.cli ARGS`` in a subprocess; returns the ``CompletedProcess`` (text).

    ``env`` overrides variables (a value of ``None`` unsets one, e.g. ``{"AUTOMODEL_PLUGINS": None}``);
    ``pythonpath`` puts directories (such as the one ``fake_distribution`` returns) first on ``PYTHONPATH``.
    The host package is importable in the subprocess even when it is not installed.
    """

    def run(
        *args: str,
        env: Mapping[str, str | None] | None = None,
        pythonpath: tuple[Path | str, ...] | list[Path | str] = (),
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "automodel_plugins.cli", *args]
        return subprocess.run(
            command, env=subprocess_env(env, pythonpath), capture_output=True, text=True, timeout=timeout
        )

    return run


def subprocess_env(
    overrides: Mapping[str, str | None] | None = None,
    pythonpath: tuple[Path | str, ...] | list[Path | str] = (),
) -> dict[str, str]:
    """``os.environ`` with ``overrides`` applied and ``pythonpath`` plus the host package's root prepended."""
    import automodel_plugins

    env = dict(os.environ)
    for key, value in (overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    package_root = Path(automodel_plugins.__file__).resolve().parent.parent
    paths = [*map(str, pythonpath), str(package_root), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


@pytest.fixture
def write_model_config(tmp_path: Path) -> Callable[..., Path]:
    """A factory writing ``data`` as ``<tmp>/<name>/config.json``; returns the model directory."""

    def write(data: Mapping[str, Any], name: str = "model") -> Path:
        directory = tmp_path / name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "config.json").write_text(json.dumps(data, indent=2))
        return directory

    return write


# --- checkpoints and a registry of chosen installed plugins -------------------------------------------------


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
