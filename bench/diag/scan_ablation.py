"""Where the code scan's time goes (GPU): the raw scan kernel at Llama-3-8B shapes timed whole and
with parts cut away (``ablated_code_scan_pallas(ablate=...)``: load only; + unpack and MMAs; + bound and
candidate test without compaction), B=1 and B=8 at 128K, tile 64, 4 warps. Prints JSON lines and
writes scan_ablation.json into --out.

    python -m bench.diag.scan_ablation --out $OUT
"""
import functools
import json
import os


import jax
import jax.numpy as jnp
from bench import harness
from bench import kernels_codes_gpu as k

from pallas_kernels.code_scan.api import pallas_scan_inputs
from pallas_kernels.code_scan.kernel_triton import ablated_code_scan_pallas, code_scan_pallas
from pallas_kernels.common import default_rounding_slack


def main():
    ap = harness.parser(__doc__.split("\n\n")[0], "scan_ablation", smoke="CPU: 2K keys, interpret mode")
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    interp = a.smoke
    meta = harness.run_meta()
    rows = []
    cases = [(1, 2048, 2)] if a.smoke else [(1, 1 << 17, 4), (8, 1 << 17, 2)]
    for b, s, layers in cases:
        tile = 64
        ns = k.num_splits_for(b, s, tile, 512)
        lengths = jnp.full((b,), s, jnp.int32)
        lays = [k.make_layer(kk, b, s) for kk in jax.random.split(jax.random.PRNGKey(b), layers)]
        betas = [k.calibrate_beta(lay, lengths, 0.05) for lay in lays]
        cap = k.capacity_for(s, ns, 0.05)
        ins = [pallas_scan_inputs(l_["q"], l_["q_rot"], l_["keys"], l_["codes"], l_["scales"], l_["errs"], lengths,
                                  bt, sink=k.SINK, window=k.WINDOW, num_splits=ns, capacity=cap, tile_size=tile,
                                  rounding_slack=default_rounding_slack(k.D)) for l_, bt in zip(lays, betas)]
        static = ins[0][1]
        for ablate in ("load_only", "estimate_only", "no_compaction", "none"):
            scan = code_scan_pallas if ablate == "none" else functools.partial(ablated_code_scan_pallas, ablate=ablate)
            fn = lambda *x, scan=scan: scan(*x, interpret=interp, **static)  # noqa: E731
            us, us_min = k.per_layer_us(fn, [x for x, _ in ins], 2 if a.smoke else a.reps)
            byts = b * k.HKV * s * (k.D // 2 + 4)
            r = dict(batch=b, context=s, splits=ns, tile=tile, ablate=ablate, us=round(us, 2), us_min=round(us_min, 2),
                     TBps=round(byts / (us * 1e-6) / 1e12, 3), **meta)
            print(json.dumps(r), flush=True)
            rows.append(r)
        harness.write_json(os.path.join(a.out, "scan_ablation.json"), rows)


if __name__ == "__main__":
    main()
