"""tropical_jax: SLO-aware LLM serving in JAX."""

from .sampling_params import SamplingParams


def __getattr__(name):
    # LLM pulls in JAX; import it lazily so the scheduler and simulator stay JAX-free.
    if name == "LLM":
        from .llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams"]
