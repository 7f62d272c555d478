"""Load a Llama-3.1-8B-shaped Hugging Face checkpoint (random bf16 weights written here) onto the device and
measure: load time, host peak RSS during the load (tensors go to the device one by one: the host should
never hold the model), device memory in use against the estimate, and a short DIPR generation.

    python -m bench.load_checkpoint --out DIR            # GPU: 32 layers, bf16, --context 32768
    python -m bench.load_checkpoint --smoke --out DIR    # CPU: a tiny model, proves the script runs

Writes ``load_checkpoint.json`` and ``load_checkpoint.md`` into ``--out`` (default ``$OUT``, else
``bench/results/load_checkpoint``).
"""
from __future__ import annotations

import dataclasses
import json
import multiprocessing
import pathlib
import resource
import sys
import tempfile
import time

from bench import harness



def _config(args):
    from models import llama3_8b

    c = llama3_8b(dtype=args.dtype, num_layers=args.layers)
    if args.smoke:
        c = dataclasses.replace(c, vocab_size=1024, hidden_size=256, intermediate_size=512, num_heads=4,
                                num_kv_heads=2, head_dim=64)
    return c


def _write_checkpoint(d: str, args) -> None:
    """Random bf16 weights (normal · 0.02) in one safetensors shard per 4 layers, config.json, tokenizer.json."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from models.weights import expected_tensors

    c = _config(args)
    d = pathlib.Path(d)
    rng = np.random.default_rng(0)
    groups: dict[str, list[str]] = {}
    for name in expected_tensors(c):
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else -1
        groups.setdefault(f"model-{(layer // 4) + 1 if layer >= 0 else 0:05d}.safetensors", []).append(name)
    weight_map = {}
    for fname, names in groups.items():
        tensors = {}
        for n in names:
            shape, _ = expected_tensors(c)[n]
            base = 1.0 if n.endswith("norm.weight") else 0.0
            tensors[n] = (base + 0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)
        save_file(tensors, str(d / fname))
        weight_map.update({n: fname for n in names})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
           "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
           "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
           "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_norm_eps,
           "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": False, "hidden_act": "silu",
           "rope_scaling": {"rope_type": "llama3", **vars(c.rope_scaling)}, "torch_dtype": "bfloat16",
           "bos_token_id": 256, "eos_token_id": 257}
    (d / "config.json").write_text(json.dumps(cfg))
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(alphabet)}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True) for t in ("<|begin_of_text|>", "<|eot_id|>")])
    tk.save(str(d / "tokenizer.json"))


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def main(argv=None) -> int:
    p = harness.parser(__doc__.split("\n\n")[0], "load_checkpoint", smoke="tiny model on any device")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--context", type=int, default=32768, help="KV capacity for the estimate and the generation")
    p.add_argument("--prompt-tokens", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--beta", type=float, default=50.0)
    p.add_argument("--implementation", default="reference", help="DIPR kernels (checked by KernelConfig)")
    p.add_argument("--workdir", default=None, help="where to write the checkpoint (default: a temp dir)")
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.context, args.prompt_tokens, args.new_tokens = 2, 512, 64, 4
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(dir=args.workdir) as d:
        t = time.perf_counter()
        proc = multiprocessing.get_context("spawn").Process(target=_write_checkpoint, args=(d, args))
        proc.start()
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"writing the checkpoint failed (exit {proc.exitcode})")
        write_s = time.perf_counter() - t
        disk = sum(f.stat().st_size for f in pathlib.Path(d).iterdir())

        import jax
        import numpy as np

        from alaya_jax.attention.config import AttentionConfig, KernelConfig
        from alaya_jax.runtime.engine import Engine
        from alaya_jax.runtime.memory_estimate import available_memory, estimate_memory
        from alaya_jax.runtime.sampling import SamplingConfig
        from models import load_model_path, read_config
        from models.weights import parameter_count

        dev = jax.devices()[0]
        config = read_config(d, dtype=args.dtype)
        est = estimate_memory(config, context=args.context)
        free_before, source = available_memory(dev)
        stats0 = dev.memory_stats() or {}
        rss0 = _rss_peak_bytes()
        t = time.perf_counter()
        config, model, tok = load_model_path(d, dtype=args.dtype)
        jax.block_until_ready(jax.tree_util.tree_leaves(model))
        load_s = time.perf_counter() - t
        rss1 = _rss_peak_bytes()
        stats1 = dev.memory_stats() or {}

        engine = Engine(model)
        ids = np.random.default_rng(1).integers(0, 256, size=args.prompt_tokens).tolist()
        att = AttentionConfig(method="dipr", beta=args.beta, kernel=KernelConfig(implementation=args.implementation))
        t = time.perf_counter()
        res, _ = engine.generate([ids], sampling=SamplingConfig(max_new_tokens=args.new_tokens), attention=att,
                                 capacity=args.context)
        gen_s = time.perf_counter() - t
        stats2 = dev.memory_stats() or {}

    gib = 2 ** 30
    in_use = stats1.get("bytes_in_use", 0) - stats0.get("bytes_in_use", 0) if stats1 else None
    result = {
        **harness.run_meta(), "device": f"{dev.platform} {dev.device_kind}", "smoke": args.smoke,
        "layers": config.num_layers, "dtype": args.dtype, "parameters": parameter_count(config),
        "checkpoint_bytes_on_disk": disk, "write_s": write_s, "load_s": load_s,
        "load_gb_per_s": disk / load_s / 1e9,
        "host_peak_rss_before_load_bytes": rss0, "host_peak_rss_after_load_bytes": rss1,
        "host_peak_rss_growth_during_load_bytes": rss1 - rss0,
        "estimate_weights_bytes": est.weights_bytes, "estimate_kv_bytes": est.kv_bytes, "context": args.context,
        "device_bytes_in_use_after_load": in_use, "device_peak_bytes_after_generate": stats2.get("peak_bytes_in_use"),
        "free_before_load_bytes": free_before, "free_source": source,
        "generate": {"attention": "dipr", "beta": args.beta, "implementation": args.implementation,
                     "prompt_tokens": len(ids), "new_tokens": len(res[0].tokens), "wall_s_incl_compile": gen_s,
                     "ttft_s_incl_compile": res[0].ttft_s, "tpot_s": res[0].tpot_s},
    }
    rows = [("device", result["device"]), ("jax", result["jax"]),
            ("model", f"{'tiny smoke' if args.smoke else 'Llama-3.1-8B'} shapes, {config.num_layers} layers, random "
                      f"{args.dtype}"),
            ("checkpoint on disk", f"{disk / gib:.2f} GiB"), ("load time", f"{load_s:.2f} s "
                                                                           f"({disk / load_s / 1e9:.2f} GB/s)"),
            ("host peak RSS growth during load", f"{(rss1 - rss0) / gib:.2f} GiB"),
            ("estimated weights", f"{est.weights_bytes / gib:.2f} GiB"),
            ("device bytes in use after load", "n/a" if in_use is None else f"{in_use / gib:.2f} GiB"),
            (f"estimated KV for {args.context} tokens", f"{est.kv_bytes / gib:.2f} GiB"),
            ("device peak after generate", "n/a" if stats2.get("peak_bytes_in_use") is None
             else f"{stats2['peak_bytes_in_use'] / gib:.2f} GiB"),
            ("DIPR generate (incl. compile)", f"{len(ids)} prompt + {len(res[0].tokens)} new tokens in {gen_s:.1f} s")]
    md = "| measure | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in rows)
    harness.write_results(str(out), "load_checkpoint", result, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
