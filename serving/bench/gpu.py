"""`ditserve bench gpu`: every figure a GPU run must take, in one command.

1. Attention forward TFLOP/s at the Wan shapes, our Triton kernel vs SDPA's flash, cuDNN and
   memory-efficient backends vs xformers, in bf16 and fp16, each cell with its max error
   against the float64 definition (on the first `reference_rows` query rows of big shapes).
2. One Wan2.1-1.3B DiT forward at 480p x 81 frames with its 2 CFG rows, per attention backend;
   then the step time at 1, 2 and 4 jobs per forward on the fastest.
3. One VAE decode of that clip and one UMT5-XXL-size encode of a 512-token prompt.
4. A cost profile in the simulator's format (serving/simulate/profile.py), fitted from timings
   around that job (serving/bench/profile.py), so measured numbers replace published ones.

Random weights (serving/bench/gpu_sizes.py): they cost what trained ones do. On a CPU the same
code runs at the tiny preset's sizes, as CI's smoke test; nothing is recorded there unless
asked. Its imports are torch, triton, diffusers, transformers, pydantic and pyyaml: no Ray,
no web stack, so it runs on a bare GPU machine (docs/benchmarks.md says how).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from serving.bench.gpu_sizes import SIZES, Sizes, build_models

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """Milliseconds per call, after a warm-up call (CUDA events on a GPU)."""
    def cuda_ms(fn, iterations):
        fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iterations

    def cpu_ms(fn, iterations):
        fn()
        started = time.perf_counter()
        for _ in range(iterations):
            fn()
        return (time.perf_counter() - started) * 1000 / iterations

    return cuda_ms if device.type == "cuda" else cpu_ms


def attention_backends(device: torch.device) -> tuple[dict[str, Callable], list[str]]:
    """The attention functions to compare here, (B, S, H, D) in and out, and what was left out and why."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(kind):
        def run(q, k, v):
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2)).transpose(1, 2)
        return run

    backends, skipped = {}, []
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        from serving.kernels.attention import attention

        backends["triton (ours)"] = attention
    else:
        skipped.append("triton (ours): needs CUDA, or TRITON_INTERPRET=1 on a CPU")
    if device.type == "cuda":
        backends.update({"sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION), "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
                         "sdpa efficient": sdpa(SDPBackend.EFFICIENT_ATTENTION)})
        try:
            import xformers.ops as xops

            backends["xformers"] = lambda q, k, v: xops.memory_efficient_attention(q, k, v)
        except Exception as exc:  # not installed, or built for another torch
            skipped.append(f"xformers: not importable ({type(exc).__name__})")
    else:
        backends["sdpa math"] = sdpa(SDPBackend.MATH)
        skipped.append("sdpa flash / cudnn / efficient, xformers: CUDA only")
    return backends, skipped


