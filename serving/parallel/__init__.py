"""One Denoiser replica across a gang of devices: sequence parallel (Ulysses) and CFG
parallel. `gang.py` is the split of one DiT forward, `ulysses.py` the all-to-all around
attention, `workers.py` the Ray side (the gang's placement group and its worker actors)."""
