"""KV cache: host-side page allocation (pure Python) and device page pools."""
