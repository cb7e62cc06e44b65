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
    assert any(line.startswith("| off | one-at-a-time | 3 | 1 | 2.00 |") for line in lines)
    assert any(line.startswith("| off | batched | 3 | 3 | 2.00 |") for line in lines)
    assert re.fullmatch(r"engine \(off\): one-at-a-time=[\d.]+ batched=[\d.]+ ratio=[\d.]+", lines[-1])


def test_bench_engine_compares_cache_settings():
    result = subprocess.run([sys.executable, "-m", "serving.cli", "bench", "engine", "--jobs", "2", "--steps", "12",
                             "--cache", "off,fast"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): float(line.split("|")[5])
            for line in result.stdout.splitlines() if line.startswith("| off |") or line.startswith("| fast |")}
    assert rows[("off", "batched")] == rows[("off", "one-at-a-time")] == 12
    # The same videos cached skip the same steps, batched or alone.
    assert rows[("fast", "batched")] == rows[("fast", "one-at-a-time")] < 12


def test_bench_cache_prints_fidelity_per_setting():
    result = subprocess.run([sys.executable, "-m", "serving.cli", "bench", "cache", "--steps", "6", "--seeds", "0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if re.match(r"\| (off|balanced|fast) \|", line)]
    assert [r[0].strip() for r in rows] == ["off", "balanced", "fast"]
    assert rows[0][2].strip() == "6.00" and rows[0][4].strip() == "(reference)"
    for row in rows:
        correct, total = map(int, row[6].strip().split("/"))
        assert total == 12 and 0 <= correct <= 12  # each held-out prompt once, judged


def test_bench_cache_refuses_an_unknown_setting():
    result = subprocess.run([sys.executable, "-m", "serving.cli", "bench", "cache", "--cache", "turbo"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--cache" in result.stderr and "Traceback" not in result.stderr


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


def test_bench_parallel_times_each_layout_and_checks_its_output():
    result = subprocess.run([sys.executable, "-m", "serving.cli", "bench", "parallel", "--layouts", "1:1:1,2:1:1,1:2:1",
                             "--size", "48x48", "--frames", "9", "--repeats", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in result.stdout.splitlines()
            if re.match(r"\| \d+ \| \d+ \|", line)]
    assert [r[:4] for r in rows] == [["1", "1", "1", "1"], ["2", "1", "2", "1"], ["1", "2", "2", "1"]]
    assert "(27 tokens)" in result.stdout  # uneven over 2 ranks
    for row in rows:
        assert float(row[4]) > 0
        assert float(row[6]) < 1e-4  # each layout computes the same forward


def test_bench_parallel_refuses_a_bad_layout():
    result = subprocess.run([sys.executable, "-m", "serving.cli", "bench", "parallel", "--layouts", "2x1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--layouts: expected ULYSSES:CFG:THREADS" in result.stderr
