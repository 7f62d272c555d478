"""Dense causal attention over a store (alaya_jax/attention/dense.py): the two-part prefill of the
cuDNN path (the chunk over the prefix before it, the chunk causally over its own stored rows,
merged by log-sum-exp) against the reference, on ragged rows (some with no prefix), GQA 2 and NaN-poisoned
padding; cuDNN refusing loudly where it cannot run; and, on an NVIDIA GPU only, cuDNN itself
against the reference for decode steps and prefill chunks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alaya_jax.attention.dense import (DENSE_IMPLEMENTATIONS, causal_attention, cudnn_attention,
                                       merge_prefix_and_chunk, reference_parts)
from alaya_jax.store import kv_store
from pallas_kernels.common import BackendUnavailableError

HQ, HKV, D, BK = 4, 2, 16, 8


def chunk_case(prior, num_new, t, *, dtype=jnp.float32, capacity=64, seed=0, poison=True):
    """A store holding ``prior[b]`` old positions and then ``num_new[b]`` chunk rows (appended like the
    attention function does), positions past the lengths NaN when ``poison``; → (q, store, positions, num_new)."""
    rng = np.random.default_rng(seed)
    b = len(prior)
    old = rng.normal(size=(b, capacity, HKV, D)).astype(np.float32)
    store = kv_store.from_dense(jnp.asarray(old, dtype), jnp.asarray(old[..., ::-1].copy(), dtype),
                                jnp.asarray(prior, jnp.int32), block_size=BK, capacity=capacity)
    if poison:
        bad = ~np.asarray(kv_store.positions_valid(store)).reshape(b, 1, -1, BK)[..., None]
        store = store.replace(keys=jnp.where(bad, jnp.nan, store.keys).astype(dtype),
                              values=jnp.where(bad, jnp.nan, store.values).astype(dtype))
    k = jnp.asarray(rng.normal(size=(b, t, HKV, D)), dtype)
    v = jnp.asarray(rng.normal(size=(b, t, HKV, D)), dtype)
    n = jnp.asarray(num_new, jnp.int32)
    store = kv_store.append(store, k, v, n)
    q = jnp.asarray(rng.normal(size=(b, t, HQ, D)) * 2.0, dtype)
    positions = jnp.asarray(prior)[:, None] + jnp.arange(t)[None, :]
    return q, store, positions, n


def valid_rows(out, num_new):
    return [np.asarray(out[j, : int(n)], np.float32) for j, n in enumerate(np.asarray(num_new))]


def test_prefix_and_chunk_merge_to_causal_attention():
    # row 2: its T rows run past the capacity (the last ones are padding)
    q, store, pos, n = chunk_case(prior=[0, 9, 60], num_new=[5, 7, 3], t=8)
    prefix, chunk, prior, num_new = reference_parts(q, store, pos)
    np.testing.assert_array_equal(np.asarray(num_new), np.asarray(n))
    got = merge_prefix_and_chunk(prefix, chunk, prior, num_new)
    want = causal_attention(q, store, pos)
    for g, w in zip(valid_rows(got, n), valid_rows(want, n)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)
    assert np.isfinite(np.asarray(got)).all()  # rows past num_new are 0, never NaN


def test_cudnn_refuses_loudly_where_it_cannot_run():
    q, store, pos, n = chunk_case(prior=[3], num_new=[1], t=1)
    if jax.default_backend() != "gpu":
        with pytest.raises(BackendUnavailableError, match="needs an NVIDIA GPU"):
            DENSE_IMPLEMENTATIONS["cudnn"](q, store, pos)
    else:  # float32 is not a cuDNN flash dtype; a filter is not taken
        with pytest.raises(BackendUnavailableError, match="bfloat16 or float16"):
            cudnn_attention(q, store, pos)
        with pytest.raises(BackendUnavailableError, match="no filter"):
            cudnn_attention(q.astype(jnp.bfloat16), store.replace(keys=store.keys.astype(jnp.bfloat16),
                                                                  values=store.values.astype(jnp.bfloat16)),
                            pos, key_mask=jnp.ones((1, store.capacity), bool))


gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")


@gpu
@pytest.mark.parametrize("poison", [False, True], ids=["zero-padding", "nan-padding"])
@pytest.mark.parametrize("prior,num_new,t", [([0, 9, 300], [1, 1, 1], 1), ([0, 9, 300], [64, 17, 40], 64)],
                         ids=["decode", "prefill"])
def test_cudnn_equals_the_reference(prior, num_new, t, poison):
    q, store, pos, n = chunk_case(prior=prior, num_new=num_new, t=t, dtype=jnp.bfloat16, capacity=512,
                                        poison=poison)
    got = jax.jit(cudnn_attention)(q, store, pos)
    f32 = store.replace(keys=store.keys.astype(jnp.float32), values=store.values.astype(jnp.float32))
    want = causal_attention(q.astype(jnp.float32), f32, pos)  # the reference in f32 on the same bf16 values
    for g, w in zip(valid_rows(got, n), valid_rows(want, n)):
        np.testing.assert_allclose(g, w, rtol=3e-2, atol=3e-2)
