"""`make bench`: run every ``benchmarks/bench_*.py``, each in its own process, streaming its output.

Benchmarks print their figures and PASS/FAIL against their targets; this runner never judges timings. It exits 0
unless a benchmark crashed: killed by a signal, or a non-zero exit with a Python traceback on stderr. A non-zero
exit without a traceback (a benchmark reporting a missed target through its status) is shown in the summary but
does not fail the run. Ends with a one-line-per-benchmark summary.

    python benchmarks/run_all.py            # every bench_*.py, in name order
    python benchmarks/run_all.py load cli   # only bench_load.py and bench_cli.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent


def main(argv: list[str] | None = None) -> int:
    wanted = argv if argv is not None else sys.argv[1:]
    scripts = sorted(HERE.glob("bench_*.py"))
    if wanted:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted or s.stem in wanted]
    if not scripts:
        print(f"no benchmark matches {wanted}", file=sys.stderr)
        return 2
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("AUTOMODEL_PLUGINS_PROGRESS", "0")
    summary = []
    for script in scripts:
        print(f"\n=== {os.path.relpath(script, REPO_ROOT)} ===", flush=True)
        started = time.perf_counter()
        try:
            code, traceback = run(script, env)
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
        crashed = code < 0 or (code != 0 and traceback)
        if code == 0:
            verdict = "ok"
        elif crashed:
            verdict = f"CRASHED (exit {code})"
        else:
            verdict = f"exit {code} without a traceback (a reported FAIL, not a crash)"
        summary.append((script.name, verdict, crashed, time.perf_counter() - started))
        if code != 0:
            print(f"!!! {script.name}: {verdict}", flush=True)
    print("\n=== summary ===")
    for name, verdict, _, seconds in summary:
        print(f"{name:<32} {seconds:7.1f} s  {verdict}")
    return 1 if any(crashed for _, _, crashed, _ in summary) else 0


def run(script: Path, env: dict[str, str]) -> tuple[int, bool]:
    """Run one benchmark, its stdout streamed as is and its stderr relayed line by line (watched for a
    traceback); return its exit status and whether a traceback appeared."""
    proc = subprocess.Popen(
        [sys.executable, str(script)], cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True, bufsize=1
    )
    seen = {"traceback": False}

    def relay() -> None:
        for line in proc.stderr:
            seen["traceback"] |= line.startswith("Traceback (most recent call last)")
            sys.stderr.write(line)
            sys.stderr.flush()

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    reader.join()
    return code, seen["traceback"]


if __name__ == "__main__":
    sys.exit(main())
