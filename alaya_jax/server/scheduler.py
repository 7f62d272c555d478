"""The engine loop of ``alaya serve``: continuous batching over the engine's ragged batches.

One thread (``Scheduler``) owns the model, the context DB's writes and the batch of
active sequences. Work arrives through :meth:`Scheduler.submit` from any thread
and leaves through each job's ``emit`` callback, which must never block (the HTTP
side puts the event on that request's own queue): a client that does not read its
stream only grows its own queue, never holds the loop.

Each loop turn:

1. admit waiting jobs, first come first served: a context to store (prefilled and
   written alone), or a generation, while the batch has a free slot and the job's
   attention config equals the batch's (decode steps compile per attention config:
   a job asking for another one waits until the batch drains);
2. prefill each admitted generation on its own (batch 1), from the context DB's
   longest stored prefix of its prompt (memory tier, else disk) when there is one;
   sample its first token and give it a slot;
3. one decode step for every slot of the batch; finished sequences leave.

Batch layout (explicit and simple): ``B`` slots, ``B`` a power of two up to
``max_batch`` (the smallest that holds the active sequences), every slot with the
same capacity ``C`` = the largest capacity bucket of the active sequences (a
sequence's bucket covers prompt + ``max_tokens``, rounded up to 1/8 of its power of
two, at least ``min_capacity``). A join that needs more slots or capacity, or a
leave that halves the slot count, re-lays the batch out (one gather/pad copy of the
active rows); a join into a free slot is one row copy. Idle slots decode a dummy
token (their compute is wasted, their length is reset before it can overflow).
Each distinct ``(B, C, attention config)`` compiles a decode step; each distinct
(prefill chunk, capacity) a prefill. A long prefill holds the decode steps of the
batch for its duration (no chunked-prefill interleaving).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from alaya_jax.attention.config import AttentionConfig
from alaya_jax.runtime.sampling import SamplingConfig, sample
from alaya_jax.errors import ConfigError
from alaya_jax.store import kv_store

log = logging.getLogger("alaya.serve")

GREEDY = SamplingConfig(max_new_tokens=1, temperature=0.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchLimits:
    """``max_batch``: sequences decoded together; ``max_context``: positions per sequence
    (prompt + new tokens); ``min_capacity``: the smallest capacity bucket."""

    max_batch: int = 8
    max_context: int
    min_capacity: int = 256

    def __post_init__(self):
        if self.max_batch < 1 or self.max_context < 1 or self.min_capacity < 1:
            raise ConfigError(f"batch limits must be >= 1, got {self}")


@dataclasses.dataclass(frozen=True)
class Event:
    """What a job emits: ``kind`` "token" (``text``: the new text, may be empty while a
    multi-byte character or a possible stop string is held back), "done" (``finish_reason``
    "stop" | "length" | "abort", ``usage``) or "error" (``message``; for a stored context:
    "done" with ``result``)."""

    kind: str
    text: str = ""
    finish_reason: Optional[str] = None
    usage: Optional[dict] = None
    message: Optional[str] = None
    result: Optional[dict] = None
    error: Optional[BaseException] = None  # what failed, for the HTTP side's answer (server/errors.py)


@dataclasses.dataclass(eq=False, kw_only=True)
class GenerationJob:
    """A prompt to continue. ``stop``: strings that end the text (not included)."""

    ids: list[int]
    sampling: SamplingConfig
    attention: AttentionConfig
    emit: Callable[[Event], None]
    stop: tuple[str, ...] = ()
    t_arrival: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: bool = False  # set by the HTTP side (client gone); the loop drops the job at a step boundary
    ended: bool = False  # its last event was emitted


@dataclasses.dataclass(eq=False, kw_only=True)
class StoreContextJob:
    """Prefill ``ids`` (reusing any stored prefix) and store them in the context DB."""

    ids: list[int]
    emit: Callable[[Event], None]
    name: Optional[str] = None
    t_arrival: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: bool = False
    ended: bool = False


class Observer:
    """Hooks the loop calls (metrics); every method is optional to override."""

    def first_token(self, ttft_s: float, reused_tokens: int, source: Optional[str]) -> None: ...

    def token(self, latency_s: float) -> None: ...

    def finished(self, job: GenerationJob, usage: dict, finish_reason: str) -> None: ...


def _bucket_batch(n: int, maximum: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return min(b, maximum)


def capacity_bucket(n: int, *, block_size: int, minimum: int, maximum: int) -> int:
    """The capacity for ``n`` positions: ``n`` rounded up to an eighth of its power of two
    (at most 12.5% over), at least ``minimum``, whole blocks, at most ``maximum`` rounded
    up to a block."""
    n = max(int(n), int(minimum), 1)
    step = max(block_size, 1 << max(n.bit_length() - 4, 0))
    step = -(-step // block_size) * block_size
    cap = -(-n // step) * step
    top = -(-int(maximum) // block_size) * block_size
    return min(cap, max(top, -(-n // block_size) * block_size))


def _regather_impl(caches, rows, lengths, *, num_blocks: int):
    """Stores of batch ``len(rows)``: row ``i`` = input row ``rows[i]`` with ``lengths[i]``
    valid positions, blocks padded / cut to ``num_blocks``."""
    return tuple(kv_store.with_lengths(kv_store.fit_blocks(kv_store.take_rows(c, rows), num_blocks), lengths)
                 for c in caches)


def _place_impl(batch, row, slot):
    """``batch`` with row ``slot`` replaced by the single row of ``row`` (blocks padded to fit)."""
    return tuple(kv_store.place_row(b, slot, r) for b, r in zip(batch, row))


def _set_lengths_impl(caches, lengths):
    return tuple(kv_store.with_lengths(c, lengths) for c in caches)


def _sample_rows_impl(logits, keys, temperature, top_p):
    """Per-row sampling: logits f32 [B,V], keys uint32 [B,2], temperature/top_p f32 [B] →
    (tokens int32 [B], next keys [B,2]); each row's key chain as ``Engine.generate``'s."""
    split = jax.vmap(jax.random.split)(keys)  # [B,2,2]
    one = lambda l, k, t, p: sample(l[None], k, t, p)[0]
    return jax.vmap(one)(logits, split[:, 1], temperature, top_p), split[:, 0]


_DONATE = jax.default_backend() != "cpu"
_regather = jax.jit(_regather_impl, static_argnames=("num_blocks",))
_place = jax.jit(_place_impl, donate_argnums=(0,) if _DONATE else ())
_set_lengths = jax.jit(_set_lengths_impl, donate_argnums=(0,) if _DONATE else ())
_sample_rows = jax.jit(_sample_rows_impl)


class TextStream:
    """Incremental detokenization with stop strings: ``push`` the ids so far, get the text
    that is safe to send (nothing ending in a partial UTF-8 character, nothing that could
    still become a stop string) and whether a stop string ended the text."""

    def __init__(self, tok, stop: Sequence[str] = ()):
        self.tok = tok
        self.stop = tuple(s for s in stop if s)
        self.sent = 0
        self.text = ""

    def push(self, ids: Sequence[int], *, final: bool = False) -> tuple[str, bool]:
        s = self.tok.decode(ids)
        hit = None
        for st in self.stop:
            i = s.find(st, max(0, self.sent - len(st)))
            if i >= 0 and (hit is None or i < hit):
                hit = i
        if hit is not None:
            s, final = s[:hit], True
        safe = len(s)
        if not final:
            if s.endswith("\ufffd"):
                safe = len(s) - 1
            for st in self.stop:  # hold back a tail that is the start of a stop string
                for k in range(min(len(st) - 1, len(s)), 0, -1):
                    if s.endswith(st[:k]):
                        safe = min(safe, len(s) - k)
                        break
        delta = s[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        self.text = s[: self.sent]
        return delta, hit is not None


@dataclasses.dataclass(eq=False)
class _Seq:
    job: GenerationJob
    need: int  # capacity bucket
    length: int  # positions in its cache row
    key: np.ndarray  # uint32 [2]
    stream: TextStream
    prompt_tokens: int
    reused_tokens: int
    source: Optional[str]
    t_first: float
    t_last: float
    tokens: list = dataclasses.field(default_factory=list)
    next_token: int = 0  # the input of the next decode step


class Scheduler:
    """The engine loop (see the module docstring). ``db``: a ``ContextDB`` bound to this
    model (or None: no prefix reuse, no stored contexts)."""

    def __init__(self, engine, tok, *, limits: BatchLimits, db=None, observer: Optional[Observer] = None):
        self.engine = engine
        self.tok = tok
        self.db = db
        self.limits = limits
        self.observer = observer or Observer()
        self.stop_ids = frozenset(int(s) for s in getattr(tok, "stop_ids", ()) or ())
        self._cond = threading.Condition()
        self._waiting: collections.deque = collections.deque()
        self._jobs: set = set()  # submitted and not yet ended (waiting, starting or decoding)
        self._slots: list[Optional[_Seq]] = []
        self._caches = None
        self._capacity = 0
        self._batch_attention: Optional[AttentionConfig] = None
        self._idle_len: list[int] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="alaya-engine-loop", daemon=True)
        self.steps = 0
        self.peak_active = 0  # most sequences ever decoded together
        self._deadline: Optional[float] = None  # drain(): after it, what is left is cut short
        self._no_key = jax.random.PRNGKey(0)  # decode_step's own sampling is greedy: the key is unused
        self.error: Optional[BaseException] = None

    # ------------------------------------------------------------------ outside API (any thread)
    def start(self) -> None:
        self._thread.start()

    def submit(self, job) -> None:
        with self._cond:
            if self._stopping or self._deadline is not None:
                raise RuntimeError("the server is shutting down")
            if self.error is not None:
                raise RuntimeError(f"the engine loop failed: {self.error!r}")
            self._waiting.append(job)
            self._jobs.add(job)
            self._cond.notify()

    def wake(self) -> None:
        """Re-check the jobs (call after setting ``job.cancelled``)."""
        with self._cond:
            self._cond.notify()

    def drain(self, seconds: float) -> None:
        """Shutdown has begun: refuse new jobs; jobs not finished ``seconds`` from now end
        with finish_reason "abort" (their streams close cleanly), from a timer thread, so
        that a loop busy in a long prefill or a compilation cannot delay it."""
        with self._cond:
            self._deadline = time.perf_counter() + max(0.0, seconds)
            self._cond.notify()
        t = threading.Timer(max(0.0, seconds), self._cut)
        t.daemon = True
        t.start()

    def _cut(self) -> None:
        with self._cond:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancelled = True
            self._end(job, Event("done", finish_reason="abort", usage=None))
        self.wake()

    def _end(self, job, ev: Event) -> None:
        """Emit a job's last event, once (the loop and a drain timer may both end it)."""
        with self._cond:
            if job.ended:
                return
            job.ended = True
            self._jobs.discard(job)
        job.emit(ev)

    def stop(self, timeout: Optional[float] = None) -> None:
        """End the loop after its current step: jobs still waiting or active end with
        finish_reason "abort" (a context being stored is written completely first)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def load(self) -> dict:
        with self._cond:
            return {"active": sum(s is not None for s in self._slots), "waiting": len(self._waiting),
                    "batch_slots": len(self._slots), "capacity": self._capacity, "steps": self.steps,
                    "peak_active": self.peak_active}

    # ------------------------------------------------------------------ the loop
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._active():
                        self._cond.wait(None if self._deadline is None else 0.1)
                    if self._stopping:
                        break
                    past = self._deadline is not None and time.perf_counter() >= self._deadline
                    admitted = [] if past else self._take_admissible()
                if past:
                    self._abort_all()
                    continue
                for job in admitted:
                    self._start(job)
                self._drop_cancelled()
                if self._active():
                    self._step()
        except BaseException as e:  # reported to every job, logged; never hidden
            log.exception("engine loop failed")
            self.error = e
            with self._cond:
                self._stopping = True
        finally:
            self._abort_all()

    def _active(self) -> list[_Seq]:
        return [s for s in self._slots if s is not None]

    def _take_admissible(self) -> list:
        """Jobs to start now, first come first served (called with the lock held)."""
        out = []
        free = self.limits.max_batch - len(self._active())
        att = self._batch_attention if self._active() else None
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                self._end(job, Event("done", finish_reason="abort", usage=None))
                continue
            if isinstance(job, StoreContextJob):
                out.append(self._waiting.popleft())
                continue
            if free <= 0 or (att is not None and job.attention != att):
                break
            att = job.attention
            free -= 1
            out.append(self._waiting.popleft())
        return out

    def _abort_all(self) -> None:
        with self._cond:
            jobs = list(self._waiting) + [s.job for s in self._active()]
            self._waiting.clear()
            self._slots, self._caches, self._capacity, self._idle_len = [], None, 0, []
        for job in jobs:
            if self.error is not None:
                self._end(job, Event("error", message=f"the engine loop failed: {type(self.error).__name__}"))
            else:
                self._end(job, Event("done", finish_reason="abort", usage=None))

    # ------------------------------------------------------------------ admission
    def _start(self, job) -> None:
        try:
            if isinstance(job, StoreContextJob):
                self._store_context(job)
            else:
                self._start_generation(job)
        except (ValueError, RuntimeError, OSError) as e:  # this job's problem (e.g. a refused snapshot, a full disk)
            log.warning("job failed: %s", e)
            self._end(job, Event("error", message=str(e), error=e))

    def _row_caches(self, ids: list[int], capacity: int):
        """(B=1 caches holding the prefix, tokens still to prefill, reused, source)."""
        if self.db is not None:
            session, todo = self.db.create_session(ids, capacity=capacity)
            if session.caches is not None:
                return session.caches, todo, session.reused_tokens, session.source
        return self.engine.new_caches(batch=1, capacity=capacity), list(ids), 0, None

    def _store_context(self, job: StoreContextJob) -> None:
        if self.db is None:
            raise ValueError("no context DB: start alaya serve with --db DIR")
        t0 = time.perf_counter()
        n = len(job.ids)
        reused = n
        res = self.db.stored(job.ids, name=job.name)
        if res is None:
            cap = capacity_bucket(n, block_size=self.engine.block_size, minimum=self.limits.min_capacity,
                                  maximum=self.limits.max_context)
            caches, todo, reused, _ = self._row_caches(job.ids, cap)
            caches, _, _ = self.engine.prefill(caches, [todo])
            res = self.db.save(job.ids, caches, name=job.name)
        self._end(job, Event("done", result={"id": res.snapshot_id, "tokens": n, "already_stored": res.already_stored,
                                            "name": res.name, "aliases": list(res.aliases),
                                            "reused_tokens": reused, "seconds": time.perf_counter() - t0}))

    def _start_generation(self, job: GenerationJob) -> None:
        ids = job.ids
        need = len(ids) + job.sampling.max_new_tokens
        if need > self.limits.max_context:
            raise ValueError(f"{len(ids)} prompt tokens + {job.sampling.max_new_tokens} new exceed the "
                             f"server's context of {self.limits.max_context}")
        cap = capacity_bucket(need, block_size=self.engine.block_size, minimum=self.limits.min_capacity,
                              maximum=self.limits.max_context)
        caches, todo, reused, source = self._row_caches(ids, cap)
        caches, logits, _ = self.engine.prefill(caches, [todo])
        if job.attention.calibrated:  # calibrated DIPR: βs from the prompt's own last queries
            caches, _ = self.engine.calibrate(caches, [ids], job.attention)
        s = job.sampling
        key = jax.random.PRNGKey(s.seed)
        key, sub = jax.random.split(key)
        first = int(np.asarray(sample(logits, sub, jnp.float32(s.temperature), jnp.float32(s.top_p)))[0])
        now = time.perf_counter()
        seq = _Seq(job=job, need=cap, length=len(ids), key=np.asarray(key), stream=TextStream(self.tok, job.stop),
                   prompt_tokens=len(ids), reused_tokens=reused, source=source, t_first=now, t_last=now)
        self.observer.first_token(now - job.t_arrival, reused, source)
        if not self._accept(seq, first):
            self._join(seq, caches)

    # ------------------------------------------------------------------ tokens
    def _accept(self, seq: _Seq, token: int) -> bool:
        """Take a sampled token; emit text; True when the sequence is finished (done emitted)."""
        if seq.job.cancelled:
            self._finish(seq, "abort")
            return True
        if token in self.stop_ids:
            delta, _ = seq.stream.push(seq.tokens, final=True)
            self._emit_text(seq, delta)
            self._finish(seq, "stop")
            return True
        seq.tokens.append(token)
        seq.next_token = token
        full = len(seq.tokens) >= seq.job.sampling.max_new_tokens
        delta, stopped = seq.stream.push(seq.tokens, final=full)
        self._emit_text(seq, delta)
        if stopped:
            self._finish(seq, "stop")
            return True
        if full:
            self._finish(seq, "length")
            return True
        return False

    def _emit_text(self, seq: _Seq, delta: str) -> None:
        seq.job.emit(Event("token", text=delta))

    def _usage(self, seq: _Seq) -> dict:
        n = len(seq.tokens)
        return {"prompt_tokens": seq.prompt_tokens, "completion_tokens": n, "total_tokens": seq.prompt_tokens + n,
                "reused_tokens": seq.reused_tokens, "ttft_s": seq.t_first - seq.job.t_arrival,
                "context_source": seq.source}

    def _finish(self, seq: _Seq, reason: str) -> None:
        usage = self._usage(seq)
        self.observer.finished(seq.job, usage, reason)
        self._end(seq.job, Event("done", finish_reason=reason, usage=usage))

    # ------------------------------------------------------------------ batch layout
    def _join(self, seq: _Seq, row) -> None:
        n = len(self._active()) + 1
        b = max(len(self._slots), _bucket_batch(n, self.limits.max_batch))
        c = max(self._capacity, seq.need)
        if self._caches is None or b != len(self._slots) or c != self._capacity:
            self._relayout(b, c, calibrated=seq.job.attention.calibrated)
        slot = self._slots.index(None)
        self._caches = _place(self._caches, row, np.int32(slot))
        self._slots[slot] = seq
        self._batch_attention = seq.job.attention
        self.peak_active = max(self.peak_active, len(self._active()))

    def _relayout(self, b: int, c: int, *, calibrated: bool) -> None:
        """Slots ``b``, capacity ``c``: the active rows first (in slot order), then idle slots.
        ``calibrated``: the batch runs calibrated DIPR, its stores carry a β per row and head."""
        bk = self.engine.block_size
        active = [(j, s) for j, s in enumerate(self._slots) if s is not None]
        if self._caches is None or not active:
            self._caches = self.engine.new_caches(batch=b, capacity=c)
            if calibrated:
                hq = self.engine.config.num_heads
                self._caches = tuple(x.replace(dipr_beta=jnp.zeros((b, hq), jnp.float32)) for x in self._caches)
            self._slots = [None] * b
        else:
            rows = np.array([j for j, _ in active] + [0] * (b - len(active)), np.int32)
            lengths = np.array([s.length for _, s in active] + [0] * (b - len(active)), np.int32)
            self._caches = _regather(self._caches, rows, lengths, num_blocks=kv_store.num_blocks_for(c, bk))
            self._slots = [s for _, s in active] + [None] * (b - len(active))
        self._capacity = -(-c // bk) * bk
        self._idle_len = [0] * b

    def _leave(self, slots: Sequence[int]) -> None:
        """The sequences in ``slots`` are finished: free them, shrink the batch when half empty."""
        for j in slots:
            self._slots[j] = None
            self._idle_len[j] = 0
        active = self._active()
        if not active:
            self._caches, self._slots, self._capacity, self._idle_len = None, [], 0, []
            return
        b = _bucket_batch(len(active), self.limits.max_batch)
        if b < len(self._slots):
            self._relayout(b, max(s.need for s in active), calibrated=self._batch_attention.calibrated)
        else:
            self._reset_idle()

    def _reset_idle(self) -> None:
        lengths = np.array([s.length if s is not None else 0 for s in self._slots], np.int32)
        self._caches = _set_lengths(self._caches, jnp.asarray(lengths))
        self._idle_len = [0] * len(self._slots)

    def _drop_cancelled(self) -> None:
        gone = [j for j, s in enumerate(self._slots) if s is not None and s.job.cancelled]
        for j in gone:
            self._finish(self._slots[j], "abort")
        if gone:
            self._leave(gone)

    # ------------------------------------------------------------------ one decode step
    def _step(self) -> None:
        if any(n + 1 >= self._capacity for n in self._idle_len):
            self._reset_idle()
        slots = self._slots
        tokens = np.array([s.next_token if s is not None else 0 for s in slots], np.int32)
        active = [s for s in slots if s is not None]
        greedy = all(s.job.sampling.temperature == 0 for s in active)
        nxt, logits, self._caches, _ = self.engine.decode_step(
            self._caches, jnp.asarray(tokens), key=self._no_key, sampling=GREEDY,
            attention=self._batch_attention)
        if not greedy:
            keys = np.stack([s.key if s is not None else np.zeros(2, np.uint32) for s in slots])
            temp = np.array([s.job.sampling.temperature if s is not None else 0.0 for s in slots], np.float32)
            top_p = np.array([s.job.sampling.top_p if s is not None else 1.0 for s in slots], np.float32)
            nxt, new_keys = _sample_rows(logits, jnp.asarray(keys), jnp.asarray(temp), jnp.asarray(top_p))
            new_keys = np.asarray(new_keys)
        out = np.asarray(nxt)
        now = time.perf_counter()
        self.steps += 1
        done = []
        for j, s in enumerate(slots):
            if s is None:
                self._idle_len[j] += 1
                continue
            s.length += 1
            if not greedy:
                s.key = new_keys[j]
            self.observer.token(now - s.t_last)
            s.t_last = now
            if self._accept(s, int(out[j])):
                done.append(j)
        if done:
            self._leave(done)
