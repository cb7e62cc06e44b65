"""`ArtifactStore`: finished videos and thumbnails, through fsspec.

A local folder by default; any fsspec URL (s3://, gs://, memory://, ...) from config.
Keys are built from validated job ids only, so no request can name a path.
"""

from __future__ import annotations

import os
import uuid

import fsspec
from fsspec.implementations.local import LocalFileSystem


class ArtifactStoreError(Exception):
    """A read or write to the artifact store failed (the job fails with a retryable error)."""


class ArtifactStore:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
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
        """Bytes [start, end) of an artifact (the whole of it by default)."""
        return self.fs.cat_file(self._path(key), start=start, end=end)

    def exists(self, key: str) -> bool:
        return self.fs.exists(self._path(key))

    def delete_prefix(self, prefix: str) -> None:
        path = self._path(prefix)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def ping(self) -> None:
        self.fs.ls(self.root)  # raises if the folder or bucket is unreachable
