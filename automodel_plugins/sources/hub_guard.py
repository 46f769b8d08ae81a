"""What a hub (or mirror) answers is checked before huggingface_hub acts on it, and no answer is waited for or
read without bound.

huggingface_hub names cache paths after what the server says: the commit (the API's ``sha``, the
``X-Repo-Commit`` header) becomes ``snapshots/<commit>/``, ``.no_exist/<commit>/`` and the content of
``refs/<revision>``; the ``ETag`` becomes ``blobs/<etag>`` and ``.locks/.../<etag>.lock``. A server answering
``../../x`` would choose where a file is written. While this package talks to a hub (:func:`watching`), hooks on
huggingface_hub's HTTP client (added to every client its factory makes, the factory set through its public
``set_client_factory``) refuse such answers before huggingface_hub reads them, so nothing is written. They also:

* cap every request's timeouts by the file's deadline (:data:`DEADLINE_ENV`) and metadata requests by
  ``HF_HUB_ETAG_TIMEOUT`` (also huggingface_hub's retries, which would otherwise wait 60 s six times);
* ask every answer uncompressed and refuse a compressed one (a gzip bomb expands a thousandfold past the
  bounds, which count bytes on the wire);
* bound every body: a file's by the size its metadata announced (a short one is reported with its byte counts),
  every other answer (repo info, tree listings, errors, redirects, a file of no announced size) by
  :data:`METADATA_DEADLINE_ENV`, and all of one call's answers together (each counting :data:`ANSWER_BYTES`
  more, so endless pagination ends) by :data:`METADATA_BYTES_ENV`, which also caps a JSON file's announced
  size;
* bound the status line and headers of every answer by :data:`METADATA_DEADLINE_ENV` (a watchdog shuts the
  connection of a server that drips them: read timeouts bound each wait, not their sum);
* keep metadata on the endpoint: a ``HEAD`` or ``/api/`` request to another origin (a redirect, a pagination
  link) is refused; only a file's bytes may come from elsewhere (the hub's CDN), over http(s), where a redirect
  of a file request sent them;
* keep huggingface_hub on plain HTTP: the Xet headers of a file's metadata are dropped and
  ``is_xet_available`` answers ``False``, so no byte moves through ``hf_xet`` (outside the counts and the
  deadline) and no tree listing cached by ``snapshot_download`` stands in for the checked metadata.

Outside :func:`watching` (another library's downloads in the same process) the hooks do nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from automodel_plugins.errors import (
    HubDownloadError,
    HubGuardUnavailableError,
    HubRevisionNotFoundError,
    UnsafeHubAnswerError,
)

__all__ = [
    "ANSWER_BYTES",
    "DEADLINE_ENV",
    "METADATA_BYTES_ENV",
    "METADATA_DEADLINE_ENV",
    "Watch",
    "check_commit",
    "check_listed_file",
    "check_revision",
    "deadline_seconds",
    "read_at_most",
    "watching",
]

DEADLINE_ENV = "AUTOMODEL_PLUGINS_FILE_DEADLINE"
"""Seconds one file's download (or range read) may take from its first request to its last byte; ``0``: none."""
_DEFAULT_DEADLINE_S = 3600.0
METADATA_BYTES_ENV = "AUTOMODEL_PLUGINS_METADATA_BYTES"
"""Bytes the answers of one call (a commit look-up, a tree listing with all its pages, one file's requests) may
take together, but for a file's announced body: repo info, listings, errors, redirects, a file whose size was
not announced, and :data:`ANSWER_BYTES` for each answer (so endless pagination ends too); ``0``: no limit."""
_DEFAULT_METADATA_BYTES = 64 << 20  # a 100,000-file repo's listing is 34 MB (benchmarks/bench_hub_listing.py)
ANSWER_BYTES = 1024
"""What each answer counts against :data:`METADATA_BYTES_ENV` besides its body (its headers, roughly)."""
METADATA_DEADLINE_ENV = "AUTOMODEL_PLUGINS_METADATA_DEADLINE"
"""Seconds one such answer may take from its headers to its last byte; ``0``: none."""
_DEFAULT_METADATA_DEADLINE_S = 300.0

