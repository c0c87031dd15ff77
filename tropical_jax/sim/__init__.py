"""Simulator: the real scheduler with a virtual clock and a cost-model executor (docs/architecture.md)."""
