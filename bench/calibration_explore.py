"""What predicts the output error of DIPR, to choose a β per (layer, head) from the prompt's own queries.

One context of ``pydoc_data.topics`` (default 4096 tokens): prefill, full-attention reference over the last
S tokens (shared, :mod:`alaya_jax.runtime.evaluation`), calibration curves on the ``n_cal`` prompt queries before the
scored span and — as an oracle — on the scored steps' own queries (full attention). Then several ways of
turning curves into βs are scored by KL to full attention at equal key budgets:

- the allocations of :data:`alaya_jax.attention.dipr.calibration.ALLOCATIONS` (per head or per layer; gain = share
  of the mass outside sink and window — the criterion the issue warns about —, absolute recall, or value-weighted mass);
- the same allocations on the scored steps' own curves (fitted on what is scored: an upper reference);
- uniform β, top-k, top-p on the same reference.

    python -m bench.calibration_explore --context 4096
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from alaya_jax.attention.config import AttentionConfig, CalibrationConfig
from alaya_jax.attention.dipr import calibration as cal
from alaya_jax.runtime.corpus import pydoc_topics
from alaya_jax.runtime.engine import Engine
from alaya_jax.runtime.evaluation import prepare_reference, score_against
from bench import harness


def main(argv=None):
    ap = harness.parser(__doc__, "calibration_explore", out_env=False)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--n-cal", type=int, default=64)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.025, 0.03, 0.04])
    ap.add_argument("--allocations", nargs="+", default=["head-mass", "layer-mass", "head-recall", "layer-recall",
                                                          "head-vdist", "layer-vdist"], choices=cal.ALLOCATIONS)
    ap.add_argument("--oracle", nargs="*", default=["layer-recall"], choices=cal.ALLOCATIONS,
                    help="allocations also run on the scored steps' own curves (fitted on what is scored)")
    ap.add_argument("--betas", type=float, nargs="*", default=[24.0, 32.0])
    ap.add_argument("--topk", type=float, nargs="*", default=[0.025, 0.03])
    ap.add_argument("--topp", type=float, nargs="*", default=[0.8])
    ap.add_argument("--masses", type=float, nargs="*", default=[])
    args = ap.parse_args(argv)
    from models import load_smollm2

    _, model, tok = load_smollm2(dtype="float32")
    engine = Engine(model, prefill_chunk=512)
    tokens = tok.encode(pydoc_topics())[: args.context]
    n, s = args.context, args.steps
    p = n - s - 1
    path = os.path.join(args.out, f"calibration_explore_{n}.json")
    res = {"context": n, "steps": s, "n_cal": args.n_cal, "text": "pydoc_data.topics", "rows": [], "curves": {}}

    def save():
        harness.write_json(path, res)

    t0 = time.perf_counter()
    ref = prepare_reference(engine, tokens, prefill_tokens=p)
    print(f"reference {time.perf_counter() - t0:.0f}s", flush=True)
    sw = dict(sink=4, window=64)
    cv = engine.calibration_curves(ref.caches, [tokens[p - args.n_cal:p]], **sw)
    # Oracle: the scored steps' own queries (full attention) over a cache holding them.
    caches = engine.new_caches(batch=1, capacity=n)
    caches, _, _ = engine.prefill(caches, [tokens[: n - 1]])
    ov = engine.calibration_curves(caches, [tokens[p : n - 1]], **sw)
    del caches
    print(f"curves {time.perf_counter() - t0:.0f}s", flush=True)
    L, _, H, G = cv.mass.shape
    grid = cv.grid
    for nm, c in (("cal", cv), ("scored", ov)):
        res["curves"][nm] = {"mass": c.mass[:, 0].tolist(), "keys": c.keys[:, 0].tolist(),
                             "spread": c.spread[:, 0].tolist(), "recall": c.recall[:, 0].tolist(),
                             "vmass": c.vmass[:, 0].tolist()}
    # Does a head's calibration curve predict its curve on the scored steps?
    pred = {}
    for b in (8.0, 16.0, 24.0, 32.0, 48.0):
        j = int(np.searchsorted(grid, b))
        mc, ms = cv.mass[:, 0, :, j].ravel(), ov.mass[:, 0, :, j].ravel()
        kc, ks = cv.keys[:, 0, :, j].ravel(), ov.keys[:, 0, :, j].ravel()
        pred[str(b)] = {"mass_corr": float(np.corrcoef(mc, ms)[0, 1]), "mass_mae": float(np.abs(mc - ms).mean()),
                        "mass_cal_mean": float(mc.mean()), "mass_scored_mean": float(ms.mean()),
                        "keys_corr": float(np.corrcoef(kc, ks)[0, 1]),
                        "layer_mass_corr": float(np.corrcoef(cv.mass[:, 0, :, j].mean(-1),
                                                             ov.mass[:, 0, :, j].mean(-1))[0, 1])}
    res["predictability"] = pred
    print(json.dumps(pred, indent=1), flush=True)
    save()

    def run(family, name, cfg, betas=None, extra=None):
        t1 = time.perf_counter()
        r = score_against(engine, ref, cfg, betas=betas)
        kept = ("kl_to_full", "keys_fraction", "ppl", "ppl_full", "ppl_increase", "top1_agreement", "attention_recall")
        row = {"family": family, "name": name, **{k: r[k] for k in kept},
               **({"calibration": r["calibration"]} if "calibration" in r else {}),
               **({"betas": np.asarray(betas)[:, 0].tolist()} if betas is not None else {}), **(extra or {})}
        res["rows"].append(row)
        save()
        print(f"{name:40s} keys {row['keys_fraction']:.2%} KL {row['kl_to_full']:.4f} ppl {row['ppl_increase']:+.2%} "
              f"top1 {row['top1_agreement']:.2f} [{time.perf_counter() - t1:.0f}s]", flush=True)

    calcfg = AttentionConfig(method="dipr", **sw, calibration=CalibrationConfig(dipr_keys=0.03, n_cal=args.n_cal))
    allocs = args.allocations
    for F in args.budgets:
        for alloc in allocs:
            run(alloc, f"{alloc} F={F}", calcfg, cal.choose_betas(cv, keys=F, allocation=alloc))
        for alloc in args.oracle:
            run(f"oracle {alloc}", f"oracle {alloc} F={F}", calcfg, cal.choose_betas(ov, keys=F, allocation=alloc))
    for b in args.betas:
        run("uniform", f"dipr β={b:g}", AttentionConfig(method="dipr", beta=b, **sw))
    for frac in args.topk:
        k = int(round(frac * n)) - 68
        run("topk", f"topk {frac:.1%} (k={k})", AttentionConfig(method="topk", budget=k, **sw))
    for tp in args.topp:
        run("topp", f"topp p={tp}", AttentionConfig(method="topp", top_p=tp, **sw))
    for M in args.masses:
        for alloc in allocs:
            run(f"{alloc} mass-mode", f"mass mode {alloc} M={M}", calcfg,
                cal.choose_betas(cv, mass=M, allocation=alloc))
    print("done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