COMMIT = re.compile(r"[0-9a-f]{40}")
_ETAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,254}")
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
_TIMEOUT_KEYS = ("connect", "read", "write", "pool")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SCHEMES = ("http", "https")
_XET_HEADERS = ("X-Xet-Hash", "X-Xet-Refresh-Route")
_MARK = "_automodel_plugins_guard"


def _setting(name: str, default: float, repo_id: str, unit: str) -> float | None:
    """A positive number from the environment variable ``name`` (``default`` when unset; ``0`` or less: none)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise HubDownloadError(repo_id, f"{name}={text!r} is not a number of {unit}")
    return value if value > 0 else None


def deadline_seconds(repo_id: str) -> float | None:
    """The per-file deadline from :data:`DEADLINE_ENV` (default one hour; ``0`` or less: no deadline)."""
    return _setting(DEADLINE_ENV, _DEFAULT_DEADLINE_S, repo_id, "seconds")


def check_revision(repo_id: str, revision: str) -> None:
    """Refuse a ``revision`` that no branch, tag or commit can have (git's ref-name rules, which the hub's refs
    follow), before any request: huggingface_hub writes ``refs/<revision>``, so ``../../x`` would be a path
    outside the cache. Branches with ``/`` (``refs/pr/1``, ``feature/x``) are fine."""
    why = (
        _bad_ref(revision)
        if isinstance(revision, str)
        else f"it is a {type(revision).__name__}, not a string"
    )
    if why is None:
        return
    error = HubRevisionNotFoundError(
        repo_id, f"revision {revision!r} cannot name a branch, tag or commit: {why}", revision=None
    )
    error.revision = revision
    raise error


def _bad_ref(revision: str) -> str | None:
    if not revision:
        return "it is empty"
    if _REF_FORBIDDEN.search(revision):
        return "it contains a space, a control character, a backslash or one of ~ ^ : ? * ["
    if revision.startswith("/") or revision.endswith("/") or "//" in revision:
        return "it starts or ends with '/' or has an empty path segment"
    if ".." in revision:
        return "it contains '..'"
    if "@{" in revision or revision == "@":
        return "it contains '@{' or is '@'"
    segments = revision.split("/")
    if any(s.startswith(".") or s.endswith((".lock", ".")) for s in segments):
        return "a path segment starts with '.' or ends with '.' or '.lock'"
    if any(len(s.encode()) > 255 for s in segments):
        return "a path segment is longer than 255 bytes"
    return None


def check_commit(value: Any, watch: Watch, where: str) -> str:
    """``value`` if it is a 40-hex commit (and the one ``watch`` expects, if any); :class:`UnsafeHubAnswerError`
    otherwise."""
    if not (isinstance(value, str) and COMMIT.fullmatch(value)):
        raise watch.unsafe(
            f"{where} {value!r} is not a 40-hex commit id; refusing to write a path named after it"
        )
    if watch.commit is not None and value != watch.commit:
        raise watch.unsafe(f"{where} {value!r} is not the commit asked for ({watch.commit})")
    return value


def check_listed_file(path: Any, size: Any, watch: Watch) -> None:
    """A tree listing's file entry: a plain relative name (no ``..`` or ``.`` segment, no leading ``/``, no
    backslash or control character: the name is reported, and ``convert`` fetches and copies files by it) and a
    size that is a number of bytes."""
    if not (
        isinstance(path, str)
        and path
        and not path.startswith("/")
        and "\\" not in path
        and not _CONTROL.search(path)
        and all(part not in ("", ".", "..") for part in path.split("/"))
    ):
        raise watch.unsafe(
            f"the tree listing's entry {path!r} is not a plain relative file name (a '..' or '.' segment, a "
            "leading '/', a backslash or a control character); refusing to use it"
        )
    if not (isinstance(size, int) and not isinstance(size, bool) and size >= 0):
        raise watch.unsafe(f"the tree listing's size {size!r} for {path!r} is not a number of bytes")


def _check_etag(value: str, watch: Watch, where: str) -> str:
    """The blob name huggingface_hub makes of ``value``, when it is a plain token."""
    normalized = value.lstrip("W/").strip('"')  # as huggingface_hub's _normalize_etag, which names the blob
    if not _ETAG.fullmatch(normalized):
        raise watch.unsafe(
            f"{where} {value!r} is not a plain token (letters, digits, . _ + = -); huggingface_hub names the "
            "cached file after it"
        )
    return normalized


@dataclass
class Watch:
    """One file's (or one commit look-up's) requests: what the answers must say, its deadline, its bytes."""

    repo_id: str
    revision: str | None
    filename: str | None
    commit: str | None
    """The commit every ``X-Repo-Commit`` must name; ``None`` while it is being resolved (then the API's
    ``sha`` is checked)."""
    deadline: float | None
    """``time.monotonic()`` past which no request starts and no body chunk is accepted."""
    seconds: float | None
    expected: int | None = None
    """Bytes the file's metadata (``X-Linked-Size`` / ``Content-Length`` of the HEAD) announced."""
    expected_url: str | None = None
    """Where that file's body comes from (the HEAD's URL, or where it redirects): only its body is bounded."""
    received: int = 0
    """Body bytes of the file received so far, over every attempt."""
    metadata_bytes: int | None = None
    """The most bytes of the answers, but for the file's announced body (:data:`METADATA_BYTES_ENV`)."""
    metadata_used: int = 0
    """What the answers took of it so far."""
    metadata_seconds: float | None = None
    """The most seconds such an answer's body may take (:data:`METADATA_DEADLINE_ENV`)."""
    stalled: HubDownloadError | None = None
    """Set when an answer's headers did not arrive in time (its connection was then shut): raised for every
    later request of the watch, and by the callers in place of the HTTP client's error."""
    elsewhere: set[tuple[str, str, int]] = field(default_factory=set)
    """Origins off the endpoint that a redirect of a file request (or a file's metadata) sent its bytes to."""
    on_size: Callable[[int, str | None], None] | None = None
    """Called with a file's announced size and ``ETag`` (normalized) when its ``HEAD`` answers, before its
    body is asked for: raising refuses the file (the caller's disk-space and header checks)."""

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def unsafe(self, message: str) -> UnsafeHubAnswerError:
        return UnsafeHubAnswerError(self.repo_id, message, revision=self.revision, filename=self.filename)

    def error(self, message: str) -> HubDownloadError:
        return HubDownloadError(self.repo_id, message, revision=self.revision, filename=self.filename)

    def counts(self) -> str:
        of = f" of the {self.expected} announced" if self.expected is not None else ""
        return f"{self.received} bytes received{of}"

    def overdue(self) -> HubDownloadError:
        return self.error(
            f"not done within its {self.seconds:g} s deadline ({DEADLINE_ENV}; 0 turns it off): {self.counts()}"
        )


