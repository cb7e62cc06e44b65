"""Attention kernels for the DiT: our Triton flash-attention forward (`attention.py`), the
backend dispatch (`dispatch.py`: triton | xformers | sdpa) and the diffusers Wan glue (`wan.py`).
Importable and testable without a GPU (TRITON_INTERPRET=1)."""
