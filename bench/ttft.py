"""Time to first token: full re-prefill of a long context vs restoring its snapshot.

For each (model, context): a random-weight model of the given config (speed does
not depend on the values), a context of random token ids and a 32-token
question tail. Measured, each as the median of ``--reps`` runs after one warm-up
run (compilation excluded; the warm-up's time is reported separately):

- ``reprefill``: prefill context + tail, sample the first token.
- ``restore``: load the context's snapshot from local disk onto the device
  (checksums verified, and not), prefill the tail, sample the first token.

The snapshot is read right after being written, so it comes from the OS page
cache unless ``--drop-caches`` succeeds (root on Linux); the JSON says which.

    python bench/ttft.py --runs smollm2:2048 smollm2:8192 llama3-8b:32768 --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alaya_jax.engine import Engine
from alaya_jax.sampling import SamplingConfig
from checkpoints import load_snapshot, save_snapshot

TAIL = 32
ONE = SamplingConfig(max_new_tokens=1)


def build(name: str, context: int):
    from models import Llama, llama3_8b, smollm2_135m

    cfg = smollm2_135m(dtype="bfloat16") if name == "smollm2" else llama3_8b(dtype="bfloat16")
    cfg = dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings, context + 2 * TAIL))
    return cfg, Llama(cfg, rngs=nnx.Rngs(0))


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def first_token(engine, prompt, caches=None, capacity=None):
    res, _ = engine.generate([prompt], sampling=ONE, caches=caches, capacity=capacity)
    return res[0]


def run_one(model_name, context, args, log):
    cfg, model = build(model_name, context)
    engine = Engine(model, block_size=64, prefill_chunk=args.prefill_chunk)
    rng = np.random.default_rng(context)
    ctx = rng.integers(0, cfg.vocab_size, size=context).tolist()
    tail = rng.integers(0, cfg.vocab_size, size=TAIL).tolist()
    capacity = context + TAIL + 8
    rec = {"model": model_name, "context": context, "tail": TAIL, "dtype": cfg.dtype, "layers": cfg.num_layers}
    # --- re-prefill
    t = time.perf_counter()
    first_token(engine, ctx + tail, capacity=capacity)
    rec["reprefill_first_run_incl_compile_s"] = time.perf_counter() - t
    ts = []
    for _ in range(args.reps):
        t = time.perf_counter()
        first_token(engine, ctx + tail, capacity=capacity)
        ts.append(time.perf_counter() - t)
    rec["reprefill_ttft_s"] = float(np.median(ts))
    log(f"{model_name} {context}: re-prefill TTFT {rec['reprefill_ttft_s']:.3f}s (first run "
        f"{rec['reprefill_first_run_incl_compile_s']:.1f}s)")
    # --- snapshot of the context
    caches = engine.new_caches(batch=1, capacity=capacity)
    caches, _, _ = engine.prefill(caches, [ctx])
    jax.block_until_ready(caches)
    root = tempfile.mkdtemp(prefix="alaya_ttft_", dir=args.tmp)
    path = os.path.join(root, "snap")
    t = time.perf_counter()
    save_snapshot(path, caches, ctx, model_fingerprint="bench-" + model_name, tokenizer_fingerprint="bench")
    rec["save_s"] = time.perf_counter() - t
    rec["snapshot_bytes"] = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    del caches
    # --- restore (+ tail prefill + first token)
    for verify in (True, False):
        key = "restore_verified" if verify else "restore_unverified"
        times, loads, dropped = [], [], []
        for i in range(args.reps + 1):
            dropped.append(drop_caches() if args.drop_caches else False)
            t = time.perf_counter()
            restored, toks, _ = load_snapshot(path, expect_model="bench-" + model_name, capacity=capacity,
                                              verify=verify)
            jax.block_until_ready(restored)
            tl = time.perf_counter() - t
            first_token(engine, tail, caches=restored, capacity=capacity)
            tt = time.perf_counter() - t
            del restored
            if i > 0:  # the first run warms the tail-prefill compile
                times.append(tt)
                loads.append(tl)
        rec[key + "_ttft_s"] = float(np.median(times))
        rec[key + "_load_s"] = float(np.median(loads))
        rec[key + "_load_GBps"] = rec["snapshot_bytes"] / rec[key + "_load_s"] / 1e9
        rec[key + "_page_cache_dropped"] = all(dropped[1:])
        rec[key + "_speedup"] = rec["reprefill_ttft_s"] / rec[key + "_ttft_s"]
        log(f"  {key}: TTFT {rec[key + '_ttft_s']:.3f}s (load {rec[key + '_load_s']:.3f}s, "
            f"{rec[key + '_load_GBps']:.2f} GB/s) → {rec[key + '_speedup']:.1f}× vs re-prefill")
    shutil.rmtree(root, ignore_errors=True)
    del model, engine
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", default=["smollm2:2048", "smollm2:8192", "llama3-8b:32768"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--drop-caches", action="store_true")
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import orbax.checkpoint as ocp

    meta = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "orbax": getattr(ocp, "__version__", "?"), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": os.environ.get("ALAYA_COMMIT", "unknown"), "reps": args.reps}
    rows = []

    def log(m):
        print(m, flush=True)

    for spec in args.runs:
        name, ctx = spec.split(":")
        try:
            rows.append(run_one(name, int(ctx), args, log))
        except Exception as e:  # reported in the results, not hidden
            rows.append({"model": name, "context": int(ctx), "error": f"{type(e).__name__}: {str(e)[:400]}"})
            log(f"{spec} FAILED: {rows[-1]['error']}")
        with open(os.path.join(args.out, "ttft.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    md = [f"# Time to first token: re-prefill vs snapshot restore (bench/ttft.py)", "",
          f"{meta['device']}, jax {meta['jax']}, orbax {meta['orbax']}, {meta['date']}, commit {meta['commit']}. "
          f"Random-weight bf16 models; context of random ids + {TAIL}-token tail; median of {args.reps} after a "
          "warm-up (compile excluded). Restore = Orbax load onto the device + tail prefill + first token.", "",
          "| model | context | re-prefill TTFT s | restore TTFT s (verified) | × | restore TTFT s (no checksum) | × | snapshot GB | load GB/s (unverified) | page cache dropped |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            md.append(f"| {r['model']} | {r['context']} | failed: {r['error'][:150]} |||||||")
            continue
        md.append(f"| {r['model']} | {r['context']} | {r['reprefill_ttft_s']:.3f} | {r['restore_verified_ttft_s']:.3f} | "
                  f"{r['restore_verified_speedup']:.1f} | {r['restore_unverified_ttft_s']:.3f} | "
                  f"{r['restore_unverified_speedup']:.1f} | {r['snapshot_bytes'] / 1e9:.2f} | "
                  f"{r['restore_unverified_load_GBps']:.2f} | {r['restore_unverified_page_cache_dropped']} |")
    with open(os.path.join(args.out, "ttft.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