_WATCH: ContextVar[Watch | None] = ContextVar("automodel_plugins_hub_watch", default=None)
_LOCK = threading.Lock()


@contextmanager
def watching(
    repo_id: str,
    revision: str | None,
    filename: str | None,
    commit: str | None,
    *,
    on_size: Callable[[int, str | None], None] | None = None,
) -> Iterator[Watch]:
    """Check every answer huggingface_hub's client receives in this context (this thread) against ``commit``,
    under the per-file deadline (``on_size``: :attr:`Watch.on_size`)."""
    seconds = deadline_seconds(repo_id)
    metadata_bytes = _setting(METADATA_BYTES_ENV, _DEFAULT_METADATA_BYTES, repo_id, "bytes")
    watch = Watch(
        repo_id,
        revision,
        filename,
        commit,
        None if seconds is None else time.monotonic() + seconds,
        seconds,
        metadata_bytes=None if metadata_bytes is None else int(metadata_bytes),
        metadata_seconds=_setting(METADATA_DEADLINE_ENV, _DEFAULT_METADATA_DEADLINE_S, repo_id, "seconds"),
        on_size=on_size,
    )
    _install(repo_id)
    token = _WATCH.set(watch)
    try:
        yield watch
    finally:
        _WATCH.reset(token)


def read_at_most(response: Any, limit: int) -> bytes:
    """At most ``limit`` bytes of a streamed ``response``'s body; the rest is never read (closing the response
    drops the connection)."""
    data = bytearray()
    if limit <= 0:
        return b""
    for chunk in response.iter_bytes():
        data += chunk[: limit - len(data)]
        if len(data) >= limit:
            break
    return bytes(data)


