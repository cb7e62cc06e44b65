"""Benchmarks: scripts that print tables (never timed assertions in the test suite)."""
