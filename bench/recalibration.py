"""Does calibrated DIPR need re-calibration when the context grows? (issue 15, item 2)

Real SmolLM2-135M (f32, CPU). A prompt of P tokens is prefilled and calibrated (βs per layer
and query head from its last n_cal queries); then the following tokens of the text are
teacher-forced one decode step at a time until the context has grown well past ``--grow``×P.
Two runs per calibration target score every step against full attention (KL of the next-token
distribution, keys attended, top-1 agreement):

- ``once``: the βs chosen at P are kept for the whole run;
- ``recal``: when the context reaches ``grow``×P the βs are chosen again from the most recent
  n_cal tokens (the same ``Engine.calibrate``, on the grown caches).

The rows compare the two over the steps after the re-calibration point (where they differ) and
over the whole run. Writes recalibration.json and recalibration.md into --out.

    python -m bench.recalibration                            # about 10 min on 2 CPU cores
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np


from alaya_jax.attention.config import AttentionConfig, CalibrationConfig
from alaya_jax.runtime.corpus import TEXTS
from alaya_jax.runtime.engine import Engine
from alaya_jax.runtime.evaluation import copy_caches, engine_decoder, prepare_reference, step_metrics
from bench import harness


def run(engine, ref, tokens, cfg, *, recal_at):
    """Per-step (kl, keys fraction, top-1 agreement) over the reference's scored steps; the βs are
    re-chosen once when the context reaches ``recal_at`` tokens (None: never)."""
    p = ref.prefill_tokens
    caches, _ = engine.calibrate(copy_caches(ref.caches), [tokens[:p]], cfg)
    decode = engine_decoder(engine, cfg)
    kl, frac, top1 = [], [], []
    for i, tok in enumerate(ref.inputs):
        length = p + i  # tokens in the caches before this step
        if recal_at is not None and length == recal_at:
            caches, _ = engine.calibrate(caches, [tokens[:length]], cfg)
        lg, caches, aux = decode(caches, jnp.asarray([tok], jnp.int32))
        _, _, k = step_metrics(lg, ref.logits_full[i][None], jnp.asarray(ref.targets[i : i + 1]))
        kl.append(float(k[0]))
        att = np.mean([float(np.asarray(a["keys_attended"]).mean()) for a in jax.device_get(aux)])
        frac.append(att / (length + 1))
        top1.append(int(np.argmax(np.asarray(lg[0])) == np.argmax(np.asarray(ref.logits_full[i]))))
    return np.array(kl), np.array(frac), np.array(top1)


def main(argv=None):
    ap = harness.parser(__doc__.split("\n")[0], "recalibration", smoke="tiny: prefill 96, 48 steps after")
    ap.add_argument("--text", default="pydoc", choices=list(TEXTS))
    ap.add_argument("--prefill", type=int, default=1024)
    ap.add_argument("--keys", type=float, default=0.08, help="budget-mode target (sink + window are 68 keys)")
    ap.add_argument("--mass", type=float, default=0.9, help="mass-mode target")
    ap.add_argument("--grow", type=float, default=2.0, help="re-calibrate when the context reaches grow x prefill")
    ap.add_argument("--after", type=int, default=512, help="scored steps after the re-calibration point")
    ap.add_argument("--offset", type=int, default=20000, help="first token of the text used")
    args = ap.parse_args(argv)
    if args.smoke:
        args.prefill, args.after, args.keys = 96, 48, 0.97
    from models import load_smollm2

    _, model, tok = load_smollm2(dtype="float32")
    engine = Engine(model, prefill_chunk=512)
    p = args.prefill
    recal_at = int(round(args.grow * p))
    n = recal_at + args.after + 1
    ids = tok.encode(TEXTS[args.text]())[args.offset : args.offset + n]
    if len(ids) < n:
        raise SystemExit(f"the text has too few tokens after offset {args.offset} for {n}")
    t0 = time.perf_counter()
    ref = prepare_reference(engine, ids, prefill_tokens=p)
    ref_s = time.perf_counter() - t0
    n_cal = 64
    targets = [(f"keys {args.keys:.0%}", dict(dipr_keys=args.keys)), (f"mass {args.mass:g}", dict(dipr_mass=args.mass))]
    rows = []
    for name, kw in targets:
        cfg = AttentionConfig(method="dipr", collect_stats=True, calibration=CalibrationConfig(**kw, n_cal=n_cal))
        res = {}
        for mode, at in (("once", None), ("recal", recal_at)):
            t1 = time.perf_counter()
            kl, frac, top1 = run(engine, ref, ids, cfg, recal_at=at)
            after = slice(recal_at - p, None)
            res[mode] = dict(kl_after=float(kl[after].mean()), keys_after=float(frac[after].mean()),
                             top1_after=float(top1[after].mean()), kl_all=float(kl.mean()),
                             keys_all=float(frac.mean()), seconds=round(time.perf_counter() - t1, 1))
            print(name, mode, json.dumps(res[mode]), flush=True)
        rows.append({"target": name, **{f"{m}_{k}": v for m, r in res.items() for k, v in r.items()}})
    meta = harness.run_meta(model="SmolLM2-135M-Instruct f32", text=args.text, offset=args.offset, prefill=p,
                            recalibrated_at=recal_at, steps_after=args.after, n_cal=n_cal,
                            reference_seconds=round(ref_s, 1), sink=4, window=64, smoke=args.smoke)
    name = "recalibration" + ("_smoke" if args.smoke else "")
    lines = [f"# Re-calibration of calibrated DIPR when the context grows {args.grow:g}x", "",
             f"{meta['model']}, {meta['device']}, jax {meta['jax']}, {meta['date']}; text {args.text} (tokens "
             f"{args.offset}..{args.offset + n}); prompt {p} tokens calibrated on its last {n_cal} queries; "
             f"'recal' chooses the βs again at {recal_at} tokens from the last {n_cal}; scored against full "
             f"attention on the {args.after} steps after that point ('after') and on all {n - 1 - p} steps.", "",
             "| target | KL after, once | KL after, recal | keys after, once | keys after, recal | top-1 after, once "
             "| top-1 after, recal | KL all, once | KL all, recal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['target']} | {r['once_kl_after']:.4f} | {r['recal_kl_after']:.4f} | "
                     f"{100 * r['once_keys_after']:.2f}% | {100 * r['recal_keys_after']:.2f}% | "
                     f"{r['once_top1_after']:.3f} | {r['recal_top1_after']:.3f} | {r['once_kl_all']:.4f} | "
                     f"{r['recal_kl_all']:.4f} |")
    harness.write_results(args.out, name, {"meta": meta, "rows": rows}, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
