"""Median wall time of ``automodel-plugins list`` as a user runs it: a fresh process each time.

``list`` must stay light (no torch, no transformers) so it answers in under half a second. Prints the figure
and PASS/FAIL against the target; never asserts, so it can run anywhere and be read.

    python benchmarks/bench_cli.py [--runs 9] [--target 0.5] [-- extra list args]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def cli_command() -> list[str]:
    """The installed console script next to this interpreter, else ``python -m automodel_plugins.cli``."""
    script = Path(sys.executable).with_name("automodel-plugins")
    return [str(script)] if script.exists() else [sys.executable, "-m", "automodel_plugins.cli"]


def timed_run(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run; CPU time shows what the wall time would be on an idle machine."""
    cpu_before = _children_cpu()
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, _children_cpu() - cpu_before


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=9, help="timed runs (at least 7)")
    parser.add_argument("--target", type=float, default=0.5, help="median wall time to pass, seconds")
    parser.add_argument("list_args", nargs="*", help="extra arguments for `list` (after --)")
    args = parser.parse_args()
    runs = max(args.runs, 7)
    command = [*cli_command(), "list", *args.list_args]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)

    load_before = os.getloadavg()[0]
    timed_run(command, env)  # warm-up: byte-compilation and the OS file cache, not counted
    walls, cpus = zip(*(timed_run(command, env) for _ in range(runs)), strict=True)
    median = statistics.median(walls)
    verdict = "PASS" if median <= args.target else "FAIL"
    print(f"command: {' '.join(command)}")
    print(f"AUTOMODEL_PLUGINS: {os.environ.get('AUTOMODEL_PLUGINS', '(unset: every installed plugin)')}")
    print(
        f"load average (1 min) before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs"
    )
    print(f"runs: {runs}  wall min {min(walls):.3f} s  median {median:.3f} s  max {max(walls):.3f} s")
    print(f"CPU (user+sys) median {statistics.median(cpus):.3f} s")
    print(f"{verdict}: median {median:.3f} s vs target {args.target:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
