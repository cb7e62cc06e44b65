"""ArtifactStore on a local folder: writes replace whole files and leave nothing behind; deletes
remove every file (or raise); readiness looks at the folder itself. (S3: tests/test_s3.py.)"""

from __future__ import annotations

import os

import pytest

from serving.storage import ArtifactStore


def test_put_replaces_the_file_whole_and_leaves_no_partial_files(tmp_path):
    store = ArtifactStore(str(tmp_path / "artifacts"))
    store.put("video_a/denoise-checkpoint.pt", b"first" * 1000)
    store.put("video_a/denoise-checkpoint.pt", b"second")
    assert store.read("video_a/denoise-checkpoint.pt") == b"second"
    assert os.listdir(tmp_path / "artifacts" / "video_a") == ["denoise-checkpoint.pt"]
    assert store.read("video_a/denoise-checkpoint.pt", start=1, end=3) == b"ec"


def test_delete_prefix_removes_every_file_and_tolerates_absence(tmp_path):
    store = ArtifactStore(str(tmp_path / "artifacts"))
    for name in ("denoise-checkpoint.pt", "video.mp4", "thumbnail.webp"):
        store.put(f"video_a/{name}", b"bytes")
    store.put("video_b/video.mp4", b"bytes")
    store.ping()
    store.delete_prefix("video_a")
    assert store.keys() == ["video_b/video.mp4"]
    store.delete_prefix("video_a")  # already gone: fine
    store.remove("video_b/video.mp4")
    store.remove("video_b/video.mp4")  # one file, already gone: fine
    assert store.keys() == [] and store.keys("video_b") == []


def test_ping_fails_once_the_folder_is_gone(tmp_path):
    store = ArtifactStore(str(tmp_path / "artifacts"))
    store.ping()
    os.rmdir(tmp_path / "artifacts")
    with pytest.raises(FileNotFoundError):
        store.ping()
