"""Checkpoints named by a Hugging Face Hub repo id, fetched file by file into the Hugging Face cache.

A load reads ``config.json``, ``model.safetensors.index.json`` and the shard files that index names (or the one
``model.safetensors``), so those are the only files ever downloaded, each when it is asked for: Mistral repos
also carry a Mistral-native ``consolidated.safetensors`` as large as the shards together, which a
``snapshot_download`` would fetch too. ``*.bin``, ``*.pth``, ``*.gguf`` and code are never fetched: only
``.json`` and ``.safetensors`` names are. What is not yet downloaded can still be described: its safetensors
header comes from two HTTP range requests (the 8-byte length, then the header), no tensor data.

Everything goes through ``huggingface_hub``: its cache (``HF_HOME`` / ``HF_HUB_CACHE`` / ``cache_dir``, shared
with transformers and vLLM), its token (``token``, ``HF_TOKEN``, ``hf auth login``), its endpoint
(``HF_ENDPOINT``), its offline switch (``HF_HUB_OFFLINE`` / ``local_files_only``) and its file locks, so that
processes fetching the same file make one download. The branch or tag is resolved to a commit once, and every
file is fetched at that commit: a push during a load cannot mix two versions, and cached files need no request.
"""

from __future__ import annotations

import contextvars
import socket
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

import automodel_plugins.errors as errors
from automodel_plugins._version import __version__
from automodel_plugins.errors import (
    HubAccessError,
    HubDownloadError,
    HubError,
    HubFileNotFoundError,
    HubOfflineError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    in_cli,
    option,
)
from automodel_plugins.progress import progress_enabled
from automodel_plugins.sources import shared
from automodel_plugins.sources.head import header_length
from automodel_plugins.sources.hub_guard import (
    COMMIT,
    Watch,
    check_commit,
    check_listed_file,
    check_revision,
    read_at_most,
    watching,
)
from automodel_plugins.sources.hub_space import SpaceBudget
from automodel_plugins.sources.location import (
    CONFIG_NAME,
    INDEX_NAME,
    NATIVE_INDEX_NAME,
    NATIVE_SAFETENSORS_NAME,
    PARAMS_NAME,
    SAFETENSORS_NAME,
    CheckpointLocation,
    Weights,
)
from automodel_plugins.sources.options import HubOptions

__all__ = ["FETCHED_SUFFIXES", "HubLocation", "is_repo_id"]

FETCHED_SUFFIXES = (".json", ".safetensors")
"""The only kinds of file ever fetched from a repo: configs, indexes and safetensors weights."""

_ERROR_BODY_BYTES = 1 << 16
_PARALLEL_DOWNLOADS = 8
_LIBRARY = "automodel-plugins"

T = TypeVar("T")


def is_repo_id(text: str) -> bool:
    """Whether ``text`` can name a hub repo (``name`` or ``org/name`` by huggingface_hub's rules) rather than a
    path: not absolute or explicitly relative, not a file name (``.json`` / ``.safetensors``)."""
    if not text or text.startswith((".", "/", "~")) or "\\" in text or text.endswith(FETCHED_SUFFIXES):
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


