"""A hostile or broken hub (or mirror) never chooses where a file is written, never makes a load read a body
without bound or wait forever: each case is served by the stand-in hub on 127.0.0.1 (its ``misbehave`` knobs),
and each test asserts the typed error and that nothing outside the cache was created or changed.

huggingface_hub names cache paths after the server's answers (``refs/<revision>``, ``snapshots/<commit>``,
``.no_exist/<commit>``, ``blobs/<etag>``, ``.locks/.../<etag>.lock``); the cases below aim each of them at
``<tmp>/target``, a file beside the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hub_checkpoints import index_of, registry, write_llama
from safetensors.torch import load_file

import automodel_plugins
from automodel_plugins.errors import (
    CorruptCheckpointError,
    HubDownloadError,
    HubOfflineError,
    HubRevisionNotFoundError,
    UnsafeCheckpointPathError,
    UnsafeHubAnswerError,
)
from automodel_plugins.sources import INDEX_NAME, HubOptions, resolve
from automodel_plugins.sources.hub_guard import DEADLINE_ENV
from automodel_plugins.testing.compare import assert_same_state_dict
from automodel_plugins.testing.fake_hub import FakeHub

PRECIOUS = b"the user's file, beside the cache\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("hostile") / "ckpt")


@pytest.fixture(scope="module")
def single_file(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tensors in one ``model.safetensors`` and no index (so a load asks for a file the repo lacks)."""
    from safetensors.torch import save_file

    directory = tmp_path_factory.mktemp("single")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(checkpoint.glob("model-*.safetensors")):
        tensors.update(load_file(shard))
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    return directory


