"""CPU pre-flight of the DIPR kernels for the GPU (no GPU needed): lower each Pallas kernel of the decode
step (code scan, refine score pass, refine attend pass) at Llama-3-8B shapes to Triton IR for the cuda
platform (``jax.export``), and — with ``--triton-python`` naming a Python that has triton installed — compile
each IR for sm_90 (the H200) with its launch knobs, reporting registers, spills and shared memory, and the
instruction counts of the PTX that matter for the scan (MMAs, cp.async, barriers, shared-memory traffic).

    python -m bench.diag.triton_preflight                                  # lowering only
    python -m bench.diag.triton_preflight --triton-python /tmp/tvenv/bin/python --out /tmp/preflight

It catches unsupported primitives and compile failures before a GPU run; jaxlib's own Triton (inside
XLA) does the GPU compile, so a pip triton of the same version is close to, not the same as, that path.
It reads the Triton IR through a private hook of jax's Pallas-Triton lowering (diagnostics only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp

_COMPILE = r'''
import json, os, re, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def sass_loop(cubin):
    # (registers, SASS instructions of the longest loop body: the tile loop of the scan)
    res = subprocess.run([os.path.join(BIN, "cuobjdump"), "--dump-resource-usage", cubin], capture_output=True,
                         text=True).stdout
    regs = re.search(r"REG:(\d+)", res)
    lines = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", cubin], capture_output=True, text=True).stdout
    lines = lines.splitlines()
    labels = {ln.strip().rstrip(":"): i for i, ln in enumerate(lines) if re.match(r"^\.L_x_\d+:", ln.strip())}
    best = 0
    for i, ln in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", ln)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            n = sum(1 for x in lines[labels[m.group(1)]:i + 1] if re.search(r"/\*[0-9a-f]{4}\*/", x))
            best = max(best, n)
    return (int(regs.group(1)) if regs else None), best


rows = []
for e in json.load(open(sys.argv[1])):
    try:
        k = triton.compile(e["file"], target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=e["num_warps"], num_stages=e["num_stages"]))
        ptx = k.asm.get("ptx", "")
        r = dict(name=e["name"], ok=True, shared=getattr(k.metadata, "shared", None))
        for op in ("mma.sync", "wgmma", "cp.async", "bar.sync", "ldmatrix", "st.shared", "ld.shared", "shfl.sync"):
            r[op] = ptx.count(op)
        open(e["file"].replace(".ttir", ".ptx"), "w").write(ptx)
        cub = e["file"].replace(".ttir", ".cubin")
        open(cub, "wb").write(k.asm["cubin"])
        try:
            r["regs"], r["sass_longest_loop"] = sass_loop(cub)
            if e.get("tile"):
                r["thread_instr_per_key"] = round(r["sass_longest_loop"] * 32 * e["num_warps"] / e["tile"])
        except Exception as ex:
            r["sass_error"] = str(ex)[:200]
    except Exception as ex:
        r = dict(name=e["name"], ok=False, error=f"{type(ex).__name__}: {str(ex)[:600]}")
    rows.append(r)
    print(json.dumps(r), flush=True)
'''


def kernels(b: int, s: int, *, hq=32, hkv=8, d=128, sink=4, window=64):
    """[(name, fn, abstract args, launch knobs)] of one DIPR decode layer at these shapes."""
    from pallas_kernels.code_scan.api import EPILOGUE_CHUNK, default_num_splits, list_size, scan_tile
    from pallas_kernels.code_scan.kernel_triton import scan_pallas
    from pallas_kernels.common import default_rounding_slack
    from pallas_kernels.refine_attention.api import DEFAULT_CHUNK, default_programs
    from pallas_kernels.refine_attention.attend_triton import attend_pallas
    from pallas_kernels.refine_attention.score_triton import score_pallas

    sds = jax.ShapeDtypeStruct
    g = hq // hkv
    ns, p = default_num_splits(b, hkv, s), default_programs(b, hkv)
    ls = list_size(s, ns)
    sl = -(-s // DEFAULT_CHUNK) * DEFAULT_CHUNK
    rows = max(8, g)
    slack = default_rounding_slack(d)
    bf = jnp.bfloat16
    kv = sds((b, hkv, s, d), bf)
    grp = lambda dt: sds((b, hkv, g, d), dt)  # noqa: E731
    vec = sds((b, hkv, g), jnp.float32)
    scan = (lambda *x, **tail: scan_pallas(*x, g=g, sink=sink, window=window, tile=scan_tile(s), num_splits=ns,
                                           list_size=ls, chunk=EPILOGUE_CHUNK, rounding_slack=slack, interpret=False,
                                           **tail),
            (sds((b,), jnp.int32), sds((b,), jnp.int32), sds((b,), jnp.int32), grp(bf), grp(jnp.float32), vec, vec, kv,
             sds((b, hkv, s, d // 2), jnp.uint8),
             sds((b, hkv, s), jnp.float16), sds((b, hkv, s), jnp.float16)),
            dict(num_warps=4, num_stages=3, tile=scan_tile(s)))
    score = (lambda *x: score_pallas(*x, g=g, chunk=DEFAULT_CHUNK, programs=p, interpret=False),
             (sds((b, hkv, ns), jnp.int32), sds((b, hkv, ns, ls), jnp.int32), grp(bf), kv),
             dict(num_warps=4, num_stages=2))
    attend = (lambda *x: attend_pallas(*x, g=g, sink=sink, window=window, chunk=DEFAULT_CHUNK, sm_scale=d ** -0.5,
                                       rounding_slack=slack, interpret=False),
              (sds((b,), jnp.int32), sds((b,), jnp.int32), sds((b,), jnp.int32), sds((b, hkv, ns), jnp.int32),
               sds((b, hkv, sl), jnp.int32),
               sds((b, hkv, sl, g), jnp.float32), sds((b, hkv, sl), jnp.float32),
               sds((b, hkv, p, rows), jnp.float32), vec, vec, grp(bf), kv, kv), dict(num_warps=4, num_stages=2))
    # the estimated tail's variants (issue 21): the block means [B, Hkv, S/64, D] bf16, the scan's estimates
    vm = sds((b, hkv, s // 64, d), bf)
    scan_tail = (lambda *x: scan[0](*x[:-1], value_means=x[-1], block_size=64, sm_scale=d ** -0.5),
                 (*scan[1], vm), scan[2])
    attend_tail = (lambda *x: attend_pallas(*x[:-2], g=g, sink=sink, window=window, chunk=DEFAULT_CHUNK,
                                            sm_scale=d ** -0.5, rounding_slack=slack, interpret=False, est=x[-2],
                                            value_means=x[-1], block_size=64),
                   (*attend[1], sds((b, hkv, s, g), jnp.float32), vm), attend[2])
    tag = f"B{b}_S{s}"
    return [(f"{tag}/code_scan", *scan), (f"{tag}/refine_score", *score), (f"{tag}/refine_attend", *attend),
            (f"{tag}/code_scan_tail", *scan_tail), (f"{tag}/refine_attend_tail", *attend_tail)]


def lower_all(cases, out_dir):
    """Export every kernel for cuda; write its Triton IR to out_dir; returns (index, failures)."""
    from jax import export
    import jax._src.pallas.triton.pallas_call_registration as reg

    dumps = []
    orig = reg.lowering.lower_jaxpr_to_triton_module

    def hook(*a, **k):
        res = orig(*a, **k)
        dumps.append(res.module.operation.get_asm(enable_debug_info=False))
        return res

    reg.lowering.lower_jaxpr_to_triton_module = hook
    dis = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    index, bad = [], 0
    try:
        for b, s in cases:
            for name, fn, args, knobs in kernels(b, s):
                dumps.clear()
                try:
                    export.export(jax.jit(fn), platforms=("cuda",), disabled_checks=dis)(*args)
                    for i, txt in enumerate(dumps):
                        path = os.path.join(out_dir, f"{name.replace('/', '__')}_{i}.ttir")
                        with open(path, "w") as f:
                            f.write(txt)
                        index.append(dict(name=name, file=path, **knobs))
                    print(f"lowered {name}", flush=True)
                except Exception as ex:  # noqa: BLE001 - report every kernel
                    bad += 1
                    print(f"FAILED {name}: {type(ex).__name__}: {str(ex)[:800]}", flush=True)
    finally:
        reg.lowering.lower_jaxpr_to_triton_module = orig
    return index, bad


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/alaya-triton-preflight")
    ap.add_argument("--triton-python", default=None, help="a Python with triton installed (compile for sm_90)")
    ap.add_argument("--cases", nargs="+", default=["1:131072", "1:524288", "8:131072"], help="B:S")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    cases = [tuple(int(x) for x in c.split(":")) for c in a.cases]
    index, bad = lower_all(cases, a.out)
    with open(os.path.join(a.out, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
    print(f"lowering: {len(index)} kernels, {bad} failed", flush=True)
    if a.triton_python:
        script = os.path.join(a.out, "compile.py")
        with open(script, "w") as f:
            f.write(_COMPILE)
        r = subprocess.run([a.triton_python, script, os.path.join(a.out, "index.json")], text=True)
        bad += r.returncode != 0
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
