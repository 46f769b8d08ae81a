"""Bytes a load from a hub repo id downloads, against what it needs and against ``snapshot_download``.

The benchmark's FP8 Mistral3 checkpoint (``benchmarks/_checkpoint.py``: ~0.35B parameters, 3 shards + index,
generated once) is served by the stand-in hub (``automodel_plugins.testing.fake_hub``, 127.0.0.1 only) as a
Mistral repo is: beside the HF shards a Mistral-native ``consolidated.safetensors`` holding every tensor again
and a ``params.json``. Every response body byte the hub sends is counted (files, range requests, API answers).

* load: ``automodel_plugins.from_pretrained(repo)`` into an empty cache; bytes sent / bytes of the files a load
  needs (``config.json``, the index, the shards it names). Target **1.00**. The loaded model must equal the
  local-directory load bit for bit.
* peer: ``huggingface_hub.snapshot_download(repo)`` into another empty cache, the same ratio (about 2.0).
* second load from the now-filled cache: bytes sent (target: no file bytes).
* inspect: ``describe_checkpoint(repo)`` into an empty cache; bytes sent / checkpoint (shard) bytes.
  Target **< 0.001**; tensor data bytes sent must be 0.

Prints the figures and PASS/FAIL; never asserts, so it can run anywhere and be read.

    python benchmarks/bench_hub.py [--kind per-tensor|block] [--path DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # read at import: no request to the real hub, ever
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _checkpoint import ensure_checkpoint

REPO = "bench/mistral3-fp8"
LOAD_TARGET = 1.00
INSPECT_TARGET = 0.001


def consolidated(path: Path, scratch: Path) -> bytes:
    """Every tensor of the checkpoint in one safetensors file, as Mistral repos ship ``consolidated``."""
    from safetensors.torch import load_file, save_file

    tensors = {}
    for shard in sorted(path.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
    target = scratch / "consolidated.safetensors"
    save_file(tensors, target)
    del tensors
    return target.read_bytes()


def header_bytes(file: Path) -> int:
    with open(file, "rb") as fh:
        return 8 + struct.unpack("<Q", fh.read(8))[0]


def same_model(ours, expected) -> bool:
    import torch

    a, b = ours.state_dict(), expected.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--kind", default="per-tensor", choices=["per-tensor", "block"])
    parser.add_argument("--path", type=Path, help="another checkpoint directory to serve")
    args = parser.parse_args()
    path = args.path or ensure_checkpoint(args.kind)

    from huggingface_hub import constants, snapshot_download

    import automodel_plugins
    from automodel_plugins.sources import load_config
    from automodel_plugins.testing.fake_hub import FakeHub

    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    needed = ["config.json", "model.safetensors.index.json", *shards]
    needed_bytes = sum((path / n).stat().st_size for n in needed)
    shard_bytes = sum((path / n).stat().st_size for n in shards)
    scratch = Path(tempfile.mkdtemp(prefix="bench-hub-"))
    constants.HF_HUB_OFFLINE = False
    constants.HF_HUB_DISABLE_TELEMETRY = True
    try:
        extra = {"consolidated.safetensors": consolidated(path, scratch), "params.json": b'{"dim": 2048}'}
        with FakeHub() as hub, hub.patch_endpoint():
            hub.add_directory(REPO, path, extra=extra)
            repo_bytes = sum((path / n).stat().st_size for n in os.listdir(path)) + sum(
                map(len, extra.values())
            )
            rows: dict[str, tuple[int, float]] = {}

            def measure(label: str, call) -> object:
                hub.reset_counters()
                started = time.perf_counter()
                result = call()
                rows[label] = (hub.response_bytes, time.perf_counter() - started)
                return result

            description = measure(
                "inspect", lambda: automodel_plugins.describe_checkpoint(REPO, cache_dir=scratch / "inspect")
            )
            tensor_bytes_inspect = sum(
                hub.bytes_for(REPO, n) - min(hub.bytes_for(REPO, n), header_bytes(path / n)) for n in shards
            )
            model = measure(
                "load",
                lambda: automodel_plugins.from_pretrained(REPO, cache_dir=scratch / "ours", progress=False),
            )
            fetched = sorted(k.split(":", 1)[1] for k in hub.bytes_served["files"])
            measure(
                "second load",
                lambda: automodel_plugins.from_pretrained(REPO, cache_dir=scratch / "ours", progress=False),
            )
            second_file_bytes = hub.bytes_served["total"]
            measure("snapshot_download", lambda: snapshot_download(REPO, cache_dir=scratch / "peer"))
        exact = same_model(model, automodel_plugins.from_pretrained(path, progress=False))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    params = sum(p.numel() for p in model.parameters())
    print(f"checkpoint: {path} ({load_config(path).model_type}, {params / 1e9:.3f}B parameters)")
    print(
        f"served repo: {repo_bytes / 2**20:.1f} MiB (shards {shard_bytes / 2**20:.1f} MiB, "
        f"consolidated.safetensors {len(extra['consolidated.safetensors']) / 2**20:.1f} MiB, config, index, params)"
    )
    print(f"a load needs {needed_bytes / 2**20:.1f} MiB: {', '.join(needed)}")
    print()
    print(f"{'call':20s} {'bytes sent':>14s} {'÷ needed':>10s} {'÷ shards':>10s} {'seconds':>8s}")
    for label, (sent, seconds) in rows.items():
        print(
            f"{label:20s} {sent:14,d} {sent / needed_bytes:10.4f} {sent / shard_bytes:10.6f} {seconds:8.2f}"
        )
    print()
    load_ratio = rows["load"][0] / needed_bytes
    peer_ratio = rows["snapshot_download"][0] / needed_bytes
    inspect_ratio = rows["inspect"][0] / shard_bytes
    print(f"files the load fetched: {', '.join(fetched)}")
    print(
        f"inspect: tensor data bytes sent {tensor_bytes_inspect}; says a load downloads "
        f"{description['hub']['download_bytes']:,d} B, leaves {sorted(description['hub']['not_downloaded'])}"
    )
    print(f"load equals the local-directory load bit for bit: {exact}")
    load_ok = load_ratio <= LOAD_TARGET + 0.005 and "consolidated.safetensors" not in fetched and exact
    print(
        f"{'PASS' if load_ok else 'FAIL'}: load downloads {load_ratio:.4f} x the bytes it needs "
        f"(target {LOAD_TARGET:.2f}); snapshot_download {peer_ratio:.4f} x"
    )
    inspect_ok = inspect_ratio < INSPECT_TARGET and tensor_bytes_inspect == 0
    print(
        f"{'PASS' if inspect_ok else 'FAIL'}: inspect downloads {inspect_ratio:.6f} x the checkpoint bytes "
        f"(target < {INSPECT_TARGET})"
    )
    print(
        f"{'PASS' if second_file_bytes == 0 else 'FAIL'}: a second load downloads {second_file_bytes} file bytes"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
