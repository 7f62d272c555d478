"""Whole decode step on N GPUs of one host, the KV store sharded along the sequence (docs/design.md §10).

Random-weight Llama-3-8B (weights replicated on every GPU), real-key-proxy stores (as bench/decode_step_real.py:
every layer's store built on the first GPU, then sharded over the N GPUs before the next is built), B=1, K, V
and codes all on the GPUs. Variants, timed in the same run on the same caches: ``dipr`` (exact filter–refine,
Pallas kernels, shard by shard with the maxima reduced across the GPUs) and ``full-cudnn`` (dense cuDNN
attention sharded the same way, merged by log-sum-exp). Beside the step, attention alone: ``--attn-layers``
chained layers of the sharded attention over the first layers' stores (per-device time = the call's wall time:
the devices run their shards at once), and the same on ONE GPU at ``--single-context`` (the target compares
1M on 2 GPUs with 512K on 1).

Rows carry the fields of bench/results/beyond_gpu.json's rows (``gpu``, ``gpus``, ``context``, ``layers``,
``placement``, ``tokens_per_s``, ``dense_tokens_per_s``, ``gpu_context_bytes``, ``kv_bytes``) plus the
attention-alone times. Fewer GPUs than ``--gpus`` is an error (exit status 2), never a smaller run.

    python -m bench.multi_gpu --gpus 2 --contexts 1048576 --out $OUT     # nvidia-h200-x2: about 8 minutes
    python -m bench.multi_gpu --smoke                                    # CPU: 2 emulated devices, tiny model
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # emulated CPU devices: the flag must be set before jax starts
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")

import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from alaya_jax.attention.config import AttentionConfig, KernelConfig  # noqa: E402
from alaya_jax.attention.dense_sharded import sharded_attention  # noqa: E402
from alaya_jax.attention.dipr.filter_refine import dipr_store_attention  # noqa: E402
from alaya_jax.store import sharding  # noqa: E402
from bench import decode_step_real, harness  # noqa: E402


def store_bytes(stores) -> tuple[int, int]:
    """(bytes of every store array, bytes of K + V) over the layers."""
    total = sum(x.nbytes for st in stores for x in jax.tree.leaves(st))
    return int(total), int(sum(st.keys.nbytes + st.values.nbytes for st in stores))


def attention_alone(stores, qs, *, mesh, impl, beta, layers: int, iters: int) -> dict:
    """ms per layer of ``layers`` chained attention calls (DIPR and dense) over the first stores."""
    lays = list(stores[:layers])
    qq = [qs[i] for i in range(len(lays))]
    out = {}
    dipr = harness.layered(lambda q, st: dipr_store_attention(q, st, beta=beta, implementation=impl,
                                                              mesh=mesh)[0])
    t, _ = harness.timed(dipr, (qq, lays), iters)
    out["attn_dipr_ms_per_layer"] = 1e3 * t / len(lays)
    if jax.default_backend() == "gpu":
        def dense_fn(q, st):
            pos = st.lengths[:, None] - 1
            if mesh is None:
                from alaya_jax.attention.dense import cudnn_attention
                return cudnn_attention(q[:, None], st, pos)[:, 0]
            return sharded_attention(q[:, None], st, pos, implementation="cudnn", mesh=mesh)[:, 0]

        t, _ = harness.timed(harness.layered(dense_fn), (qq, lays), iters)
        out["attn_dense_ms_per_layer"] = 1e3 * t / len(lays)
    return out


def with_attention_alone(row, stores, qs, *, mesh, impl, beta, args) -> dict:
    """``row`` with :func:`attention_alone`'s times (or the error), printed."""
    try:
        row.update(attention_alone(stores, qs, mesh=mesh, impl=impl, beta=beta, layers=args.attn_layers,
                                   iters=args.iters))
    except Exception as e:
        row["attn_error"] = f"{type(e).__name__}: {str(e)[:400]}"
        traceback.print_exc()
    print(json.dumps(row), flush=True)
    return row


