import os

# Emulate 8 devices on CPU so mesh/sharding code paths run in every test process.
# Must be set before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
