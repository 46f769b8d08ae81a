"""``list --config`` and ``inspect`` against ``python -c "import torch, transformers"``, fresh processes, one run.

Issue 24 asks for headers-only tools in about the time of that import: ``inspect`` of a tiny local checkpoint
≤ 1.0 of it, ``list --config`` of it ≤ 0.5, ``inspect`` of a header-only Qwen3-VL-235B-A22B (73,768 header
entries, ``benchmarks/_checkpoint.py``'s ``ensure_header_only_235b``) ≤ 1.1. The commands run interleaved, a
fresh process each, after one uncounted warm-up round; medians of wall and CPU (user+sys) time, ratios to the
peer measured in the same run. Floors are measured too, to show what a command cannot go below while it keeps
its contract: building the transformers config ``list --config`` hands the plugins, and building the stock model
on meta as ``inspect`` does (its modeling module imported); then the imports of that floor one by one (CPU each
adds, in order), and the parse and plan of the 73,768 entries alone, in one process after the imports (CPU
seconds). Prints PASS/FAIL; never asserts.

    python benchmarks/bench_inspect.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._checkpoint import ensure_header_only_235b, ensure_tiny_checkpoint
from benchmarks.bench_cli import REPO_ROOT, cli_command, timed_run

PEER = "import torch, transformers"
TARGETS = {"list --config tiny": 0.5, "inspect tiny": 1.0, "inspect 235B": 1.1}

_BUILD_CONFIG = "import sys, torch, transformers; transformers.AutoConfig.from_pretrained(sys.argv[1])"
"""What ``list --config`` cannot skip: the transformers config plugins are asked about (torch, transformers'
model-type registry, the config classes)."""
_BUILD_ON_META = """
import sys, torch, transformers
config = transformers.AutoConfig.from_pretrained(sys.argv[1])
with torch.device("meta"):
    getattr(transformers, config.architectures[0])._from_config(config, dtype=torch.bfloat16)
"""
"""What ``inspect`` cannot skip: that config, and the stock model built on meta (its modeling module)."""

_IMPORT_STEPS = """
import json, sys, time
steps, last = [], time.process_time()
def step(name):
    global last
    now = time.process_time(); steps.append((name, now - last)); last = now
