"""Variant sweep of the raw Pallas kernels at Llama-3-8B decode shapes (device machine).

    PYTHONUNBUFFERED=1 python bench/kernels_tune.py --out $OUT

Times the raw pallas_calls (inputs prepared outside) per layer inside one jit over
32 layers with their own K/V, for block sizes / warps / stages / splits / score
dtype, and lists large copies in the optimised HLO of the public wrappers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import block_bounds, dipr_range_mask, sparse_decode_attention
from pallas_kernels.block_bounds.kernel import block_bounds_pallas
from pallas_kernels.range_mask.kernel import listed_scores_pallas
from pallas_kernels.sparse_attention.kernel import sparse_attention_partials_pallas

ROWS = []


def med(fn, args, n=20, warm=2):
    for _ in range(warm):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--context", type=int, default=131072)
    args = ap.parse_args()
    B, HQ, HKV, D, BK, G = 1, 32, 8, 128, 64, 4
    S, L = args.context, args.layers
    NB = S // BK
    nlist = int(round(0.03 * NB))
    C = 1 << (nlist - 1).bit_length()
    dt = jnp.bfloat16
    rng = np.random.default_rng(0)

    @jax.jit
    def gen(key):
        k1, k2, k3 = jax.random.split(key, 3)
        keys = jax.random.normal(k1, (B, HKV, NB, BK, D), dt)
        vals = jax.random.normal(k2, (B, HKV, NB, BK, D), dt)
        k32 = keys.astype(jnp.float32)
        return (jax.random.normal(k3, (B, HQ, D), dt), keys, vals,
                jnp.min(k32, axis=3), jnp.max(k32, axis=3))

    layers = [gen(jax.random.PRNGKey(i)) for i in range(L)]
    lists = []
    for _ in range(L):
        a = np.full((B, HKV, C), -1, np.int32)
        for h in range(HKV):
            a[0, h, :nlist] = np.sort(rng.choice(NB, nlist, replace=False))
        lists.append(jnp.asarray(a))
    lengths = jnp.full((B,), S, jnp.int32)
    nvb = jnp.full((B,), NB, jnp.int32)
    jax.block_until_ready(layers)

    def run(name, per_layer, **cfg):
        try:
            @jax.jit
            def loop(layers, lists):
                acc = jnp.float32(0)
                for i in range(L):
                    out = per_layer(layers[i], lists[i])
                    acc = acc + jnp.sum(jnp.where(jnp.isfinite(out), out, 0).astype(jnp.float32)[..., :1])
                return acc
            t0 = time.perf_counter()
            jax.block_until_ready(loop(layers, lists))
            comp = time.perf_counter() - t0
            us = med(loop, (layers, lists)) / L * 1e6
            row = dict(kernel=name, us_per_layer=round(us, 2), compile_s=round(comp, 1), **cfg)
        except Exception as e:  # noqa: BLE001
            row = dict(kernel=name, error=f"{type(e).__name__}: {str(e)[:300]}", **cfg)
            traceback.print_exc(limit=2)
        print(json.dumps(row), flush=True)
        ROWS.append(row)

    # ---- block bounds
    for layout, tile, nw in [("rows", 64, 4), ("rows", 32, 4), ("rows", 128, 8), ("rows", 64, 8),
                             ("3d", None, 4), ("3d", 32, 8)]:
        run("bounds_raw", lambda lay, lst: block_bounds_pallas(
            lay[0], lay[3], lay[4], nvb, rel_slack=1e-4, interpret=False, tile=tile,
            num_warps=nw, layout=layout), layout=layout, tile=tile, num_warps=nw)
    run("bounds_ref", lambda lay, lst: block_bounds(lay[0], lay[3], lay[4], nvb))

    # ---- range scores (raw kernel, q prepared in the loop: cheap)
    def prep_q(q, qdt):
        qq = q.astype(qdt).reshape(B, HKV, G, D)
        return jnp.pad(qq, ((0, 0), (0, 0), (0, 16 - G), (0, 0)))

    for qdt in (jnp.float32, jnp.bfloat16):
        for splits, nw, ns, ws in [(8, 4, 2, False), (32, 4, 2, False), (32, 4, 1, False),
                                   (16, 4, 2, False), (32, 8, 2, False), (16, 4, 2, True),
                                   (32, 4, 2, True)]:
            run("range_raw", lambda lay, lst: listed_scores_pallas(
                prep_q(lay[0], qdt), lay[1], lst, lengths, num_splits=splits, with_scores=ws,
                interpret=False, num_warps=nw, num_stages=ns)[1],
                qdt=jnp.dtype(qdt).name, splits=splits, num_warps=nw, num_stages=ns, with_scores=ws)
    for mode in ("f32", "auto"):
        run("range_api", lambda lay, lst: dipr_range_mask(lay[0], lay[1], lst, lengths, beta=20.0,
                                                          implementation="pallas", score_mode=mode)[0],
            score_mode=mode)
        run("range_api_maxonly", lambda lay, lst: dipr_range_mask(
            lay[0], lay[1], lst, lengths, beta=20.0, return_mask=False, implementation="pallas",
            score_mode=mode)[1], score_mode=mode)

    # ---- attention partials
    thr = jnp.full((B, HKV, 16), -1e30, jnp.float32)
    for qdt in (jnp.float32, jnp.bfloat16):
        for splits, nw, ns in [(8, 4, 2), (16, 4, 2), (32, 4, 2), (16, 4, 1), (16, 4, 3),
                               (16, 8, 2), (32, 8, 2), (64, 4, 2)]:
            run("attn_raw", lambda lay, lst: sparse_attention_partials_pallas(
                prep_q(lay[0], qdt), lay[1], lay[2], lst, lengths, thr, num_splits=splits, sink=4,
                window=64, sm_scale=D ** -0.5, interpret=False, num_warps=nw, num_stages=ns)[0],
                qdt=jnp.dtype(qdt).name, splits=splits, num_warps=nw, num_stages=ns)
    for mode in ("f32", "auto"):
        for splits in (16, 32):
            run("attn_api", lambda lay, lst: sparse_decode_attention(
                lay[0], lay[1], lay[2], lst, lengths, jnp.full((B, HQ), -jnp.inf), sink=4, window=64,
                num_splits=splits, implementation="pallas", score_mode=mode)[0],
                score_mode=mode, splits=splits)
    run("attn_ref", lambda lay, lst: sparse_decode_attention(
        lay[0], lay[1], lay[2], lst, lengths, jnp.full((B, HQ), -jnp.inf), sink=4, window=64)[0])

    # ---- large copies in the optimised HLO of one wrapper call
    q0, k0, v0, lo0, hi0 = layers[0]
    for name, f, a in [
        ("range_api", lambda q, k, l: dipr_range_mask(q, k, l, lengths, beta=20.0, implementation="pallas"), (q0, k0, lists[0])),
        ("attn_api", lambda q, k, v, l: sparse_decode_attention(q, k, v, l, lengths, jnp.full((B, HQ), -jnp.inf), num_splits=16, implementation="pallas"), (q0, k0, v0, lists[0])),
        ("bounds_api", lambda q, lo, hi: block_bounds(q, lo, hi, nvb, implementation="pallas"), (q0, lo0, hi0)),
    ]:
        txt = jax.jit(f).lower(*a).compile().as_text()
        big = [ln.strip()[:200] for ln in txt.splitlines()
               if re.search(r"\b(copy|transpose|pad)\(", ln) and re.search(r"\[\d+,\d+,\d{3,}", ln)]
        kernels = len(re.findall(r"custom-call|fusion\(", txt))
        print(f"HLO {name}: {kernels} fusions/custom-calls; large copies: {big[:5]}", flush=True)
        ROWS.append(dict(hlo=name, fusions_and_custom_calls=kernels, large_copies=big[:5]))
        with open(os.path.join(args.out, f"hlo_{name}.txt"), "w") as fh:
            fh.write(txt)
    with open(os.path.join(args.out, "kernels_tune.json"), "w") as fh:
        json.dump(dict(device=jax.devices()[0].device_kind, jax=jax.__version__, rows=ROWS), fh, indent=1)


if __name__ == "__main__":
    main()
