"""Runtime: bucketed jitted steps, sampling, warmup, and the single-worker engine loop."""
