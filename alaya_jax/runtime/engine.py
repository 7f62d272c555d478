"""Jitted prefill, decode and teacher-forced scoring around a Flax Llama.

The cache is an explicit value: a tuple of :class:`~alaya_jax.store.kv_store.KVStore`
(one per layer) goes into every jitted call and a new one comes out; the model
holds no cache state. Generation decodes on the device in chunks of tokens
(:mod:`alaya_jax.runtime.decode_loop`: a ``lax.while_loop`` with sampling, stop ids and
token limits on the device); one chunk program compiles once per (batch, capacity,
attention config, sampling kind) and serves a whole generation. ``decode_step`` is the
single step, kept as the reference the tests hold the chunks to.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import numpy as np
from flax import nnx

from alaya_jax.attention.attention_fn import make_attention_fn
from alaya_jax.attention.config import AttentionConfig, KernelConfig
from alaya_jax.attention.dense import causal_attention
from alaya_jax.attention.dipr import calibration
from alaya_jax.errors import InputError
from alaya_jax.runtime import decode_loop
from alaya_jax.runtime.decode_loop import DecodeState
from alaya_jax.runtime.sampling import SamplingConfig, sample
from alaya_jax.store import kv_store, sharding
from alaya_jax.store.placement import host_fields

FULL = AttentionConfig(method="full")


@dataclasses.dataclass
class GenerationResult:
    tokens: list[int]  # new tokens (stop token excluded)
    prompt_tokens: int
    ttft_s: float  # start of prefill → first new token on the host
    tpot_s: float  # mean seconds per new token after the first, the first (compiling) chunk excluded; nan if none
    stopped: bool  # ended on a stop token (else on max_new_tokens)
    reused_tokens: int = 0
    decode_chunks: int = 0  # device dispatches of the decode loop (each up to Engine.max_chunk tokens)


@dataclasses.dataclass
class ScoreResult:
    tokens: int  # tokens scored (predictions made)
    nll: float  # mean natural-log negative log-likelihood
    nll_per_token: np.ndarray  # [tokens]
    stats: dict  # method statistics (see Engine.score)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


@jax.jit
def _select_rows(logits: list, ends: list) -> jax.Array:
    """Row b of the chunk logits [B, V] in which sequence b ended (``ends``: bool [B] each) → [B, V]."""
    out = logits[0]
    for lg, e in zip(logits[1:], ends[1:]):
        out = jnp.where(e[:, None], lg, out)
    return out


@jax.jit
def _next_token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits [T, V], targets int32 [T] (−1: none) → −log p(target) f32 [T] (0 where none)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    got = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
    return jnp.where(targets >= 0, -got, 0.0)


def _bucket(n: int, *, minimum: int = 16, maximum: int) -> int:
    b = minimum
    while b < n and b < maximum:
        b *= 2
    return min(b, maximum)


def capacity_bucket(n: int, *, block_size: int, minimum: int, maximum: int) -> int:
    """The capacity for ``n`` positions: ``n`` rounded up to an eighth of its power of two
    (at most 12.5% over), at least ``minimum``, whole blocks, at most ``maximum`` rounded
    up to a block. Buckets keep the number of compiled shapes small (each capacity
    compiles its own prefill and decode programs)."""
    n = max(int(n), int(minimum), 1)
    step = max(block_size, 1 << max(n.bit_length() - 4, 0))
    step = -(-step // block_size) * block_size
    cap = -(-n // step) * step
    top = -(-int(maximum) // block_size) * block_size
    return min(cap, max(top, -(-n // block_size) * block_size))


def host_key(seed: int) -> np.ndarray:
    """``jax.random.PRNGKey(seed)`` (raw threefry2x32 key, uint32 [2]); made on the host (no device
    program) for the seeds 0 .. 2³²−1, whose key is ``[0, seed]``."""
    if 0 <= int(seed) < 1 << 32:
        return np.array([0, int(seed)], np.uint32)
    return np.asarray(jax.random.PRNGKey(seed))


def _steps_until_growth(length: int, steps: int, growth: Optional[float], calibrated_at: int) -> Optional[int]:
    """Decode steps from now (``steps`` done) until the context ``length + steps`` first reaches
    ``growth × calibrated_at`` (the re-calibration point of calibrated DIPR); None without one."""
    if growth is None:
        return None
    s = max(steps, math.ceil(growth * calibrated_at - length))
    while s > steps and length + s - 1 >= growth * calibrated_at:
        s -= 1
    while length + s < growth * calibrated_at:
        s += 1
    return s - steps


def _tpot(reads: list) -> float:
    """Seconds per token from the chunk reads ``(seconds since the first token, tokens)``, the
    first (compiling) chunk left out unless it is the only one; nan without decode tokens."""
    if len(reads) > 1 and sum(n for _, n in reads[1:]) > 0:
        return (reads[-1][0] - reads[0][0]) / sum(n for _, n in reads[1:])
    if reads and reads[0][1] > 0:
        return reads[0][0] / reads[0][1]
    return float("nan")


def _static_attention(attention: AttentionConfig) -> AttentionConfig:
    """The part of ``attention`` a decode program compiles for: β and the attention top-p are
    traced, and the calibration targets only matter at calibration (the βs ride on the caches)."""
    calib = ({"calibration": dataclasses.replace(attention.calibration, dipr_mass=1.0, dipr_keys=None)}
             if attention.calibrated else {})
    return dataclasses.replace(attention, beta=0.0, top_p=1.0, **calib)


def sampling_kind(temperatures, top_ps) -> tuple[bool, bool]:
    """``(sampled, nucleus)`` for rows of these knobs: whether any row draws at random, and
    whether any of those cuts its distribution (the static switches of ``sampling.sample``)."""
    sampled = any(float(t) > 0 for t in temperatures)
    nucleus = sampled and any(float(t) > 0 and float(p) < 1.0 for t, p in zip(temperatures, top_ps))
    return sampled, nucleus


class Engine:
    """Prefill / decode / score for one model.

    ``block_size``: KV store block size. ``prefill_chunk``: the largest chunk of
    prompt tokens per jitted prefill call (shorter prompts use a power-of-two bucket).
    ``prefill_attention``: "reference" (default), "xla" or "cudnn" (see
    ``KernelConfig.prefill_attention``). ``max_chunk``: the most tokens one device
    dispatch decodes (``decode_chunk``); ``first_chunk``: the first chunk's length in
    ``generate`` (chunks then double up to ``max_chunk``). ``devices``: the caches' blocks are
    sharded along the sequence over this many devices of the default backend (docs/design.md §10;
    1: unsharded, the single-device code; more than there are: ``ValueError``).
    """

    def __init__(self, model, *, block_size: int = 64, prefill_chunk: int = 512,
                 prefill_attention: str = "reference", max_chunk: int = 32, first_chunk: int = 4,
                 devices: int = 1):
        if max_chunk < 1 or first_chunk < 1:
            raise ValueError(f"max_chunk and first_chunk must be >= 1, got {max_chunk}, {first_chunk}")
        self.devices = int(devices)
        mesh = sharding.seq_mesh(self.devices) if self.devices > 1 else None
        self.mesh = mesh
        self.config = model.config
        self.recalibrations = 0  # times generate() chose calibrated βs again as the context grew
        self.block_size = block_size
        self.prefill_chunk = prefill_chunk
        self.max_chunk = max_chunk
        self.first_chunk = first_chunk
        self._prefill_cfg = AttentionConfig(method="full", kernel=KernelConfig(prefill_attention=prefill_attention))
        graphdef, state = nnx.split(model)
        if mesh is not None:  # the weights replicated on every device the caches are sharded over
            state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        self._state = state
        self.trace_counts = {"forward": 0, "decode": 0, "decode_chunk": 0}
        donate = jax.default_backend() != "cpu"
        self._stop_arrays: dict = {}

        def forward(state, tokens, positions, caches, num_new, cfg, last_only):
            self.trace_counts["forward"] += 1
            m = nnx.merge(graphdef, state)
            x, caches, aux = m.hidden(tokens, positions, caches, attention=make_attention_fn(cfg, num_new,
                                                                                                  mesh=mesh))
            if last_only:  # only each sequence's last real row reaches the head: [B, V], not [B, T, V]
                x = jnp.take_along_axis(x, jnp.maximum(num_new - 1, 0)[:, None, None], axis=1)[:, 0]
            return m.logits_from_hidden(x), caches, aux

        def model_step(state, cfg, beta, attn_top_p):
            m = nnx.merge(graphdef, state)

            def step(caches, token, feed):
                positions = caches[0].lengths[:, None]
                attn = make_attention_fn(cfg, feed.astype(jnp.int32), beta=beta, top_p=attn_top_p, mesh=mesh)
                logits, caches, aux = m(token[:, None], positions, caches, attention=attn)
                return logits[:, 0].astype(jnp.float32), caches, aux

            return step

        def decode(state, caches, token, key, temperature, top_p, beta, attn_top_p, cfg):
            self.trace_counts["decode"] += 1
            step = model_step(state, cfg, beta, attn_top_p)
            logits, caches, aux = step(caches, token, jnp.ones(token.shape, bool))
            return sample(logits, key, temperature, top_p), logits, caches, aux

        def chunk(state, caches, dstate, steps, stop_ids, temperature, top_p, beta, attn_top_p, cfg, sampled,
                  nucleus):
            self.trace_counts["decode_chunk"] += 1
            step = model_step(state, cfg, beta, attn_top_p)
            out, dstate, caches = decode_loop.run_chunk(lambda c, t, f: step(c, t, f)[:2], caches, dstate, steps,
                                                        stop_ids, temperature, top_p, max_steps=self.max_chunk,
                                                        sampled=sampled, nucleus=nucleus)
            return out, caches[0].lengths, dstate, caches

        def curves(state, tokens, positions, caches, row_ok, grid, sink, window, tail):
            # The calibration rows' keys are already in the caches: attend without appending.
            m = nnx.merge(graphdef, state)

            def attn(layer, q, k, v, cache, pos):
                c = calibration.layer_curves(q, cache, pos, row_ok, sink=sink, window=window, grid=grid)
                if tail != "none":
                    c = (*c, *calibration.tail_error_curve(q, cache, pos, row_ok, sink=sink, window=window,
                                                           grid=grid, mode=tail))
                return causal_attention(q, cache, pos), cache, c

            _, _, aux = m.hidden(tokens, positions, caches, attention=attn)
            return aux

        def new_caches(batch, capacity, placement, layers):
            c = self.config
            capacity = sharding.sharded_capacity(capacity, block_size=self.block_size, devices=self.devices)
            caches = tuple(kv_store.empty(batch=batch, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim,
                                          capacity=capacity, block_size=self.block_size, dtype=self.dtype,
                                          placement=placement)
                           for _ in range(layers))
            if mesh is None:
                return caches
            return jax.lax.with_sharding_constraint(caches, tuple(sharding.store_shardings(st, mesh) for st in caches))

        dc = ("caches",) if donate else ()
        self._curves = jax.jit(curves, static_argnames=("sink", "window", "tail"))
        self._forward = jax.jit(forward, static_argnames=("cfg", "last_only"), donate_argnames=dc)
        self._decode = jax.jit(decode, static_argnames=("cfg",), donate_argnames=dc)
        self._chunk = jax.jit(chunk, static_argnames=("cfg", "sampled", "nucleus"), donate_argnames=dc)
        self._begin = jax.jit(decode_loop.begin, static_argnames=("sampled", "nucleus"))
        self._new_caches = jax.jit(new_caches, static_argnums=(0, 1, 2, 3))

    # ------------------------------------------------------------------ caches
    @property
    def state(self):
        """The model's parameters (an ``nnx.State``; what the model fingerprint hashes)."""
        return self._state

    @property
    def dtype(self):
        return jnp.dtype(self.config.dtype)

    def new_caches(self, *, batch: int, capacity: int, placement: str = "device") -> tuple[kv_store.KVStore, ...]:
        """Empty stores for every layer, made in one compiled program (each array a buffer of its
        own: donation and in-place updates need distinct arrays); sharded over the engine's devices
        (the capacity rounded up to a multiple of ``devices`` blocks). ``placement``: where their values
        (and keys) live (``KernelConfig.kv_placement``; only "device" over several devices); host
        placements are made a layer at a time."""
        if host_fields(placement):
            if self.mesh is not None:
                raise ValueError(f"KV placement {placement!r} keeps K/V on the host of one device; over "
                                 f"{self.devices} devices the caches stay on the devices (placement 'device')")
            # One layer at a time: in a single program XLA could keep every layer's device zeros alive
            # before their transfers to the host (64 GiB for the values of a 1M-token Llama-3-8B).
            return tuple(self._new_caches(int(batch), int(capacity), placement, 1)[0]
                         for _ in range(self.config.num_layers))
        return self._new_caches(int(batch), int(capacity), placement, self.config.num_layers)

    def placed(self, caches) -> tuple[kv_store.KVStore, ...]:
        """The caches as this engine's programs take them: on one device, themselves; over several,
        padded with empty blocks to a multiple of ``devices`` blocks and sharded along the sequence
        (a no-op for caches made by :meth:`new_caches`; caches restored from a snapshot or re-laid out
        by the server are moved once)."""
        if self.mesh is None:
            return caches
        n = self.devices
        out = []
        for st in caches:
            if st.num_blocks % n:
                st = kv_store.fit_blocks(st, -(-st.num_blocks // n) * n)
            out.append(jax.device_put(st, sharding.store_shardings(st, self.mesh)))
        return tuple(out)

    def check_fits(self, total_tokens: int) -> None:
        limit = self.config.max_position_embeddings
        if total_tokens > limit:
            raise InputError(
                f"{total_tokens} tokens (prompt + new tokens) exceed the model's context of {limit} tokens"
            )

    # ------------------------------------------------------------------ prefill
    def prefill(
        self,
        caches,
        prompts: Sequence[Sequence[int]],
        *,
        progress: Optional[Callable[[int], None]] = None,
        score_next: bool = False,
    ):
        """Append each prompt (ragged) to the caches with dense causal attention.

        Returns ``(caches, last_logits f32 [B, V], nll)``: ``nll`` is, when
        ``score_next``, a list of per-sequence f64 arrays [len_b - 1] holding
        −log p(prompt[t+1] | prompt[:t+1]) (teacher forcing), else None.
        ``progress(n)`` is called with the number of tokens of each chunk.
        """
        b = len(prompts)
        if b != caches[0].batch:
            raise ValueError(f"{b} prompts for a cache of batch {caches[0].batch}")
        caches = self.placed(caches)
        lens = np.array([len(p) for p in prompts])
        if (lens < 1).any():
            raise ValueError("every prompt needs at least one token")
        start = np.asarray(caches[0].lengths)
        if ((start + lens) > caches[0].capacity).any():
            raise ValueError(f"prompts of {lens.tolist()} tokens do not fit the cache capacity {caches[0].capacity}")
        chunk = _bucket(int(lens.max()), maximum=self.prefill_chunk)
        last = None
        picks = []  # (chunk logits, rows that ended in that chunk)
        kept = [[] for _ in range(b)] if score_next else None
        for i in range(0, int(lens.max()), chunk):
            n = np.clip(lens - i, 0, chunk)
            toks = np.zeros((b, chunk), np.int32)
            for j in range(b):
                toks[j, : n[j]] = prompts[j][i : i + n[j]]
            pos = (start + i)[:, None] + np.arange(chunk)[None, :]
            logits, caches, _ = self._forward(self._state, toks, pos.astype(np.int32), caches, n.astype(np.int32),
                                              cfg=self._prefill_cfg, last_only=not score_next)
            ends = (n > 0) & (i + n == lens)
            if ends.any():
                picks.append((logits, ends))
            if score_next:
                for j in range(b):
                    if n[j] > 0:
                        nxt = np.full(chunk, -1, np.int32)
                        tgt = prompts[j][i + 1 : i + n[j] + 1]
                        nxt[: len(tgt)] = tgt
                        kept[j].append(np.asarray(_next_token_nll(logits[j], jnp.asarray(nxt)))[: len(tgt)])
            if progress is not None:
                progress(int(n.sum()))
        if score_next:  # full logits [B, T, V]: each row's last real one
            last = jnp.stack([lg[j, int(lens[j] - 1) % chunk] for lg, ends in picks for j in np.nonzero(ends)[0]])
            order = [j for _, ends in picks for j in np.nonzero(ends)[0]]
            last = last[np.argsort(order)]
        elif len(picks) == 1:  # every row ended in the same chunk (always so for one sequence)
            last = picks[0][0]
        else:
            last = _select_rows([lg for lg, _ in picks], [e for _, e in picks])
        nll = [np.concatenate(x).astype(np.float64) for x in kept] if score_next else None
        return caches, last, nll

    # ------------------------------------------------------------------ calibration
    def calibration_curves(self, caches, tails: Sequence[Sequence[int]], *, sink: int,
                           window: int, tail: str = "none") -> calibration.Curves:
        """The calibration curves (:class:`alaya_jax.attention.dipr.calibration.Curves`) of prefilled caches:
        ``tails[b]`` are the last tokens of sequence b's context (the calibration queries); ``tail`` other
        than "none": also the output error with that tail (``Curves.tail_err``)."""
        lengths = np.asarray(caches[0].lengths)
        if len(tails) != len(lengths):
            raise ValueError(f"{len(tails)} calibration tails for a batch of {len(lengths)}")
        toks, pos, ok = calibration.calibration_inputs(tails, lengths)
        aux = self._curves(self._state, jnp.asarray(toks), jnp.asarray(pos), caches, jnp.asarray(ok),
                           jnp.asarray(calibration.BETA_GRID), sink=sink, window=window, tail=tail)
        mass, keys, spread, recall, vmass = (np.stack([np.asarray(a[i], np.float64) for a in aux]) for i in range(5))
        tail_err, tail_rel = ((None, None) if tail == "none" else
                              (np.stack([np.asarray(a[i], np.float64) for a in aux]) for i in (5, 6)))
        return calibration.Curves(mass=mass, keys=keys, spread=spread, rows=ok.sum(axis=1), length=lengths,
                                  recall=recall, vmass=vmass, tail_err=tail_err, tail_rel=tail_rel, tail=tail)

    def calibrate(self, caches, tails: Sequence[Sequence[int]], attention: AttentionConfig):
        """Calibrated DIPR: choose a β per (layer, query head) from the last ``attention.calibration.n_cal``
        tokens of each ``tails[b]`` (the end of sequence b's context, already prefilled) and put
        them on the caches (``KVStore.dipr_beta``). Returns ``(caches, curves)``."""
        if not attention.calibrated:
            raise ValueError("calibrate needs an AttentionConfig with dipr_mass or dipr_keys")
        cal = attention.calibration
        tails = [list(t)[-cal.n_cal:] for t in tails]
        curves = self.calibration_curves(caches, tails, sink=attention.sink, window=attention.window)
        betas = calibration.choose_betas(curves, mass=cal.dipr_mass, keys=cal.dipr_keys)
        return calibration.with_betas(caches, betas), curves

    # ------------------------------------------------------------------ decode
    def decode_step(self, caches, token, *, key, sampling: SamplingConfig, attention: AttentionConfig = FULL):
        """One jitted step: token int32 [B] → (next int32 [B], logits f32 [B,V], caches, aux).

        β and the attention top-p are traced: sweeping them reuses one compilation.
        """
        return self._decode(self._state, self.placed(caches), token, key, np.float32(sampling.temperature),
                            np.float32(sampling.top_p), np.float32(attention.beta), np.float32(attention.top_p),
                            cfg=_static_attention(attention))

    def stop_array(self, stop_ids: Sequence[int]) -> jax.Array:
        """The device array of ``stop_ids`` the loop takes (made once per set of ids)."""
        key = tuple(sorted({int(t) for t in stop_ids}))
        arr = self._stop_arrays.get(key)
        if arr is None:
            arr = self._stop_arrays[key] = decode_loop.stop_array(key)
        return arr

    def first_tokens(self, logits, keys, temperature, top_p, max_new, *, stop_ids: Sequence[int] = (),
                     sampled: bool, nucleus: bool) -> tuple[jax.Array, DecodeState]:
        """The first token of each row from the prefill's last logits f32 [B, V] and the state the
        chunks continue from (:func:`alaya_jax.runtime.decode_loop.begin`; ``keys``/``temperature``/
        ``top_p`` in either key mode of :func:`alaya_jax.runtime.sampling.draw`; ``max_new`` [B])."""
        return self._begin(logits, keys, temperature, top_p, np.asarray(max_new, np.int32), self.stop_array(stop_ids),
                           sampled=sampled, nucleus=nucleus)

    def decode_chunk(self, caches, state: DecodeState, *, steps: int, temperature, top_p,
                     sampled: bool, nucleus: bool, attention: AttentionConfig = FULL, stop_ids: Sequence[int] = ()):
        """Up to ``steps`` (1..``max_chunk``) decode steps in one dispatch, on the device
        (:func:`alaya_jax.runtime.decode_loop.run_chunk`). Returns ``(tokens int32 [B, max_chunk]
        (−1: nothing emitted), lengths int32 [B], state, caches)``, not waited for: the caller may
        dispatch the next chunk before reading this one's tokens. The caches are donated."""
        if not 1 <= int(steps) <= self.max_chunk:
            raise ValueError(f"steps must be in 1..{self.max_chunk}, got {steps}")
        return self._chunk(self._state, self.placed(caches), state, np.int32(steps), self.stop_array(stop_ids),
                           temperature, top_p,
                           np.float32(attention.beta), np.float32(attention.top_p), cfg=_static_attention(attention),
                           sampled=sampled, nucleus=nucleus)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        sampling: SamplingConfig = SamplingConfig(),
        attention: AttentionConfig = FULL,
        stop_ids: Sequence[int] = (),
        on_token: Optional[Callable[[int, int], None]] = None,
        caches=None,
        capacity: Optional[int] = None,
        progress: Optional[Callable[[int], None]] = None,
        context_tokens: Optional[Sequence[Sequence[int]]] = None,
    ) -> tuple[list[GenerationResult], tuple]:
        """Generate for a batch of prompts of different lengths.

        ``caches``: already-prefilled caches whose tokens precede each prompt
        (e.g. from a context snapshot), moved to ``attention.kernel.kv_placement`` if they are
        elsewhere (new caches are made there); ``prompts`` are then the tokens still to
        prefill; ``context_tokens[b]`` are then the tokens already in them (calibrated DIPR
        reads the last ``calibration.n_cal`` tokens of context + prompt). ``on_token(batch_index, token)``
        streams tokens, in order, a chunk at a time (chunks of ``first_chunk`` tokens, doubling up
        to ``max_chunk``; the next chunk runs on the device while the host streams this one).
        Returns the results and the final caches.
        """
        b = len(prompts)
        start = np.zeros(b, int) if caches is None else np.asarray(caches[0].lengths)
        lens = np.array([len(p) for p in prompts]) + start
        total = int(lens.max()) + sampling.max_new_tokens
        self.check_fits(total)
        placement = attention.kernel.kv_placement
        if caches is None:
            cap = capacity or total
            caches = self.new_caches(batch=b, capacity=cap, placement=placement)
        elif caches[0].capacity < total:
            raise ValueError(f"the given caches hold {caches[0].capacity} positions; {total} are needed")
        elif caches[0].placement != placement:
            caches = tuple(kv_store.place(c, placement) for c in caches)
        attention = attention.resolve(int(lens.min()))
        calibrated = attention.method == "dipr" and attention.calibrated
        t0 = time.perf_counter()
        caches, logits, _ = self.prefill(caches, prompts, progress=progress)
        history = None
        if calibrated:
            before = [[] for _ in range(b)] if context_tokens is None else context_tokens
            if len(before) != b:
                raise ValueError(f"context_tokens for {len(before)} sequences, {b} prompts")
            for j in range(b):
                if len(before[j]) != start[j] and len(prompts[j]) < min(attention.calibration.n_cal, int(lens[j])):
                    raise ValueError(f"sequence {j}: calibrating on the last {attention.calibration.n_cal} tokens "
                                     f"needs the "
                                     f"{int(start[j])} tokens already in the caches (pass context_tokens)")
            history = [list(before[j]) + list(prompts[j]) for j in range(b)]  # the tokens in the caches
            caches, _ = self.calibrate(caches, history, attention)
        calibrated_at = int(lens.max())
        sampled, nucleus = sampling_kind([sampling.temperature], [sampling.top_p])
        knobs = dict(temperature=np.float32(sampling.temperature), top_p=np.float32(sampling.top_p),
                     sampled=sampled, nucleus=nucleus)
        first, state = self.first_tokens(logits, host_key(sampling.seed), max_new=np.full(b, sampling.max_new_tokens),
                                         stop_ids=stop_ids, **knobs)
        out = [[] for _ in range(b)]
        stopped = np.zeros(b, bool)

        def take(rows: np.ndarray, st_done, st_stopped) -> np.ndarray:
            """Stream the tokens [B, n] of one chunk (−1: none); → the rows' done flags."""
            rows, st_done, st_stopped = jax.device_get((rows, st_done, st_stopped))
            for j in range(b):
                for tj in rows[j][rows[j] >= 0].tolist():
                    out[j].append(tj)
                    if history is not None:
                        history[j].append(tj)
                    if on_token is not None:
                        on_token(j, tj)
            stopped[:] = np.asarray(st_stopped)
            return np.asarray(st_done)

        done = take(np.asarray(first)[:, None], state.done, state.stopped)
        t_first = time.perf_counter()
        steps, max_steps = 0, sampling.max_new_tokens - 1  # decode steps dispatched / at most
        sizes = decode_loop.chunk_sizes(self.first_chunk, self.max_chunk)
        growth = attention.calibration.recalibrate_growth if calibrated else None
        pending = collections.deque()  # chunks dispatched, tokens not yet read
        reads = []  # (seconds since t_first when a chunk's tokens were on the host, tokens in it)
        while True:
            more = not done.all() and steps < max_steps
            until = _steps_until_growth(int(lens.max()), steps, growth, calibrated_at) if more else None
            if until == 0:  # re-calibrate now: from the tokens in the caches (every chunk read first)
                while pending:
                    done = take(*pending.popleft())
                if not done.all():
                    caches, _ = self.calibrate(caches, [h[: int(lens[j]) + steps] for j, h in enumerate(history)],
                                               attention)
                    calibrated_at = int(lens.max()) + steps
                    self.recalibrations += 1
                continue
            if more:
                n = min(next(sizes), max_steps - steps, until if until is not None else max_steps)
                toks, _, state, caches = self.decode_chunk(caches, state, steps=n, attention=attention,
                                                           stop_ids=stop_ids, **knobs)
                pending.append((toks, state.done, state.stopped))
                steps += n
            if pending and (len(pending) > 1 or not more):
                before = sum(len(o) for o in out)
                done = take(*pending.popleft())
                reads.append((time.perf_counter() - t_first, sum(len(o) for o in out) - before))
            elif not more:
                break
        ttft = t_first - t0
        results = [GenerationResult(tokens=out[j], prompt_tokens=int(lens[j]), ttft_s=ttft, tpot_s=_tpot(reads),
                                    stopped=bool(stopped[j]), reused_tokens=int(start[j]), decode_chunks=len(reads))
                   for j in range(b)]
        return results, caches

    # ------------------------------------------------------------------ scoring
    def score(
        self,
        tokens: Sequence[int],
        *,
        progress: Optional[Callable[[int], None]] = None,
    ) -> ScoreResult:
        """Teacher-forced mean next-token NLL (natural log) of ``tokens`` under full attention."""
        if len(tokens) < 2:
            raise ValueError(f"scoring needs at least 2 tokens, got {len(tokens)}")
        self.check_fits(len(tokens))
        caches = self.new_caches(batch=1, capacity=len(tokens))
        _, _, nlls = self.prefill(caches, [list(tokens)], progress=progress, score_next=True)
        nll = nlls[0]
        return ScoreResult(tokens=len(nll), nll=float(nll.mean()), nll_per_token=nll, stats={})
