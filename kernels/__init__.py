"""Triton attention kernels and the attention-backend dispatch (issue #5: not built yet)."""