class HubLocation(CheckpointLocation):
    """A model repo on the hub, its files fetched into the Hugging Face cache only when asked for.

    ``directory`` is the cache snapshot of the resolved commit (``.../models--org--name/snapshots/<sha>``),
    where every fetched file appears under its repo name. ``collective``: under ``torch.distributed``, fetches
    (and the commit and header look-ups) are made by one rank per machine while the others wait.
    """

    named_weights = None

    def __init__(self, repo_id: str, options: HubOptions | None = None) -> None:
        if options is not None and options.revision is not None:
            check_revision(repo_id, options.revision)  # before any request: huggingface_hub writes refs/<rev>
        self.repo_id = repo_id
        self.given = repo_id
        self.options = options or HubOptions()
        self._commit: str | None = None
        self._native: bool | None = None
        self._heads: dict[str, tuple[bytes, int]] = {}

    def __repr__(self) -> str:
        at = f"@{self.options.revision}" if self.options.revision else ""
        return f"HubLocation({self.repo_id + at!r})"

    # --- where things are ----------------------------------------------------------------------------------

    @property
    def is_remote(self) -> bool:
        return True

    @property
    def offline(self) -> bool:
        """No requests at all: ``local_files_only=True`` or ``HF_HUB_OFFLINE`` (read on every call)."""
        from huggingface_hub import constants

        return bool(self.options.local_files_only) or constants.is_offline_mode()

    @property
    def cache_root(self) -> Path:
        """The hub cache in use: ``cache_dir``, else ``HF_HUB_CACHE`` (by default ``$HF_HOME/hub``)."""
        from huggingface_hub import constants

        root = self.options.cache_dir if self.options.cache_dir is not None else constants.HF_HUB_CACHE
        return Path(root).expanduser().resolve()

    @property
    def commit(self) -> str:
        """The 40-hex commit ``revision`` (default: the main branch) points at, asked once."""
        if self._commit is None:
            self._commit = self._shared([], lambda _: self._resolve_commit(), scope=None)
        return self._commit

    @property
    def directory(self) -> Path:
        from huggingface_hub.file_download import repo_folder_name

        folder = repo_folder_name(repo_id=self.repo_id, repo_type="model")
        return self.cache_root / folder / "snapshots" / self.commit

    # --- the location API ----------------------------------------------------------------------------------

    @property
    def config(self) -> Path:
        """``config.json``; in a repo without one but with Mistral's ``params.json``, that (fetched to know)."""
        return self.directory / (PARAMS_NAME if self._is_native_repo() else CONFIG_NAME)

    def config_file(self) -> Path:
        if not self._fetch_optional(CONFIG_NAME) and not self._is_native_repo():
            raise HubFileNotFoundError(
                self.repo_id,
                f"no {CONFIG_NAME} (nor Mistral's {PARAMS_NAME}) at this revision: not a transformers checkpoint",
                revision=self.options.revision,
                filename=CONFIG_NAME,
            )
        return self.config

    def has_config(self) -> bool:
        return self._fetch_optional(CONFIG_NAME) or self._is_native_repo()

    def _is_native_repo(self) -> bool:
        """Mistral's native form: no ``config.json`` but a ``params.json`` (each fetched at most once)."""
        if self._native is None:
            self._native = not self._fetch_optional(CONFIG_NAME) and self._fetch_optional(PARAMS_NAME)
        return self._native

    def weights(self) -> Weights:
        """The index (fetched), else ``model.safetensors`` (not fetched: :meth:`file` or :meth:`fetch` it).

        As in transformers, a repo's weights are its index or its ``model.safetensors``; other
        ``*.safetensors`` files (``consolidated.safetensors``) are never candidates, except in a native-only
        repo (``params.json`` and no ``config.json``): there the weights are ``consolidated.safetensors.index.json``
        and the shards it lists, else ``consolidated.safetensors``, and nothing else is downloaded.
        """
        try:
            if self._fetch_optional(
                INDEX_NAME
            ):  # asked first: an HF repo's weights never wait on params.json
                return Weights(index=self.directory / INDEX_NAME)
        except HubOfflineError:
            # a cache holding only the single file (or a native repo's files) is fine offline
            if not (
                self.is_local(SAFETENSORS_NAME)
                or (self.is_local(PARAMS_NAME) and not self.is_local(CONFIG_NAME))
            ):
                raise
        if self._is_native_repo():
            if self._fetch_optional(NATIVE_INDEX_NAME):
                return Weights(index=self.directory / NATIVE_INDEX_NAME)
            return Weights(file=self.directory / NATIVE_SAFETENSORS_NAME)
        return Weights(file=self.directory / SAFETENSORS_NAME)

    def file(self, name: str) -> Path:
        """The local path of ``name``, downloaded by this process if it is not in the cache yet."""
        path = self.directory / name
        if not path.is_file():
            self._download_all([name], optional=False)
        return path

    def is_local(self, name: str) -> bool:
        return (self.directory / name).is_file()

    def fetch(self, names: Iterable[str]) -> None:
        """Download every file of ``names`` not yet in the cache (once per machine when collective)."""
        self._fetch(names, optional=False)

    def header_bytes(self, names: Iterable[str]) -> dict[str, tuple[bytes, int]]:
        """For each of ``names`` not in the cache: its first ``8 + header length`` bytes and its size, read with
        two range requests (asked once for all ranks when collective)."""
        self.commit  # noqa: B018 - resolved by every rank before one of them reads at it
        wanted = sorted({name for name in names if not self.is_local(name)})
        for name in wanted:
            self._check_fetchable(name)
        heads = self._shared(wanted, self._read_heads, scope=None)
        self._heads.update(heads)
        return {name: heads[name] for name in wanted}

    def size(self, name: str) -> int:
        """Bytes of ``name``: from the cache, else from the range request that read its header."""
        path = self.directory / name
        if path.is_file():
            return path.stat().st_size
        if name not in self._heads:
            self.header_bytes([name])
        return self._heads[name][1]

    def repo_files(self) -> dict[str, int] | None:
        """Every file of the repo at the commit and its size (one listing request); ``None`` offline."""
        if self.offline:
            return None
        from huggingface_hub import HfApi
        from huggingface_hub.hf_api import RepoFile

        api = HfApi(library_name=_LIBRARY, library_version=__version__)
        commit = self.commit
        with watching(self.repo_id, self.options.revision, None, commit) as watch:
            try:
                entries = api.list_repo_tree(
                    self.repo_id, revision=commit, recursive=True, token=self.options.token
                )
                files = [entry for entry in entries if isinstance(entry, RepoFile)]
            except Exception as exc:
                raise self._error(watch.stalled or exc) from exc
            for entry in files:
                check_listed_file(entry.path, entry.size, watch)
        return {entry.path: entry.size for entry in files}

    # --- fetching ------------------------------------------------------------------------------------------

    def _fetch_optional(self, name: str) -> bool:
        """Fetch ``name`` if the repo has it; False when the repo (at this commit) has no such file."""
        self._fetch([name], optional=True)
        return self.is_local(name)

    def _fetch(self, names: Iterable[str], *, optional: bool) -> None:
        names = sorted(set(names))
        for name in names:
            self._check_fetchable(name)
        self.commit  # noqa: B018 - resolved by every rank before one of them downloads at it
        scope = f"{socket.gethostname()}:{self.cache_root}"
        self._shared(names, lambda union: self._download_all(union, optional=optional), scope=scope)

    def _check_fetchable(self, name: str) -> None:
        if not name.endswith(FETCHED_SUFFIXES):
            raise HubFileNotFoundError(
                self.repo_id,
                f"refusing to fetch {name!r}: only .json and .safetensors files are ever downloaded",
                revision=self.options.revision,
                filename=name,
            )

    def _download_all(self, names: list[str], *, optional: bool) -> None:
        """Download ``names`` that are not cached (several at once); a missing one fails unless ``optional``.

        None is downloaded past the free space of the cache's disk (:mod:`.hub_space`): those whose sizes the
        range requests for their headers gave are checked together before any request, every one again when
        its ``HEAD`` announces its size.
        """
        needed = [name for name in names if not self.is_local(name)]
        if not needed:
            return
        from huggingface_hub.file_download import repo_folder_name

        blobs = self.cache_root / repo_folder_name(repo_id=self.repo_id, repo_type="model") / "blobs"
        known = {name: self._heads[name][1] for name in needed if name in self._heads}
        space = SpaceBudget(self.repo_id, self.options.revision, blobs, known)
        space.check_known()
        found = dict(zip(needed, _in_threads(lambda name: self._download(name, space), needed), strict=True))
        absent = [name for name, ok in found.items() if not ok]
        if absent and not optional:
            raise self._missing(absent)

    def _missing(self, names: list[str]) -> HubFileNotFoundError:
        hint = (
            f" (a repo's weights are {INDEX_NAME} or {SAFETENSORS_NAME}; consolidated.safetensors, Mistral's own "
            "layout, is not read)"
            if SAFETENSORS_NAME in names
            else ""
        )
        return HubFileNotFoundError(
            self.repo_id,
            f"the repo has no {', '.join(names)} at commit {self.commit}{hint}",
            revision=self.options.revision,
            filename=names[0],
        )

    def _download(self, name: str, space: SpaceBudget) -> bool:
        """``hf_hub_download`` of one file at the commit; False when the repo has no such file."""
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RemoteEntryNotFoundError

        def announced(size: int, blob: str | None) -> None:
            self._check_announced(name, size, watch)
            space.claim(name, size, blob)
            _check_plain_http(size, watch)

        with watching(self.repo_id, self.options.revision, name, self.commit, on_size=announced) as watch:
            try:
                hf_hub_download(
                    self.repo_id,
                    name,
                    revision=self.commit,
                    cache_dir=self.options.cache_dir,
                    token=self.options.token,
                    local_files_only=self.offline,
                    tqdm_class=_bar_class(self.options.progress),
                    library_name=_LIBRARY,
                    library_version=__version__,
                )
            except RemoteEntryNotFoundError:
                return False
            except LocalEntryNotFoundError as exc:
                if self._known_missing(name):
                    return False
                raise self._error(exc, name) from exc
            except Exception as exc:
                if watch.stalled is not None:
                    raise watch.stalled from exc
                if watch.received and not isinstance(exc, (HubError, HfHubHTTPError)):
                    # the body was cut short (the connection closed, or fewer bytes than the metadata said)
                    raise watch.error(f"download failed after {watch.counts()}: {exc}") from exc
                raise self._error(exc, name) from exc
            finally:
                space.done(name)
        return True

    def _check_announced(self, name: str, size: int, watch: Watch) -> None:
        """A file whose header was read by range requests must be announced at the size those gave: the size
        the checkpoint reader checked its header against (8 bytes, the header, and the data its tensors tile
        exactly), so a body past what the header declares is refused before it is asked for."""
        head = self._heads.get(name)
        if head is not None and head[1] != size:
            raise watch.unsafe(
                f"the hub announces {size} bytes, but its range requests gave {head[1]} bytes, which its "
                f"safetensors header accounts for (8 + header + the data its tensors declare); not downloading it"
            )

    def _known_missing(self, name: str) -> bool:
        """Whether the cache records that the repo has no ``name`` at this commit (its ``.no_exist`` marker)."""
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(
            self.repo_id, name, cache_dir=self.options.cache_dir, revision=self.commit
        )
        return found is not None and not isinstance(found, str)

    def _resolve_commit(self) -> str:
        if self.options.revision is not None and COMMIT.fullmatch(self.options.revision):
            return self.options.revision
        from huggingface_hub import HfApi

        api = HfApi(library_name=_LIBRARY, library_version=__version__)
        with watching(self.repo_id, self.options.revision, None, None) as watch:
            try:
                resolved = api.resolve_revision(
                    self.repo_id,
                    revision=self.options.revision,
                    cache_dir=self.options.cache_dir,
                    local_files_only=self.offline,
                    token=self.options.token,
                )
            except Exception as exc:
                raise self._error(watch.stalled or exc) from exc
            # the server's answer was checked before huggingface_hub wrote it; a cached ref is checked here
            return check_commit(resolved.resolved, watch, "the commit")

    # --- range requests ------------------------------------------------------------------------------------

    def _read_heads(self, names: list[str]) -> dict[str, tuple[bytes, int]]:
        known = {name: self._heads[name] for name in names if name in self._heads}
        missing = [name for name in names if name not in known]
        if missing:
            known.update(zip(missing, _in_threads(self._read_head, missing), strict=True))
        return known

    def _read_head(self, name: str) -> tuple[bytes, int]:
        """The first ``8 + header length`` bytes of ``name`` and its size: two range requests, no tensor data."""
        prefix, size = self._read_range(name, 0, 8)
        length = header_length(self.directory / name, prefix, size)
        header = self._read_range(name, 8, 8 + length)[0] if length else b""
        return prefix + header, size

    def _read_range(self, name: str, start: int, stop: int) -> tuple[bytes, int]:
        """Bytes ``[start, stop)`` of ``name`` at the commit, and the file's size, through huggingface_hub's
        session (its endpoint, token, proxies and offline switch).

        The body is streamed and never read past what was asked for: a ``206`` must be the asked range (of a
        file whose size ``Content-Range`` gives); a ``200`` (a server that ignores ``Range``) is the file from
        byte 0, so its first ``stop`` bytes are read and the rest dropped, its size taken from
        ``Content-Length``. Anything else is a :class:`HubDownloadError`.
        """
        if self.offline:
            raise self._offline(name, None)
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session

        url = hf_hub_url(self.repo_id, name, revision=self.commit)
        headers = build_hf_headers(
            token=self.options.token, library_name=_LIBRARY, library_version=__version__
        )
        headers["Range"] = f"bytes={start}-{stop - 1}"
        headers["Accept-Encoding"] = "identity"  # byte offsets of the file itself, not of a compressed body
        with watching(self.repo_id, self.options.revision, name, self.commit) as watch:
            try:
                with get_session().stream(
                    "GET", url, headers=headers, timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT
                ) as response:
                    return self._range_answer(response, watch, start, stop)
            except HubError:
                raise
            except Exception as exc:
                raise self._error(watch.stalled or exc, name) from exc

    def _range_answer(self, response: Any, watch: Any, start: int, stop: int) -> tuple[bytes, int]:
        status = response.status_code
        if status >= 400:
            import httpx2
            from huggingface_hub.utils import hf_raise_for_status

            body = read_at_most(response, _ERROR_BODY_BYTES)
            hf_raise_for_status(
                httpx2.Response(status, headers=response.headers, content=body, request=response.request)
            )
        if status == 206:
            first, last, size = _content_range(response.headers.get("Content-Range", ""))
            if size is None or first != start or last != min(stop, size) - 1:
                raise watch.error(
                    f"asked for bytes {start}-{stop - 1}, the server answered "
                    f"Content-Range {response.headers.get('Content-Range')!r}"
                )
            want = last - first + 1
            data = read_at_most(response, want)
            offset = 0
        elif status == 200:
            length = response.headers.get("Content-Length", "")
            if not (length.isascii() and length.isdigit()):  # '²' passes isdigit, not int
                raise watch.error(
                    "the server ignored the range request and sent the whole file without a Content-Length"
                )
            size = int(length)
            want = min(stop, size)
            data = read_at_most(response, want)  # the file from byte 0: read what is needed, drop the rest
            offset = start
        else:
            raise watch.error(f"range request answered HTTP {status}")
        if len(data) < want:
            raise watch.error(f"the answer to a range request ended after {len(data)} of {want} bytes")
        return data[offset:], size

    # --- collectives and errors ----------------------------------------------------------------------------

    def _shared(self, requests: list[str], work: Callable[[list[str]], T], *, scope: str | None) -> T:
        """``work`` made by one rank per ``scope`` when collective under torch.distributed, else here.

        Offline there is nothing to share: every rank reads its own cache, without a request.
        """
        if not (self.options.collective and not self.offline and shared.distributed()):
            return work(requests)
        return shared.shared(requests, work, scope=scope, failure=self._rank_failed)

    def _rank_failed(self, rank: int, kind: str, message: str) -> HubError:
        """The error another rank's fetch raised, as the same class here (so every rank takes the same path)."""
        cls = getattr(errors, kind, None)
        if not (isinstance(cls, type) and issubclass(cls, HubError)):
            cls = HubDownloadError
        error = cls(self.repo_id, message, revision=self.options.revision)
        error.args = (f"{message} (raised on rank {rank}, which fetches for this rank)",)
        return error

    def _error(self, exc: Exception, name: str | None = None) -> Exception:
        """huggingface_hub's error as ours, naming the repo and what to do; unknown errors pass unchanged."""
        from huggingface_hub import constants
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            HTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RemoteEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
            RevisionResolutionError,
        )

        where: dict[str, Any] = {"revision": self.options.revision, "filename": name}
        if isinstance(exc, HubError):
            return exc
        if isinstance(exc, GatedRepoError):
            return HubAccessError(self.repo_id, f"gated repo: {self._token_advice()}", **where)
        if isinstance(exc, RepositoryNotFoundError):
            return HubRepoNotFoundError(
                self.repo_id,
                f"no such local path, and no such repo on {constants.ENDPOINT} that this caller may see: "
                f"check the spelling; if the repo is private, {self._token_advice()}",
                **where,
            )
        if isinstance(exc, RevisionNotFoundError):
            return HubRevisionNotFoundError(
                self.repo_id,
                f"no branch, tag or commit {self.options.revision!r}: pass an existing one as "
                f"{option('revision')}",
                **where,
            )
        if isinstance(exc, RemoteEntryNotFoundError):
            return self._missing([name or "such file"])
        cause = exc.__cause__
        if (
            isinstance(exc, LocalEntryNotFoundError)
            and isinstance(cause, HfHubHTTPError)
            and cause.response is not None
        ):
            # hf_hub_download falls back to the cache when its HEAD request fails, and says "not in the cache"
            # for a hub that answered: the answer (403, 500, ...) is the error, not a missing connection.
            return self._error(cause, name)
        broken = _broken_http(exc)
        if broken is not None:  # the hub answered, with something that is not HTTP (h11 bounds what it reads)
            return HubDownloadError(
                self.repo_id, f"the hub at {constants.ENDPOINT} answered with broken HTTP: {broken}", **where
            )
        if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled, RevisionResolutionError)):
            return self._offline(name, exc)
        if isinstance(exc, HfHubHTTPError) and exc.response is not None:
            status = exc.response.status_code
            if status in (401, 403):
                return HubAccessError(self.repo_id, f"HTTP {status}: {self._token_advice()}", **where)
            return HubDownloadError(self.repo_id, f"HTTP {status}: {exc}", **where)
        if isinstance(exc, (HTTPError, OSError)):  # the hub cannot be reached
            return self._offline(name, exc)
        return exc

    def _offline(self, name: str | None, cause: Exception | None) -> HubOfflineError:
        from huggingface_hub import constants

        what = f"{name!r}" if name else "this revision"
        if self.options.local_files_only:
            why = f"downloads are off ({option('local_files_only', 'True')})"
        elif constants.is_offline_mode():
            why = "downloads are off (HF_HUB_OFFLINE=1)"
        elif _is_timeout(cause):
            why = (
                f"the hub at {constants.ENDPOINT} did not answer in time ({type(cause).__name__}; each request "
                f"waits HF_HUB_ETAG_TIMEOUT={constants.HF_HUB_ETAG_TIMEOUT} s for metadata, "
                f"HF_HUB_DOWNLOAD_TIMEOUT={constants.HF_HUB_DOWNLOAD_TIMEOUT} s for data)"
            )
        else:
            why = f"the hub at {constants.ENDPOINT} cannot be reached ({type(cause).__name__}: {cause})"
        path = (
            "" if Path(self.given).exists() else f"; nor is there a local path {self.given!r} in {Path.cwd()}"
        )
        return HubOfflineError(
            self.repo_id,
            f"{what} is not in the cache {self.cache_root} and {why}{path}: check the spelling, or load it once "
            f"with network access (or pass {option('cache_dir')} / set HF_HUB_CACHE to the cache that has it)",
            revision=self.options.revision,
            filename=name,
        )

    def _token_advice(self) -> str:
        from huggingface_hub import get_token

        if self.options.token is False or (self.options.token is None and get_token() is None):
            how = "set HF_TOKEN or run `hf auth login`" if in_cli() else "pass token= or set HF_TOKEN"
            return f"no token was sent: accept the repo's terms on the hub, then {how}"
        return "the token sent has no access to it: accept the repo's terms on the hub with that account"


