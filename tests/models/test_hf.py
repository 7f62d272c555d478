"""Strict Hugging Face checkpoint loading on tiny synthetic directories (Llama with llama3 RoPE, Qwen2 with
biases, sharded and single-file, f32 and bf16 safetensors), against the NumPy Llama; every refusal."""

import json

import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("jinja2")

from tests.support.hf_checkpoint import FF, HID, HKV, LLAMA31, NL, D, H, write_hf  # noqa: E402
from tests.support.llama_helpers import dense_logits, llama3_expected  # noqa: E402
from tests.support.numpy_llama import np_inv_freq, np_llama  # noqa: E402

from models import RopeScaling, describe_model_path, load_hf, load_model_path  # noqa: E402


def _np_logits(w, toks, *, theta, scaling=None):
    return np_llama(w, toks, num_heads=H, num_kv_heads=HKV, head_dim=D, rms_norm_eps=1e-5,
                    inv_freq=np_inv_freq(D, theta, scaling), num_layers=NL)


TOL = dict(rtol=3e-4, atol=3e-4)


def test_llama3_single_file_matches_numpy(tmp_path):
    """Llama-3.x: llama3 rope_scaling, untied head, tokenizer.json with Llama-3's pre-tokenizer and chat template."""
    w = write_hf(tmp_path / "m", rope_scaling=LLAMA31)
    cfg, model, tok = load_hf(tmp_path / "m")
    assert cfg.rope_scaling == RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=64)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.attention_bias) == (NL, H, HKV, D, False)
    toks = np.random.default_rng(1).integers(0, cfg.vocab_size, size=13)
    want = _np_logits(w, toks, theta=500000.0, scaling=LLAMA31)
    np.testing.assert_allclose(dense_logits(model, toks), want, **TOL)
    assert not np.allclose(want, _np_logits(w, toks, theta=500000.0), **TOL)  # the scaling matters here
    # tokenizer: special tokens, chat template, stop ids from tokenizer_config + generation_config
    prompt = tok.chat_prompt("Hi?", system="Be brief.")
    assert prompt == llama3_expected("<|begin_of_text|>", "Be brief.", "Hi?")
    ids = tok.encode(prompt)
    assert ids[0] == tok.bos_id and tok.decode(ids, skip_special=False) == prompt
    n = tok.vocab_size
    assert tok.eos_id == n - 1 and tok.stop_ids == {n - 1, n - 4}  # <|eot_id|>, <|end_of_text|>
    assert tok.encode("the thing") and tok.decode(tok.encode("the thing")) == "the thing"


def test_qwen2_sharded_bf16_with_biases_matches_numpy(tmp_path):
    """Qwen2: q/k/v biases, tied head, 3 shards with an index, bf16 storage loaded into f32 exactly, an
    embedding padded beyond the tokenizer."""
    w = write_hf(tmp_path / "q", arch="qwen2", tied=True, shards=3, dtype="BF16", vocab_pad=5)
    cfg, model, tok = load_hf(tmp_path / "q")
    assert cfg.attention_bias and cfg.tie_word_embeddings and cfg.rms_norm_eps == 1e-5
    assert cfg.vocab_size == tok.vocab_size + 5
    np.testing.assert_array_equal(np.asarray(model.layers[1].v_proj.bias[...]),
                                  w["model.layers.1.self_attn.v_proj.bias"])
    toks = np.random.default_rng(2).integers(0, cfg.vocab_size, size=9)
    np.testing.assert_allclose(dense_logits(model, toks), _np_logits(w, toks, theta=1e6), **TOL)
    assert tok.chat_prompt("Hi?") == ("<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
                                      "<|im_start|>assistant\n")
    assert tok.bos_id is None and tok.stop_ids == {tok.eos_id}
    # bf16 on the device: the same stored values, cast once
    _, mb, _ = load_model_path(tmp_path / "q", dtype="bfloat16")
    assert str(mb.layers[0].q_proj.kernel[...].dtype) == "bfloat16"
    np.testing.assert_array_equal(np.asarray(mb.layers[0].q_proj.kernel[...], np.float32),
                                  w["model.layers.0.self_attn.q_proj.weight"].T)


