"""Contexts beyond GPU memory: a 1M-token Llama-3-8B context on one GPU, exact, values in pinned host memory.

Random-weight Llama-3-8B (speed does not depend on the weights), B = 1, every layer's store a
real-key proxy (bench/real_key_proxy.py) whose 8192 real tokens are *tiled* to the context on the
device: a period store of the real tokens (keys, their codes, Gaussian values) is built once per
layer and ``kv_store.gather_positions`` lays it out to the context in one jitted call, written
straight into its placement (host fields: an explicit device-to-host transfer inside that call;
the host fill rate is measured). Each layer attends with its proxy's real query (plus 1e-6 times
the model's own, as bench/decode_step_real.py). A step = one jitted decode call, caches donated,
with the host sync on the sampled token.

Stages, each in a process of its own (XLA's pinned host pool keeps what it allocated until the
process ends, and one process could not hold 64 GiB of values and then 96 GiB of keys and values),
in the order of their rows' importance, each within its share of ``--budget-s`` (``RESERVE``):

1. ``values_1m``: the HBM copy roofline and the host-to-device bandwidth; DIPR at ``--context`` (1M)
   with the values on the host (the compiled HLO audited for whole-array host transfers), then its
   exactness: layers of the same stores against brute force over every key (:func:`exact_check`).
2. ``kv_host_dense``: DIPR with keys and values on the host at the longest context the host RAM holds
   (``--kv-host-context``; 0: from ``MemAvailable``, see :func:`host_kv_context`), checked the same
   way; then dense cuDNN decode at the longest of ``--dense-contexts`` that fits on the GPU and DIPR
   all-on-GPU there (``--host-at-dense 1``: also DIPR with the values on the host at that context).
3. ``ttft``: 32 layers at ``--ttft-context``: re-prefill with cuDNN attention (all on device), then
   time to first token from a ``ContextDB`` pinned-host memory tier with the values on the host (lazy
   restore + tail prefill + first token) and all on the device, each against the re-prefill; the
   chunked prefill that writes each chunk's values to the host (its rate; ``--prefill-to-host 0``:
   not run); a few-layer 8B-shaped model at ``--exact-context``: logits, DIPR statistics and tokens of
   ``--exact-steps`` steps in every placement, compared bit for bit with all-on-device, the compiled
   HLO checked for whole-array host transfers; the TTFT with keys and values on the host.

A stage still running 15 s past its share is killed; every row is on disk as soon as it is made, so
the JSON and markdown hold what the stages finished. Bounded: the run ends within ``--budget-s`` +
15 s (455 + 15 s by default).

    python -m bench.beyond_gpu --out $OUT                # GPU: the three stages, ≤ 470 s
    python -m bench.beyond_gpu --smoke --out /tmp/bg     # CPU: tiny shapes, interpret mode, ~4 min
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import traceback

STAGES = ("values_1m", "kv_host_dense", "ttft")  # the headline first
#: Seconds of the budget reserved for each stage: a stage must end before the budget less what the
#: stages after it reserve (time an earlier stage leaves unused goes to the later ones).
RESERVE = {"values_1m": 160.0, "kv_host_dense": 155.0, "ttft": 140.0}
GRACE_S = 15.0  # a stage still running this long past its share is killed
GIB = 1 << 30
PERIOD = 8192  # real tokens of the captured sequence: the proxy's period
TAIL = 32
ROW_KEYS = ("gpu", "gpus", "context", "layers", "placement", "tokens_per_s", "dense_tokens_per_s",
            "gpu_context_bytes", "kv_bytes")


def per_token_kv_bytes(args) -> int:
    """bf16 K + V bytes of one token over every layer of ``--model`` (no backend started)."""
    return kv_bytes(model_config(args), 1)


def pinned_pool_gib(args, context: int, fields: int) -> int:
    """The pinned host pool cap for ``fields`` (1: values, 2: keys and values) of ``context`` tokens: their
    bytes plus the slack XLA's BFC pool may waste (it grows by regions of doubling size, each holding
    whole arrays: less than one array per region, 8 arrays at most, 8 GiB at least)."""
    arrays = fields * per_token_kv_bytes(args) // 2 * (context + 64)  # every layer's host arrays
    one = arrays // (fields * model_config(args).num_layers)
    return int(-(-(arrays + max(8 * GIB, 8 * one)) // GIB))


def host_kv_context(args) -> int:
    """``--kv-host-context``, or the longest multiple of 64K tokens (1K for a smoke run), at most
    ``--context``, whose keys and values plus the pinned pool's slack leave 12 GiB of the host's
    available RAM."""
    if args.kv_host_context:
        return args.kv_host_context
    step = 1024 if args.smoke else 65536
    avail = host_available() - (0 if args.smoke else 12 * GIB)
    context = step
    while context + step <= args.context and pinned_pool_gib(args, context + step, 2) * GIB <= avail:
        context += step
    return context


def stage_env(stage: str, args) -> dict:
    """The environment of a stage process: XLA's GPU pool, and its pinned host pool capped near what the
    stage places there (:func:`pinned_pool_gib`; XLA's default cap is 64 GiB, and the pool keeps its
    regions until the process ends, so the cap bounds the pinned RAM taken). Read once, when the
    backend starts."""
    env = dict(os.environ)
    if not args.smoke:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.96")
        limit = {"ttft": 32, "values_1m": pinned_pool_gib(args, args.context, 1),
                 "kv_host_dense": pinned_pool_gib(args, host_kv_context(args), 2)}[stage]
        env.setdefault("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB", str(limit))
    return env


# ----------------------------------------------------------------------------- driver (no jax here)


def drive(args, argv) -> int:
    """Runs every stage in a child process, in order, within ``--budget-s``; collects their rows into
    ``beyond_gpu.json`` / ``.md`` (rewritten after each stage) and their output into ``beyond_gpu.log``."""
    os.makedirs(args.out, exist_ok=True)
    end = time.time() + args.budget_s
    stages = [s for s in STAGES if s in args.stages]
    scale = args.budget_s / sum(RESERVE[s] for s in stages)
    rows, log_path = [], os.path.join(args.out, "beyond_gpu.log")
    with open(log_path, "w") as log:
        for i, stage in enumerate(stages):
            deadline = end - scale * sum(RESERVE[s] for s in stages[i + 1:])
            left = deadline - time.time()
            if left < 30:
                rows.append({"kind": "skipped", "stage": stage, "why": f"time budget ({left:.0f} s left)"})
                continue
            fd, rows_file = tempfile.mkstemp(prefix=f"beyond_gpu_{stage}_", suffix=".json")
            os.close(fd)
            cmd = [sys.executable, "-m", "bench.beyond_gpu", *argv, "--stage", stage, "--rows-file", rows_file,
                   "--deadline", str(deadline)]
            t0 = time.time()
            if stage == "kv_host_dense":
                cmd += ["--kv-host-context", str(host_kv_context(args))]
            env = stage_env(stage, args)
            log.write(f"# stage {stage}: XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB="
                      f"{env.get('XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB')} XLA_PYTHON_CLIENT_MEM_FRACTION="
                      f"{env.get('XLA_PYTHON_CLIENT_MEM_FRACTION')}\n")
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            watchdog = threading.Timer(max(1.0, deadline + GRACE_S - time.time()), proc.kill)  # past its time
            watchdog.start()
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
                log.flush()
            rc = proc.wait()
            watchdog.cancel()
            got = read_rows(rows_file)
            rows += got
            if rc != 0:
                rows.append({"kind": "stage_failed", "stage": stage, "rc": rc, "seconds": time.time() - t0,
                             "why": "see beyond_gpu.log" + (" (killed: memory or time)" if rc < 0 else "")})
            rows.append({"kind": "stage", "stage": stage, "rc": rc, "seconds": round(time.time() - t0, 1)})
            write_all(args.out, rows)
    print(markdown(rows))
    return 0 if all(r.get("rc", 0) == 0 for r in rows if r.get("kind") == "stage") else 1


def read_rows(path: str) -> list:
    """The rows a stage left in ``path`` (written whole each time, by rename: a stage killed while
    writing leaves the previous version), then removes it."""
    try:
        with open(path) as f:
            text = f.read()
    finally:
        for p in (path, path + ".tmp"):
            if os.path.exists(p):
                os.unlink(p)
    return json.loads(text) if text else []


def write_all(out: str, rows) -> None:
    from bench import harness

    meta = next((r for r in rows if r.get("kind") == "meta"), {})
    harness.write_results(out, "beyond_gpu", rows, markdown(rows, meta))


# ----------------------------------------------------------------------------- stage processes


class Stage:
    """What every stage shares: its rows (flushed to ``--rows-file`` after each), the deadline, the model."""

    def __init__(self, args):
        import jax

        from bench import harness

        self.args = args
        self.rows = []
        self.deadline = args.deadline
        self.gpu = jax.default_backend() == "gpu"
        self.meta = harness.run_meta(model=args.model, batch=1, stage=args.stage,
                                     xla_mem_fraction=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
                                     pinned_host_limit_gb=os.environ.get("XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"),
                                     host_mem_available_gib=host_available() / GIB)
        self.add({"kind": "meta", **self.meta})

    def left(self) -> float:
        return self.deadline - time.time()

    def add(self, row: dict) -> dict:
        """Appends ``row`` (printed) and flushes; a caller may add fields to it later, then :meth:`flush`."""
        self.rows.append(row)
        print(json.dumps(row, default=str), flush=True)
        self.flush()
        return row

    def flush(self) -> None:
        """Every row so far to ``--rows-file``: a temporary file, then a rename (a kill never leaves half)."""
        tmp = self.args.rows_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.rows, f, default=str)
        os.replace(tmp, self.args.rows_file)

    def attempt(self, what: str, fn, *, need_s: float = 0.0, **fields):
        """``fn()`` unless fewer than ``need_s`` seconds are left; a failure is a row, never hidden."""
        if self.left() < need_s:
            return self.add({"kind": "skipped", "what": what, **fields,
                             "why": f"time budget ({self.left():.0f} s left, {need_s:.0f} s needed)"})
        try:
            return fn()
        except Exception as e:  # reported, then the stage goes on
            traceback.print_exc()
            return self.add({"kind": "error", "what": what, **fields, "error": f"{type(e).__name__}: {str(e)[:600]}",
                             "oom": is_oom(e)})


def is_oom(e: Exception) -> bool:
    text = str(e)
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "Out of host memory"))


def host_available() -> int:
    from alaya_jax.runtime.memory_estimate import host_available_memory

    return host_available_memory()


def model_config(args, *, layers=None, context: int = 0):
    import dataclasses

    from models import llama3_8b, smollm2_135m

    if args.model == "llama3-8b":
        cfg = llama3_8b(dtype="bfloat16", num_layers=layers or 32, max_position_embeddings=max(131072, context + 1024))
    else:  # smoke: SmolLM2's shapes (head dim 64, as the captured keys), 2 layers
        cfg = dataclasses.replace(smollm2_135m(dtype="bfloat16"), num_layers=layers or 2,
                                  max_position_embeddings=max(8192, context + 1024))
    return cfg


def build_model(cfg):
    from flax import nnx

    from models import Llama

    return Llama(cfg, rngs=nnx.Rngs(0))


class ProxyLayers:
    """Per layer a period store (the capture's real tokens laid out once: keys, their codes and Gaussian
    values, device memory) and the layer's real query; :meth:`caches` tiles them to a context."""

    def __init__(self, cfg, *, block_size: int = 64):
        import jax
        import jax.numpy as jnp

        from alaya_jax.store import kv_store
        from bench import real_key_proxy

        t = time.perf_counter()
        self.cfg, self.block_size = cfg, block_size
        self.bases, qs = [], []
        capture = real_key_proxy.load_capture()
        for layer in range(cfg.num_layers):
            p = real_key_proxy.build_proxy(context=PERIOD, batch=1, num_kv_heads=cfg.num_kv_heads,
                                           group=cfg.num_heads // cfg.num_kv_heads, head_dim=cfg.head_dim,
                                           seed=layer, capture=capture)
            k = jnp.asarray(p["keys"]).astype(jnp.bfloat16).transpose(0, 2, 1, 3)  # [B, S, Hkv, D]
            v = jnp.asarray(p["values"]).astype(jnp.bfloat16).transpose(0, 2, 1, 3)
            self.bases.append(kv_store.from_dense(k, v, block_size=block_size))
            qs.append(jnp.asarray(p["q"], jnp.float32).astype(jnp.bfloat16))
        self.qs = jax.block_until_ready(jnp.stack(qs))  # [L, B, Hq, D]
        self.setup_s = time.perf_counter() - t

    def caches(self, context: int, capacity: int, placement: str):
        """``(caches, build)``: every layer's store of ``context`` tokens at ``capacity`` positions in
        ``placement``, and the build's timing (host fields: bytes and GB/s of the fill)."""
        import functools

        import jax
        import jax.numpy as jnp
        import numpy as np

        from alaya_jax.store import kv_store
        from bench import real_key_proxy

        idx = jnp.asarray(real_key_proxy.token_index(context=context, last=PERIOD - 1, window=64), jnp.int32)
        nb = kv_store.num_blocks_for(capacity, self.block_size)

        @functools.partial(jax.jit, static_argnames=("placement",))
        def tile(base, idx, *, placement):
            return kv_store.place(kv_store.fit_blocks(kv_store.gather_positions(base, idx), nb), placement)

        out, times = [], []
        t0 = time.perf_counter()
        for base in self.bases:
            t = time.perf_counter()
            out.append(jax.block_until_ready(tile(base, idx, placement=placement)))
            times.append(time.perf_counter() - t)
        total = time.perf_counter() - t0
        dev, host = context_bytes(out)
        steady = float(np.median(times[1:])) if len(times) > 1 else times[0]
        per_layer_host = host / len(out)
        return tuple(out), {"build_s": total, "build_first_layer_s": times[0], "build_layer_median_s": steady,
                            "device_bytes": dev, "host_bytes": host,
                            "host_fill_GBps": per_layer_host / steady / 1e9 if host else None}


