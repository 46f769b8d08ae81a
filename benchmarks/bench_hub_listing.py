"""How large a big repo's metadata answers are: what ``AUTOMODEL_PLUGINS_METADATA_BYTES`` (default 64 MiB) must
leave room for.

A repo of ``--files`` files (default 100,000, LFS, 60-character paths such as a sharded dataset's) is served by
the stand-in hub (127.0.0.1 only), which answers in the hub's JSON format; the real hub adds a 64-hex
``xetHash`` to each file of a tree listing, added here to the count. Prints the bytes of the recursive tree
listing (unpaginated: the real hub pages it, so each answer is smaller) and of the repo info (with and without
``blobs=true``).

    python benchmarks/bench_hub_listing.py [--files 100000]
"""

from __future__ import annotations

import argparse
import json
import urllib.request

from automodel_plugins.testing.fake_hub import FakeHub


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    count = parser.parse_args().files
    files = {
        f"data/train/shard-{i // 1000:05d}/part-{i:06d}-of-{count:06d}.safetensors": b"x"
        for i in range(count)
    }
    with FakeHub() as hub:
        hub.add_repo("org/big", files)
        base = f"{hub.url}/api/models/org/big"
        tree = urllib.request.urlopen(f"{base}/tree/main?recursive=true").read()
        info = urllib.request.urlopen(f"{base}/revision/main").read()
        blobs = urllib.request.urlopen(f"{base}/revision/main?blobs=true").read()
    listed = sum(entry["type"] == "file" for entry in json.loads(tree))
    xet = listed * (len(',"xetHash":""') + 64)
    print(f"{listed} files")
    print(
        f"tree listing: {len(tree) / 1e6:.1f} MB ({len(tree) / listed:.0f} B/file); with xetHash {(len(tree) + xet) / 1e6:.1f} MB"
    )
    print(f"repo info: {len(info) / 1e6:.1f} MB; with blobs=true {len(blobs) / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
