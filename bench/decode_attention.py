"""Decode attention at Llama-3-8B shapes: exact DIPR end to end vs the best dense decode.

Timing is the way a model uses attention: ``L`` layers inside one jit, each with
its own keys/values (so nothing is served from L2), each layer's query depending
on the previous layer's output; the figure is the median wall time of the whole
jitted call over ``--iters`` runs after warm-up, divided by L. The single-call
figure (one layer, one jitted call from Python) is reported too.

Keys: block-clustered synthetic keys — every 64-key block has a centre
``c_b ~ N(0, I)·centre_scale`` and keys ``c_b + N(0, I)·noise`` — with the query
aligned to a few planted block centres. That reproduces a small kept-block
fraction (the knob is ``--planted``); the kept fraction actually measured is
reported per row. Real-attention selectivity for SmolLM2 is in
bench/results/quality.md (keys fraction per β).

    python bench/decode_attention.py --contexts 8192 32768 131072 524288 --batches 1 8 --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from alaya_jax import kv_store
from alaya_jax.dipr_store import dipr_store_attention
from pallas_kernels.block_bounds import block_bounds
from pallas_kernels.sparse_attention import sparse_decode_attention

HQ, HKV, D, BK = 32, 8, 128, 64
DT = jnp.bfloat16


def measure_copy_bandwidth(nbytes=4 << 30, iters=10) -> float:
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a * 2)
    f(x).block_until_ready()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        f(x).block_until_ready()
        ts.append(time.perf_counter() - t)
    del x
    return 2 * nbytes / float(np.median(ts))  # read + write


def make_layer(key, b, s, *, planted, centre_scale, noise, q_norm):
    """Keys/values [B,S,Hkv,D] (bf16) with block-clustered keys, and a query [B,Hq,D] aligned to planted blocks."""
    nb = s // BK
    k1, k2, k3, k4 = jax.random.split(key, 4)
    centres = jax.random.normal(k1, (b, nb, HKV, D), jnp.float32) * centre_scale
    keys = (centres[:, :, None] + noise * jax.random.normal(k2, (b, nb, BK, HKV, D), jnp.float32))
    keys = keys.reshape(b, s, HKV, D).astype(DT)
    values = jax.random.normal(k3, (b, s, HKV, D), jnp.float32).astype(DT)
    # Query: the sum of `planted` random block centres of its KV head (normalised), plus noise.
    pick = jax.random.randint(k4, (b, HKV, planted), 0, nb)
    chosen = jnp.take_along_axis(centres.transpose(0, 2, 1, 3), pick[..., None], axis=2).sum(2)  # [B,Hkv,D]
    q = chosen / jnp.linalg.norm(chosen, axis=-1, keepdims=True) * q_norm
    q = jnp.repeat(q, HQ // HKV, axis=1) + 0.1 * jax.random.normal(k4, (b, HQ, D))
    return q.astype(DT), keys, values


def timed(fn, args, iters):
    out = fn(*args)
    jax.block_until_ready(out)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), out


def layered(attn):
    """jit of L chained calls: layer i's own query gets a small dependence on layer i-1's output."""

    def run(qs, layers):
        acc = jnp.zeros(qs[0].shape, jnp.float32)
        prev = jnp.zeros(qs[0].shape, jnp.float32)
        for q, lay in zip(qs, layers):
            q = (q.astype(jnp.float32) + 1e-6 * prev).astype(q.dtype)  # each layer's own query, chained
            out = attn(q, lay)
            prev = out.astype(jnp.float32)
            acc = acc + prev
        return acc

    return jax.jit(run)


def dense_fns():
    def cudnn(q, lay):
        k, v = lay
        return jax.nn.dot_product_attention(q[:, None], k, v, implementation="cudnn")[:, 0]

    def xla(q, lay):
        k, v = lay
        return jax.nn.dot_product_attention(q[:, None], k, v, implementation="xla")[:, 0]

    def plain(q, lay):
        k, v = lay
        b, s = k.shape[:2]
        qg = q.reshape(b, HKV, HQ // HKV, D)
        sc = jnp.einsum("bhgd,bshd->bhgs", qg, k, preferred_element_type=jnp.float32) / math.sqrt(D)
        p = jax.nn.softmax(sc, axis=-1).astype(v.dtype)
        return jnp.einsum("bhgs,bshd->bhgd", p, v, preferred_element_type=jnp.float32).reshape(b, HQ, D).astype(q.dtype)

    fns = {"dense_cudnn": cudnn, "dense_xla": xla, "dense_jnp": plain}
    try:
        from jax.experimental.pallas.ops.gpu import decode_attention as pda

        def pallas_decode(q, lay):
            k, v = lay
            return pda.gqa(q, k, v)

        fns["dense_pallas_decode_attention"] = pallas_decode
    except Exception as e:  # reported, not hidden
        fns["dense_pallas_decode_attention"] = e
    return fns


def quest_fn(num_blocks, implementation):
    """Quest: top ``num_blocks`` pages per KV head by the min/max bound (group max), attention over them."""

    def quest(q, st):
        b = q.shape[0]
        nvb = (st.lengths + BK - 1) // BK
        ub = block_bounds(q, st.kmin, st.kmax, nvb, implementation=implementation)
        g = jnp.max(ub.reshape(b, HKV, HQ // HKV, -1), axis=2)
        _, idx = jax.lax.top_k(g, num_blocks)
        idx = jnp.sort(idx, axis=-1).astype(jnp.int32)
        out, _ = sparse_decode_attention(q, st.keys, st.values, idx, st.lengths,
                                         jnp.full(q.shape[:2], -jnp.inf, jnp.float32),
                                         num_splits=8, implementation=implementation, blocks_per_step=4)
        return out

    return quest


def _kept_idx(q, st, args, cap):
    """The kept-block list that dipr_store_attention builds (bounds, probe, select, compact)."""
    from alaya_jax.dipr_store import kept_blocks
    return kept_blocks(q, st, beta=args.beta, sink=4, window=64, top_r=args.top_r, capacity=cap,
                       implementation="pallas")[1]


def bench_one(b, s, args, bw, log):
    rows = []
    nl = max(1, min(args.layers, int(args.layer_budget_gb * 2**30 // (2 * b * s * HKV * D * 2))))
    keys = jax.random.split(jax.random.PRNGKey(s * 31 + b), nl)
    base = dict(context=s, batch=b, layers_in_loop=nl)
    kv_bytes = 2 * b * s * HKV * D * 2
    # ---- DIPR (store layout) first: measure selectivity.
    stores, qs = [], []
    for i in range(nl):
        qi, k, v = make_layer(keys[i], b, s, planted=args.planted, centre_scale=args.centre_scale, noise=args.noise,
                            q_norm=args.q_norm)
        qs.append(qi)
        stores.append(kv_store.from_dense(k, v, block_size=BK))
        del k, v
    cap = max(8, int(math.ceil(args.capacity_fraction * s / BK)))
    nsplit = max(1, args.target_programs // (b * HKV))
    stores = [kv_store.with_summary_dtype(st, DT) for st in stores]  # bf16 keys: exact, half the bytes
    kept_mean = None
    nb = s // BK
    blk = b * HKV * BK * D * 2  # bytes of one 64-key K (or V) block across batch and KV heads
    summ = 2 * b * HKV * nb * D * 2  # bf16 kmin + kmax
    # Kept-list capacity: 10% of the blocks (an overflow takes the dense path under lax.cond), or all
    # blocks ("cap all": no overflow possible, no cond; the kernels split the list by its real count).
    variants = {"dipr_pallas_single_pass": dict(single_pass=True, max_kept_blocks=cap),
                "dipr_pallas_two_pass": dict(single_pass=False, max_kept_blocks=cap),
                "dipr_pallas_two_pass_cap_all": dict(single_pass=False, max_kept_blocks=None),
                "dipr_pallas_single_pass_cap_all": dict(single_pass=True, max_kept_blocks=None),
                "dipr_pallas_two_pass_cap_all_top_r0": dict(single_pass=False, max_kept_blocks=None, top_r=0),
                "dipr_pallas_single_pass_cap_all_top_r0": dict(single_pass=True, max_kept_blocks=None, top_r=0)}
    variants = {k: {"top_r": args.top_r, **v} for k, v in variants.items()}
    for name, extra in variants.items():
        try:
            def dipr(q, st, extra=extra):
                out, stats, _ = dipr_store_attention(q, st, beta=args.beta, sink=4, window=64,
                                                     implementation="pallas", num_splits=nsplit, **extra)
                return out

            f = layered(dipr)
            t, _ = timed(f, (qs, stores), args.iters)
            stats_f = jax.jit(lambda q, st, extra=extra: dipr_store_attention(
                q, st, beta=args.beta, sink=4, window=64,
                implementation="pallas", num_splits=nsplit, **extra)[1])
            stt = stats_f(qs[0], stores[0])
            kept = float(np.asarray(stt.blocks_kept).mean())
            overflow = int(stt.overflow)
            refined = int(stt.refined)
            kept_mean = kept
            probe = (extra["top_r"] + 3 + HQ // HKV) * blk  # forced + top_r + one per query head (upper bound)
            passes = 2 if (extra["single_pass"] is False or refined) else 1  # K+V once, plus K again if two-pass
            bytes_read = summ + probe + kept * blk * (2 + (passes - 1)) * 1.0
            single, _ = timed(jax.jit(dipr), (qs[0], stores[0]), args.iters)
            rows.append({**base, "method": name, "us_per_layer": 1e6 * t / nl, "us_single_call": 1e6 * single,
                         "blocks_kept_per_kv_head": kept, "blocks_total": nb, "kept_fraction": kept / nb,
                         "overflow": overflow, "refined": refined,
                         "capacity_blocks": extra["max_kept_blocks"] or nb, "top_r": extra["top_r"],
                         "beta": args.beta,
                         "num_splits": nsplit, "bytes_read_per_layer": bytes_read})
            log(rows[-1])
        except Exception as e:
            rows.append({**base, "method": name, "error": f"{type(e).__name__}: {str(e)[:400]}"})
            log(rows[-1])
            traceback.print_exc()
    # Real-attention-like keys (bench/results/selectivity.md: min/max bounds keep 92-100% of blocks on
    # SmolLM2): i.i.d. keys N(0, I), same query, same β. Expected: overflow -> exact dense fallback.
    if args.realistic and b == 1:
        try:
            rstores = []
            for i in range(nl):
                _, k, v = make_layer(keys[i], b, s, planted=args.planted, centre_scale=0.0, noise=1.0,
                                     q_norm=args.q_norm)
                rstores.append(kv_store.with_summary_dtype(kv_store.from_dense(k, v, block_size=BK), DT))
                del k, v

            def dipr_r(q, st):
                return dipr_store_attention(q, st, beta=args.beta, sink=4, window=64, top_r=args.top_r,
                                            max_kept_blocks=cap, implementation="pallas", num_splits=nsplit)[0]

            t, _ = timed(layered(dipr_r), (qs, rstores), args.iters)
            stt = jax.jit(lambda q, st: dipr_store_attention(q, st, beta=args.beta, sink=4, window=64,
                                                             top_r=args.top_r, max_kept_blocks=cap,
                                                             implementation="pallas", num_splits=nsplit)[1])(qs[0], rstores[0])
            kept = float(np.asarray(stt.blocks_kept).mean())
            rows.append({**base, "method": "dipr_pallas_single_pass[iid keys: real-like selectivity]",
                         "us_per_layer": 1e6 * t / nl, "blocks_kept_per_kv_head": kept, "blocks_total": nb,
                         "kept_fraction": kept / nb, "overflow": int(stt.overflow), "refined": int(stt.refined),
                         "bytes_read_per_layer": summ + (args.top_r + 3 + HQ // HKV) * blk + nb * blk * 2})
            log(rows[-1])
            del rstores
        except Exception as e:
            rows.append({**base, "method": "dipr_realistic", "error": f"{type(e).__name__}: {str(e)[:400]}"})
            log(rows[-1])
    # Stage timings (leave-the-rest-out), same layered loop.
    if kept_mean is not None:
        try:
            def bounds_only(q, st):
                nvb = (st.lengths + BK - 1) // BK
                ub = block_bounds(q, st.kmin, st.kmax, nvb, implementation="pallas")
                return jnp.broadcast_to(jnp.max(ub, axis=-1)[..., None], q.shape).astype(q.dtype)

            t, _ = timed(layered(bounds_only), (qs, stores), args.iters)
            rows.append({**base, "method": "stage_bounds_only(bf16 summaries)", "us_per_layer": 1e6 * t / nl,
                         "bytes_read_per_layer": summ})
            log(rows[-1])
            kidx = jax.jit(lambda q, st: _kept_idx(q, st, args, cap))
            idxs = [kidx(qq, st) for qq, st in zip(qs, stores)]

            def attn_only(q, lay):
                st, idx = lay
                out, _, _ = sparse_decode_attention(q, st.keys, st.values, idx, st.lengths,
                                                    jnp.full(q.shape[:2], -jnp.inf, jnp.float32), sink=4,
                                                    window=64, num_splits=nsplit, return_max=True,
                                                    implementation="pallas")
                return out

            t, _ = timed(layered(attn_only), (qs, list(zip(stores, idxs))), args.iters)
            rows.append({**base, "method": "stage_attention_only(kept list given)", "us_per_layer": 1e6 * t / nl,
                         "bytes_read_per_layer": kept_mean * blk * 2})
            log(rows[-1])

            def select_only(q, st):
                return jnp.broadcast_to(jnp.sum(_kept_idx(q, st, args, cap), axis=-1, keepdims=True)
                                        .astype(q.dtype)[:, :1], q.shape)

            t, _ = timed(layered(select_only), (qs, stores), args.iters)
            rows.append({**base, "method": "stage_bounds+probe+select(no attention)", "us_per_layer": 1e6 * t / nl,
                         "bytes_read_per_layer": summ + (args.top_r + 3 + HQ // HKV) * blk})
            log(rows[-1])
        except Exception as e:
            rows.append({**base, "method": "stages", "error": f"{type(e).__name__}: {str(e)[:400]}"})
            log(rows[-1])
            traceback.print_exc()
    if kept_mean is not None:
        nq = max(1, int(round(kept_mean)))
        for impl in ["pallas"]:
            name = f"quest_{impl}"
            try:
                qf = quest_fn(nq, impl)
                t, _ = timed(layered(qf), (qs, stores), args.iters)
                blk = b * HKV * BK * D * 2
                bytes_read = 2 * b * HKV * (s // BK) * D * 2 + nq * blk * 2
                rows.append({**base, "method": name, "us_per_layer": 1e6 * t / nl, "blocks_per_kv_head": nq,
                             "bytes_read_per_layer": bytes_read})
                log(rows[-1])
            except Exception as e:
                rows.append({**base, "method": name, "error": f"{type(e).__name__}: {str(e)[:400]}"})
                log(rows[-1])
    dense_layers = [(st.dense_keys().transpose(0, 2, 1, 3), st.dense_values().transpose(0, 2, 1, 3))
                    for st in stores]
    dense_layers = [(jnp.array(k), jnp.array(v)) for k, v in dense_layers]  # BSNH copies, contiguous
    del stores
    for name, fn in dense_fns().items():
        if isinstance(fn, Exception):
            rows.append({**base, "method": name, "error": f"{type(fn).__name__}: {str(fn)[:400]}"})
            log(rows[-1])
            continue
        try:
            t, _ = timed(layered(fn), (qs, dense_layers), args.iters)
            single, _ = timed(jax.jit(fn), (qs[0], dense_layers[0]), args.iters)
            rows.append({**base, "method": name, "us_per_layer": 1e6 * t / nl, "us_single_call": 1e6 * single,
                         "bytes_read_per_layer": kv_bytes})
            log(rows[-1])
        except Exception as e:
            rows.append({**base, "method": name, "error": f"{type(e).__name__}: {str(e)[:400]}"})
            log(rows[-1])
    del dense_layers
    ok = [r for r in rows if "us_per_layer" in r]
    dense = [r["us_per_layer"] for r in ok if r["method"].startswith("dense")]
    best_dense = min(dense) if dense else None
    for r in ok:
        r["gb_per_s"] = r["bytes_read_per_layer"] / (r["us_per_layer"] * 1e-6) / 1e9
        r["share_of_copy_bw"] = r["gb_per_s"] * 1e9 / bw
        if best_dense:
            r["speedup_vs_best_dense"] = best_dense / r["us_per_layer"]
    return rows


def markdown(res) -> str:
    m = res["meta"]
    out = [f"# Decode attention, Llama-3-8B shapes (bench/decode_attention.py)", "",
           f"{m['device']}, jax {m['jax']}, {m['date']}, commit {m['commit']}. 32 q / 8 KV heads, D=128, bf16, "
           f"block {BK}. XLA_FLAGS: `{m.get('xla_flags', '')}`. Copy bandwidth measured in this run: {m['copy_bw_GBps']:.0f} GB/s. "
           f"µs per layer = one jit over L layers (own K/V each, chained queries) / L; "
           f"DIPR β={m['beta']}, sink 4, window 64, top_r 4. Keys: {m['keys']}.", "",
           "| B | context | method | µs/layer | single call µs | kept blocks | bytes/layer (MB) | GB/s | % copy BW | × best dense |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            out.append(f"| {r['batch']} | {r['context']} | {r['method']} | failed: {r['error'][:120]} |||||||")
            continue
        kept = (f"{r['blocks_kept_per_kv_head']:.0f}/{r['blocks_total']} ({r['kept_fraction']:.1%})"
                if "blocks_kept_per_kv_head" in r else (str(r.get("blocks_per_kv_head", "")) or "all"))
        out.append(f"| {r['batch']} | {r['context']} | {r['method']} | {r['us_per_layer']:.1f} | "
                   f"{r.get('us_single_call', float('nan')):.0f} | {kept} | {r['bytes_read_per_layer'] / 1e6:.1f} | "
                   f"{r['gb_per_s']:.0f} | {100 * r['share_of_copy_bw']:.0f}% | {r.get('speedup_vs_best_dense', 0):.2f} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768, 131072, 524288])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--layer-budget-gb", type=float, default=16.0, help="cap on K+V bytes across the layer loop")
    ap.add_argument("--max-kv-gb-per-layer", type=float, default=4.0, help="skip shapes above this")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--beta", type=float, default=45.0)
    ap.add_argument("--planted", type=int, default=4)
    ap.add_argument("--centre-scale", type=float, default=1.0)
    ap.add_argument("--noise", type=float, default=0.03)
    ap.add_argument("--q-norm", type=float, default=15.0)
    ap.add_argument("--capacity-fraction", type=float, default=0.10)
    ap.add_argument("--implementations", nargs="+", default=["pallas"])
    ap.add_argument("--top-r", type=int, default=4)
    ap.add_argument("--realistic", action="store_true", help="also DIPR on i.i.d. keys (real-like selectivity)")
    ap.add_argument("--target-programs", type=int, default=128, help="split-K: programs ~ B*Hkv*splits")
    ap.add_argument("--pairs", nargs="+", default=None, help="B:S pairs to run, e.g. 1:131072 8:32768")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    def log(r):
        print(json.dumps(r), flush=True)

    bw = measure_copy_bandwidth() if jax.default_backend() == "gpu" else float("nan")
    res = {"meta": {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                    "python": platform.python_version(),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "commit": os.environ.get("ALAYA_COMMIT", "unknown"), "copy_bw_GBps": bw / 1e9, "xla_flags": os.environ.get("XLA_FLAGS", ""), "beta": args.beta,
                    "keys": f"block-clustered: centre N(0,I)·{args.centre_scale}, noise N(0,I)·{args.noise}, "
                            f"query of norm {args.q_norm} aligned with {args.planted} planted block centres per KV head",
                    "args": vars(args)}, "rows": []}
    pairs = ([tuple(int(x) for x in p.split(":")) for p in args.pairs] if args.pairs
             else [(b, s) for b in args.batches for s in args.contexts])
    for b, s in pairs:
        if True:
            if 2 * b * s * HKV * D * 2 > args.max_kv_gb_per_layer * 2**30:
                res["rows"].append({"context": s, "batch": b, "method": "all",
                                    "error": f"skipped: K+V of one layer is {2 * b * s * HKV * D * 2 / 2**30:.0f} GiB"})
                continue
            res["rows"] += bench_one(b, s, args, bw, log)
            with open(os.path.join(args.out, "decode_attention.json"), "w") as f:
                json.dump(res, f, indent=1)
            with open(os.path.join(args.out, "decode_attention.md"), "w") as f:
                f.write(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    sys.exit(main())
