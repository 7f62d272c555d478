"""Comparing KV stores in tests: the names of a store's arrays (through the store's own
``to_arrays``) and a bit-for-bit comparison."""

import numpy as np

from alaya_jax.store import kv_store

#: The arrays a store is made of (every field but the optional calibrated βs).
ARRAY_NAMES = tuple(kv_store.to_arrays(kv_store.empty(batch=1, num_kv_heads=1, head_dim=2, capacity=1)))


def bits(x):
    return np.asarray(x).view(np.uint8)


def assert_bitwise_equal(a: kv_store.KVStore, b: kv_store.KVStore):
    """Every array of ``a`` and ``b``: same dtype, shape and bits."""
    for f in ARRAY_NAMES:
        x, y = np.asarray(getattr(a, f)), np.asarray(getattr(b, f))
        assert x.dtype == y.dtype and x.shape == y.shape, (f, x.dtype, y.dtype, x.shape, y.shape)
        assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), f
