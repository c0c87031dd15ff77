"""The engine: the shared scheduler (tropical_jax.sched) decides every step, workers run them
(tropical_jax.cluster.workers), and each request's tokens are kept and detokenized here.

    protocol.py  what the api layer may call (ServingEngine) and the events it receives (EngineEvent);
                 no JAX, so importing it costs nothing
    core.py      Engine: requests, one step (plan -> device -> tokens -> events), the single worker
                 stepped on the caller's thread
    threads.py   a thread per worker for several workers (or Ray actors)
    handoff.py   KV handoffs between workers (P -> M/D)
    build.py     build_engine(): model, tokenizer, workers and cost model from the configuration;
                 engine_policy(): a policy cut to the executables the workers compile
"""