def tree(root: Path, skip: Path) -> dict[str, tuple]:
    """Every entry under ``root`` but ``skip`` (the cache): its kind, and a file's size, mtime and content hash."""
    found: dict[str, tuple] = {}
    for directory, dirs, files in os.walk(root):
        here = Path(directory)
        dirs[:] = [d for d in dirs if here / d != skip]
        for name in dirs + files:
            path = here / name
            info = path.lstat()
            if path.is_symlink():
                found[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif path.is_file():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                found[str(path.relative_to(root))] = ("file", info.st_size, info.st_mtime_ns, digest)
            else:
                found[str(path.relative_to(root))] = ("dir",)
    return found


@pytest.fixture
def outside(fake_hub: FakeHub, tmp_path: Path) -> Callable[[], None]:
    """``<tmp>/target`` beside the cache ``<tmp>/hf-cache``; call the returned check to assert that nothing
    outside the cache was created or changed since."""
    from huggingface_hub import constants

    cache = Path(constants.HF_HUB_CACHE)
    assert cache.parent == tmp_path
    (tmp_path / "target").write_bytes(PRECIOUS)
    before = tree(tmp_path, cache)

    def check() -> None:
        assert (tmp_path / "target").read_bytes() == PRECIOUS
        assert tree(tmp_path, cache) == before

    return check


def serve(hub: FakeHub, repo_id: str, directory: Path) -> str:
    sha = hub.add_directory(repo_id, directory)
    hub.reset_counters()
    return sha


def no_hostile_refs(cache: Path) -> None:
    """No ref in the cache holds anything but a commit id."""
    for ref in cache.glob("models--*/refs/**/*"):
        if ref.is_file():
            assert len(ref.read_text()) == 40, ref


# --- 20.1: the commit, the ETag and the revision never name a path ------------------------------------------


def test_a_commit_that_is_a_path_is_refused(fake_hub: FakeHub, checkpoint: Path, outside: Callable) -> None:
    """The repo's ``sha`` is ``../../../target``: huggingface_hub would download at that "revision" and write
    the commit the file answers into ``refs/../../../target``, i.e. over ``<tmp>/target``."""
    from huggingface_hub import constants

    serve(fake_hub, "hostile/sha", checkpoint)
    fake_hub.misbehave("hostile/sha", commit="../../../target")
    with pytest.raises(
        UnsafeHubAnswerError, match=r"'\.\./\.\./\.\./target' is not a 40-hex commit"
    ) as caught:
        automodel_plugins.from_pretrained("hostile/sha", registry=registry())
    assert caught.value.repo_id == "hostile/sha"
    outside()
    no_hostile_refs(Path(constants.HF_HUB_CACHE))  # refused before huggingface_hub wrote refs/main


def test_an_x_repo_commit_that_is_a_path_is_refused(
    fake_hub: FakeHub, single_file: Path, outside: Callable
) -> None:
    """Asked at a commit, the hub answers another ``X-Repo-Commit``: huggingface_hub records a missing file
    under ``.no_exist/<that commit>/``, here ``<tmp>/escaped/``."""
    sha = serve(fake_hub, "hostile/header", single_file)
    fake_hub.misbehave("hostile/header", header_commit="../../../escaped")
    location = resolve("hostile/header", HubOptions(revision=sha))
    with pytest.raises(UnsafeHubAnswerError, match=r"X-Repo-Commit '\.\./\.\./\.\./escaped'") as caught:
        location.weights()  # asks for the index, which this repo lacks
    assert caught.value.filename == INDEX_NAME
    outside()
    # another valid commit than the one asked for is refused too (the files would land in another snapshot)
    fake_hub.misbehave("hostile/header", header_commit="0" * 40)
    with pytest.raises(UnsafeHubAnswerError, match=f"is not the commit asked for \\({sha}\\)"):
        automodel_plugins.load_config("hostile/header", revision=sha)
    outside()


@pytest.mark.parametrize(
    "etag",
    ['"../../../target"', 'W/"../../../target"', "../../../target", '"a/b"', '".."', '"..\\\\target"', '""'],
)
def test_an_etag_that_is_a_path_is_refused(
    fake_hub: FakeHub, checkpoint: Path, outside: Callable, etag: str
) -> None:
    """huggingface_hub writes the download to ``blobs/<etag>`` (and locks ``.locks/.../<etag>.lock``):
    ``../../../target`` is ``<tmp>/target``."""
    serve(fake_hub, "hostile/etag", checkpoint)
    fake_hub.misbehave("hostile/etag", etag=etag)
    with pytest.raises(UnsafeHubAnswerError, match="is not a plain token") as caught:
        automodel_plugins.from_pretrained("hostile/etag", registry=registry())
    assert caught.value.filename == "config.json"
    outside()


def test_an_unusual_but_plain_etag_loads(fake_hub: FakeHub, checkpoint: Path, outside: Callable) -> None:
    """A mirror's own ETag (S3's multipart ``<md5>-<parts>``, weak or not) is a plain token: the load works."""
    serve(fake_hub, "mirror/etag", checkpoint)
    fake_hub.misbehave("mirror/etag", etag='W/"d41d8cd98f00b204e9800998ecf8427e-5"', files=r"^config\.json$")
    model = automodel_plugins.from_pretrained("mirror/etag", registry=registry())
    reference = automodel_plugins.from_pretrained(checkpoint, registry=registry())
    assert_same_state_dict(model, reference)
    outside()


BAD_REVISIONS = [
    "../../../target",
    "refs/../../../target",
    "/tmp/target",
    "a//b",
    "main/",
    "a\\b",
    "x\0y",
    "",
    ".hidden",
    "branch.lock",
    "a b",
    "x:y",
]


@pytest.mark.parametrize("revision", BAD_REVISIONS, ids=repr)
def test_a_revision_that_names_a_path_is_refused_before_any_request(
    fake_hub: FakeHub, checkpoint: Path, outside: Callable, revision: str
) -> None:
    """Even against a mirror that answers any revision (it would make huggingface_hub write
    ``refs/../../../target``), a revision no git ref can have is refused before a request or a write."""
    serve(fake_hub, "lenient/revision", checkpoint)
    fake_hub.misbehave("lenient/revision", any_revision=True)
    with pytest.raises(HubRevisionNotFoundError, match="cannot name a branch, tag or commit") as caught:
        automodel_plugins.load_config("lenient/revision", revision=revision)
    assert caught.value.revision == revision
    assert fake_hub.requests == []
    outside()


@pytest.mark.parametrize("revision", ["refs/pr/1", "feature/fp8-v2", "v1.0", "release_2024.06"])
def test_branch_and_tag_names_the_hub_allows_load(fake_hub: FakeHub, checkpoint: Path, revision: str) -> None:
    sha = serve(fake_hub, "org/branches", checkpoint)
    fake_hub.add_ref("org/branches", revision, sha)
    location = resolve("org/branches", HubOptions(revision=revision))
    assert location.commit == sha
    assert automodel_plugins.load_config(location).model_type == "llama"


# --- 20.3: a range request never reads an unbounded body ----------------------------------------------------

EXTRA = 64 << 20  # the bytes a hostile server sends after each shard


def wait_for_records(hub: FakeHub, count: int) -> list:
    """The server's records of shard GETs, once ``count`` of them are in (a record is made when the server
    stops sending: after the whole body, or when the client hung up)."""
    for _ in range(600):
        records = [r for r in hub.requests if r.method == "GET" and ".safetensors" in r.path]
        if len(records) >= count:
            return records
        time.sleep(0.05)
    raise AssertionError(f"the server recorded {len(records)} shard GETs, not {count}")


def test_a_server_that_ignores_range_is_read_only_as_far_as_asked(
    fake_hub: FakeHub, checkpoint: Path, outside: Callable
) -> None:
    """It answers each range request with ``200`` and the whole shard: ``inspect`` reads the shard's first
    bytes, drops the connection, and describes it exactly as from a well-behaved hub. With 64 MiB more after
    each shard (its ``Content-Length`` counting them), the shard is what it says, a file whose header leaves
    64 MiB uncovered: a corrupt file, found from the first bytes, the 64 MiB never read."""
    serve(fake_hub, "org/ranged", checkpoint)
    expected = automodel_plugins.describe_checkpoint("org/ranged", registry=registry())
    serve(fake_hub, "lenient/norange", checkpoint)
    fake_hub.misbehave("lenient/norange", ignore_range=True, files=r"\.safetensors$")
    described = automodel_plugins.describe_checkpoint("lenient/norange", registry=registry())
    assert described["load"] == expected["load"] and described["checkpoint"] == expected["checkpoint"]
    assert all(r.status == 200 for r in wait_for_records(fake_hub, 6))

    serve(fake_hub, "hostile/norange", checkpoint)
    fake_hub.misbehave("hostile/norange", ignore_range=True, extra_bytes=EXTRA, files=r"\.safetensors$")
    with pytest.raises(CorruptCheckpointError, match=f"data section has {EXTRA} trailing bytes"):
        automodel_plugins.describe_checkpoint("hostile/norange", registry=registry())
    records = wait_for_records(fake_hub, 2)  # the 8-byte length, then the header, of the first shard checked
    assert all(r.status == 200 for r in records)
    # what the server managed to send before the client hung up: socket buffers, not the 64 MiB that followed
    assert max(r.body_bytes for r in records) < 16 << 20 < EXTRA
    outside()


def test_a_range_answer_of_other_bytes_is_refused(fake_hub: FakeHub, checkpoint: Path) -> None:
    serve(fake_hub, "hostile/badrange", checkpoint)
    fake_hub.add_override(
        r"/hostile/badrange/resolve/[^/]+/model-00001",
        206,
        {"Content-Range": "bytes 4-11/1000"},
        b"\0" * 8,
        method="GET",
    )
    with pytest.raises(HubDownloadError, match=r"asked for bytes 0-7.*'bytes 4-11/1000'") as caught:
        automodel_plugins.describe_checkpoint("hostile/badrange", registry=registry())
    assert caught.value.filename.startswith("model-00001")


# --- 20: truncated, hung and trickling downloads ------------------------------------------------------------


def test_a_truncated_download_names_the_file_and_the_byte_counts(
    fake_hub: FakeHub, checkpoint: Path, outside: Callable
) -> None:
    """A mirror holding a cut copy of a shard (its metadata announces the whole size): a download error that
    says how many bytes came, not "the hub cannot be reached"."""
    serve(fake_hub, "mirror/truncated", checkpoint)
    shard = sorted(set(index_of(checkpoint).values()))[0]
    size = (checkpoint / shard).stat().st_size
    fake_hub.misbehave("mirror/truncated", body_bytes=1000, files=shard)
    with pytest.raises(HubDownloadError) as caught:
        automodel_plugins.from_pretrained("mirror/truncated", registry=registry())
    error = caught.value
    assert not isinstance(error, HubOfflineError)
    assert error.filename == shard and f"1000 bytes received of the {size} announced" in str(error)
    outside()


def test_a_body_longer_than_announced_is_cut(fake_hub: FakeHub, checkpoint: Path, outside: Callable) -> None:
    serve(fake_hub, "hostile/longer", checkpoint)
    shard = sorted(set(index_of(checkpoint).values()))[0]
    fake_hub.misbehave("hostile/longer", extra_bytes=EXTRA, files=shard)
    with pytest.raises(UnsafeHubAnswerError, match=r"sent more than the \d+ bytes it announced") as caught:
        automodel_plugins.from_pretrained("hostile/longer", registry=registry())
    assert caught.value.filename == shard
    records = wait_for_records(fake_hub, 1)
    assert max(r.body_bytes for r in records) < 16 << 20
    outside()


def test_a_hung_mirror_fails_within_the_file_deadline(
    fake_hub: FakeHub, checkpoint: Path, monkeypatch: pytest.MonkeyPatch, outside: Callable
) -> None:
    """It accepts the connection and never answers. Without a bound, huggingface_hub waits its metadata
    timeout, then retries six times with 60 s each; here every wait is capped by ``HF_HUB_ETAG_TIMEOUT`` and
    the file's deadline."""
    from huggingface_hub import constants

    sha = serve(fake_hub, "mirror/hung", checkpoint)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 0.5)
    monkeypatch.setenv(DEADLINE_ENV, "2")
    fake_hub.misbehave("mirror/hung", stall=120)
    with pytest.raises(HubDownloadError, match=f"2 s deadline \\({DEADLINE_ENV}") as caught:
        automodel_plugins.load_config("mirror/hung", revision=sha)
    assert caught.value.filename == "config.json" and "0 bytes received" in str(caught.value)
    outside()


