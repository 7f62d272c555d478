"""Shared pieces of the GPU attention benchmarks: copy bandwidth, median timing, the layered
loop (L layers in one jit, each with its own K/V, queries chained), dense baselines, and the
run's metadata (device, versions, commit).

Timing is the way a model uses attention: ``L`` layers inside one jit, each with its own
keys/values (so nothing is served from L2), each layer's query depending on the previous
layer's output; a figure is the median wall time of the whole jitted call over ``iters``
runs after a warm-up, divided by L.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np


def measure_copy_bandwidth(nbytes: int = 4 << 30, iters: int = 10) -> float:
    """Bytes/s of an elementwise pass over ``nbytes`` (read + write counted)."""
    x = jnp.ones((nbytes // 2,), jnp.bfloat16)
    f = jax.jit(lambda a: a * 2)
    f(x).block_until_ready()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        f(x).block_until_ready()
        ts.append(time.perf_counter() - t)
    del x
    return 2 * nbytes / float(np.median(ts))


def timed(fn, args, iters: int):
    """(median seconds of ``fn(*args)`` over ``iters`` runs after one warm-up, last output)."""
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
    """jit of L chained calls ``attn(q_i, layer_i)``: layer i's own query gets a tiny dependence
    on layer i−1's output (so XLA cannot run the layers concurrently or drop any)."""

    def run(qs, layers):
        acc = jnp.zeros(qs[0].shape, jnp.float32)
        prev = jnp.zeros(qs[0].shape, jnp.float32)
        for q, lay in zip(qs, layers):
            q = (q.astype(jnp.float32) + 1e-6 * prev).astype(q.dtype)
            out = attn(q, lay)
            prev = out.astype(jnp.float32)
            acc = acc + prev
        return acc

    return jax.jit(run)


def dense_fns() -> dict:
    """Dense decode attention over ``lay = (k, v)`` in cuDNN's layout [B, S, Hkv, D]; q [B, Hq, D]."""

    def cudnn(q, lay):
        k, v = lay
        return jax.nn.dot_product_attention(q[:, None], k, v, implementation="cudnn")[:, 0]

    def xla(q, lay):
        k, v = lay
        return jax.nn.dot_product_attention(q[:, None], k, v, implementation="xla")[:, 0]

    def plain(q, lay):
        k, v = lay
        b, s, hkv, d = k.shape
        hq = q.shape[1]
        qg = q.reshape(b, hkv, hq // hkv, d)
        sc = jnp.einsum("bhgd,bshd->bhgs", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
        p = jax.nn.softmax(sc, axis=-1).astype(v.dtype)
        return jnp.einsum("bhgs,bshd->bhgd", p, v, preferred_element_type=jnp.float32).reshape(b, hq, d).astype(q.dtype)

    return {"cudnn": cudnn, "xla": xla, "jnp": plain}


def commit() -> str:
    env = os.environ.get("ALAYA_COMMIT")
    if env:
        return env
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_meta(**extra) -> dict:
    """Device, versions, date and commit of this run."""
    meta = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "jax": jax.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": commit(), "xla_flags": os.environ.get("XLA_FLAGS", "")}
    try:
        import jaxlib

        meta["jaxlib"] = jaxlib.__version__
    except Exception:  # pragma: no cover
        pass
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:
        meta["triton"] = None
    meta.update(extra)
    return meta
