"""A model-free engine and tokenizer for the server's unit tests.

``FakeEngine`` has the interface the scheduler uses (``block_size``, ``max_chunk``,
``config.num_heads``, ``new_caches``, ``prefill``, ``calibrate``, ``first_tokens``,
``decode_chunk``) over real, tiny ``KVStore`` caches (so the scheduler's batch re-layouts
run as in production) and the real device loop (``alaya_jax.runtime.decode_loop``), with a
fixed rule for the next token: ``(last token + 1) % vocab``, the same in every slot whatever
the batch.
``FakeTokenizer`` maps id ``i`` to the letter ``chr(97 + i % 26)``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from alaya_jax.runtime import decode_loop
from alaya_jax.store import kv_store

VOCAB = 26
_append = jax.jit(kv_store.append)  # one compile per shape instead of one per op


def _step(caches, token, feed):
    """The fake model step for the device loop: logits favour ``(token + 1) % VOCAB``."""
    (c,) = caches
    z = jnp.zeros((c.batch, 1, c.num_kv_heads, c.head_dim), jnp.float32)
    caches = (kv_store.append(c, z, z, feed.astype(jnp.int32)),)
    return jax.nn.one_hot((token + 1) % VOCAB, VOCAB) * 20.0, caches


_begin = jax.jit(decode_loop.begin, static_argnames=("sampled", "nucleus"))
_chunk = jax.jit(lambda *a, **k: decode_loop.run_chunk(_step, *a, **k),
                 static_argnames=("max_steps", "sampled", "nucleus"))


@dataclasses.dataclass(frozen=True)
class _Config:
    num_heads: int = 2
    num_kv_heads: int = 1
    head_dim: int = 2
    max_position_embeddings: int = 4096


def next_token(token: int) -> int:
    return (int(token) + 1) % VOCAB


class FakeEngine:
    block_size = 8
    max_chunk = 8

    def __init__(self):
        self.config = _Config()
        self.prefills = []  # the token lists prefilled, in order
        self.decode_batches = []  # slots of every decode step
        self.calibrations = 0

    def new_caches(self, *, batch: int, capacity: int):
        c = self.config
        return (kv_store.empty(batch=batch, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, capacity=capacity,
                               block_size=self.block_size),)

    def _append(self, caches, num_new):
        (c,) = caches
        t = int(np.max(num_new))
        z = jnp.zeros((c.batch, t, c.num_kv_heads, c.head_dim), jnp.float32)
        return (_append(c, z, z, jnp.asarray(num_new, jnp.int32)),)

    def _logits(self, tokens):
        nxt = np.array([next_token(t) for t in tokens])
        return jnp.asarray(np.eye(VOCAB, dtype=np.float32)[nxt] * 20.0), nxt

    def prefill(self, caches, prompts):
        self.prefills.append(list(prompts[0]))
        caches = self._append(caches, [len(p) for p in prompts])
        logits, _ = self._logits([p[-1] for p in prompts])
        return caches, logits, None

    def calibrate(self, caches, tails, attention):
        self.calibrations += 1
        (c,) = caches
        return (c.replace(dipr_beta=jnp.full((c.batch, self.config.num_heads), 3.0, jnp.float32)),), None

    def first_tokens(self, logits, keys, temperature, top_p, max_new, *, stop_ids=(), sampled, nucleus):
        return _begin(logits, keys, temperature, top_p, np.asarray(max_new, np.int32),
                      decode_loop.stop_array(stop_ids), sampled=sampled, nucleus=nucleus)

    def decode_chunk(self, caches, state, *, steps, temperature, top_p, sampled, nucleus, attention, stop_ids=()):
        self.decode_batches.append(len(state.token))
        out, state, caches = _chunk(caches, state, np.int32(steps), decode_loop.stop_array(stop_ids), temperature,
                                    top_p, max_steps=self.max_chunk, sampled=sampled, nucleus=nucleus)
        return out, caches[0].lengths, state, caches


class FakeTokenizer:
    vocab_size = VOCAB
    stop_ids = frozenset()

    def encode(self, text: str) -> list[int]:
        return [(ord(ch) - 97) % VOCAB for ch in text]

    def decode(self, ids) -> str:
        return "".join(chr(97 + int(i) % VOCAB) for i in ids)

    def render_chat(self, messages) -> str:
        return "".join(m["content"] for m in messages)
