"""alaya_jax.store.kv_store: the store's shape changes and array layout (small, fast).

Every shape change is checked against a store built directly at the target shape
(``from_dense`` with that capacity), bit for bit, so padding writes exactly what an
empty position holds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alaya_jax.store import kv_store
from tests.support.stores import ARRAY_NAMES, assert_bitwise_equal, bits

BK = 8


def dense(n, *, b=1, hkv=2, d=8, seed=0):
    rng = np.random.default_rng(seed)
    k = jnp.asarray(rng.standard_normal((b, n, hkv, d), np.float32), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((b, n, hkv, d), np.float32), jnp.bfloat16)
    return k, v


def store(n, *, capacity=None, **kw):
    k, v = dense(n, **kw)
    return kv_store.from_dense(k, v, block_size=BK, capacity=capacity)


def test_fit_blocks_pads_with_empty_positions_and_cuts():
    small = store(20)  # 3 blocks
    padded = kv_store.fit_blocks(small, 6)
    assert padded.num_blocks == 6
    assert_bitwise_equal(padded, store(20, capacity=48))  # what a store built at that size holds
    cut = kv_store.fit_blocks(padded, 3)
    assert_bitwise_equal(cut, small)
    assert kv_store.fit_blocks(small, 3).keys is small.keys  # no copy unless asked
    with pytest.raises(ValueError, match="num_blocks"):
        kv_store.fit_blocks(small, 0)


def test_fit_blocks_copy_gives_fresh_buffers_under_jit():
    s = store(16)  # exactly 2 blocks: every blocked field keeps its size
    out = jax.jit(lambda x: kv_store.fit_blocks(x, 2, copy=True))(s)
    assert_bitwise_equal(out, s)
    mine = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(out)}
    theirs = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(s)}
    assert not mine & theirs


def test_resize_rounds_to_blocks_and_refuses_to_cut_valid_positions():
    s = store(20)
    assert kv_store.resize(s, 24) is s  # already 3 blocks
    big = kv_store.resize(s, 41)  # rounded up to 6 blocks
    assert big.capacity == 48
    assert_bitwise_equal(kv_store.resize(big, 20), s)
    with pytest.raises(ValueError, match="cannot hold"):
        kv_store.resize(s, 16)


def test_truncate_and_with_lengths():
    s = store(20, b=2)
    t = kv_store.truncate(s, 11)
    assert np.asarray(t.lengths).tolist() == [11, 11]
    assert bits(t.keys).tobytes() == bits(s.keys).tobytes()  # contents past the length are left as they are
    assert kv_store.truncate(s, 20) is s
    with pytest.raises(ValueError, match="cannot truncate"):
        kv_store.truncate(s, 21)
    w = kv_store.with_lengths(s, jnp.asarray([3, 7]))
    assert np.asarray(w.lengths).tolist() == [3, 7] and w.lengths.dtype == jnp.int32
    assert np.asarray(jax.jit(kv_store.with_lengths)(s, 5).lengths).tolist() == [5, 5]


def test_take_rows_gathers_every_batched_field():
    k, v = dense(20, b=3)
    s = kv_store.from_dense(k, v, jnp.asarray([20, 5, 12]), block_size=BK)
    s = s.replace(dipr_beta=jnp.arange(3 * 4, dtype=jnp.float32).reshape(3, 4))
    got = kv_store.take_rows(s, jnp.asarray([2, 0]))
    want = kv_store.from_dense(k[jnp.asarray([2, 0])], v[jnp.asarray([2, 0])], jnp.asarray([12, 20]), block_size=BK)
    assert_bitwise_equal(got, want)
    np.testing.assert_array_equal(np.asarray(got.dipr_beta), np.asarray(s.dipr_beta)[[2, 0]])


def test_place_row_pads_the_row_and_sets_its_length_and_betas():
    batch = kv_store.empty(batch=2, num_kv_heads=2, head_dim=8, capacity=32, block_size=BK, dtype=jnp.bfloat16)
    row = store(10)  # 2 blocks, into a batch of 4
    out = kv_store.place_row(batch, 1, row)
    assert np.asarray(out.lengths).tolist() == [0, 10] and out.dipr_beta is None
    assert_bitwise_equal(kv_store.take_rows(out, jnp.asarray([1])), kv_store.resize(row, 32))
    assert_bitwise_equal(kv_store.take_rows(out, jnp.asarray([0])), kv_store.take_rows(batch, jnp.asarray([0])))
    calibrated = batch.replace(dipr_beta=jnp.ones((2, 4), jnp.float32))
    got = kv_store.place_row(calibrated, 0, row.replace(dipr_beta=jnp.full((1, 4), 7.0, jnp.float32)))
    np.testing.assert_array_equal(np.asarray(got.dipr_beta), [[7.0] * 4, [1.0] * 4])
    got = kv_store.place_row(calibrated, 1, row)  # a row without βs gets zeros
    np.testing.assert_array_equal(np.asarray(got.dipr_beta), [[1.0] * 4, [0.0] * 4])
    with pytest.raises(ValueError, match="B=1"):
        kv_store.place_row(batch, 0, batch)


def test_array_layout_round_trip():
    s = store(20, capacity=40)
    arrays = kv_store.to_arrays(s, num_blocks=3)
    assert tuple(arrays) == ARRAY_NAMES and "dipr_beta" not in arrays
    back = kv_store.from_arrays(arrays)
    assert_bitwise_equal(back, store(20))
    abstract = kv_store.abstract_arrays(batch=1, num_kv_heads=2, num_blocks=3, block_size=BK, head_dim=8,
                                        dtype="bfloat16")
    assert {n: (a.shape, a.dtype) for n, a in abstract.items()} == {n: (a.shape, a.dtype) for n, a in arrays.items()}
    with pytest.raises(ValueError, match="needs the arrays"):
        kv_store.from_arrays({"keys": arrays["keys"]})


def _means_of(k, v, lengths):
    """The block value means of a store built directly from the first ``lengths`` positions."""
    return np.asarray(kv_store.from_dense(k, v, jnp.asarray(lengths), block_size=BK, capacity=32).value_means)


def test_value_means_follow_appends_truncation_and_lengths():
    k, v = dense(30, b=2, seed=3)
    s = kv_store.empty(batch=2, num_kv_heads=2, head_dim=8, capacity=32, block_size=BK, dtype=jnp.bfloat16)
    step = jax.jit(kv_store.append)
    done = np.zeros(2, int)
    for t, n in ((11, [11, 3]), (1, [1, 1]), (9, [9, 0]), (4, [2, 4])):  # ragged rows across block edges
        rows = np.stack([np.arange(t) + done[i] for i in range(2)])
        rows = np.minimum(rows, 29)
        s = step(s, k[jnp.arange(2)[:, None], rows], v[jnp.arange(2)[:, None], rows], jnp.asarray(n))
        done += n
        # updated from the new rows (bf16: one rounding of the mean an append): a few bf16 ulps of the exact mean
        want = _means_of(k, v, done).astype(np.float32)
        np.testing.assert_allclose(np.asarray(s.value_means, np.float32), want, rtol=0, atol=4 * 2.0 ** -8)
    assert s.value_means.dtype == s.values.dtype and done.tolist() == [23, 8]
    cut = kv_store.truncate(s, 5)
    np.testing.assert_allclose(np.asarray(cut.value_means), _means_of(k, v, [5, 5]), rtol=1e-6, atol=1e-7)
    w = jax.jit(kv_store.with_lengths)(s, jnp.asarray([17, 2]))
    np.testing.assert_allclose(np.asarray(w.value_means), _means_of(k, v, [17, 2]), rtol=1e-6, atol=1e-7)
    # NaN in the values past a length never reaches a mean.
    poisoned = s.replace(values=s.values.at[1, :, 1:].set(jnp.nan))
    assert np.isfinite(np.asarray(kv_store.with_value_means(poisoned).value_means)).all()
