"""Filter-refine DIPR kernels on the GPU: the code scan and refine-and-attend vs dense cuDNN.

    PYTHONUNBUFFERED=1 python -m bench.kernels_codes_gpu --out $OUT          # on the device
    python -m bench.kernels_codes_gpu --smoke --out /tmp/x                    # CPU, tiny, interpret mode
    python -m bench.kernels_codes_gpu --check-lowering                        # CPU: Pallas -> Triton IR at 8B shapes

Llama-3-8B attention shapes (Hq 32, Hkv 8, D 128, bf16), synthetic Gaussian keys (a GQA group's queries
share a direction; the last window key is a strong match for it) whose candidate
fraction is set by choosing β per KV head (the quantile of max_g(est + δ - M_sw') that leaves the
requested fraction), sink 4, window 64. Per case: the scan kernel alone, the refine kernel alone
(on the scan's candidates, m_base = M_lb), the whole DIPR API (scan -> max pass -> refine with
the exact M, with the wrapper's small XLA ops), and dense jax.nn.dot_product_attention(implementation="cudnn") on
[B, S, Hkv, D]. Each is timed per layer inside one jit over L layers with their own data (so
neither dispatch nor L2 reuse flatters it), median of --reps runs. The scan's bandwidth counts
the bytes of codes + scales + errs it must read; the copy bandwidth (a + 1 over 2 GiB, read +
write) is measured in the same run. Writes kernels_codes_gpu.json and .md under --out.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
import traceback


import jax
import jax.numpy as jnp
import numpy as np

from bench import harness

HQ, HKV, D = 32, 8, 128
G = HQ // HKV
SINK, WINDOW = 4, 64
PLANT = 5.0 * math.sqrt(D)  # planted window key: score ≈ 5x the spread ‖q‖ of the Gaussian keys' scores
DT = jnp.bfloat16
RESULTS: dict = {"cases": [], "tuning": [], "checks": [], "failures": []}


def save(out):
    harness.write_json(os.path.join(out, "kernels_codes_gpu.json"), RESULTS)


def fail(what, e, out):
    tb = traceback.format_exc()
    print(f"!!!!!!!! FAILURE in {what}: {type(e).__name__}: {e}\n{tb[-3000:]}", flush=True)
    RESULTS["failures"].append({"what": what, "error": f"{type(e).__name__}: {e}", "traceback": tb[-6000:]})
    save(out)


# ----------------------------------------------------------------------------- data

def make_layer(key, b, s):
    """One layer's store: q [B,Hq,D], q_rot, keys/values [B,Hkv,S,D] bf16, codes/scales/errs,
    and the cuDNN layout copies [B,S,Hkv,D]."""
    from pallas_kernels.key_codes import encode, rotate, rotation_signs

    k1, k2, k3 = jax.random.split(key, 3)
    signs = jnp.asarray(rotation_signs(HKV, D, seed=0))

    @jax.jit
    def gen(k1, k2, k3):
        keys = jax.random.normal(k1, (b, s, HKV, D), jnp.float32)  # [B,S,Hkv,D]
        values = jax.random.normal(k2, (b, s, HKV, D), jnp.float32).astype(DT)
        # a GQA group's queries share a direction (as real ones do), and the last (window) key is
        # a strong match for it (5x the score spread), as real windows hold the arg-max
        ka, kb = jax.random.split(k3)
        base = jax.random.normal(ka, (b, HKV, 1, D), jnp.float32)
        q = (base + 0.25 * jax.random.normal(kb, (b, HKV, G, D), jnp.float32)).reshape(b, HQ, D).astype(DT)
        unit = base[:, :, 0] / jnp.linalg.norm(base[:, :, 0], axis=-1, keepdims=True)
        keys = keys.at[:, s - 1].set(PLANT * unit).astype(DT)
        codes, scales, errs = encode(rotate(keys, signs))
        q_rot = rotate(q.reshape(b, HKV, G, D).swapaxes(1, 2), signs).swapaxes(1, 2).reshape(b, HQ, D)
        t = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  [B,S,Hkv,...] -> [B,Hkv,S,...]
        return dict(q=q, q_rot=q_rot, keys=t(keys), values=t(values), codes=t(codes), scales=t(scales),
                    errs=t(errs), keys_bshd=keys, values_bshd=values)

    return gen(k1, k2, k3)


def calibrate_beta(lay, lengths, frac):
    """β [B, Hq] per KV head so that ~frac of the searched keys are candidates (shared by the group)."""
    from pallas_kernels.code_scan.reference import forced_scores
    from pallas_kernels.common import default_rounding_slack
    from pallas_kernels.key_codes import bound_from_norms, estimate, query_norms

    @jax.jit
    def margins(lay, lengths):
        b = lay["q"].shape[0]
        _, _, _, s_lo = forced_scores(lay["q"], lay["keys"], lengths, sink=SINK, window=WINDOW,
                                      rounding_slack=default_rounding_slack(D))
        thr = jnp.max(s_lo, -1)  # [B, Hkv, G]
        qr = lay["q_rot"].reshape(b, HKV, G, D)
        est = estimate(qr, lay["codes"], lay["scales"])
        l1, l2 = query_norms(qr)
        delta = bound_from_norms(l1[..., None], l2[..., None], lay["scales"][:, :, None],
                                 lay["errs"][:, :, None], D)
        m = jnp.max(est + delta - thr[..., None], axis=2)  # [B, Hkv, S]
        s = m.shape[-1]
        pos = jnp.arange(s)
        searched = (pos >= SINK) & (pos < (lengths[:, None] - WINDOW))
        m = jnp.where(searched[:, None], m, -jnp.inf)
        return jnp.quantile(m, 1.0 - frac * (s - SINK - WINDOW) / s, axis=-1)  # [B, Hkv] (full lengths)

    qv = margins(lay, lengths)
    beta = jnp.maximum(-qv, 0.0)
    return jnp.repeat(beta, G, axis=1).astype(jnp.float32)


# ----------------------------------------------------------------------------- timing

def median_us(fn, args, reps, warm=2):
    for _ in range(warm):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts) * 1e6), float(np.min(ts) * 1e6)


def per_layer_us(step, layer_args, reps):
    """One jit running ``step`` once per layer (each layer its own data); µs per layer (median, min)."""
    fn = jax.jit(lambda all_args: [step(*a) for a in all_args])
    med, mn = median_us(fn, (layer_args,), reps)
    n = len(layer_args)
    return med / n, mn / n


def num_splits_for(b, s, tile, target_programs):
    ns = 1
    while b * HKV * ns < target_programs and s // (tile * ns) >= 4:
        ns *= 2
    return ns


def capacity_for(s, ns, frac):
    per = s / ns
    return int(-(-(2.0 * frac * per + 128) // 64) * 64)


# ----------------------------------------------------------------------------- one case

def run_case(args, *, b, s, frac, tile, warps, stages, layers, key, check=False, label="case", scan_only=False):
    from pallas_kernels.code_scan import code_scan
    from pallas_kernels.code_scan.api import pallas_scan_inputs
    from pallas_kernels.code_scan.kernel_triton import code_scan_pallas
    from pallas_kernels.common import default_rounding_slack
    from pallas_kernels.refine_attention import refine_attention, refine_max
    from pallas_kernels.refine_attention.api import pallas_refine_inputs
    from pallas_kernels.refine_attention.kernel_triton import refine_attention_pallas

    interp = args.smoke
    lengths = jnp.full((b,), s, jnp.int32)
    lays = [make_layer(k, b, s) for k in jax.random.split(key, layers)]
    betas = [calibrate_beta(lay, lengths, frac) for lay in lays]
    ns = num_splits_for(b, s, tile, args.target_programs)
    cap = capacity_for(s, ns, frac)
    slack = default_rounding_slack(D)
    scan_kw = dict(sink=SINK, window=WINDOW, num_splits=ns, capacity=cap, tile_size=tile)
    knobs = dict(num_warps=warps, num_stages=stages)
    impl = dict(implementation="pallas", interpret=True if interp else None)

    def scan_api(lay, beta):
        return code_scan(lay["q"], lay["q_rot"], lay["keys"], lay["codes"], lay["scales"], lay["errs"], lengths,
                         beta, **scan_kw, **impl, **knobs)

    def dipr_api(lay, beta):
        cidx, counts, lb_max, m_sw = scan_api(lay, beta)
        m_lb = jnp.maximum(m_sw, jnp.max(lb_max, axis=-1))
        m = refine_max(lay["q"], lay["keys"], cidx, counts, lengths, sink=SINK, window=WINDOW, **impl)
        out, m_seen, n = refine_attention(lay["q"], lay["keys"], lay["values"], cidx, counts, lengths, m, beta,
                                          sink=SINK, window=WINDOW, **impl)
        return out, m_seen, n, m_lb, counts

    first = jax.jit(dipr_api)(lays[0], betas[0])  # also compiles the refine for the stats below
    out0, m_seen0, n0, m_lb0, counts0 = first
    searched = b * HKV * (s - SINK - WINDOW)
    row = dict(label=label, batch=b, context=s, target_candidate_fraction=frac, tile=tile, num_warps=warps,
               num_stages=stages, num_splits=ns, capacity=cap, layers=layers,
               beta_mean=float(jnp.mean(betas[0])),
               candidate_fraction=float(jnp.sum(counts0)) / searched,
               true_fraction=float(jnp.mean(n0 - (SINK + WINDOW))) / (s - SINK - WINDOW),
               overflow_splits=int(jnp.sum(counts0 > cap)),
               heads_exact_in_one_pass=float(jnp.mean(m_seen0 == m_lb0)))

    if check:  # the kernels vs the jnp references at this shape
        cr = jax.jit(functools.partial(code_scan, **scan_kw))(
            lays[0]["q"], lays[0]["q_rot"], lays[0]["keys"], lays[0]["codes"], lays[0]["scales"], lays[0]["errs"],
            lengths, betas[0])
        cp = jax.jit(scan_api)(lays[0], betas[0])
        same = float(jnp.mean(cr[1] == cp[1]))
        cnt_rel = float(jnp.max(jnp.abs(cr[1] - cp[1]))) / max(1.0, float(jnp.max(cr[1])))
        m_lb = jnp.maximum(cr[3], jnp.max(cr[2], axis=-1))
        rr = jax.jit(functools.partial(refine_attention, sink=SINK, window=WINDOW))(
            lays[0]["q"], lays[0]["keys"], lays[0]["values"], cr[0], cr[1], lengths, m_lb, betas[0])
        rp = jax.jit(functools.partial(refine_attention, sink=SINK, window=WINDOW, **impl))(
            lays[0]["q"], lays[0]["keys"], lays[0]["values"], cr[0], cr[1], lengths, m_lb, betas[0])
        o_r, o_p = (np.asarray(x[0].astype(jnp.float32), np.float64) for x in (rr, rp))
        chk = dict(label=label, batch=b, context=s, scan_counts_equal_share=same, scan_counts_max_rel_diff=cnt_rel,
                   m_sw_max_abs_diff=float(jnp.max(jnp.abs(cr[3] - cp[3]))),
                   refine_out_rel_err=float(np.linalg.norm(o_p - o_r) / max(np.linalg.norm(o_r), 1e-30)),
                   refine_m_seen_max_abs_diff=float(jnp.max(jnp.abs(rr[1] - rp[1]))),
                   refine_n_attended_equal_share=float(jnp.mean(rr[2] == rp[2])),
                   any_nan=bool(np.isnan(o_p).any()))
        chk["ok"] = (chk["scan_counts_max_rel_diff"] <= 0.01 and chk["refine_out_rel_err"] <= 2e-2
                     and not chk["any_nan"] and chk["refine_n_attended_equal_share"] >= 0.97)
        print("CHECK", json.dumps(chk), flush=True)
        RESULTS["checks"].append(chk)

    # raw kernels on prepared operands
    scan_in = [pallas_scan_inputs(l_["q"], l_["q_rot"], l_["keys"], l_["codes"], l_["scales"], l_["errs"], lengths,
                                  bt, rounding_slack=slack, **scan_kw) for l_, bt in zip(lays, betas)]
    static = scan_in[0][1]
    scan_k = lambda *a: code_scan_pallas(*a, interpret=interp, **knobs, **static)  # noqa: E731
    scan_us, scan_min = per_layer_us(scan_k, [a for a, _ in scan_in], args.reps)
    row["scan_us"], row["scan_us_min"] = round(scan_us, 2), round(scan_min, 2)
    scan_bytes = b * HKV * s * (D // 2 + 2 + 2)
    row["scan_bytes"] = scan_bytes
    row["scan_TBps"] = round(scan_bytes / (scan_us * 1e-6) / 1e12, 3)

    if scan_only:  # tuning rows: the scan kernel alone
        print("ROW", json.dumps(row), flush=True)
        return row
    ref_in = []
    for l_, bt in zip(lays, betas):
        cidx, counts, lb_max, m_sw = jax.jit(scan_api)(l_, bt)
        m_lb = jnp.maximum(m_sw, jnp.max(lb_max, axis=-1))
        ref_in.append(pallas_refine_inputs(l_["q"], l_["keys"], l_["values"], cidx, counts, lengths, m_lb, bt,
                                           sink=SINK, window=WINDOW, chunk=64, sm_scale=1 / math.sqrt(D),
                                           rounding_slack=slack))
    rstatic = ref_in[0][1]
    ref_k = lambda *a: refine_attention_pallas(*a, interpret=interp, **rstatic)  # noqa: E731
    ref_us, ref_min = per_layer_us(ref_k, [a for a, _ in ref_in], args.reps)
    row["refine_us"], row["refine_us_min"] = round(ref_us, 2), round(ref_min, 2)
    # the refine's worst case at this candidate count: every candidate in range (V of all of them read)
    all_in = [(*a[:5], jnp.full_like(a[5], -jnp.inf), *a[6:]) for a, _ in ref_in]
    row["refine_all_in_range_us"] = round(per_layer_us(ref_k, all_in, args.reps)[0], 2)

    dipr_us, dipr_min = per_layer_us(lambda lay, bt: dipr_api(lay, bt)[0], list(zip(lays, betas)), args.reps)
    row["dipr_us"], row["dipr_us_min"] = round(dipr_us, 2), round(dipr_min, 2)

    def cudnn(lay):
        q = lay["q"][:, None]  # [B, 1, Hq, D]
        impl_d = "xla" if args.smoke else "cudnn"
        return jax.nn.dot_product_attention(q, lay["keys_bshd"], lay["values_bshd"], implementation=impl_d)

    dense_us, dense_min = per_layer_us(cudnn, [(l_,) for l_ in lays], args.reps)
    row["dense_impl"] = "xla" if args.smoke else "cudnn"
    row["dense_us"], row["dense_us_min"] = round(dense_us, 2), round(dense_min, 2)
    dense_bytes = 2 * b * HKV * s * D * 2
    row["dense_TBps"] = round(dense_bytes / (dense_us * 1e-6) / 1e12, 3)
    row["speedup_dipr_vs_dense"] = round(dense_us / dipr_us, 3)
    row["speedup_kernels_vs_dense"] = round(dense_us / (scan_us + ref_us), 3)
    print("ROW", json.dumps(row), flush=True)
    del lays
    return row


def write_md(out):
    m = RESULTS["meta"]
    lines = [
        "# Filter-refine DIPR kernels (code scan + refine-and-attend) vs dense cuDNN",
        "",
        f"Device {m['device']}, jax {m['jax']}, jaxlib {m.get('jaxlib')}, triton {m.get('triton')}, "
        f"{m['date']}. Llama-3-8B attention shapes (Hq 32, Hkv 8, D 128, bf16), synthetic Gaussian keys (group "
        "queries share a direction, a strong planted window key), "
        f"β set per KV head for the target candidate fraction, sink {SINK}, window {WINDOW}. "
        f"Copy bandwidth in this run (a+1, 2 GiB, read+write): {RESULTS.get('copy_TBps', float('nan')):.2f} TB/s. "
        "Times are µs per layer inside one jit over L layers with their own data (median of runs).",
        "",
        "| B | context | target cand. | cand. | in range | splits | cap | scan µs | scan TB/s | % copy BW | "
        "refine µs | refine µs, all in range | DIPR API µs | cuDNN µs | × dense (API) | × dense (kernels) | 1-pass "
        "exact heads |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    bw = RESULTS.get("copy_TBps", float("nan"))
    for r in RESULTS["cases"]:
        lines.append(
            f"| {r['batch']} | {r['context'] // 1024}K | {100 * r['target_candidate_fraction']:.0f}% | "
            f"{100 * r['candidate_fraction']:.1f}% | {100 * r['true_fraction']:.2f}% | {r['num_splits']} | "
            f"{r['capacity']} | {r['scan_us']:.1f} | {r['scan_TBps']:.2f} | {100 * r['scan_TBps'] / bw:.0f}% | "
            f"{r['refine_us']:.1f} | {r['refine_all_in_range_us']:.1f} | {r['dipr_us']:.1f} | {r['dense_us']:.1f} | "
            f"{r['speedup_dipr_vs_dense']:.2f} | "
            f"{r['speedup_kernels_vs_dense']:.2f} | {100 * r['heads_exact_in_one_pass']:.0f}% |")
    if RESULTS["tuning"]:
        lines += ["", "Scan tuning (B=1, 128K, 5% candidates): tile / warps / stages -> µs, TB/s", ""]
        for t in RESULTS["tuning"]:
            lines.append(f"- tile {t['tile']}, warps {t['num_warps']}, stages {t['num_stages']}: "
                         f"{t['scan_us']:.1f} µs, {t['scan_TBps']:.2f} TB/s")
    if RESULTS["checks"]:
        lines += ["", "Kernel vs jnp reference at bench shapes:", ""]
        for c in RESULTS["checks"]:
            lines.append(f"- {c['label']}: ok={c['ok']}, scan counts equal {100 * c['scan_counts_equal_share']:.1f}%, "
                         f"refine rel err {c['refine_out_rel_err']:.2e}, n_attended equal "
                         f"{100 * c['refine_n_attended_equal_share']:.1f}%")
    if RESULTS["failures"]:
        lines += ["", "FAILURES:", ""] + [f"- {f['what']}: {f['error']}" for f in RESULTS["failures"]]
    harness.write_text(os.path.join(out, "kernels_codes_gpu.md"), "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def check_lowering():
    """CPU only: lower both kernels to Triton IR for the cuda platform at 8B shapes (no Triton compile)."""
    import importlib

    from jax import export

    csa = importlib.import_module("pallas_kernels.code_scan.api")
    raa = importlib.import_module("pallas_kernels.refine_attention.api")

    force = lambda interpret, op: False  # noqa: E731  (private: skip the backend check, lowering only)
    csa.resolve_interpret = raa.resolve_interpret = force
    sds = jax.ShapeDtypeStruct
    dis = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for b, s, ns in ((1, 32768, 32), (1, 1 << 19, 64), (8, 1 << 17, 8)):
        cap = 512
        scan_args = (sds((b, HQ, D), DT), sds((b, HQ, D), jnp.float32), sds((b, HKV, s, D), DT),
                     sds((b, HKV, s, D // 2), jnp.uint8), sds((b, HKV, s), jnp.float16),
                     sds((b, HKV, s), jnp.float16), sds((b,), jnp.int32), sds((b, HQ), jnp.float32))
        f = functools.partial(csa.code_scan, sink=SINK, window=WINDOW, num_splits=ns, capacity=cap,
                              implementation="pallas")
        e = export.export(jax.jit(f), platforms=("cuda",), disabled_checks=dis)(*scan_args)
        ref_args = (sds((b, HQ, D), DT), sds((b, HKV, s, D), DT), sds((b, HKV, s, D), DT),
                    sds((b, HKV, ns, cap), jnp.int32), sds((b, HKV, ns), jnp.int32), sds((b,), jnp.int32),
                    sds((b, HQ), jnp.float32), sds((b, HQ), jnp.float32))
        g = functools.partial(raa.refine_attention, sink=SINK, window=WINDOW, implementation="pallas")
        e2 = export.export(jax.jit(g), platforms=("cuda",), disabled_checks=dis)(*ref_args)
        h = functools.partial(raa.refine_max, sink=SINK, window=WINDOW, implementation="pallas")
        e3 = export.export(jax.jit(h), platforms=("cuda",), disabled_checks=dis)(*ref_args[:2], *ref_args[3:6])
        print(f"lowered for cuda: B={b} S={s} NS={ns}: scan {len(e.mlir_module())} chars, "
              f"refine {len(e2.mlir_module())} chars, max pass {len(e3.mlir_module())} chars", flush=True)


def main(argv=None):
    p = harness.parser(__doc__.splitlines()[0], "kernels_codes_gpu", smoke="CPU, tiny sizes, interpret mode")
    p.add_argument("--check-lowering", action="store_true")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--target-programs", type=int, default=512)
    p.add_argument("--no-tune", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="a wider scan sweep (tile 64-512, warps 2-8) and three cases (128K, 512K, B=8 at 128K)")
    args = p.parse_args(argv)
    if args.check_lowering:
        check_lowering()
        return
    if not args.smoke and jax.default_backend() != "gpu":
        raise SystemExit("kernels_codes_gpu: needs a GPU (or --smoke / --check-lowering on CPU)")
    RESULTS["meta"] = harness.run_meta(smoke=args.smoke, hq=HQ, hkv=HKV, d=D, sink=SINK, window=WINDOW,
                                       dtype="bfloat16")
    print("META", json.dumps(RESULTS["meta"]), flush=True)
    key = jax.random.PRNGKey(0)
    if args.smoke:
        args.reps = 2
        RESULTS["copy_TBps"] = float("nan")
        cases = [dict(b=1, s=2048, frac=0.05, layers=2, check=True), dict(b=2, s=1024, frac=0.1, layers=1)]
        tile, warps, stages = 128, 4, 2
    else:
        RESULTS["copy_TBps"] = harness.measure_copy_bandwidth(2 << 30, iters=args.reps) / 1e12
        print(f"copy bandwidth {RESULTS['copy_TBps']:.3f} TB/s", flush=True)
        tile, warps, stages = 256, 4, 3
        if not args.no_tune:
            best = None
            sweep = ((128, 4, 3), (256, 4, 3), (256, 8, 3), (512, 8, 3))
            if args.quick:
                sweep = ((64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 4, 3))
            for t, w, st in sweep:
                try:
                    r = run_case(args, b=1, s=1 << 17, frac=0.05, tile=t, warps=w, stages=st, layers=4,
                                 key=key, label=f"tune t{t} w{w} s{st}", scan_only=True)
                    RESULTS["tuning"].append(r)
                    save(args.out)
                    if best is None or r["scan_us"] < best[0]:
                        best = (r["scan_us"], t, w, st)
                except Exception as e:  # noqa: BLE001
                    fail(f"tune tile={t} warps={w} stages={st}", e, args.out)
            if best:
                _, tile, warps, stages = best
        RESULTS["chosen"] = dict(tile=tile, num_warps=warps, num_stages=stages)
        cases = [dict(b=1, s=1 << 15, frac=0.05, layers=12, check=True),
                 dict(b=1, s=1 << 17, frac=0.02, layers=6), dict(b=1, s=1 << 17, frac=0.05, layers=6, check=True),
                 dict(b=1, s=1 << 17, frac=0.10, layers=6),
                 dict(b=1, s=1 << 19, frac=0.05, layers=3), dict(b=1, s=1 << 19, frac=0.02, layers=3),
                 dict(b=8, s=1 << 17, frac=0.05, layers=3, check=True)]
        if args.quick:
            cases = [cases[2], cases[4], cases[6]]
    for c in cases:
        try:
            r = run_case(args, b=c["b"], s=c["s"], frac=c["frac"], tile=tile, warps=warps, stages=stages,
                         layers=c["layers"], key=jax.random.fold_in(key, c["s"] + c["b"]), check=c.get("check", False),
                         label=f"B{c['b']} S{c['s']} f{c['frac']}")
            RESULTS["cases"].append(r)
        except Exception as e:  # noqa: BLE001
            fail(f"case {c}", e, args.out)
        save(args.out)
    write_md(args.out)
    save(args.out)
    if RESULTS["failures"]:
        raise SystemExit(f"{len(RESULTS['failures'])} failure(s); see kernels_codes_gpu.json")


if __name__ == "__main__":
    main()
