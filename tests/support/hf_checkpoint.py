"""Writing Hugging Face checkpoint directories in tests: any weights (:func:`save_hf_checkpoint`), or a tiny
random Llama/Qwen2 (:func:`write_hf`)."""

import json

import ml_dtypes
import numpy as np
from tests.support.llama_helpers import LLAMA3_TEMPLATE, write_tokenizer_json

from models.tokenizer import _LLAMA3_REGEX

_HF_TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_HF_LAYER = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
             "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
             "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
             "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
             "attn_v.bias": "self_attn.v_proj.bias", "ffn_gate.weight": "mlp.gate_proj.weight",
             "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"}


def hf_named(weights):
    """llama.cpp names -> Hugging Face names (written out here, independently of the loader)."""
    out = {}
    for k, v in weights.items():
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
        else:
            _, i, rest = k.split(".", 2)
            out[f"model.layers.{i}.{_HF_LAYER[rest]}"] = v
    return out


def save_hf_checkpoint(d, weights, config, *, shards=1, tokenizer_config=None, generation_config=None):
    """``config.json``, ``weights`` as safetensors (``shards`` files + index when > 1) and the optional
    ``tokenizer_config.json`` / ``generation_config.json`` in directory ``d`` (tokenizer.json is the caller's)."""
    from safetensors.numpy import save_file

    d.mkdir(parents=True, exist_ok=True)
    names = sorted(weights)
    if shards == 1:
        save_file({k: weights[k] for k in names}, str(d / "model.safetensors"))
    else:
        weight_map = {}
        for j in range(shards):
            fname = f"model-{j + 1:05d}-of-{shards:05d}.safetensors"
            save_file({k: weights[k] for k in names[j::shards]}, str(d / fname))
            weight_map.update({k: fname for k in names[j::shards]})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (d / "config.json").write_text(json.dumps(config))
    for name, obj in (("tokenizer_config.json", tokenizer_config), ("generation_config.json", generation_config)):
        if obj is not None:
            (d / name).write_text(json.dumps(obj))


H, HKV, D, HID, FF, NL = 4, 2, 16, 64, 96, 2
LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 64}
QWEN_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are Qwen.<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_hf(d, *, arch="llama", tied=False, shards=1, dtype="F32", rope_scaling=None, config_extra=None, drop=None,
             extra=None, reshape=None, seed=0, vocab_pad=0):
    """A 2-layer checkpoint directory; returns the weights as stored (float64, Hugging Face names)."""
    d.mkdir(parents=True, exist_ok=True)
    qwen = arch == "qwen2"
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if qwen else None
    n_tok = (write_tokenizer_json(d / "tokenizer.json", specials=specials, regex=_LLAMA3_REGEX) if qwen
             else write_tokenizer_json(d / "tokenizer.json", regex=_LLAMA3_REGEX))
    vocab = n_tok + vocab_pad
    rng = np.random.default_rng(seed)

    def r(*shape, s=0.3):
        return rng.normal(size=shape) * s

    w = {"model.embed_tokens.weight": r(vocab, HID), "model.norm.weight": 1 + r(HID, s=0.1)}
    if not tied:
        w["lm_head.weight"] = r(vocab, HID)
    for i in range(NL):
        p = f"model.layers.{i}."
        w.update({p + "input_layernorm.weight": 1 + r(HID, s=0.1),
                  p + "post_attention_layernorm.weight": 1 + r(HID, s=0.1),
                  p + "self_attn.q_proj.weight": r(H * D, HID), p + "self_attn.k_proj.weight": r(HKV * D, HID),
                  p + "self_attn.v_proj.weight": r(HKV * D, HID), p + "self_attn.o_proj.weight": r(HID, H * D),
                  p + "mlp.gate_proj.weight": r(FF, HID), p + "mlp.up_proj.weight": r(FF, HID),
                  p + "mlp.down_proj.weight": r(HID, FF)})
        if qwen:
            w.update({p + "self_attn.q_proj.bias": r(H * D), p + "self_attn.k_proj.bias": r(HKV * D),
                      p + "self_attn.v_proj.bias": r(HKV * D)})
    for name, shape in (reshape or {}).items():
        w[name] = r(*shape)
    if extra:
        w[extra] = r(3)
    w.pop(drop, None)
    np_dtype = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16, "I8": np.int8}[dtype]
    stored = {k: v.astype(np_dtype) for k, v in w.items()}
    cfg = {"architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"], "model_type": arch,
           "vocab_size": vocab, "hidden_size": HID, "intermediate_size": FF, "num_hidden_layers": NL,
           "num_attention_heads": H, "num_key_value_heads": HKV, "rms_norm_eps": 1e-5,
           "rope_theta": 1000000.0 if qwen else 500000.0, "max_position_embeddings": 256, "hidden_act": "silu",
           "tie_word_embeddings": tied, "rope_scaling": rope_scaling, "torch_dtype": "bfloat16",
           "bos_token_id": n_tok - 3 if not qwen else None, "eos_token_id": n_tok - 1}
    cfg.update(config_extra or {})
    tcfg = ({"bos_token": None, "eos_token": "<|im_end|>", "chat_template": QWEN_TEMPLATE} if qwen else
            {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE})
    save_hf_checkpoint(d, stored, cfg, shards=shards, tokenizer_config=tcfg,
                       generation_config=None if qwen else {"eos_token_id": [n_tok - 4, n_tok - 1]})
    return {k: v.astype(np.float64) for k, v in stored.items()}


