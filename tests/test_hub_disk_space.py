"""A hub cannot make a load fill the cache's disk: a file the hub announces larger than the free space (with the
rest of the load still to download) is refused before its body is asked for, and a shard whose header was read
by range requests must be announced at the size that header accounts for.

No test fills a disk: the cache's filesystem stands for a small one (``hub_space.free_bytes`` replaced by its
capacity less what the cache holds), and the stand-in hub on 127.0.0.1 announces sizes it never sends.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hub_checkpoints import index_of, registry, weights_bytes, write_llama

import automodel_plugins
from automodel_plugins import Checkpoint
from automodel_plugins.errors import HubDiskSpaceError, HubDownloadError, UnsafeHubAnswerError
from automodel_plugins.sources import hub_space
from automodel_plugins.testing.fake_hub import FakeHub

TERABYTE = 1 << 40
GB = 1000**3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("space") / "ckpt")


def shards_of(directory: Path) -> list[str]:
    return sorted(set(index_of(directory).values()))


def held(cache: Path) -> int:
    """Bytes the cache's files take: blobs and partial downloads (links, refs and locks left out)."""
    return sum(p.stat().st_size for p in cache.glob("*/blobs/*") if p.is_file())


def small_disk(monkeypatch: pytest.MonkeyPatch, capacity: int) -> Path:
    """The cache's filesystem as a disk of ``capacity`` bytes: free is that less what the cache's blobs hold."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    monkeypatch.setattr(hub_space, "free_bytes", lambda path: capacity - held(cache))
    return cache


def serve(hub: FakeHub, repo_id: str, directory: Path) -> None:
    hub.add_directory(repo_id, directory)
    hub.reset_counters()


@pytest.mark.parametrize("announced", [40 * GB, TERABYTE], ids=["40GB", "1TB"])
def test_a_shard_larger_than_the_disk_is_refused_before_its_body(
    fake_hub: FakeHub, checkpoint: Path, monkeypatch: pytest.MonkeyPatch, announced: int
) -> None:
    """Every shard announced as 40 GB (under huggingface_hub's 50 GB plain-HTTP limit: it would only warn and
    download until the disk is full) or 1 TB on a 1 GiB disk: refused at the first shard's ``HEAD``, naming the
    repo, the file, the bytes announced and free."""
    repo = f"space/huge-{announced}"
    serve(fake_hub, repo, checkpoint)
    fake_hub.misbehave(repo, announced_size=announced, files=r"\.safetensors$")
    cache = small_disk(monkeypatch, 1 << 30)
    with pytest.raises(
        HubDiskSpaceError, match=rf"announces {announced} bytes.* bytes free on the cache's"
    ) as e:
        automodel_plugins.from_pretrained(repo, registry=registry())
    assert e.value.repo_id == repo
    assert e.value.filename in shards_of(checkpoint)
    assert e.value.announced == announced
    assert 0 < e.value.free <= 1 << 30
    for shard in shards_of(checkpoint):
        assert fake_hub.bytes_for(repo, shard) == 0, shard
    assert not list(cache.rglob("*.incomplete"))


def test_a_shard_past_the_plain_http_limit_is_a_typed_error(
    fake_hub: FakeHub, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a disk that holds it, a 1 TB shard is past the 50 GB huggingface_hub downloads over plain HTTP (the
    only way checked downloads go): a typed error naming the file, not huggingface_hub's bare ``ValueError``."""
    serve(fake_hub, "space/past-http", checkpoint)
    fake_hub.misbehave("space/past-http", announced_size=TERABYTE, files=r"\.safetensors$")
    small_disk(monkeypatch, 4 * TERABYTE)  # room for all three shards
    with pytest.raises(
        HubDownloadError, match=rf"announces {TERABYTE} bytes, more than the \d+ that huggingface"
    ):
        automodel_plugins.from_pretrained("space/past-http", registry=registry())
    for shard in shards_of(checkpoint):
        assert fake_hub.bytes_for("space/past-http", shard) == 0, shard