def context_bytes(caches) -> tuple[int, int]:
    """(device bytes, pinned host bytes) of the stores' arrays, read from where each array lies."""
    import jax

    dev = host = 0
    for x in jax.tree.leaves(caches):
        if x.sharding.memory_kind == "pinned_host":
            host += x.nbytes
        else:
            dev += x.nbytes
    return dev, host


def kv_bytes(cfg, context: int) -> int:
    """bf16 K + V of ``context`` tokens over every layer (what dense attention would hold)."""
    return 2 * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context


def decode_step(model, attention):
    """The jitted whole-model decode step: ``(state, caches, token [B], qs [L,B,Hq,D]) -> (next [B],
    logits f32 [B, V], caches, aux)``, caches donated on a GPU."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from alaya_jax.attention.attention_fn import make_attention_fn

    graphdef, state = nnx.split(model)
    base = make_attention_fn(attention)

    def step(state, caches, token, qs):
        m = nnx.merge(graphdef, state)

        def attn(layer, q, k, v, cache, pos):  # the layer's real proxy query (the model's own, 1e-6: chained)
            qq = (qs[layer][:, None].astype(jnp.float32) + 1e-6 * q.astype(jnp.float32)).astype(q.dtype)
            return base(layer, qq, k, v, cache, pos)

        logits, caches, aux = m(token[:, None], caches[0].lengths[:, None], caches, attention=attn)
        logits = logits[:, 0].astype(jnp.float32)
        return jnp.argmax(logits, -1).astype(jnp.int32), logits, caches, aux

    return jax.jit(step, donate_argnums=(1,) if jax.default_backend() != "cpu" else ()), state


def host_transfer_audit(hlo: str, min_bytes: int) -> dict:
    """What a compiled module does with large host-memory buffers (layout ``S(5)``, at least ``min_bytes``:
    a fraction of one layer's host values). ``whole_array_transfers``: ``copy-start`` / ``copy`` of such a
    buffer (a transfer of the whole array between host and device); ``large_host_operands``: every
    instruction taking one, by opcode — for the DIPR step the appends' in-place ``dynamic-update-slice``
    fusions and the refine kernels' custom calls, which read only the rows they load. (On the CPU the
    compiled module keeps no ``S(5)`` layouts: nothing to audit there.)"""
    import re

    sizes = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u8": 1, "s8": 1, "pred": 1, "u32": 4}
    shape_re = re.compile(r"(bf16|f16|f32|s32|u8|s8|pred|u32)\[([\d,]*)\]\{[^}]*S\(5\)[^}]*\}")
    op_re = re.compile(r"\s([a-z][\w-]*)\(")
    big, operands, lines = [], {}, 0
    for line in hlo.splitlines():
        if "S(5)" not in line or " = " not in line:
            continue
        lines += 1
        rhs = line.split(" = ", 1)[1]
        m = op_re.search(" " + rhs)
        if not m:
            continue
        name, args = m.group(1), (" " + rhs)[m.end():]
        for dt, dims in shape_re.findall(args):
            n = sizes[dt]
            for d in filter(None, dims.split(",")):
                n *= int(d)
            if n >= min_bytes:
                operands[name] = operands.get(name, 0) + 1
                if name in ("copy-start", "copy"):
                    big.append(f"{name}: {dt}[{dims}] ({n / GIB:.2f} GiB)")
                break
    return {"instructions_with_host_layouts": lines, "large_host_operands": operands,
            "whole_array_transfers": big[:8], "whole_array_transfer_count": len(big)}


def run_steps(stage, model, caches, qs, attention, *, steps: int, what: str, context: int, audit_bytes: int = 0,
              hlo_name: str = ""):
    """Compiles the step for ``caches``, runs 2 warm-up and ``steps`` timed steps. Returns
    ``(row, caches with their original lengths, per-step (token, logits, stats))``. ``audit_bytes``: audit
    the compiled module's host buffers of at least that size; ``hlo_name``: also write its instructions
    that touch host memory to ``<out>/<hlo_name>``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    f, state = decode_step(model, attention)
    lengths0 = np.asarray(caches[0].lengths)  # a host copy: the caches' own arrays are donated to the first step
    token = jnp.zeros((qs.shape[1],), jnp.int32)
    t = time.perf_counter()
    compiled = f.lower(state, caches, token, qs).compile()
    compile_s = time.perf_counter() - t
    text = compiled.as_text()
    audit = host_transfer_audit(text, audit_bytes) if audit_bytes else None
    if hlo_name:
        from bench import harness

        harness.write_text(os.path.join(stage.args.out, hlo_name),
                           "\n".join(ln.strip()[:400] for ln in text.splitlines() if "S(5)" in ln) + "\n")
    del text
    times, trace = [], []
    for i in range(steps + 2):
        t = time.perf_counter()
        token, logits, caches, aux = compiled(state, caches, token, qs)
        token.block_until_ready()
        times.append(time.perf_counter() - t)
        trace.append((np.asarray(token), np.asarray(logits), jax.device_get(aux)))
    steady = np.array(times[2:])
    row = {"kind": "decode", "what": what, "context": context, "method": attention.method,
           "placement": caches[0].placement, "beta": attention.beta if attention.method == "dipr" else None,
           "steps": steps, "step_ms": 1e3 * float(np.median(steady)),
           "step_p90_ms": 1e3 * float(np.percentile(steady, 90)),
           "first_step_s": times[0], "compile_s": compile_s, "tokens_per_s": float(qs.shape[1] / np.median(steady))}
    if attention.method == "dipr":
        a = trace[-1][2]
        row["candidate_fraction"] = float(np.mean([np.asarray(x["candidates"]).mean() for x in a])) / context
    if audit is not None:
        row["hlo"] = audit
    return row, tuple(c.replace(lengths=jnp.asarray(lengths0)) for c in caches), trace


