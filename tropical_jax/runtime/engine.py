"""A continuous-batching loop for one worker.

Each step is chosen by `plan_step` (what to run: a prefill chunk packing the oldest waiting
prompts, and/or the decode batch) and run by the executor (how). Out of pages, a request waits; a
decode that cannot grow preempts the youngest running request, whose pages are freed and whose
tokens are recomputed later — never a crash. The multi-worker cluster replaces `plan_step` with the shared scheduler.
"""

from __future__ import annotations

import collections
import threading

from ..kv.allocator import PageAllocator
from ..sampling_params import SamplingParams
from .executor import ModelExecutor, chunk_pages
from .sequence import Sequence, append_token


class Engine:
    def __init__(self, executor: ModelExecutor, tokenizer=None, eos_token_ids=()):
        self.executor = executor
        self.cfg = executor.cfg
        self.tokenizer = tokenizer
        self.eos_token_ids = set(eos_token_ids)
        self.allocator = PageAllocator(self.cfg.total_pages, self.cfg.page_size)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # decoding, in arrival order
        self.prefilling: list[Sequence] = []  # taken from waiting, prompt not yet cached (at most
        # one between steps: a chunk cuts only its last segment short)
        self._lock = threading.Lock()  # guards waiting/aborts against other threads adding requests
        self._aborted: set[str] = set()
        self.num_preemptions = 0
        self.max_prefill_seqs = self.cfg.max_prefill_seqs  # prompts a chunk packs: at most the compiled slots

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, prompt_ids, params: SamplingParams | None = None, request_id=None,
                    on_output=None) -> Sequence:
        params = params or SamplingParams()
        prompt_ids = [int(t) for t in prompt_ids]
        if not prompt_ids:
            raise ValueError("prompt is empty: at least one token is needed")
        limit = self.cfg.max_model_len
        if len(prompt_ids) >= limit:
            raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit max_model_len={limit} "
                             f"(the prompt plus at least one generated token must fit)")
        vocab = self.executor.model_cfg.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        seq = Sequence(prompt_ids, params, on_output=on_output)
        if request_id is not None:
            seq.request_id = request_id
        with self._lock:
            self.waiting.append(seq)
        return seq

    def abort(self, request_id: str) -> None:
        """Safe from any thread: the request is finished ("abort") at the next step boundary."""
        with self._lock:
            self._aborted.add(request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.prefilling)

    @property
    def num_active(self) -> int:
        return len(self.running) + len(self.prefilling)

    # -- one step ---------------------------------------------------------------------------
    def step(self) -> list[Sequence]:
        """Run one device step (if there is work); returns the sequences that finished in it."""
        finished = self._apply_aborts()
        chunks, decodes = self.plan_step()
        if not chunks and not decodes:
            return finished
        chunk_tokens, decode_tokens = self.executor.run(chunks, decodes)
        for (seq, start, length), tok in zip(chunks, chunk_tokens):
            seq.num_cached = start + length
            if seq.prefill_remaining == 0:
                self.prefilling.remove(seq)
                self._append(seq, int(tok), finished)
                if not seq.finished:
                    self.running.append(seq)
        for seq, tok in zip(decodes, decode_tokens):
            seq.num_cached += 1
            self._append(seq, int(tok), finished)
        self.running = [s for s in self.running if not s.finished]
        return finished

    def plan_step(self):
        """Pick the decode batch (growing pages, preempting if needed) and the prefill chunk."""
        decodes = []
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted while making room for an earlier one
            while not seq.block_table.ensure(self.allocator, seq.num_tokens):
                if not self._preempt_youngest(protect=seq):
                    break
            if seq in self.running and len(seq.block_table.pages) * self.cfg.page_size >= seq.num_tokens:
                decodes.append(seq)
        # A later sequence's growth may have preempted one already picked: drop those.
        decodes = [s for s in decodes if s in self.running][: self.cfg.max_num_seqs]
        return self._next_chunks(len(decodes)), decodes

    def _next_chunks(self, num_decodes) -> list[tuple[Sequence, int, int]]:
        """The unfinished prompt first, then the oldest waiting ones, packed while the chunk has
        tokens, segment slots and context pages left (first come, first served: a prompt that finds
        no pages stops the packing and waits)."""
        cfg = self.cfg
        if not cfg.mixed_steps and num_decodes:
            return []
        chunks, budget, slots = [], self.executor.chunk_sizes[-1], min(self.max_prefill_seqs, cfg.max_prefill_seqs)
        while budget and len(chunks) < slots:
            if len(chunks) < len(self.prefilling):
                seq = self.prefilling[len(chunks)]
            else:
                with self._lock:
                    if not self.waiting or num_decodes + len(self.prefilling) >= cfg.max_num_seqs:
                        break
                    seq = self.waiting.popleft()
                self.prefilling.append(seq)
            chunk = (seq, seq.num_cached, min(seq.prefill_remaining, budget))
            if (chunk_pages(cfg, chunks + [chunk]) > cfg.context_pages[-1]
                    or not seq.block_table.ensure(self.allocator, seq.num_cached + chunk[2])):
                if not seq.block_table.pages:  # back to the queue's head, as it came
                    self.prefilling.remove(seq)
                    with self._lock:
                        self.waiting.appendleft(seq)
                break  # waits for pages; decodes finishing or preemption will free them
            chunks.append(chunk)
            budget -= chunk[2]
        return chunks

    def _preempt_youngest(self, protect: Sequence) -> bool:
        victims = [s for s in self.running if s is not protect]
        victims += [s for s in self.prefilling if s.block_table.pages]
        if not victims:
            return False
        victim = max(victims, key=lambda s: s.arrival)
        victim.block_table.release(self.allocator)
        victim.num_cached = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        (self.prefilling if victim in self.prefilling else self.running).remove(victim)
        with self._lock:
            self.waiting.appendleft(victim)
        return True

    # -- tokens and stopping ----------------------------------------------------------------
    def _append(self, seq: Sequence, token: int, finished: list) -> None:
        reason, new_text = append_token(seq, token, self.tokenizer, self.eos_token_ids, self.cfg.max_model_len)
        if reason is not None:
            self._finish(seq, reason, finished)
        if seq.on_output is not None:
            seq.on_output(seq, [token], new_text)

    def _finish(self, seq: Sequence, reason: str, finished: list) -> None:
        seq.finish_reason = reason
        seq.block_table.release(self.allocator)
        finished.append(seq)

    def _apply_aborts(self) -> list[Sequence]:
        with self._lock:
            ids, self._aborted = self._aborted, set()
            if not ids:
                return []
            gone = [s for s in self.waiting if s.request_id in ids]
            self.waiting = collections.deque(s for s in self.waiting if s.request_id not in ids)
        gone += [s for s in self.running + self.prefilling if s.request_id in ids]
        self.running = [s for s in self.running if s.request_id not in ids]
        self.prefilling = [s for s in self.prefilling if s.request_id not in ids]
        finished = []
        for seq in gone:
            self._finish(seq, "abort", finished)
            if seq.on_output is not None:
                seq.on_output(seq, [], "")
        return finished
