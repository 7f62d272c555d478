"""Where a DIPR decode step's time goes: a JAX profiler trace, summarised per kernel.

Same inputs as bench/decode_attention.py (Llama-3-8B shapes, block-clustered keys,
L layers in one jit). For each variant the jitted L-layer call runs under
``jax.profiler.trace`` (CUPTI on GPU); the Perfetto trace is parsed and every
device event is aggregated by name: count per layer, total µs per layer, share of
the device-busy time. ``busy`` is the union of device event intervals; ``idle`` =
wall time of the call − busy, i.e. launch gaps and host work between kernels.

    python bench/profile_decode.py --context 131072 --layers 8 --out $OUT
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import gzip
import json
import math
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import decode_attention as da  # noqa: E402  (the inputs and the layered harness)

from alaya_jax import kv_store  # noqa: E402
from alaya_jax.dipr_store import dipr_store_attention  # noqa: E402


def trace_events(fn, args, reps: int):
    """Run ``fn(*args)`` ``reps`` times under the profiler; (device events, host events, wall µs per call)."""
    jax.block_until_ready(fn(*args))  # compile + warm
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(reps):
                jax.block_until_ready(fn(*args))
        wall = (time.perf_counter() - t) / reps * 1e6
        paths = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
        if not paths:
            raise RuntimeError(f"the profiler wrote no perfetto_trace.json.gz under {d}")
        with gzip.open(paths[0], "rt") as f:
            tr = json.load(f)
    evs = tr["traceEvents"] if isinstance(tr, dict) else tr
    pname = {e["pid"]: e["args"]["name"] for e in evs if e.get("ph") == "M" and e.get("name") == "process_name"}
    dev = [e for e in evs if e.get("ph") == "X" and "GPU" in pname.get(e.get("pid"), "").upper()]
    host = [e for e in evs if e.get("ph") == "X" and "GPU" not in pname.get(e.get("pid"), "").upper()]
    return dev, host, wall, sorted(set(pname.values()))


def summarise(dev, reps: int, layers: int, wall_us: float) -> dict:
    by = collections.defaultdict(lambda: [0, 0.0])
    iv = []
    for e in dev:
        by[e["name"]][0] += 1
        by[e["name"]][1] += float(e.get("dur", 0.0))
        iv.append((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))))
    iv.sort()
    busy, end = 0.0, -math.inf
    for a, b in iv:  # union of intervals (kernels of several streams may overlap)
        if b > end:
            busy += b - max(a, end)
            end = b
    n = reps * layers
    kernels = sorted(({"name": k, "per_layer": c / n, "us_per_layer": t / n} for k, (c, t) in by.items()),
                     key=lambda r: -r["us_per_layer"])
    return {"wall_us_per_layer": wall_us / layers, "device_busy_us_per_layer": busy / n,
            "device_events_per_layer": len(dev) / n, "kernels": kernels}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--beta", type=float, default=45.0)
    ap.add_argument("--planted", type=int, default=4)
    ap.add_argument("--implementation", default="pallas")
    ap.add_argument("--target-programs", type=int, default=128)
    ap.add_argument("--tag", default="", help="suffix of the output names (e.g. for an XLA_FLAGS variant)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    b, s, nl = args.batch, args.context, args.layers
    keys = jax.random.split(jax.random.PRNGKey(s * 31 + b), nl)
    qs, stores = [], []
    for i in range(nl):
        q, k, v = da.make_layer(keys[i], b, s, planted=args.planted, centre_scale=1.0, noise=0.03, q_norm=15.0)
        qs.append(q)
        stores.append(kv_store.with_summary_dtype(kv_store.from_dense(k, v, block_size=da.BK), da.DT))
        del k, v
    cap = max(8, int(math.ceil(0.10 * s / da.BK)))
    nsplit = max(1, args.target_programs // (b * da.HKV))
    res = {"meta": {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
                    "jax": jax.__version__, "python": platform.python_version(), "commit": da_commit(),
                    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "context": s, "batch": b, "layers": nl, "reps": args.reps, "beta": args.beta,
                    "num_splits": nsplit, "max_kept_blocks": cap}, "variants": {}}
    variants = {}
    for name, sp, c in (("dipr_single_pass", True, cap), ("dipr_two_pass", False, cap),
                        ("dipr_two_pass_cap_all", False, None)):
        def f(q, st, sp=sp, c=c):
            return dipr_store_attention(q, st, beta=args.beta, sink=4, window=64, top_r=4, max_kept_blocks=c,
                                        implementation=args.implementation, num_splits=nsplit, single_pass=sp)[0]
        variants[name] = (da.layered(f), (qs, stores))
    dense = [(jnp.array(st.dense_keys().transpose(0, 2, 1, 3)), jnp.array(st.dense_values().transpose(0, 2, 1, 3)))
             for st in stores]
    fns = da.dense_fns()
    variants["dense_cudnn"] = (da.layered(fns["dense_cudnn"]), (qs, dense))
    variants["dense_jnp"] = (da.layered(fns["dense_jnp"]), (qs, dense))
    res["meta"]["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    lines = [f"# Profile of one decode attention call per layer (bench/profile_decode.py)", "",
             f"{res['meta']['device']}, jax {jax.__version__}, {res['meta']['date']}, commit {res['meta']['commit']}. "
             f"Llama-3-8B shapes, B={b}, context {s}, {nl} layers in one jit, block-clustered keys (as "
             f"decode_attention.md), β={args.beta}, split-K {nsplit}, kept-list capacity {cap}. Trace of {args.reps} "
             f"calls; times are per layer. Wall is measured around the traced calls (the profiler adds a lot: "
             f"use decode_attention.md for times). XLA_FLAGS: `{os.environ.get('XLA_FLAGS', '')}`.", ""]
    for name, (fn, a) in variants.items():
        try:
            dev, host, wall, procs = trace_events(fn, a, args.reps)
            summ = summarise(dev, args.reps, nl, wall)
            summ["processes"] = procs
        except Exception as e:  # reported, not hidden
            res["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:400]}"}
            lines += [f"## {name}", "", f"failed: {res['variants'][name]['error']}", ""]
            print(name, res["variants"][name], flush=True)
            continue
        res["variants"][name] = summ
        lines += [f"## {name}", "",
                  f"wall {summ['wall_us_per_layer']:.1f} µs/layer; device busy {summ['device_busy_us_per_layer']:.1f} "
                  f"µs/layer; {summ['device_events_per_layer']:.1f} device events per layer.", "",
                  "| kernel | per layer | µs/layer | share of busy |", "|---|---|---|---|"]
        busy = max(summ["device_busy_us_per_layer"], 1e-9)
        for k in summ["kernels"][:25]:
            lines.append(f"| `{k['name'][:90]}` | {k['per_layer']:.2f} | {k['us_per_layer']:.2f} | "
                         f"{k['us_per_layer'] / busy:.0%} |")
        lines.append("")
        print(name, {k: v for k, v in summ.items() if k != "kernels"}, flush=True)
    os.makedirs(args.out, exist_ok=True)
    tag = f"b{b}_{s}" + (f"_{args.tag}" if args.tag else "")
    with open(os.path.join(args.out, f"profile_decode_{tag}.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(args.out, f"profile_decode_{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


def da_commit() -> str:
    import subprocess
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