def dipr_config(cfg, args, placement: str):
    from alaya_jax.attention.config import AttentionConfig, KernelConfig

    return AttentionConfig(method="dipr", beta=float(args.beta64 * (cfg.head_dim / 64) ** 0.5),
                           kernel=KernelConfig(implementation="pallas", kv_placement=placement))


def main_row(stage, cfg, context: int, placement: str, row: dict, caches, *, dense_tokens_per_s=None, **extra):
    """The issue's row (``ROW_KEYS``) for a decode ``row`` of :func:`run_steps` on ``caches``, added."""
    dev, host = context_bytes(caches)
    kv = kv_bytes(cfg, context)
    out = {"kind": "main", "gpu": stage.meta["device"], "gpus": 1, "context": context, "layers": cfg.num_layers,
           "placement": placement, "tokens_per_s": row["tokens_per_s"], "dense_tokens_per_s": dense_tokens_per_s,
           "gpu_context_bytes": dev, "kv_bytes": kv, "host_context_bytes": host, "gpu_context_fraction_of_kv": dev / kv,
           **{k: v for k, v in row.items() if k not in ("kind", "context", "placement", "tokens_per_s")}, **extra}
    assert all(k in out for k in ROW_KEYS), out
    return stage.add(out)


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


# --- stage 1


