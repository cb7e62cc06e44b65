"""`ditserve bench attention`: forward TFLOP/s of our Triton kernel vs torch SDPA (flash and
cuDNN backends) vs xformers at Wan shapes, plus one real-size Wan2.1-1.3B DiT forward per
backend (random weights cost the same as trained ones). CUDA only: it prints a table and
appends it to docs/benchmarks.md with the device, the date and the command.
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Callable

import torch

HEAD_DIM = 128
TEXT_TOKENS = 512
# (label, heads, query tokens, key tokens): Wan2.1 480p is 32,760 tokens, 720p 75,600.
SHAPES = [
    *[(f"self 1.3B S={s}", 12, s, s) for s in (4096, 16384, 32760, 75600)],
    *[(f"self 14B S={s}", 40, s, s) for s in (4096, 16384, 32760, 75600)],
    ("cross 1.3B S=32760", 12, 32760, TEXT_TOKENS),
    ("cross 14B S=75600", 40, 75600, TEXT_TOKENS),
]
WAN_13B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
               text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
               qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def _time_ms(fn: Callable[[], object], iters: int) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _backends() -> dict[str, Callable]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from kernels.attention import attention
    from kernels.dispatch import choose_backend

    def sdpa(kind):
        def run(q, k, v):
            with sdpa_kernel(kind):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return run

    backends = {"triton (ours)": attention, "sdpa flash": sdpa(SDPBackend.FLASH_ATTENTION),
                "sdpa cudnn": sdpa(SDPBackend.CUDNN_ATTENTION)}
    if choose_backend("xformers", "cuda", torch.bfloat16, HEAD_DIM) == "xformers":
        import xformers.ops as xops

        backends["xformers"] = lambda q, k, v: xops.memory_efficient_attention(q, k, v)
    return backends


def kernel_table() -> list[str]:
    rows = ["| shape | " + " | ".join(_backends()) + " |", "|---" * (len(_backends()) + 1) + "|"]
    for label, heads, seq_q, seq_k in SHAPES:
        q = torch.randn(1, seq_q, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, seq_k, heads, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        flops = 4 * heads * seq_q * seq_k * HEAD_DIM
        cells = []
        for name, fn in _backends().items():
            try:
                ms = _time_ms(lambda: fn(q, k, v), iters=5 if seq_q > 40000 else 10)
                cells.append(f"{flops / ms / 1e9:.0f}")
            except Exception as exc:  # a backend without a kernel for this shape
                cells.append(f"n/a ({type(exc).__name__})")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
        del q, k, v
    return rows


def dit_table() -> list[str]:
    from diffusers import WanTransformer3DModel

    from kernels.wan import use_kernel_attention

    model = WanTransformer3DModel(**WAN_13B).to("cuda", torch.bfloat16).eval()
    latents = torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)  # 480p, 81 frames
    text = torch.randn(1, TEXT_TOKENS, 4096, device="cuda", dtype=torch.bfloat16)
    timestep = torch.tensor([500.0], device="cuda")
    rows = ["| Wan2.1-1.3B DiT forward, 480p x 81 frames (32,760 tokens) | ms |", "|---|---|"]
    for backend in ("sdpa", "triton", "xformers"):
        use_kernel_attention(model, backend)
        with torch.inference_mode():
            ms = _time_ms(lambda: model(latents, timestep, text, return_dict=False), iters=3)
        rows.append(f"| {backend} | {ms:.0f} |")
    return rows


def run(command: str, record: Path | None) -> int:
    if not torch.cuda.is_available():
        print("ditserve bench attention: error: needs a CUDA GPU, and there is none here", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    header = (f"\n### Attention forward, bf16, head_dim {HEAD_DIM}: TFLOP/s (4·B·H·Sq·Sk·D / time)\n\n"
              f"Device: {device}; torch {torch.__version__}; date {datetime.date.today()}; command: `{command}`\n")
    table = "\n".join([header, *kernel_table(), "", *dit_table()]) + "\n"
    print(table)
    if record is not None:
        with open(record, "a") as handle:
            handle.write(table)
    return 0
