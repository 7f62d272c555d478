"""Strict GGUF loading on small synthetic files written with gguf.GGUFWriter, and the real SmolLM2 file."""

import jax
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from tests.support.hf_checkpoint import hf_named  # noqa: E402
from tests.support.llama_helpers import LLAMA3_TEMPLATE, dense_logits, llama3_expected  # noqa: E402
from tests.support.numpy_llama import np_inv_freq, np_llama  # noqa: E402

from models import Llama, describe_model_path, find_smollm2_gguf, load_gguf, permute_qk, smollm2_135m, unpermute_qk  # noqa: E402

H, HKV, D, HID, FF, NL = 4, 2, 8, 32, 48, 2


def _tokenizer_fields(w, pre=None):
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + ["Ġt", "Ġth", "ĠĠ", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    merges = ["Ġ t", "Ġt h", "Ġ Ġ"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    w.add_tokenizer_model("gpt2")
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    return len(tokens)


def write_gguf(path, *, drop=None, extra=None, seed=0, untied=False, pre=None, quant=None, reshape=None, arch="llama",
               rope_freqs=None, theta=10000.0, chat_template=None, raw=None, metadata=None, scale=1.0, hid=HID, ff=FF):
    """A 2-layer GQA llama (or qwen2, with q/k/v biases) GGUF with random weights; returns the weights as
    written, before llama.cpp's Q/K permute (i.e. what the loader must give back). ``quant``: a
    GGMLQuantizationType for the matrices; ``reshape``: {name: shape} to store a tensor with a wrong shape;
    ``rope_freqs``: a ``rope_freqs.weight`` array; ``raw``: {name: (uint8 blocks, type)} stored as given;
    ``metadata``: {key: str} extra string fields."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    vocab = _tokenizer_fields(w, pre)
    if chat_template is not None:
        w.add_chat_template(chat_template)
    for k, v in (metadata or {}).items():
        w.add_string(k, v)
    w.add_block_count(NL)
    w.add_context_length(128)
    w.add_embedding_length(hid)
    w.add_feed_forward_length(ff)
    w.add_head_count(H)
    w.add_head_count_kv(HKV)
    w.add_rope_freq_base(theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(D)
    if hid != H * D:
        w.add_key_length(D)
        w.add_value_length(D)
    weights = {"token_embd.weight": rng.normal(size=(vocab, hid)), "output_norm.weight": rng.normal(size=(hid,))}
    for i in range(NL):
        p = f"blk.{i}."
        weights.update({
            p + "attn_norm.weight": rng.normal(size=(hid,)), p + "ffn_norm.weight": rng.normal(size=(hid,)),
            p + "attn_q.weight": rng.normal(size=(H * D, hid)), p + "attn_k.weight": rng.normal(size=(HKV * D, hid)),
            p + "attn_v.weight": rng.normal(size=(HKV * D, hid)),
            p + "attn_output.weight": rng.normal(size=(hid, H * D)),
            p + "ffn_gate.weight": rng.normal(size=(ff, hid)), p + "ffn_up.weight": rng.normal(size=(ff, hid)),
            p + "ffn_down.weight": rng.normal(size=(hid, ff)),
        })
        if arch == "qwen2":
            weights.update({p + "attn_q.bias": rng.normal(size=(H * D,)),
                            p + "attn_k.bias": rng.normal(size=(HKV * D,)),
                            p + "attn_v.bias": rng.normal(size=(HKV * D,))})
    if untied:
        weights["output.weight"] = rng.normal(size=(vocab, hid))
    weights = {k: (v * (1.0 if v.ndim == 1 else scale)).astype(np.float32) for k, v in weights.items()}
    for name, shape in (reshape or {}).items():
        weights[name] = rng.normal(size=shape).astype(np.float32)
    if extra:
        weights[extra] = np.ones((3,), np.float32)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    for name, arr in weights.items():
        if name == drop:
            continue
        if arch == "llama" and name.endswith("attn_q.weight"):
            arr = permute_qk(arr, H)  # what llama.cpp's converter stores
        elif arch == "llama" and name.endswith("attn_k.weight"):
            arr = permute_qk(arr, HKV)
        if name in (raw or {}):
            blocks, qtype = raw[name]
            weights[name] = _unpermuted(name, gguf.quants.dequantize(blocks, qtype).reshape(arr.shape), arch)
            w.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
        elif quant is not None and arr.ndim == 2 and arr.shape[1] % 32 == 0:  # blocks of 32 along a row
            q = gguf.quants.quantize(arr, quant)
            weights[name] = _unpermuted(name, gguf.quants.dequantize(q, quant).reshape(arr.shape), arch)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=quant)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def _unpermuted(name, arr, arch="llama"):
    if arch == "llama" and name.endswith("attn_q.weight"):
        return unpermute_qk(arr, H)
    if arch == "llama" and name.endswith("attn_k.weight"):
        return unpermute_qk(arr, HKV)
    return arr


def test_load_matches_written_weights(tmp_path):
    f = tmp_path / "m.gguf"
    weights = write_gguf(f)
    cfg, model, tok = load_gguf(f)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (NL, H, HKV, D)
    assert cfg.tie_word_embeddings
    blk = model.layers[1]
    np.testing.assert_array_equal(np.asarray(blk.q_proj.kernel[...]), weights["blk.1.attn_q.weight"].T)
    np.testing.assert_array_equal(np.asarray(blk.k_proj.kernel[...]), weights["blk.1.attn_k.weight"].T)
    np.testing.assert_array_equal(np.asarray(blk.down_proj.kernel[...]), weights["blk.1.ffn_down.weight"].T)
    np.testing.assert_array_equal(np.asarray(model.embed.embedding[...]), weights["token_embd.weight"])
    s = "the thing <|im_start|> über"
    assert tok.decode(tok.encode(s), skip_special=False) == s
    assert len(tok.encode("<|im_start|>")) == 1


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(3).normal(size=(6 * 16, 20))
    np.testing.assert_array_equal(unpermute_qk(permute_qk(w, 6), 6), w)
    assert not np.array_equal(permute_qk(w, 6), w)


def test_missing_tensor_is_named(tmp_path):
    f = tmp_path / "m.gguf"
    write_gguf(f, drop="blk.1.ffn_up.weight")
    with pytest.raises(ValueError, match=r"missing tensor 'blk\.1\.ffn_up\.weight'"):
        load_gguf(f)


def test_unknown_tensor_is_named(tmp_path):
    f = tmp_path / "m.gguf"
    write_gguf(f, extra="blk.0.attn_q.bias")
    with pytest.raises(ValueError, match=r"unknown tensor.*blk\.0\.attn_q\.bias"):
        load_gguf(f)


def test_garbage_and_truncated_files(tmp_path):
    g = tmp_path / "garbage.gguf"
    g.write_bytes(b"not a gguf file at all" * 100)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_gguf(g)
    f = tmp_path / "m.gguf"
    write_gguf(f)
    t = tmp_path / "trunc.gguf"
    t.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="GGUF"):
        load_gguf(t)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gguf(tmp_path / "nope.gguf")


def _llama_cpp_convert_permute(w, n_head):
    """Verbatim logic of llama.cpp convert_hf_to_gguf.py LlamaModel.permute (HF rotate-half -> GGUF)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def test_unpermute_is_the_inverse_of_llama_cpp_convert():
    w = np.random.default_rng(4).normal(size=(3 * 64, 40))
    np.testing.assert_array_equal(unpermute_qk(_llama_cpp_convert_permute(w, 3), 3), w)
    # in GGUF order each head's rows are (re_0, im_0, re_1, im_1, ...); we return (re_0..re_31, im_0..im_31)
    g = _llama_cpp_convert_permute(w, 3)
    np.testing.assert_array_equal(g[1], w[32])


def test_untied_quantized_file(tmp_path):
    """Q8_0 matrices (quantized byte rows) dequantize to the right logical shapes; output.weight -> lm_head."""
    f = tmp_path / "q.gguf"
    weights = write_gguf(f, untied=True, quant=gguf.GGMLQuantizationType.Q8_0)
    cfg, model, _ = load_gguf(f)
    assert not cfg.tie_word_embeddings and model.lm_head is not None
    np.testing.assert_array_equal(np.asarray(model.lm_head.kernel[...]), weights["output.weight"].T)
    np.testing.assert_array_equal(np.asarray(model.layers[0].q_proj.kernel[...]), weights["blk.0.attn_q.weight"].T)
    np.testing.assert_array_equal(np.asarray(model.layers[1].up_proj.kernel[...]), weights["blk.1.ffn_up.weight"].T)


def test_bf16_load(tmp_path):
    f = tmp_path / "m.gguf"
    weights = write_gguf(f)
    cfg, model, _ = load_gguf(f, dtype="bfloat16")
    assert cfg.dtype == "bfloat16"
    k = model.layers[0].k_proj.kernel[...]
    assert str(k.dtype) == "bfloat16"
    np.testing.assert_allclose(np.asarray(k, np.float32), weights["blk.0.attn_k.weight"].T, rtol=1e-2, atol=1e-2)


def test_wrong_shape_is_named(tmp_path):
    f = tmp_path / "m.gguf"
    write_gguf(f, reshape={"blk.0.ffn_gate.weight": (FF + 1, HID)})
    with pytest.raises(ValueError, match=r"'blk\.0\.ffn_gate\.weight' has shape \(49, 32\), expected \(48, 32\)"):
        load_gguf(f)


def test_pre_tokenizer_from_metadata(tmp_path):
    """tokenizer.ggml.pre 'smollm' splits digits one by one (llama.cpp's \\p{N} pre-split); unknown pre: error."""
    f = tmp_path / "m.gguf"
    write_gguf(f, pre="smollm")
    _, _, tok = load_gguf(f)
    ids = tok.encode("x  12")
    assert tok.pre == "smollm" and [tok.decode([i]) for i in ids] == ["x", "  ", "1", "2"]
    plain = tmp_path / "plain.gguf"
    write_gguf(plain)  # no tokenizer.ggml.pre: the GPT-2 regex alone
    _, _, tok_gpt2 = load_gguf(plain)
    assert [tok_gpt2.decode([i]) for i in tok_gpt2.encode("x  12")] == ["x", " ", " ", "1", "2"]
    assert tok.fingerprint() != tok_gpt2.fingerprint()
    g = tmp_path / "odd.gguf"
    write_gguf(g, pre="some-new-pre")
    with pytest.raises(ValueError, match="unsupported GGUF pre-tokenizer 'some-new-pre'"):
        load_gguf(g)


def test_directory_is_not_a_gguf(tmp_path):
    with pytest.raises(ValueError, match="not a regular file"):
        load_gguf(tmp_path)


# ----------------------------------------------------------------------------- Llama-3, Qwen2, quant types

def _np_logits(weights, toks, *, theta, scaling=None):
    return np_llama(hf_named(weights), toks, num_heads=H, num_kv_heads=HKV, head_dim=D, rms_norm_eps=1e-5,
                    inv_freq=np_inv_freq(D, theta, scaling), num_layers=NL)


LLAMA31 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _llama_cpp_rope_factors(theta, sc):
    """What llama.cpp's convert_hf_to_gguf.py writes as rope_freqs.weight: unscaled / scaled frequencies."""
    base = 1.0 / (theta ** (np.arange(0, D, 2) / D))
    return base / np_inv_freq(D, theta, sc)


def test_llama3_gguf_with_rope_freqs_matches_numpy(tmp_path):
    """A Llama-3-style file (rope_freqs.weight, llama-bpe pre-tokenizer, untied head, chat template): the
    loaded model's logits equal the NumPy Llama with Meta's llama3 RoPE scaling."""
    from models import RopeScaling

    theta = 500000.0  # with head_dim 8: one high, one middle and one low... frequency region each
    factors = _llama_cpp_rope_factors(theta, LLAMA31)
    assert factors[0] == 1.0 and factors[-1] == 8.0 and 1.0 < factors[2] < 8.0
    f = tmp_path / "l3.gguf"
    weights = write_gguf(f, untied=True, pre="llama-bpe", rope_freqs=factors, theta=theta, scale=0.3,
                         chat_template=LLAMA3_TEMPLATE)
    cfg, model, tok = load_gguf(f)
    assert cfg.rope_scaling == RopeScaling(**LLAMA31) and cfg.rope_theta == theta
    toks = np.random.default_rng(1).integers(0, cfg.vocab_size, size=12)
    want = _np_logits(weights, toks, theta=theta, scaling=LLAMA31)
    np.testing.assert_allclose(dense_logits(model, toks), want, rtol=2e-4, atol=2e-4)
    assert not np.allclose(want, _np_logits(weights, toks, theta=theta), rtol=2e-4, atol=2e-4)  # scaling matters
    # Llama-3's pre-tokenizer: digits in groups of up to three, spaces split off
    assert [p for p, _ in tok._tk.pre_tokenizer.pre_tokenize_str("x  12345")] == ["x", "Ġ", "Ġ", "123", "45"]
    eos = "<|endoftext|>"
    assert tok.chat_prompt("Hi?", system="Be brief.") == llama3_expected(eos, "Be brief.", "Hi?")


def test_rope_freqs_that_are_not_llama3_are_refused(tmp_path):
    f = tmp_path / "odd.gguf"
    write_gguf(f, rope_freqs=_llama_cpp_rope_factors(500000.0, {**LLAMA31, "low_freq_factor": 2.0}), theta=500000.0)
    with pytest.raises(ValueError, match=r"'rope_freqs\.weight' does not match llama3 rope scaling .* entry 2"):
        load_gguf(f)
    g = tmp_path / "short.gguf"
    write_gguf(g, rope_freqs=np.ones(3), theta=500000.0)
    with pytest.raises(ValueError, match=r"'rope_freqs\.weight' has shape \(3,\), expected \(4,\)"):
        load_gguf(g)


def test_qwen2_gguf_biases_and_no_permute_match_numpy(tmp_path):
    f = tmp_path / "qwen2.gguf"
    weights = write_gguf(f, arch="qwen2", pre="qwen2", scale=0.3)
    cfg, model, tok = load_gguf(f)
    assert cfg.attention_bias and cfg.tie_word_embeddings
    np.testing.assert_array_equal(np.asarray(model.layers[1].k_proj.bias[...]), weights["blk.1.attn_k.bias"])
    toks = np.random.default_rng(2).integers(0, cfg.vocab_size, size=10)
    np.testing.assert_allclose(dense_logits(model, toks), _np_logits(weights, toks, theta=10000.0),
                               rtol=2e-4, atol=2e-4)
    assert [p for p, _ in tok._tk.pre_tokenizer.pre_tokenize_str("x 123")] == ["x", "Ġ", "1", "2", "3"]
    g = tmp_path / "qwen2_nobias.gguf"
    write_gguf(g, arch="qwen2", drop="blk.0.attn_v.bias")
    with pytest.raises(ValueError, match=r"missing tensor 'blk\.0\.attn_v\.bias'"):
        load_gguf(g)


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_quant_types_written_by_gguf_load_exactly(tmp_path, qtype):
    """Each type gguf.quants can write: the loaded matrices equal the dequantized stored values."""
    t = getattr(gguf.GGMLQuantizationType, qtype)
    f = tmp_path / "q.gguf"
    weights = write_gguf(f, untied=True, quant=t)
    _, model, _ = load_gguf(f)
    for ours, name in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("gate_proj", "ffn_gate")):
        np.testing.assert_array_equal(np.asarray(getattr(model.layers[1], ours).kernel[...]),
                                      weights[f"blk.1.{name}.weight"].T)


# k-quant super-blocks of 256 values: (bytes, offsets of the f16 scales) per llama.cpp's ggml-common.h
_K_BLOCKS = {"Q2_K": (84, (80, 82)), "Q3_K": (110, (108,)), "Q4_K": (144, (0, 2)), "Q5_K": (176, (0, 2)),
             "Q6_K": (210, (208,))}


def _random_k_blocks(rng, rows, qtype):
    size, f16_at = _K_BLOCKS[qtype]
    b = rng.integers(0, 256, size=(rows, size), dtype=np.uint8)
    for off in f16_at:  # finite, small scales so the values are finite
        b[:, off:off + 2] = rng.uniform(0.001, 0.01, size=rows).astype(np.float16).view(np.uint8).reshape(rows, 2)
    return b


def test_k_quants_go_through_gguf_dequantize(tmp_path):
    """The k-quants gguf cannot write: random super-blocks (valid scales) stored as Q2_K..Q6_K load as what
    gguf.quants.dequantize makes of them, Q/K un-permuted. (The decode itself is gguf's, not tested here.)"""
    rng = np.random.default_rng(5)
    hid, ff = 256, 256
    names = {"blk.0.attn_q.weight": ("Q4_K", H * D), "blk.0.attn_k.weight": ("Q6_K", HKV * D),
             "blk.1.ffn_up.weight": ("Q5_K", ff), "blk.1.ffn_gate.weight": ("Q3_K", ff),
             "blk.0.attn_v.weight": ("Q2_K", HKV * D)}
    raw = {n: (_random_k_blocks(rng, rows, q), getattr(gguf.GGMLQuantizationType, q)) for n, (q, rows) in names.items()}
    f = tmp_path / "k.gguf"
    weights = write_gguf(f, raw=raw, hid=hid, ff=ff)
    _, model, _ = load_gguf(f)
    for name, ours in (("blk.0.attn_q.weight", model.layers[0].q_proj), ("blk.0.attn_k.weight", model.layers[0].k_proj),
                       ("blk.1.ffn_up.weight", model.layers[1].up_proj),
                       ("blk.1.ffn_gate.weight", model.layers[1].gate_proj),
                       ("blk.0.attn_v.weight", model.layers[0].v_proj)):
        assert np.isfinite(weights[name]).all() and np.abs(weights[name]).max() > 0
        np.testing.assert_array_equal(np.asarray(ours.kernel[...]), weights[name].T)


def test_gguf_refusals_are_named(tmp_path):
    a = tmp_path / "gemma.gguf"
    write_gguf(a, arch="gemma")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gemma' \\(supported: llama, qwen2\\)"):
        load_gguf(a)
    b = tmp_path / "linear.gguf"
    write_gguf(b, metadata={"llama.rope.scaling.type": "linear"})
    with pytest.raises(ValueError, match="unsupported GGUF rope scaling type 'linear'"):
        load_gguf(b)
    c = tmp_path / "mxfp4.gguf"
    write_gguf(c, quant=gguf.GGMLQuantizationType.MXFP4)
    with pytest.raises(ValueError, match=r"GGUF tensor '\S+' has type MXFP4, which is not supported"):
        load_gguf(c)
    info = describe_model_path(c)  # inspect lists every refused tensor instead of stopping at the first
    assert not info["loadable"] and info["tensor_dtypes"]["MXFP4"] == len(info["refused"]) > 1
    assert info["architecture"] == "llama" and info["layers"] == NL and info["head_dim"] == D
    assert describe_model_path(a)["refused"] == ["unsupported GGUF architecture 'gemma' (supported: llama, qwen2)"]


# ----------------------------------------------------------------------------- the real SmolLM2 file

@pytest.fixture(scope="module")
def smollm2_file():
    try:
        return find_smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(f"SmolLM2 weights not installed ({e})")


def test_real_smollm2_loads_with_preset_config_and_tokenizer(smollm2_file):
    cfg, model, tok = load_gguf(smollm2_file)
    assert cfg == smollm2_135m()
    assert isinstance(model, Llama) and model.lm_head is None
    assert tok.vocab_size == 49152 and tok.eos_id == 2 and tok.pre == "smollm"
    assert tok.encode("<|im_start|>") == [1] and tok.stop_ids == {2}
    para = ("The quick brown fox, born in 1999, jumps over 23 lazy dogs.\n\n    def f(x):\n\treturn x ** 2  "
            "# note\nUnicode: naïve café, 東京, emoji \U0001F600 — done.   Trailing spaces  ")
    ids = tok.encode(para)
    assert tok.decode(ids) == para
    assert len(ids) < len(para.encode()) / 2  # real merges are in use
    digits = tok.encode(" 2023")
    assert [tok.decode([i]) for i in digits] == [" ", "2", "0", "2", "3"]
    prompt = tok.chat_prompt("Hi?", system="Be brief.")
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
    pid = tok.encode(prompt)
    assert pid[0] == 1 and pid.count(2) == 2
    assert tok.decode(pid) == "system\nBe brief.\nuser\nHi?\nassistant\n"
    assert tok.decode(pid, skip_special=False) == prompt
    assert len(tok.fingerprint()) == 64


def test_weight_cache_miss_hit_config_and_corrupt_entry(tmp_path, caplog):
    """The parsed-GGUF cache: a miss writes one entry, a hit gives the same config, weights and
    tokenizer as load_gguf without opening the GGUF; cached_config reads the config alone; a
    corrupt entry is reported, removed and rebuilt; a changed file gets a new entry."""
    from flax import nnx

    from models.weight_cache import cached_config, entry_path, load_gguf_cached

    path = tmp_path / "m.gguf"
    write_gguf(path, arch="llama")
    cache = tmp_path / "cache"
    assert cached_config(path, dtype="float32", cache_dir=cache) is None
    want_cfg, want_model, want_tok = load_gguf(path, dtype="float32")
    want = jax.tree.leaves(nnx.state(want_model, nnx.Param))
    for _ in range(2):  # miss, then hit
        cfg, model, tok = load_gguf_cached(path, dtype="float32", cache_dir=cache)
        assert cfg == want_cfg and tok.fingerprint() == want_tok.fingerprint()
        for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), want):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    entries = sorted(p for p in cache.iterdir() if p.suffix == ".npz")
    assert entries == [entry_path(path, cache)]
    assert [p.name[:9] for p in cache.iterdir() if p.suffix == ".pkl"] == ["skeleton-"]  # the abstract model
    assert cached_config(path, dtype="float32", cache_dir=cache) == want_cfg
    entries[0].write_bytes(b"not a zip")
    with caplog.at_level("WARNING"):
        cfg, _, _ = load_gguf_cached(path, dtype="float32", cache_dir=cache)
    assert cfg == want_cfg and "unreadable" in caplog.text
    write_gguf(path, arch="llama", seed=1)  # a new file at the same path: another key
    assert entry_path(path, cache) != entries[0]
