"""The scheduler: requests, cost model, monitor, dispatch policies, per-worker batching, metrics.

Pure Python; imports nothing from JAX (the real engine and the simulator both drive it).
"""