# --- the hooks ---------------------------------------------------------------------------------------------

_FACTORY_NAME = "_GLOBAL_CLIENT_FACTORY"
"""huggingface_hub's current client factory, in ``huggingface_hub.utils._http``: it has a public setter
(``set_client_factory``) but no getter, and the factory is wrapped, not replaced, to keep one the user set."""
_XET_NAME = "is_xet_available"
"""The name ``huggingface_hub.file_download`` decides Xet downloads (and its tree-listing shortcut) by."""


def _install(repo_id: str) -> None:
    """Our hooks on every client huggingface_hub's factory makes (the factory wrapped, whoever set it, through
    its public ``set_client_factory``, which also closes the shared client so the next is made with them), and
    Xet off for our calls. Without the names this relies on, a typed error: never a download unchecked."""
    import huggingface_hub
    from huggingface_hub import close_session, file_download, get_session, set_client_factory
    from huggingface_hub.utils import _http

    with _LOCK:
        factory = getattr(_http, _FACTORY_NAME, None)
        xet = getattr(file_download, _XET_NAME, None)
        missing = [
            name
            for name, found in (
                (f"utils._http.{_FACTORY_NAME}", factory),
                (f"file_download.{_XET_NAME}", xet),
            )
            if not callable(found)
        ]
        if missing:
            raise HubGuardUnavailableError(
                repo_id,
                f"huggingface_hub {huggingface_hub.__version__} has no {' or '.join(missing)}, through which this "
                "package checks a hub's answers: refusing to download unchecked (install a huggingface_hub "
                "release this package supports)",
            )
        if not getattr(factory, _MARK, False):
            set_client_factory(_guarded_factory(factory))
        if not getattr(xet, _MARK, False):
            file_download.is_xet_available = _guarded_xet(xet)  # type: ignore[attr-defined]
        if not _has_hooks(get_session()):
            close_session()  # made before (or around) the factory: the next one comes from it
            if not _has_hooks(get_session()):
                raise HubGuardUnavailableError(
                    repo_id,
                    "huggingface_hub's HTTP client does not keep the hooks this package checks a hub's answers "
                    "with: refusing to download unchecked",
                )


def _guarded_factory(inner: Callable[[], Any]) -> Callable[[], Any]:
    def guarded_factory() -> Any:
        return _with_hooks(inner())

    setattr(guarded_factory, _MARK, True)
    return guarded_factory


def _guarded_xet(inner: Callable[[], bool]) -> Callable[[], bool]:
    def is_xet_available() -> bool:
        """``False`` inside :func:`watching` (our downloads go over plain HTTP, through the checks)."""
        return _WATCH.get() is None and inner()

    setattr(is_xet_available, _MARK, True)
    return is_xet_available


def _has_hooks(client: Any) -> bool:
    hooks = client.event_hooks
    return _on_request in hooks.get("request", []) and _on_response in hooks.get("response", [])


def _with_hooks(client: Any) -> Any:
    hooks = client.event_hooks
    if not _has_hooks(client):
        client.event_hooks = {
            "request": [*hooks.get("request", []), _on_request],
            "response": [*hooks.get("response", []), _on_response],
        }
    return client


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme, 0)
    return parts.scheme, (parts.hostname or "").lower(), port


def _is_metadata(method: str, url: Any) -> bool:
    """A request whose answer is metadata (a file's ``HEAD``, the API): it must stay on the endpoint."""
    return method == "HEAD" or url.path.startswith("/api/")


