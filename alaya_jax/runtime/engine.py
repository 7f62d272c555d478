"""Jitted prefill, decode and teacher-forced scoring around a Flax Llama.

The cache is an explicit value: a tuple of :class:`~alaya_jax.store.kv_store.KVStore`
(one per layer) goes into every jitted call and a new one comes out; the model
holds no cache state. One decode step compiles once per (batch, capacity,
attention config) and serves a whole generation.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alaya_jax.attention.attention_fn import make_attention_fn
from alaya_jax.attention.config import AttentionConfig, KernelConfig
from alaya_jax.attention.dense import causal_attention
from alaya_jax.attention.dipr import calibration
from alaya_jax.errors import InputError
from alaya_jax.runtime.sampling import SamplingConfig, sample
from alaya_jax.store import kv_store
from alaya_jax.store.placement import host_fields

FULL = AttentionConfig(method="full")


@dataclasses.dataclass
class GenerationResult:
    tokens: list[int]  # new tokens (stop token excluded)
    prompt_tokens: int
    ttft_s: float  # start of prefill → first new token on the host
    tpot_s: float  # mean seconds per decode step, the first (compiling) step excluded; nan if none
    stopped: bool  # ended on a stop token (else on max_new_tokens)
    reused_tokens: int = 0


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


class Engine:
    """Prefill / decode / score for one model.

    ``block_size``: KV store block size. ``prefill_chunk``: the largest chunk of
    prompt tokens per jitted prefill call (shorter prompts use a power-of-two bucket).
    ``prefill_attention``: "reference" (default), "xla" or "cudnn" (see
    ``KernelConfig.prefill_attention``).
    """

    def __init__(self, model, *, block_size: int = 64, prefill_chunk: int = 512,
                 prefill_attention: str = "reference"):
        self.config = model.config
        self.recalibrations = 0  # times generate() chose calibrated βs again as the context grew
        self.block_size = block_size
        self.prefill_chunk = prefill_chunk
        self._prefill_cfg = AttentionConfig(method="full", kernel=KernelConfig(prefill_attention=prefill_attention))
        graphdef, state = nnx.split(model)
        self._state = state
        self.trace_counts = {"forward": 0, "decode": 0}
        donate = jax.default_backend() != "cpu"

        def forward(state, tokens, positions, caches, num_new, cfg):
            self.trace_counts["forward"] += 1
            m = nnx.merge(graphdef, state)
            return m(tokens, positions, caches, attention=make_attention_fn(cfg, num_new))

        def decode(state, caches, token, key, temperature, top_p, beta, attn_top_p, cfg):
            self.trace_counts["decode"] += 1
            m = nnx.merge(graphdef, state)
            positions = caches[0].lengths[:, None]
            attn = make_attention_fn(cfg, beta=beta, top_p=attn_top_p)
            logits, caches, aux = m(token[:, None], positions, caches, attention=attn)
            logits = logits[:, 0].astype(jnp.float32)
            return sample(logits, key, temperature, top_p), logits, caches, aux

        def curves(state, tokens, positions, caches, row_ok, grid, sink, window):
            # The calibration rows' keys are already in the caches: attend without appending.
            m = nnx.merge(graphdef, state)

            def attn(layer, q, k, v, cache, pos):
                c = calibration.layer_curves(q, cache, pos, row_ok, sink=sink, window=window, grid=grid)
                return causal_attention(q, cache, pos), cache, c

            _, _, aux = m.hidden(tokens, positions, caches, attention=attn)
            return aux

        self._curves = jax.jit(curves, static_argnames=("sink", "window"))
        self._forward = jax.jit(forward, static_argnames=("cfg",), donate_argnames=("caches",) if donate else ())
        self._decode = jax.jit(decode, static_argnames=("cfg",), donate_argnames=("caches",) if donate else ())

    # ------------------------------------------------------------------ caches
    @property
    def state(self):
        """The model's parameters (an ``nnx.State``; what the model fingerprint hashes)."""
        return self._state

    @property
    def dtype(self):
        return jnp.dtype(self.config.dtype)

    def new_caches(self, *, batch: int, capacity: int, placement: str = "device") -> tuple[kv_store.KVStore, ...]:
        """Empty caches, one store per layer; ``placement``: where their values (and keys) live
        (``KernelConfig.kv_placement``; host fields are allocated in pinned host memory directly)."""
        c = self.config

        def one():
            return kv_store.empty(batch=batch, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, capacity=capacity,
                                  block_size=self.block_size, dtype=self.dtype, placement=placement)

        if host_fields(placement):
            return tuple(one() for _ in range(c.num_layers))
        first = one()
        # Separate buffers per layer (donation and in-place updates need distinct arrays).
        return tuple(jax.tree.map(jnp.copy, first) for _ in range(c.num_layers))

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
        lens = np.array([len(p) for p in prompts])
        if (lens < 1).any():
            raise ValueError("every prompt needs at least one token")
        start = np.asarray(caches[0].lengths)
        if ((start + lens) > caches[0].capacity).any():
            raise ValueError(f"prompts of {lens.tolist()} tokens do not fit the cache capacity {caches[0].capacity}")
        chunk = _bucket(int(lens.max()), maximum=self.prefill_chunk)
        last = [None] * b
        kept = [[] for _ in range(b)] if score_next else None
        for i in range(0, int(lens.max()), chunk):
            n = np.clip(lens - i, 0, chunk)
            toks = np.zeros((b, chunk), np.int32)
            for j in range(b):
                toks[j, : n[j]] = prompts[j][i : i + n[j]]
            pos = (start + i)[:, None] + np.arange(chunk)[None, :]
            logits, caches, _ = self._forward(self._state, jnp.asarray(toks), jnp.asarray(pos, jnp.int32),
                                              caches, jnp.asarray(n, jnp.int32), cfg=self._prefill_cfg)
            for j in range(b):
                if n[j] > 0 and i + n[j] == lens[j]:
                    last[j] = logits[j, n[j] - 1]
                if score_next and n[j] > 0:
                    nxt = np.full(chunk, -1, np.int32)
                    tgt = prompts[j][i + 1 : i + n[j] + 1]
                    nxt[: len(tgt)] = tgt
                    kept[j].append(np.asarray(_next_token_nll(logits[j], jnp.asarray(nxt)))[: len(tgt)])
            if progress is not None:
                progress(int(n.sum()))
        last_logits = jnp.stack(last).astype(jnp.float32)
        nll = [np.concatenate(x).astype(np.float64) for x in kept] if score_next else None
        return caches, last_logits, nll

    # ------------------------------------------------------------------ calibration
    def calibration_curves(self, caches, tails: Sequence[Sequence[int]], *, sink: int,
                           window: int) -> calibration.Curves:
        """The calibration curves (:class:`alaya_jax.attention.dipr.calibration.Curves`) of prefilled caches:
        ``tails[b]`` are the last tokens of sequence b's context (the calibration queries)."""
        lengths = np.asarray(caches[0].lengths)
        if len(tails) != len(lengths):
            raise ValueError(f"{len(tails)} calibration tails for a batch of {len(lengths)}")
        toks, pos, ok = calibration.calibration_inputs(tails, lengths)
        aux = self._curves(self._state, jnp.asarray(toks), jnp.asarray(pos), caches, jnp.asarray(ok),
                           jnp.asarray(calibration.BETA_GRID), sink=sink, window=window)
        mass, keys, spread, recall, vmass = (np.stack([np.asarray(a[i], np.float64) for a in aux]) for i in range(5))
        return calibration.Curves(mass=mass, keys=keys, spread=spread, rows=ok.sum(axis=1), length=lengths,
                                  recall=recall, vmass=vmass)

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
        # Calibration targets only matter at calibration (the βs ride on the caches): one compile for all.
        calib = ({"calibration": dataclasses.replace(attention.calibration, dipr_mass=1.0, dipr_keys=None)}
                 if attention.calibrated else {})
        static = dataclasses.replace(attention, beta=0.0, top_p=1.0, **calib)
        return self._decode(self._state, caches, token, key, jnp.float32(sampling.temperature),
                            jnp.float32(sampling.top_p), jnp.float32(attention.beta),
                            jnp.float32(attention.top_p), cfg=static)

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
        streams tokens. Returns the results and the final caches.
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
        t0 = time.perf_counter()
        caches, logits, _ = self.prefill(caches, prompts, progress=progress)
        if attention.method == "dipr" and attention.calibrated:
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
        key = jax.random.PRNGKey(sampling.seed)
        key, sub = jax.random.split(key)
        token = sample(logits, sub, jnp.float32(sampling.temperature), jnp.float32(sampling.top_p))
        out = [[] for _ in range(b)]
        done = np.zeros(b, bool)
        stopped = np.zeros(b, bool)
        stop = set(int(s) for s in stop_ids)
        tok_host = np.asarray(token)
        t_first = time.perf_counter()
        step_times = []
        for step in range(sampling.max_new_tokens):
            for j in range(b):
                if done[j]:
                    continue
                tj = int(tok_host[j])
                if tj in stop:
                    done[j] = stopped[j] = True
                    continue
                out[j].append(tj)
                if attention.calibrated:
                    history[j].append(tj)
                if on_token is not None:
                    on_token(j, tj)
                if len(out[j]) >= sampling.max_new_tokens:
                    done[j] = True
            if done.all():
                break
            ts = time.perf_counter()
            grown = int(lens.max()) + step  # positions in the caches of the longest row
            growth = attention.calibration.recalibrate_growth
            if attention.calibrated and growth is not None and grown >= growth * calibrated_at:
                # βs again from the most recent tokens (those already in the caches)
                caches, _ = self.calibrate(caches, [h[: int(lens[j]) + step] for j, h in enumerate(history)],
                                           attention)
                calibrated_at = grown
                self.recalibrations += 1
            key, sub = jax.random.split(key)
            token, _, caches, _ = self.decode_step(caches, token, key=sub, sampling=sampling, attention=attention)
            tok_host = np.asarray(token)
            step_times.append(time.perf_counter() - ts)
        ttft = t_first - t0
        # The first decode step of a process compiles; it is part of the wall time but not of TPOT.
        timed = step_times[1:] if len(step_times) > 1 else step_times
        tpot = float(np.mean(timed)) if timed else float("nan")
        results = [GenerationResult(tokens=out[j], prompt_tokens=int(lens[j]), ttft_s=ttft, tpot_s=tpot,
                                    stopped=bool(stopped[j]), reused_tokens=int(start[j])) for j in range(b)]
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
