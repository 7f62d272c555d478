"""models.Llama on its own call contract, against an independent NumPy Llama written here.

No alaya_jax code is used: the attention function is a minimal one defined below that keeps a
plain (k, v) cache and applies a causal mask by absolute position.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import Llama, LlamaConfig, RopeScaling, apply_rope, inv_frequencies, llama3_8b, smollm2_135m, tiny
from tests.support.llama_helpers import concat_attention, forward  # a minimal attention fn and forward
from tests.support.numpy_llama import np_inv_freq, np_rope  # the NumPy reference Llama
from tests.support.numpy_llama import np_llama_model as np_llama

TOL = dict(rtol=2e-4, atol=2e-4)


@pytest.fixture(scope="module")
def tiny_model():
    return Llama(tiny(), rngs=nnx.Rngs(1))


# ----------------------------------------------------------------------------- tests

def test_full_forward_matches_numpy(tiny_model):
    toks = np.random.default_rng(0).integers(0, 97, size=20)
    logits, caches, aux = forward(tiny_model, toks, 0, (None, None))
    assert logits.dtype == jnp.float32 and logits.shape == (1, 20, 97)
    np.testing.assert_allclose(np.asarray(logits[0]), np_llama(tiny_model, toks), **TOL)
    assert aux == (0, 1)  # one aux per layer, in layer order, passed through untouched
    assert len(caches) == 2 and caches[0][0].shape == (1, 20, 2, 16)


def test_chunked_prefill_then_decode_equals_full(tiny_model):
    toks = np.random.default_rng(1).integers(0, 97, size=14)
    full, _, _ = forward(tiny_model, toks, 0, (None, None))
    got = []
    caches, start = (None, None), 0
    for n in (5, 3) + (1,) * 6:  # prefill 5, then 3, then one token at a time
        logits, caches, _ = forward(tiny_model, toks[start:start + n], start, caches)
        got.append(np.asarray(logits[0]))
        start += n
    np.testing.assert_allclose(np.concatenate(got), np.asarray(full[0]), **TOL)


def test_last_only_and_logits_from_hidden(tiny_model):
    toks = jnp.asarray(np.random.default_rng(2).integers(0, 97, size=(2, 7)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))
    full, _, _ = tiny_model(toks, pos, (None, None), attention=concat_attention)
    last, _, _ = tiny_model(toks, pos, (None, None), attention=concat_attention, last_only=True)
    assert last.shape == (2, 1, 97)
    np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -1:]), rtol=1e-5, atol=1e-5)
    h, _, _ = tiny_model.hidden(toks, pos, (None, None), attention=concat_attention)
    np.testing.assert_allclose(np.asarray(tiny_model.logits_from_hidden(h)), np.asarray(full), rtol=1e-5, atol=1e-5)


def test_jit_and_batch_rows_independent(tiny_model):
    """Jitted (nnx.jit) forward on a batch equals per-row forwards; positions may differ per row."""
    rng = np.random.default_rng(3)
    toks = rng.integers(0, 97, size=(2, 6))

    @nnx.jit
    def f(m, t, p):
        return m(t, p, (None, None), attention=concat_attention)[0]

    pos = np.stack([np.arange(6), np.arange(6)]).astype(np.int32)
    got = f(tiny_model, jnp.asarray(toks, jnp.int32), jnp.asarray(pos))
    for b in range(2):
        np.testing.assert_allclose(np.asarray(got[b]), np_llama(tiny_model, toks[b]), **TOL)


def test_qkv_bias_and_llama3_rope_match_numpy():
    """Qwen2's q/k/v biases (config flag) and Llama-3 RoPE scaling, against the NumPy reference."""
    c = dataclasses.replace(tiny(), attention_bias=True, max_position_embeddings=4096,
                            rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=64))
    m = Llama(c, rngs=nnx.Rngs(7))
    assert m.layers[0].q_proj.bias.shape == (64,) and m.layers[0].k_proj.bias.shape == (32,)
    assert m.layers[0].o_proj.bias is None and m.layers[0].up_proj.bias is None
    assert Llama(tiny(), rngs=nnx.Rngs(7)).layers[0].q_proj.bias is None  # off by default
    toks = np.random.default_rng(8).integers(0, 97, size=11)
    logits, _, _ = forward(m, toks, 0, (None, None))
    np.testing.assert_allclose(np.asarray(logits[0]), np_llama(m, toks), **TOL)
    assert tiny().fingerprint() == dataclasses.replace(tiny(), attention_bias=False).fingerprint()
    assert tiny().fingerprint() != dataclasses.replace(tiny(), attention_bias=True).fingerprint()


def test_untied_head_matches_numpy():
    m = Llama(dataclasses.replace(tiny(), tie_word_embeddings=False), rngs=nnx.Rngs(2))
    assert m.lm_head is not None
    toks = np.random.default_rng(4).integers(0, 97, size=9)
    logits, _, _ = forward(m, toks, 0, (None, None))
    np.testing.assert_allclose(np.asarray(logits[0]), np_llama(m, toks), **TOL)