def _on_request(request: Any) -> None:
    """No request leaves the endpoint unless a file's redirect sent it (and never for metadata); none starts
    past the deadline; none waits longer than what is left of it (metadata: nor longer than
    ``HF_HUB_ETAG_TIMEOUT`` for a ``HEAD``, :data:`METADATA_DEADLINE_ENV` for the API)."""
    watch = _WATCH.get()
    if watch is None:
        return
    from huggingface_hub import constants

    if watch.stalled is not None:
        raise watch.stalled
    url = str(request.url)
    metadata = _is_metadata(request.method, request.url)
    if request.url.scheme not in _SCHEMES:
        raise watch.unsafe(f"{request.method} {url}: only http and https locations are followed")
    origin = _origin(url)
    if origin != _origin(constants.ENDPOINT) and (metadata or origin not in watch.elsewhere):
        what = "metadata is read only from the endpoint" if metadata else "no file redirect led there"
        raise watch.unsafe(
            f"{request.method} {url} is another origin than the endpoint {constants.ENDPOINT}: {what}"
        )
    request.headers["Accept-Encoding"] = "identity"  # the bounds count bytes on the wire: no compression
    caps = []
    remaining = watch.remaining()
    if remaining is not None:
        if remaining <= 0:
            raise watch.overdue()
        caps.append(remaining)
    if request.method == "HEAD":
        caps.append(float(constants.HF_HUB_ETAG_TIMEOUT))
    elif metadata and watch.metadata_seconds is not None:
        caps.append(watch.metadata_seconds)
    if caps:
        cap = min(caps)
        timeout = dict(request.extensions.get("timeout") or {})
        for key in _TIMEOUT_KEYS:
            value = timeout.get(key)
            timeout[key] = cap if value is None else min(value, cap)
        request.extensions["timeout"] = timeout
    header_caps = [c for c in (remaining, watch.metadata_seconds) if c is not None]
    if header_caps:
        _HeaderWatchdog(watch, request, min(header_caps)).attach()


class _HeaderWatchdog:
    """Shuts a request's connection when its answer's status line and headers are not in within ``seconds``.

    Read timeouts bound each wait, not the sum: a server sending a header byte now and then is never caught by
    them, and the response hooks only run once the headers are in. The connection's socket comes from the
    HTTP client's ``trace`` extension (its connect and TLS events); ``Connection: close`` keeps every watched
    request on a connection of its own, so each is seen connecting. Shutting the socket makes the blocked
    read return; the watch then carries the error (:attr:`Watch.stalled`). A request that reuses a connection
    opened outside the checks (another library's, kept alive) has no socket here: it ends at its read
    timeouts, and fails then with the same error.
    """

    def __init__(self, watch: Watch, request: Any, seconds: float) -> None:
        self.watch = watch
        self.what = f"the answer to {request.method} {request.url.path}"
        self.seconds = seconds
        self.request = request
        self.inner = request.extensions.get("trace")
        self.socket: Any = None
        self.timer: threading.Timer | None = None
        self.lock = threading.Lock()
        self.done = False

    def attach(self) -> None:
        self.request.headers["Connection"] = "close"
        self.request.extensions["trace"] = self
        self.timer = threading.Timer(self.seconds, self.fire)
        self.timer.daemon = True
        self.timer.start()

    def __call__(self, name: str, info: dict[str, Any]) -> None:
        if name in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            stream = info.get("return_value")
            with self.lock:
                self.socket = None if stream is None else stream.get_extra_info("socket")
        elif name.endswith(("receive_response_headers.complete", ".failed")):
            self.cancel()
        if self.inner is not None:
            self.inner(name, info)

    def cancel(self) -> None:
        with self.lock:
            self.done = True
        if self.timer is not None:
            self.timer.cancel()

    def fire(self) -> None:
        import socket

        with self.lock:
            if self.done:
                return
            self.done = True
            sock = self.socket
        self.watch.stalled = self.watch.error(
            f"{self.what} sent no complete headers within {self.seconds:g} s ({METADATA_DEADLINE_ENV}, "
            f"{DEADLINE_ENV}; 0 turns them off); the connection was closed"
        )
        if sock is not None:
            with suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)


