"""What a hub (or mirror) answers is checked before huggingface_hub acts on it, and no answer is waited for or
read without bound.

huggingface_hub names cache paths after what the server says: the commit (the API's ``sha``, the
``X-Repo-Commit`` header) becomes ``snapshots/<commit>/``, ``.no_exist/<commit>/`` and the content of
``refs/<revision>``; the ``ETag`` becomes ``blobs/<etag>`` and ``.locks/.../<etag>.lock``. A server answering
``../../x`` would choose where a file is written. While this package talks to a hub (:func:`watching`), hooks on
huggingface_hub's HTTP client (installed on its shared client and on every client its factory builds later)
refuse such answers before huggingface_hub reads them, so nothing is written; they also cap every request's
timeouts by the file's deadline (:data:`DEADLINE_ENV`) and metadata requests by ``HF_HUB_ETAG_TIMEOUT`` (also
huggingface_hub's retries, which would otherwise wait 60 s six times), and count body bytes, so a body longer
than the server announced is cut and a short one is reported with its byte counts.

Outside :func:`watching` (another library's downloads in the same process) the hooks do nothing. Downloads that
huggingface_hub hands to ``hf_xet`` (files the hub stores with Xet) move their bytes outside this client: the
commit and ETag checks apply to them, the byte counts and the deadline do not.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

from automodel_plugins.errors import (
    HubDownloadError,
    HubRevisionNotFoundError,
    UnsafeHubAnswerError,
)

__all__ = [
    "DEADLINE_ENV",
    "Watch",
    "check_commit",
    "check_revision",
    "deadline_seconds",
    "read_at_most",
    "watching",
]

DEADLINE_ENV = "AUTOMODEL_PLUGINS_FILE_DEADLINE"
"""Seconds one file's download (or range read) may take from its first request to its last byte; ``0``: none."""
_DEFAULT_DEADLINE_S = 3600.0

COMMIT = re.compile(r"[0-9a-f]{40}")
_ETAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]{0,254}")
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
_TIMEOUT_KEYS = ("connect", "read", "write", "pool")


def deadline_seconds(repo_id: str) -> float | None:
    """The per-file deadline from :data:`DEADLINE_ENV` (default one hour; ``0`` or less: no deadline)."""
    text = os.environ.get(DEADLINE_ENV, "").strip()
    if not text:
        return _DEFAULT_DEADLINE_S
    try:
        seconds = float(text)
    except ValueError:
        raise HubDownloadError(repo_id, f"{DEADLINE_ENV}={text!r} is not a number of seconds") from None
    return seconds if seconds > 0 else None


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


def _check_etag(value: str, watch: Watch, where: str) -> None:
    normalized = value.lstrip("W/").strip('"')  # as huggingface_hub's _normalize_etag, which names the blob
    if not _ETAG.fullmatch(normalized):
        raise watch.unsafe(
            f"{where} {value!r} is not a plain token (letters, digits, . _ + = -); huggingface_hub names the "
            "cached file after it"
        )


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
def watching(repo_id: str, revision: str | None, filename: str | None, commit: str | None) -> Iterator[Watch]:
    """Check every answer huggingface_hub's client receives in this context (this thread) against ``commit``,
    under the per-file deadline."""
    seconds = deadline_seconds(repo_id)
    watch = Watch(
        repo_id,
        revision,
        filename,
        commit,
        None if seconds is None else time.monotonic() + seconds,
        seconds,
    )
    _install()
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


def _install() -> None:
    """Our hooks on huggingface_hub's shared client, and on every client its factory makes from now on (a
    connection error makes it build a new one)."""
    from huggingface_hub.utils import _http, get_session

    with _LOCK:
        factory = getattr(_http, "_GLOBAL_CLIENT_FACTORY", None)
        if factory is not None and not getattr(factory, "_automodel_plugins_guard", False):

            def guarded_factory(inner: Any = factory) -> Any:
                return _with_hooks(inner())

            guarded_factory._automodel_plugins_guard = True  # type: ignore[attr-defined]
            _http._GLOBAL_CLIENT_FACTORY = guarded_factory
        _with_hooks(get_session())


