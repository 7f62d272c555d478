"""GPU check + timing of the pallas_kernels ops (run on the device machine).

    PYTHONUNBUFFERED=1 python bench/kernels_gpu.py --out $OUT

(1) Pallas vs jnp reference on the GPU with fresh random data and NaN padding.
(2) Timing at Llama-3-8B decode shapes (B=1, 32 q heads, 8 KV heads, D=128, bf16,
    128K tokens, block 64; ~3% of blocks kept per KV head for ops 2-3):
    single jitted call from Python (median of >= 20 after warm-up), and per layer
    inside one jit that unrolls 32 layers each with its own K/V (no dispatch, no L2
    reuse). Dense jax.nn.dot_product_attention(implementation="cudnn") is the yardstick.
Writes kernels_gpu.json and kernels_gpu.md under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import block_bounds, dipr_range_mask, merge_attention, sparse_decode_attention

RESULTS: dict = {"checks": [], "timings": [], "failures": []}
OUT = "."


def save():
    with open(os.path.join(OUT, "kernels_gpu.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)


def fail(what: str, e: BaseException):
    tb = traceback.format_exc()
    msg = f"!!!!!!!! PALLAS FAILURE in {what}: {type(e).__name__}: {e}"
    print(msg, flush=True)
    print(tb[-3000:], flush=True)
    RESULTS["failures"].append({"what": what, "error": f"{type(e).__name__}: {e}", "traceback": tb[-6000:]})
    save()


# ----------------------------------------------------------------------------- data

def make_store(key, *, b, hkv, nb, bk, d, dtype, lengths):
    k1, k2 = jax.random.split(key)
    keys = jax.random.normal(k1, (b, hkv, nb, bk, d), jnp.float32)
    vals = jax.random.normal(k2, (b, hkv, nb, bk, d), jnp.float32)
    pos = jnp.arange(nb * bk).reshape(nb, bk)
    valid = (pos[None] < lengths[:, None, None])[:, None, :, :, None]
    keys = jnp.where(valid, keys, jnp.nan).astype(dtype)
    vals = jnp.where(valid, vals, jnp.nan).astype(dtype)
    k32 = keys.astype(jnp.float32)
    kmin = jnp.min(jnp.where(valid, k32, jnp.inf), axis=3)
    kmax = jnp.max(jnp.where(valid, k32, -jnp.inf), axis=3)
    ne = jnp.any(valid, axis=3)
    return keys, vals, jnp.where(ne, kmin, 0.0), jnp.where(ne, kmax, 0.0)


def random_lists(rng, *, b, hkv, nb, c, nlisted):
    out = np.full((b, hkv, c), -1, np.int32)
    for i in range(b):
        for h in range(hkv):
            n = nlisted if np.isscalar(nlisted) else nlisted[i]
            out[i, h, :n] = np.sort(rng.choice(nb, size=min(n, nb), replace=False))
    return jnp.asarray(out)


# ----------------------------------------------------------------------------- checks

def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check_all(seed: int):
    print("== correctness on GPU: pallas vs reference ==", flush=True)
    rng = np.random.default_rng(seed)
    configs = [
        dict(g=4, hkv=8, d=128, dtype=jnp.bfloat16),
        dict(g=3, hkv=2, d=64, dtype=jnp.float32),
        dict(g=1, hkv=4, d=128, dtype=jnp.float32),
    ]
    lengths_np = np.array([1, 3, 513, 1023, 4097], np.int32)
    bk = 64
    nb = -(-int(lengths_np.max()) // bk)
    b = len(lengths_np)
    lengths = jnp.asarray(lengths_np)
    for ci, cfg in enumerate(configs):
        g, hkv, d, dtype = cfg["g"], cfg["hkv"], cfg["d"], cfg["dtype"]
        hq = g * hkv
        name = f"G={g} Hkv={hkv} D={d} {jnp.dtype(dtype).name}"
        key = jax.random.PRNGKey(seed * 100 + ci)
        keys, vals, kmin, kmax = make_store(key, b=b, hkv=hkv, nb=nb, bk=bk, d=d, dtype=dtype,
                                            lengths=lengths)
        q = jax.random.normal(jax.random.fold_in(key, 7), (b, hq, d), jnp.float32).astype(dtype)
        nvb = (lengths + bk - 1) // bk
        rec = {"config": name}
        # op 1
        try:
            ub_r = block_bounds(q, kmin, kmax, nvb, implementation="reference")
            ub_p = block_bounds(q, kmin, kmax, nvb, implementation="pallas")
            ub_p.block_until_ready()
            fin = np.isfinite(np.asarray(ub_r))
            same_inf = bool(np.array_equal(fin, np.isfinite(np.asarray(ub_p))))
            # violations: every valid score vs its block's bound (pallas ub)
            all_idx = jnp.broadcast_to(jnp.arange(nb, dtype=jnp.int32), (b, hkv, nb))
            _, mx = None, None
            kg = keys.astype(jnp.float32).reshape(b, hkv, nb * bk, d)
            s = jnp.einsum("bhgd,bhsd->bhgs", q.astype(jnp.float32).reshape(b, hkv, g, d), kg,
                           precision=jax.lax.Precision.HIGHEST).reshape(b, hq, nb, bk)
            pos = jnp.arange(nb * bk).reshape(nb, bk)
            valid = pos[None, None] < lengths[:, None, None, None]
            viol = int(jnp.sum(valid & (s > ub_p[..., None])))
            rec["block_bounds"] = {
                "max_abs_diff_finite": float(np.max(np.abs(np.where(fin, np.asarray(ub_r) - np.asarray(ub_p), 0)))),
                "same_-inf_pattern": same_inf, "violations_vs_scores": viol}
        except Exception as e:  # noqa: BLE001
            fail(f"block_bounds check {name}", e)
        # op 2
        c = nb
        lists = random_lists(rng, b=b, hkv=hkv, nb=nb, c=c + 3, nlisted=[max(1, int(n)) for n in np.asarray(nvb)])
        try:
            for beta in (0.0, 5.0, float("inf")):
                m_r, mx_r = dipr_range_mask(q, keys, lists, lengths, beta=beta, implementation="reference")
                m_p, mx_p = dipr_range_mask(q, keys, lists, lengths, beta=beta, implementation="pallas")
                _, mx_p2 = dipr_range_mask(q, keys, lists, lengths, beta=beta, return_mask=False,
                                           implementation="pallas")
                rec.setdefault("range_mask", []).append({
                    "beta": beta, "mask_mismatches": int(jnp.sum(m_r != m_p)),
                    "mask_true": int(jnp.sum(m_r)),
                    "max_score_max_abs_diff": float(jnp.max(jnp.abs(jnp.where(jnp.isfinite(mx_r), mx_r - mx_p, 0)))),
                    "max_score_nomask_equal": bool(jnp.array_equal(mx_p, mx_p2)),
                })
        except Exception as e:  # noqa: BLE001
            fail(f"dipr_range_mask check {name}", e)
        # op 3 (+4 through num_splits)
        try:
            # thresholds come from the same implementation's scores (as the pipeline must do)
            _, mx = dipr_range_mask(q, keys, lists, lengths, beta=0.0, return_mask=False)
            _, mx_pl = dipr_range_mask(q, keys, lists, lengths, beta=0.0, return_mask=False,
                                       implementation="pallas")
            for beta, sink, window in ((4.0, 4, 64), (float("inf"), 0, 0), (0.0, 0, 0)):
                thr, thr_p = mx - beta, mx_pl - beta
                o_r, l_r = sparse_decode_attention(q, keys, vals, lists, lengths, thr, sink=sink,
                                                   window=window, implementation="reference")
                for ns in (1, 4):
                    o_p, l_p = sparse_decode_attention(q, keys, vals, lists, lengths, thr_p, sink=sink,
                                                       window=window, num_splits=ns,
                                                       implementation="pallas")
                    rec.setdefault("sparse_attention", []).append({
                        "beta": beta, "sink": sink, "window": window, "num_splits": ns,
                        "out_rel_err": rel(o_p.astype(jnp.float32), o_r.astype(jnp.float32)),
                        "out_has_nan": bool(jnp.any(jnp.isnan(o_p))),
                        "lse_max_abs_diff": float(jnp.max(jnp.abs(jnp.where(jnp.isfinite(l_r), l_r - l_p, 0)))),
                        "lse_same_-inf": bool(jnp.array_equal(jnp.isfinite(l_r), jnp.isfinite(l_p))),
                    })
        except Exception as e:  # noqa: BLE001
            fail(f"sparse_decode_attention check {name}", e)
        try:
            outs = jax.random.normal(jax.random.fold_in(key, 9), (4, b, hq, d), jnp.float32)
            lses = jax.random.normal(jax.random.fold_in(key, 10), (4, b, hq), jnp.float32) * 5
            lses = lses.at[1].set(-jnp.inf).at[:, 0, 0].set(-jnp.inf)
            o_r, l_r = merge_attention(outs, lses)
            o_p, l_p = merge_attention(outs, lses, implementation="pallas")
            rec["lse_merge"] = {"out_rel_err": rel(o_p, o_r),
                                "lse_max_abs_diff": float(jnp.max(jnp.abs(jnp.where(jnp.isfinite(l_r), l_r - l_p, 0))))}
        except Exception as e:  # noqa: BLE001
            fail(f"merge_attention check {name}", e)
        print(json.dumps(rec), flush=True)
        RESULTS["checks"].append(rec)
        save()


# ----------------------------------------------------------------------------- timing

def median_call_us(fn, args, n=30, warm=3):
    for _ in range(warm):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e6), float(np.min(ts) * 1e6)


def record(op, impl, mode, us, bytes_=None, **kw):
    row = {"op": op, "impl": impl, "mode": mode, "us_per_call": round(us, 2), **kw}
    if bytes_:
        row["bytes"] = int(bytes_)
        row["GB_per_s"] = round(bytes_ / (us * 1e-6) / 1e9, 1)
    print(json.dumps(row), flush=True)
    RESULTS["timings"].append(row)
    save()


def timing(args):
    print("== timing at Llama-3-8B decode shapes ==", flush=True)
    B, HQ, HKV, D, BK = 1, 32, 8, 128, 64
    S = args.context
    NB = S // BK
    L = args.layers
    keep = args.keep
    nlist = max(1, int(round(keep * NB)))
    C = 1 << (nlist - 1).bit_length()  # capacity bucket (power of two)
    dt = jnp.bfloat16
    RESULTS["timing_shapes"] = dict(B=B, Hq=HQ, Hkv=HKV, D=D, block=BK, context=S, NB=NB,
                                    layers=L, kept_blocks_per_kv_head=nlist, capacity=C,
                                    dtype="bfloat16")
    lengths = jnp.full((B,), S, jnp.int32)
    nvb = jnp.full((B,), NB, jnp.int32)
    rng = np.random.default_rng(1)

    # HBM bandwidth in the same run
    x = jax.random.normal(jax.random.PRNGKey(0), (1 << 30,), jnp.bfloat16)  # 2 GiB
    f = jax.jit(lambda a: a + jnp.bfloat16(1))
    us, _ = median_call_us(f, (x,), n=20)
    bw = 2 * x.size * 2 / (us * 1e-6)
    RESULTS["hbm_copy_GB_per_s"] = round(bw / 1e9, 1)
    print(f"HBM read+write bandwidth (a+1 on 2 GiB bf16): {bw/1e9:.0f} GB/s", flush=True)
    del x

    @jax.jit
    def gen_layer(key):
        k1, k2, k3 = jax.random.split(key, 3)
        keys = jax.random.normal(k1, (B, HKV, NB, BK, D), dt)
        vals = jax.random.normal(k2, (B, HKV, NB, BK, D), dt)
        k32 = keys.astype(jnp.float32)
        q = jax.random.normal(k3, (B, HQ, D), dt)
        return q, keys, vals, jnp.min(k32, axis=3), jnp.max(k32, axis=3)

    layers = [gen_layer(jax.random.PRNGKey(100 + i)) for i in range(L)]
    lists = [random_lists(rng, b=B, hkv=HKV, nb=NB, c=C, nlisted=nlist) for _ in range(L)]
    jax.block_until_ready(layers)
    q0, k0, v0, lo0, hi0 = layers[0]
    _, mx0 = dipr_range_mask(q0, k0, lists[0], lengths, beta=0.0, return_mask=False)
    thr0 = mx0 - 20.0
    thrs = [thr0] * L

    kv_bytes_kept = 2 * B * HKV * nlist * BK * D * 2
    k_bytes_kept = kv_bytes_kept // 2
    sum_bytes = 2 * B * HKV * NB * D * 4

    def time_op(op, impl, single_fn, single_args, layer_fn, bytes_, **kw):
        """single_fn(*single_args) for one call; layer_fn(i) -> outputs, looped over L layers in one jit."""
        try:
            us, _ = median_call_us(jax.jit(single_fn), single_args, n=args.reps)
            record(op, impl, "single call", us, bytes_, **kw)

            @jax.jit
            def loop(layers, lists, thrs):
                acc = jnp.float32(0)
                for i in range(L):
                    out = layer_fn(layers[i], lists[i], thrs[i])
                    acc = acc + jnp.sum(jnp.where(jnp.isfinite(out), out, 0.0).astype(jnp.float32)[..., :1])
                return acc

            us_l, _ = median_call_us(loop, (layers, lists, thrs), n=args.reps)
            record(op, impl, f"in jit loop of {L} layers (per layer)", us_l / L, bytes_, **kw)
        except Exception as e:  # noqa: BLE001
            fail(f"timing {op} {impl} {kw}", e)

    for impl in ("reference", "pallas"):
        time_op("block_bounds", impl,
                lambda q, lo, hi: block_bounds(q, lo, hi, nvb, implementation=impl),
                (q0, lo0, hi0),
                lambda lay, lst, thr: block_bounds(lay[0], lay[3], lay[4], nvb, implementation=impl),
                sum_bytes)
    for impl in ("reference", "pallas"):
        time_op("dipr_range_mask", impl,
                lambda q, k, lst: dipr_range_mask(q, k, lst, lengths, beta=20.0, implementation=impl),
                (q0, k0, lists[0]),
                lambda lay, lst, thr: dipr_range_mask(lay[0], lay[1], lst, lengths, beta=20.0,
                                                      implementation=impl)[0],
                k_bytes_kept)
        time_op("dipr_range_mask(max only)", impl,
                lambda q, k, lst: dipr_range_mask(q, k, lst, lengths, beta=20.0, return_mask=False,
                                                  implementation=impl)[1],
                (q0, k0, lists[0]),
                lambda lay, lst, thr: dipr_range_mask(lay[0], lay[1], lst, lengths, beta=20.0,
                                                      return_mask=False, implementation=impl)[1],
                k_bytes_kept)
    for impl, splits in [("reference", 1)] + [("pallas", s) for s in args.splits]:
        time_op("sparse_decode_attention", impl,
                lambda q, k, v, lst, thr: sparse_decode_attention(
                    q, k, v, lst, lengths, thr, sink=4, window=64, num_splits=splits,
                    implementation=impl)[0],
                (q0, k0, v0, lists[0], thr0),
                lambda lay, lst, thr: sparse_decode_attention(
                    lay[0], lay[1], lay[2], lst, lengths, thr, sink=4, window=64,
                    num_splits=splits, implementation=impl)[0],
                kv_bytes_kept, num_splits=splits)
    P = 8
    outs = jax.random.normal(jax.random.PRNGKey(5), (P, B, HQ, D), jnp.float32)
    lses = jax.random.normal(jax.random.PRNGKey(6), (P, B, HQ), jnp.float32)
    for impl in ("reference", "pallas"):
        try:
            us, _ = median_call_us(jax.jit(lambda o, l: merge_attention(o, l, implementation=impl)),
                                   (outs, lses), n=args.reps)
            record("merge_attention", impl, "single call", us, None, partials=P)
        except Exception as e:  # noqa: BLE001
            fail(f"timing merge_attention {impl}", e)

    # dense cudnn yardstick, its own per-layer K/V in [B, S, Hkv, D]
    del layers
    try:
        @jax.jit
        def gen_dense(key):
            k1, k2, k3 = jax.random.split(key, 3)
            return (jax.random.normal(k3, (B, 1, HQ, D), dt),
                    jax.random.normal(k1, (B, S, HKV, D), dt),
                    jax.random.normal(k2, (B, S, HKV, D), dt))

        dense = [gen_dense(jax.random.PRNGKey(500 + i)) for i in range(L)]
        jax.block_until_ready(dense)
        dense_bytes = 2 * B * S * HKV * D * 2

        def cudnn(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")

        us, _ = median_call_us(jax.jit(cudnn), dense[0], n=args.reps)
        record("dense dot_product_attention", "cudnn", "single call", us, dense_bytes)

        @jax.jit
        def dloop(dense):
            acc = jnp.float32(0)
            for i in range(L):
                acc = acc + cudnn(*dense[i])[0, 0, 0, 0].astype(jnp.float32)
            return acc

        us_l, _ = median_call_us(dloop, (dense,), n=args.reps)
        record("dense dot_product_attention", "cudnn", f"in jit loop of {L} layers (per layer)",
               us_l / L, dense_bytes)
    except Exception as e:  # noqa: BLE001
        fail("timing cudnn dense", e)


def write_md():
    lines = [f"# pallas_kernels on GPU — {RESULTS['device']}",
             "",
             f"jax {RESULTS['jax_version']}, jaxlib {RESULTS.get('jaxlib_version')}, {RESULTS['timestamp']}",
             "",
             f"Shapes: {RESULTS.get('timing_shapes')}",
             f"Measured HBM read+write bandwidth: {RESULTS.get('hbm_copy_GB_per_s')} GB/s",
             ""]
    if RESULTS["failures"]:
        lines += ["## FAILURES", ""] + [f"- **{f['what']}**: {f['error']}" for f in RESULTS["failures"]] + [""]
    lines += ["## Timings", "", "| op | impl | mode | µs/call | bytes | GB/s | extra |",
              "|---|---|---|---|---|---|---|"]
    for r in RESULTS["timings"]:
        extra = {k: v for k, v in r.items() if k not in ("op", "impl", "mode", "us_per_call", "bytes", "GB_per_s")}
        lines.append(f"| {r['op']} | {r['impl']} | {r['mode']} | {r['us_per_call']} | "
                     f"{r.get('bytes', '')} | {r.get('GB_per_s', '')} | {extra or ''} |")
    lines += ["", "## Checks (pallas vs reference on GPU)", ""]
    for c in RESULTS["checks"]:
        lines.append(f"- `{json.dumps(c)}`")
    with open(os.path.join(OUT, "kernels_gpu.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    global OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--keep", type=float, default=0.03)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 8, 16, 32])
    ap.add_argument("--skip-checks", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    args = ap.parse_args()
    OUT = args.out
    os.makedirs(OUT, exist_ok=True)
    dev = jax.devices()[0]
    RESULTS.update(device=getattr(dev, "device_kind", str(dev)), platform=dev.platform,
                   jax_version=jax.__version__,
                   jaxlib_version=getattr(__import__("jaxlib"), "__version__", None),
                   python=platform.python_version(),
                   timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   args=vars(args))
    try:
        import triton  # noqa: F401
        RESULTS["triton_version"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    print(f"device={RESULTS['device']} jax={jax.__version__}", flush=True)
    if not args.skip_checks:
        check_all(seed=int(time.time()) % 1000)
    if not args.skip_timing:
        timing(args)
    save()
    write_md()
    print(open(os.path.join(OUT, "kernels_gpu.md")).read())
    if RESULTS["failures"]:
        print(f"!!!!!!!! {len(RESULTS['failures'])} FAILURE(S) — see above and kernels_gpu.json")


if __name__ == "__main__":
    main()
