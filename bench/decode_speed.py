"""Whole-model decode throughput: prefill a context, then time jitted decode steps.

Random weights of a given config (speed does not depend on the values), or the
real SmolLM2 weights (``--model smollm2-real``, CPU: the GGUF is too large to
carry to the GPU). Writes one JSON record per run (``--out``) and prints it.

    python bench/decode_speed.py --model smollm2 --context 8192 --dtype bfloat16
    python bench/decode_speed.py --model llama3-8b --context 8192 --attention full dipr
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alaya_jax.engine import Engine
from alaya_jax.methods import AttentionConfig
from alaya_jax.sampling import SamplingConfig


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def build(model: str, dtype: str, context: int):
    from models import Llama, llama3_8b, load_smollm2, smollm2_135m

    if model == "smollm2-real":
        cfg, m, _ = load_smollm2(dtype=dtype)
        return cfg, m
    if model == "smollm2":
        cfg = smollm2_135m(dtype=dtype)
    elif model == "llama3-8b":
        cfg = llama3_8b(dtype=dtype, max_position_embeddings=max(131072, context + 1024))
    else:
        raise SystemExit(f"unknown model {model!r}")
    cfg = dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings, context + 1024))
    return cfg, Llama(cfg, rngs=nnx.Rngs(0))


def run(args) -> list[dict]:
    cfg, model = build(args.model, args.dtype, args.context)
    engine = Engine(model, block_size=args.block_size, prefill_chunk=args.prefill_chunk)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, size=args.context).tolist()
    capacity = args.context + args.new_tokens + 8
    records = []
    for method in args.attention:
        att = AttentionConfig(method=method, beta=args.beta, implementation=args.implementation)
        caches = engine.new_caches(batch=args.batch, capacity=capacity)
        t0 = time.perf_counter()
        caches, logits, _ = engine.prefill(caches, [prompt] * args.batch)
        jax.block_until_ready(logits)
        prefill_s = time.perf_counter() - t0
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        key = jax.random.PRNGKey(0)
        s = SamplingConfig()
        times = []
        for i in range(args.new_tokens + 1):
            t = time.perf_counter()
            token, lg, caches, _ = engine.decode_step(caches, token, key=key, sampling=s, attention=att)
            token.block_until_ready()
            times.append(time.perf_counter() - t)
        steady = np.array(times[1:])
        rec = {
            "model": args.model, "dtype": args.dtype, "context": args.context, "batch": args.batch,
            "attention": method, "beta": args.beta if method == "dipr" else None,
            "implementation": args.implementation if method == "dipr" else None,
            "prefill_s_incl_compile": prefill_s, "first_decode_s_incl_compile": times[0],
            "decode_step_median_s": float(np.median(steady)), "decode_step_p90_s": float(np.percentile(steady, 90)),
            "decode_tokens_per_s": float(args.batch / np.median(steady)), "steps_timed": int(steady.size),
            "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "jax": jax.__version__, "python": platform.python_version(), "commit": _commit(),
            "note": "per step: one jitted decode call incl. the host sync on the sampled token",
        }
        records.append(rec)
        print(json.dumps(rec), flush=True)
        del caches
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", choices=("smollm2", "smollm2-real", "llama3-8b"))
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--attention", nargs="+", default=["full"])
    p.add_argument("--beta", type=float, default=32.0)
    p.add_argument("--implementation", default="reference", choices=("reference", "pallas"))
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    recs = run(args)
    if args.out:
        with open(args.out, "a") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    sys.exit(main())