def stage_values_1m(stage):
    """The roofline, then the headline: DIPR at ``--context`` with the values on the host, and its check."""
    import jax
    import jax.numpy as jnp

    from bench import harness

    args = stage.args
    roof = {"kind": "roofline"}
    roof["hbm_copy_GBps"] = harness.measure_copy_bandwidth(nbytes=(1 << 30) if stage.gpu else (1 << 24)) / 1e9
    x = jnp.ones(((1 << 29) if stage.gpu else (1 << 20),), jnp.bfloat16)
    xh = jax.device_put(x, jax.memory.Space.Host)
    del x
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        jax.block_until_ready(jax.device_put(xh, jax.memory.Space.Device))
        ts.append(time.perf_counter() - t)
    roof["h2d_GBps"] = xh.nbytes / min(ts) / 1e9
    del xh
    stage.add(roof)
    cfg, model, proxy = setup(stage, args.context)
    stage.attempt("1M values on host", lambda: long_context(stage, model, proxy, cfg, args.context, "values-on-host"),
                  need_s=80)


def setup(stage, context: int):
    """``(cfg, model, proxy)`` for contexts up to ``context`` (a setup row)."""
    cfg = model_config(stage.args, context=context)
    model = build_model(cfg)
    proxy = ProxyLayers(cfg)
    stage.add({"kind": "setup", "what": "proxy period stores", "setup_s": proxy.setup_s, "layers": cfg.num_layers})
    return cfg, model, proxy


