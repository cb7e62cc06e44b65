"""Benchmark commands run and print their table and summary line (no timing asserted)."""

from __future__ import annotations

import re
import subprocess
import sys


def test_bench_engine_prints_table_and_summary():
    result = subprocess.run([sys.executable, "-m", "serving.cli", "bench", "engine", "--jobs", "3", "--steps", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert any(line.startswith("| one-at-a-time | 3 | 1 |") for line in lines)
    assert any(line.startswith("| batched | 3 | 3 |") for line in lines)
    assert re.fullmatch(r"engine: one-at-a-time=[\d.]+ batched=[\d.]+ ratio=[\d.]+", lines[-1])


def test_bench_rejects_bad_arguments():
    result = subprocess.run([sys.executable, "-m", "serving.cli", "bench", "engine", "--jobs", "0"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "at least 1" in result.stderr


def test_bench_attention_needs_a_gpu_and_says_so():
    import torch

    if torch.cuda.is_available():
        import pytest

        pytest.skip("a GPU is here: the benchmark itself runs (and is too long for the suite)")
    result = subprocess.run([sys.executable, "-m", "serving.cli", "bench", "attention"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr and "Traceback" not in result.stderr
