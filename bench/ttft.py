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
from checkpoints import load_snapshot, save_snapshot, verify_checksums

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


def timed(fn, reps):
    """(first run s, median of ``reps`` further runs s)."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return first, float(np.median(ts))


def read_all(path):
    n = 0
    for r, _, fs in os.walk(path):
        for f in fs:
            with open(os.path.join(r, f), "rb", buffering=0) as fh:
                while True:
                    b = fh.read(1 << 24)
                    if not b:
                        break
                    n += len(b)
    return n


def run_one(model_name, context, args, log):
    cfg, model = build(model_name, context)
    rng = np.random.default_rng(context)
    ctx = rng.integers(0, cfg.vocab_size, size=context).tolist()
    tail = rng.integers(0, cfg.vocab_size, size=TAIL).tolist()
    capacity = context + TAIL + 8
    rec = {"model": model_name, "context": context, "tail": TAIL, "dtype": cfg.dtype, "layers": cfg.num_layers,
           "prefill_chunk": args.prefill_chunk, "reps": args.reps}
    # --- re-prefill, with each prefill attention
    engines = {}
    for impl in args.prefill_impls:
        if impl == "reference" and context > args.max_reference_context:
            rec[f"reprefill_{impl}_skipped"] = (f"reference prefill attention materialises f32 scores over the whole "
                                                f"capacity per chunk: too slow / too large above {args.max_reference_context}")
            log(f"{model_name} {context}: {impl} re-prefill skipped")
            continue
        eng = Engine(model, block_size=64, prefill_chunk=args.prefill_chunk, prefill_attention=impl)
        try:
            first, med = timed(lambda: first_token(eng, ctx + tail, capacity=capacity), args.reps)
        except Exception as e:  # reported, not hidden
            rec[f"reprefill_{impl}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"{model_name} {context}: {impl} re-prefill FAILED {rec[f'reprefill_{impl}_error']}")
            continue
        engines[impl] = eng
        rec[f"reprefill_{impl}_first_run_incl_compile_s"] = first
        rec[f"reprefill_{impl}_ttft_s"] = med
        log(f"{model_name} {context}: re-prefill ({impl} attention) TTFT {med:.3f}s (first run {first:.1f}s)")
    if not engines:
        raise RuntimeError("no re-prefill ran")
    best = min(engines, key=lambda k: rec[f"reprefill_{k}_ttft_s"])
    rec["reprefill_best_impl"] = best
    rec["reprefill_ttft_s"] = rec[f"reprefill_{best}_ttft_s"]
    engine = engines[best]
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
    # --- where restore time goes (each a median of reps after one warm-up)
    _, rec["part_read_files_s"] = timed(lambda: read_all(path), args.reps)
    _, rec["part_checksum_s"] = timed(lambda: verify_checksums(path), args.reps)

    def load(verify, cap):
        restored, _, _ = load_snapshot(path, expect_model="bench-" + model_name, capacity=cap, verify=verify)
        jax.block_until_ready(restored)
        return restored

    _, rec["part_load_unverified_nopad_s"] = timed(lambda: load(False, None), args.reps)
    _, rec["part_load_unverified_padded_s"] = timed(lambda: load(False, capacity), args.reps)
    rec["part_pad_s"] = rec["part_load_unverified_padded_s"] - rec["part_load_unverified_nopad_s"]
    # --- restore (+ tail prefill + first token)
    for verify in (True, False):
        key = "restore_verified" if verify else "restore_unverified"
        times, loads, tails, dropped = [], [], [], []
        for i in range(args.reps + 1):
            dropped.append(drop_caches() if args.drop_caches else False)
            t = time.perf_counter()
            restored = load(verify, capacity)
            tl = time.perf_counter() - t
            first_token(engine, tail, caches=restored, capacity=capacity)
            tt = time.perf_counter() - t
            del restored
            if i > 0:  # the first run warms the tail-prefill compile
                times.append(tt)
                loads.append(tl)
                tails.append(tt - tl)
            else:
                rec[key + "_first_run_incl_compile_s"] = tt
        rec[key + "_ttft_s"] = float(np.median(times))
        rec[key + "_load_s"] = float(np.median(loads))
        rec[key + "_tail_prefill_first_token_s"] = float(np.median(tails))
        rec[key + "_load_GBps"] = rec["snapshot_bytes"] / rec[key + "_load_s"] / 1e9
        rec[key + "_page_cache_dropped"] = all(dropped[1:])
        rec[key + "_speedup"] = rec["reprefill_ttft_s"] / rec[key + "_ttft_s"]
        for impl in engines:
            rec[f"{key}_speedup_vs_{impl}"] = rec[f"reprefill_{impl}_ttft_s"] / rec[key + "_ttft_s"]
        log(f"  {key}: TTFT {rec[key + '_ttft_s']:.3f}s (load {rec[key + '_load_s']:.3f}s, "
            f"{rec[key + '_load_GBps']:.2f} GB/s; tail+first token {rec[key + '_tail_prefill_first_token_s']:.3f}s)"
            f" → {rec[key + '_speedup']:.1f}× vs re-prefill ({best})")
    log(f"  parts: read files {rec['part_read_files_s']:.3f}s, sha256 {rec['part_checksum_s']:.3f}s, "
        f"orbax load no pad {rec['part_load_unverified_nopad_s']:.3f}s, pad {rec['part_pad_s']:.3f}s")
    shutil.rmtree(root, ignore_errors=True)
    del model, engine, engines
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", nargs="+", default=["smollm2:2048", "smollm2:8192", "llama3-8b:32768"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--prefill-impls", nargs="+", default=["reference", "cudnn"],
                    choices=["reference", "xla", "cudnn"], help="prefill attentions timed for re-prefill")
    ap.add_argument("--max-reference-context", type=int, default=40000)
    ap.add_argument("--drop-caches", action="store_true")
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--append", action="store_true", help="keep the rows of an existing ttft.json in --out")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    try:
        import orbax.checkpoint as ocp
    except Exception as e:  # fail loudly: no snapshot can be written or read without it
        raise SystemExit(f"bench/ttft.py: cannot import orbax.checkpoint: {type(e).__name__}: {e}")
    print(f"orbax.checkpoint {getattr(ocp, '__version__', '?')} imported; jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind}", flush=True)

    meta = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "orbax": getattr(ocp, "__version__", "?"), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": os.environ.get("ALAYA_COMMIT", "unknown"), "reps": args.reps}
    rows = []

    def log(m):
        print(m, flush=True)

    prev = []
    if args.append and os.path.exists(os.path.join(args.out, "ttft.json")):
        with open(os.path.join(args.out, "ttft.json")) as f:
            prev = json.load(f)["rows"]
    rows = prev + rows
    def write_md():
        md = [f"# Time to first token: re-prefill vs snapshot restore (bench/ttft.py)", "",
              f"{meta['device']}, jax {meta['jax']}, orbax {meta['orbax']}, {meta['date']}, commit {meta['commit']}. "
              f"Random-weight bf16 models; context of random ids + {TAIL}-token tail; median of {args.reps} after a "
              "warm-up (compile excluded). Restore = Orbax load onto the device + tail prefill + first token.", "",
              "Re-prefill with the `reference` prefill attention (jnp, f32 scores over the whole cache capacity per "
              "chunk) and with `cudnn` (jax.nn.dot_product_attention, fused; still visits all keys up to the "
              "capacity); × = re-prefill (faster of the two) / restore. Parts: plain read of the files, sha256 of "
              "them, Orbax load to the device without / with padding to the capacity, tail prefill + first token.", "",
              "| model | context | re-prefill s (reference) | re-prefill s (cudnn) | restore TTFT s, verified | × | "
              "restore TTFT s, no checksum | × | snapshot GB | load GB/s (no checksum) | read files s | sha256 s | "
              "orbax load s | pad s | tail+1st tok s | first run incl. compile s (re-prefill / restore) |",
              "|" + "---|" * 16]

        def f(r, k, fmt="{:.3f}"):
            v = r.get(k)
            if v is None:
                return "skipped" if (k.replace("_ttft_s", "_skipped") in r) else ("error" if k.replace("_ttft_s", "_error") in r else "–")
            return fmt.format(v)

        for r in rows:
            if "error" in r:
                md.append(f"| {r['model']} | {r['context']} | failed: {r['error'][:150]} |" + "|" * 13)
                continue
            best = r["reprefill_best_impl"]
            md.append("| " + " | ".join([
                r["model"], str(r["context"]), f(r, "reprefill_reference_ttft_s"), f(r, "reprefill_cudnn_ttft_s"),
                f(r, "restore_verified_ttft_s"), f(r, "restore_verified_speedup", "{:.1f}"),
                f(r, "restore_unverified_ttft_s"), f(r, "restore_unverified_speedup", "{:.1f}"),
                f"{r['snapshot_bytes'] / 1e9:.3f}", f(r, "restore_unverified_load_GBps", "{:.2f}"),
                f(r, "part_read_files_s"), f(r, "part_checksum_s"), f(r, "part_load_unverified_nopad_s"),
                f(r, "part_pad_s"), f(r, "restore_unverified_tail_prefill_first_token_s"),
                f"{r[f'reprefill_{best}_first_run_incl_compile_s']:.1f} / {r['restore_unverified_first_run_incl_compile_s']:.1f}",
            ]) + " |")
        md.append("")
        md.append(f"Page cache dropped before restores: {[r.get('restore_unverified_page_cache_dropped') for r in rows]} "
                  "(False: the snapshot was read from the OS page cache, i.e. memory, not the disk).")
        with open(os.path.join(args.out, "ttft.md"), "w") as f:
            f.write("\n".join(md) + "\n")
        return md

    for spec in args.runs:
        name, ctx = spec.split(":")
        try:
            rows.append(run_one(name, int(ctx), args, log))
        except Exception as e:  # reported in the results, not hidden
            rows.append({"model": name, "context": int(ctx), "error": f"{type(e).__name__}: {str(e)[:400]}"})
            log(f"{spec} FAILED: {rows[-1]['error']}")
        with open(os.path.join(args.out, "ttft.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
        write_md()
    md = write_md()
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
