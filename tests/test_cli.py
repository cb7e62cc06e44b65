"""`ditserve generate` as a user runs it: a playable MP4, or one line and exit code 2."""

from __future__ import annotations

import subprocess
import sys

import av
import pytest


def ditserve(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_generate_writes_a_playable_mp4(tmp_path):
    out = tmp_path / "fox.mp4"
    result = ditserve("generate", "a red fox running through snow", "--seconds", "1", "--size", "64x64",
                      "--seed", "7", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "seed 7" in result.stdout
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert stream.average_rate == 16
        assert (stream.width, stream.height) == (64, 64)
    assert len(frames) == 17


def test_generate_respects_fps_seconds_and_size(tmp_path):
    out = tmp_path / "clip.mp4"
    result = ditserve("generate", "a blue square", "--seconds", "0.5", "--fps", "8", "--size", "32x48",
                      "--steps", "2", "--seed", "1", "-o", str(out))
    assert result.returncode == 0, result.stderr
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert len(list(container.decode(stream))) == 5
        assert stream.average_rate == 8 and (stream.width, stream.height) == (32, 48)


@pytest.mark.parametrize("args,expected", [
    (["generate"], "the following arguments are required: prompt"),
    (["generate", "x", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["generate", "x", "--size", "60x64"], "--size: 60x64 is not a multiple of 16"),
    (["generate", "x", "--seconds", "1", "--fps", "15"], "seconds × fps must be a multiple of 4"),
    (["generate", "   "], "PROMPT: must not be empty"),
    (["generate", "x", "--config", "/nonexistent/ditserve.yaml"], "config file not found"),
    (["render", "x"], "invalid choice: 'render'"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, expected):
    result = ditserve(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_wan_preset_without_folder_is_exit_2():
    result = subprocess.run([sys.executable, "-m", "serving.cli", "generate", "x"], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "DITSERVE_MODEL__PRESET": "wan2.1-t2v-1.3b"})
    assert result.returncode == 2
    assert "model.path is not set" in result.stderr and "Traceback" not in result.stderr
