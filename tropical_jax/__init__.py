"""tropical_jax: SLO-aware LLM serving in JAX."""