def test_bf16_runs_and_is_close_to_f32():
    mb = Llama(tiny(dtype="bfloat16"), rngs=nnx.Rngs(1))
    assert mb.layers[0].q_proj.kernel[...].dtype == jnp.bfloat16
    # the same (bf16-valued) weights in an f32 model
    mf = Llama(tiny(), rngs=nnx.Rngs(0))
    nnx.update(mf, jax.tree.map(lambda a: a.astype(jnp.float32), nnx.state(mb, nnx.Param)))
    toks = np.random.default_rng(5).integers(0, 97, size=12)
    lb, caches, _ = forward(mb, toks, 0, (None, None))
    assert lb.dtype == jnp.float32 and caches[0][0].dtype == jnp.bfloat16
    lf, _, _ = forward(mf, toks, 0, (None, None))
    np.testing.assert_allclose(np.asarray(lf[0]), np_llama(mb, toks), **TOL)
    err = np.max(np.abs(np.asarray(lb) - np.asarray(lf)))
    assert 0 < err < 0.03 * np.max(np.abs(np.asarray(lf))) + 0.01, err


def test_apply_rope_matches_numpy_and_keeps_norms():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 5, 3, 16)).astype(np.float32)
    pos = rng.integers(0, 5000, size=(2, 5)).astype(np.int32)
    got = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), theta=1e4))
    inv = 1.0 / (1e4 ** (np.arange(0, 16, 2) / 16))
    want = np.stack([np_rope(x[b].astype(np.float64), pos[b].astype(np.float64), inv) for b in range(2)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    xb = jnp.asarray(x, jnp.bfloat16)
    assert apply_rope(xb, jnp.asarray(pos), theta=1e4).dtype == jnp.bfloat16


def test_llama3_rope_scaling_matches_formula():
    sc = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    got = inv_frequencies(128, theta=500000.0, scaling=sc)
    base = 1.0 / (500000.0 ** (np.arange(0, 128, 2) / 128))
    want = np_inv_freq(128, 500000.0, vars(sc))  # Meta's apply_scaling
    np.testing.assert_allclose(got, np.array(want), rtol=1e-6)
    assert not np.allclose(got, base)  # the scaling does something at these settings
    assert llama3_8b().rope_scaling == sc
    # apply_rope uses the scaled frequencies
    x = jnp.ones((1, 1, 1, 128), jnp.float32)
    p = jnp.full((1, 1), 3000, jnp.int32)
    ang = 3000 * np.asarray(want, np.float64)
    want_x = np.concatenate([np.cos(ang) - np.sin(ang), np.cos(ang) + np.sin(ang)])
    np.testing.assert_allclose(np.asarray(apply_rope(x, p, theta=500000.0, scaling=sc))[0, 0, 0], want_x,
                               atol=2e-3)


def test_presets_and_validation():
    s = smollm2_135m()
    assert (s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim, s.vocab_size) == (30, 576, 9, 3,
                                                                                                    64, 49152)
    assert s.tie_word_embeddings and s.rope_scaling is None and s.dtype == "float32"
    l8 = llama3_8b(num_layers=2, max_position_embeddings=16384)
    assert (l8.num_layers, l8.max_position_embeddings, l8.dtype, l8.tie_word_embeddings) == (2, 16384, "bfloat16",
                                                                                             False)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        dataclasses.replace(tiny(), num_heads=5)
    with pytest.raises(ValueError, match="dtype"):
        dataclasses.replace(tiny(), dtype="float16")
    with pytest.raises(ValueError, match="head_dim must be even"):
        dataclasses.replace(tiny(), head_dim=15)
    with pytest.raises(ValueError, match="num_layers"):
        dataclasses.replace(tiny(), num_layers=0)
    with pytest.raises(ValueError, match="low_freq_factor"):
        RopeScaling(low_freq_factor=4.0, high_freq_factor=1.0)
    with pytest.raises(TypeError):
        LlamaConfig(97, 64, 128, 2, 4, 2, 16)  # keyword-only
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny().num_layers = 3  # type: ignore[misc]
    fp = tiny().fingerprint()
    assert len(fp) == 64 and fp == tiny().fingerprint()
    assert fp != dataclasses.replace(tiny(), num_layers=3).fingerprint()
    assert fp != dataclasses.replace(tiny(), rope_scaling=RopeScaling()).fingerprint()


def test_bad_calls_are_clear_errors(tiny_model):
    z = jnp.zeros((1, 3), jnp.int32)
    with pytest.raises(ValueError, match="layer caches"):
        tiny_model(z, z, (None,), attention=concat_attention)
    with pytest.raises(ValueError, match=r"tokens and positions must both be \[B,T\]"):
        tiny_model(z, jnp.zeros((1, 4), jnp.int32), (None, None), attention=concat_attention)


def test_random_8b_shaped_layer_builds_abstractly():
    """8B-shaped models are built with random init; shapes/dtypes checked without allocating (eval_shape)."""
    m = nnx.eval_shape(lambda: Llama(llama3_8b(num_layers=1), rngs=nnx.Rngs(0)))
    assert m.layers[0].q_proj.kernel.shape == (4096, 4096)
    assert m.layers[0].k_proj.kernel.shape == (4096, 1024)
    assert m.lm_head.kernel.shape == (4096, 128256) and m.lm_head.kernel.dtype == jnp.bfloat16
