"""HTTP API: the OpenAI protocol over Flask, served by waitress; HTTP threads never touch JAX."""
