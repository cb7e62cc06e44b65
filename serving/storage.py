"""`ArtifactStore`: finished videos, thumbnails and checkpoints, through fsspec.

A local folder by default; any fsspec URL (s3://, gs://, memory://, ...) from config, with
that backend's storage options (`storage.artifacts_options`). Keys are built from validated
job ids only, so no request can name a path.

Every read here reaches the store: fsspec's listings cache is off, because a listing cached
by one call (a readiness ping) would answer a later one (a delete) with files that have
changed since, written by another process.
"""

from __future__ import annotations

import os
import uuid
from datetime import datetime
from typing import Any, Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem


class ArtifactStoreError(Exception):
    """A read or write to the artifact store failed (the job fails with a retryable error)."""


class ArtifactStore:
    def __init__(self, url: str, options: dict[str, Any] | None = None):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **{**(options or {}), "use_listings_cache": False})
        self.local = isinstance(self.fs, LocalFileSystem)
        if self.local:
            try:
                self.fs.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise ArtifactStoreError(f"cannot create artifact folder {self.url}: {exc}") from exc

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def put(self, key: str, data: bytes) -> str:
        path = self._path(key)
        try:
            if self.local:
                self._put_local(path, data)
            else:  # an object-store PUT is atomic: readers see the old object or the new one
                self.fs.pipe_file(path, data)
        except Exception as exc:
            raise ArtifactStoreError(f"could not write {key} to {self.url}: {exc}") from exc
        return key

    def _put_local(self, path: str, data: bytes) -> None:
        # Write beside the target and rename over it: a process killed mid-write (a Denoiser
        # replica saving a checkpoint) leaves the previous file whole, never a truncated one.
        folder = path.rsplit("/", 1)[0]
        self.fs.makedirs(folder, exist_ok=True)  # object stores have no folders; a disk needs them
        partial = f"{path}.partial-{uuid.uuid4().hex[:8]}"
        try:
            with open(partial, "wb") as out:
                out.write(data)
            os.replace(partial, path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)

    def size(self, key: str) -> int:
        return int(self.fs.size(self._path(key)))

    def read(self, key: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes [start, end) of an artifact (the whole of it by default). FileNotFoundError
        when there is none; ArtifactStoreError when the store cannot answer (try again)."""
        try:
            return self.fs.cat_file(self._path(key), start=start, end=end)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise ArtifactStoreError(f"could not read {key} from {self.url}: {exc}") from exc

    def read_chunks(self, key: str, start: int, end: int, chunk_size: int) -> Iterator[bytes]:
        """Bytes [start, end) of an artifact as ranged reads of at most `chunk_size` bytes, so a
        download holds one chunk in memory whatever the file's size."""
        path = self._path(key)
        for offset in range(start, end, chunk_size):
            yield self.fs.cat_file(path, start=offset, end=min(offset + chunk_size, end))

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def keys(self, prefix: str = "") -> list[str]:
        """Every key under `prefix` (a job id, or "" for the whole store), listed afresh."""
        path = self._path(prefix) if prefix else self.root
        try:
            found = self.fs.find(path)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise ArtifactStoreError(f"could not list {prefix or 'the store'} in {self.url}: {exc}") from exc
        return sorted(name[len(self.root) + 1:] for name in found if name.startswith(self.root + "/"))

    def modified(self, key: str) -> float:
        """When the artifact was last written (seconds since the epoch)."""
        stamp = self.fs.modified(self._path(key))
        return stamp.timestamp() if isinstance(stamp, datetime) else float(stamp)

    def remove(self, key: str) -> None:
        """Remove one artifact; one that is already gone is fine."""
        try:
            self.fs.rm_file(self._path(key))
        except FileNotFoundError:
            pass
        except Exception as exc:
            raise ArtifactStoreError(f"could not remove {key} from {self.url}: {exc}") from exc

    def delete_prefix(self, prefix: str) -> None:
        """Remove every file under `prefix`, then list it again: anything left (a failed
        removal, a write racing this one) raises ArtifactStoreError, so no caller ever
        believes a job's files gone while some remain."""
        try:
            self.fs.rm(self._path(prefix), recursive=True)
        except FileNotFoundError:
            pass  # nothing there: no listing (cached or not) decides whether to try
        except Exception as exc:
            raise ArtifactStoreError(f"could not delete {prefix} from {self.url}: {exc}") from exc
        left = self.keys(prefix)
        if left:
            raise ArtifactStoreError(f"{len(left)} files still under {prefix} in {self.url} after deleting: {left[:3]}")

    def ping(self) -> None:
        """Raise unless the store answers now: the folder (a disk) or the bucket (an object
        store, where an empty prefix is no error)."""
        self.fs.invalidate_cache()
        self.fs.info(self.root if self.local else self.root.split("/", 1)[0] or self.root)
