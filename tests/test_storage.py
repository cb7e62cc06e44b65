"""ArtifactStore on a local folder: writes replace whole files and leave nothing behind."""

from __future__ import annotations

import os

from serving.storage import ArtifactStore


def test_put_replaces_the_file_whole_and_leaves_no_partial_files(tmp_path):
    store = ArtifactStore(str(tmp_path / "artifacts"))
    store.put("video_a/denoise-checkpoint.pt", b"first" * 1000)
    store.put("video_a/denoise-checkpoint.pt", b"second")
    assert store.read("video_a/denoise-checkpoint.pt") == b"second"
    assert os.listdir(tmp_path / "artifacts" / "video_a") == ["denoise-checkpoint.pt"]
    assert store.read("video_a/denoise-checkpoint.pt", start=1, end=3) == b"ec"
