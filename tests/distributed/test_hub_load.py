"""Loads from a hub repo id on 2 ranks of one machine (one cache), against the stand-in hub the pytest process
serves on 127.0.0.1: one rank asks for the commit and downloads each file once while the other waits, and
neither fetches the ``consolidated.safetensors`` the repo also carries."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from ._tiny import HUB_REPOS

pytestmark = pytest.mark.distributed

SCENARIOS = tuple(HUB_REPOS)

NEEDED = (
    "config.json",
    "model.safetensors.index.json",
    *(f"model-0000{i}-of-00002.safetensors" for i in (1, 2)),
)


def requests(run: Any, repo: str) -> Counter:
    """(method, file or API, ranged) -> count, for one repo."""
    counts: Counter = Counter()
    for record in run.hub_requests:
        path = record.path.split("?")[0]
        if path.startswith(f"/api/models/{repo}"):
            counts["GET", "api", False] += 1
        elif path.startswith(f"/{repo}/resolve/") or (record.server == "cdn" and repo in record.path):
            counts[record.method, path.rsplit("/", 1)[-1], record.range is not None] += 1
    return counts


def test_both_ranks_load_the_model_from_the_repo(distributed_run) -> None:
    for scenario in ("hub_fsdp", "hub_pipeline"):
        for rank, result in enumerate(distributed_run.ranks(scenario)):
            assert result["tensors"] > 0, f"{scenario} rank {rank}"
            assert result["local_mismatches"] == [], f"{scenario} rank {rank}"
    for rank, result in enumerate(distributed_run.ranks("hub_fsdp")):
        assert result["full_mismatches"] == [], f"rank {rank}"
        assert result["name_or_path"] == HUB_REPOS["hub_fsdp"]


def test_one_download_per_file_and_no_request_from_the_other_rank(distributed_run) -> None:
    distributed_run.ranks("hub_fsdp")  # fails with the ranks' errors first, if any
    counts = requests(distributed_run, HUB_REPOS["hub_fsdp"])
    for name in NEEDED:
        assert counts["GET", name, False] == 1, (name, counts)
        assert counts["HEAD", name, False] == 1, (name, counts)
    # build_model and load_weights each ask for the commit once, from one rank.
    assert counts["GET", "api", False] == 2, counts
    assert not any(name == "consolidated.safetensors" for _, name, _ in counts)
    assert sum(counts.values()) == 2 + 2 * len(NEEDED), counts


def test_stages_read_the_headers_once_and_download_each_shard_once(distributed_run) -> None:
    distributed_run.ranks("hub_pipeline")
    counts = requests(distributed_run, HUB_REPOS["hub_pipeline"])
    for name in NEEDED[2:]:
        assert counts["GET", name, True] == 2, (name, counts)  # the 8-byte length, then the header
        assert counts["GET", name, False] == 1, (name, counts)  # both stages need both shards: once
    assert not any(name == "consolidated.safetensors" for _, name, _ in counts)


def test_one_rank_alone_loads_a_repo_with_collective_false(distributed_run) -> None:
    loader, idle = distributed_run.ranks("hub_one_rank")
    assert loader["loaded"] and loader["tensors"] > 0 and loader["local_mismatches"] == []
    assert not idle["loaded"]
    counts = requests(distributed_run, HUB_REPOS["hub_one_rank"])
    for name in NEEDED:
        assert counts["GET", name, False] == 1, (name, counts)
    assert counts["GET", "api", False] == 1, counts
