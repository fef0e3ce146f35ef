"""Continuous batching: one scheduler thread owns the model, and requests join and leave between its steps.

Orca (Yu et al. 2022, OSDI) schedules per step, not per batch: each step the scheduler admits waiting
requests whose worst case (prompt + max_new_tokens) fits in the paged KV cache (model/paged_cache.py), runs
one chunk of one newcomer's prompt (prefill interleaved with the others' decoding, so a long prompt never
stalls them for long), then one decode step for every sequence already generating, and drops the sequences
that finished or were cancelled, handing their blocks back. Decode steps go in groups of at most
kernels.MAX_ROWS rows: the C++ kernels read the weights once for up to 8 rows, and each row's numbers do
not depend on the others. With per-row attention in the paged cache and per-row sampling, a request's
greedy answer is the same bits whatever else is running.

A request's events go to its `emit` callback, called from the scheduler thread: Event("token", ...) for each
generated token (with the text it releases, which may be ""), then one Event("done", finish_reason=...) or
Event("error", ...). The server (serve/app.py) forwards them to asyncio; tests collect them in a list.
"""

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from minillama.config import GenerationConfig, UserError
from minillama.infer.sampling import sample
from minillama.infer.stream import IncrementalText
from minillama.model.paged_cache import BLOCK_SIZE, BlockPool, PagedKVCache, PagedRow
from minillama.perf.kernels import MAX_ROWS


class QueueFull(Exception):
    """More requests are waiting than the engine queues (the server answers 429)."""


@dataclass
class Request:
    prompt: list[int]  # token ids
    config: GenerationConfig  # max_new_tokens, sampling, seed, stop strings, ignore_eos
    logprobs: int | None = None  # None: none; 0: the chosen token's; n: and the n most likely


@dataclass
class Event:
    kind: str  # token | done | error
    token: int | None = None
    text: str = ""  # text released by this token (stop strings and split characters held back)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | cancelled, on done
    prompt_tokens: int = 0
    completion_tokens: int = 0
    message: str = ""  # on error


class Sequence:
    """A request inside the engine: its blocks, the prompt ids still to prefill, its sampler and text."""

    def __init__(self, request: Request, emit, decode):
        self.request, self.emit, self.config = request, emit, request.config
        self.row = PagedRow()
        self.pending = list(request.prompt)  # prompt ids not yet through the model
        self.last: int | None = None  # the newest token, fed to the next decode step
        self.generated = 0
        self.cancelled = False
        self.text = IncrementalText(decode, self.config.stop_strings)
        seed = self.config.seed
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.seen = None  # (1, V) bool, for the repetition penalty

    def send(self, event: Event) -> None:
        try:
            self.emit(event)
        except Exception:  # the listener is gone (its event loop closed): nobody to generate for
            self.cancelled = True

    def cancel(self) -> None:
        """Called from any thread: the scheduler drops the sequence at its next step."""
        self.cancelled = True