def long_context(stage, model, proxy, cfg, context: int, placement: str):
    """DIPR in ``placement`` at ``context`` (a main row, the HLO audited), then :func:`exact_check` on the
    same stores, whose result the main row gets as ``exact`` / ``exact_check``."""
    caches, build = proxy.caches(context, context + 64, placement)
    layer_host = build["host_bytes"] // cfg.num_layers
    attention = dipr_config(cfg, stage.args, placement)
    row, caches, _ = run_steps(stage, model, caches, proxy.qs, attention, steps=stage.args.steps,
                               what=f"dipr {placement}", context=context, audit_bytes=layer_host // 4,
                               hlo_name=f"beyond_gpu_hlo_{placement}_{context}.txt")
    main = main_row(stage, cfg, context, placement, row, caches, variant="dipr", **build,
                    dense_note=dense_arithmetic(cfg, context), exact=None, exact_check="not run (time budget)")
    layers = sorted({0, cfg.num_layers - 1})
    if stage.left() < 15:
        return
    try:
        checks = exact_check(caches, proxy.qs, attention, layers=layers, deadline=stage.deadline - 5)
    except Exception as e:  # the row says so; the stage goes on
        traceback.print_exc()
        main["exact_check"] = f"{type(e).__name__}: {str(e)[:400]}"
    else:
        main["exact_check"] = checks
        main["exact"] = bool(checks) and all(c["ok"] for c in checks)
    stage.flush()
    print(json.dumps({"exact_check": main["exact_check"], "context": context, "placement": placement},
                     default=str), flush=True)


def exact_check(caches, qs, attention, *, layers, deadline: float) -> list:
    """Per layer in ``layers`` (until ``deadline``): the step's DIPR call (same kernels and configuration)
    on that layer's store where it lies, with the layer's proxy query, against brute force over every key
    of the store (``brute_force.dipr_mask`` / ``dipr_attention`` on device copies of K and V; the refine's
    rounding slack). ``ok``: no false negatives (a key in range that the search did not find) and the output
    within the bf16 tolerance of the kernel benches (relative L2 ≤ 1.5e-2), finite."""
    import jax
    import jax.numpy as jnp

    from alaya_jax.attention.dipr.brute_force import dipr_attention, dipr_mask
    from alaya_jax.attention.dipr.filter_refine import dipr_store_attention
    from pallas_kernels.common import default_rounding_slack

    beta = jnp.float32(attention.beta)
    kw = dict(sink=attention.sink, window=attention.window)

    @jax.jit
    def check(q, store):
        out, _, got = dipr_store_attention(q, store, beta=beta, with_mask=True,
                                           implementation=attention.kernel.implementation,
                                           num_splits=attention.kernel.num_splits, **kw)
        k = store.dense_keys().transpose(0, 2, 1, 3)  # [B, S, Hkv, D] device copies
        v = store.dense_values().transpose(0, 2, 1, 3)
        want = dipr_mask(q, k, beta=beta, lengths=store.lengths)
        ref = dipr_attention(q, k, v, beta=beta, lengths=store.lengths,
                             rounding_slack=default_rounding_slack(q.shape[-1]), **kw)
        o, r = out.astype(jnp.float32), ref.astype(jnp.float32)
        rel = jnp.linalg.norm(o - r) / jnp.maximum(jnp.linalg.norm(r), 1e-30)
        return {"false_negatives": jnp.sum(want & ~got), "found_not_in_range": jnp.sum(got & ~want),
                "keys_in_range": jnp.sum(want), "out_rel_err": rel, "finite": jnp.all(jnp.isfinite(o))}

    rows = []
    for layer in layers:
        if time.time() > deadline:
            break
        t = time.perf_counter()
        r = {k: v.item() for k, v in jax.device_get(check(qs[layer], caches[layer])).items()}
        r.update(layer=layer, seconds=time.perf_counter() - t,
                 ok=bool(r["false_negatives"] == 0 and r["finite"] and r["out_rel_err"] <= 1.5e-2))
        rows.append(r)
    return rows


# --- stage 2


def stage_kv_host_dense(stage):
    """Keys and values on the host at the longest context the host holds, then dense at the longest context
    that fits the GPU (the K+V arrays freed first; their pinned pool regions stay for ``--host-at-dense``)."""
    import gc

    from alaya_jax.attention.config import AttentionConfig, KernelConfig

    args = stage.args
    context = host_kv_context(args)  # the driver passes it: the pinned pool was sized for it
    stage.add({"kind": "kv_host_choice", "context": context, "host_available_gib": host_available() / GIB,
               "kv_gib": per_token_kv_bytes(args) * context / GIB,
               "rule": ("--kv-host-context" if args.kv_host_context
                        else host_kv_context.__doc__.split("``,")[1].strip())})
    cfg, model, proxy = setup(stage, max(context, *args.dense_contexts))
    stage.attempt("keys and values on host", lambda: long_context(stage, model, proxy, cfg, context,
                                                                   "keys-and-values-on-host"), need_s=60)
    gc.collect()
    full = AttentionConfig(method="full", kernel=KernelConfig(prefill_attention="cudnn" if stage.gpu else "reference"))
    fits = {}

    def dense_at(context):
        caches, build = proxy.caches(context, context + 64, "device")
        row, caches, _ = run_steps(stage, model, caches, proxy.qs, full, steps=args.steps, what="dense",
                                   context=context)
        fits["context"], fits["dense"] = context, row["tokens_per_s"]
        main_row(stage, cfg, context, "device", row, caches, dense_tokens_per_s=row["tokens_per_s"],
                 variant="full-cudnn" if stage.gpu else "full-reference", **build,
                 dense_note=dense_arithmetic(cfg, context))
        row, caches, _ = run_steps(stage, model, caches, proxy.qs, dipr_config(cfg, args, "device"),
                                   steps=args.steps, what="dipr all on GPU", context=context)
        main_row(stage, cfg, context, "device", row, caches, dense_tokens_per_s=fits["dense"], variant="dipr", **build)

    for context in args.dense_contexts:
        got = stage.attempt(f"dense {context}", lambda c=context: dense_at(c), need_s=45, context=context)
        gc.collect()
        if "context" in fits or not (isinstance(got, dict) and got.get("oom")):
            break
    if "context" in fits and args.host_at_dense:
        def host_at_dense():
            c = fits["context"]
            caches, build = proxy.caches(c, c + 64, "values-on-host")
            row, caches, _ = run_steps(stage, model, caches, proxy.qs, dipr_config(cfg, args, "values-on-host"),
                                       steps=args.steps, what="dipr values on host", context=c)
            main_row(stage, cfg, c, "values-on-host", row, caches, dense_tokens_per_s=fits["dense"], variant="dipr",
                     **build)

        stage.attempt("values on host at the dense context", host_at_dense, need_s=45)


