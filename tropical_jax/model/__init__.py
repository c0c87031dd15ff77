"""Llama-family model: modules, paged attention, weight loading, sharding."""