def test_describe_reports_and_lists_refusals(tmp_path):
    write_hf(tmp_path / "ok", shards=2)
    info = describe_model_path(tmp_path / "ok")
    n_params = sum(int(np.prod(v.shape)) for v in write_hf(tmp_path / "ok2").values())
    assert info["loadable"] and info["refused"] == []
    assert (info["format"], info["architecture"], info["layers"], info["heads"], info["kv_heads"],
            info["head_dim"], info["context_length"], info["tensor_dtypes"]) == ("hf", "LlamaForCausalLM", NL, H, HKV,
                                                                                 D, 256, {"F32": NL * 9 + 3})
    assert info["parameters"] == n_params
    write_hf(tmp_path / "bad", drop="model.layers.1.mlp.up_proj.weight", extra="model.layers.0.foo")
    bad = describe_model_path(tmp_path / "bad")
    assert not bad["loadable"] and len(bad["refused"]) == 2
    assert any("missing tensor 'model.layers.1.mlp.up_proj.weight'" in r for r in bad["refused"])
    assert any("unknown tensor 'model.layers.0.foo'" in r for r in bad["refused"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(drop="model.layers.1.self_attn.k_proj.weight"),
     r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'"),
    (dict(extra="model.layers.0.self_attn.q_proj.bias"), r"unknown tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"),
    (dict(reshape={"model.layers.0.mlp.down_proj.weight": (HID, FF + 1)}),
     r"'model\.layers\.0\.mlp\.down_proj\.weight' has shape \(64, 97\), expected \(64, 96\)"),
    (dict(arch="qwen2", drop="model.layers.0.self_attn.q_proj.bias"),
     r"missing tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"),
    (dict(dtype="I8"), r"has dtype I8, which is not supported"),
    (dict(config_extra={"architectures": ["MistralForCausalLM"]}),
     r"unsupported architectures \['MistralForCausalLM'\]"),
    (dict(config_extra={"model_type": "mistral"}), r"unsupported model_type 'mistral' for LlamaForCausalLM"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), r"unsupported rope_scaling type 'yarn'"),
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), r"unsupported rope_scaling type 'linear'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     r"rope_scaling of type 'llama3' has no 'low_freq_factor'"),
    (dict(config_extra={"hidden_act": "gelu"}), r"unsupported hidden_act 'gelu'"),
    (dict(config_extra={"attention_bias": True}), r"Llama config with attention_bias=true is not supported"),
    (dict(arch="qwen2", config_extra={"use_sliding_window": True}), r"use_sliding_window=true is not supported"),
    (dict(config_extra={"quantization_config": {"quant_method": "gptq"}}), r"quant_method 'gptq'"),
    (dict(config_extra={"num_hidden_layers": None}), r"config\.json has no 'num_hidden_layers'"),
    (dict(config_extra={"partial_rotary_factor": 0.5}), r"partial_rotary_factor 0\.5 is not supported"),
    (dict(config_extra={"vocab_size": 10}), r"tokenizer\.json has 264 tokens, more than the model's vocab_size 10"),
])
def test_refusals_are_named(tmp_path, kwargs, message):
    write_hf(tmp_path / "m", **kwargs)
    with pytest.raises(ValueError, match=message):
        load_hf(tmp_path / "m")


