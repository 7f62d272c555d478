"""Strict GGUF loading on small synthetic files written with gguf.GGUFWriter."""

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from models import load_gguf, permute_qk, unpermute_qk  # noqa: E402

H, HKV, D, HID, FF, NL = 4, 2, 8, 32, 48, 2


def _tokenizer_fields(w):
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + ["Ġt", "Ġth", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    merges = ["Ġ t", "Ġt h"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_token_types(types)
    w.add_bos_token_id(len(tokens) - 1)
    w.add_eos_token_id(len(tokens) - 1)
    return len(tokens)


def write_gguf(path, *, drop=None, extra=None, seed=0):
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    vocab = _tokenizer_fields(w)
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
    weights = {k: v.astype(np.float32) for k, v in weights.items()}
    if extra:
        weights[extra] = np.ones((3,), np.float32)
    for name, arr in weights.items():
        if name == drop:
            continue
        if name.endswith("attn_q.weight"):
            arr = permute_qk(arr, H)  # what llama.cpp's converter stores
        elif name.endswith("attn_k.weight"):
            arr = permute_qk(arr, HKV)
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


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
