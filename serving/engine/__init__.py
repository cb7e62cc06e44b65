"""The Denoiser's step scheduler: iteration-level (continuous) batching for diffusion."""