def _on_response(response: Any) -> None:
    """Refuse a commit, ETag or location that would name a path or leave the endpoint, before huggingface_hub
    reads them; bound (and count) every body."""
    if isinstance(watchdog := response.request.extensions.get("trace"), _HeaderWatchdog):
        watchdog.cancel()  # the headers are in
    watch = _WATCH.get()
    if watch is None:
        return
    headers = response.headers
    request = response.request
    method = request.method
    url = str(request.url)
    watch.metadata_used += ANSWER_BYTES
    if watch.metadata_bytes is not None and watch.metadata_used > watch.metadata_bytes:
        raise _past_metadata_limit(watch, response)
    if (commit := headers.get("X-Repo-Commit")) is not None:
        check_commit(commit, watch, "X-Repo-Commit")
    # the file's own GET (where its metadata pointed: a CDN, or the hub's /api/resolve-cache/ for small files);
    # in a one-file watch every GET without a range is that file's
    file_get = method == "GET" and (
        url == watch.expected_url or (watch.filename is not None and "Range" not in request.headers)
    )
    file_body = file_get and not response.is_redirect and watch.expected is not None
    if response.has_redirect_location:
        target = _location(response, watch)
        if method == "HEAD" or file_get or (method == "GET" and not _is_metadata(method, request.url)):
            watch.elsewhere.add(_origin(target))  # a file's bytes may come from there (the hub's CDN)
            if url == watch.expected_url:
                watch.expected_url = target  # the file's body follows its redirects
    if method == "HEAD":
        for name in _XET_HEADERS:  # plain HTTP, through these checks (huggingface_hub's HF_HUB_DISABLE_XET)
            if name in headers:
                del headers[name]
        blob = None
        for name in ("X-Linked-Etag", "ETag"):
            if (etag := headers.get(name)) is not None:
                blob = _check_etag(etag, watch, name)
                break  # huggingface_hub uses the linked ETag when there is one
        size = headers.get("X-Linked-Size") or (
            None if response.is_redirect else headers.get("Content-Length")
        )
        if size is not None and size.isascii() and size.isdigit():
            limit = watch.metadata_bytes
            if limit is not None and (watch.filename or "").endswith(".json") and int(size) > limit:
                raise watch.unsafe(
                    f"the hub announces {int(size)} bytes for a JSON file, more than the {limit} that metadata "
                    f"may take ({METADATA_BYTES_ENV}); not downloading it"
                )
            watch.expected = int(size)
            watch.expected_url = _location(response, watch) if "Location" in headers else url
            if watch.on_size is not None:
                watch.on_size(int(size), blob)
        return
    encoding = headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise watch.unsafe(
            f"{_what(response)} is {encoding!r}-encoded though asked uncompressed (Accept-Encoding: identity): "
            "the bounds count bytes on the wire, and a compressed body can expand a thousandfold; not reading it"
        )
    ok = 200 <= response.status_code < 300
    if file_body and ok:
        bound = _Bound(watch.expected, lambda: _longer_than_announced(watch), counted=True)
    elif ok and "Range" in request.headers and not _is_metadata(method, request.url):
        bound = _Bound(None, counted=True)  # the caller reads only what it asked for (read_at_most)
    else:
        bound = _metadata_bound(response, watch)
    response.stream = _counted(response.stream, watch, bound)
    if watch.commit is None and response.status_code == 200 and request.url.path.startswith("/api/"):
        _check_api_sha(response, watch)


def _longer_than_announced(watch: Watch) -> UnsafeHubAnswerError:
    return watch.unsafe(f"the server sent more than the {watch.expected} bytes it announced; stopped reading")


def _location(response: Any, watch: Watch) -> str:
    """Where a redirect leads, as the HTTP client joins and spells it (so it compares with its request URLs);
    http(s) only."""
    location = response.headers["Location"]
    try:
        target = response.request.url.join(location)
    except Exception:
        target = None
    if target is None or target.scheme not in _SCHEMES:
        raise watch.unsafe(
            f"{_what(response)} redirects to {location}: only http and https locations are followed"
        )
    return str(target)


def _what(response: Any) -> str:
    return f"the answer to {response.request.method} {response.request.url.path}"