def main(argv=None):
    ap = harness.parser(__doc__.split("\n")[0], "multi_gpu", smoke="CPU: 2 emulated devices, a 2-layer SmolLM2 at 1K")
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--model", default="llama3-8b", choices=("llama3-8b", "smollm2-2l"))
    ap.add_argument("--contexts", type=int, nargs="+", default=[1048576])
    ap.add_argument("--single-context", type=int, default=524288, help="attention alone on one GPU (0: skip)")
    ap.add_argument("--attn-layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--tokens-per-call", type=int, default=1,
                    help="tokens decoded on the device per jitted call (alaya serve decodes 16); times are per token")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--beta64", type=float, default=24.0, help="β at d=64, mapped to the model's D")
    ap.add_argument("--proxy-sources", type=int, default=4)
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.contexts, args.steps, args.iters = "smollm2-2l", [1024], 2, 2
        args.single_context, args.attn_layers, args.proxy_sources = 512, 2, 0
    have = jax.devices()
    if len(have) < args.gpus:
        print(f"multi_gpu: error: --gpus {args.gpus} asked for, but the {jax.default_backend()} backend has "
              f"{len(have)} device(s): {have}", file=sys.stderr)
        return 2
    if not args.smoke and jax.default_backend() != "gpu":
        print(f"multi_gpu: error: needs GPUs (backend {jax.default_backend()!r}); use --smoke on the CPU",
              file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    impl = "pallas"
    meta = harness.run_meta(model=args.model, batch=1, gpus=args.gpus, tokens_per_call=args.tokens_per_call)
    mesh = sharding.seq_mesh(args.gpus)
    cfg, model = decode_step_real.build_model(args.model, max(args.contexts))
    # the weights replicated over the GPUs once (the step's own device_put is then a no-op)
    nnx.update(model, jax.device_put(nnx.state(model), NamedSharding(mesh, PartitionSpec())))
    beta = float(args.beta64 * (cfg.head_dim / 64) ** 0.5)
    rows = []
    for context in args.contexts:
        capacity = sharding.sharded_capacity(context + 2 * (args.steps + 2) * args.tokens_per_call + 16,
                                             block_size=64, devices=args.gpus)  # every timed token appends
        t0 = time.perf_counter()
        stores, qs = decode_step_real.proxy_stores(cfg, 1, context, capacity, sources=args.proxy_sources,
                                                   place=lambda st: sharding.shard_store(st, mesh))
        setup = time.perf_counter() - t0
        gpu_bytes, kv_bytes = store_bytes(stores)
        row = {**meta, "gpu": meta.get("device"), "gpus": args.gpus, "context": context, "layers": cfg.num_layers,
               "placement": "device", "gpu_context_bytes": gpu_bytes,
               "gpu_context_bytes_per_gpu": gpu_bytes // args.gpus,
               "kv_bytes": kv_bytes, "beta": beta, "setup_s": setup}
        variants = {"dipr": AttentionConfig(method="dipr", kernel=KernelConfig(implementation=impl)),
                    "full-cudnn": AttentionConfig(method="full", kernel=KernelConfig(prefill_attention="cudnn"))}
        if jax.default_backend() != "gpu":
            variants["full"] = AttentionConfig(method="full")  # the CPU smoke has no cuDNN
            del variants["full-cudnn"]
        for name, att in variants.items():
            try:
                got, stores = decode_step_real.run_variant(model, stores, qs, name, att,
                                                           [beta if name == "dipr" else None], args, mesh=mesh)
                g = got[0]
                key = "tokens_per_s" if name == "dipr" else "dense_tokens_per_s"
                row[key] = g["tokens_per_s"]
                row[f"{name}_step_ms"] = g["step_ms"]
                if "candidate_fraction" in g:
                    row["candidate_fraction"] = g["candidate_fraction"]
            except Exception as e:
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:400]}"
                traceback.print_exc()
        if row.get("tokens_per_s") and row.get("dense_tokens_per_s"):
            row["speedup_vs_dense"] = row["tokens_per_s"] / row["dense_tokens_per_s"]
        rows.append(with_attention_alone(row, stores, qs, mesh=mesh, impl=impl, beta=beta, args=args))
        del stores
    if args.single_context:
        few = decode_step_real.proxy_stores(dataclasses.replace(cfg, num_layers=args.attn_layers), 1,
                                            args.single_context, args.single_context + 64)
        row = {**meta, "gpu": meta.get("device"), "gpus": 1, "context": args.single_context, "layers": args.attn_layers,
               "placement": "device", "row": "attention alone, one device", "beta": beta}
        rows.append(with_attention_alone(row, *few, mesh=None, impl=impl, beta=beta, args=args))
    harness.write_results(args.out, "multi_gpu", rows, markdown(rows))
    print(markdown(rows))
    return 0


def markdown(rows) -> str:
    if not rows:
        return ""
    m = rows[0]
    out = [f"# Decode step on {m['gpus']} devices, KV sharded along the sequence ({m['model']}, B=1)", "",
           f"{m['device']}, jax {m['jax']}, {m['date']}, commit {m['commit']}. DIPR β={m['beta']:.1f}. "
           "Attention alone: ms per layer of chained layers (per-device time: the shards run at once).", "",
           "| gpus | context | layers | DIPR tok/s | dense tok/s | × dense | cand. frac | attn DIPR ms/layer "
           "| attn dense ms/layer | context GiB | errors |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, spec=".1f"):
        return "–" if x is None else format(x, spec)

    for r in rows:
        errs = "; ".join(v for k, v in r.items() if k.endswith("error"))
        gib = r.get("gpu_context_bytes")
        out.append(f"| {r['gpus']} | {r['context']} | {r['layers']} | {f(r.get('tokens_per_s'))} | "
                   f"{f(r.get('dense_tokens_per_s'))} | {f(r.get('speedup_vs_dense'), '.2f')} | "
                   f"{f(r.get('candidate_fraction'), '.4f')} | {f(r.get('attn_dipr_ms_per_layer'), '.3f')} | "
                   f"{f(r.get('attn_dense_ms_per_layer'), '.3f')} | {f(None if gib is None else gib / 2**30, '.2f')} | "
                   f"{errs or '–'} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
