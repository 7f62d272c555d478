"""Time to first token: full re-prefill of a long context vs restoring its snapshot.

For each (model, context): a random-weight model of the given config (speed does
not depend on the values), a context of random token ids and a 32-token
question tail. Measured, each as the median of ``--reps`` runs after one warm-up
run (compilation excluded; the warm-up's time is reported separately):

- ``reprefill``: prefill context + tail, sample the first token.
- ``restore_memory_device`` / ``restore_memory_pinned_host``: the context is
  resident in a ``ContextDB`` memory tier (device memory / pinned host memory);
  ``create_session`` serves it (a fresh device copy padded to the capacity, after
  the catalogue re-scan and the prefix hashing), then the tail is prefilled and the
  first token sampled.
- ``restore_verified`` / ``restore_unverified``: load the context's snapshot from
  local disk onto the device (checksums verified, and not), prefill the tail,
  sample the first token.

The snapshot is the context's part of the last re-prefill's caches (saved through
``ContextDB.import_``, which also fills the memory tiers). It is read right after
being written, so it comes from the OS page cache unless ``--drop-caches``
succeeds (root on Linux); the JSON says which. Above ``--max-detail-context``
tokens only the unverified disk restore is timed (no checksum-verified restore,
no plain-read / sha256 / Orbax-part timings), to keep a 128K run short.

    python -m bench.ttft --runs smollm2:2048 smollm2:8192 llama3-8b:32768 --out $OUT
    python -m bench.ttft --runs llama3-8b:131072 --reps 2 --prefill-impls cudnn --drop-caches --out $OUT
    python -m bench.ttft --runs tiny:1000 --prefill-impls reference xla --out /tmp/ttft   # CPU smoke test
"""

from __future__ import annotations

import os

# Device memory: the 128K run holds the weights (16 GB) + a resident context + a session's
# copy (17.7 GB each); XLA's default pool is 75% of the GPU.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")

import dataclasses
import gc
import json
import shutil
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from alaya_jax.runtime.engine import Engine
from alaya_jax.runtime.sampling import SamplingConfig
from alaya_jax.store.context_db import MEMORY_KINDS, ContextDB
from alaya_jax.attention.config import PREFILL_ATTENTIONS
from alaya_jax.store.kv_store import truncate as truncate_store
from bench import harness
from checkpoints import load_snapshot, verify_checksums

TAIL = 32
BLOCK = 64
ONE = SamplingConfig(max_new_tokens=1)


def build(name: str, context: int):
    from models import Llama, llama3_8b, smollm2_135m, tiny

    cfg = {"smollm2": smollm2_135m, "llama3-8b": llama3_8b, "tiny": tiny}[name](dtype="bfloat16")
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


def time_restore(key, restore, rec, engines, engine, nbytes, reps, *, drop=None):
    """TTFT of one restore path: ``restore()`` -> ``(caches, tokens still to prefill)``,
    then tail prefill + first token; median of ``reps`` runs after a warm-up. Sets
    ``rec[key + "_ttft_s" | "_load_s" | "_tail_prefill_first_token_s" | "_load_GBps" |
    "_speedup" ...]`` (GB/s: ``nbytes`` / load s). ``drop`` (disk paths only: not None):
    drop the page cache before each run, and record whether that worked."""
    times, loads, tails, dropped = [], [], [], []
    for i in range(reps + 1):
        dropped.append(drop_caches() if drop else False)
        t = time.perf_counter()
        caches, todo = restore()
        tl = time.perf_counter() - t
        first_token(engine, todo, caches=caches)
        tt = time.perf_counter() - t
        del caches
        if i > 0:  # the first run warms the tail-prefill compile
            times.append(tt)
            loads.append(tl)
            tails.append(tt - tl)
        else:
            rec[key + "_first_run_incl_compile_s"] = tt
    rec[key + "_ttft_s"] = float(np.median(times))
    rec[key + "_load_s"] = float(np.median(loads))
    rec[key + "_tail_prefill_first_token_s"] = float(np.median(tails))
    rec[key + "_load_GBps"] = nbytes / rec[key + "_load_s"] / 1e9
    if drop is not None:
        rec[key + "_page_cache_dropped"] = all(dropped[1:])
    rec[key + "_speedup"] = rec["reprefill_ttft_s"] / rec[key + "_ttft_s"]
    for impl in engines:
        rec[f"{key}_speedup_vs_{impl}"] = rec[f"reprefill_{impl}_ttft_s"] / rec[key + "_ttft_s"]
    return (f"  {key}: TTFT {rec[key + '_ttft_s']:.4f}s (load {rec[key + '_load_s']:.4f}s, "
            f"{rec[key + '_load_GBps']:.2f} GB/s; tail+first token {rec[key + '_tail_prefill_first_token_s']:.4f}s)"
            f" → {rec[key + '_speedup']:.1f}× vs re-prefill ({rec['reprefill_best_impl']})")


