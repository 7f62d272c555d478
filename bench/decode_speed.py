"""Whole-model decode throughput: prefill a context, then time jitted decode steps.

Random weights of a given config (speed does not depend on the values), or the
real SmolLM2 weights (``--model smollm2-real``, CPU: the GGUF is too large to
carry to the GPU). The stores hold either a prefilled context of random token ids
(``--keys prefill``; with random weights its keys are i.i.d.-like, so min/max block
bounds prune little) or synthetic block-clustered keys (``--keys synthetic``, no
prefill; selectivity is then set by β and reported as the kept-block fraction).
Every attention variant starts from a copy of the same stores; DIPR runs each β
of ``--betas`` in turn (β is traced: one compilation). Writes one JSON record per
(variant, β) (``--out``) and a markdown table (``--markdown``).

    python -m bench.decode_speed --model smollm2 --context 8192 --dtype bfloat16
    python -m bench.decode_speed --model llama3-8b --context 131072 --keys synthetic \
        --attention full full-cudnn dipr --implementation pallas --betas 8 16 32 --kept-cap 0.1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alaya_jax.attention.config import DIPR_IMPLEMENTATIONS, PREFILL_ATTENTIONS, AttentionConfig, KernelConfig
from alaya_jax.runtime.engine import Engine
from alaya_jax.runtime.sampling import SamplingConfig
from alaya_jax.store import kv_store
from bench import harness


def build(model: str, dtype: str, context: int):
    from models import Llama, llama3_8b, load_smollm2, smollm2_135m, tiny

    if model == "smollm2-real":
        cfg, m, _ = load_smollm2(dtype=dtype)
        return cfg, m
    if model == "smollm2":
        cfg = smollm2_135m(dtype=dtype)
    elif model == "tiny":
        cfg = tiny(dtype=dtype)
    elif model == "llama3-8b":
        cfg = llama3_8b(dtype=dtype, max_position_embeddings=max(131072, context + 1024))
    else:
        raise SystemExit(f"unknown model {model!r}")
    cfg = dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings, context + 1024))
    return cfg, Llama(cfg, rngs=nnx.Rngs(0))


def synthetic_caches(engine, batch: int, context: int, capacity: int, *, centre_scale: float, noise: float,
                     seed: int = 0):
    """Per layer a store holding ``context`` block-clustered keys: every block has a centre
    ``c ~ N(0, I)·centre_scale`` and keys ``c + N(0, I)·noise``; values N(0, I). Keys [B,S,Hkv,D]."""
    c = engine.config
    bk = engine.block_size
    nb = -(-context // bk)

    @jax.jit
    def one(key):
        k1, k2, k3 = jax.random.split(key, 3)
        centres = jax.random.normal(k1, (batch, nb, 1, c.num_kv_heads, c.head_dim), jnp.float32) * centre_scale
        k = centres + noise * jax.random.normal(k2, (batch, nb, bk, c.num_kv_heads, c.head_dim), jnp.float32)
        k = k.reshape(batch, nb * bk, c.num_kv_heads, c.head_dim)[:, :context].astype(engine.dtype)
        v = jax.random.normal(k3, k.shape, jnp.float32).astype(engine.dtype)
        return kv_store.from_dense(k, v, block_size=bk, capacity=capacity)

    return tuple(one(k) for k in jax.random.split(jax.random.PRNGKey(seed), c.num_layers))


def attention_config(spec: str, args) -> AttentionConfig:
    """``full`` (jnp reference), ``full-cudnn`` / ``full-xla`` (jax.nn.dot_product_attention), ``dipr``."""
    if spec in ("full", "full-cudnn", "full-xla"):
        impl = {"full": "reference", "full-cudnn": "cudnn", "full-xla": "xla"}[spec]
        return AttentionConfig(method="full", kernel=KernelConfig(prefill_attention=impl))
    if spec == "dipr":
        return AttentionConfig(method="dipr", beta=args.betas[0],
                               kernel=KernelConfig(implementation=args.implementation, num_splits=args.num_splits))
    raise SystemExit(f"unknown attention spec {spec!r}; use full, full-cudnn, full-xla or dipr")


def _kept(aux) -> float:
    """Mean DIPR candidates per (batch, KV head) over layers."""
    kept = [np.asarray(a["candidates"]).mean() for a in aux if "candidates" in a]
    return float(np.mean(kept)) if kept else float("nan")


def run(args) -> list[dict]:
    cfg, model = build(args.model, args.dtype, args.context)
    engine = Engine(model, block_size=args.block_size, prefill_chunk=args.prefill_chunk,
                    prefill_attention=args.prefill_attention)
    capacity = args.context + args.new_tokens * (1 + len(args.betas)) + 8
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    if args.keys == "prefill":
        prompt = rng.integers(0, cfg.vocab_size, size=args.context).tolist()
        base = engine.new_caches(batch=args.batch, capacity=capacity)
        base, logits, _ = engine.prefill(base, [prompt] * args.batch)
        first = jnp.argmax(logits, -1).astype(jnp.int32)
    else:
        base = synthetic_caches(engine, args.batch, args.context, capacity, centre_scale=args.centre_scale,
                                noise=args.noise)
        first = jnp.zeros((args.batch,), jnp.int32)
    jax.block_until_ready(base)
    setup_s = time.perf_counter() - t0
    nb = -(-args.context // args.block_size)
    records = []
    for spec in args.attention:
        att = attention_config(spec, args)
        betas = args.betas if att.method == "dipr" else [None]
        try:
            records += run_variant(engine, base, first, spec, att, betas, args, setup_s, nb)
        except Exception as e:  # reported, not hidden: the other variants still run
            rec = {"model": args.model, "context": args.context, "batch": args.batch, "attention": spec,
                   "error": f"{type(e).__name__}: {str(e)[:400]}"}
            print(json.dumps(rec), flush=True)
            records.append(rec)
    return records


def run_variant(engine, base, first, spec, att, betas, args, setup_s, nb) -> list[dict]:
    """Decode ``args.new_tokens`` steps per β from a copy of ``base``; one record per β."""
    records = []
    caches = jax.tree.map(jnp.copy, base)  # the decode step donates its caches
    token, key, s = first, jax.random.PRNGKey(0), SamplingConfig()
    for bi, beta in enumerate(betas):
        a = att if beta is None else dataclasses.replace(att, beta=beta)
        times, kept = [], []
        for i in range(args.new_tokens + 1):
            t = time.perf_counter()
            token, lg, caches, aux = engine.decode_step(caches, token, key=key, sampling=s, attention=a)
            token.block_until_ready()
            times.append(time.perf_counter() - t)
            if a.method == "dipr":
                kept.append(_kept(aux))
        steady = np.array(times[1:])
        rec = {
            "model": args.model, "dtype": args.dtype, "context": args.context, "batch": args.batch,
            "keys": args.keys if args.keys == "prefill" else
            f"synthetic block-clustered (centre {args.centre_scale}, noise {args.noise})",
            "attention": spec, "beta": beta,
            "implementation": a.kernel.implementation if a.method == "dipr" else a.kernel.prefill_attention,
            "num_splits": a.kernel.num_splits if a.method == "dipr" else None,
            "candidates_mean": float(np.mean(kept)) if kept else None,
            "kept_fraction": float(np.mean(kept)) / args.context if kept else None,
            "setup_s": setup_s, "first_decode_s": times[0] if bi == 0 else None,
            "decode_step_median_s": float(np.median(steady)), "decode_step_p90_s": float(np.percentile(steady, 90)),
            "decode_tokens_per_s": float(args.batch / np.median(steady)), "steps_timed": int(steady.size),
            **harness.run_meta(),
            "note": "per step: one jitted decode call incl. the host sync on the sampled token",
        }
        records.append(rec)
        print(json.dumps(rec), flush=True)
    del caches
    return records


def markdown(records) -> str:
    full = {}
    for r in records:
        if "error" in r:
            continue
        if r["attention"].startswith("full"):
            key = (r["model"], r["context"], r["batch"], r["keys"])
            full[key] = min(full.get(key, 1e9), r["decode_step_median_s"])
    out = ["| model | context | B | keys | attention | β | candidates | step ms | tok/s | × best full |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            out.append(f"| {r['model']} | {r['context']} | {r['batch']} | | {r['attention']} | failed: "
                       f"{r['error'][:150]} |||||")
            continue
        best = full.get((r["model"], r["context"], r["batch"], r["keys"]))
        kept = "" if r["kept_fraction"] is None else f"{r['kept_fraction']:.1%}"
        name = r["attention"] + (f" ({r['implementation']})" if r["attention"] == "dipr" else "")
        ratio = "" if best is None else f"{best / r['decode_step_median_s']:.2f}"
        beta = "" if r["beta"] is None else f"{r['beta']:g}"
        out.append(f"| {r['model']} | {r['context']} | {r['batch']} | {r['keys']} | {name} | {beta} | {kept} | "
                   f"{1e3 * r['decode_step_median_s']:.2f} | {r['decode_tokens_per_s']:.1f} | {ratio} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", choices=("smollm2", "smollm2-real", "llama3-8b", "tiny"))
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    p.add_argument("--context", type=int, default=8192)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--attention", nargs="+", default=["full"], help="full, full-cudnn, full-xla, dipr")
    p.add_argument("--betas", type=float, nargs="+", default=[32.0], help="DIPR β values (traced: one compile)")
    p.add_argument("--implementation", default="reference", choices=DIPR_IMPLEMENTATIONS)
    p.add_argument("--num-splits", type=int, default=None)
    p.add_argument("--keys", default="prefill", choices=("prefill", "synthetic"),
                   help="prefill random token ids, or fill the stores with synthetic block-clustered keys")
    p.add_argument("--centre-scale", type=float, default=1.0)
    p.add_argument("--noise", type=float, default=0.03)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--prefill-attention", default="reference", choices=PREFILL_ATTENTIONS)
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--markdown", default=None, help="append a markdown table here")
    args = p.parse_args(argv)
    recs = run(args)
    if args.out:
        with open(args.out, "a") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
    if args.markdown:
        with open(args.markdown, "a") as f:
            f.write(markdown(recs) + "\n")
    print(markdown(recs))


if __name__ == "__main__":
    sys.exit(main())