def dense_arithmetic(cfg, context: int) -> str:
    """Why dense attention at ``context`` does (not) fit this device: the memory estimate against the
    device's pool (``memory_stats()['bytes_limit']``)."""
    import jax

    from alaya_jax.runtime.memory_estimate import estimate_memory

    e = estimate_memory(cfg, context=context)
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    verdict = "" if limit is None else (f" {'>' if e.total_bytes > limit else '<='} the device pool of "
                                        f"{limit / GIB:.1f} GiB: {'does not fit' if e.total_bytes > limit else 'fits'}")
    return (f"{context} tokens dense: bf16 K + V {kv_bytes(cfg, context) / GIB:.1f} GiB + codes and scales "
            f"{(e.kv_bytes - kv_bytes(cfg, context)) / GIB:.1f} GiB + weights {e.weights_bytes / GIB:.1f} GiB = "
            f"{e.total_bytes / GIB:.1f} GiB{verdict}")


# --- stage 3


def stage_ttft(stage):
    """In the order of their importance: TTFT from the pinned-host tier (values on host, all on device)
    against the re-prefill, the chunked prefill's rate into host values (``--prefill-to-host``), the
    bit-for-bit check across placements, the TTFT with keys and values on the host."""
    import gc

    got = stage.attempt("ttft", lambda: TtftBench(stage), need_s=60)
    serve = got if callable(got) else None
    if serve is not None:
        for placement in ("values-on-host", "device"):
            stage.attempt(f"ttft {placement}", lambda p=placement: serve(p), need_s=20, placement=placement)
            gc.collect()
        if stage.args.prefill_to_host:
            stage.attempt("prefill values-on-host", lambda: serve.reprefill("values-on-host", 1), need_s=40,
                          placement="values-on-host")
            gc.collect()
    stage.attempt("exact", lambda: exact_across_placements(stage), need_s=30)
    gc.collect()
    if serve is not None:
        stage.attempt("ttft keys-and-values-on-host", lambda: serve("keys-and-values-on-host"), need_s=20,
                      placement="keys-and-values-on-host")
        serve.close()