def _in_threads(work: Callable[[str], T], names: list[str]) -> list[T]:
    """``work`` of each name, several at once, each in a copy of this context (so hub checks and the CLI's
    spelling of options reach the worker threads)."""
    contexts = [contextvars.copy_context() for _ in names]
    with ThreadPoolExecutor(max_workers=min(_PARALLEL_DOWNLOADS, len(names))) as pool:
        return list(pool.map(lambda context, name: context.run(work, name), contexts, names))


def _check_plain_http(size: int, watch: Watch) -> None:
    """huggingface_hub downloads no file past ``MAX_HTTP_DOWNLOAD_SIZE`` (50 GB) over plain HTTP, the only way
    checked downloads go (Xet is off for them): said here, typed, rather than as its bare ``ValueError``."""
    from huggingface_hub import constants

    limit = constants.MAX_HTTP_DOWNLOAD_SIZE
    if size > limit:
        raise watch.error(
            f"the hub announces {size} bytes, more than the {limit} that huggingface_hub downloads over plain "
            "HTTP (this package's checked downloads do not use Xet); not downloading it"
        )


def _content_range(text: str) -> tuple[int | None, int | None, int | None]:
    """``bytes first-last/size`` as numbers (``None`` where absent or malformed)."""
    unit, _, spec = text.strip().partition(" ")
    span, _, size = spec.partition("/")
    first, _, last = span.partition("-")
    if unit.lower() != "bytes" or not (f"{first}{last}".isascii() and first.isdigit() and last.isdigit()):
        return None, None, None
    return int(first), int(last), int(size) if size.isascii() and size.isdigit() else None


def _broken_http(exc: BaseException | None) -> str | None:
    """What broke, when a request failed on an answer that is not HTTP (headers past the client's limit, a
    malformed status line); ``None`` otherwise (a connection dropped before any answer is the network's)."""
    import httpx2

    while exc is not None:
        if isinstance(exc, httpx2.RemoteProtocolError) and "without sending" not in str(exc):
            return str(exc)
        exc = exc.__cause__ or exc.__context__
    return None


def _is_timeout(exc: BaseException | None) -> bool:
    import httpx2

    while exc is not None:
        if isinstance(exc, httpx2.TimeoutException):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class _SilentBar(tqdm):
    """A download bar that never draws."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def _bar_class(progress: bool | None) -> type | None:
    """huggingface_hub's download bars under the host's ``progress`` switch: ``True`` shows them, ``False``
    (or automatic off: pytest, no terminal, ``AUTOMODEL_PLUGINS_PROGRESS=0``) hides them, automatic on
    leaves them to huggingface_hub (``HF_HUB_DISABLE_PROGRESS_BARS`` still applies)."""
    if progress is True:
        return tqdm
    if progress_enabled(progress):
        return None
    return _SilentBar