def _with_hooks(client: Any) -> Any:
    hooks = client.event_hooks
    if _on_request not in hooks.get("request", []) or _on_response not in hooks.get("response", []):
        client.event_hooks = {
            "request": [*hooks.get("request", []), _on_request],
            "response": [*hooks.get("response", []), _on_response],
        }
    return client


def _on_request(request: Any) -> None:
    """No request starts past the deadline; none waits longer than what is left of it (a HEAD: nor longer than
    ``HF_HUB_ETAG_TIMEOUT``)."""
    watch = _WATCH.get()
    if watch is None:
        return
    from huggingface_hub import constants

    caps = []
    remaining = watch.remaining()
    if remaining is not None:
        if remaining <= 0:
            raise watch.overdue()
        caps.append(remaining)
    if request.method == "HEAD":
        caps.append(float(constants.HF_HUB_ETAG_TIMEOUT))
    if caps:
        cap = min(caps)
        timeout = dict(request.extensions.get("timeout") or {})
        for key in _TIMEOUT_KEYS:
            value = timeout.get(key)
            timeout[key] = cap if value is None else min(value, cap)
        request.extensions["timeout"] = timeout


def _on_response(response: Any) -> None:
    """Refuse a commit or ETag that would name a path, before huggingface_hub reads them; count (and bound) the
    body of a file download."""
    watch = _WATCH.get()
    if watch is None:
        return
    headers = response.headers
    method = response.request.method
    if (commit := headers.get("X-Repo-Commit")) is not None:
        check_commit(commit, watch, "X-Repo-Commit")
    if method == "HEAD":
        for name in ("X-Linked-Etag", "ETag"):
            if (etag := headers.get(name)) is not None:
                _check_etag(etag, watch, name)
                break  # huggingface_hub uses the linked ETag when there is one
        size = headers.get("X-Linked-Size") or (
            None if response.is_redirect else headers.get("Content-Length")
        )
        if size is not None and size.isascii() and size.isdigit():
            watch.expected = int(size)
            url = str(response.request.url)
            watch.expected_url = urljoin(url, headers["Location"]) if "Location" in headers else url
        return
    if method != "GET":
        return
    if watch.commit is None and response.status_code == 200 and "/api/" in response.request.url.path:
        _check_api_sha(response, watch)
    elif 200 <= response.status_code < 300:
        limit = watch.expected if str(response.request.url) == watch.expected_url else None
        response.stream = _counted(response.stream, watch, limit)


def _check_api_sha(response: Any, watch: Watch) -> None:
    """The ``sha`` of a repo-info answer (what ``resolve_revision`` writes into ``refs/``)."""
    try:
        data = json.loads(response.read())
    except ValueError:
        return  # not JSON: huggingface_hub reports it
    if isinstance(data, dict) and ("sha" in data or "siblings" in data):
        check_commit(data.get("sha"), watch, "the repo's 'sha'")


class _CountedBody:
    """A response body counted into the watch, cut past the announced size, stopped past the deadline."""

    def __init__(self, inner: Any, watch: Watch, limit: int | None) -> None:
        self.inner = inner
        self.watch = watch
        self.limit = limit

    def __iter__(self) -> Iterator[bytes]:
        watch, limit, taken = self.watch, self.limit, 0
        for chunk in self.inner:
            remaining = watch.remaining()
            if remaining is not None and remaining <= 0:
                raise watch.overdue()
            taken += len(chunk)
            watch.received += len(chunk)
            if limit is not None and taken > limit:
                raise watch.unsafe(
                    f"the server sent more than the {limit} bytes it announced; stopped reading"
                )
            yield chunk

    def close(self) -> None:
        self.inner.close()


_counted_class: type | None = None


def _counted(inner: Any, watch: Watch, limit: int | None) -> Any:
    """:class:`_CountedBody` as an ``httpx2.SyncByteStream`` (which the response checks for; imported late so
    that importing this module stays light)."""
    global _counted_class
    if _counted_class is None:
        import httpx2

        _counted_class = type("CountedStream", (_CountedBody, httpx2.SyncByteStream), {})
    return _counted_class(inner, watch, limit)
