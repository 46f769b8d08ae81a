"""A hostile hub's metadata answers (repo info, tree listings, redirects), Xet announcements and the cache's
tree listings cannot make a load read without bound, wait without end, or leave the endpoint; and the hooks
that check all this are installed through huggingface_hub's public client factory, or not at all (a typed
error, never an unguarded download).

Each case is served by the stand-in hub on 127.0.0.1 (``fake_hub.misbehave`` / ``add_override``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from hub_checkpoints import index_of, registry, write_llama
from test_hub_hostile import PRECIOUS, outside, serve  # noqa: F401 - outside is a fixture

import automodel_plugins
from automodel_plugins.errors import HubDownloadError, HubGuardUnavailableError, UnsafeHubAnswerError
from automodel_plugins.sources import HubOptions, resolve
from automodel_plugins.sources.hub_guard import METADATA_BYTES_ENV, METADATA_DEADLINE_ENV
from automodel_plugins.testing.compare import assert_same_state_dict
from automodel_plugins.testing.fake_hub import FakeHub

MIB = 1 << 20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama(tmp_path_factory.mktemp("bounds") / "ckpt")


def api_records(hub: FakeHub, part: str) -> list:
    return [r for r in hub.requests if r.path.startswith("/api/") and part in r.path]


# --- metadata answers are bounded in size ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("how", "said"),
    [
        # no Content-Length, no end in sight: read up to the limit
        (
            {"api_padding": 64 * MIB, "api_chunked": True},
            f"goes past the {MIB} bytes that one call's answers may take together",
        ),
        # an honest, gigantic Content-Length: refused from the header
        (
            {"api_padding": 64 * MIB},
            rf"announces \d+ bytes, more than the \d+ left of the {MIB} bytes that one call's answers may take together",
        ),
    ],
    ids=["chunked", "gigantic"],
)
def test_an_endless_repo_info_is_cut_at_the_metadata_limit(
    fake_hub: FakeHub,
    checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    outside: Callable,  # noqa: F811
    how: dict,
    said: str,
) -> None:
    """The repo info answer (what a branch resolves through) is valid JSON followed by 64 MiB of spaces: read
    whole, it would load. At a 1 MiB limit the read stops there, with the repo and the endpoint named."""
    serve(fake_hub, "hostile/endless", checkpoint)
    monkeypatch.setenv(METADATA_BYTES_ENV, str(MIB))
    fake_hub.misbehave("hostile/endless", **how)
    with pytest.raises(UnsafeHubAnswerError, match=rf"{said} \(?{METADATA_BYTES_ENV}") as caught:
        automodel_plugins.load_config("hostile/endless")
    assert caught.value.repo_id == "hostile/endless"
    assert "the answer to GET /api/models/hostile/endless " in str(caught.value)
    records = api_records(fake_hub, "/api/models/hostile/endless")
    assert records and max(r.body_bytes for r in records) < 16 * MIB  # socket buffers, not the 64 MiB
    outside()


def test_a_lying_content_length_is_refused_before_reading(
    fake_hub: FakeHub, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repo info announced as 1 TB (the body is short: a client trusting the length would wait for the rest,
    then read whatever comes): refused from the header, the body never read."""
    serve(fake_hub, "hostile/liar", checkpoint)
    fake_hub.misbehave("hostile/liar", api_content_length=1 << 40)
    with pytest.raises(
        UnsafeHubAnswerError,
        match=r"announces 1099511627776 bytes, more than the \d+ left of the 67108864 bytes",
    ):
        automodel_plugins.load_config("hostile/liar")


