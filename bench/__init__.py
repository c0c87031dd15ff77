"""The project's benchmarks. Run each from the repository root as `python -m bench.NAME --help`:

    engine_micro         the engine against transformers on the same weights (tokens/s, step times)
    decode_bound         how far faster attention could take batch-32 decode against transformers
    attention_ab         the engine's steps under another git revision's attention code, side by side
    attention_bandwidth  decode-attention bandwidth of the Pallas kernels against the device's peak
    engine_slo           the real cluster engine against its SLOs, every policy, and the simulator beside it
                         (also engine_slo.pool and engine_slo.workloads)
    serve_load           an open-loop load generator against a running server
    serve_startup        the server's cold and warm ready times, executables per worker, memory mappings
    paper_repro          the paper's settings in the simulator
    beyond_paper         the `planned` policy against the paper's rules and the baselines, in the simulator
    accelerator_check    everything that needs a GPU or TPU in one timed run (kernels, engine, server);
                         --smoke runs a tiny version on any machine (docs/hardware.md)

Results live in bench/results/: one JSON, PNG and .md per benchmark; each .md starts with the command that
regenerates it. docs/benchmarks.md says what each measures and how.
"""
