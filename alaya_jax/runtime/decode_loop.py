"""Multi-token decoding on the device: up to ``max_steps`` tokens per dispatch, sampling, stop ids
and token limits checked on the device, tokens handed out in chunks.

One chunk is a ``lax.while_loop`` over decode steps (:func:`run_chunk`); the host calls it again
for the next chunk and reads each chunk's tokens as a whole, so there is no host round trip and
no Python between the steps of a chunk. :func:`begin` turns the prefill's last logits into the
first token and the loop's state. Both are traceable and take the model step as a function,
so the engine and the server's tests share them::

    step(caches, token int32 [B], feed bool [B]) -> (logits f32 [B, V], caches)

``feed[b]`` false: row b is finished (or an idle slot) and appends nothing to its cache.

A row's life, the order ``Engine.generate`` always had: a sampled stop id ends the row and is
not emitted; the token that reaches the row's limit is emitted and ends it (and is never fed).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from alaya_jax.runtime.sampling import draw

StepFn = Callable[..., tuple]


@struct.dataclass
class DecodeState:
    """What the loop carries from one chunk to the next.

    token  int32 [B]   the row's last emitted token (the next step's input)
    keys   uint32 [2] (one key chain for the batch) or [B, 2] (a chain per row)
    done   bool [B]    finished (stop id, limit) or idle: appends nothing, emits nothing
    left   int32 [B]   tokens the row may still emit
    stopped bool [B]   ended on a stop id
    """

    token: jax.Array
    keys: jax.Array
    done: jax.Array
    left: jax.Array
    stopped: jax.Array


def _is_stop(tokens: jax.Array, stop_ids: jax.Array) -> jax.Array:
    """tokens int32 [B], stop_ids int32 [S] (−1: padding) → bool [B]."""
    return jnp.any((tokens[:, None] == stop_ids[None, :]) & (stop_ids[None, :] >= 0), axis=-1)


def begin(logits: jax.Array, keys: jax.Array, temperature, top_p, max_new: jax.Array, stop_ids: jax.Array, *,
          sampled: bool, nucleus: bool) -> tuple[jax.Array, DecodeState]:
    """The first token from the prefill's last logits f32 [B, V]: ``(first int32 [B], state)``;
    ``first[b]`` is −1 when row b drew a stop id (then it is done). ``max_new`` int32 [B]:
    each row's token limit (>= 1). ``keys``, ``temperature``, ``top_p``: see
    :func:`alaya_jax.runtime.sampling.draw`."""
    tok, keys = draw(logits, keys, temperature, top_p, sampled=sampled, nucleus=nucleus)
    stop = _is_stop(tok, stop_ids)
    left = max_new.astype(jnp.int32) - (~stop).astype(jnp.int32)
    state = DecodeState(token=tok, keys=keys, done=stop | (left <= 0), left=left, stopped=stop)
    return jnp.where(stop, -1, tok), state


def run_chunk(step: StepFn, caches, state: DecodeState, steps: jax.Array, stop_ids: jax.Array, temperature, top_p,
              *, max_steps: int, sampled: bool, nucleus: bool):
    """Up to ``steps`` (<= ``max_steps``, may be traced) decode steps, ending early when every row
    is done. Returns ``(tokens int32 [B, max_steps], state, caches)``: ``tokens[b, i]`` is the token
    row b emitted at step i of this chunk, −1 where it emitted none (done, or drew a stop id)."""
    b = state.token.shape[0]
    out = jnp.full((b, max_steps), -1, jnp.int32)

    def cond(c):
        i, st, _, _ = c
        return (i < steps) & ~jnp.all(st.done)

    def body(c):
        i, st, caches, out = c
        feed = ~st.done
        logits, caches = step(caches, st.token, feed)
        tok, keys = draw(logits, st.keys, temperature, top_p, sampled=sampled, nucleus=nucleus)
        stop = feed & _is_stop(tok, stop_ids)
        emit = feed & ~stop
        out = jax.lax.dynamic_update_slice_in_dim(out, jnp.where(emit, tok, -1)[:, None], i, axis=1)
        left = st.left - emit.astype(jnp.int32)
        st = DecodeState(token=jnp.where(emit, tok, st.token), keys=keys, done=st.done | stop | (left <= 0),
                         left=left, stopped=st.stopped | stop)
        return i + 1, st, caches, out

    _, state, caches, out = jax.lax.while_loop(cond, body, (jnp.int32(0), state, caches, out))
    return out, state, caches


def stop_array(stop_ids, *, size: int = 8):
    """Stop ids as the loop takes them: int32 [max(size, n)] padded with −1 (a fixed size, so
    that tokenizers with a few stop ids share one compilation)."""
    ids = sorted({int(s) for s in stop_ids})
    n = max(size, len(ids))
    return jax.device_put(np.asarray(ids + [-1] * (n - len(ids)), np.int32))


def chunk_sizes(first: int, largest: int):
    """Chunk lengths ``first, 2·first, 4·first, …`` capped at ``largest``: short chunks early (the
    first tokens stream soon), long ones later (fewer dispatches)."""
    n = max(1, int(first))
    while True:
        yield min(n, largest)
        n = min(2 * n, largest)


__all__ = ["DecodeState", "begin", "chunk_sizes", "run_chunk", "stop_array"]