def test_directory_level_refusals(tmp_path):
    d = tmp_path / "m"
    write_hf(d, shards=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    lost = r"'model\.layers\.9\.mlp\.up_proj\.weight' is in the index but not in its shard"
    with pytest.raises(ValueError, match=lost):
        load_hf(d)
    (d / "model-00002-of-00002.safetensors").unlink()
    missing = r"shard 'model-00002-of-00002\.safetensors' listed in the index does not exist"
    with pytest.raises(ValueError, match=missing):
        load_hf(d)
    e = tmp_path / "e"
    write_hf(e, tied=True)
    from safetensors.numpy import load_file, save_file
    t = load_file(str(e / "model.safetensors"))
    t["lm_head.weight"] = t["model.embed_tokens.weight"] + 1
    save_file(t, str(e / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'lm_head\.weight' differs from 'model\.embed_tokens\.weight'"):
        load_hf(e)
    t["lm_head.weight"] = t["model.embed_tokens.weight"]  # a tied head saved twice, identical: accepted
    inv = "model.layers.1.self_attn.rotary_emb.inv_freq"  # an old conversion's RoPE buffer: checked, not loaded
    t[inv] = (1.0 / (500000.0 ** (np.arange(0, D, 2) / D))).astype(np.float32)
    save_file(t, str(e / "model.safetensors"))
    load_hf(e)
    t[inv] = t[inv] * 1.01
    save_file(t, str(e / "model.safetensors"))
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.rotary_emb\.inv_freq' differs from the RoPE"):
        load_hf(e)
    (e / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"tokenizer\.json' is missing"):
        load_hf(e)
    (e / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config\.json' is missing"):
        load_hf(e)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_path(tmp_path / "nothing")
    (tmp_path / "garbage").mkdir()
    write_hf(tmp_path / "garbage")
    (tmp_path / "garbage" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_hf(tmp_path / "garbage")


def test_chat_template_refusal_and_tojson(tmp_path):
    from models.chat_template import ChatTemplateError, render_chat_template

    t = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
         "{% for m in messages %}{{ m | tojson }}\n{% endfor %}")
    assert render_chat_template(t, [{"role": "user", "content": "café 東京"}]) == \
        '{"role": "user", "content": "café 東京"}\n'
    with pytest.raises(ChatTemplateError, match="first message must be user"):
        render_chat_template(t, [{"role": "system", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        render_chat_template("{% for %}", [])
    # sandboxed: no attribute escapes
    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ messages.__class__.__mro__[1].__subclasses__() }}", [])


# ----------------------------------------------------------------------------- the real SmolLM2, as an HF directory

def _unpermute_llama_cpp(w, n_head):
    """Undo convert_hf_to_gguf.py's LlamaModel.permute: per head, rows (re0, im0, re1, im1, ...) -> (re..., im...)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.slow
def test_smollm2_gguf_as_hf_directory_gives_the_same_model(tmp_path):
    """SmolLM2's GGUF converted here (gguf dequantize, Q/K un-permuted, 2 f32 safetensors shards, tokenizer.json,
    its chat template) loads through load_hf into the same config, weights, logits and greedy answer as load_gguf."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from tests.support.hf_checkpoint import hf_named, save_hf_checkpoint

    from alaya_jax.runtime.engine import Engine
    from alaya_jax.runtime.sampling import SamplingConfig
    from models import find_smollm2_gguf, load_gguf, smollm2_135m

    try:
        path = find_smollm2_gguf()
    except FileNotFoundError as e:  # pragma: no cover - depends on the environment
        pytest.skip(str(e))
    g_cfg, g_model, g_tok = load_gguf(path)
    reader = GGUFReader(str(path))
    weights = {}
    for t in reader.tensors:
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32).reshape(tuple(reversed(t.shape.tolist())))
        if t.name.endswith("attn_q.weight"):
            w = _unpermute_llama_cpp(w, 9)
        elif t.name.endswith("attn_k.weight"):
            w = _unpermute_llama_cpp(w, 3)
        weights[t.name] = w
    d = tmp_path / "SmolLM2-135M-Instruct"
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
              "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
              "rope_theta": 100000.0, "rms_norm_eps": 1e-05, "max_position_embeddings": 8192,
              "tie_word_embeddings": True, "hidden_act": "silu", "rope_scaling": None, "bos_token_id": 1,
              "eos_token_id": 2, "torch_dtype": "float32"}
    tcfg = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
            "chat_template": reader.fields["tokenizer.chat_template"].contents()}
    save_hf_checkpoint(d, hf_named(weights), config, shards=2, tokenizer_config=tcfg)
    del weights
    (d / "tokenizer.json").write_text(g_tok._tk.to_str())
    h_cfg, h_model, h_tok = load_hf(d)
    assert h_cfg == g_cfg == smollm2_135m()
    for (path_g, a), (path_h, b) in zip(*(jax_leaves(m) for m in (g_model, h_model))):
        assert path_g == path_h
        np.testing.assert_array_equal(a, b, err_msg=path_g)
    prompt = g_tok.chat_prompt("What is the capital of France?")
    assert h_tok.chat_prompt("What is the capital of France?") == prompt
    ids = g_tok.encode(prompt)
    assert h_tok.encode(prompt) == ids and h_tok.stop_ids == g_tok.stop_ids
    s = SamplingConfig(max_new_tokens=10)
    answers, last = [], []
    for model, tok in ((g_model, g_tok), (h_model, h_tok)):
        engine = Engine(model)
        res, _ = engine.generate([ids], sampling=s, stop_ids=sorted(tok.stop_ids))
        answers.append(tok.decode(res[0].tokens))
        # the same compiled prefill (same capacity) gives the prompt's last logits
        _, logits, _ = engine.prefill(engine.new_caches(batch=1, capacity=len(ids) + 10), [ids])
        last.append(np.asarray(logits[0]))
    assert answers[0] == answers[1] and "Paris" in answers[0], answers
    np.testing.assert_array_equal(last[0], last[1])


def jax_leaves(model):
    import jax
    from flax import nnx

    return [(jax.tree_util.keystr(k), np.asarray(v)) for k, v in
            jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))]