def exact_across_placements(stage):
    import numpy as np

    from alaya_jax.store.placement import PLACEMENTS

    args = stage.args
    cfg = model_config(args, layers=args.exact_layers, context=args.exact_context)
    model = build_model(cfg)
    proxy = ProxyLayers(cfg)
    ref = {}

    def exact(placement):
        caches, build = proxy.caches(args.exact_context, args.exact_context + 64, placement)
        att = dipr_config(cfg, args, placement)
        row, _, trace = run_steps(stage, model, caches, proxy.qs, att, steps=args.exact_steps, what="exact",
                                  context=args.exact_context, audit_bytes=context_bytes(caches)[1] // cfg.num_layers
                                  // 2 if placement != "device" else 0)
        if placement == "device":
            ref["trace"] = trace
        want = ref["trace"]
        same_tok = all(np.array_equal(a[0], b[0]) for a, b in zip(trace, want))
        same_logits = all(np.array_equal(a[1], b[1]) for a, b in zip(trace, want))
        same_stats = all(all(np.array_equal(np.asarray(x[k]), np.asarray(y[k])) for x, y in zip(a[2], b[2])
                             for k in x) for a, b in zip(trace, want))
        diff = max(float(np.max(np.abs(a[1] - b[1]))) for a, b in zip(trace, want))
        stage.add({"kind": "exact", "context": args.exact_context, "layers": cfg.num_layers, "placement": placement,
                   "steps": len(trace), "tokens_identical": same_tok, "logits_identical": same_logits,
                   "dipr_stats_identical": same_stats, "max_abs_logit_diff": diff, "step_ms": row["step_ms"],
                   "hlo": row.get("hlo"), **build})

    for placement in PLACEMENTS:
        stage.attempt(f"exact {placement}", lambda p=placement: exact(p), need_s=10, placement=placement)
        if "trace" not in ref:
            break


class TtftBench:
    """Made with the 32-layer engine, its re-prefill timed (all on the device, a row) and the context's
    snapshot in a ContextDB on disk. ``self(placement)``: time to first token from the pinned-host memory
    tier in ``placement`` (a row); :meth:`reprefill`: the re-prefill in a placement (a row); :meth:`close`."""

    def __init__(self, stage):
        import gc

        import numpy as np

        from alaya_jax.runtime.engine import Engine
        from alaya_jax.runtime.sampling import SamplingConfig
        from alaya_jax.store import kv_store
        from alaya_jax.store.context_db import ContextDB

        self.stage = stage
        args = stage.args
        self.context = context = args.ttft_context
        self.cfg = cfg = model_config(args, context=context)
        self.dense = "cudnn" if stage.gpu else "reference"
        self.engine = Engine(build_model(cfg), block_size=64, prefill_chunk=args.prefill_chunk,
                             prefill_attention=self.dense)
        rng = np.random.default_rng(context)
        self.ctx = rng.integers(0, cfg.vocab_size, size=context).tolist()
        self.tail = rng.integers(0, cfg.vocab_size, size=TAIL).tolist()
        self.capacity = context + TAIL + 8
        self.one = SamplingConfig(max_new_tokens=1)
        self.kept = {}
        self.base = self.reprefill("device", args.ttft_reps, keep=True)
        caches = tuple(kv_store.truncate(c, context) for c in self.kept.pop("device"))
        self.kept.clear()
        gc.collect()
        self.root = tempfile.mkdtemp(prefix="beyond_gpu_db_")
        self.kw = dict(model_fingerprint="bench-ttft", tokenizer_fingerprint="ids", dtype=cfg.dtype, block_size=64,
                       memory_budget_bytes=int(1.5 * sum(x.nbytes for x in jax_leaves(caches))) + (1 << 26),
                       memory_kind="pinned_host")
        t = time.perf_counter()
        ContextDB(self.root, **self.kw).import_(self.ctx, caches)
        self.save_s = time.perf_counter() - t
        del caches
        gc.collect()

    def attention(self, placement):
        from alaya_jax.attention.config import AttentionConfig, KernelConfig

        return AttentionConfig(method="dipr", kernel=KernelConfig(implementation="pallas", kv_placement=placement))

    def reprefill(self, placement, reps, *, keep: bool = False):
        """The re-prefill of context + tail in ``placement`` (``reps`` timed runs after one with the compile; a
        row); ``keep``: its last caches stay in ``self.kept[placement]``."""
        import numpy as np

        times, n = [], self.context + TAIL
        for _ in range(reps + 1):
            self.kept.pop(placement, None)
            t = time.perf_counter()
            _, self.kept[placement] = self.engine.generate([self.ctx + self.tail], sampling=self.one,
                                                           attention=self.attention(placement), capacity=self.capacity)
            times.append(time.perf_counter() - t)
        if not keep:
            self.kept.pop(placement, None)
        med = float(np.median(times[1:]))
        return self.stage.add({"kind": "prefill", "context": n, "layers": self.cfg.num_layers,
                               "placement": placement, "attention": self.dense,
                               "prefill_chunk": self.stage.args.prefill_chunk,
                               "first_run_incl_compile_s": times[0], "prefill_s": med, "tokens_per_s": n / med,
                               "reps": reps})

    def __call__(self, placement):
        import numpy as np

        from alaya_jax.store.context_db import ContextDB

        args, context = self.stage.args, self.context
        db = ContextDB(self.root, kv_placement=placement, **self.kw)
        db.load(db.snapshot_id(self.ctx))  # fills this instance's pinned-host tier from disk (not timed)
        times, restores, tails = [], [], []
        for _ in range(args.ttft_reps + 1):
            t = time.perf_counter()
            session, todo = db.create_session(self.ctx + self.tail, capacity=self.capacity)
            res, final = self.engine.generate([todo], sampling=self.one, attention=self.attention(placement),
                                              caches=session.caches, capacity=self.capacity)
            times.append(time.perf_counter() - t)
            restores.append(session.restore_s)
            tails.append(res[0].ttft_s)
            assert session.source == "memory:pinned_host" and session.reused_tokens == context, session
            del session, final
        med = float(np.median(times[1:]))
        return self.stage.add({"kind": "ttft", "context": context, "tail": TAIL, "layers": self.cfg.num_layers,
                               "placement": placement, "source": "memory:pinned_host", "ttft_s": med,
                               "restore_s": float(np.median(restores[1:])),
                               "tail_prefill_first_token_s": float(np.median(tails[1:])),
                               "first_run_incl_compile_s": times[0], "reprefill_s": self.base["prefill_s"],
                               "speedup": self.base["prefill_s"] / med, "reps": args.ttft_reps,
                               "snapshot_save_s": self.save_s})

    def close(self):
        import shutil

        shutil.rmtree(self.root, ignore_errors=True)
        self.engine = None


# ----------------------------------------------------------------------------- markdown


def gib(x):
    return "" if x is None else f"{x / GIB:.1f}"


def fmt(x, spec):
    return "" if x is None else format(x, spec)


def dense_cell(r) -> str:
    note = r.get("dense_note") or ""
    return "does not fit" if "does not fit" in note else "not run here"


def exact_cell(r) -> str:
    checks = r.get("exact_check")
    if "exact_check" not in r:
        return ""
    if not isinstance(checks, list) or not checks:
        return f"not run: {checks}" if checks else "not run"
    fn = sum(c["false_negatives"] for c in checks)
    err = max(c["out_rel_err"] for c in checks)
    return (f"{'yes' if r.get('exact') else 'NO'}: layers {','.join(str(c['layer']) for c in checks)}, "
            f"{fn} FN, rel err {err:.1e}")


def markdown(rows, meta=None) -> str:
    meta = meta or next((r for r in rows if r.get("kind") == "meta"), {})
    out = ["# Contexts beyond GPU memory: random-weight Llama-3-8B, real-key-proxy caches, B = 1 (bench/beyond_gpu.py)",
           "", f"{meta.get('device')}, jax {meta.get('jax')}, jaxlib {meta.get('jaxlib')}, "
           f"triton {meta.get('triton')}, {meta.get('date')}, commit {meta.get('commit')}; pinned host pool limit "
           f"{meta.get('pinned_host_limit_gb')} GiB, host RAM available at start "
           f"{fmt(meta.get('host_mem_available_gib'), '.0f')} GiB.",
           "", "DIPR: Pallas kernels, exact (the refine reads the values — and with keys on the host the candidates' "
           "keys — from pinned host memory in place). Step = one jitted decode call incl. the host sync on the token "
           "(median). GPU context = the stores' device bytes as allocated; K+V = bf16 keys and values of the context.",
           "", "exact = the layers checked against brute force over every key on the same stores (false negatives, "
           "max relative L2 error of the output; ``exact_check``).",
           "", "| context | layers | placement | variant | tok/s | dense tok/s | GPU context GiB | K+V GiB | GPU/K+V | "
           "host GiB | candidates | exact | build s (host fill GB/s) |", "|" + "---|" * 13]
    for r in rows:
        if r.get("kind") == "main":
            out.append(f"| {r['context']} | {r['layers']} | {r['placement']} | {r.get('variant', '')} | "
                       f"{r['tokens_per_s']:.1f} | {fmt(r['dense_tokens_per_s'], '.1f') or dense_cell(r)} | "
                       f"{gib(r['gpu_context_bytes'])} | {gib(r['kv_bytes'])} | "
                       f"{r['gpu_context_fraction_of_kv']:.0%} | "
                       f"{gib(r['host_context_bytes'])} | {fmt(r.get('candidate_fraction'), '.2%')} | "
                       f"{exact_cell(r)} | {fmt(r.get('build_s'), '.1f')} ({fmt(r.get('host_fill_GBps'), '.1f')}) |")
    notes = [r["dense_note"] for r in rows if r.get("kind") == "main" and r.get("dense_note")]
    if notes:
        out += ["", "Dense memory arithmetic: " + "; ".join(sorted(set(notes))) + "."]
    ttft = [r for r in rows if r.get("kind") == "ttft"]
    pre = [r for r in rows if r.get("kind") == "prefill"]
    if ttft or pre:
        out += ["", "## Time to first token from the pinned-host memory tier, and prefill", "",
                "| context | placement | TTFT s | restore s | tail prefill + 1st token s | re-prefill s | × |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['context']} | {r['placement']} | {r['ttft_s']:.4f} | {r['restore_s']:.4f} | "
                f"{r['tail_prefill_first_token_s']:.4f} | {r['reprefill_s']:.3f} | {r['speedup']:.1f} |" for r in ttft]
        out += ["", "| prefill tokens | placement | attention | chunk | s | tok/s | first run incl. compile s |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['context']} | {r['placement']} | {r['attention']} | {r['prefill_chunk']} | "
                f"{r['prefill_s']:.3f} | "
                f"{r['tokens_per_s']:.0f} | {r['first_run_incl_compile_s']:.1f} |" for r in pre]
    ex = [r for r in rows if r.get("kind") == "exact"]
    if ex:
        out += ["", "## Exactness across placements (bit for bit against all on device)", "",
                "| context | layers | placement | steps | tokens | logits | DIPR stats | step ms | "
                "large host copies in HLO |",
                "|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['context']} | {r['layers']} | {r['placement']} | {r['steps']} | {r['tokens_identical']} | "
                f"{r['logits_identical']} | {r['dipr_stats_identical']} | {r['step_ms']:.2f} | "
                f"{'' if not r.get('hlo') else r['hlo']['whole_array_transfer_count']} |" for r in ex]
    audits = [(r["context"], r["placement"], r["hlo"]) for r in rows if r.get("kind") == "main" and r.get("hlo")]
    for c, p, h in audits:
        out.append(f"\nHLO of the {c}-token {p} step: {h['whole_array_transfer_count']} whole-array host transfers "
                   f"{h['whole_array_transfers']}; instructions taking a large host buffer: "
                   f"{h['large_host_operands']}.")
    roof = [r for r in rows if r.get("kind") == "roofline"]
    if roof:
        out.append(f"\nMeasured in the run: HBM copy {roof[0]['hbm_copy_GBps']:.0f} GB/s, pinned host → device "
                   f"{roof[0]['h2d_GBps']:.1f} GB/s.")
    other = [r for r in rows if r.get("kind") in ("error", "skipped", "stage_failed")]
    if other:
        out += ["", "Not run / failed:"] + [f"- {r.get('what', r.get('stage'))}: {r.get('error', r.get('why'))}"
                                            for r in other]
    out.append("\nStages: " + ", ".join(f"{r['stage']} rc {r['rc']} ({r['seconds']} s)" for r in rows
                                         if r.get("kind") == "stage"))
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- main


def parse(argv):
    from bench import harness

    ap = harness.parser(__doc__.split("\n")[0], "beyond_gpu", smoke="CPU: tiny shapes, interpret mode")
    ap.add_argument("--model", default="llama3-8b", choices=("llama3-8b", "smollm2-2l"))
    ap.add_argument("--context", type=int, default=1 << 20, help="the long context with values on the host")
    ap.add_argument("--dense-contexts", type=int, nargs="+", default=[786432, 720896, 655360, 524288],
                    help="tried longest first: dense cuDNN (and DIPR all on GPU) at the first that fits")
    ap.add_argument("--host-at-dense", type=int, default=0, help="also DIPR with values on host at the dense context")
    ap.add_argument("--kv-host-context", type=int, default=0, help="keys and values on the host (0: from MemAvailable)")
    ap.add_argument("--ttft-context", type=int, default=32768)
    ap.add_argument("--ttft-reps", type=int, default=2)
    ap.add_argument("--prefill-to-host", type=int, default=1,
                    help="time the 32-layer chunked re-prefill into values on the host (0: not run)")
    ap.add_argument("--prefill-chunk", type=int, default=2048)
    ap.add_argument("--exact-context", type=int, default=32768)
    ap.add_argument("--exact-layers", type=int, default=4)
    ap.add_argument("--exact-steps", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--beta64", type=float, default=24.0, help="DIPR β at d=64, scaled by sqrt(D/64)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help=f"wall-clock budget of the stages, default the sum of the chosen stages' shares "
                    f"({sum(RESERVE.values()):.0f} for all; smoke: 900); a "
                    f"stage still running {GRACE_S:.0f} s past its share is killed, so the run ends within the "
                    f"budget + {GRACE_S:.0f} s")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                    help="which stages run (in their fixed order; e.g. a re-run of one)")
    ap.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    ap.add_argument("--rows-file", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.smoke:
        args.model, args.context, args.dense_contexts = "smollm2-2l", 2048, [1024]
        args.ttft_context, args.ttft_reps, args.prefill_chunk = 512, 1, 256
        args.exact_context, args.exact_layers, args.exact_steps, args.steps = 1024, 2, 2, 2
        args.kv_host_context = args.kv_host_context or 1024
        args.host_at_dense = args.prefill_to_host = 1  # every code path
    if args.budget_s is None:
        args.budget_s = 900.0 if args.smoke else sum(RESERVE[s] for s in args.stages)
    return args


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.stage is None:
        return drive(args, [a for a in argv])
    stage = Stage(args)
    {"values_1m": stage_values_1m, "kv_host_dense": stage_kv_host_dense, "ttft": stage_ttft}[args.stage](stage)
    return 0


if __name__ == "__main__":
    sys.exit(main())