@pytest.mark.parametrize("slack", [-1, 0], ids=["one-byte-short", "exact-fit"])
def test_a_load_whose_shards_do_not_fit_together_is_refused(
    fake_hub: FakeHub, checkpoint: Path, monkeypatch: pytest.MonkeyPatch, slack: int
) -> None:
    """Shards announced honestly, each smaller than the free space, but not all of them together: refused (one
    byte short; at the ``HEAD`` of the last shard to start at the latest, as this path reads no header first, so
    earlier shards may be in the cache by then); an exact fit loads, the cached shards equal to the source's."""
    serve(fake_hub, "space/together", checkpoint)
    cache = small_disk(monkeypatch, sum(weights_bytes(checkpoint).values()) + slack)
    if slack < 0:
        with pytest.raises(HubDiskSpaceError, match=r"bytes free on the cache's filesystem"):
            automodel_plugins.from_pretrained("space/together", registry=registry())
        return
    model = automodel_plugins.from_pretrained("space/together", registry=registry())
    assert model.config.num_hidden_layers > 0
    snapshot = next(cache.glob("models--space--together/snapshots/*"))
    for shard in shards_of(checkpoint):
        assert (snapshot / shard).read_bytes() == (checkpoint / shard).read_bytes()


@pytest.mark.parametrize("slack", [-1, 0], ids=["one-byte-short", "exact-fit"])
def test_shards_of_read_headers_are_checked_together_before_any_request(
    fake_hub: FakeHub, checkpoint: Path, monkeypatch: pytest.MonkeyPatch, slack: int
) -> None:
    """Where the headers were read first (by range requests: inspect, a pipeline stage's plan, the stock path),
    every shard's size is known: those that do not fit together are refused before any of them is asked for."""
    serve(fake_hub, "space/headers", checkpoint)
    shards = shards_of(checkpoint)
    with Checkpoint.open("space/headers", download=False) as opened:
        location = opened.location
        assert location is not None
        from huggingface_hub import constants

        capacity = held(Path(constants.HF_HUB_CACHE)) + sum((checkpoint / s).stat().st_size for s in shards)
        small_disk(monkeypatch, capacity + slack)
        fake_hub.reset_counters()
        if slack < 0:
            with pytest.raises(HubDiskSpaceError, match=r"with the \d+ bytes this load still downloads") as e:
                location.fetch(shards)
            assert e.value.filename == shards[-1]
            assert all(fake_hub.requests_for("space/headers", s) == 0 for s in shards)
            return
        location.fetch(shards)
    for shard in shards:
        assert (location.directory / shard).read_bytes() == (checkpoint / shard).read_bytes()


def test_a_shard_announced_past_its_header_is_refused_before_its_body(
    fake_hub: FakeHub, checkpoint: Path
) -> None:
    """The range requests gave a size the shard's header tiles exactly (8 + header + the data its tensors
    declare); the ``HEAD`` before the download announces one byte more: refused, the body never asked for."""
    serve(fake_hub, "space/liar", checkpoint)
    shard = shards_of(checkpoint)[0]
    size = (checkpoint / shard).stat().st_size
    with Checkpoint.open("space/liar", download=False) as opened:
        location = opened.location
        assert location is not None
        fake_hub.misbehave("space/liar", announced_size=size + 1, files=shard)
        fake_hub.reset_counters()
        with pytest.raises(
            UnsafeHubAnswerError,
            match=rf"announces {size + 1} bytes, but its range requests gave {size} bytes, which its safetensors "
            r"header accounts for",
        ) as e:
            location.fetch([shard])
    assert e.value.filename == shard
    assert fake_hub.bytes_for("space/liar", shard) == 0


def test_a_file_already_cached_by_another_revision_needs_no_room(
    fake_hub: FakeHub, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A second revision holding the same files (the same blobs) loads on a full disk: its files are only
    linked to the blobs already in the cache, so none of them counts."""
    fake_hub.add_directory("space/revisions", checkpoint)
    fake_hub.add_directory("space/revisions", checkpoint, extra={"notes.json": b"{}"}, revision="v2")
    automodel_plugins.from_pretrained("space/revisions", registry=registry())
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    small_disk(monkeypatch, held(cache))  # no byte free
    fake_hub.reset_counters()
    automodel_plugins.from_pretrained("space/revisions", revision="v2", registry=registry())
    for shard in shards_of(checkpoint):
        assert fake_hub.requests_for("space/revisions", shard, "HEAD") == 1, shard
        assert fake_hub.bytes_for("space/revisions", shard) == 0, shard
    assert len(list(cache.glob("models--space--revisions/snapshots/*"))) == 2
