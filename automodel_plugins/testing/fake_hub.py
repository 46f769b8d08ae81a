"""A stand-in Hugging Face Hub on 127.0.0.1 for tests and benchmarks without network (stdlib only).

It answers the HTTP calls huggingface_hub 2.4 makes for ``hf_hub_download``, ``snapshot_download``,
``HfApi.model_info`` / ``repo_info`` / ``resolve_revision`` / ``list_repo_tree`` / ``list_repo_files`` /
``file_exists``, ``get_safetensors_metadata`` and plain range requests, which is also everything
``transformers.AutoConfig.from_pretrained(repo_id)`` and ``automodel_plugins.from_pretrained(repo_id)`` need,
and counts what it serves per file, so a test can assert which files (and how many bytes of each) a load fetched.

Usage::

    from automodel_plugins.testing.fake_hub import FakeHub

    with FakeHub() as hub:
        sha = hub.add_directory("org/tiny", checkpoint_dir)   # or add_repo("org/tiny", {name: bytes})
        with hub.patch_endpoint():          # works even if huggingface_hub is already imported
            path = hf_hub_download("org/tiny", "config.json", cache_dir=tmp)
        print(hub.bytes_served)             # {"total": ..., "files": {"org/tiny:config.json": ...}}

or, for a subprocess, its ``env()`` (``HF_ENDPOINT`` is read once, at import, by ``huggingface_hub.constants``).
``hub.misbehave(repo_id, ...)`` makes one repo's answers hostile or broken (:class:`Misbehaviour`: a commit,
``X-Repo-Commit`` or ETag of any text, ``Range`` ignored, bytes after the body, a body cut short, a stall, a
trickle) until ``clear_overrides()``. From a shell, ``python -m automodel_plugins.testing.fake_hub DIR [--port N]``
serves a directory of checkpoints (``DIR/ORG/NAME`` as repo ``ORG/NAME``) until interrupted.
The pytest fixtures ``fake_hub`` (patched in, online, a fresh cache) and ``fake_hub_server`` (the session's one
server) come with the author kit. Run one server per test session: huggingface_hub keeps connections and the
endpoint it was first given, and a request to a closed port retries for about 23 s.

Routes (``{type}`` = models|datasets|spaces; repo ids are ``name`` or ``ns/name``):

* ``GET  /api/{type}/{repo}``                         -> repo info at ``main``
* ``GET  /api/{type}/{repo}/revision/{rev}``          -> repo info (``?blobs=true`` adds size/blobId/lfs)
* ``GET  /api/{type}/{repo}/tree/{rev}[/{path}]``     -> tree listing (``recursive``, cursor pagination
  through a ``Link: <...>; rel="next"`` header when ``tree_page_size`` is set)
* ``HEAD|GET /[{type}/]{repo}/resolve/{rev}/{file}``  -> file, with ``X-Repo-Commit``, quoted ``ETag``
  (git blob sha1, or sha256 for LFS files + ``X-Linked-Etag``/``X-Linked-Size``), ``Accept-Ranges``,
  ``Range: bytes=a-b`` -> 206 + ``Content-Range``. With ``lfs_redirect`` set (at construction or later)
  LFS files answer ``302`` to a second "CDN" server on another port (a different origin, like the real
  hub's CDN). With ``resolve_cache`` set, non-LFS files answer ``307`` to
  ``/api/resolve-cache/models/{repo}/{sha}/{file}`` on the hub itself, which serves them (as the real hub does).

Errors mirror the real Hub (header ``X-Error-Code``, which ``hf_raise_for_status`` maps):

* unknown or private repo: 401 (no token) / 404 (token)  + ``RepoNotFound``  -> RepositoryNotFoundError
* gated repo file without access: 401 (no token) / 403 (token) + ``GatedRepo`` -> GatedRepoError
* unknown revision: 404 + ``RevisionNotFound``                              -> RevisionNotFoundError
* missing file/path: 404 + ``EntryNotFound`` (+ ``X-Repo-Commit``)          -> RemoteEntryNotFoundError
* unknown route: 404 without ``X-Error-Code``                               -> HfHubHTTPError
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

__all__ = [
    "LFS_SUFFIXES",
    "FakeHub",
    "Misbehaviour",
    "RequestRecord",
    "endpoint_patched",
    "git_blob_sha1",
    "main",
]

LFS_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".gguf",
    ".npz",
    ".npy",
    ".pkl",
    ".model",
    ".tflite",
    ".zip",
    ".tar",
    ".gz",
)
_HEX40 = re.compile(r"[0-9a-f]{40}")
_REPO = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_API_RE = re.compile(
    r"^/api/(?P<type>models|datasets|spaces)/"
    + _REPO
    + r"(?:/(?P<op>revision|tree)/(?P<rev>[^/]+)(?:/(?P<path>.+))?)?/?$"
)
_RESOLVE_RE = re.compile(
    r"^/(?:(?P<type>datasets|spaces)/)?" + _REPO + r"/resolve/(?P<rev>[^/]+)/(?P<file>.+)$"
)
_CDN_RE = re.compile(r"^/cdn/(?P<sha256>[0-9a-f]{64})$")
_RESOLVE_CACHE_RE = re.compile(
    r"^/api/resolve-cache/(?P<type>models|datasets|spaces)/" + _REPO + r"/(?P<sha>[0-9a-f]{40})/(?P<file>.+)$"
)
_RANGE_RE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$", re.IGNORECASE)
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space", None: "model"}


@contextlib.contextmanager
def endpoint_patched(url: str, value: Any = None) -> Iterator[Any]:
    """Point an already-imported huggingface_hub at the hub at ``url`` (restored on exit); yields ``value``.

    ``constants.ENDPOINT`` alone is not enough: ``hf_hub_url`` formats the import-time
    ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` and the module-level helpers
    (``huggingface_hub.model_info``, ``get_safetensors_metadata``, ``list_repo_files`` ...)
    are bound methods of ``huggingface_hub.hf_api.api``, an ``HfApi()`` built when
    ``huggingface_hub.hf_api`` is first imported (lazily), with the endpoint of that moment.
    """
    import sys

    from huggingface_hub import constants, hf_api

    saved = (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, hf_api.api.endpoint)
    constants.ENDPOINT = url
    constants.HUGGINGFACE_CO_URL_TEMPLATE = url + "/{repo_id}/resolve/{revision}/{filename}"
    hf_api.api.endpoint = url
    # transformers caches one HfApi (transformers.utils.hub._hf_api, used by resolve_revision) whose
    # endpoint is fixed when it is first built: drop it so it is rebuilt against this hub.
    t_hub = sys.modules.get("transformers.utils.hub")
    if t_hub is not None and hasattr(t_hub, "_hf_api"):
        t_hub._hf_api = None
    try:
        yield value
    finally:
        constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, hf_api.api.endpoint = saved
        if t_hub is not None and hasattr(t_hub, "_hf_api"):
            t_hub._hf_api = None


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob: what the Hub uses as ETag for non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class _File:
    path: str
    data: bytes
    lfs: bool

    def __post_init__(self) -> None:
        self.size = len(self.data)
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        self.pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n".encode()
        # Tree "oid"/"blobId" is the git object id of what git stores: the pointer for LFS files.
        self.blob_id = git_blob_sha1(self.pointer if self.lfs else self.data)
        self.etag = self.sha256 if self.lfs else self.blob_id


@dataclass
class _Repo:
    repo_id: str
    repo_type: str
    gated: bool | str = False
    private: bool = False
    tokens: set = field(default_factory=set)
    commits: dict = field(default_factory=dict)  # sha -> {path: _File}
    refs: dict = field(default_factory=dict)  # branch/tag -> sha
    last_modified: str = "2024-01-01T00:00:00.000Z"


@dataclass
class Misbehaviour:
    """How one repo's answers go wrong (:meth:`FakeHub.misbehave`): a hostile or broken hub or mirror.

    ``files`` (a regular expression searched in the file name) limits the body and ETag misbehaviours to the
    files it matches; ``None``: every file.
    """

    commit: str | None = None
    """Sent as the repo's ``sha`` (any text: ``../../x`` too), and then answered as a revision."""
    header_commit: str | None = None
    """Sent as every ``X-Repo-Commit`` (file answers, found or not), whatever the commit asked for."""
    any_revision: bool = False
    """Answer every revision asked for (``../../x`` too) with the main branch's commit."""
    etag: str | None = None
    """Sent as every file's ``ETag`` (and ``X-Linked-Etag``), verbatim."""
    ignore_range: bool = False
    """Answer a ``Range`` request with ``200`` and the whole body."""
    extra_bytes: int = 0
    """Zeros sent after each file's body (and counted in its ``Content-Length``): a server sending more."""
    body_bytes: int | None = None
    """Each ``GET`` body is only the file's first ``body_bytes`` bytes, with a matching ``Content-Length``, while
    the metadata still announces the whole size (a mirror's truncated copy)."""
    announced_size: int | None = None
    """Sent as each file's size in its metadata (``X-Linked-Size``, a ``HEAD``'s ``Content-Length``) while bodies
    and ``Content-Range`` stay the file's own: a hub announcing a terabyte (or one byte more) for a shard."""
    body_cut_at: int | None = None
    """The connection closes after this many body bytes although ``Content-Length`` promised more."""
    stall: float = 0.0
    """Seconds to wait before answering any request for the repo (a hung mirror); cut short by
    :meth:`FakeHub.clear_overrides` and :meth:`FakeHub.stop`."""
    chunk_size: int | None = None
    """Bytes per body chunk (default: the hub's ``chunk_size``)."""
    chunk_delay: float | None = None
    """Seconds between body chunks (default: the hub's ``chunk_delay``): a trickling server."""
    files: str | None = None
    api_padding: int = 0
    """Spaces sent after each API answer's JSON (repo info, tree listing): still valid JSON, as long as a hostile
    hub likes (counted in its ``Content-Length`` unless ``api_chunked`` or ``api_content_length``)."""
    api_chunked: bool = False
    """API answers go out chunked, without a ``Content-Length`` (a body of no announced end)."""
    api_content_length: int | None = None
    """Sent as every API answer's ``Content-Length`` whatever the body's length (a lie); the connection then
    closes."""
    api_chunk_delay: float | None = None
    """Seconds between API answer chunks (of ``chunk_size`` bytes): a metadata answer that drips."""
    header_drip: float | None = None
    """Seconds between the bytes of each answer's status line and headers (a hub that never finishes saying
    what it will send)."""
    xet: bool = False
    """File answers announce Xet storage (``X-Xet-Hash``, ``X-Xet-Refresh-Route``), as the hub does for files it
    stores with Xet; this hub serves no Xet (the refresh route is answered 404), only plain HTTP."""

    def api_hostile(self) -> bool:
        return bool(
            self.api_padding
            or self.api_chunked
            or self.api_content_length is not None
            or self.api_chunk_delay
        )

    def applies(self, filename: str) -> bool:
        return self.files is None or re.search(self.files, filename) is not None


@dataclass
class RequestRecord:
    method: str
    path: str  # path + query, as received
    status: int
    range: str | None
    authorization: bool
    body_bytes: int
    server: str  # "hub" or "cdn"


class FakeHub:
    """Threaded stand-in Hub on 127.0.0.1 (port 0 = any free port). Use as a context manager."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        lfs_redirect: bool = False,
        resolve_cache: bool = False,
        tree_page_size: int | None = None,
        chunk_size: int = 64 * 1024,
        chunk_delay: float = 0.0,
    ) -> None:
        self.host = host
        self.port = port
        self.lfs_redirect = lfs_redirect
        self.resolve_cache = resolve_cache
        """Non-LFS files answer a relative ``307`` to ``/api/resolve-cache/models/{repo}/{sha}/{file}`` (on the
        hub itself), which serves them, as the real hub does for small files."""
        self.tree_page_size = tree_page_size
        self.chunk_size = chunk_size
        self.chunk_delay = chunk_delay  # seconds slept between body chunks (to make downloads overlap)
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.Lock()
        self._generation = 0
        """Bumped by :meth:`reset_counters`: a request that began before keeps off the new counters."""
        self.file_bytes: Counter = Counter()  # (repo_id, filename) -> body bytes sent
        self.file_requests: Counter = Counter()  # (repo_id, filename, method) -> count
        self.requests: list[RequestRecord] = []
        self._overrides: list[list] = []  # [regex, method, status, headers, body, remaining]
        self._misbehaviours: dict[str, Misbehaviour] = {}
        self._calm = threading.Event()  # set: stalls end now
        self._servers: list[ThreadingHTTPServer] = []
        self._threads: list[threading.Thread] = []
        self.url = ""
        self.cdn_url = ""

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeHub:
        hub_srv = ThreadingHTTPServer((self.host, self.port), self._handler("hub"))
        self._servers.append(hub_srv)
        self.url = f"http://{self.host}:{hub_srv.server_address[1]}"
        # The "CDN" always runs, so that ``lfs_redirect`` can be switched on for one test of a shared server.
        cdn_srv = ThreadingHTTPServer((self.host, 0), self._handler("cdn"))
        self._servers.append(cdn_srv)
        self.cdn_url = f"http://{self.host}:{cdn_srv.server_address[1]}"
        for srv in self._servers:
            srv.daemon_threads = True
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._calm.set()
        for srv in self._servers:
            srv.shutdown()
            srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return self.url

    # ------------------------------------------------------------------ content
    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes],
        revision: str = "main",
        sha: str | None = None,
        gated: bool | str = False,
        *,
        private: bool = False,
        tokens: Iterable[str] = (),
        repo_type: str = "model",
        lfs: Callable[[str, bytes], bool] | Iterable[str] | None = None,
    ) -> str:
        """Add a commit holding ``files`` to ``repo_id`` and point branch/tag ``revision`` at it.

        Call again with another ``revision`` to add branches (gated/private flags are only ever
        switched on, so later calls need not repeat them). ``gated`` (True -> "auto", or "manual")
        and ``private`` repos serve files only to ``Authorization: Bearer <t>`` with ``t`` in ``tokens``.
        ``lfs``: names (or a predicate) of files stored as LFS; default: by suffix, or size > 10 MiB.
        Returns the commit sha.
        """
        if lfs is None:
            is_lfs = lambda name, data: name.endswith(LFS_SUFFIXES) or len(data) > 10 * 1024 * 1024  # noqa: E731
        elif callable(lfs):
            is_lfs = lfs
        else:
            names = set(lfs)
            is_lfs = lambda name, data: name in names  # noqa: E731
        entries = {name: _File(name, bytes(data), bool(is_lfs(name, data))) for name, data in files.items()}
        if sha is None:
            h = hashlib.sha1(f"{repo_type}:{repo_id}@{revision}".encode())
            for name in sorted(entries):
                h.update(f"\0{name}\0{entries[name].etag}".encode())
            sha = h.hexdigest()
        if not _HEX40.fullmatch(sha):
            raise ValueError(f"sha must be 40 lowercase hex chars, got {sha!r}")
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            if repo is None:
                repo = self._repos[(repo_type, repo_id)] = _Repo(repo_id, repo_type)
            if gated:  # a later add_repo() for another branch keeps earlier gated/private flags
                repo.gated = "auto" if gated is True else gated
            if private:
                repo.private = True
            repo.tokens |= set(tokens)
            repo.commits[sha] = entries
            if revision != sha:
                repo.refs[revision] = sha
        return sha

    def add_directory(
        self, repo_id: str, directory: str | Path, *, extra: dict[str, bytes] | None = None, **options: Any
    ) -> str:
        """:meth:`add_repo` with every file under ``directory`` (relative names), plus ``extra`` files."""
        root = Path(directory)
        files = {
            p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
        }
        return self.add_repo(repo_id, {**files, **(extra or {})}, **options)

    def add_ref(self, repo_id: str, name: str, sha: str, repo_type: str = "model") -> None:
        with self._lock:
            self._repos[(repo_type, repo_id)].refs[name] = sha

    def add_override(
        self,
        path_regex: str,
        status: int,
        headers: dict | None = None,
        body: bytes = b"",
        *,
        method: str | None = None,
        times: int | None = None,
    ) -> None:
        """Answer requests whose path (+query) matches ``path_regex`` with a canned response
        (e.g. a 500, or a 401 without ``X-Error-Code``). ``times=None``: forever."""
        with self._lock:
            self._overrides.append([re.compile(path_regex), method, status, dict(headers or {}), body, times])

    def misbehave(self, repo_id: str, **how: Any) -> Misbehaviour:
        """Make ``repo_id``'s answers go wrong as :class:`Misbehaviour` ``how`` says (until
        :meth:`clear_overrides`)."""
        misbehaviour = Misbehaviour(**how)
        with self._lock:
            self._misbehaviours[repo_id] = misbehaviour
            self._calm.clear()
        return misbehaviour

    def clear_overrides(self) -> None:
        """Drop every :meth:`add_override` and :meth:`misbehave` (and end any stall in progress)."""
        with self._lock:
            self._overrides.clear()
            self._misbehaviours.clear()
            self._calm.set()

    def remove_repo(self, repo_id: str, repo_type: str = "model") -> None:
        with self._lock:
            self._repos.pop((repo_type, repo_id), None)

    # ------------------------------------------------------------------ counters
    @property
    def bytes_served(self) -> dict:
        """``{"total": n, "files": {"repo_id:filename": n, ...}}`` (response body bytes, hub + CDN)."""
        with self._lock:
            files = {f"{r}:{f}": n for (r, f), n in sorted(self.file_bytes.items())}
        return {"total": sum(files.values()), "files": files}

    @property
    def response_bytes(self) -> int:
        """Every response body byte sent since the last reset: files, API answers and errors alike."""
        with self._lock:
            return sum(record.body_bytes for record in self.requests)

    def bytes_for(self, repo_id: str, filename: str) -> int:
        with self._lock:
            return self.file_bytes[(repo_id, filename)]

    def requests_for(self, repo_id: str, filename: str, method: str | None = None) -> int:
        with self._lock:
            return sum(
                n
                for (r, f, m), n in self.file_requests.items()
                if r == repo_id and f == filename and (method is None or m == method)
            )

    def reset_counters(self) -> None:
        with self._lock:
            self._generation += 1
            self.file_bytes.clear()
            self.file_requests.clear()
            self.requests.clear()

    # ------------------------------------------------------------------ client helpers
    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should talk to this hub."""
        return {
            "HF_ENDPOINT": self.url,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_DISABLE_XET": "1",
        }

    def patch_endpoint(self) -> contextlib.AbstractContextManager[FakeHub]:
        """Point an already-imported huggingface_hub at this hub (restored on exit): :func:`endpoint_patched`."""
        return endpoint_patched(self.url, self)

    # ------------------------------------------------------------------ HTTP
    def _handler(self, server_name: str):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "FakeHub/1.0"

            def log_message(self, *args) -> None:  # silence stderr
                pass

            def do_HEAD(self) -> None:
                self._dispatch(head=True)

            def do_GET(self) -> None:
                self._dispatch(head=False)

            # ---------------------------------------------------------- plumbing
            def _token(self) -> str | None:
                auth = self.headers.get("Authorization") or ""
                return auth[7:].strip() if auth.lower().startswith("bearer ") else None

            def _send(
                self,
                status: int,
                body: bytes = b"",
                headers: dict | None = None,
                *,
                head: bool,
                count_as: tuple | None = None,
                content_length: int | None = None,
                how: Misbehaviour | None = None,
            ) -> None:
                tail = how.extra_bytes if how else 0
                self.send_response(status)
                hdrs = {"Content-Type": "application/json; charset=utf-8"}
                hdrs.update(headers or {})
                hdrs["Content-Length"] = str(len(body) + tail if content_length is None else content_length)
                for k, v in hdrs.items():
                    self.send_header(k, v)
                record, generation = self._record(status, count_as)  # before the headers: see _record
                self.end_headers()
                sent = 0
                if not head and (body or tail):
                    size = (how.chunk_size if how else None) or hub.chunk_size
                    delay = hub.chunk_delay if how is None or how.chunk_delay is None else how.chunk_delay
                    total = len(body) + tail
                    stop = total if how is None or how.body_cut_at is None else min(how.body_cut_at, total)
                    try:
                        while sent < stop:
                            n = min(size, stop - sent)
                            chunk = body[sent : sent + n]
                            chunk += bytes(n - len(chunk))  # past the body: the misbehaviour's extra zeros
                            self._count(record, generation, count_as, n)
                            try:
                                self.wfile.write(chunk)
                            except BaseException:
                                self._count(record, generation, count_as, -n)  # not sent after all
                                raise
                            sent += n
                            if delay:
                                self.wfile.flush()
                                time.sleep(delay)
                        if stop < total:
                            self.wfile.flush()
                            self.close_connection = True  # fewer bytes than Content-Length promised
                    except (BrokenPipeError, ConnectionResetError):
                        self.close_connection = True

            def _record(self, status: int, count_as: tuple | None) -> tuple[RequestRecord, int]:
                """The request on record before its headers go out (so a client that has read them, or the whole
                answer, never finds it missing), with the counters' generation it belongs to."""
                record = RequestRecord(
                    self.command,
                    self.path,
                    status,
                    self.headers.get("Range"),
                    self.headers.get("Authorization") is not None,
                    0,
                    server_name,
                )
                with hub._lock:
                    hub.requests.append(record)
                    if count_as is not None:
                        hub.file_requests[(*count_as, self.command)] += 1
                    return record, hub._generation

            def _count(self, record: RequestRecord, generation: int, count_as: tuple | None, n: int) -> None:
                """``n`` body bytes on ``record`` (counted before they are written, for the same reason), and
                on the file's counter unless :meth:`FakeHub.reset_counters` ran since the request began."""
                with hub._lock:
                    record.body_bytes += n
                    if count_as is not None and generation == hub._generation:
                        hub.file_bytes[count_as] += n

            def _json(self, status: int, obj, headers: dict | None = None, *, head: bool) -> None:
                self._send(status, json.dumps(obj).encode(), headers, head=head)

            def _api_json(
                self, obj: Any, headers: dict | None, how: Misbehaviour | None, *, head: bool
            ) -> None:
                """An API answer, as the repo's misbehaviour has it (padded, chunked, a lying length, a drip)."""
                body = json.dumps(obj).encode()
                if how is None or not how.api_hostile():
                    return self._send(200, body, headers, head=head)
                total = len(body) + how.api_padding
                self.send_response(200)
                hdrs = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
                if how.api_chunked:
                    hdrs["Transfer-Encoding"] = "chunked"
                else:
                    hdrs["Content-Length"] = str(
                        total if how.api_content_length is None else how.api_content_length
                    )
                for k, v in hdrs.items():
                    self.send_header(k, v)
                record, generation = self._record(200, None)
                self.end_headers()
                if head:
                    return
                size = how.chunk_size or hub.chunk_size
                sent = 0
                try:
                    while sent < total:
                        n = min(size, total - sent)
                        chunk = body[sent : sent + n]
                        chunk += b" " * (n - len(chunk))
                        self._count(record, generation, None, n)
                        self.wfile.write(b"%x\r\n%s\r\n" % (n, chunk) if how.api_chunked else chunk)
                        sent += n
                        if how.api_chunk_delay:
                            self.wfile.flush()
                            if hub._calm.wait(how.api_chunk_delay):
                                break  # the test is over
                    if how.api_chunked and sent == total:
                        self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass
                self.close_connection = True

            def _error(
                self, status: int, code: str | None, message: str, *, head: bool, extra: dict | None = None
            ) -> None:
                headers = {"X-Error-Message": message, **(extra or {})}
                if code:
                    headers["X-Error-Code"] = code
                self._json(status, {"error": message}, headers, head=head)

            def _repo_or_error(self, repo_type: str, repo_id: str, *, head: bool) -> _Repo | None:
                repo = hub._repos.get((repo_type, repo_id))
                token = self._token()
                if repo is None or (repo.private and token not in repo.tokens):
                    # Real Hub: 401 for anonymous callers, 404 when a (non-matching) token is sent.
                    self._error(
                        401 if token is None else 404, "RepoNotFound", "Repository not found", head=head
                    )
                    return None
                return repo

            def _repo_at(
                self, repo_type: str, repo_id: str, rev: str, *, head: bool
            ) -> tuple[_Repo, str] | None:
                """The repo and the commit ``rev`` names, or None once the error answer is sent."""
                repo = self._repo_or_error(repo_type, repo_id, head=head)
                if repo is None:
                    return None
                sha = self._resolve_rev(repo, rev)
                how = hub._misbehaviours.get(repo_id)
                if sha is None and how is not None and (how.any_revision or rev == how.commit):
                    sha = repo.refs.get("main") or next(iter(repo.commits))
                if sha is None:
                    self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", head=head)
                    return None
                return repo, sha

            def _resolve_rev(self, repo: _Repo, rev: str) -> str | None:
                if rev in repo.refs:
                    return repo.refs[rev]
                if rev in repo.commits:
                    return rev
                if re.fullmatch(r"[0-9a-f]{7,39}", rev):
                    hits = [s for s in repo.commits if s.startswith(rev)]
                    if len(hits) == 1:
                        return hits[0]
                return None

            # ---------------------------------------------------------- routing
            def flush_headers(self) -> None:
                """The status line and headers, a byte at a time when the repo's misbehaviour drips them."""
                drip = self._header_drip
                if not drip or not getattr(self, "_headers_buffer", None):
                    return super().flush_headers()
                data = b"".join(self._headers_buffer)
                self._headers_buffer = []
                for i in range(len(data)):
                    self.wfile.write(data[i : i + 1])
                    self.wfile.flush()
                    if hub._calm.wait(drip):  # the test is over: the rest at once
                        self.wfile.write(data[i + 1 :])
                        break

            def _dispatch(self, head: bool) -> None:
                self._header_drip = None
                split = urlsplit(self.path)
                raw_path, query = split.path, parse_qs(split.query)
                with hub._lock:
                    ov = next(
                        (
                            o
                            for o in hub._overrides
                            if o[0].search(self.path) and (o[1] is None or o[1] == self.command) and o[5] != 0
                        ),
                        None,
                    )
                    if ov is not None and ov[5] is not None:
                        ov[5] -= 1
                if ov is not None:
                    return self._send(ov[2], ov[4], ov[3], head=head)
                try:
                    if server_name == "cdn":
                        m = _CDN_RE.match(raw_path)
                        if m:
                            return self._cdn(m["sha256"], query, head=head)
                        return self._error(404, None, "Not found", head=head)
                    m = _API_RE.match(raw_path)
                    if m:
                        repo_type = _TYPES[m["type"]]
                        repo_id = unquote(m["repo"])
                        if m["op"] == "tree":
                            return self._tree(
                                repo_type,
                                repo_id,
                                unquote(m["rev"]),
                                unquote(m["path"] or ""),
                                query,
                                head=head,
                            )
                        if m["op"] == "revision" and m["path"]:
                            return self._error(404, None, "Not found", head=head)
                        return self._info(repo_type, repo_id, unquote(m["rev"] or "main"), query, head=head)
                    m = _RESOLVE_CACHE_RE.match(raw_path)
                    if m:
                        return self._resolve(
                            _TYPES[m["type"]],
                            unquote(m["repo"]),
                            m["sha"],
                            unquote(m["file"]),
                            head=head,
                            cached=True,
                        )
                    m = _RESOLVE_RE.match(raw_path)
                    if m:
                        return self._resolve(
                            _TYPES[m["type"]],
                            unquote(m["repo"]),
                            unquote(m["rev"]),
                            unquote(m["file"]),
                            head=head,
                        )
                    # Unknown route, including `GET /api/agent-harnesses`, which huggingface_hub 2.4 asks for once
                    # per process while building its User-Agent (utils/_detect_agent.py); a 404 there is
                    # swallowed and keeps it from writing $HF_HOME/.agent_harnesses.json.
                    return self._error(
                        404, None, "Sorry, we can't find the page you are looking for.", head=head
                    )
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            # ---------------------------------------------------------- /api/{type}s/{repo}[/revision/{rev}]
            def _info(self, repo_type: str, repo_id: str, rev: str, query: dict, *, head: bool) -> None:
                found = self._repo_at(repo_type, repo_id, rev, head=head)
                if found is None:
                    return
                repo, sha = found
                how = self._misbehaviour(repo_id)
                blobs = query.get("blobs", ["false"])[0].lower() == "true"
                siblings = []
                for f in sorted(repo.commits[sha].values(), key=lambda f: f.path):
                    s = {"rfilename": f.path}
                    if blobs:
                        s.update(size=f.size, blobId=f.blob_id)
                        if f.lfs:
                            s["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": len(f.pointer)}
                    siblings.append(s)
                body = {
                    "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
                    "id": repo_id,
                    "author": repo_id.split("/")[0] if "/" in repo_id else None,
                    "sha": how.commit if how and how.commit is not None else sha,
                    "lastModified": repo.last_modified,
                    "createdAt": repo.last_modified,
                    "private": repo.private,
                    "gated": repo.gated,
                    "disabled": False,
                    "downloads": 0,
                    "likes": 0,
                    "tags": [],
                    "siblings": siblings,
                    "usedStorage": sum(f.size for f in repo.commits[sha].values()),
                }
                if repo_type == "model":
                    body["modelId"] = repo_id
                self._api_json(body, None, how, head=head)

            # ---------------------------------------------------------- /api/{type}s/{repo}/tree/{rev}[/{path}]
            def _tree(
                self, repo_type: str, repo_id: str, rev: str, path: str, query: dict, *, head: bool
            ) -> None:
                found = self._repo_at(repo_type, repo_id, rev, head=head)
                if found is None:
                    return
                repo, sha = found
                files = repo.commits[sha]
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                prefix = path.strip("/") + "/" if path.strip("/") else ""
                dirs: set[str] = set()
                for name in files:
                    parts = name.split("/")[:-1]
                    dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
                if prefix and prefix[:-1] not in dirs:
                    return self._error(
                        404,
                        "EntryNotFound",
                        f'{path} does not exist on "{rev}"',
                        head=head,
                        extra={"X-Repo-Commit": sha},
                    )
                entries = []
                for d in sorted(dirs):
                    if d.startswith(prefix) and (recursive or "/" not in d[len(prefix) :]):
                        entries.append(
                            {"type": "directory", "oid": git_blob_sha1(d.encode()), "size": 0, "path": d}
                        )
                for f in sorted(files.values(), key=lambda f: f.path):
                    if f.path.startswith(prefix) and (recursive or "/" not in f.path[len(prefix) :]):
                        e = {"type": "file", "oid": f.blob_id, "size": f.size, "path": f.path}
                        if f.lfs:
                            e["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(f.pointer)}
                        entries.append(e)
                headers = {}
                if hub.tree_page_size:
                    start = int(query.get("cursor", ["0"])[0])
                    end = start + hub.tree_page_size
                    if end < len(entries):
                        q = {k: v[0] for k, v in query.items()}
                        q["cursor"] = str(end)
                        nxt = f"{hub.url}{urlsplit(self.path).path}?{urlencode(q)}"
                        headers["Link"] = f'<{nxt}>; rel="next"'
                    entries = entries[start:end]
                self._api_json(entries, headers, self._misbehaviour(repo_id), head=head)

            # ---------------------------------------------------------- /{repo}/resolve/{rev}/{file}
            def _resolve(
                self,
                repo_type: str,
                repo_id: str,
                rev: str,
                filename: str,
                *,
                head: bool,
                cached: bool = False,
            ) -> None:
                found = self._repo_at(repo_type, repo_id, rev, head=head)
                if found is None:
                    return
                repo, sha = found
                how = self._misbehaviour(repo_id)
                sha_said = how.header_commit if how and how.header_commit is not None else sha
                token = self._token()
                if repo.gated and token not in repo.tokens:
                    msg = (
                        f"Access to model {repo_id} is restricted. You must have access to it and be "
                        "authenticated to access it. Please log in."
                        if token is None
                        else f"Access to model {repo_id} is restricted and you are not in the authorized list."
                    )
                    return self._error(401 if token is None else 403, "GatedRepo", msg, head=head)
                f = repo.commits[sha].get(filename)
                if f is None:
                    return self._error(
                        404, "EntryNotFound", "Entry not found", head=head, extra={"X-Repo-Commit": sha_said}
                    )
                if how and not how.applies(filename):
                    how = None
                headers = {
                    "X-Repo-Commit": sha_said,
                    "ETag": f'"{f.etag}"',
                    "Accept-Ranges": "bytes",
                    "Content-Type": "application/octet-stream",
                    "Vary": "Origin, Accept-Encoding",
                }
                if how and how.etag is not None:
                    headers["ETag"] = how.etag
                if how and how.xet:
                    headers["X-Xet-Hash"] = f.sha256
                    headers["X-Xet-Refresh-Route"] = f"{hub.url}/api/models/{repo_id}/xet-read-token/{sha}"
                if hub.resolve_cache and not f.lfs and not cached:
                    kind = {"model": "models", "dataset": "datasets", "space": "spaces"}[repo_type]
                    loc = f"/api/resolve-cache/{kind}/{repo_id}/{sha}/{quote(filename)}?" + urlencode(
                        {"etag": headers["ETag"]}
                    )
                    return self._send(307, b"", {**headers, "Location": loc}, head=head)
                if f.lfs:
                    headers["X-Linked-Etag"] = how.etag if how and how.etag is not None else f'"{f.sha256}"'
                    headers["X-Linked-Size"] = str(
                        how.announced_size if how and how.announced_size is not None else f.size
                    )
                    if hub.lfs_redirect:
                        loc = f"{hub.cdn_url}/cdn/{f.sha256}?" + urlencode(
                            {"repo": repo_id, "file": filename}
                        )
                        headers["Location"] = loc
                        return self._send(302, b"", headers, head=head)
                self._body_with_range(f, headers, (repo_id, filename), head=head, how=how)

            def _cdn(self, sha256: str, query: dict, *, head: bool) -> None:
                repo_id, filename = query.get("repo", [""])[0], query.get("file", [""])[0]
                for repo in hub._repos.values():
                    for files in repo.commits.values():
                        for f in files.values():
                            if f.sha256 == sha256:
                                headers = {
                                    "ETag": f'"{f.sha256}"',
                                    "Accept-Ranges": "bytes",
                                    "Content-Type": "application/octet-stream",
                                }
                                how = self._misbehaviour(repo_id or repo.repo_id)
                                if how and not how.applies(filename or f.path):
                                    how = None
                                return self._body_with_range(
                                    f,
                                    headers,
                                    (repo_id or repo.repo_id, filename or f.path),
                                    head=head,
                                    how=how,
                                )
                self._error(404, None, "NoSuchKey", head=head)

            def _misbehaviour(self, repo_id: str) -> Misbehaviour | None:
                """The repo's misbehaviour, once its stall (if any) is over."""
                with hub._lock:
                    how = hub._misbehaviours.get(repo_id)
                if how is not None and how.stall:
                    hub._calm.wait(how.stall)
                self._header_drip = how.header_drip if how is not None else None
                return how

            def _body_with_range(
                self, f: _File, headers: dict, count_as: tuple, *, head: bool, how: Misbehaviour | None = None
            ) -> None:
                rng = None if how and how.ignore_range else self.headers.get("Range")
                if rng and not head:
                    m = _RANGE_RE.match(rng)
                    if m is None:
                        return self._send(
                            416, b"", {**headers, "Content-Range": f"bytes */{f.size}"}, head=head
                        )
                    a, b = m.groups()
                    if a == "" and b == "":
                        return self._send(
                            416, b"", {**headers, "Content-Range": f"bytes */{f.size}"}, head=head
                        )
                    if a == "":  # suffix range: last b bytes
                        start, end = max(f.size - int(b), 0), f.size - 1
                    else:
                        start, end = int(a), (min(int(b), f.size - 1) if b else f.size - 1)
                    if start >= f.size or start > end:
                        return self._send(
                            416, b"", {**headers, "Content-Range": f"bytes */{f.size}"}, head=head
                        )
                    headers = {**headers, "Content-Range": f"bytes {start}-{end}/{f.size}"}
                    return self._send(206, f.data[start : end + 1], headers, head=head, count_as=count_as)
                body = f.data if how is None or how.body_bytes is None else f.data[: how.body_bytes]
                extra = how.extra_bytes if how else 0
                size = how.announced_size if how and how.announced_size is not None else f.size
                length = size + extra if head else len(body) + extra
                self._send(200, body, headers, head=head, count_as=count_as, content_length=length, how=how)

        return Handler


# ---------------------------------------------------------------------- python -m automodel_plugins.testing.fake_hub


def checkpoint_repos(root: Path) -> dict[str, Path]:
    """The repos a directory of checkpoints holds: itself if it has a ``config.json`` (repo id: its name),
    else each ``NAME/`` and ``ORG/NAME/`` below it that has one."""
    root = Path(root)
    if (root / "config.json").is_file():
        return {root.resolve().name: root}
    found = [p.parent for p in [*root.glob("*/config.json"), *root.glob("*/*/config.json")] if p.is_file()]
    return {d.relative_to(root).as_posix(): d for d in sorted(found)}


def main(argv: list[str] | None = None) -> int:
    """Serve a directory of checkpoints as a stand-in hub on 127.0.0.1 until interrupted."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(
        prog="python -m automodel_plugins.testing.fake_hub",
        description="Serve checkpoint directories as hub repos on 127.0.0.1 (DIR/ORG/NAME -> repo ORG/NAME, "
        "DIR/NAME -> NAME; a DIR with a config.json -> repo named after it), for loads without network.",
    )
    parser.add_argument("directory", metavar="DIR", type=Path, help="a checkpoint, or a directory of them")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: any free port)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    args = parser.parse_args(argv)
    repos = checkpoint_repos(args.directory)
    if not repos:
        parser.error(f"no checkpoint (a directory with a config.json) in {args.directory} or below it")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with FakeHub(args.host, args.port) as hub:
        for repo_id, directory in repos.items():
            hub.add_directory(repo_id, directory)
        print(f"fake hub serving {len(repos)} repo(s) at {hub.url} (Ctrl-C stops it)", flush=True)
        for repo_id, directory in repos.items():
            print(f"  {repo_id}  <- {directory}", flush=True)
        print(f"export HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
