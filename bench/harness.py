"""The benchmarks' one harness: common flags, where results go, the run's metadata, timing,
and writing results (JSON + markdown, atomically).

Every benchmark runs as a module from the repository root (``python -m bench.dipr_real_keys``,
no ``sys.path`` edits) and writes into ``bench/results/<benchmark>/`` unless ``--out`` (or
``$OUT`` on the device machine) says otherwise::

    ap = harness.parser(__doc__, "dipr_real_keys", smoke="CPU: tiny shapes, interpret mode")
    args = ap.parse_args()
    meta = harness.run_meta(batch=args.batch)            # device, versions, date, commit
    harness.write_results(args.out, "dipr_real_keys", {"meta": meta, "rows": rows}, markdown)

Timing is the way a model uses attention: ``L`` layers inside one jit, each with its own
keys/values (so nothing is served from L2), each layer's query depending on the previous
layer's output; a figure is the median wall time of the whole jitted call over ``iters``
runs after a warm-up, divided by L (:func:`layered`, :func:`timed`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import tempfile
import time
from typing import Optional

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


def timed_rounds(fn, args, iters: int, rounds: int = 5):
    """Two timings of ``fn(*args)`` after one warm-up: (dict(s=median over ``rounds`` of ``iters``
    back-to-back calls blocked once (host dispatch overlapped; the figure a model's step sees), s_blocked=
    median of ``iters`` calls blocked one by one (:func:`timed`'s figure)) in seconds per call, last output)."""
    out = fn(*args)
    jax.block_until_ready(out)
    per = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        per.append((time.perf_counter() - t) / iters)
    blocked, out = timed(fn, args, iters)
    return {"s": float(np.median(per)), "s_min": float(np.min(per)), "s_blocked": blocked}, out


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


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def results_dir(benchmark: str) -> str:
    """``bench/results/<benchmark>``: where a benchmark's current results live."""
    return os.path.join(RESULTS, benchmark)


class _Parser(argparse.ArgumentParser):
    """Fills in ``--out`` after parsing: a ``--smoke`` run never writes over the recorded results."""

    def __init__(self, *a, benchmark: str, out_env: bool, **kw):
        super().__init__(*a, **kw)
        self._benchmark, self._out_env = benchmark, out_env

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        if ns.out is None:
            env = os.environ.get("OUT") if self._out_env else None
            smoke = os.path.join(tempfile.gettempdir(), "alaya-bench-smoke", self._benchmark)
            ns.out = env or (smoke if getattr(ns, "smoke", False) else results_dir(self._benchmark))
        return ns


def parser(doc: Optional[str], benchmark: str, *, smoke: Optional[str] = None,
           out_env: bool = True) -> argparse.ArgumentParser:
    """An argument parser with the flags every benchmark shares: ``--out`` (default ``$OUT`` when
    ``out_env`` and set; else ``bench/results/<benchmark>``, or a temporary directory for a
    ``--smoke`` run) and, when ``smoke`` says what it does, ``--smoke`` (a small run that must
    work on the CPU)."""
    ap = _Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, benchmark=benchmark,
                 out_env=out_env)
    where = ("$OUT, else " if out_env else "") + f"bench/results/{benchmark}"
    ap.add_argument("--out", default=None, help=f"output directory (default: {where}; --smoke: a temporary one)")
    if smoke is not None:
        ap.add_argument("--smoke", action="store_true", help=smoke)
    return ap


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temporary sibling, then a rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, data) -> None:
    """``data`` as indented JSON at ``path``, atomically (numbers and strings the json module can write;
    anything else by ``str``)."""
    write_text(path, json.dumps(data, indent=1, default=str))


def write_results(out: str, name: str, data, markdown: Optional[str] = None) -> None:
    """``<out>/<name>.json`` (and ``<out>/<name>.md`` when ``markdown`` is given), each atomically."""
    write_json(os.path.join(out, f"{name}.json"), data)
    if markdown is not None:
        write_text(os.path.join(out, f"{name}.md"), markdown)


def commit() -> str:
    env = os.environ.get("ALAYA_COMMIT")
    if env:
        return env
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_meta(**extra) -> dict:
    """Device, versions (jax, jaxlib, triton, numpy, python), CPU, date and commit of this run,
    plus ``extra``."""
    meta = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
            "jax": jax.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "cpu": cpu_name(), "cores": os.cpu_count(), "date": utc_now(),
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
