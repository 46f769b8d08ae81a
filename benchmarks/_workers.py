"""Running a benchmark's measurements in fresh worker processes: each worker prints one JSON object as its last
line of stdout, and the driver alternates the compared paths so that none always runs first (warm caches, CPU
frequency)."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any


def worker_env(**extra: str) -> dict[str, str]:
    """This process's environment with progress bars off (their output would precede the JSON line)."""
    return {**os.environ, "AUTOMODEL_PLUGINS_PROGRESS": "0", **extra}


def run_json_worker(command: Sequence[str], *, what: str, env: dict[str, str] | None = None) -> Any:
    """Run ``command`` and return the JSON its last stdout line holds; a failed worker raises with its stderr."""
    proc = subprocess.run(list(command), capture_output=True, text=True, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def alternating(names: Sequence[str], repeats: int) -> Iterator[tuple[int, str]]:
    """``(repeat, name)`` for each name once per repeat, the order reversed every other repeat."""
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            yield repeat, name