def _past_metadata_limit(watch: Watch, response: Any) -> UnsafeHubAnswerError:
    return watch.unsafe(
        f"{_what(response)} goes past the {watch.metadata_bytes} bytes that one call's answers may take together "
        f"({METADATA_BYTES_ENV}: repo info, listings with all their pages, errors, redirects, each answer "
        f"counting {ANSWER_BYTES} bytes more; a file's announced body apart); stopped reading"
    )


def _metadata_bound(response: Any, watch: Watch) -> _Bound:
    """An answer other than a file's announced body: within what is left of :data:`METADATA_BYTES_ENV` (a
    larger ``Content-Length`` is refused before reading), within :data:`METADATA_DEADLINE_ENV` seconds."""
    limit, seconds = watch.metadata_bytes, watch.metadata_seconds
    length = response.headers.get("Content-Length", "")
    if limit is not None and length.isascii() and length.isdigit():
        left = limit - watch.metadata_used
        if int(length) > left:
            raise watch.unsafe(
                f"{_what(response)} announces {int(length)} bytes, more than the {left} left of the {limit} "
                f"bytes that one call's answers may take together ({METADATA_BYTES_ENV}); not reading it"
            )

    def late(taken: int) -> Exception:
        return watch.error(
            f"{_what(response)} was not complete within its {seconds:g} s deadline ({METADATA_DEADLINE_ENV}; "
            f"0 turns it off): {taken} bytes received"
        )

    until = None if seconds is None else time.monotonic() + seconds
    return _Bound(None, lambda: _past_metadata_limit(watch, response), until=until, late=late, metadata=True)


def _check_api_sha(response: Any, watch: Watch) -> None:
    """The ``sha`` of a repo-info answer (what ``resolve_revision`` writes into ``refs/``), read within its
    bound."""
    body = response.read()  # outside the try: a bound's error is a ValueError too (ConfigError)
    try:
        data = json.loads(body)
    except ValueError:
        return  # not JSON: huggingface_hub reports it
    if isinstance(data, dict) and ("sha" in data or "siblings" in data):
        check_commit(data.get("sha"), watch, "the repo's 'sha'")


@dataclass
class _Bound:
    """How far one body may go: ``limit`` bytes, or for ``metadata`` what is left of the watch's metadata
    bytes (then ``too_long()``); until ``until`` (then ``late(bytes)``); whether its bytes are the file's
    (``counted`` into the watch)."""

    limit: int | None
    too_long: Callable[[], Exception] | None = None
    until: float | None = None
    late: Callable[[int], Exception] | None = None
    counted: bool = False
    metadata: bool = False


class _CountedBody:
    """A response body bounded as :class:`_Bound` says, and stopped past the file's deadline."""

    def __init__(self, inner: Any, watch: Watch, bound: _Bound) -> None:
        self.inner = inner
        self.watch = watch
        self.bound = bound

    def __iter__(self) -> Iterator[bytes]:
        watch, bound, taken = self.watch, self.bound, 0
        for chunk in self.inner:
            remaining = watch.remaining()
            if remaining is not None and remaining <= 0:
                raise watch.overdue()
            taken += len(chunk)
            if bound.counted:
                watch.received += len(chunk)
            if bound.until is not None and bound.late is not None and time.monotonic() > bound.until:
                raise bound.late(taken)
            if bound.metadata:
                watch.metadata_used += len(chunk)
                over = watch.metadata_bytes is not None and watch.metadata_used > watch.metadata_bytes
            else:
                over = bound.limit is not None and taken > bound.limit
            if over and bound.too_long is not None:
                raise bound.too_long()
            yield chunk

    def close(self) -> None:
        self.inner.close()


_counted_class: type | None = None


def _counted(inner: Any, watch: Watch, bound: _Bound) -> Any:
    """:class:`_CountedBody` as an ``httpx2.SyncByteStream`` (which the response checks for; imported late so
    that importing this module stays light)."""
    global _counted_class
    if _counted_class is None:
        import httpx2

        _counted_class = type("CountedStream", (_CountedBody, httpx2.SyncByteStream), {})
    return _counted_class(inner, watch, bound)
