"""Experiments over many runs: ablation ladders, sweeps, reports, statistics. Imports no torch."""
