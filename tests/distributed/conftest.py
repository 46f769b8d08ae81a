"""One ``torchrun --nproc_per_node 2`` launch (CPU, gloo) for every distributed scenario the session collected.

Each test module names the scenarios it checks in a module-level ``SCENARIOS`` tuple; the session fixture
:func:`distributed_run` starts ``_worker.py`` once with all of them (torchrun and the imports cost ~10 s a
launch) and the tests read what each rank wrote.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from . import _tiny

WORLD_SIZE = 2
WORKER = Path(__file__).with_name("_worker.py")
TIMEOUT_S = float(
    os.environ.get("AUTOMODEL_PLUGINS_DISTRIBUTED_TIMEOUT", "300")
)  # every scenario, one launch


@dataclass
class DistributedRun:
    """The launch's exit code and log, and per-rank results by scenario."""

    out: Path
    returncode: int | None
    log: str
    hub_requests: list[Any] = field(default_factory=list)
    """What the stand-in hub served during the launch (``RequestRecord``s), when a hub scenario ran."""

    def log_tail(self, chars: int = 6000) -> str:
        return self.log[-chars:]

    def ranks(self, scenario: str) -> list[dict[str, Any]]:
        """What every rank measured in ``scenario``; fails the test with the rank's traceback or the log."""
        results = []
        for rank in range(WORLD_SIZE):
            path = self.out / "results" / f"{scenario}.rank{rank}.json"
            if not path.is_file():
                pytest.fail(
                    f"rank {rank} wrote no result for {scenario!r} (torchrun exit code {self.returncode}):\n"
                    f"{self.log_tail()}"
                )
            data = json.loads(path.read_text())
            if "error" in data:
                pytest.fail(f"rank {rank} raised in {scenario!r}:\n{data['error']}")
            results.append(data)
        return results


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def collected_scenarios(session: pytest.Session) -> list[str]:
    """Scenarios named by the ``SCENARIOS`` of every collected module, in collection order."""
    names: list[str] = []
    for item in session.items:
        for name in getattr(getattr(item, "module", None), "SCENARIOS", ()):
            if name not in names:
                names.append(name)
    return names


def launch(
    scenarios: list[str],
    out: Path,
    *,
    timeout: float = TIMEOUT_S,
    env: dict[str, str] | None = None,
    nproc: int = WORLD_SIZE,
) -> DistributedRun:
    """``torchrun --nproc_per_node <nproc> --master_port <free> _worker.py <scenarios> <out>``, killed on
    timeout; ``env`` adds to the environment."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(WORKER),
        ",".join(scenarios),
        str(out),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "AUTOMODEL_PLUGINS_PROGRESS": "0",
        "AUTOMODEL_PLUGINS_DISTRIBUTED_TIMEOUT": str(timeout),
        # A rank waiting on another's download fails (with a traceback) well before the harness kills the launch.
        "AUTOMODEL_PLUGINS_DOWNLOAD_TIMEOUT": str(max(timeout / 3, 30)),
        **(env or {}),
    }
    log_path = out / "torchrun.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            returncode: int | None = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # torchrun and the ranks it started: their own session
            process.wait()
            returncode = None
            log.write(f"\n[test harness] killed after {timeout:.0f} s\n")
    return DistributedRun(out, returncode, log_path.read_text(errors="replace"))


@pytest.fixture(scope="session")
def distributed_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> DistributedRun:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    scenarios = collected_scenarios(request.session)
    out = tmp_path_factory.mktemp("distributed")
    hub_scenarios = [s for s in scenarios if s in _tiny.HUB_REPOS]
    if not hub_scenarios:
        return launch(scenarios, out)
    hub = request.getfixturevalue("fake_hub_server")
    env = serve_hub_repos(hub, out, [_tiny.HUB_REPOS[s] for s in hub_scenarios])
    run = launch(scenarios, out, env=env)
    run.hub_requests = list(hub.requests)
    return run


def serve_hub_repos(hub: Any, out: Path, repos: list[str]) -> dict[str, str]:
    """The tiny checkpoint (plus a ``consolidated.safetensors`` copy, as Mistral repos ship) served as each of
    ``repos``; returns the environment that points both ranks at the hub and at one cache (one machine)."""
    from hub_checkpoints import mistral_extras

    source = _tiny.write_checkpoint(out / _tiny.HUB_SOURCE, block_size=None, tie_word_embeddings=False)
    extras = {"consolidated.safetensors": mistral_extras(source)["consolidated.safetensors"]}
    for repo in repos:
        hub.add_directory(repo, source, extra=extras)
    hub.reset_counters()
    return {**hub.env(), "HF_HUB_CACHE": str(out / "hf-cache"), "HF_HOME": str(out / "hf-home")}
