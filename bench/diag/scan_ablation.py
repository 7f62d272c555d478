"""Where the code scan's time goes (GPU): the raw scan kernel at Llama-3-8B shapes timed whole and
with parts cut away (``code_scan_pallas(ablate=...)``: load only; + unpack and MMAs; + bound and
candidate test without compaction), B=1 and B=8 at 128K, tile 64, 4 warps. Prints JSON lines and
writes scan_ablation.json into --out.

    python bench/diag/scan_ablation.py --out $OUT
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import kernels_codes_gpu as k  # noqa: E402
from pallas_kernels._common import default_rounding_slack  # noqa: E402
from pallas_kernels.code_scan.api import pallas_scan_inputs  # noqa: E402
from pallas_kernels.code_scan.kernel_triton import code_scan_pallas  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--smoke", action="store_true")
    a = ap.parse_args()
    interp = a.smoke
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
            fn = lambda *x, ab=ablate: code_scan_pallas(*x, interpret=interp, ablate=ab, **static)  # noqa: E731
            us, us_min = k.per_layer_us(fn, [x for x, _ in ins], 2 if a.smoke else a.reps)
            byts = b * k.HKV * s * (k.D // 2 + 4)
            r = dict(batch=b, context=s, splits=ns, tile=tile, ablate=ablate, us=round(us, 2), us_min=round(us_min, 2),
                     TBps=round(byts / (us * 1e-6) / 1e12, 3), device=str(jax.devices()[0].device_kind),
                     jax=jax.__version__)
            print(json.dumps(r), flush=True)
            rows.append(r)
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "scan_ablation.json"), "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
