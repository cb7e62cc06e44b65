"""Simulated accelerators: each model stage's compute replaced by waiting the time a real
accelerator would take (a `CostProfile`), so the whole control plane runs at cluster scale on
one machine. See README "Simulated accelerators" and docs of `serving.simulate.cluster`."""
