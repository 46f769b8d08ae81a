"""What a server that ignores ``Range`` costs ``inspect``: bytes it sends and the memory a describe holds.

A tiny FP8 Llama (3 shards + index) is served by the stand-in hub (127.0.0.1 only), which answers every range
request for a shard with ``200``, the whole shard and ``--extra`` MiB of zeros after it (``Content-Length``
counting them). ``describe_checkpoint(repo)`` must read only the bytes it asks for (each shard's first
``8 + header length``) and drop the connection; the shard is then a corrupt file (its header leaves the extra
bytes uncovered), found from those first bytes.

Figures: shard GETs, the most and the total body bytes the server got out before the client hung up, and how far
the process's peak RSS grew during the describe. Target: the most per request < 16 MiB whatever ``--extra`` is,
RSS growth < 64 MiB. Prints the figures and PASS/FAIL; never asserts.

    python benchmarks/bench_hub_hostile.py [--extra 1024]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", type=int, default=1024, help="MiB the server sends after each shard")
    args = parser.parse_args()

    from hub_checkpoints import registry, write_llama
    from huggingface_hub import constants

    import automodel_plugins
    from automodel_plugins.errors import CorruptCheckpointError
    from automodel_plugins.testing.fake_hub import FakeHub

    extra = args.extra << 20
    tmp = Path(tempfile.mkdtemp(prefix="bench-hub-hostile-"))
    checkpoint = write_llama(tmp / "ckpt")
    constants.HF_HUB_CACHE = str(tmp / "cache")
    with FakeHub() as hub, hub.patch_endpoint():
        hub.add_directory("hostile/norange", checkpoint)
        hub.misbehave("hostile/norange", ignore_range=True, extra_bytes=extra, files=r"\.safetensors$")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        outcome = "described"
        try:
            automodel_plugins.describe_checkpoint("hostile/norange", registry=registry())
        except CorruptCheckpointError as exc:
            outcome = f"CorruptCheckpointError ({str(exc).rpartition(': ')[2]})"
        time.sleep(1)  # the server records a request once it stops sending
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        sent = [r.body_bytes for r in hub.requests if r.method == "GET" and ".safetensors" in r.path]
    most = max(sent) / 2**20
    print(f"extra {args.extra} MiB per shard: {outcome}")
    print(
        f"shard GETs {len(sent)}; server sent at most {most:.2f} MiB per request, {sum(sent) / 2**20:.2f} MiB"
    )
    print(f"peak RSS grew {grown:.0f} MiB")
    print("PASS" if most < 16 and grown < 64 else "FAIL")


if __name__ == "__main__":
    main()
