"""The engine's chunked prefill through the KV store against an independent NumPy Llama.

Model-only checks (RoPE scaling, configs, untied head, bf16) live in test_model.py.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tests.support.numpy_llama import np_llama_model as np_llama  # noqa: E402  (the shared float64 NumPy Llama)

from alaya_jax.runtime.engine import Engine
from models import Llama, tiny


@pytest.fixture(scope="module")
def tiny_model():
    return Llama(tiny(), rngs=nnx.Rngs(1))


def _engine_logits(model, tokens, chunk):
    """Last-position logits of prefills of growing prefixes, in chunks of ``chunk``: [(pos, logits)]."""
    eng = Engine(model, block_size=4, prefill_chunk=chunk)
    out = []
    for n in range(1, len(tokens) + 1, 7):
        c2 = eng.new_caches(batch=1, capacity=len(tokens))
        _, last, _ = eng.prefill(c2, [tokens[:n]])
        out.append((n - 1, np.asarray(last[0], np.float64)))
    return out


def test_tiny_logits_match_numpy(tiny_model):
    toks = np.random.default_rng(0).integers(0, 97, size=30).tolist()
    want = np_llama(tiny_model, toks)
    for chunk in (8, 32):
        for pos, got in _engine_logits(tiny_model, toks, chunk):
            np.testing.assert_allclose(got, want[pos], rtol=2e-4, atol=2e-4)


def test_wrong_number_of_caches(tiny_model):
    with pytest.raises(ValueError, match="layer caches"):
        tiny_model(jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 1), jnp.int32), (None,), attention=None)