class Engine:
    """engine = Engine(model, tokenizer); engine.start(); seq = engine.submit(request, emit); seq.cancel()."""

    def __init__(self, model, tokenizer, kv_cache_mb: float = 1024, max_running: int = 32, max_queue: int = 64,
                 prefill_chunk: int = 256):
        c = model.config
        if not model.model.fixed_rotation:  # the blocks keep keys rotated, once (model/positions.py)
            raise UserError(f"serve needs RoPE with fixed frequencies, not position_encoding {c.position_encoding} "
                            f"/ rope_scaling {c.rope_scaling.type if c.rope_scaling else None}")
        dtype = model.model.norm.weight.dtype  # the activations' dtype, as model.new_cache uses
        n_blocks = max(1, int(kv_cache_mb * 2**20 / BlockPool.token_bytes(c, dtype)) // BLOCK_SIZE)
        self.model, self.tokenizer = model, tokenizer
        self.pool = BlockPool(c, n_blocks, model.device, dtype)
        self.max_running, self.max_queue, self.prefill_chunk = max_running, max_queue, prefill_chunk
        self.eos_ids = set(tokenizer.eos_ids) if tokenizer is not None else set()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.lock = threading.Condition()
        self.stopped = False
        self.stats = {"prompt_tokens": 0, "generation_tokens": 0, "finished": 0, "cancelled": 0, "errors": 0,
                      "peak_running": 0}
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last decode steps
        self.thread = threading.Thread(target=self.loop, name="minillama-engine", daemon=True)

    @property
    def max_tokens(self) -> int:
        """The most tokens (prompt + answer) one sequence may ever hold: the context, or the whole pool."""
        return min(self.model.config.max_seq_len, self.pool.n_blocks * BLOCK_SIZE)

    def check(self, request: Request) -> None:
        """UserError naming the counts when a request can never fit (the server answers 400)."""
        n, new, limit = len(request.prompt), request.config.max_new_tokens, self.max_tokens
        if n == 0:
            raise UserError("the prompt is empty: give at least one token")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt):
            raise UserError(f"the prompt holds token ids outside the vocabulary [0, {vocab})")
        if n + new > limit:
            raise UserError(f"this model's context is {limit} tokens, but {n} prompt tokens + max_tokens {new} "
                            f"= {n + new}: shorten the prompt or ask for at most {max(0, limit - n)} tokens")

    def submit(self, request: Request, emit) -> Sequence:
        """Queue a request (checked first); raises UserError if it cannot fit, QueueFull if the queue is."""
        self.check(request)
        decode = self.tokenizer.decode if self.tokenizer is not None else (lambda ids: "")
        seq = Sequence(request, emit, decode)
        with self.lock:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already: try again later")
            self.waiting.append(seq)
            self.lock.notify()
        return seq

    def start(self) -> "Engine":
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.lock:
            self.stopped = True
            self.lock.notify()
        self.thread.join()

    # ---- the scheduler thread ----

    def loop(self) -> None:
        while True:
            with self.lock:
                while not self.stopped and not self.waiting and not self.running:
                    self.lock.wait()
                if self.stopped:
                    break
                self.admit()
            try:
                self.step()
            except Exception as e:  # a bug or out of memory: fail these requests, keep serving the next
                for seq in list(self.running):
                    self.finish(seq, Event("error", message=f"{type(e).__name__}: {e}"))
        for seq in list(self.running) + list(self.waiting):
            self.finish(seq, Event("error", message="the server is shutting down"))

    def admit(self) -> None:
        """Move waiting requests into the batch while their worst case fits in the free blocks (in order:
        a large request waits at the head rather than being overtaken forever)."""
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self.finish(seq, Event("done", finish_reason="cancelled"))
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            tokens = len(seq.request.prompt) + seq.config.max_new_tokens
            if self.pool.blocks_for(tokens) > len(self.pool.free):
                return
            seq.row.blocks = self.pool.allocate(tokens)
            self.running.append(self.waiting.popleft())
            self.stats["peak_running"] = max(self.stats["peak_running"], len(self.running))

    @torch.inference_mode()
    def step(self) -> None:
        for seq in [s for s in self.running if s.cancelled]:
            self.finish(seq, Event("done", finish_reason="cancelled"))
        prefilling = [s for s in self.running if s.pending]
        if prefilling:
            self.prefill(prefilling[0])
        decoding = [s for s in self.running if not s.pending and s.last is not None]
        for i in range(0, len(decoding), MAX_ROWS):
            self.decode(decoding[i:i + MAX_ROWS])
        if decoding:
            with self.lock:
                self.recent.append((time.perf_counter(), len(decoding)))
            self.stats["generation_tokens"] += len(decoding)

    def prefill(self, seq: Sequence) -> None:
        """One chunk of a sequence's prompt; at its end, the first token. Chunks have a fixed size from the
        prompt's start, so the numbers are the same whatever else is running."""
        chunk, seq.pending = seq.pending[:self.prefill_chunk], seq.pending[self.prefill_chunk:]
        ids = torch.tensor([chunk], device=self.pool.device)  # (1, T)
        h = self.model.hidden_states(ids, None, PagedKVCache(self.pool, [seq.row]))  # (1, T, C)
        self.stats["prompt_tokens"] += len(chunk)
        if not seq.pending:
            if seq.config.repetition_penalty != 1.0:
                seq.seen = torch.zeros(1, self.model.config.vocab_size, dtype=torch.bool)
                seq.seen[0, seq.request.prompt] = True
            self.accept(seq, self.model.logits(h[:, -1]))  # (1, V)

    def decode(self, group: list[Sequence]) -> None:
        """One decode step for up to MAX_ROWS sequences: each feeds its newest token."""
        ids = torch.tensor([[s.last] for s in group], device=self.pool.device)  # (B, 1)
        h = self.model.hidden_states(ids, None, PagedKVCache(self.pool, [s.row for s in group]))  # (B, 1, C)
        logits = self.model.logits(h[:, -1])  # (B, V)
        for b, seq in enumerate(group):
            self.accept(seq, logits[b:b + 1])

    def accept(self, seq: Sequence, logits) -> None:
        """Sample the sequence's next token from its logits (1, V), emit it, and finish it if it is done."""
        token = int(sample(logits, seq.config, seq.generator, seq.seen)[0])
        if seq.seen is not None:
            seq.seen[0, token] = True
        if token in self.eos_ids and not seq.config.ignore_eos or token in seq.config.stop_ids:
            return self.finish(seq, Event("done", finish_reason="stop"))
        seq.generated += 1
        event = Event("token", token=token, text=seq.text.add(token))
        if seq.request.logprobs is not None:
            logprobs = logits[0].float().log_softmax(-1)  # (V,)
            event.logprob = float(logprobs[token])
            top = logprobs.topk(seq.request.logprobs) if seq.request.logprobs else None
            event.top_logprobs = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))
        seq.send(event)
        if seq.text.stopped:
            self.finish(seq, Event("done", finish_reason="stop"))
        elif seq.generated == seq.config.max_new_tokens:
            self.finish(seq, Event("done", finish_reason="length"))
        else:
            seq.last = token

    def finish(self, seq: Sequence, event: Event) -> None:
        """The sequence leaves: its blocks go back to the pool, its last event (the held-back text first)."""
        if seq in self.running:
            self.running.remove(seq)
        if seq.row.blocks:
            self.pool.release(seq.row.blocks)
            seq.row.blocks = []
        if event.kind == "done" and event.finish_reason != "cancelled":
            tail = seq.text.finish()
            if tail:
                seq.send(Event("token", text=tail))
        self.stats["errors" if event.kind == "error" else
                   "cancelled" if event.finish_reason == "cancelled" else "finished"] += 1
        event.prompt_tokens, event.completion_tokens = len(seq.request.prompt), seq.generated
        seq.send(event)

    # ---- what /metrics reports ----

    def tokens_per_s(self, window: float = 10.0) -> float:
        """Tokens generated per second over the last `window` seconds."""
        now = time.perf_counter()
        with self.lock:
            while self.recent and self.recent[0][0] < now - window:
                self.recent.popleft()
            return sum(n for _, n in self.recent) / window

    def gauges(self) -> dict[str, float]:
        with self.lock:
            queued = len(self.waiting)
        return {"queue_length": queued, "running": len(self.running), "tokens_per_second": self.tokens_per_s(),
                "kv_blocks_used": self.pool.n_blocks - len(self.pool.free), "kv_blocks_total": self.pool.n_blocks}
