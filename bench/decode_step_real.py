"""Whole-model decode step, random-weight Llama-3-8B, attention on real-key-proxy stores.

Speed does not depend on the weights' values, but DIPR's does depend on the keys and
queries: with random weights they would be unrealistic. So every layer's store holds a
real-key proxy (bench/real_key_proxy.py: Llama-3-8B attention shapes built from keys and
queries SmolLM2 produced on real text; its 8K real sequence laid end to end to reach the
context) and each layer attends with that proxy's real query (plus 1e-6 times the model's
own query, so that the layers stay chained). Everything else — embeddings, projections,
RoPE, the append of the new key/value and its code, MLPs, logits, sampling — is the model's
own decode step, jitted once, caches donated.

Variants: ``full`` (our jnp dense attention over the store), ``full-xla``
(``jax.nn.dot_product_attention``; the store's [B, Hkv, S, D] layout costs it a transpose per
call — reported as measured), ``full-cudnn`` (cuDNN in the store's own layout with sequence
lengths, alaya_jax/attention/dense.py), ``dipr`` (filter–refine, Pallas kernels) per β. Each row
has the step's byte roofline beside it (weights + K/V at the context at the copy bandwidth
measured in the run).

Memory at 512K on an H200 (8B bf16 weights 16 GB + K/V 64 GiB + codes 8.5 GiB): each layer's store is built on
the device in one jitted call from the real tokens' keys (a gather; no host array of the context, no eager
temporaries), the caches are donated to every step, the variants run one at a time on the same caches, and
XLA may use 94% of the device's memory (``XLA_PYTHON_CLIENT_MEM_FRACTION``, set before jax starts unless
given; the default 75% is less than the 512K caches and weights need).

    python -m bench.decode_step_real --contexts 131072 524288 --out $OUT
    python -m bench.decode_step_real --tokens-per-call 16 --out $OUT   # as alaya serve decodes: 16 tokens a dispatch
    python -m bench.decode_step_real --smoke --out /tmp/x        # CPU: tiny model, interpret mode
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from alaya_jax.attention.attention_fn import make_attention_fn  # noqa: E402
from alaya_jax.attention.config import AttentionConfig, KernelConfig  # noqa: E402
from alaya_jax.store import kv_store  # noqa: E402
from bench import harness  # noqa: E402


def build_model(name: str, context: int):
    from models import Llama, llama3_8b, smollm2_135m

    if name == "llama3-8b":
        cfg = llama3_8b(dtype="bfloat16", max_position_embeddings=max(131072, context + 1024))
    else:  # "smollm2-2l": SmolLM2's shapes (head dim 64, as the captured keys), 2 layers
        cfg = dataclasses.replace(smollm2_135m(dtype="bfloat16"), num_layers=2,
                                  max_position_embeddings=max(8192, context + 1024))
    return cfg, Llama(cfg, rngs=nnx.Rngs(0))


@functools.partial(jax.jit, static_argnames=("capacity",))
def _proxy_store(token_keys, token_index, key, *, capacity: int):
    """One layer's store from the real tokens' keys [B, Hkv, T, D] and the proxy's token index [S] (keys
    gathered, values drawn, blocked and coded in one compiled call)."""
    k = jnp.take(token_keys, token_index, axis=2).astype(jnp.bfloat16).transpose(0, 2, 1, 3)  # [B, S, Hkv, D]
    v = jax.random.normal(key, k.shape, jnp.bfloat16)
    return kv_store.from_dense(k, v, block_size=64, capacity=capacity)


def proxy_stores(cfg, batch: int, context: int, capacity: int, *, sources: int = 0, place=None):
    """Per layer a store of ``context`` real-proxy keys (bench/real_key_proxy.py, sources drawn
    with seed = layer) and Gaussian values; and the per-layer real queries [L, B, Hq, D].
    ``sources`` > 0: only that many distinct proxies, copied round-robin over the layers (faster to build).
    ``place``: applied to each store as it is built (e.g. sharding it over several devices)."""
    from bench import real_key_proxy

    if 0 < sources < cfg.num_layers:
        few, fq = proxy_stores(dataclasses.replace(cfg, num_layers=sources), batch, context, capacity, place=place)
        stores = tuple(jax.tree.map(jnp.copy, few[i % sources]) for i in range(cfg.num_layers))
        return stores, fq[jnp.arange(cfg.num_layers) % sources]
    stores, qs = [], []
    for layer in range(cfg.num_layers):
        p = real_key_proxy.build_proxy(context=context, batch=batch, num_kv_heads=cfg.num_kv_heads,
                                       group=cfg.num_heads // cfg.num_kv_heads, head_dim=cfg.head_dim, seed=layer,
                                       values=False, by_token=True)
        st = _proxy_store(jnp.asarray(p["keys"]), jnp.asarray(p["token_index"], jnp.int32),
                          jax.random.PRNGKey(layer), capacity=capacity)
        stores.append(jax.block_until_ready(st if place is None else place(st)))
        del st
        qs.append(jnp.asarray(p["q"], jnp.float32).astype(jnp.bfloat16))
    return tuple(stores), jnp.stack(qs)


def make_step(model, attention: AttentionConfig, *, tokens: int = 1, mesh=None):
    """A jitted call that decodes ``tokens`` tokens on the device (a ``lax.scan`` over the model's
    step: one host round trip per call, as the engine's chunked decode); aux is the last token's.
    ``mesh``: the caches are sharded along the sequence over it (bench/multi_gpu.py)."""
    graphdef, state = nnx.split(model)
    if mesh is not None:  # the weights replicated over the devices the caches are sharded over
        state = jax.device_put(state, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    donate = jax.default_backend() != "cpu"

    def one(state, caches, token, qs, beta):
        m = nnx.merge(graphdef, state)
        positions = caches[0].lengths[:, None]
        base = make_attention_fn(attention, beta=beta, mesh=mesh)

        def attn(layer, q, k, v, cache, pos):
            qq = (qs[layer][:, None].astype(jnp.float32) + 1e-6 * q.astype(jnp.float32)).astype(q.dtype)
            return base(layer, qq, k, v, cache, pos)

        logits, caches, aux = m(token[:, None], positions, caches, attention=attn)
        return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), caches, aux

    def step(state, caches, token, qs, beta):
        if tokens == 1:
            return one(state, caches, token, qs, beta)

        def body(carry, _):
            token, caches = carry
            token, caches, aux = one(state, caches, token, qs, beta)
            return (token, caches), aux

        (token, caches), aux = jax.lax.scan(body, (token, caches), None, length=tokens)
        return token, caches, jax.tree.map(lambda x: x[-1], aux)

    f = jax.jit(step, donate_argnums=(1,) if donate else ())
    return f, state


def run_variant(model, caches, qs, name, attention, betas, args, mesh=None):
    """Times one variant on ``caches`` (donated: no second copy of the KV, which at 512K does not fit
    beside the first). Returns (rows, caches with their original lengths: the appended steps are
    past the lengths, so the next variant starts from the same context)."""
    f, state = make_step(model, attention, tokens=args.tokens_per_call, mesh=mesh)
    lengths0 = np.asarray(caches[0].lengths)  # a host copy: the caches' own arrays are donated to the first step
    token = jnp.zeros((qs.shape[1],), jnp.int32)
    rows = []
    for beta in betas:
        times = []
        aux = None
        for i in range(args.steps + 2):
            t = time.perf_counter()
            token, caches, aux = f(state, caches, token, qs, jnp.float32(beta if beta is not None else 0.0))
            token.block_until_ready()
            times.append(time.perf_counter() - t)
        steady = np.array(times[2:])
        steady = steady / args.tokens_per_call  # per token
        row = {"variant": name, "beta": beta, "step_ms": 1e3 * float(np.median(steady)),
               "step_p90_ms": 1e3 * float(np.percentile(steady, 90)), "first_step_s": times[0],
               "tokens_per_s": qs.shape[1] / float(np.median(steady))}
        if attention.method == "dipr":
            a = jax.device_get(aux)
            ln = float(np.asarray(caches[0].lengths).mean())
            row["candidate_fraction"] = float(np.mean([np.asarray(x["candidates"]).mean() for x in a])) / ln
        rows.append(row)
    return rows, tuple(c.replace(lengths=jnp.asarray(lengths0)) for c in caches)


def main(argv=None):
    ap = harness.parser(__doc__.split("\n")[0], "decode_step_real", smoke="CPU: a 2-layer SmolLM2 at 1K, 2 steps")
    ap.add_argument("--model", default="llama3-8b", choices=("llama3-8b", "smollm2-2l"))
    ap.add_argument("--contexts", type=int, nargs="+", default=[131072, 524288])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tokens-per-call", type=int, default=1,
                    help="tokens decoded on the device per jitted call (alaya serve decodes 16); times are per token")
    ap.add_argument("--betas64", type=float, nargs="+", default=[24.0], help="β at d=64, mapped to the model's D")
    ap.add_argument("--variants", nargs="+", default=["full", "full-xla", "full-cudnn", "dipr"])
    ap.add_argument("--proxy-sources", type=int, default=0,
                    help="distinct real-key proxies, cycled over the layers (0: one per layer)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.contexts, args.steps, args.variants = "smollm2-2l", [1024], 2, ["full", "dipr"]
    os.makedirs(args.out, exist_ok=True)
    impl = "pallas"
    meta = harness.run_meta(model=args.model, batch=args.batch, tokens_per_call=args.tokens_per_call)
    # the byte roofline of a step: weights + K/V at the context read once, at the bandwidth of this run
    meta["copy_GBps"] = harness.measure_copy_bandwidth(nbytes=(64 << 20) if args.smoke else (4 << 30)) / 1e9
    rows = []
    cfg, model = build_model(args.model, max(args.contexts))  # one model (and its weights) for every context
    for context in args.contexts:
        # every timed token appends
        capacity = context + (args.steps + 2) * args.tokens_per_call * max(len(args.betas64), 1) + 16
        t0 = time.perf_counter()
        stores, qs = proxy_stores(cfg, args.batch, context, capacity, sources=args.proxy_sources)
        setup = time.perf_counter() - t0
        c0 = stores[0]
        nbytes = (sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
                  + len(stores) * 2 * c0.batch * c0.num_kv_heads * context * c0.head_dim * c0.dtype.itemsize)
        roof = {"roofline_bytes": int(nbytes), "roofline_ms": 1e3 * nbytes / (meta["copy_GBps"] * 1e9)}
        for name in args.variants:
            if name == "dipr":
                att = AttentionConfig(method="dipr", kernel=KernelConfig(implementation=impl))
                betas = [float(b * (cfg.head_dim / 64) ** 0.5) for b in args.betas64]
            else:
                pa = {"full": "reference", "full-xla": "xla", "full-cudnn": "cudnn"}[name]
                att, betas = AttentionConfig(method="full", kernel=KernelConfig(prefill_attention=pa)), [None]
            try:
                got, stores = run_variant(model, stores, qs, name, att, betas, args)
                for r in got:
                    rows.append({**meta, "context": context, "setup_s": setup, **roof, **r})
                    print(json.dumps(rows[-1]), flush=True)
            except Exception as e:
                rows.append({**meta, "context": context, "variant": name,
                             "error": f"{type(e).__name__}: {str(e)[:400]}"})
                print(json.dumps(rows[-1]), flush=True)
                traceback.print_exc()
        del stores
        harness.write_results(args.out, "decode_step_real", rows, markdown(rows))
    print(markdown(rows))


def markdown(rows) -> str:
    if not rows:
        return ""
    m = rows[0]
    out = [f"# Whole decode step, random-weight {m['model']}, attention on real-key-proxy stores", "",
           f"{m['device']}, jax {m['jax']}, jaxlib {m.get('jaxlib')}, triton {m.get('triton')}, {m['date']}, "
           f"commit {m['commit']}, batch {m['batch']}. Step = one jitted decode call of "
           f"{m.get('tokens_per_call', 1)} token(s) incl. the host sync on the sampled token, per token "
           "(median of the timed calls).", "",
           f"Roofline = weights + K/V at the context read once at the copy bandwidth measured in this run "
           f"({m.get('copy_GBps', float('nan')):.0f} GB/s).", "",
           "| context | variant | β (D) | step ms | roofline ms | × roofline | tok/s | × best full | candidates |",
           "|---|---|---|---|---|---|---|---|---|"]
    best = {}
    for r in rows:
        if "error" not in r and r["variant"].startswith("full"):
            best[r["context"]] = min(best.get(r["context"], 1e18), r["step_ms"])
    for r in rows:
        if "error" in r:
            out.append(f"| {r['context']} | {r['variant']} | failed: {r['error'][:120]} |||||||")
            continue
        b = best.get(r["context"])
        roof = r.get("roofline_ms")
        out.append(f"| {r['context']} | {r['variant']} | {'' if r['beta'] is None else format(r['beta'], '.1f')} | "
                   f"{r['step_ms']:.2f} | {'' if roof is None else format(roof, '.2f')} | "
                   f"{'' if roof is None else format(r['step_ms'] / roof, '.2f')} | {r['tokens_per_s']:.1f} | "
                   f"{'' if b is None else format(b / r['step_ms'], '.2f')} | "
                   f"{'' if 'candidate_fraction' not in r else format(r['candidate_fraction'], '.2%')} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