def attention_section(sizes: Sizes, device: torch.device, log: Callable[[str], None]) -> list[str]:
    from serving.kernels.selfcheck import definition

    time_ms = _timer(device)
    backends, skipped = attention_backends(device)
    lines = [f"#### Attention forward, head_dim {sizes.head_dim}: TFLOP/s (4·H·Sq·Sk·D / time) / max |error| vs the "
             f"float64 definition (first {sizes.reference_rows} query rows)", ""]
    for dtype_name, dtype in DTYPES.items():
        lines += [f"{dtype_name}:", "", "| shape | " + " | ".join(backends) + " |", "|---" * (len(backends) + 1) + "|"]
        for label, heads, seq_q, seq_k in sizes.attention_shapes:
            generator = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(1, seq_q, heads, sizes.head_dim, device=device, dtype=dtype, generator=generator)
            k = torch.randn(1, seq_k, heads, sizes.head_dim, device=device, dtype=dtype, generator=generator)
            v = torch.randn(1, seq_k, heads, sizes.head_dim, device=device, dtype=dtype, generator=generator)
            rows = min(seq_q, sizes.reference_rows)
            expected = definition(q[:, :rows], k, v, None)
            flops = 4 * heads * seq_q * seq_k * sizes.head_dim
            cells = []
            for name, fn in backends.items():
                try:
                    error = (fn(q, k, v)[:, :rows].double() - expected).abs().max().item()
                    ms = time_ms(lambda: fn(q, k, v), sizes.iterations if seq_q < 40_000 else max(1, sizes.iterations // 2))
                    cells.append(f"{flops / ms / 1e9:.3g} / {error:.1e}")
                except Exception as exc:  # a backend without a kernel for this shape or dtype
                    cells.append(f"n/a ({type(exc).__name__})")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
            log(lines[-1])
            del q, k, v, expected
        lines.append("")
    lines += [f"Not run: {'; '.join(skipped)}.", ""] if skipped else []
    return lines


def _dit_inputs(models, sizes: Sizes, device, dtype, rows: int):
    from serving.bench.profile import scaled_shape
    from serving.models.presets import PRESETS
    from serving.pipeline.cost import latent_frames

    preset = PRESETS[sizes.preset]
    width, height, frames = scaled_shape(preset, 1, 1)
    geometry, config = preset.geometry, models.transformer.config
    latents = torch.randn(rows, config.in_channels, latent_frames(frames, geometry),
                          height // geometry.vae_spatial_factor, width // geometry.vae_spatial_factor,
                          device=device, dtype=dtype)
    text = torch.randn(rows, preset.defaults.max_sequence_length, config.text_dim, device=device, dtype=dtype)
    return latents, text, torch.full((rows,), 500.0, device=device), (width, height, frames)


def dit_section(models, sizes: Sizes, device: torch.device, dtype: torch.dtype, log) -> list[str]:
    from serving.kernels.wan import attention_in_use, use_kernel_attention
    from serving.models.presets import PRESETS
    from serving.pipeline.cost import latent_frames, tokens_per_frame

    time_ms = _timer(device)
    transformer = models.transformer
    latents, text, step, (width, height, frames) = _dit_inputs(models, sizes, device, dtype, rows=2)
    geometry = PRESETS[sizes.preset].geometry
    tokens = latent_frames(frames, geometry) * tokens_per_frame(width, height, geometry)
    iterations = max(1, sizes.iterations // 3)

    def forward(x, t, e):
        with torch.inference_mode():
            transformer(hidden_states=x, timestep=t, encoder_hidden_states=e, return_dict=False)

    lines = [f"#### DiT forward ({sizes.preset}, random weights, {dtype}): {width}x{height}x{frames} "
             f"({tokens} tokens), 2 CFG rows", "", "| attention backend | ms per forward |", "|---|---|"]
    backends = ["sdpa", "triton"] + (["xformers"] if device.type == "cuda" else [])
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        backends.remove("triton")
    timed = {}
    for backend in backends:
        use_kernel_attention(transformer, backend)
        # The dispatcher serves another backend when this one fails its self-check: say so, never mislabel.
        runs = attention_in_use(transformer, backend)
        if runs["backend"] != backend:
            reasons = "; ".join(p["reason"] for p in runs["passed_over"])
            lines.append(f"| {backend} | not run: falls back to {runs['backend']} ({reasons}) |")
            log(lines[-1])
            continue
        try:
            timed[backend] = time_ms(lambda: forward(latents, step, text), iterations)
            lines.append(f"| {backend} | {timed[backend]:.1f} |")
        except Exception as exc:
            lines.append(f"| {backend} | n/a ({type(exc).__name__}) |")
        log(lines[-1])
    fastest = min(timed, key=timed.get)
    use_kernel_attention(transformer, fastest)
    lines += ["", f"Step time by batch (jobs per forward, 2 rows each), attention {fastest}:", "",
              "| jobs | rows | ms per step | ms per job-step |", "|---|---|---|---|"]
    for jobs in sizes.batches:
        try:
            x, e, t, _ = _dit_inputs(models, sizes, device, dtype, rows=2 * jobs)
            ms = time_ms(lambda: forward(x, t, e), iterations)
            lines.append(f"| {jobs} | {2 * jobs} | {ms:.1f} | {ms / jobs:.1f} |")
            del x, e, t
        except torch.OutOfMemoryError:
            lines.append(f"| {jobs} | {2 * jobs} | OOM | |")
        log(lines[-1])
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return lines + [""]


def stages_section(models, sizes: Sizes, device: torch.device, log) -> list[str]:
    from serving.models.presets import PRESETS
    from serving.pipeline.cost import latent_frames
    from serving.pipeline.decode import decode
    from serving.pipeline.encode import encode_text
    from serving.bench.profile import scaled_shape

    time_ms = _timer(device)
    preset = PRESETS[sizes.preset]
    width, height, frames = scaled_shape(preset, 1, 1)
    geometry = preset.geometry
    z = torch.randn(1, models.vae.config.z_dim, latent_frames(frames, geometry), height // geometry.vae_spatial_factor,
                    width // geometry.vae_spatial_factor, device=device)
    tokens = preset.defaults.max_sequence_length
    decode_ms = time_ms(lambda: decode(models.vae, z), 1)
    encode_ms = time_ms(lambda: encode_text(models.tokenizer, models.text_encoder, ["a paper boat"], tokens), 3)
    params = sum(p.numel() for p in models.text_encoder.parameters()) / 1e6
    lines = ["#### The other stages", "", "| stage | shape | ms |", "|---|---|---|",
             f"| VAE decode (fp32) | {width}x{height}x{frames} | {decode_ms:.0f} |",
             f"| text encode ({params:,.1f} M params) | 1 prompt x {tokens} tokens | {encode_ms:.1f} |", ""]
    log("\n".join(lines[-3:-1]))
    return lines


def device_slug(device: torch.device) -> str:
    """'nvidia-h100-80gb-hbm3', or 'cpu': a file and profile name."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(device: torch.device) -> str:
    import triton

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            driver = "unknown (no nvidia-smi)"
        where = f"{name}; driver {driver}; CUDA {torch.version.cuda}"
    else:
        where = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"
    return f"{where}; torch {torch.__version__}; triton {triton.__version__}; Python {platform.python_version()}"


def run(command: str, sizes_name: str | None = None, record: Path | None = None, profile_out: Path | None = None,
        sections: tuple[str, ...] = ("attention", "dit", "stages", "profile"), log: Callable[[str], None] = print) -> str:
    """Run the chosen sections; returns the markdown (also appended to `record` when given)."""
    from serving.bench.profile import Parts, measure_parts
    from serving.models.presets import PRESETS

    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = SIZES[sizes_name or ("real" if device.type == "cuda" else "tiny")]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lines = [f"### `ditserve bench gpu` ({sizes.name} sizes)", "",
             f"{environment(device)}; date {datetime.date.today().isoformat()}; command: `{command}`", ""]
    if "attention" in sections:
        lines += attention_section(sizes, device, log)
    models = build_models(sizes, device, dtype) if {"dit", "stages", "profile"} & set(sections) else None
    if "dit" in sections:
        lines += dit_section(models, sizes, device, dtype, log)
    if "stages" in sections:
        lines += stages_section(models, sizes, device, log)
    if "profile" in sections:
        parts = Parts(models.tokenizer, models.text_encoder, models.transformer, models.vae, models.built_seconds,
                      startup_how="building random weights on the device, not loading a checkpoint: an estimate; "
                                  "`ditserve bench profile` on a real model folder measures the load",
                      startup_kind="estimate")
        name = f"{device_slug(device)}-{sizes.preset}-measured"
        profile = measure_parts(parts, PRESETS[sizes.preset], device, repeats=2, name=name, log=log,
                                command=command, **sizes.profile_factors)
        text = json.dumps(profile.model_dump(mode="json"), indent=2) + "\n"
        if profile_out is not None:
            profile_out.parent.mkdir(parents=True, exist_ok=True)
            profile_out.write_text(text)
        den = profile.denoiser
        lines += ["#### Cost profile (simulator format)", "",
                  f"`{profile_out or '(not written: give --profile-out)'}`: DiT overhead {den.overhead_s * 1000:.1f} ms, "
                  f"{den.per_token_s:.3g} s/token, {den.per_token_pair_s:.3g} s/token², "
                  f"{den.per_token_text_token_s:.3g} s/(token·text token); anchor job "
                  f"{profile.anchors[0].seconds:.1f} s.", ""]
    lines += [f"Whole run: {time.perf_counter() - started:.0f} s.", ""]
    report = "\n".join(lines)
    if record is not None:
        with open(record, "a") as handle:
            handle.write("\n" + report)
    return report


def main(argv: list[str] | None = None) -> int:
    """`python -m serving.bench.gpu`: the same command without the `ditserve` CLI (a bare GPU machine)."""
    import argparse

    from serving.cli_bench import add_gpu_arguments as add_arguments

    parser = argparse.ArgumentParser(prog="python -m serving.bench.gpu", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_from_args(args, "python -m serving.bench.gpu " + " ".join(argv if argv is not None else sys.argv[1:]))


def run_from_args(args, command: str) -> int:
    from serving.cli_bench import GPU_SECTIONS as SECTIONS

    sections = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        print(f"{command.split(' --')[0]}: error: --only: unknown section(s) {unknown or '(none given)'}; "
              f"choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    on_gpu = torch.cuda.is_available()
    if args.sizes == "real" and not on_gpu:  # a 5.7 B-parameter encoder in fp32 would not fit a CPU host's memory
        print(f"{command.split(' --')[0]}: error: --sizes real needs a CUDA GPU, and there is none here; "
              "--sizes tiny runs the same code", file=sys.stderr)
        return 2
    record = args.record if args.record is not None else (Path("docs/benchmarks.md") if on_gpu else None)
    profile_out = args.profile_out
    if profile_out is None and on_gpu:
        profile_out = Path(f"docs/profiles/{device_slug(torch.device('cuda'))}-{SIZES[args.sizes or 'real'].preset}"
                           "-measured.json")
    progress = (lambda line: print(line, file=sys.stderr, flush=True))  # stdout keeps the report alone
    print(run(command, args.sizes, record, profile_out, sections, log=progress))
    return 0


if __name__ == "__main__":
    sys.exit(main())
