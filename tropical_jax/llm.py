"""Offline API: `LLM(...).generate(...)`, in the style of vLLM."""

from __future__ import annotations

import gc
from dataclasses import dataclass

from .config import ClusterConfig, EngineConfig
from .engine.build import build_engine
from .options import split_options
from .sampling_params import SamplingParams


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    # "stop" (EOS or a stop sequence), "length" (max_tokens or the context's end), "rejected" (the
    # scheduler refused it: shed because its TTFT SLO cannot be met, or no worker can hold it) or
    # "queue_timeout" (not started in time); `reason` then says why in words.
    finish_reason: str
    reason: str = ""
    request: object = None  # its sched.Request: status, timings (TTFT, TPOT, queueing), workers, path


class LLM:
    def __init__(self, model=None, *, warmup: bool = True, progress: bool = True, **options):
        """model: a checkpoint directory (local Hugging Face safetensors or our orbax form; None: the
        embedded default model). options: the fields of config.EngineConfig (max_model_len, page_size,
        num_pages, max_num_seqs, max_chunk_tokens, max_prefill_seqs, bucket_set, chunk/batch/context_buckets,
        dtype, attention_backend, compilation_cache_dir) and config.ClusterConfig (cluster, policy, profile,
        backend, ray_address, tensor_parallel, ttft_scale, tpot_slo_ms, queue_timeout), the same options
        `python -m tropical_jax.serve --help` lists. With no cluster one in-process worker (a "1C"
        cluster) runs; either way the shared scheduler decides every step under the policy."""
        engine_options, cluster_options = split_options(options, EngineConfig, ClusterConfig)
        self.cluster_config = ClusterConfig(**cluster_options)
        self.engine = build_engine(model, EngineConfig(**engine_options), self.cluster_config, warmup, progress)
        self.engine_config = self.engine.cfg  # bucket_set "auto" settled for the workers' platform
        self.tokenizer = self.engine.tokenizer
        self._ids = 0

    def close(self) -> None:
        """Release the engine: workers (a cluster's Ray actors too), KV pools and compiled steps, whose
        memory mappings (about 300 each on the CPU backend) go back to the process. Also on leaving
        `with LLM(...) as llm:`. The LLM cannot generate afterwards."""
        if self.engine is not None:
            self.engine.close()
        self.engine = None
        gc.collect()  # the executables sit in reference cycles (jitted closures)

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts=None, sampling_params=None, prompt_token_ids=None, ttft_slo=None,
                 tpot_slo=None) -> list[RequestOutput]:
        """ttft_slo / tpot_slo (s, one for all prompts or one each): the SLOs the scheduler holds the
        requests to (None: the defaults); a request whose TTFT SLO cannot be met comes back "rejected"."""
        if self.engine is None:
            raise RuntimeError("this LLM was closed (LLM.close()); create a new one")
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts (text) or prompt_token_ids")
        if prompts is not None:
            if isinstance(prompts, str):
                prompts = [prompts]
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompt_token_ids")
            prompt_token_ids = [self.tokenizer.encode(p) for p in prompts]
        elif prompt_token_ids and isinstance(prompt_token_ids[0], int):
            prompt_token_ids = [prompt_token_ids]
        n = len(prompt_token_ids)
        sampling_params, ttft_slo, tpot_slo = (_each(x, n, name) for x, name in (
            (sampling_params or SamplingParams(), "sampling_params"), (ttft_slo, "ttft_slo"), (tpot_slo, "tpot_slo")))
        # Validate every prompt before admitting any, so a bad one leaves nothing half-queued.
        for ids, sp in zip(prompt_token_ids, sampling_params):
            self.engine.validate(ids, sp)
        outputs = {}

        def collect(event):
            if event.request is not None and event.request.id in outputs:
                out = outputs[event.request.id]
                out.token_ids += event.token_ids
                out.text += event.text
                out.request = event.request
                if event.request.done:
                    out.finish_reason, out.reason = event.request.finish_reason, event.request.status_reason

        self.engine.on_event = collect
        requests = []
        try:
            for ids, sp, ttft, tpot in zip(prompt_token_ids, sampling_params, ttft_slo, tpot_slo):
                self._ids += 1
                rid = f"offline-{self._ids}"
                outputs[rid] = RequestOutput([int(t) for t in ids], [], "", "")
                requests.append(self.engine.add_request(rid, ids, sp, ttft, tpot))
                outputs[rid].request = requests[-1]
            self.engine.run_until_done(requests)
        except BaseException:
            for r in requests:
                self.engine.abort(r.id, "generate() stopped")
            raise
        finally:
            self.engine.on_event = None
        return list(outputs.values())


def _each(value, n: int, name: str) -> list:
    """One value per prompt: a list of n, or one value repeated."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"got {len(value)} {name} for {n} prompts")
        return list(value)
    return [value] * n
