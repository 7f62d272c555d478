"""Strict GGUF loading on small synthetic files written with gguf.GGUFWriter, and the real SmolLM2 file."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from models import Llama, find_smollm2_gguf, load_gguf, permute_qk, smollm2_135m, unpermute_qk  # noqa: E402

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


def write_gguf(path, *, drop=None, extra=None, seed=0, untied=False, pre=None, quant=None, reshape=None):
    """A 2-layer GQA llama GGUF with random weights; returns the weights as written, before llama.cpp's Q/K
    permute (i.e. what the loader must give back). ``quant``: a GGMLQuantizationType for the matrices;
    ``reshape``: {name: shape} to store a tensor with a wrong shape."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    vocab = _tokenizer_fields(w, pre)
    w.add_block_count(NL)
    w.add_context_length(128)
    w.add_embedding_length(HID)
    w.add_feed_forward_length(FF)
    w.add_head_count(H)
    w.add_head_count_kv(HKV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(D)
    weights = {"token_embd.weight": rng.normal(size=(vocab, HID)), "output_norm.weight": rng.normal(size=(HID,))}
    for i in range(NL):
        p = f"blk.{i}."
        weights.update({
            p + "attn_norm.weight": rng.normal(size=(HID,)), p + "ffn_norm.weight": rng.normal(size=(HID,)),
            p + "attn_q.weight": rng.normal(size=(H * D, HID)), p + "attn_k.weight": rng.normal(size=(HKV * D, HID)),
            p + "attn_v.weight": rng.normal(size=(HKV * D, HID)), p + "attn_output.weight": rng.normal(size=(HID, H * D)),
            p + "ffn_gate.weight": rng.normal(size=(FF, HID)), p + "ffn_up.weight": rng.normal(size=(FF, HID)),
            p + "ffn_down.weight": rng.normal(size=(HID, FF)),
        })
    if untied:
        weights["output.weight"] = rng.normal(size=(vocab, HID))
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    for name, shape in (reshape or {}).items():
        weights[name] = rng.normal(size=shape).astype(np.float32)
    if extra:
        weights[extra] = np.ones((3,), np.float32)
    for name, arr in weights.items():
        if name == drop:
            continue
        if name.endswith("attn_q.weight"):
            arr = permute_qk(arr, H)  # what llama.cpp's converter stores
        elif name.endswith("attn_k.weight"):
            arr = permute_qk(arr, HKV)
        if quant is not None and arr.ndim == 2 and arr.shape[1] % 32 == 0:  # Q8_0 blocks of 32 along a row
            q = gguf.quants.quantize(arr, quant)
            weights[name] = _unpermuted(name, gguf.quants.dequantize(q, quant).reshape(arr.shape))
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=quant)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def _unpermuted(name, arr):
    if name.endswith("attn_q.weight"):
        return unpermute_qk(arr, H)
    if name.endswith("attn_k.weight"):
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
