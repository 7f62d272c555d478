"""Diagnose the code scan's exact forced max (m_sw) on a GPU: Pallas kernel vs jnp reference vs
NumPy float64 on the same f32 inputs (the kernel test's gauss-4-64-float32 case). Prints the max
relative error of each against float64, and of XLA's f32 einsum at DEFAULT and HIGHEST precision.
"""
import json


import jax
import jax.numpy as jnp
import numpy as np

from bench import harness
from pallas_kernels import code_scan
from pallas_kernels.code_scan.api import IMPLEMENTATIONS
from pallas_kernels.code_scan.layout import forced_positions
from pallas_kernels.testing import case_betas, make_coded_case

SINK, WINDOW = 4, 64
c = make_coded_case("gauss", g=4, hkv=2, d=64, dtype=jnp.float32, seed=68, max_in_window=True)
beta = jnp.asarray(case_betas("gauss", *c["q"].shape[:2]))
out = {}
for impl in IMPLEMENTATIONS:
    r = jax.jit(lambda *a, impl=impl: code_scan(*a, sink=SINK, window=WINDOW, num_splits=3, implementation=impl))(
        c["q"], c["q_rot"], c["keys"], c["codes"], c["scales"], c["errs"], c["lengths"], beta)
    out[impl] = np.asarray(r[2], np.float64)
b, hq, d = c["q"].shape
hkv = c["keys"].shape[1]
g = hq // hkv
want = np.full((b, hq), -np.inf)
for i, L in enumerate(np.asarray(c["lengths"])):
    pos, ok = (np.asarray(x) for x in forced_positions(int(L), sink=SINK, window=WINDOW, size=128))
    pos = pos[ok]
    for h in range(hq):
        if len(pos):
            want[i, h] = np.max(c["keys64"][i, h // g, pos] @ c["q64"][i, h])
fin = np.isfinite(want)
rep = {k: float(np.max(np.abs(v[fin] - want[fin]) / np.abs(want[fin]))) for k, v in out.items()}
qg = jnp.asarray(c["q"]).reshape(b, hkv, g, d)
kk = jnp.nan_to_num(jnp.asarray(c["keys"]))
for prec in ("default", "highest"):
    s = np.asarray(jnp.einsum("bhgd,bhsd->bhgs", qg, kk, precision=prec), np.float64).reshape(b, hq, -1)
    s64 = np.einsum("bhgd,bhsd->bhgs", np.asarray(qg, np.float64), np.asarray(kk, np.float64)).reshape(b, hq, -1)
    rep[f"xla_einsum_{prec}_max_rel"] = float(np.max(np.abs(s - s64)) / np.max(np.abs(s64)))
rep.update(harness.run_meta())
print("MSW_DIAG", json.dumps(rep), flush=True)
