"""The author kit's pytest fixtures, for testing plugins and the host without depending on what is installed.

Registered as the ``pytest11`` entry point ``automodel_plugins``, so every test session has them:

* registries: ``isolated_registry`` (empty), ``plugin_registry`` (only the named installed plugins);
* installed plugins and the CLI: ``fake_distribution``, ``run_cli``;
* inputs: ``write_model_config``, ``fp8_checkpoint_factory``, ``unquantized_checkpoint_factory``;
* the Hugging Face Hub without network: ``fake_hub`` (a stand-in hub on 127.0.0.1, patched in, fresh cache),
  ``fake_hub_server`` (the session's one server), ``hf_cache`` (an offline cache to lay repos into).

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
    from automodel_plugins.testing.fake_hub import FakeHub

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


# --- the Hugging Face Hub, without network ------------------------------------------------------------------


@pytest.fixture(scope="session")
def fake_hub_server() -> Iterator[FakeHub]:
    """The session's one :class:`~automodel_plugins.testing.fake_hub.FakeHub` on 127.0.0.1, started on first
    use. Tests want :func:`fake_hub`; this one serves a subprocess too (``fake_hub_server.env()``)."""
    from automodel_plugins.testing.fake_hub import FakeHub

    with FakeHub() as hub:
        yield hub


@pytest.fixture
def fake_hub(fake_hub_server: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """The stand-in hub patched into huggingface_hub for one test: downloads on, a fresh empty cache as
    ``HF_HUB_CACHE``, no token (neither ``HF_TOKEN`` nor a saved one), telemetry off, counters reset.

    Add repos with ``fake_hub.add_directory(repo_id, checkpoint_dir)`` or ``add_repo``; they stay for the
    session, so use repo ids of the test's own.
    """
    _isolate_hub(tmp_path, monkeypatch, offline=False)
    fake_hub_server.reset_counters()
    try:
        with fake_hub_server.patch_endpoint():
            yield fake_hub_server
    finally:
        fake_hub_server.clear_overrides()
        fake_hub_server.lfs_redirect = False
        fake_hub_server.resolve_cache = False


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache made the default (``HF_HUB_CACHE``) with downloads off (``HF_HUB_OFFLINE``):
    fill it with :func:`~automodel_plugins.testing.hub_cache.write_cached_repo` and load repo ids from it."""
    return _isolate_hub(tmp_path, monkeypatch, offline=True)


def _isolate_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, offline: bool) -> Path:
    """huggingface_hub reads these once, at import: patch its constants (transformers reads the same ones)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir(exist_ok=True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    return cache