def test_a_trickling_mirror_fails_within_the_file_deadline(
    fake_hub: FakeHub, checkpoint: Path, monkeypatch: pytest.MonkeyPatch, outside: Callable
) -> None:
    """It sends 128 bytes every 50 ms: never slow enough for a read timeout, a shard would take tens of
    seconds. The deadline stops it and says how far it got."""
    serve(fake_hub, "mirror/trickle", checkpoint)
    shard = sorted(set(index_of(checkpoint).values()))[0]
    size = (checkpoint / shard).stat().st_size
    assert size > 128 * 20 * 5  # more than 5 s of trickle
    monkeypatch.setenv(DEADLINE_ENV, "2")
    fake_hub.misbehave("mirror/trickle", chunk_size=128, chunk_delay=0.05, files=shard)
    with pytest.raises(HubDownloadError, match=f"2 s deadline \\({DEADLINE_ENV}") as caught:
        automodel_plugins.from_pretrained("mirror/trickle", registry=registry())
    assert caught.value.filename == shard and f"of the {size} announced" in str(caught.value)
    outside()


def test_a_bad_deadline_setting_is_named(
    fake_hub: FakeHub, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve(fake_hub, "org/deadline", checkpoint)
    monkeypatch.setenv(DEADLINE_ENV, "soon")
    with pytest.raises(HubDownloadError, match=f"{DEADLINE_ENV}='soon' is not a number of seconds"):
        automodel_plugins.load_config("org/deadline")


# --- a backslash in a hub index --------------------------------------------------------------------------


def test_a_backslash_in_a_hub_weight_map_is_refused(fake_hub: FakeHub, checkpoint: Path) -> None:
    weight_map = index_of(checkpoint)
    key = sorted(weight_map)[0]
    index = {"metadata": {}, "weight_map": {**weight_map, key: "..\\..\\model-00001-of-00003.safetensors"}}
    fake_hub.add_directory("hostile/backslash", checkpoint, extra={INDEX_NAME: json.dumps(index).encode()})
    fake_hub.reset_counters()
    with pytest.raises(UnsafeCheckpointPathError, match="backslash") as caught:
        automodel_plugins.describe_checkpoint("hostile/backslash", registry=registry())
    assert caught.value.key == key and caught.value.path.name == INDEX_NAME
    assert fake_hub.requests_for("hostile/backslash", "..\\..\\model-00001-of-00003.safetensors") == 0


def test_the_stock_path_fetches_through_the_same_checks(
    fake_hub: FakeHub, outside: Callable, unquantized_checkpoint_factory: Callable[..., Path]
) -> None:
    """No plugin claims the config: transformers loads the repo, but its weights come through the same checks
    (an ETag aimed at ``<tmp>/target`` is refused), and an honest repo loads as stock loads the directory."""
    from transformers import LlamaForCausalLM

    from automodel_plugins.registry import Registry
    from automodel_plugins.testing.tiny_models import tiny_llama_config

    torch.manual_seed(0)
    unquantized = unquantized_checkpoint_factory(LlamaForCausalLM(tiny_llama_config()))
    serve(fake_hub, "stock/honest", unquantized)
    model = automodel_plugins.from_pretrained("stock/honest", registry=Registry())
    assert_same_state_dict(model, automodel_plugins.from_pretrained(unquantized, registry=Registry()))
    serve(fake_hub, "stock/etag", unquantized)
    fake_hub.misbehave("stock/etag", etag='"../../../target"', files=r"\.safetensors$")
    with pytest.raises(UnsafeHubAnswerError, match="is not a plain token") as caught:
        automodel_plugins.from_pretrained("stock/etag", registry=Registry())
    assert caught.value.filename == "model.safetensors"
    outside()


def test_the_body_bound_follows_a_redirect_to_the_cdn(
    fake_hub: FakeHub, checkpoint: Path, outside: Callable
) -> None:
    """The hub answers a shard's metadata with a redirect to another origin (as the real hub's CDN): the body
    that comes from there is bounded by the size the hub announced."""
    serve(fake_hub, "hostile/cdn", checkpoint)
    fake_hub.lfs_redirect = True
    shard = sorted(set(index_of(checkpoint).values()))[0]
    fake_hub.misbehave("hostile/cdn", extra_bytes=EXTRA, files=shard)
    with pytest.raises(UnsafeHubAnswerError, match=r"sent more than the \d+ bytes it announced") as caught:
        automodel_plugins.from_pretrained("hostile/cdn", registry=registry())
    assert caught.value.filename == shard
    assert max(r.body_bytes for r in wait_for_records(fake_hub, 1)) < 16 << 20
    outside()


def test_a_backslash_in_a_local_weight_map_is_refused(checkpoint: Path, tmp_path: Path) -> None:
    from automodel_plugins.checkpoint import Checkpoint

    local = tmp_path / "ckpt"
    local.mkdir()
    for file in checkpoint.iterdir():
        (local / file.name).write_bytes(file.read_bytes())
    weight_map = index_of(checkpoint)
    key = sorted(weight_map)[-1]
    index = {"metadata": {}, "weight_map": {**weight_map, key: "sub\\model-00001-of-00003.safetensors"}}
    (local / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(UnsafeCheckpointPathError, match="contains a backslash") as caught:
        Checkpoint.open(local)
    assert caught.value.key == key and caught.value.path == local / INDEX_NAME