def test_an_endless_tree_listing_is_cut_at_the_metadata_limit(
    fake_hub: FakeHub, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``inspect`` lists the repo's files (what a load leaves on the hub): the listing is bounded the same way,
    also when the commit is given (no repo info asked)."""
    sha = serve(fake_hub, "hostile/tree", checkpoint)
    monkeypatch.setenv(METADATA_BYTES_ENV, str(MIB))
    fake_hub.misbehave("hostile/tree", api_padding=64 * MIB, api_chunked=True)
    with pytest.raises(
        UnsafeHubAnswerError, match=rf"GET /api/models/hostile/tree/tree/{sha} goes past the {MIB} bytes"
    ):
        automodel_plugins.describe_checkpoint("hostile/tree", revision=sha, registry=registry())
    assert max(r.body_bytes for r in api_records(fake_hub, "/tree/")) < 16 * MIB


def test_an_endless_pagination_of_a_tree_listing_ends(
    fake_hub: FakeHub, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every page of the listing is empty and links to a next one: each answer is tiny, their number has no
    end (here 500, then the honest listing). The pages of one listing share the metadata limit, each answer
    counting 1 KiB: at 64 KiB, at most 64 pages are read."""
    sha = serve(fake_hub, "hostile/pages", checkpoint)
    monkeypatch.setenv(METADATA_BYTES_ENV, str(64 << 10))
    page = f"{fake_hub.url}/api/models/hostile/pages/tree/{sha}?recursive=true&cursor=x"
    fake_hub.add_override(
        r"^/api/models/hostile/pages/tree/", 200, {"Link": f'<{page}>; rel="next"'}, b"[]", times=500
    )
    with pytest.raises(UnsafeHubAnswerError, match=r"tree/\w+ goes past the 65536 bytes"):
        automodel_plugins.describe_checkpoint("hostile/pages", revision=sha, registry=registry())
    assert len(api_records(fake_hub, "/tree/")) <= 64


def test_a_pagination_link_to_another_origin_is_refused(fake_hub: FakeHub, checkpoint: Path) -> None:
    """The next page of a listing is fetched where the hub's ``Link`` header says: not off the endpoint."""
    sha = serve(fake_hub, "hostile/pagelink", checkpoint)
    page = f"{fake_hub.cdn_url}/api/models/hostile/pagelink/tree/{sha}?cursor=1"
    fake_hub.add_override(  # 50 times: without the check, the pages would go on
        r"^/api/models/hostile/pagelink/tree/", 200, {"Link": f'<{page}>; rel="next"'}, b"[]", times=50
    )
    with pytest.raises(UnsafeHubAnswerError, match=rf"GET {fake_hub.cdn_url}/api/\S+ is another origin"):
        automodel_plugins.describe_checkpoint("hostile/pagelink", revision=sha, registry=registry())
    assert not [r for r in fake_hub.requests if r.server == "cdn"]


def test_a_dripping_metadata_answer_is_stopped_at_its_deadline(
    fake_hub: FakeHub,
    checkpoint: Path,
    monkeypatch: pytest.MonkeyPatch,
    outside: Callable,  # noqa: F811
) -> None:
    """64 bytes every 50 ms: never slow enough for a read timeout, the repo info would take 7 s (a real
    hostile hub: forever). The metadata deadline stops it and says how far it got."""
    serve(fake_hub, "hostile/drip", checkpoint)
    monkeypatch.setenv(METADATA_DEADLINE_ENV, "1")
    fake_hub.misbehave("hostile/drip", api_padding=9000, chunk_size=64, api_chunk_delay=0.05)
    with pytest.raises(
        HubDownloadError, match=rf"not complete within its 1 s deadline \({METADATA_DEADLINE_ENV}"
    ):
        automodel_plugins.load_config("hostile/drip")
    outside()


@pytest.mark.parametrize("revision", ["main", "commit"])
def test_headers_that_drip_are_stopped_at_the_metadata_deadline(
    fake_hub: FakeHub, checkpoint: Path, monkeypatch: pytest.MonkeyPatch, revision: str
) -> None:
    """A byte of the status line and headers every 50 ms: each read returns at once, so no read timeout fires,
    and the hooks that bound bodies only run once the headers are in (a real hostile hub: 64 KiB of headers,
    a byte every 9 s, a week per request). The headers of each answer are bounded by the metadata deadline."""
    sha = serve(fake_hub, "hostile/headerdrip", checkpoint)
    monkeypatch.setenv(METADATA_DEADLINE_ENV, "1")
    fake_hub.misbehave("hostile/headerdrip", header_drip=0.05)
    with pytest.raises(HubDownloadError, match=rf"no complete headers within 1 s \({METADATA_DEADLINE_ENV}"):
        automodel_plugins.load_config("hostile/headerdrip", revision=sha if revision == "commit" else None)


@pytest.mark.parametrize("setting", [METADATA_BYTES_ENV, METADATA_DEADLINE_ENV])
def test_a_bad_metadata_setting_is_named(
    fake_hub: FakeHub, checkpoint: Path, monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    serve(fake_hub, "org/settings", checkpoint)
    monkeypatch.setenv(setting, "lots")
    with pytest.raises(Exception, match=f"{setting}='lots' is not a number"):
        automodel_plugins.load_config("org/settings")


# --- what a tree listing says ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "why"),
    [
        (
            {"type": "file", "path": "../../x.json", "size": 3, "oid": "0" * 40},
            "not a plain relative file name",
        ),
        (
            {"type": "file", "path": "..\\x.json", "size": 3, "oid": "0" * 40},
            "not a plain relative file name",
        ),
        (
            {"type": "file", "path": "/etc/x.json", "size": 3, "oid": "0" * 40},
            "not a plain relative file name",
        ),
        (
            {"type": "file", "path": "a\x1b]0;pwned\x07.json", "size": 3, "oid": "0" * 40},
            "not a plain relative",
        ),
        (
            {"type": "file", "path": "x.json", "size": "3", "oid": "0" * 40},
            "size '3' for 'x.json' is not a number of bytes",
        ),
        (
            {"type": "file", "path": "x.json", "size": -1, "oid": "0" * 40},
            "size -1 for 'x.json' is not a number of bytes",
        ),
    ],
    ids=["dotdot", "backslash", "absolute", "escape", "text-size", "negative-size"],
)
def test_a_tree_listing_entry_that_names_a_path_is_refused(
    fake_hub: FakeHub, checkpoint: Path, entry: dict, why: str
) -> None:
    """``inspect`` reports the listing's names and sizes and ``convert`` fetches its top-level ``.json`` files
    and copies them by name: a name that is a path (or would drive a terminal), or a size that is not a number,
    is refused, naming the entry."""
    sha = serve(fake_hub, "hostile/listing", checkpoint)
    fake_hub.add_override(r"^/api/models/hostile/listing/tree/", 200, {}, json.dumps([entry]).encode())
    with pytest.raises(UnsafeHubAnswerError, match=why) as caught:
        automodel_plugins.describe_checkpoint("hostile/listing", revision=sha, registry=registry())
    assert caught.value.repo_id == "hostile/listing"


# --- Xet -----------------------------------------------------------------------------------------------------


def test_files_the_hub_stores_with_xet_come_over_plain_http(fake_hub: FakeHub, checkpoint: Path) -> None:
    """Each file's answer announces Xet storage. huggingface_hub would hand them to ``hf_xet``, outside the
    byte counts and the deadline (here: a refresh route this hub answers 404); our loads take the plain HTTP
    path, every byte through the checks, and load what the local directory loads."""
    serve(fake_hub, "org/xet", checkpoint)
    fake_hub.misbehave("org/xet", xet=True)
    model = automodel_plugins.from_pretrained("org/xet", registry=registry())
    assert_same_state_dict(model, automodel_plugins.from_pretrained(checkpoint, registry=registry()))
    assert not [r for r in fake_hub.requests if "xet-read-token" in r.path]
    for shard in set(index_of(checkpoint).values()):
        assert fake_hub.bytes_for("org/xet", shard) == (checkpoint / shard).stat().st_size


def test_a_tree_listing_in_the_cache_is_not_trusted(
    fake_hub: FakeHub,
    checkpoint: Path,
    outside: Callable,  # noqa: F811
) -> None:
    """huggingface_hub's ``snapshot_download`` keeps a repo's tree listing in the cache
    (``trees/<commit>.json``), and ``hf_hub_download`` at that commit then skips the HEAD request for Xet files:
    the listing's ``lfs_sha256`` names ``blobs/<it>`` unchecked. One left by a download from a hostile hub
    names ``../../../target``; our load asks the hub (checked) and never reads or locks the target."""
    from huggingface_hub import constants

    sha = serve(fake_hub, "hostile/treecache", checkpoint)
    config = (checkpoint / "config.json").read_bytes()
    trees = Path(constants.HF_HUB_CACHE) / "models--hostile--treecache" / "trees"
    trees.mkdir(parents=True)
    entry = {
        "size": len(config),
        "blob_id": "0" * 40,
        "lfs_sha256": "../../../target",
        "lfs_size": len(PRECIOUS),
    }
    entry["xet_hash"] = "ab" * 32
    (trees / f"{sha}.json").write_text(json.dumps({"format_version": 1, "files": {"config.json": entry}}))
    assert automodel_plugins.load_config("hostile/treecache", revision=sha).model_type == "llama"
    outside()  # neither read through nor locked: <tmp>/target.lock would be beside it


# --- redirects stay on the endpoint ------------------------------------------------------------------------


def test_a_metadata_redirect_to_another_origin_is_refused(fake_hub: FakeHub, checkpoint: Path) -> None:
    """huggingface_hub follows redirects of API requests (a renamed repo answers 307 with a relative
    ``Location``); one leading to another host or port would have the repo's commit decided elsewhere."""
    serve(fake_hub, "hostile/moved", checkpoint)
    fake_hub.add_override(
        r"^/api/models/hostile/moved(/revision/|\?|$)",
        307,
        {"Location": f"{fake_hub.cdn_url}/api/models/hostile/moved/revision/main"},
    )
    with pytest.raises(
        UnsafeHubAnswerError, match=rf"GET {fake_hub.cdn_url}/api/\S+ is another origin than the endpoint"
    ):
        automodel_plugins.load_config("hostile/moved")
    assert not [r for r in fake_hub.requests if r.server == "cdn"]


def test_a_same_origin_api_redirect_is_followed(fake_hub: FakeHub, checkpoint: Path) -> None:
    """A renamed repo's relative redirect stays on the endpoint: followed, as huggingface_hub does."""
    sha = serve(fake_hub, "org/renamed", checkpoint)
    fake_hub.add_override(
        r"^/api/models/org/old-name(/revision/main)?(\?|$)", 307, {"Location": "/api/models/org/renamed"}
    )
    location = resolve("org/old-name", HubOptions())
    assert location.commit == sha


def test_a_file_redirect_to_another_scheme_is_refused(fake_hub: FakeHub, checkpoint: Path) -> None:
    """A file's metadata may send its body to another origin (the hub's CDN), over http(s) only: a
    ``file://`` location is refused with a typed error, not handed to the HTTP client."""
    sha = serve(fake_hub, "hostile/scheme", checkpoint)
    fake_hub.add_override(
        r"^/hostile/scheme/resolve/[^/]+/config\.json$",
        302,
        {
            "Location": "file:///etc/passwd",
            "X-Repo-Commit": sha,
            "ETag": '"abc"',
            "X-Linked-Etag": '"abc"',
            "X-Linked-Size": "10",
        },
        method="HEAD",
    )
    with pytest.raises(UnsafeHubAnswerError, match=r"file:///etc/passwd.*only http and https"):
        automodel_plugins.load_config("hostile/scheme")


def test_a_head_redirect_to_another_hub_host_is_refused(
    fake_hub: FakeHub, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub follows a file's HEAD redirect to a known hub host (huggingface.co, hf.co) with the
    token; from a mirror that is another server deciding the file's commit and ETag. (The second origin stands
    in for such a host.)"""
    from huggingface_hub.utils import _http

    serve(fake_hub, "hostile/hubhost", checkpoint)
    monkeypatch.setattr(_http, "_HUB_ORIGINS", _http._HUB_ORIGINS | {_http._url_origin(fake_hub.cdn_url)})
    fake_hub.add_override(
        r"^/hostile/hubhost/resolve/[^/]+/config\.json$",
        307,
        {"Location": f"{fake_hub.cdn_url}/hostile/hubhost/resolve/main/config.json"},
        method="HEAD",
    )
    with pytest.raises(UnsafeHubAnswerError, match="another origin"):
        automodel_plugins.load_config("hostile/hubhost")
    assert not [r for r in fake_hub.requests if r.server == "cdn"]


# --- how the hooks are installed ---------------------------------------------------------------------------


def test_huggingface_hub_still_has_what_the_guard_uses() -> None:
    """The guard reads huggingface_hub's current client factory (no public getter exists) and switches Xet off
    for its own calls: if a new huggingface_hub renames either, this fails here, and loads raise
    :class:`HubGuardUnavailableError` rather than run unguarded."""
    import huggingface_hub
    from huggingface_hub import file_download
    from huggingface_hub.utils import _http

    assert callable(huggingface_hub.set_client_factory) and callable(huggingface_hub.close_session)
    assert callable(_http._GLOBAL_CLIENT_FACTORY)
    assert callable(file_download.is_xet_available)


@pytest.mark.parametrize("name", ["factory", "xet"])
def test_a_huggingface_hub_without_those_names_is_a_typed_error(
    fake_hub: FakeHub, checkpoint: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    from huggingface_hub import file_download
    from huggingface_hub.utils import _http

    serve(fake_hub, "org/renamed-api", checkpoint)
    if name == "factory":
        monkeypatch.delattr(_http, "_GLOBAL_CLIENT_FACTORY")
    else:
        monkeypatch.delattr(file_download, "is_xet_available")
    with pytest.raises(HubGuardUnavailableError, match="refusing to download unchecked") as caught:
        automodel_plugins.load_config("org/renamed-api")
    assert caught.value.repo_id == "org/renamed-api"
    assert fake_hub.requests == []


def test_a_client_factory_the_user_installed_is_kept(fake_hub: FakeHub, checkpoint: Path) -> None:
    """A user's factory (proxies, certificates, their own hooks) keeps making the client: our checks are added
    to the clients it makes, and the checks still refuse a hostile answer."""
    import httpx2
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http

    seen: list[str] = []

    def users_factory() -> httpx2.Client:
        client = _http.default_client_factory()
        client.event_hooks = {"request": [*client.event_hooks["request"], lambda r: seen.append(str(r.url))]}
        return client

    saved = _http._GLOBAL_CLIENT_FACTORY
    set_client_factory(users_factory)
    try:
        serve(fake_hub, "org/users-client", checkpoint)
        assert automodel_plugins.load_config("org/users-client").model_type == "llama"
        assert any("/org/users-client/resolve/" in url for url in seen)
        serve(fake_hub, "hostile/users-client", checkpoint)
        fake_hub.misbehave("hostile/users-client", etag='"../../../target"')
        with pytest.raises(UnsafeHubAnswerError, match="is not a plain token"):
            automodel_plugins.load_config("hostile/users-client")
        assert any("/hostile/users-client/resolve/" in url for url in seen)
    finally:
        set_client_factory(saved)


# --- compressed answers --------------------------------------------------------------------------------------


def gzipped(data: bytes, padding: int) -> bytes:
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    return packer.compress(data) + packer.compress(b" " * padding) + packer.flush()


def test_a_compressed_metadata_answer_is_refused(
    fake_hub: FakeHub, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repo info of 32 KB on the wire that expands to 32 MiB (a gzip bomb: the ratio is a thousand and more):
    the limit counts bytes on the wire, so the answer is asked uncompressed and a compressed one refused."""
    sha = serve(fake_hub, "hostile/bomb", checkpoint)
    monkeypatch.setenv(METADATA_BYTES_ENV, str(MIB))
    body = gzipped(json.dumps({"id": "hostile/bomb", "sha": sha, "siblings": []}).encode(), 32 * MIB)
    assert len(body) < MIB // 8
    fake_hub.add_override(r"^/api/models/hostile/bomb(\?|$)", 200, {"Content-Encoding": "gzip"}, body)
    with pytest.raises(UnsafeHubAnswerError, match=r"GET /api/models/hostile/bomb is 'gzip'-encoded"):
        automodel_plugins.load_config("hostile/bomb")


def test_a_compressed_file_body_is_refused(fake_hub: FakeHub, checkpoint: Path, outside: Callable) -> None:  # noqa: F811
    """A shard's body compressed to fewer bytes than the shard announces, expanding to a thousand times more:
    huggingface_hub would write all of it to disk before its size check."""
    serve(fake_hub, "hostile/filebomb", checkpoint)
    shard = sorted(set(index_of(checkpoint).values()))[0]
    size = (checkpoint / shard).stat().st_size
    body = gzipped(b"", 1000 * size)
    assert len(body) < size
    fake_hub.add_override(
        rf"^/hostile/filebomb/resolve/[^/]+/{shard}$", 200, {"Content-Encoding": "gzip"}, body, method="GET"
    )
    with pytest.raises(UnsafeHubAnswerError, match="is 'gzip'-encoded") as caught:
        automodel_plugins.from_pretrained("hostile/filebomb", registry=registry())
    assert caught.value.filename == shard
    outside()


# --- huge headers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["api", "head"])
def test_huge_headers_are_broken_http_not_an_unreachable_hub(
    fake_hub: FakeHub, checkpoint: Path, where: str
) -> None:
    """A header of 1 MiB: the HTTP client stops reading headers at its own limit (64 KiB), and the error says
    the hub answered with broken HTTP, not that it "cannot be reached"."""
    sha = serve(fake_hub, "hostile/headers", checkpoint)
    if where == "api":
        fake_hub.add_override(r"^/api/models/hostile/headers(\?|$)", 200, {"X-Big": "a" * MIB}, b"{}")
        revision = None
    else:
        fake_hub.add_override(r"^/hostile/headers/resolve/", 200, {"X-Big": "a" * MIB}, method="HEAD")
        revision = sha
    with pytest.raises(HubDownloadError, match="answered with broken HTTP: Receive buffer too long"):
        automodel_plugins.load_config("hostile/headers", revision=revision)


def test_a_gigantic_json_file_is_refused_before_its_download(
    fake_hub: FakeHub,
    checkpoint: Path,
    outside: Callable,  # noqa: F811
) -> None:
    """``config.json`` announced (and sent) with 100 MiB more: a config, an index or ``params.json`` is metadata
    too, and one announced past the metadata limit is not downloaded (a shard's size is the hub's to say)."""
    serve(fake_hub, "hostile/bigconfig", checkpoint)
    fake_hub.misbehave("hostile/bigconfig", extra_bytes=100 * MIB, files=r"^config\.json$")
    with pytest.raises(
        UnsafeHubAnswerError, match=r"announces \d+ bytes for a JSON file, more than the 67108864"
    ):
        automodel_plugins.load_config("hostile/bigconfig")
    assert fake_hub.bytes_for("hostile/bigconfig", "config.json") == 0
    outside()


@pytest.mark.parametrize("endpoint", ["revision", "tree"])
def test_an_x_repo_commit_that_is_a_path_is_refused_on_every_endpoint(
    fake_hub: FakeHub, checkpoint: Path, endpoint: str
) -> None:
    """Not only a file's answers: the repo info and the tree listing are checked the same way (the listing was
    read outside the checks)."""
    sha = serve(fake_hub, "hostile/everywhere", checkpoint)
    automodel_plugins.describe_checkpoint(
        "hostile/everywhere", revision=sha, registry=registry()
    )  # cached now
    body = {"revision": json.dumps({"id": "hostile/everywhere", "sha": sha, "siblings": []}), "tree": "[]"}[
        endpoint
    ]
    fake_hub.add_override(
        rf"^/api/models/hostile/everywhere(\?|$|/{endpoint}/)",
        200,
        {"X-Repo-Commit": "../../x"},
        body.encode(),
    )
    with pytest.raises(UnsafeHubAnswerError, match=r"X-Repo-Commit '\.\./\.\./x' is not a 40-hex commit"):
        automodel_plugins.describe_checkpoint(
            "hostile/everywhere", revision=None if endpoint == "revision" else sha, registry=registry()
        )


# --- the hub's resolve-cache redirect ----------------------------------------------------------------------


def test_small_files_through_the_resolve_cache_redirect_are_bounded_as_files(
    fake_hub: FakeHub, checkpoint: Path
) -> None:
    """The hub answers a small file's ``resolve`` with a relative ``307`` to ``/api/resolve-cache/...`` on
    itself, which serves the file: an ``/api/`` path, but the file's body, counted and bounded by its announced
    size (a mirror's truncated copy is reported with its byte counts), and the load is the local load."""
    fake_hub.resolve_cache = True
    serve(fake_hub, "org/resolve-cache", checkpoint)
    model = automodel_plugins.from_pretrained("org/resolve-cache", registry=registry())
    assert_same_state_dict(model, automodel_plugins.from_pretrained(checkpoint, registry=registry()))
    assert any(r.path.startswith("/api/resolve-cache/models/org/resolve-cache/") for r in fake_hub.requests)

    serve(fake_hub, "mirror/resolve-cache", checkpoint)
    size = (checkpoint / "config.json").stat().st_size
    fake_hub.misbehave("mirror/resolve-cache", body_bytes=10, files=r"^config\.json$")
    with pytest.raises(HubDownloadError, match=f"10 bytes received of the {size} announced") as caught:
        automodel_plugins.load_config("mirror/resolve-cache")
    assert caught.value.filename == "config.json"
