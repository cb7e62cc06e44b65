"""`ditserve bench gpu` on the CPU: the same code a GPU run takes, at the tiny sizes (CI's smoke
test; the GPU figures themselves come from a GPU session, docs/benchmarks.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serving.cli import main
from serving.simulate.profile import load_profile

ROOT = Path(__file__).resolve().parent.parent


def _cells(report: str, dtype: str) -> dict[str, list[str]]:
    """{shape: cells} of one dtype's attention table."""
    table = report.split(f"{dtype}:\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    return {row.strip("|").split("|")[0].strip(): dict(zip(header[1:], (c.strip() for c in row.strip("|").split("|")[1:])))
            for row in table[2:]}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke run; a GPU runs the real sizes")
def test_the_cpu_smoke_run_takes_every_section_and_writes_a_loadable_profile(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert main(["bench", "gpu", "--profile-out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "### `ditserve bench gpu` (tiny sizes)" in report and "command: `ditserve bench gpu --profile-out" in report
    for dtype, bound in (("bf16", 4e-2), ("fp16", 5e-3)):  # the self-check's tolerances
        for shape, cells in _cells(report, dtype).items():
            for backend in ("triton (ours)", "sdpa math"):
                tflops, error = (float(x) for x in cells[backend].split(" / "))
                assert tflops > 0 and 0 <= error <= bound, (dtype, shape, backend, cells[backend])
    assert re.search(r"\| sdpa \| [\d.]+ \|", report) and re.search(r"\| triton \| [\d.]+ \|", report)
    assert [int(m) for m in re.findall(r"^\| (\d) \| \d \| [\d.]+ \|", report, re.M)] == [1, 2, 4]
    assert re.search(r"\| VAE decode \(fp32\) \| 64x64x17 \| \d+ \|", report)
    assert "text encode" in report and "Whole run:" in report
    profile = load_profile(out)
    assert profile.model == "tiny" and profile.unsourced() == []
    assert profile.dit_forward_seconds(2, 80, 128) > 0 and profile.anchors[0].seconds > 0
    # Built, not loaded: start-up is labelled an estimate, never passed off as a measured load.
    assert {s.kind for s in profile.sources if s.what.startswith("startup")} == {"estimate"}


BLOCKER = """
import sys
for name in ("ray", "fastapi", "starlette", "sqlalchemy", "aiohttp", "psycopg", "av"):
    sys.modules[name] = None  # `import name` now raises ImportError, as where it is not installed
from serving.bench.gpu import main
sys.exit(main(["--only", "attention,stages"]))
"""


def test_it_runs_without_ray_or_the_web_stack():
    """A bare GPU machine has torch, triton and transformers: the module needs nothing of ours beyond them,
    diffusers, pydantic and pyyaml."""
    done = subprocess.run([sys.executable, "-c", BLOCKER], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT),
                               "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "#### Attention forward" in done.stdout and "#### The other stages" in done.stdout
    assert "#### DiT forward" not in done.stdout  # --only is honoured


def test_the_cli_offers_exactly_the_sizes_there_are():
    from serving.bench.gpu_sizes import SIZES
    from serving.cli_bench import GPU_SIZES

    assert set(GPU_SIZES) == set(SIZES)


def test_built_models_have_the_dtypes_a_checkpoint_load_gives(tmp_path):
    """Random weights, but the model the service loads: `from_pretrained(torch_dtype=bf16)` keeps
    the DiT's fp32 modules (norms, time embedder) in fp32; the text encoder loads all bf16."""
    from diffusers import WanTransformer3DModel
    from transformers import UMT5EncoderModel

    from serving.bench.gpu_sizes import TINY, build_models

    built = build_models(TINY, torch.device("cpu"), torch.bfloat16)
    for model, cls in ((built.transformer, WanTransformer3DModel), (built.text_encoder, UMT5EncoderModel)):
        model.save_pretrained(tmp_path / cls.__name__)
        loaded = cls.from_pretrained(tmp_path / cls.__name__, torch_dtype=torch.bfloat16)
        dtypes = {name: p.dtype for name, p in model.named_parameters()}
        assert dtypes == {name: p.dtype for name, p in loaded.named_parameters()}
        assert torch.bfloat16 in dtypes.values()
    assert {p.dtype for p in built.transformer.parameters()} == {torch.float32, torch.bfloat16}


def test_bad_arguments_are_one_line_and_exit_2():
    unknown = subprocess.run([sys.executable, "-m", "serving.cli", "bench", "gpu", "--only", "attention,warp"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "--only: unknown section(s) ['warp']" in unknown.stderr
    sizes = subprocess.run([sys.executable, "-m", "serving.cli", "bench", "gpu", "--sizes", "huge"], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert sizes.returncode == 2 and "invalid choice: 'huge'" in sizes.stderr and "Traceback" not in sizes.stderr
    if not torch.cuda.is_available():  # without this refusal it built a 5.7 B encoder in host memory
        real = subprocess.run([sys.executable, "-m", "serving.cli", "bench", "gpu", "--sizes", "real"], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert real.returncode == 2 and "--sizes real needs a CUDA GPU" in real.stderr
