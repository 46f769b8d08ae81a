"""A Hugging Face cache laid out by hand, as huggingface_hub writes it, for offline tests of repo ids.

``<cache>/models--org--name/`` holds ``blobs/<etag>`` (the git blob id of a small file, the sha256 of a
``.safetensors`` file, as the hub names them), ``snapshots/<commit>/<name>`` as relative links into
``../../blobs/``, and ``refs/<branch>`` holding the commit (no trailing newline). With ``HF_HUB_OFFLINE=1``,
huggingface_hub, transformers and automodel_plugins resolve ``org/name`` from it without a request.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

from automodel_plugins.testing.fake_hub import LFS_SUFFIXES, git_blob_sha1

__all__ = ["repo_folder", "write_cached_repo"]


def repo_folder(cache: str | Path, repo_id: str) -> Path:
    """``<cache>/models--org--name``: where huggingface_hub keeps a model repo."""
    return Path(cache) / ("models--" + repo_id.replace("/", "--"))


def write_cached_repo(
    cache: str | Path,
    repo_id: str,
    files: Mapping[str, bytes] | str | Path,
    *,
    revision: str = "main",
    commit: str | None = None,
) -> Path:
    """Lay ``files`` (name -> bytes, or every file of a directory) into ``cache`` as commit ``commit`` of
    ``repo_id`` and point ``refs/<revision>`` at it; returns the snapshot directory.

    ``commit`` defaults to a hash of the revision and the files, so two revisions with different files get
    different commits. A blob two commits share is written once, as huggingface_hub does.
    """
    if not isinstance(files, Mapping):
        root = Path(files)
        files = {
            p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
        }
    etags = {name: _etag(name, data) for name, data in files.items()}
    if commit is None:
        digest = hashlib.sha1(revision.encode())
        for name in sorted(etags):
            digest.update(f"\0{name}\0{etags[name]}".encode())
        commit = digest.hexdigest()
    folder = repo_folder(cache, repo_id)
    snapshot = folder / "snapshots" / commit
    for name, data in files.items():
        blob = folder / "blobs" / etags[name]
        blob.parent.mkdir(parents=True, exist_ok=True)
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    if revision != commit:
        ref = folder / "refs" / revision  # refs/pr/1 nests, as huggingface_hub writes it
        ref.parent.mkdir(parents=True, exist_ok=True)
        ref.write_text(commit)
    return snapshot


def _etag(name: str, data: bytes) -> str:
    return hashlib.sha256(data).hexdigest() if name.endswith(LFS_SUFFIXES) else git_blob_sha1(data)
