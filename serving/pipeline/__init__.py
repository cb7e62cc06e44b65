"""Pure-torch generation stages: encode_text, denoise, decode, encode_mp4 (no Ray, no HTTP)."""
