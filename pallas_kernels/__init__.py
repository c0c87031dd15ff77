"""Pallas paged-attention kernels, each beside its pure-jnp reference."""