def run_one(model_name, context, args, log):
    cfg, model = build(model_name, context)
    rng = np.random.default_rng(context)
    ctx = rng.integers(0, cfg.vocab_size, size=context).tolist()
    tail = rng.integers(0, cfg.vocab_size, size=TAIL).tolist()
    capacity = context + TAIL + 8
    detail = context <= args.max_detail_context
    rec = {"model": model_name, "context": context, "tail": TAIL, "dtype": cfg.dtype, "layers": cfg.num_layers,
           "prefill_chunk": args.prefill_chunk, "reps": args.reps}
    # --- re-prefill, with each prefill attention
    engines, last = {}, {}
    for impl in args.prefill_impls:
        if impl == "reference" and context > args.max_reference_context:
            rec[f"reprefill_{impl}_skipped"] = (f"reference prefill attention materialises f32 scores over the whole "
                                                f"capacity per chunk: too slow / too large above "
                                                f"{args.max_reference_context}")
            log(f"{model_name} {context}: {impl} re-prefill skipped")
            continue
        eng = Engine(model, block_size=BLOCK, prefill_chunk=args.prefill_chunk, prefill_attention=impl)

        def run(eng=eng, impl=impl):
            last.pop(impl, None)  # free the previous run's caches first
            _, last[impl] = eng.generate([ctx + tail], sampling=ONE, capacity=capacity)

        try:
            first, med = timed(run, args.reps)
        except Exception as e:  # reported, not hidden
            last.pop(impl, None)
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
    # --- snapshot of the context: the context's positions of the last re-prefill's caches
    caches = tuple(truncate_store(c, context) for c in last.pop(best))
    last.clear()
    root = tempfile.mkdtemp(prefix="alaya_ttft_", dir=args.tmp)
    db_kw = dict(model_fingerprint="bench-" + model_name, tokenizer_fingerprint="bench", dtype=cfg.dtype,
                 block_size=BLOCK)
    t = time.perf_counter()
    sid = ContextDB(root, **db_kw).import_(ctx, caches)
    rec["save_s"] = time.perf_counter() - t
    path = os.path.join(root, "snapshots", sid)
    rec["snapshot_bytes"] = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
    # --- memory tiers: filled from the caches in hand (pinned host first: each fill makes a
    # trimmed device copy next to `caches`, and a filled device tier holds one more)
    tiers = {}
    for kind in sorted(args.memory_kinds, key=lambda k: k == "device"):
        key = f"restore_memory_{kind}"
        try:
            mdb = ContextDB(root, **db_kw, verify=False, memory_budget_bytes=int(args.memory_budget_gb * 1e9),
                            memory_kind=kind)
            t = time.perf_counter()
            mdb.import_(ctx, caches)
            rec[key + "_fill_s"] = time.perf_counter() - t
            stats = mdb.memory_stats()
            if stats.snapshots != (sid,):
                raise RuntimeError(f"the snapshot was not kept resident (budget {args.memory_budget_gb} GB; "
                                   f"tier holds {stats})")
            rec["resident_bytes"] = stats.used_bytes
            tiers[kind] = mdb
        except Exception as e:  # reported, not hidden
            rec[key + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"  {key} FAILED {rec[key + '_error']}")
    del caches
    mdb = None
    for kind in sorted(args.memory_kinds, key=lambda k: k != "device"):  # device first: frees its copy sooner
        mdb = tiers.pop(kind, None)
        if mdb is None:
            continue
        key = f"restore_memory_{kind}"
        served = []

        def serve(mdb=mdb, kind=kind):
            session, todo = mdb.create_session(ctx + tail, capacity=capacity, strict=True)
            if session.source != f"memory:{kind}" or session.reused_tokens != context // BLOCK * BLOCK:
                raise RuntimeError(f"expected a memory:{kind} hit of {context // BLOCK * BLOCK} tokens, got "
                                   f"{session.source} {session.reused_tokens}")
            served.append(session.restore_s)
            return session.caches, todo

        try:
            log(time_restore(key, serve, rec, engines, engine, rec["resident_bytes"], args.reps))
            rec[key + "_session_restore_s"] = float(np.median(served[1:]))
        except Exception as e:  # reported, not hidden
            rec[key + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            log(f"  {key} FAILED {rec[key + '_error']}")
        del serve, mdb  # frees the resident copy before the next tier runs
        gc.collect()
    # --- where restore time goes (each a median of reps after one warm-up)

    def load(verify, cap):
        restored, _, _ = load_snapshot(path, expect_model="bench-" + model_name, capacity=cap, verify=verify)
        jax.block_until_ready(restored)
        return restored

    skip = f"context above --max-detail-context {args.max_detail_context}"
    if detail:
        _, rec["part_read_files_s"] = timed(lambda: read_all(path), args.reps)
        _, rec["part_checksum_s"] = timed(lambda: verify_checksums(path), args.reps)
        _, rec["part_load_unverified_nopad_s"] = timed(lambda: load(False, None), args.reps)
        _, rec["part_load_unverified_padded_s"] = timed(lambda: load(False, capacity), args.reps)
        rec["part_pad_s"] = rec["part_load_unverified_padded_s"] - rec["part_load_unverified_nopad_s"]
    else:
        rec["parts_skipped"] = skip
    # --- restore from disk (+ tail prefill + first token)
    for verify in (True, False):
        key = "restore_verified" if verify else "restore_unverified"
        if verify and not detail:
            rec[key + "_skipped"] = skip
            log(f"  {key}: skipped ({skip})")
            continue
        log(time_restore(key, lambda: (load(verify, capacity), tail), rec, engines, engine, rec["snapshot_bytes"],
                         args.reps, drop=args.drop_caches))
    if detail:
        log(f"  parts: read files {rec['part_read_files_s']:.3f}s, sha256 {rec['part_checksum_s']:.3f}s, "
            f"orbax load no pad {rec['part_load_unverified_nopad_s']:.3f}s, pad {rec['part_pad_s']:.3f}s")
    shutil.rmtree(root, ignore_errors=True)
    del model, engine, engines
    return rec


def main(argv=None):
    ap = harness.parser(__doc__.split("\n")[0], "ttft", out_env=False)
    ap.add_argument("--runs", nargs="+", default=["smollm2:2048", "smollm2:8192", "llama3-8b:32768"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--prefill-impls", nargs="+", default=["reference", "cudnn"],
                    choices=PREFILL_ATTENTIONS, help="prefill attentions timed for re-prefill")
    ap.add_argument("--max-reference-context", type=int, default=40000)
    ap.add_argument("--max-detail-context", type=int, default=65536,
                    help="above this many tokens, time only the unverified disk restore and the memory tiers "
                         "(no checksum-verified restore, no plain-read / sha256 / Orbax-part timings)")
    ap.add_argument("--memory-kinds", nargs="*", default=list(MEMORY_KINDS), choices=MEMORY_KINDS,
                    help="ContextDB memory tiers timed (none: skip)")
    ap.add_argument("--memory-budget-gb", type=float, default=40.0, help="memory_budget_bytes of those tiers, GB")
    ap.add_argument("--drop-caches", action="store_true")
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--append", action="store_true", help="keep the rows of an existing ttft.json in --out")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    try:
        import orbax.checkpoint as ocp
    except Exception as e:  # fail loudly: no snapshot can be written or read without it
        raise SystemExit(f"bench/ttft.py: cannot import orbax.checkpoint: {type(e).__name__}: {e}")
    print(f"orbax.checkpoint {getattr(ocp, '__version__', '?')} imported; jax {jax.__version__} on "
          f"{jax.devices()[0].device_kind}", flush=True)

    meta = harness.run_meta(orbax=getattr(ocp, "__version__", "?"), reps=args.reps,
                            xla_python_client_mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"))
    rows = []

    def log(m):
        print(m, flush=True)

    prev = []
    if args.append and os.path.exists(os.path.join(args.out, "ttft.json")):
        with open(os.path.join(args.out, "ttft.json")) as f:
            prev = json.load(f)["rows"]
    rows = prev + rows
    def write_md():
        md = ["# Time to first token: re-prefill vs snapshot restore (bench/ttft.py)", "",
              f"{meta['device']}, jax {meta['jax']}, orbax {meta['orbax']}, {meta['date']}, commit {meta['commit']}. "
              f"Random-weight bf16 models; context of random ids + {TAIL}-token tail; median of {args.reps} after a "
              "warm-up (compile excluded). Every restore TTFT = getting the context's caches onto the device + "
              "tail prefill + first token.", "",
              "Re-prefill with the `reference` prefill attention (jnp, f32 scores over the whole cache capacity per "
              "chunk) and with `cudnn` (jax.nn.dot_product_attention, fused; still visits all keys up to the "
              "capacity); × = re-prefill (faster of the two) / restore. Memory = `ContextDB.create_session` served "
              "from the DB's resident memory tier (`device`: a copy within GPU memory; `pinned_host`: a transfer "
              "from page-locked host RAM), catalogue re-scan and prefix hashing included. Disk = Orbax load of the "
              "snapshot onto the device. Snapshot GB: on disk (compressed by Orbax) / resident (trimmed to its "
              "blocks). Serve s: the memory tiers' `create_session`. Parts (disk): plain read of the files, sha256 "
              "of them, Orbax load to the device without / with padding to the capacity; tail prefill + first "
              "token after the unverified disk restore.", "",
              "| model | context | re-prefill s (reference) | re-prefill s (cudnn) | memory TTFT s, device | × | "
              "memory TTFT s, pinned host | × | disk TTFT s, verified | × | disk TTFT s, no checksum | × | "
              "snapshot GB (disk / resident) | serve s (device / pinned) | load GB/s (disk, no checksum) | "
              "read files s | sha256 s | orbax load s | pad s | tail+1st tok s | "
              "first run incl. compile s (re-prefill / restore) |",
              "|" + "---|" * 21]

        def f(r, k, fmt="{:.3f}", path=None):
            v = r.get(k)
            if v is not None:
                return fmt.format(v)
            for p in (path, k.rsplit("_", 2)[0] if k.endswith("_ttft_s") else None):
                if p and p + "_skipped" in r:
                    return "skipped"
                if p and p + "_error" in r:
                    return "error"
            return "–"

        def gb(r, k):
            return f"{r[k] / 1e9:.3f}" if k in r else "–"

        for r in rows:
            if "error" in r:
                md.append(f"| {r['model']} | {r['context']} | failed: {r['error'][:150]} |" + "|" * 18)
                continue
            best = r["reprefill_best_impl"]
            md.append("| " + " | ".join([
                r["model"], str(r["context"]), f(r, "reprefill_reference_ttft_s"), f(r, "reprefill_cudnn_ttft_s"),
                f(r, "restore_memory_device_ttft_s", "{:.4f}"),
                f(r, "restore_memory_device_speedup", "{:.1f}", "restore_memory_device"),
                f(r, "restore_memory_pinned_host_ttft_s", "{:.4f}"),
                f(r, "restore_memory_pinned_host_speedup", "{:.1f}", "restore_memory_pinned_host"),
                f(r, "restore_verified_ttft_s"), f(r, "restore_verified_speedup", "{:.1f}", "restore_verified"),
                f(r, "restore_unverified_ttft_s"), f(r, "restore_unverified_speedup", "{:.1f}"),
                f"{gb(r, 'snapshot_bytes')} / {gb(r, 'resident_bytes')}",
                f"{f(r, 'restore_memory_device_load_s', '{:.4f}', 'restore_memory_device')} / "
                f"{f(r, 'restore_memory_pinned_host_load_s', '{:.4f}', 'restore_memory_pinned_host')}",
                f(r, "restore_unverified_load_GBps", "{:.2f}"),
                f(r, "part_read_files_s", path="parts"), f(r, "part_checksum_s", path="parts"),
                f(r, "part_load_unverified_nopad_s", path="parts"), f(r, "part_pad_s", path="parts"),
                f(r, "restore_unverified_tail_prefill_first_token_s"),
                f"{r[f'reprefill_{best}_first_run_incl_compile_s']:.1f} / "
                f"{f(r, 'restore_unverified_first_run_incl_compile_s', '{:.1f}')}",
            ]) + " |")
        md.append("")
        md.append(f"Page cache dropped before disk restores: "
                  f"{[r.get('restore_unverified_page_cache_dropped') for r in rows]} "
                  "(False: the snapshot was read from the OS page cache, i.e. memory, not the disk).")
        errs = [f"{r['model']}:{r['context']} {k}: {v}" for r in rows for k, v in r.items()
                if k.endswith("_error") or k == "error"]
        if errs:
            md += ["", "Errors:", ""] + [f"- {e}" for e in errs]
        harness.write_text(os.path.join(args.out, "ttft.md"), "\n".join(md) + "\n")
        return md

    for spec in args.runs:
        name, ctx = spec.split(":")
        try:
            rows.append(run_one(name, int(ctx), args, log))
        except Exception as e:  # reported in the results, not hidden
            rows.append({"model": name, "context": int(ctx), "error": f"{type(e).__name__}: {str(e)[:400]}"})
            log(f"{spec} FAILED: {rows[-1]['error']}")
        harness.write_json(os.path.join(args.out, "ttft.json"), {"meta": meta, "rows": rows})
        write_md()
    md = write_md()
    print("\n".join(md))


if __name__ == "__main__":
    sys.exit(main())