import torch; step("torch")
import transformers; step("transformers (lazy)")
import transformers.models; step("transformers.models (its model-type registry)")
import transformers.configuration_utils; step("transformers.configuration_utils")
config = transformers.AutoConfig.from_pretrained(sys.argv[1]); step("the checkpoint's config")
import torch._dynamo; step("torch._dynamo, with sympy and torch.distributed.tensor (masking_utils, core_model_loading)")
import accelerate; step("accelerate (integrations.accelerate)")
import transformers.modeling_utils; step("transformers.modeling_utils, the rest")
import transformers.models.mistral3.modeling_mistral3; step("modeling_mistral3 (+ ministral3, pixtral)")
import automodel_plugins.pipeline.load.describe; step("automodel_plugins' inspect (registry, plugins, planner)")
print(json.dumps(steps))
"""
"""CPU seconds each import adds after the ones before it, in this order: the floor of ``inspect tiny``, each."""

_PARSE_AND_PLAN = """
import gc, sys, time
gc.disable()  # as the CLI does
import torch
from automodel_plugins.checkpoint import Checkpoint
from automodel_plugins.model.tensors import model_tensors
from automodel_plugins.pipeline.composition import adapter_for
from automodel_plugins.pipeline.load.load import build_model
from automodel_plugins.pipeline.load.plan import plan_load
from automodel_plugins.pipeline.load.preflight import check_structure
from automodel_plugins.pipeline.load.resident import plan_resident
from automodel_plugins.registry import get_registry, pick_winner
from automodel_plugins.sources import load_config
path = sys.argv[1]
registry = get_registry()
config = load_config(path)
plugin = pick_winner(registry.claims(config))
model = build_model(config, dtype=torch.bfloat16, registry=registry)  # imports the modeling module
start = time.process_time()
checkpoint = Checkpoint.open(path, download=False)
check_structure(config, checkpoint)
parsed = time.process_time()
targets = model_tensors(model)
adapter = adapter_for(registry, plugin, config, checkpoint)
sources, checked = {name: adapter.from_hf(name) for name in targets}, set()  # as describe_checkpoint does
plan_load(targets, adapter, checkpoint, sources=sources, checked=checked)
plan_resident(model, targets, adapter, checkpoint, sources=sources, checked=checked)
done = time.process_time()
print(len(checkpoint), parsed - start, done - parsed)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each command (at least 3)")
    args = parser.parse_args()
    runs = max(args.runs, 3)
    tiny, big = ensure_tiny_checkpoint(), ensure_header_only_235b()
    cli, python = cli_command(), sys.executable
    commands = {
        PEER: [python, "-c", PEER],
        "list --config tiny": [*cli, "list", "--config", str(tiny)],
        "inspect tiny": [*cli, "inspect", str(tiny)],
        "inspect 235B": [*cli, "inspect", str(big)],
        "floor: config tiny": [python, "-c", _BUILD_CONFIG, str(tiny)],
        "floor: meta model tiny": [python, "-c", _BUILD_ON_META, str(tiny)],
        "floor: meta model 235B": [python, "-c", _BUILD_ON_META, str(big)],
    }
    env = dict(os.environ, AUTOMODEL_PLUGINS_PROGRESS="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)

    load_before = os.getloadavg()[0]
    for command in commands.values():  # warm-up: byte-compilation and the OS file cache, not counted
        timed_run(command, env)
    walls: dict[str, list[float]] = {name: [] for name in commands}
    cpus: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(runs):  # interleaved, so a busy spell hits every command alike
        for name, command in commands.items():
            wall, cpu = timed_run(command, env)
            walls[name].append(wall)
            cpus[name].append(cpu)
    imports: dict[str, list[float]] = {}
    for _ in range(runs):
        steps = subprocess.run(
            [python, "-c", _IMPORT_STEPS, str(tiny)], env=env, check=True, capture_output=True, text=True
        ).stdout
        for name, seconds in json.loads(steps):
            imports.setdefault(name, []).append(seconds)
    parse_plan = subprocess.run(
        [python, "-c", _PARSE_AND_PLAN, str(big)], env=env, check=True, capture_output=True, text=True
    ).stdout.split()

    peer_wall, peer_cpu = statistics.median(walls[PEER]), statistics.median(cpus[PEER])
    print(
        f"machine: {os.cpu_count()} CPUs; Python {sys.version.split()[0]}; {time.strftime('%Y-%m-%d %H:%M')}"
    )
    print(
        f"load average (1 min) before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f}; {runs} runs each"
    )
    print(f"AUTOMODEL_PLUGINS: {os.environ.get('AUTOMODEL_PLUGINS', '(unset: every installed plugin)')}")
    print(
        "| command | wall median (s) | CPU median (s) | wall / peer | CPU / peer | target | verdict (wall, CPU) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in commands:
        wall, cpu = statistics.median(walls[name]), statistics.median(cpus[name])
        target = TARGETS.get(name)
        verdict = (
            "-"
            if target is None
            else f"{_verdict(wall / peer_wall, target)}, {_verdict(cpu / peer_cpu, target)}"
        )
        print(
            f"| `{name}` | {wall:.2f} | {cpu:.2f} | {wall / peer_wall:.2f} | {cpu / peer_cpu:.2f} | "
            f"{'-' if target is None else f'≤ {target}'} | {verdict} |"
        )
    print(f"\nimports, in this order (CPU s added by each, median of {runs} fresh processes):")
    print("| import | CPU (s) | ÷ peer CPU |\n| --- | --- | --- |")
    for name, seconds in imports.items():
        print(f"| {name} | {statistics.median(seconds):.3f} | {statistics.median(seconds) / peer_cpu:.2f} |")
    entries, parse, plan = int(parse_plan[0]), float(parse_plan[1]), float(parse_plan[2])
    print(
        f"235B, in one process after the imports: {entries:,} header entries parsed and checked in {parse:.2f} s "
        f"CPU, both plans (dequantized, FP8-resident) in {plan:.2f} s CPU: {parse + plan:.2f} s"
    )
    return 0


def _verdict(ratio: float, target: float) -> str:
    return "PASS" if ratio <= target else "FAIL"


if __name__ == "__main__":
    raise SystemExit(main())
