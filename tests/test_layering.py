"""The split stays honest: model code knows nothing of Ray or HTTP, stages never import the
web stack, and the HTTP layer never imports a model (checked on the import statements)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "serving"


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def offenders(folder_or_files, forbidden: tuple[str, ...]) -> dict[str, set[str]]:
    files = folder_or_files if isinstance(folder_or_files, list) else sorted(folder_or_files.rglob("*.py"))
    found = {}
    for path in files:
        bad = {name for name in imports_of(path) if name.split(".")[0] in forbidden or name in forbidden}
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    return found


def test_model_code_knows_nothing_of_ray_or_http():
    for folder in ("pipeline", "models"):
        assert offenders(ROOT / folder, ("ray", "fastapi", "starlette")) == {}


def test_model_stages_do_not_import_the_web_stack():
    stages = [ROOT / "deployments" / f"{name}.py" for name in ("text_encoder", "denoiser", "vae_decoder", "director")]
    assert offenders(stages, ("fastapi", "starlette", "serving.api")) == {}


def test_http_layer_runs_no_model():
    forbidden = ("torch", "diffusers", "transformers", "serving.models.loading", "serving.pipeline.local",
                 "serving.pipeline.encode", "serving.pipeline.denoise", "serving.pipeline.decode")
    assert offenders(ROOT / "api", forbidden) == {}
    assert offenders([ROOT / "deployments" / "gateway.py", ROOT / "jobs" / "videos.py"], forbidden) == {}
