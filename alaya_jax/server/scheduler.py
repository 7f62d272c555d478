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
3. one chunk of decode steps for every slot of the batch, on the device
   (``Engine.decode_chunk``: up to ``BatchLimits.decode_chunk`` tokens per dispatch, sampling
   per row, stop ids and each row's ``max_tokens`` checked on the device); finished sequences
   leave. Stop strings are checked on the host after the chunk (the device may have decoded a
   few tokens past one: they are dropped).

Batch layout (explicit and simple): ``B`` slots, ``B`` a power of two up to
``max_batch`` (the smallest that holds the active sequences), every slot with the
same capacity ``C`` = the largest capacity bucket of the active sequences (a
sequence's bucket covers prompt + ``max_tokens``, rounded up to 1/8 of its power of
two, at least ``min_capacity``). A join that needs more slots or capacity, or a
leave that halves the slot count, re-lays the batch out (one gather/pad copy of the
active rows); a join into a free slot is one row copy. Idle slots are done rows of the
device loop: they append nothing (their compute in a step is wasted, their length never grows).
Each distinct ``(B, C, attention config, sampling kind)`` compiles a decode chunk; each
distinct (prefill chunk, capacity) a prefill. A long prefill holds the decode chunks of the
batch for its duration (no chunked-prefill interleaving); joins and leaves happen between
chunks.
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
from alaya_jax.errors import ConfigError
from alaya_jax.runtime.decode_loop import DecodeState
from alaya_jax.runtime.detokenize import IncrementalDecoder
from alaya_jax.runtime.engine import capacity_bucket, host_key, sampling_kind
from alaya_jax.runtime.sampling import SamplingConfig
from alaya_jax.store import kv_store

log = logging.getLogger("alaya.serve")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchLimits:
    """``max_batch``: sequences decoded together; ``max_context``: positions per sequence
    (prompt + new tokens); ``min_capacity``: the smallest capacity bucket; ``decode_chunk``:
    decode steps per device dispatch (a job arriving meanwhile waits for the chunk to end;
    at most the engine's ``max_chunk``)."""

    max_batch: int = 8
    max_context: int
    min_capacity: int = 256
    decode_chunk: int = 16

    def __post_init__(self):
        if self.max_batch < 1 or self.max_context < 1 or self.min_capacity < 1 or self.decode_chunk < 1:
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


def _regather_impl(caches, rows, lengths, *, num_blocks: int):
    """Stores of batch ``len(rows)``: row ``i`` = input row ``rows[i]`` with ``lengths[i]``
    valid positions, blocks padded / cut to ``num_blocks``."""
    return tuple(kv_store.with_lengths(kv_store.fit_blocks(kv_store.take_rows(c, rows), num_blocks), lengths)
                 for c in caches)


def _place_impl(batch, row, slot):
    """``batch`` with row ``slot`` replaced by the single row of ``row`` (blocks padded to fit)."""
    return tuple(kv_store.place_row(b, slot, r) for b, r in zip(batch, row))


_DONATE = jax.default_backend() != "cpu"
_regather = jax.jit(_regather_impl, static_argnames=("num_blocks",))
_place = jax.jit(_place_impl, donate_argnums=(0,) if _DONATE else ())


class TextStream:
    """Incremental detokenization with stop strings: ``push`` the ids so far, get the text
    that is safe to send (nothing ending in a partial UTF-8 character, nothing that could
    still become a stop string) and whether a stop string ended the text. Each push decodes
    only the new ids (``IncrementalDecoder``), not all of them."""

    def __init__(self, tok, stop: Sequence[str] = ()):
        self.tok = tok
        self.stop = tuple(s for s in stop if s)
        self.sent = 0
        self.text = ""
        self._dec = IncrementalDecoder(tok)

    def push(self, ids: Sequence[int], *, final: bool = False) -> tuple[str, bool]:
        self._dec.add(ids[len(self._dec.ids):])
        if final:
            self._dec.flush()
        s = self._dec.text
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
    left: int = 0  # tokens it may still emit


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
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="alaya-engine-loop", daemon=True)
        self.steps = 0  # decode steps run (each for the whole batch)
        self.chunks = 0  # device dispatches of the decode loop
        self.peak_active = 0  # most sequences ever decoded together
        self._deadline: Optional[float] = None  # drain(): after it, what is left is cut short
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
                    "decode_chunks": self.chunks, "peak_active": self.peak_active}

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
            self._slots, self._caches, self._capacity = [], None, 0
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
            raise ValueError("this server keeps no contexts (--memory-budget 0 and no --db DIR)")
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
        sampled, nucleus = sampling_kind([s.temperature], [s.top_p])
        first, st = self.engine.first_tokens(logits, host_key(s.seed)[None], np.float32([s.temperature]),
                                             np.float32([s.top_p]), [s.max_new_tokens], stop_ids=self.stop_ids,
                                             sampled=sampled, nucleus=nucleus)
        first, keys = jax.device_get((first, st.keys))
        now = time.perf_counter()
        seq = _Seq(job=job, need=cap, length=len(ids), key=keys[0], stream=TextStream(self.tok, job.stop),
                   prompt_tokens=len(ids), reused_tokens=reused, source=source, t_first=now, t_last=now)
        self.observer.first_token(now - job.t_arrival, reused, source)
        t = int(first[0])
        seq.left = s.max_new_tokens - (t >= 0)
        end = "stop" if t < 0 else ("length" if seq.left <= 0 else None)
        if not self._take(seq, [t] if t >= 0 else [], end):
            self._join(seq, caches)

    # ------------------------------------------------------------------ tokens
    def _take(self, seq: _Seq, tokens: list[int], end: Optional[str]) -> bool:
        """Take the tokens a sequence emitted, in order, then ``end`` ("stop": a stop id came
        next; "length": its last token reached max_tokens; None: it goes on); emit their text
        (one event a token); True when the sequence is finished (done emitted)."""
        if seq.job.cancelled:
            self._finish(seq, "abort")
            return True
        for i, token in enumerate(tokens):
            seq.tokens.append(token)
            seq.next_token = token
            delta, stopped = seq.stream.push(seq.tokens, final=end == "length" and i == len(tokens) - 1)
            self._emit_text(seq, delta)
            if stopped:  # a stop string: what the device decoded after it is dropped
                self._finish(seq, "stop")
                return True
        if end == "stop":
            delta, _ = seq.stream.push(seq.tokens, final=True)
            self._emit_text(seq, delta)
        if end is not None:
            self._finish(seq, end)
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

    def _leave(self, slots: Sequence[int]) -> None:
        """The sequences in ``slots`` are finished: free them, shrink the batch when half empty."""
        for j in slots:
            self._slots[j] = None
        active = self._active()
        if not active:
            self._caches, self._slots, self._capacity = None, [], 0
            return
        b = _bucket_batch(len(active), self.limits.max_batch)
        if b < len(self._slots):
            self._relayout(b, max(s.need for s in active), calibrated=self._batch_attention.calibrated)

    def _drop_cancelled(self) -> None:
        gone = [j for j, s in enumerate(self._slots) if s is not None and s.job.cancelled]
        for j in gone:
            self._finish(self._slots[j], "abort")
        if gone:
            self._leave(gone)

    # ------------------------------------------------------------------ one chunk of decode steps
    def _step(self) -> None:
        slots = self._slots
        b = len(slots)
        token, keys = np.zeros(b, np.int32), np.zeros((b, 2), np.uint32)
        done, left = np.ones(b, bool), np.zeros(b, np.int32)
        temp, top_p = np.zeros(b, np.float32), np.ones(b, np.float32)
        active = [(j, s) for j, s in enumerate(slots) if s is not None]
        for j, s in active:
            token[j], keys[j], done[j], left[j] = s.next_token, s.key, False, s.left
            temp[j], top_p[j] = s.job.sampling.temperature, s.job.sampling.top_p
        sampled, nucleus = sampling_kind(temp[~done], top_p[~done])
        steps = min(self.limits.decode_chunk, self.engine.max_chunk, int(left.max()))
        state = DecodeState(token=token, keys=keys, done=done, left=left, stopped=np.zeros(b, bool))
        toks, lengths, state, self._caches = self.engine.decode_chunk(
            self._caches, state, steps=steps, temperature=temp, top_p=top_p, sampled=sampled, nucleus=nucleus,
            attention=self._batch_attention, stop_ids=self.stop_ids)
        toks, lengths, st = jax.device_get((toks, lengths, state))
        now = time.perf_counter()
        self.chunks += 1
        self.steps += max(int(lengths[j]) - s.length for j, s in active)
        finished = []
        for j, s in active:
            got = toks[j][toks[j] >= 0].tolist()
            for _ in got:
                self.observer.token((now - s.t_last) / len(got))
            s.t_last = now
            s.length, s.key, s.left = int(lengths[j]), st.keys[j], int(st.left[j])
            end = "stop" if st.stopped[j] else ("length" if st.done[j] else None)
            if self._take(s, got, end):
                finished.append(j)
        if finished:
            self._leave(finished)
